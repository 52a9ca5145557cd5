// kvk_emulation.h — host shim that lets the kernel sources in cuda/**/*.cu compile with g++ (C++17)
// and run on the CPU emulator in libkvk_emu.so: each CUDA thread is a fiber, each block runs on one
// OS thread, blocks run in parallel on a pool of OS threads. Include it FIRST, then the .cu file,
// then one KVK_EMU_EXPORT(kernel) per extern "C" __global__ entry point:
//
//     #include "emulation/kvk_emulation.h"
//     #include "paging/paging.cu"
//     KVK_EMU_EXPORT(paging_append)
//
// Build: g++ -std=c++17 -O1 -g -fPIC -shared -pthread -fstack-clash-protection -I<dir holding the
// cuda/ tree's contents> wrapper.cpp -L<dir> -lkvk_emu -Wl,-rpath,<dir> -o kernel.so
//
// What the shim provides (CUDA spelling, host semantics):
//   qualifiers      __global__ __device__ __host__ __forceinline__ __noinline__ __launch_bounds__
//                   __align__ __constant__ __managed__ __grid_constant__; __restrict__ is g++'s own
//   __shared__      `static thread_local`: one copy per OS thread = per running block. The emulator
//                   fills every block's static shared memory with 0xFF before the block starts (as
//                   on a GPU its contents are undefined; 0xFF makes floats NaN and ints -1), so a
//                   read before the first write shows up. Accesses past a static array are NOT
//                   caught (the storage is the module's TLS block).
//   KVK_DYNAMIC_SHARED(type, name)   declares `type* const name` = this block's dynamic shared
//                   memory (16-byte aligned, ends at a guard page, also filled with 0xFF).
//                   Device-side definition (for cuda/common, under #ifdef __CUDA_ARCH__), one line:
//                     #define KVK_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) unsigned char
//                         kvk_dynamic_smem_[]; type* const name = reinterpret_cast<type*>(kvk_dynamic_smem_)
//   threadIdx blockIdx blockDim gridDim warpSize, uint3, dim3, the CUDA vector types + make_*
//   __syncthreads[_count|_and|_or], __syncwarp, __shfl[_up|_down|_xor]_sync (PTX shfl.sync
//   semantics incl. width), __ballot_sync __any_sync __all_sync __activemask __match_any_sync
//   __match_all_sync __reduce_{add,min,max,and,or,xor}_sync, atomics (really atomic across OS
//   threads), __threadfence*, math and integer intrinsics, __ldg & cache-hinted loads/stores,
//   printf (stdio), assert (reports an error naming the thread and stops the launch), __trap().
// Not emulated: memory-model races (fibers of a block run one at a time, so a missing
// __syncthreads between a write and another thread's read may still give the right answer — the
// barrier checks catch divergent barriers, not missing ones), spin-waits on other threads of the
// same block without __nanosleep, inter-block synchronisation, timing.
#pragma once

#ifdef __CUDA_ARCH__
#error "kvk_emulation.h is the host shim of the CPU emulator; it must not be compiled for a device"
#endif
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#error "kvk_emulation.h is for the system C++ compiler, not nvcc/NVRTC"
#endif

// System headers first: the macros below (__noinline__ in particular) must not reach them.
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <math.h>
#include <new>
#include <stdio.h>
#include <type_traits>
#include <utility>

#include "kvk_emu_abi.h"

#define KVK_EMULATION 1

// ---- qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
#define __grid_constant__
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define __shared__ static thread_local
#if !defined(__clang__) && !defined(__builtin_assume)
#define __builtin_assume(x) ((void)sizeof(x))
#endif

// Dynamic shared memory (see the header comment for the device-side definition).
#define KVK_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(kvk_emu_state.dynamic_shared)

// ---- built-in variables --------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(kvk_emu_state.thread_idx))
#define blockIdx (static_cast<const uint3&>(kvk_emu_state.block_idx))
#define blockDim (static_cast<const dim3&>(kvk_emu_state.block_dim))
#define gridDim (static_cast<const dim3&>(kvk_emu_state.grid_dim))
constexpr int warpSize = 32;

// ---- vector types (alignment as in CUDA 12's vector_types.h) -------------------------------------
#define KVK_EMU_VEC(T, name, a2, a4)                                                                        \
    struct __attribute__((aligned(sizeof(T)))) name##1 { T x; };                                         \
    struct __attribute__((aligned(a2))) name##2 { T x, y; };                                             \
    struct name##3 { T x, y, z; };                                                                       \
    struct __attribute__((aligned(a4))) name##4 { T x, y, z, w; };                                       \
    inline name##1 make_##name##1(T x) { return name##1{x}; }                                             \
    inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                                     \
    inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
KVK_EMU_VEC(signed char, char, 2, 4)
KVK_EMU_VEC(unsigned char, uchar, 2, 4)
KVK_EMU_VEC(short, short, 4, 8)
KVK_EMU_VEC(unsigned short, ushort, 4, 8)
KVK_EMU_VEC(int, int, 8, 16)
KVK_EMU_VEC(long, long, 16, 16)
KVK_EMU_VEC(unsigned long, ulong, 16, 16)
KVK_EMU_VEC(long long, longlong, 16, 16)
KVK_EMU_VEC(unsigned long long, ulonglong, 16, 16)
KVK_EMU_VEC(float, float, 8, 16)
KVK_EMU_VEC(double, double, 16, 16)
#undef KVK_EMU_VEC
struct __attribute__((aligned(4))) uint1 { unsigned int x; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline uint1 make_uint1(unsigned int x) { return uint1{x}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
inline char3 make_char3(signed char x, signed char y, signed char z) { return char3{x, y, z}; }
inline uchar3 make_uchar3(unsigned char x, unsigned char y, unsigned char z) { return uchar3{x, y, z}; }
inline short3 make_short3(short x, short y, short z) { return short3{x, y, z}; }
inline ushort3 make_ushort3(unsigned short x, unsigned short y, unsigned short z) { return ushort3{x, y, z}; }
inline int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
inline long3 make_long3(long x, long y, long z) { return long3{x, y, z}; }
inline ulong3 make_ulong3(unsigned long x, unsigned long y, unsigned long z) { return ulong3{x, y, z}; }
inline longlong3 make_longlong3(long long x, long long y, long long z) { return longlong3{x, y, z}; }
inline ulonglong3 make_ulonglong3(unsigned long long x, unsigned long long y, unsigned long long z) { return ulonglong3{x, y, z}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline double3 make_double3(double x, double y, double z) { return double3{x, y, z}; }

// ---- bit casts -------------------------------------------------------------------------------------
template <typename To, typename From>
inline To kvk_emu_bit_cast(const From& v)
{
    static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
    To r;
    std::memcpy(&r, &v, sizeof r);
    return r;
}
inline int __float_as_int(float x) { return kvk_emu_bit_cast<int>(x); }
inline unsigned int __float_as_uint(float x) { return kvk_emu_bit_cast<unsigned int>(x); }
inline float __int_as_float(int x) { return kvk_emu_bit_cast<float>(x); }
inline float __uint_as_float(unsigned int x) { return kvk_emu_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return kvk_emu_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return kvk_emu_bit_cast<double>(x); }
inline int __double2hiint(double x) { return (int)(kvk_emu_bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return (int)(unsigned int)kvk_emu_bit_cast<unsigned long long>(x); }
inline double __hiloint2double(int hi, int lo)
{
    return kvk_emu_bit_cast<double>(((unsigned long long)(unsigned int)hi << 32) | (unsigned int)lo);
}

// ---- synchronisation ----------------------------------------------------------------------------
inline void __syncthreads() { (void)kvk_emu_syncthreads_op(0, 0); }
inline int __syncthreads_count(int predicate) { return kvk_emu_syncthreads_op(0, predicate != 0); }
inline int __syncthreads_and(int predicate) { return kvk_emu_syncthreads_op(1, predicate != 0); }
inline int __syncthreads_or(int predicate) { return kvk_emu_syncthreads_op(2, predicate != 0); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { (void)kvk_emu_warp_op(KVK_WOP_SYNCWARP, mask, 0, 0, 0); }
inline unsigned int __activemask() { return kvk_emu_activemask(); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// A spin-wait that sleeps lets the other fibers of the block run.
inline void __nanosleep(unsigned int) { kvk_emu_yield(); }
inline void __trap() { kvk_emu_trap("__trap() called"); }
inline void __brkpt() { kvk_emu_trap("__brkpt() called"); }
#if defined(__x86_64__) || defined(__i386__)
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
#else
inline long long clock64()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
#endif

// ---- warp shuffles ---------------------------------------------------------------------------------
// c operand as CUDA's intrinsics encode it (research/kernel_techniques.md §5.5).
inline int kvk_emu_shfl_c(int width, bool up)
{
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        kvk_emu_fail(KVK_EMU_ERR_WARP, "warp shuffle with width that is not a power of two in [1, 32] (undefined on a GPU)");
    return ((32 - width) << 8) | (up ? 0 : 0x1f);
}

template <typename T>
inline T kvk_emu_shfl(int kind, unsigned int mask, T var, int b, int c)
{
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffle of a 32- or 64-bit value");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = kvk_emu_warp_op(kind, mask, bits, b, c);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

#define KVK_EMU_SHFL(T)                                                                                  \
    inline T __shfl_sync(unsigned int mask, T var, int srcLane, int width = warpSize)                     \
    { return kvk_emu_shfl<T>(KVK_WOP_SHFL_IDX, mask, var, srcLane, kvk_emu_shfl_c(width, false)); }       \
    inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize)           \
    { return kvk_emu_shfl<T>(KVK_WOP_SHFL_UP, mask, var, (int)delta, kvk_emu_shfl_c(width, true)); }      \
    inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize)         \
    { return kvk_emu_shfl<T>(KVK_WOP_SHFL_DOWN, mask, var, (int)delta, kvk_emu_shfl_c(width, false)); }   \
    inline T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = warpSize)                \
    { return kvk_emu_shfl<T>(KVK_WOP_SHFL_BFLY, mask, var, laneMask, kvk_emu_shfl_c(width, false)); }
KVK_EMU_SHFL(int)
KVK_EMU_SHFL(unsigned int)
KVK_EMU_SHFL(long)
KVK_EMU_SHFL(unsigned long)
KVK_EMU_SHFL(long long)
KVK_EMU_SHFL(unsigned long long)
KVK_EMU_SHFL(float)
KVK_EMU_SHFL(double)
#undef KVK_EMU_SHFL

// ---- votes, match, reduce ------------------------------------------------------------------------
inline unsigned int __ballot_sync(unsigned int mask, int predicate)
{ return (unsigned int)kvk_emu_warp_op(KVK_WOP_BALLOT, mask, predicate != 0, 0, 0); }
inline int __any_sync(unsigned int mask, int predicate)
{ return (int)kvk_emu_warp_op(KVK_WOP_ANY, mask, predicate != 0, 0, 0); }
inline int __all_sync(unsigned int mask, int predicate)
{ return (int)kvk_emu_warp_op(KVK_WOP_ALL, mask, predicate != 0, 0, 0); }

template <typename T>
inline uint64_t kvk_emu_match_bits(T v)
{
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "match of a 32- or 64-bit value");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}
#define KVK_EMU_MATCH(T)                                                                                 \
    inline unsigned int __match_any_sync(unsigned int mask, T value)                                     \
    { return (unsigned int)kvk_emu_warp_op(KVK_WOP_MATCH_ANY, mask, kvk_emu_match_bits(value), 0, 0); }  \
    inline unsigned int __match_all_sync(unsigned int mask, T value, int* pred)                          \
    {                                                                                                    \
        const uint64_t r = kvk_emu_warp_op(KVK_WOP_MATCH_ALL, mask, kvk_emu_match_bits(value), 0, 0);    \
        *pred = (int)(r >> 32);                                                                          \
        return (unsigned int)r;                                                                          \
    }
KVK_EMU_MATCH(int)
KVK_EMU_MATCH(unsigned int)
KVK_EMU_MATCH(long)
KVK_EMU_MATCH(unsigned long)
KVK_EMU_MATCH(long long)
KVK_EMU_MATCH(unsigned long long)
KVK_EMU_MATCH(float)
KVK_EMU_MATCH(double)
#undef KVK_EMU_MATCH

inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int v) { return (unsigned int)kvk_emu_warp_op(KVK_WOP_REDUCE_ADD, mask, v, 0, 0); }
inline int __reduce_add_sync(unsigned int mask, int v) { return (int)kvk_emu_warp_op(KVK_WOP_REDUCE_ADD, mask, (unsigned int)v, 0, 0); }
inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int v) { return (unsigned int)kvk_emu_warp_op(KVK_WOP_REDUCE_MIN_U, mask, v, 0, 0); }
inline int __reduce_min_sync(unsigned int mask, int v) { return (int)kvk_emu_warp_op(KVK_WOP_REDUCE_MIN_S, mask, (unsigned int)v, 0, 0); }
inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int v) { return (unsigned int)kvk_emu_warp_op(KVK_WOP_REDUCE_MAX_U, mask, v, 0, 0); }
inline int __reduce_max_sync(unsigned int mask, int v) { return (int)kvk_emu_warp_op(KVK_WOP_REDUCE_MAX_S, mask, (unsigned int)v, 0, 0); }
inline unsigned int __reduce_and_sync(unsigned int mask, unsigned int v) { return (unsigned int)kvk_emu_warp_op(KVK_WOP_REDUCE_AND, mask, v, 0, 0); }
inline unsigned int __reduce_or_sync(unsigned int mask, unsigned int v) { return (unsigned int)kvk_emu_warp_op(KVK_WOP_REDUCE_OR, mask, v, 0, 0); }
inline unsigned int __reduce_xor_sync(unsigned int mask, unsigned int v) { return (unsigned int)kvk_emu_warp_op(KVK_WOP_REDUCE_XOR, mask, v, 0, 0); }

// ---- atomics (relaxed, like CUDA's; natural alignment is checked as the GPU does) ------------------
template <typename T>
inline void kvk_emu_atomic_check(const T* p, const char* what)
{
    if (((uintptr_t)p & (sizeof(T) - 1)) != 0) kvk_emu_misaligned(p, (unsigned)sizeof(T), what);
}

// Generic read-modify-write by compare-and-swap on the bits (float/double add, min/max, inc/dec).
template <typename T, typename F>
inline T kvk_emu_atomic_rmw(T* p, F f, const char* what)
{
    kvk_emu_atomic_check(p, what);
    typedef typename std::conditional<sizeof(T) == 8, unsigned long long,
            typename std::conditional<sizeof(T) == 4, unsigned int, unsigned short>::type>::type B;
    B* bp = reinterpret_cast<B*>(p);
    B oldBits = __atomic_load_n(bp, __ATOMIC_RELAXED);
    for (;;) {
        const T oldValue = kvk_emu_bit_cast<T>(oldBits);
        const B newBits = kvk_emu_bit_cast<B>(static_cast<T>(f(oldValue)));
        if (__atomic_compare_exchange_n(bp, &oldBits, newBits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return oldValue;
    }
}

#define KVK_EMU_ATOMIC_FETCH(name, T, builtin)                                                           \
    inline T name(T* p, T v) { kvk_emu_atomic_check(p, #name); return builtin(p, v, __ATOMIC_RELAXED); }
KVK_EMU_ATOMIC_FETCH(atomicAdd, int, __atomic_fetch_add)
KVK_EMU_ATOMIC_FETCH(atomicAdd, unsigned int, __atomic_fetch_add)
KVK_EMU_ATOMIC_FETCH(atomicAdd, unsigned long long, __atomic_fetch_add)
KVK_EMU_ATOMIC_FETCH(atomicSub, int, __atomic_fetch_sub)
KVK_EMU_ATOMIC_FETCH(atomicSub, unsigned int, __atomic_fetch_sub)
KVK_EMU_ATOMIC_FETCH(atomicExch, int, __atomic_exchange_n)
KVK_EMU_ATOMIC_FETCH(atomicExch, unsigned int, __atomic_exchange_n)
KVK_EMU_ATOMIC_FETCH(atomicExch, unsigned long long, __atomic_exchange_n)
KVK_EMU_ATOMIC_FETCH(atomicAnd, int, __atomic_fetch_and)
KVK_EMU_ATOMIC_FETCH(atomicAnd, unsigned int, __atomic_fetch_and)
KVK_EMU_ATOMIC_FETCH(atomicAnd, unsigned long long, __atomic_fetch_and)
KVK_EMU_ATOMIC_FETCH(atomicOr, int, __atomic_fetch_or)
KVK_EMU_ATOMIC_FETCH(atomicOr, unsigned int, __atomic_fetch_or)
KVK_EMU_ATOMIC_FETCH(atomicOr, unsigned long long, __atomic_fetch_or)
KVK_EMU_ATOMIC_FETCH(atomicXor, int, __atomic_fetch_xor)
KVK_EMU_ATOMIC_FETCH(atomicXor, unsigned int, __atomic_fetch_xor)
KVK_EMU_ATOMIC_FETCH(atomicXor, unsigned long long, __atomic_fetch_xor)
#undef KVK_EMU_ATOMIC_FETCH

inline float atomicAdd(float* p, float v) { return kvk_emu_atomic_rmw(p, [v](float o) { return o + v; }, "atomicAdd"); }
inline double atomicAdd(double* p, double v) { return kvk_emu_atomic_rmw(p, [v](double o) { return o + v; }, "atomicAdd"); }
inline float atomicExch(float* p, float v) { return kvk_emu_atomic_rmw(p, [v](float) { return v; }, "atomicExch"); }
#define KVK_EMU_ATOMIC_MINMAX(T)                                                                          \
    inline T atomicMin(T* p, T v) { return kvk_emu_atomic_rmw(p, [v](T o) { return v < o ? v : o; }, "atomicMin"); } \
    inline T atomicMax(T* p, T v) { return kvk_emu_atomic_rmw(p, [v](T o) { return o < v ? v : o; }, "atomicMax"); }
KVK_EMU_ATOMIC_MINMAX(int)
KVK_EMU_ATOMIC_MINMAX(unsigned int)
KVK_EMU_ATOMIC_MINMAX(long long)
KVK_EMU_ATOMIC_MINMAX(unsigned long long)
#undef KVK_EMU_ATOMIC_MINMAX
inline unsigned int atomicInc(unsigned int* p, unsigned int limit)
{ return kvk_emu_atomic_rmw(p, [limit](unsigned int o) { return o >= limit ? 0u : o + 1u; }, "atomicInc"); }
inline unsigned int atomicDec(unsigned int* p, unsigned int limit)
{ return kvk_emu_atomic_rmw(p, [limit](unsigned int o) { return (o == 0u || o > limit) ? limit : o - 1u; }, "atomicDec"); }
#define KVK_EMU_ATOMIC_CAS(T)                                                                             \
    inline T atomicCAS(T* p, T compare, T value)                                                          \
    {                                                                                                     \
        kvk_emu_atomic_check(p, "atomicCAS");                                                             \
        __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);      \
        return compare;                                                                                   \
    }
KVK_EMU_ATOMIC_CAS(int)
KVK_EMU_ATOMIC_CAS(unsigned int)
KVK_EMU_ATOMIC_CAS(unsigned long long)
KVK_EMU_ATOMIC_CAS(unsigned short)
#undef KVK_EMU_ATOMIC_CAS
// Scoped variants behave the same here (one address space, sequentially consistent hardware atomics).
#define KVK_EMU_ATOMIC_SCOPES(name)                                                                       \
    template <typename... A> inline auto name##_block(A... a) -> decltype(name(a...)) { return name(a...); } \
    template <typename... A> inline auto name##_system(A... a) -> decltype(name(a...)) { return name(a...); }
KVK_EMU_ATOMIC_SCOPES(atomicAdd)
KVK_EMU_ATOMIC_SCOPES(atomicSub)
KVK_EMU_ATOMIC_SCOPES(atomicExch)
KVK_EMU_ATOMIC_SCOPES(atomicMin)
KVK_EMU_ATOMIC_SCOPES(atomicMax)
KVK_EMU_ATOMIC_SCOPES(atomicInc)
KVK_EMU_ATOMIC_SCOPES(atomicDec)
KVK_EMU_ATOMIC_SCOPES(atomicCAS)
KVK_EMU_ATOMIC_SCOPES(atomicAnd)
KVK_EMU_ATOMIC_SCOPES(atomicOr)
KVK_EMU_ATOMIC_SCOPES(atomicXor)
#undef KVK_EMU_ATOMIC_SCOPES

// ---- cache-hinted loads and stores (hints only) ----------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---- integer intrinsics -------------------------------------------------------------------------
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x)
{
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x)
{
    return ((unsigned long long)__brev((unsigned int)x) << 32) | __brev((unsigned int)(x >> 32));
}
// __byte_perm: bytes {y:x} numbered 0..7 (x = 0..3); result byte n = byte (s >> 4n) & 7 (the 4th
// bit of each selector nibble is ignored by the intrinsic, CUDA math API).
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s)
{
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned int r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned int)((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
    return r;
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
__extension__ typedef unsigned __int128 kvk_emu_u128;
__extension__ typedef __int128 kvk_emu_i128;
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b)
{ return (unsigned long long)(((kvk_emu_u128)a * b) >> 64); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((kvk_emu_i128)a * b) >> 64); }
inline int __mul24(int a, int b)
{
    const long long sa = (long long)((a << 8)) >> 8, sb = (long long)((b << 8)) >> 8;
    return (int)(unsigned int)(unsigned long long)(sa * sb);
}
inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }
inline int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
inline int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }
inline unsigned int __uhadd(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a + b) >> 1); }
inline unsigned int __urhadd(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a + b + 1) >> 1); }
inline unsigned int __sad(int x, int y, unsigned int z) { return z + (unsigned int)(x > y ? (long long)x - y : (long long)y - x); }
inline unsigned int __usad(unsigned int x, unsigned int y, unsigned int z) { return z + (x > y ? x - y : y - x); }
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift)
{ return (unsigned int)(((((unsigned long long)hi << 32) | lo) << (shift & 31u)) >> 32); }
inline unsigned int __funnelshift_lc(unsigned int lo, unsigned int hi, unsigned int shift)
{ const unsigned s = shift < 32u ? shift : 32u; return (unsigned int)(((((unsigned long long)hi << 32) | lo) << s) >> 32); }
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift)
{ return (unsigned int)((((unsigned long long)hi << 32) | lo) >> (shift & 31u)); }
inline unsigned int __funnelshift_rc(unsigned int lo, unsigned int hi, unsigned int shift)
{ const unsigned s = shift < 32u ? shift : 32u; return (unsigned int)((((unsigned long long)hi << 32) | lo) >> s); }
inline int __dp4a(int a, int b, int c)
{
    int r = c;
    for (int i = 0; i < 4; ++i) r += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return r;
}
inline unsigned int __dp4a(unsigned int a, unsigned int b, unsigned int c)
{
    unsigned int r = c;
    for (int i = 0; i < 4; ++i) r += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
    return r;
}

// min / max overloads as CUDA's math API declares them (mixed signedness -> unsigned).
#define KVK_EMU_MINMAX(R, A, B)                                                                          \
    inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; }                                          \
    inline R max(A a, B b) { return (R)a < (R)b ? (R)b : (R)a; }
KVK_EMU_MINMAX(int, int, int)
KVK_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
KVK_EMU_MINMAX(unsigned int, int, unsigned int)
KVK_EMU_MINMAX(unsigned int, unsigned int, int)
KVK_EMU_MINMAX(long, long, long)
KVK_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
KVK_EMU_MINMAX(unsigned long, long, unsigned long)
KVK_EMU_MINMAX(unsigned long, unsigned long, long)
KVK_EMU_MINMAX(long long, long long, long long)
KVK_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
KVK_EMU_MINMAX(unsigned long long, long long, unsigned long long)
KVK_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef KVK_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline unsigned int umin(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int umax(unsigned int a, unsigned int b) { return a < b ? b : a; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a < b ? b : a; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a < b ? b : a; }

// ---- float intrinsics -----------------------------------------------------------------------------
// ex2.approx.f32 (PTX: <= 2 ulp): exp2 in double rounded to float, special values as the ISA lists.
inline float kvk_emu_ex2_approx(float a) { return (float)std::exp2((double)a); }
inline float kvk_emu_lg2_approx(float a) { return (float)std::log2((double)a); }
inline float __expf(float x) { return kvk_emu_ex2_approx(x * 1.44269504088896341f); }
inline float __exp10f(float x) { return kvk_emu_ex2_approx(x * 3.32192809488736235f); }
inline float __logf(float x) { return kvk_emu_lg2_approx(x) * 0.693147180559945309f; }
inline float __log2f(float x) { return kvk_emu_lg2_approx(x); }
inline float __log10f(float x) { return kvk_emu_lg2_approx(x) * 0.301029995663981195f; }
inline float __powf(float x, float y) { return kvk_emu_ex2_approx(y * kvk_emu_lg2_approx(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
// __fdividef: for 2^126 < |y| < 2^128 it returns 0 (x finite) or NaN (x infinite), CUDA math API.
inline float __fdividef(float x, float y)
{
    const float ay = fabsf(y);
    if (ay > 8.50705917e+37f && ay < INFINITY) return std::isinf(x) ? NAN : 0.0f * x;
    return x / y;
}
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline float __frsqrt_rn(float x) { return (float)(1.0 / sqrt((double)x)); }
inline float rsqrtf(float x) { return (float)(1.0 / sqrt((double)x)); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return (float)(1.0 / cbrt((double)x)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }   // NaN -> 0
inline float saturatef(float x) { return __saturatef(x); }
inline float sinpif(float x) { return (float)sin(M_PI * (double)x); }
inline float cospif(float x) { return (float)cos(M_PI * (double)x); }
inline void sincospif(float x, float* s, float* c) { *s = sinpif(x); *c = cospif(x); }
inline double sinpi(double x) { return sin(M_PI * x); }
inline double cospi(double x) { return cos(M_PI * x); }
inline int __finitef(float x) { return std::isfinite(x); }
inline int __isinff(float x) { return std::isinf(x); }
inline int __isnanf(float x) { return std::isnan(x); }

// Conversions: cvt.{rni,rzi,rmi,rpi} with saturation, NaN -> 0 (PTX cvt, float -> integer).
template <typename I>
inline I kvk_emu_saturate_int(double r)
{
    if (r != r) return 0;
    if (r <= (double)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
    if (r >= (double)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
    return (I)r;
}
#define KVK_EMU_CVT(name, F, I)                                                                            \
    inline I name##_rn(F x) { return kvk_emu_saturate_int<I>(nearbyint((double)x)); }                      \
    inline I name##_rz(F x) { return kvk_emu_saturate_int<I>(trunc((double)x)); }                          \
    inline I name##_rd(F x) { return kvk_emu_saturate_int<I>(floor((double)x)); }                          \
    inline I name##_ru(F x) { return kvk_emu_saturate_int<I>(ceil((double)x)); }
KVK_EMU_CVT(__float2int, float, int)
KVK_EMU_CVT(__float2uint, float, unsigned int)
KVK_EMU_CVT(__float2ll, float, long long)
KVK_EMU_CVT(__float2ull, float, unsigned long long)
KVK_EMU_CVT(__double2int, double, int)
KVK_EMU_CVT(__double2uint, double, unsigned int)
KVK_EMU_CVT(__double2ll, double, long long)
KVK_EMU_CVT(__double2ull, double, unsigned long long)
#undef KVK_EMU_CVT
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned int x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __ull2float_rn(unsigned long long x) { return (float)x; }
inline double __int2double_rn(int x) { return (double)x; }
inline double __uint2double_rn(unsigned int x) { return (double)x; }
inline float __double2float_rn(double x) { return (float)x; }

// ---- assert: reports "Assertion `expr` failed" with the thread's indices and stops the launch -------
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : kvk_emu_assert_fail(#e, __FILE__, __LINE__, __func__))
#endif

// ---- exporting kernels -----------------------------------------------------------------------------
// KVK_EMU_EXPORT(name) defines
//   extern "C" void kvk_emu_entry_<name>(void** args)   args[i] points at the i-th argument's value
//   extern "C" int  kvk_emu_params_<name>(unsigned* sizes, int capacity)
//                   returns the parameter count and writes sizeof of each parameter (a check for
//                   the host's argument packing).
// KVK_EMU_EXPORT_AS(exportName, function) does the same for a function that is not a plain
// identifier (a template specialisation, a C++-linkage kernel in a namespace).
template <typename F>
struct kvk_emu_kernel_traits;

template <typename... A>
struct kvk_emu_kernel_traits<void (*)(A...)> {
    static constexpr int arity = (int)sizeof...(A);
    template <std::size_t... I>
    static void invoke(void (*fn)(A...), void** args, std::index_sequence<I...>)
    {
        (void)args;
        fn(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
    }
    static void call(void (*fn)(A...), void** args) { invoke(fn, args, std::index_sequence_for<A...>()); }
    static int params(unsigned* sizes, int capacity)
    {
        const unsigned s[] = {(unsigned)sizeof(A)..., 0u};
        for (int i = 0; i < arity && i < capacity; ++i) sizes[i] = s[i];
        return arity;
    }
};

template <typename... A>
struct kvk_emu_kernel_traits<void (*)(A...) noexcept> : kvk_emu_kernel_traits<void (*)(A...)> {
    static void call(void (*fn)(A...) noexcept, void** args)
    {
        kvk_emu_kernel_traits<void (*)(A...)>::invoke(reinterpret_cast<void (*)(A...)>(fn), args,
                                                       std::index_sequence_for<A...>());
    }
};

#define KVK_EMU_EXPORT_AS(exportName, ...)                                                               \
    extern "C" __attribute__((visibility("default"), used)) void kvk_emu_entry_##exportName(void** args) \
    {                                                                                                    \
        kvk_emu_kernel_traits<decltype(&__VA_ARGS__)>::call(&__VA_ARGS__, args);                         \
    }                                                                                                    \
    extern "C" __attribute__((visibility("default"), used)) int kvk_emu_params_##exportName(unsigned* sizes, int capacity) \
    {                                                                                                    \
        return kvk_emu_kernel_traits<decltype(&__VA_ARGS__)>::params(sizes, capacity);                   \
    }
#define KVK_EMU_EXPORT(name) KVK_EMU_EXPORT_AS(name, name)
