// kvk_math.cuh — the fast approximate f32 functions of the special function unit, as softmax and
// LSE code uses them:
//
//   kvk_ex2(a)  ex2.approx.ftz.f32   2^a        hardware: <= 2 ulp from the correctly rounded result
//   kvk_lg2(a)  lg2.approx.ftz.f32   log2(a)    hardware: abs. error <= 2^-22 for a in (0.5, 2),
//                                               relative error <= 2^-22 elsewhere
//   kvk_rcp(a)  rcp.approx.ftz.f32   1/a        hardware: <= 1 ulp
//
// The host twins compute the function in double and round once to float, which is the correctly
// rounded result except in vanishingly rare near-halfway cases; then they apply .ftz exactly as the
// PTX ISA defines it: subnormal inputs are treated as zeros of the same sign and subnormal results
// are flushed to zeros of the same sign. So the hardware result lies within the error bound above of
// the host twin's (ex2: within 2 ulp of the twin, which is the correctly rounded value), NOT bit-equal
// to it: tests against hardware must use tolerances, never bit equality; special values (the tables
// below) and .ftz behaviour are exact on both.
//
// NaN results are the canonical NaN 0x7FFFFFFF (what the GPU produces; tests should only assert NaN).
//
// kvk_sincos_accurate (RoPE angles) is plain C++, the same code on the device and the host.
#pragma once
#include "common/kvk_types.cuh"

#ifndef __CUDA_ARCH__
// .ftz input: a subnormal operand reads as a zero of its sign.
KVK_INLINE float kvk_ftz_input(float a)
{
    const kvk_u32 u = kvk_f32_as_u32(a);
    return (u & 0x7F800000u) == 0 ? kvk_u32_as_f32(u & 0x80000000u) : a;
}

// .ftz result: a subnormal result becomes a zero of its sign.
KVK_INLINE float kvk_ftz_result(float r) { return kvk_ftz_input(r); }

KVK_INLINE bool kvk_is_nan_f32(float a) { return (kvk_f32_as_u32(a) & 0x7FFFFFFFu) > 0x7F800000u; }
#endif

// 2^a.  -Inf -> +0, ±0 and ±subnormal -> +1, +Inf -> +Inf, NaN -> NaN; a < -126 gives +0 (ftz).
KVK_INLINE float kvk_ex2(float a)
{
#ifdef __CUDA_ARCH__
    float d;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(d) : "f"(a));
    return d;
#else
    if (kvk_is_nan_f32(a)) return kvk_u32_as_f32(0x7FFFFFFFu);
    return kvk_ftz_result((float)__builtin_exp2((double)kvk_ftz_input(a)));
#endif
}

// log2(a).  -Inf and negative numbers -> NaN, ±0 and ±subnormal -> -Inf, +Inf -> +Inf, NaN -> NaN.
KVK_INLINE float kvk_lg2(float a)
{
#ifdef __CUDA_ARCH__
    float d;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(d) : "f"(a));
    return d;
#else
    const float x = kvk_ftz_input(a);
    if (kvk_is_nan_f32(x) || (x < 0.0f)) return kvk_u32_as_f32(0x7FFFFFFFu);
    if (x == 0.0f) return kvk_u32_as_f32(0xFF800000u);                     // -Inf for +0 and -0
    return kvk_ftz_result((float)__builtin_log2((double)x));
#endif
}

// 1/a.  ±0 and ±subnormal -> ±Inf, ±Inf -> ±0, NaN -> NaN; |a| > 2^126 gives ±0 (ftz result).
KVK_INLINE float kvk_rcp(float a)
{
#ifdef __CUDA_ARCH__
    float d;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(d) : "f"(a));
    return d;
#else
    if (kvk_is_nan_f32(a)) return kvk_u32_as_f32(0x7FFFFFFFu);
    // The double quotient rounded to float is the correctly rounded f32 quotient (53 >= 2*24 + 2).
    return kvk_ftz_result((float)(1.0 / (double)kvk_ftz_input(a)));
#endif
}

// sin and cos of a float angle of any magnitude below 2^31, within about 2 ulp, like the library's
// accurate sincosf (NOT __sincosf: RoPE angles reach 1e5 rad and more) but without its Payne-Hanek slow
// path, whose local-memory array would give the kernel a stack frame. Reduction by pi/2 in double: the
// fma rounds x - k*pi2hi once (error <= 2^-53 * pi/4) and pi2lo corrects pi2hi's own error, so r is
// accurate to ~1e-16 for every |k| < 2^31. Then Cephes' float minimax polynomials on [-pi/4, pi/4].
KVK_INLINE void kvk_sincos_accurate(float x, float& sinOut, float& cosOut)
{
    const double k = rint((double)x * 0.63661977236758134308);
    double r = fma(-k, 1.5707963267948966, (double)x);
    r = fma(-k, 6.123233995736766e-17, r);
    const float rf = (float)r, z = rf * rf;
    const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * rf + rf;
    const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
    switch ((int)((kvk_i64)k & 3)) {
    case 0: sinOut = sp; cosOut = cp; break;
    case 1: sinOut = cp; cosOut = -sp; break;
    case 2: sinOut = -sp; cosOut = -cp; break;
    default: sinOut = -cp; cosOut = sp; break;
    }
}
