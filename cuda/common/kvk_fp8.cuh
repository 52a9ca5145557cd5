// kvk_fp8.cuh — fp8 storage types (OCP/NVIDIA e4m3 and e5m2) and their conversions to and from
// f32 and f16, without cuda_fp8.h.
//
// Formats (sign bit 7, then exponent, then mantissa):
//   e4m3  bias 7, 3 mantissa bits, NO infinities; NaN = S.1111.111 (0x7F, 0xFF); max 448 = 1.75 * 2^8
//         (0x7E); min normal 2^-6 (0x08); min subnormal 2^-9 (0x01).
//   e5m2  bias 15, 2 mantissa bits, IEEE-like: Inf = S.11111.00 (0x7C, 0xFC), NaN = S.11111.{01,10,11};
//         max 57344 = 1.75 * 2^15 (0x7B); min normal 2^-14 (0x04); min subnormal 2^-16 (0x01).
//         An e5m2 byte is exactly the high byte of the binary16 with the same value.
//
// Device instructions (PTX ISA, cvt; sm_89+, PTX ISA 8.1+ — NVRTC 12.4 emits 8.4):
//   f32 -> fp8   cvt.rn.satfinite.{e4m3x2|e5m2x2}.f32 d, a, b     d[15:8] = cvt(a), d[7:0] = cvt(b)
//   fp8 -> f16   cvt.rn.f16x2.{e4m3x2|e5m2x2} d, a                upper byte -> d[31:16], lower -> d[15:0]
// sm_80 has no fp8 cvt: there the device runs a software path that gives the same bits (below).
//
// Rounding (f32 -> fp8, every target): round to nearest, ties to even (.rn); .satfinite: a finite |x|
// above the largest finite value, and ±Inf, give ±max (448 / 57344) — e5m2 never produces Inf, e4m3
// never NaN from a number. Values whose magnitude is at most half the smallest subnormal round to a
// zero of x's sign (the tie at exactly half goes to 0, whose mantissa is even). f32 subnormal inputs
// are far below that, so flushing them or not makes no difference.
//
// NaN encodings chosen for the host twins and the sm_80 software path:
//   f32 NaN -> e4m3: 0x7F, e5m2: 0x7F (sign dropped, like the canonical f16/f32 NaN 0x7FFF /
//                    0x7FFFFFFF the hardware produces elsewhere). PTX only says "NaN"; sm_89+ hardware
//                    may keep the sign (0xFF). Tests assert "is a NaN code" against hardware.
//   e4m3 NaN -> f16: 0x7FFF, sign dropped (what CUDA 12's cuda_fp8.hpp software fallback returns).
//   e5m2 NaN -> f16: the byte shifted into the high half (sign and payload kept: 0x7D -> 0x7D00),
//                    again as cuda_fp8.hpp's fallback does; the hardware may quieten it instead.
//   fp8 -> f32 goes through f16 (cvt.f32.f16), so every NaN becomes 0x7FFFFFFF on all paths.
// All of these are to be confirmed on sm_89/sm_90 hardware; everything else is exact by definition.
//
// Packed pairs follow the register convention: element 0 in the low byte / low half.
#pragma once
#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"

struct alignas(1) kvk_e4m3 { kvk_u8 bits; };
struct alignas(1) kvk_e5m2 { kvk_u8 bits; };

static_assert(sizeof(kvk_e4m3) == 1 && sizeof(kvk_e5m2) == 1, "8-bit float storage");

#define KVK_E4M3_MAX 448.0f
#define KVK_E5M2_MAX 57344.0f
#define KVK_FP8_NAN_BITS 0x7Fu

// ---- Software conversions (host twins, the sm_80 device path, CPU reference code) ---------------

// float -> fp8 with round-to-nearest-even and satfinite. The format is described by its mantissa
// width M, the f32 bit patterns of its largest finite value, smallest normal and half its smallest
// subnormal, and the exponent rebias (127 - bias).
template <int M>
KVK_INLINE kvk_u32 kvk_f32_to_fp8_bits_generic(float x, kvk_u32 maxBits, kvk_u32 maxCode, kvk_u32 minNormalBits,
                                               kvk_u32 halfMinSubBits, kvk_u32 rebias)
{
    const kvk_u32 u = kvk_f32_as_u32(x);
    const kvk_u32 sign = (u >> 24) & 0x80u;
    const kvk_u32 a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return KVK_FP8_NAN_BITS;              // NaN
    if (a > maxBits) return sign | maxCode;                   // above max (incl. Inf): satfinite
    kvk_u32 result, rem, half;
    if (a >= minNormalBits) {                                  // normal: rebias in place, drop 23-M bits
        const kvk_u32 m = a - (rebias << 23);
        result = m >> (23 - M);
        rem = m & ((1u << (23 - M)) - 1u);
        half = 1u << (22 - M);
    } else if (a <= halfMinSubBits) {                          // <= half the smallest subnormal
        return sign;
    } else {                                                   // subnormal, unit 2^(1-bias-M)
        const kvk_u32 e = a >> 23;
        const kvk_u32 mant = (a & 0x7FFFFFu) | 0x800000u;      // value = mant * 2^(e-150)
        // value / unit = mant >> shift with shift = 150 - e + (1 - bias - M) = (rebias + 24 - M) - e
        const kvk_u32 shift = (rebias + 24u - (kvk_u32)M) - e;
        result = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    }
    // Round half to even. A carry out of the mantissa bumps the exponent correctly (largest subnormal
    // -> smallest normal); it cannot pass maxCode because everything above max returned already and
    // max itself has an even mantissa for e4m3 (110) and is below the tie 61440 for e5m2.
    if (rem > half || (rem == half && (result & 1u))) ++result;
    return sign | result;
}

// e4m3: max 448 = 0x43E00000, min normal 2^-6 = 0x3C800000, half min subnormal 2^-10 = 0x3A800000.
KVK_INLINE kvk_u8 kvk_f32_to_e4m3_bits_soft(float x)
{
    return (kvk_u8)kvk_f32_to_fp8_bits_generic<3>(x, 0x43E00000u, 0x7Eu, 0x3C800000u, 0x3A800000u, 120u);
}

// e5m2: max 57344 = 0x47600000, min normal 2^-14 = 0x38800000, half min subnormal 2^-17 = 0x37000000.
KVK_INLINE kvk_u8 kvk_f32_to_e5m2_bits_soft(float x)
{
    return (kvk_u8)kvk_f32_to_fp8_bits_generic<2>(x, 0x47600000u, 0x7Bu, 0x38800000u, 0x37000000u, 112u);
}

// e4m3 -> binary16 bits, exact (every e4m3 value is a normal f16); NaN -> 0x7FFF.
KVK_INLINE kvk_u16 kvk_e4m3_bits_to_f16_soft(kvk_u8 b)
{
    const kvk_u32 sign = ((kvk_u32)b & 0x80u) << 8;
    const kvk_u32 e = ((kvk_u32)b >> 3) & 0xFu;
    kvk_u32 m = (kvk_u32)b & 0x7u;
    if (e == 0xFu && m == 0x7u) return 0x7FFFu;
    if (e != 0) return (kvk_u16)(sign | ((e + 8u) << 10) | (m << 7));   // rebias 7 -> 15
    if (m == 0) return (kvk_u16)sign;
    // Subnormal m * 2^-9: normalise so the leading one is the implicit bit (bit 3).
    kvk_u32 exp = 9u;                                                   // f16 exponent field of 2^-6
    while ((m & 0x8u) == 0) { m <<= 1; --exp; }
    return (kvk_u16)(sign | (exp << 10) | ((m & 0x7u) << 7));
}

// e5m2 -> binary16 bits: the byte is the high byte of the f16 (NaN payload and sign kept).
KVK_INLINE kvk_u16 kvk_e5m2_bits_to_f16_soft(kvk_u8 b) { return (kvk_u16)((kvk_u32)b << 8); }

// ---- Packed f16x2 multiply (mul.rn.f16x2; every target) ---------------------------------------------

// Both halves multiplied with round-to-nearest-even, subnormals kept (no .ftz).
KVK_INLINE kvk_u32 kvk_hmul2_bits(kvk_u32 a, kvk_u32 b)
{
#ifdef __CUDA_ARCH__
    kvk_u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#else
    // The f32 product of two f16 values is exact (11 + 11 significant bits), so rounding it to f16
    // once is the correctly rounded f16 product.
    const float lo = kvk_f16_bits_to_f32_soft((kvk_u16)(a & 0xFFFFu)) * kvk_f16_bits_to_f32_soft((kvk_u16)(b & 0xFFFFu));
    const float hi = kvk_f16_bits_to_f32_soft((kvk_u16)(a >> 16)) * kvk_f16_bits_to_f32_soft((kvk_u16)(b >> 16));
    return (kvk_u32)kvk_f32_to_f16_bits_soft(lo) | ((kvk_u32)kvk_f32_to_f16_bits_soft(hi) << 16);
#endif
}

// e4m3x2 -> f16x2 without the fp8 cvt (the sm_80 device path; host-callable so the emulator tests it).
// Each byte S.EEEE.MMM is moved to the top of its half and the magnitude shifted right by one, which
// reads as the f16 0.EEEE.MMM0000000 = 2^(E-15) * 1.MMM (E > 0) or 0.MMM * 2^-14 (E = 0); one exact
// multiply by 2^8 (f16 0x5C00) turns the bias 15 into 7 for normals and subnormals alike. S.1111.111
// would read as ±480: it is replaced by the canonical NaN 0x7FFF.
KVK_INLINE kvk_u32 kvk_e4m3x2_to_f16x2_bias_trick(kvk_u16 v)
{
    const kvk_u32 x = v;
    const kvk_u32 w = ((x & 0xFF00u) << 16) | ((x & 0x00FFu) << 8);
    kvk_u32 h = kvk_hmul2_bits((w & 0x7F007F00u) >> 1, 0x5C005C00u) | (w & 0x80008000u);
    if ((x & 0x007Fu) == 0x007Fu) h = (h & 0xFFFF0000u) | 0x00007FFFu;
    if ((x & 0x7F00u) == 0x7F00u) h = (h & 0x0000FFFFu) | 0x7FFF0000u;
    return h;
}

// ---- f32 -> fp8 ------------------------------------------------------------------------------------

// Two floats -> e4m3x2: lo in bits [7:0], hi in bits [15:8] (cvt's first source goes to the HIGH byte).
KVK_INLINE kvk_u16 kvk_pack_e4m3x2(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    kvk_u16 d;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (kvk_u16)((kvk_u32)kvk_f32_to_e4m3_bits_soft(lo) | ((kvk_u32)kvk_f32_to_e4m3_bits_soft(hi) << 8));
#endif
}

KVK_INLINE kvk_u16 kvk_pack_e5m2x2(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    kvk_u16 d;
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (kvk_u16)((kvk_u32)kvk_f32_to_e5m2_bits_soft(lo) | ((kvk_u32)kvk_f32_to_e5m2_bits_soft(hi) << 8));
#endif
}

// Four floats -> four fp8 bytes, v0 in bits [7:0] ... v3 in bits [31:24].
KVK_INLINE kvk_u32 kvk_pack_e4m3x4(float v0, float v1, float v2, float v3)
{
    return (kvk_u32)kvk_pack_e4m3x2(v0, v1) | ((kvk_u32)kvk_pack_e4m3x2(v2, v3) << 16);
}

KVK_INLINE kvk_u32 kvk_pack_e5m2x4(float v0, float v1, float v2, float v3)
{
    return (kvk_u32)kvk_pack_e5m2x2(v0, v1) | ((kvk_u32)kvk_pack_e5m2x2(v2, v3) << 16);
}

KVK_INLINE kvk_e4m3 kvk_f32_to_e4m3(float x)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return kvk_e4m3{(kvk_u8)(kvk_pack_e4m3x2(x, 0.0f) & 0xFFu)};
#else
    return kvk_e4m3{kvk_f32_to_e4m3_bits_soft(x)};
#endif
}

KVK_INLINE kvk_e5m2 kvk_f32_to_e5m2(float x)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return kvk_e5m2{(kvk_u8)(kvk_pack_e5m2x2(x, 0.0f) & 0xFFu)};
#else
    return kvk_e5m2{kvk_f32_to_e5m2_bits_soft(x)};
#endif
}

// ---- fp8 -> f16 / f32 ------------------------------------------------------------------------------

// e4m3x2 (byte 0 low) -> f16x2 (byte 0 -> bits [15:0], byte 1 -> bits [31:16]); exact.
KVK_INLINE kvk_u32 kvk_e4m3x2_to_f16x2(kvk_u16 v)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    kvk_u32 d;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(v));
    return d;
#elif defined(__CUDA_ARCH__)
    return kvk_e4m3x2_to_f16x2_bias_trick(v);
#else
    return (kvk_u32)kvk_e4m3_bits_to_f16_soft((kvk_u8)(v & 0xFFu)) | ((kvk_u32)kvk_e4m3_bits_to_f16_soft((kvk_u8)(v >> 8)) << 16);
#endif
}

KVK_INLINE kvk_u32 kvk_e5m2x2_to_f16x2(kvk_u16 v)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    kvk_u32 d;
    asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(d) : "h"(v));
    return d;
#else
    const kvk_u32 x = v;
    return ((x & 0xFF00u) << 16) | ((x & 0x00FFu) << 8);
#endif
}

// Four fp8 bytes (byte 0 lowest) -> two f16x2 registers: out[0] = bytes 0,1, out[1] = bytes 2,3.
KVK_INLINE void kvk_e4m3x4_to_f16x4(kvk_u32 v, kvk_u32 (&out)[2])
{
    out[0] = kvk_e4m3x2_to_f16x2((kvk_u16)(v & 0xFFFFu));
    out[1] = kvk_e4m3x2_to_f16x2((kvk_u16)(v >> 16));
}

KVK_INLINE void kvk_e5m2x4_to_f16x4(kvk_u32 v, kvk_u32 (&out)[2])
{
    out[0] = kvk_e5m2x2_to_f16x2((kvk_u16)(v & 0xFFFFu));
    out[1] = kvk_e5m2x2_to_f16x2((kvk_u16)(v >> 16));
}

// Pairs -> two floats (exact; NaN -> 0x7FFFFFFF).
KVK_INLINE void kvk_e4m3x2_to_f32x2(kvk_u16 v, float& lo, float& hi) { kvk_unpack_f16x2(kvk_e4m3x2_to_f16x2(v), lo, hi); }
KVK_INLINE void kvk_e5m2x2_to_f32x2(kvk_u16 v, float& lo, float& hi) { kvk_unpack_f16x2(kvk_e5m2x2_to_f16x2(v), lo, hi); }

KVK_INLINE float kvk_e4m3_to_f32(kvk_e4m3 x)
{
    return kvk_f16_to_f32(kvk_f16{(kvk_u16)(kvk_e4m3x2_to_f16x2((kvk_u16)x.bits) & 0xFFFFu)});
}

KVK_INLINE float kvk_e5m2_to_f32(kvk_e5m2 x)
{
    return kvk_f16_to_f32(kvk_f16{(kvk_u16)(kvk_e5m2x2_to_f16x2((kvk_u16)x.bits) & 0xFFFFu)});
}
