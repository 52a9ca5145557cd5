// kvk_input.cuh — the 16-bit element type a kernel specialization is compiled for, chosen by the macro INPUT_BF16
// (0: fp16, 1: bf16): widening one element, and packing/unpacking element pairs (the low half is the lower address).
// Round-to-nearest-even both ways (kvk_fp16.cuh, whose helpers have host twins).
#pragma once
#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"

#ifndef INPUT_BF16
#error "kvk_input.cuh needs INPUT_BF16 (0 fp16, 1 bf16)"
#endif

KVK_INLINE float kvk_in_to_float(kvk_u16 bits)
{
#if INPUT_BF16
    return kvk_bf16_bits_to_f32_soft(bits);
#else
    return kvk_f16_to_f32(kvk_f16{bits});
#endif
}

KVK_INLINE kvk_u16 kvk_float_to_in(float x)
{
#if INPUT_BF16
    return kvk_f32_to_bf16(x).bits;
#else
    return kvk_f32_to_f16(x).bits;
#endif
}

KVK_INLINE kvk_u32 kvk_in_pack2(float lo, float hi)
{
#if INPUT_BF16
    return kvk_pack_bf16x2(lo, hi);
#else
    return kvk_pack_f16x2(lo, hi);
#endif
}

KVK_INLINE void kvk_in_unpack2(kvk_u32 v, float& lo, float& hi)
{
#if INPUT_BF16
    kvk_unpack_bf16x2(v, lo, hi);
#else
    kvk_unpack_f16x2(v, lo, hi);
#endif
}
