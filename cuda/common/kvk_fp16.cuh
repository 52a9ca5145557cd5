// kvk_fp16.cuh — fp16 (IEEE binary16) and bf16 (bfloat16) storage types and their conversions to
// and from float, without cuda_fp16.h / cuda_bf16.h.
//
// Device code uses the PTX `cvt` instructions; the host twins reproduce them bit for bit:
//   f32 -> f16   cvt.rn.f16.f32     round to nearest even; subnormal f16 results are kept (no .ftz);
//                                   |x| >= 65520 rounds to ±Inf (IEEE: 65520 is the halfway point
//                                   between 65504 = max and 65536, and 65504's mantissa is odd).
//   f32 -> bf16  cvt.rn.bf16.f32    round to nearest even (sm_80+); overflow rounds to ±Inf.
//   f16 -> f32   cvt.f32.f16        exact.
//   bf16 -> f32  bit shift          exact (a bf16 is the top half of a float); NaN payload kept.
// NaN: the host twins return the canonical NaN the hardware produces — 0x7FFF for f16/bf16 results
// and 0x7FFFFFFF for f32 results of cvt.f32.f16, sign dropped — which is also what CUDA's own host
// fallbacks in cuda_fp16.hpp / cuda_bf16.hpp do. (bf16 -> f32 is a shift on both sides, so it keeps
// any payload.) Tests should assert "NaN stays NaN", not a particular payload, until checked on a GPU.
//
// Packed pairs follow the register convention of PTX: element 0 in bits [15:0], element 1 in
// bits [31:16]; `cvt.rn.f16x2.f32 d, a, b` puts cvt(a) in the HIGH half, so pack(lo, hi) passes
// (hi, lo).
#pragma once
#include "common/kvk_types.cuh"

struct alignas(2) kvk_f16 { kvk_u16 bits; };
struct alignas(2) kvk_bf16 { kvk_u16 bits; };

static_assert(sizeof(kvk_f16) == 2 && sizeof(kvk_bf16) == 2, "16-bit float storage");

// ---- Software conversions (the host twins; also usable by tests and by CPU reference code) -------

// float -> binary16, round to nearest even. Follows IEEE 754: no flush of subnormal inputs or results.
KVK_INLINE kvk_u16 kvk_f32_to_f16_bits_soft(float x)
{
    const kvk_u32 u = kvk_f32_as_u32(x);
    const kvk_u32 sign = (u >> 16) & 0x8000u;
    const kvk_u32 a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7FFFu;                       // NaN -> canonical NaN
    if (a >= 0x477FF000u) return (kvk_u16)(sign | 0x7C00u);    // >= 65520 (incl. Inf) -> Inf
    kvk_u32 result, rem, half;
    if (a >= 0x38800000u) {                                    // >= 2^-14: normal binary16
        // Rebias the exponent (127 -> 15) in place, then drop 13 mantissa bits.
        const kvk_u32 m = a - 0x38000000u;
        result = m >> 13;
        rem = m & 0x1FFFu;
        half = 0x1000u;
    } else if (a <= 0x33000000u) {                             // <= 2^-25: rounds to ±0
        return (kvk_u16)sign;                                  // (2^-25 is a tie with 0, which is even)
    } else {                                                   // subnormal binary16, unit 2^-24
        const kvk_u32 e = a >> 23;                             // 102..112
        const kvk_u32 mant = (a & 0x7FFFFFu) | 0x800000u;      // value = mant * 2^(e-150)
        const kvk_u32 shift = 126u - e;                        // 14..24: value / 2^-24 = mant >> shift
        result = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    }
    // Round half to even; a carry out of the mantissa correctly bumps the exponent
    // (largest subnormal -> smallest normal, 65504-range values never reach here).
    if (rem > half || (rem == half && (result & 1u))) ++result;
    return (kvk_u16)(sign | result);
}

// binary16 -> float, exact; NaN -> 0x7FFFFFFF.
KVK_INLINE float kvk_f16_bits_to_f32_soft(kvk_u16 h)
{
    const kvk_u32 sign = (kvk_u32)(h & 0x8000u) << 16;
    const kvk_u32 e = (h >> 10) & 0x1Fu;
    kvk_u32 m = h & 0x3FFu;
    kvk_u32 u;
    if (e == 0x1Fu) {
        u = m ? 0x7FFFFFFFu : (sign | 0x7F800000u);            // NaN (canonical) or ±Inf
    } else if (e != 0) {
        u = sign | ((e + 112u) << 23) | (m << 13);             // normal: rebias 15 -> 127
    } else if (m == 0) {
        u = sign;                                              // ±0
    } else {
        // Subnormal m * 2^-24: normalise so the leading one sits at bit 10.
        kvk_u32 exp = 113u;                                    // biased exponent of 2^-14
        while ((m & 0x400u) == 0) { m <<= 1; --exp; }
        u = sign | (exp << 23) | ((m & 0x3FFu) << 13);
    }
    return kvk_u32_as_f32(u);
}

// float -> bfloat16, round to nearest even (no flush); NaN -> 0x7FFF.
KVK_INLINE kvk_u16 kvk_f32_to_bf16_bits_soft(float x)
{
    const kvk_u32 u = kvk_f32_as_u32(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;
    // Adding 0x7FFF plus the lowest kept bit rounds half to even; the carry propagates into the
    // exponent, so the largest finite values round up to Inf exactly as IEEE says.
    return (kvk_u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

KVK_INLINE float kvk_bf16_bits_to_f32_soft(kvk_u16 b) { return kvk_u32_as_f32((kvk_u32)b << 16); }

// ---- Scalar conversions ---------------------------------------------------------------------------

KVK_INLINE kvk_f16 kvk_f32_to_f16(float x)
{
    kvk_f16 r;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
    r.bits = kvk_f32_to_f16_bits_soft(x);
#endif
    return r;
}

KVK_INLINE float kvk_f16_to_f32(kvk_f16 h)
{
#ifdef __CUDA_ARCH__
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h.bits));
    return x;
#else
    return kvk_f16_bits_to_f32_soft(h.bits);
#endif
}

KVK_INLINE kvk_bf16 kvk_f32_to_bf16(float x)
{
    kvk_bf16 r;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
    r.bits = kvk_f32_to_bf16_bits_soft(x);
#endif
    return r;
}

// Exact on every target, so no PTX is needed: the same code runs on device and host.
KVK_INLINE float kvk_bf16_to_f32(kvk_bf16 b) { return kvk_bf16_bits_to_f32_soft(b.bits); }

// ---- Packed pairs (one 32-bit register: lo in bits [15:0], hi in bits [31:16]) --------------------

KVK_INLINE kvk_u32 kvk_pack_f16x2(float lo, float hi)
{
#ifdef __CUDA_ARCH__
    kvk_u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (kvk_u32)kvk_f32_to_f16_bits_soft(lo) | ((kvk_u32)kvk_f32_to_f16_bits_soft(hi) << 16);
#endif
}

KVK_INLINE kvk_u32 kvk_pack_bf16x2(float lo, float hi)
{
#ifdef __CUDA_ARCH__
    kvk_u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (kvk_u32)kvk_f32_to_bf16_bits_soft(lo) | ((kvk_u32)kvk_f32_to_bf16_bits_soft(hi) << 16);
#endif
}

KVK_INLINE void kvk_unpack_f16x2(kvk_u32 v, float& lo, float& hi)
{
    lo = kvk_f16_to_f32(kvk_f16{(kvk_u16)(v & 0xFFFFu)});
    hi = kvk_f16_to_f32(kvk_f16{(kvk_u16)(v >> 16)});
}

KVK_INLINE void kvk_unpack_bf16x2(kvk_u32 v, float& lo, float& hi)
{
    lo = kvk_u32_as_f32(v << 16);
    hi = kvk_u32_as_f32(v & 0xFFFF0000u);
}
