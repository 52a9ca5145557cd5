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
