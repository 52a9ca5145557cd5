// kvk_quant.cuh — the element functions of the quantized KV formats (src/KvKernels/Quantization/KvFormat.cs) and
// the addressing of a quantized paged pool (QuantizedKvPool), shared by cuda/quant/*.cu. Plain C++: the host
// (emulator) runs the same lines; fp8 conversions come from kvk_fp8.cuh, which has host twins.
//
// Codec ids: 0 fp8 e4m3, 1 fp8 e5m2, 2 int8 symmetric, 3 asymmetric (codes of Bits bits with (scale, minimum)).
// Scale granularity ids: 0 per tensor, 1 per KV head, 2 per (token, KV head).
#pragma once
#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"
#include "common/kvk_fp8.cuh"

enum : int { KVK_Q_E4M3 = 0, KVK_Q_E5M2 = 1, KVK_Q_INT8 = 2, KVK_Q_ASYM = 3 };
enum : int { KVK_Q_PER_TENSOR = 0, KVK_Q_PER_HEAD = 1, KVK_Q_PER_TOKEN = 2 };

// The largest code magnitude of a symmetric codec (KvFormat.CodeMax).
template <int Codec>
KVK_INLINE float kvk_q_sym_max()
{
    return Codec == KVK_Q_E4M3 ? 448.0f : Codec == KVK_Q_E5M2 ? 57344.0f : 127.0f;
}

// fp8 / int8 code of x with scale s (KvQuantMath.Code): s == 0 -> 0; fp8 divides, or multiplies by fl(1 / s).
template <int Codec>
KVK_INLINE kvk_u32 kvk_q_sym_code(float x, float s, int reciprocal)
{
    if (s == 0.0f) return 0u;
    if (Codec == KVK_Q_INT8) return (kvk_u32)(kvk_u8)(signed char)(int)fminf(fmaxf(rintf(x / s), -127.0f), 127.0f);
    const float y = reciprocal ? x * (1.0f / s) : x / s;
    return Codec == KVK_Q_E4M3 ? (kvk_u32)kvk_f32_to_e4m3(y).bits : (kvk_u32)kvk_f32_to_e5m2(y).bits;
}

// The value of a symmetric code (before its scale).
template <int Codec>
KVK_INLINE float kvk_q_sym_value(kvk_u32 code)
{
    if (Codec == KVK_Q_E4M3) return kvk_e4m3_to_f32(kvk_e4m3{(kvk_u8)code});
    if (Codec == KVK_Q_E5M2) return kvk_e5m2_to_f32(kvk_e5m2{(kvk_u8)code});
    return (float)(signed char)(kvk_u8)code;
}

// Asymmetric code of x with the stored scale and minimum (KvQuantMath.AsymmetricCode).
template <int Bits>
KVK_INLINE kvk_u32 kvk_q_asym_code(float x, float s, float mn)
{
    return s == 0.0f ? 0u : (kvk_u32)fminf(fmaxf(rintf((x - mn) / s), 0.0f), (float)((1 << Bits) - 1));
}

// Index of (slot, head) among the slot-major rows: code row, per-token scale, channel groups (QuantizedKvPool.RowIndex).
KVK_INLINE kvk_i64 kvk_q_row_index(kvk_i64 slot, int head, int numKvHeads, int pageSize, int hnd)
{
    if (!hnd) return slot * numKvHeads + head;
    const kvk_i64 page = slot / pageSize;
    return (page * numKvHeads + head) * pageSize + (slot - page * pageSize);
}

// Index of the token-group block holding (slot, head) (QuantizedKvPool.BlockIndex).
KVK_INLINE kvk_i64 kvk_q_block_index(kvk_i64 slot, int head, int numKvHeads, int pageSize, int group, int hnd)
{
    const int blocksPerPage = pageSize / group;
    const kvk_i64 page = slot / pageSize;
    const kvk_i64 block = (slot - page * pageSize) / group;
    return hnd ? (page * numKvHeads + head) * blocksPerPage + block : (page * blocksPerPage + block) * numKvHeads + head;
}
