// kvk_types.cuh — fixed-width integers, bit casts and small utilities shared by every kernel.
//
// Kernels are compiled by NVRTC with no toolkit headers (no <cstdint>, no cuda_fp16.h), and later by
// g++ against the host shim in cuda/emulation/, so everything here is plain C++17 that both accept.
// Rule for the whole of cuda/common: inline PTX appears only inside `#ifdef __CUDA_ARCH__`, and the
// `#else` branch is a host twin in plain C++ that computes exactly what the PTX ISA specifies.
#pragma once

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
#error "KvKernels targets sm_80 and newer (cvt.rn.bf16.f32, ld.global.nc.L1::no_allocate)"
#endif

typedef signed char        kvk_i8;
typedef unsigned char      kvk_u8;
typedef short              kvk_i16;
typedef unsigned short     kvk_u16;
typedef int                kvk_i32;
typedef unsigned int       kvk_u32;
typedef long long          kvk_i64;
typedef unsigned long long kvk_u64;

static_assert(sizeof(kvk_i8) == 1 && sizeof(kvk_u8) == 1, "8-bit types");
static_assert(sizeof(kvk_i16) == 2 && sizeof(kvk_u16) == 2, "16-bit types");
static_assert(sizeof(kvk_i32) == 4 && sizeof(kvk_u32) == 4, "32-bit types");
static_assert(sizeof(kvk_i64) == 8 && sizeof(kvk_u64) == 8, "64-bit types");
static_assert(sizeof(float) == 4, "float is IEEE binary32");
static_assert(sizeof(void*) == 8, "64-bit addresses");

// Every helper in cuda/common is a device function that is always inlined; the emulation shim
// defines __device__ and __forceinline__ for the host build.
#define KVK_INLINE __device__ __forceinline__

// Full unrolling of a loop with a compile-time trip count (arrays indexed by the loop variable then
// live in registers). g++ does not know `#pragma unroll`, so the host build gets GCC's spelling.
#if defined(__CUDACC__)
#define KVK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KVK_UNROLL _Pragma("GCC unroll 64")
#else
#define KVK_UNROLL
#endif

// Kernels are written `extern "C" __global__ __launch_bounds__(N) void name(...)` (the form the
// library's signature reader expects). `__launch_bounds__(1024)` makes a kernel launchable with any
// legal block size: ptxas keeps it within 64 registers per thread, so 1024 threads fit an SM's
// 64K-register file. A host build that does not know the attribute gets an empty stand-in.
#if !defined(__CUDACC__) && !defined(__launch_bounds__)
#define __launch_bounds__(...)
#endif

// KVK_DYNAMIC_SHARED(type, name) declares `type* const name`, this block's dynamic shared memory (the launch's
// sharedBytes), 16-byte aligned. The emulator's shim (cuda/emulation/kvk_emulation.h) defines the host side.
#if defined(__CUDA_ARCH__) && !defined(KVK_DYNAMIC_SHARED)
#define KVK_DYNAMIC_SHARED(type, name)                                        \
    extern __shared__ __align__(16) unsigned char kvk_dynamic_smem_[];        \
    type* const name = reinterpret_cast<type*>(kvk_dynamic_smem_)
#endif

template <typename T>
KVK_INLINE T kvk_min(T a, T b) { return b < a ? b : a; }

template <typename T>
KVK_INLINE T kvk_max(T a, T b) { return a < b ? b : a; }

// Reinterpret the bits of a float as an unsigned int and back (no conversion).
KVK_INLINE kvk_u32 kvk_f32_as_u32(float x)
{
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    kvk_u32 u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

KVK_INLINE float kvk_u32_as_f32(kvk_u32 u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// A pointer's address as an integer (alignment checks in host twins, debugging).
KVK_INLINE kvk_u64 kvk_address(const void* p) { return reinterpret_cast<kvk_u64>(p); }
