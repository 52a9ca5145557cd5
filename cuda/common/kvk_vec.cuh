// kvk_vec.cuh — 16-byte and 8-byte vector types and the global-memory load/store helpers that move
// them, plus a read-only scalar load for index tables.
//
// Why 16 bytes: one warp instruction then moves 512 B (four full 128-B lines), so the issue cost per
// byte is 4x lower than with 4-byte accesses and fewer loads must be in flight to cover DRAM latency
// (research/kernel_techniques.md §1.2-1.3). 8-byte vectors are the fallback for rows whose size is
// not a multiple of 16 bytes.
//
// Cache variants (PTX ISA, "ld" / "st" cache operators):
//   kvk_ld          plain load, compiler-generated (it may pick ld.global.nc for const __restrict__ data).
//   kvk_ld_nc       ld.global.nc.L1::no_allocate: read-only data path, no L1 allocation. Only for
//                   data that no thread writes while the kernel runs (the usual streaming source).
//   kvk_ld_cs       ld.global.cs: "cache streaming", evict-first in L1 and L2 (data read once).
//   kvk_st          plain st.global (write-back).
//   kvk_st_cs       st.global.cs: streaming store, evict-first.
//   kvk_ldg_i32     ld.global.nc.s32: read-only scalar through the texture path (tables, indices).
// The cache operators are hints and do not change results, so every host twin is a plain access. The
// twins do check natural alignment and trap, as the GPU raises a misaligned-address error.
//
// Addresses passed to the ld.global/st.global forms must point to global memory (cudaMalloc'd);
// generic and global addresses of global memory coincide on every supported architecture.
// The PTX forms are `asm volatile` so that they are never speculated, merged or reordered against
// each other by the compiler; the hardware still overlaps independent loads, which is what matters.
// The .cs forms also clobber "memory" (ordered against ordinary accesses); the .nc forms do not,
// since by their contract nothing the kernel writes can alias what they read.
#pragma once
#include "common/kvk_types.cuh"

struct alignas(16) kvk_v16 { kvk_u32 x, y, z, w; };
struct alignas(8) kvk_v8 { kvk_u32 x, y; };

static_assert(sizeof(kvk_v16) == 16 && alignof(kvk_v16) == 16, "kvk_v16 is 16 bytes, 16-aligned");
static_assert(sizeof(kvk_v8) == 8 && alignof(kvk_v8) == 8, "kvk_v8 is 8 bytes, 8-aligned");

// kvk_vec<16>::type is kvk_v16, kvk_vec<8>::type is kvk_v8 (kernels specialise on a VEC_BYTES macro).
template <int Bytes> struct kvk_vec;
template <> struct kvk_vec<16> { typedef kvk_v16 type; };
template <> struct kvk_vec<8> { typedef kvk_v8 type; };
// (A value-initialised vector, `kvk_v16{}`, is all zero bits.)

#ifndef __CUDA_ARCH__
// Host twins: natural alignment is required by the hardware; a violation traps like the GPU would.
template <typename T>
KVK_INLINE void kvk_host_check_aligned(const void* p)
{
#ifdef KVK_EMULATION
    // The emulator names the address and the alignment it needed instead of a bare trap.
    if (kvk_address(p) % sizeof(T) != 0) kvk_emu_misaligned(p, (unsigned)sizeof(T), "vector access");
#else
    if (kvk_address(p) % sizeof(T) != 0) __builtin_trap();
#endif
}

template <typename T>
KVK_INLINE T kvk_host_load(const T* p)
{
    kvk_host_check_aligned<T>(p);
    T v;
    __builtin_memcpy(&v, p, sizeof(T));   // no aliasing assumptions about the underlying bytes
    return v;
}

template <typename T>
KVK_INLINE void kvk_host_store(T* p, const T& v)
{
    kvk_host_check_aligned<T>(p);
    __builtin_memcpy(p, &v, sizeof(T));
}
#endif

// ---- plain ---------------------------------------------------------------------------------------

KVK_INLINE kvk_v16 kvk_ld(const kvk_v16* p)
{
#ifdef __CUDA_ARCH__
    return *p;
#else
    return kvk_host_load(p);
#endif
}

KVK_INLINE kvk_v8 kvk_ld(const kvk_v8* p)
{
#ifdef __CUDA_ARCH__
    return *p;
#else
    return kvk_host_load(p);
#endif
}

KVK_INLINE void kvk_st(kvk_v16* p, const kvk_v16& v)
{
#ifdef __CUDA_ARCH__
    *p = v;
#else
    kvk_host_store(p, v);
#endif
}

KVK_INLINE void kvk_st(kvk_v8* p, const kvk_v8& v)
{
#ifdef __CUDA_ARCH__
    *p = v;
#else
    kvk_host_store(p, v);
#endif
}

// ---- read-only, no L1 allocation -----------------------------------------------------------------

KVK_INLINE kvk_v16 kvk_ld_nc(const kvk_v16* p)
{
#ifdef __CUDA_ARCH__
    kvk_v16 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
#else
    return kvk_host_load(p);
#endif
}

KVK_INLINE kvk_v8 kvk_ld_nc(const kvk_v8* p)
{
#ifdef __CUDA_ARCH__
    kvk_v8 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p));
    return v;
#else
    return kvk_host_load(p);
#endif
}

// ---- streaming (evict-first) ---------------------------------------------------------------------

KVK_INLINE kvk_v16 kvk_ld_cs(const kvk_v16* p)
{
#ifdef __CUDA_ARCH__
    kvk_v16 v;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
#else
    return kvk_host_load(p);
#endif
}

KVK_INLINE kvk_v8 kvk_ld_cs(const kvk_v8* p)
{
#ifdef __CUDA_ARCH__
    kvk_v8 v;
    asm volatile("ld.global.cs.v2.u32 {%0, %1}, [%2];"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p)
                 : "memory");
    return v;
#else
    return kvk_host_load(p);
#endif
}

KVK_INLINE void kvk_st_cs(kvk_v16* p, const kvk_v16& v)
{
#ifdef __CUDA_ARCH__
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
#else
    kvk_host_store(p, v);
#endif
}

KVK_INLINE void kvk_st_cs(kvk_v8* p, const kvk_v8& v)
{
#ifdef __CUDA_ARCH__
    asm volatile("st.global.cs.v2.u32 [%0], {%1, %2};"
                 :
                 : "l"(p), "r"(v.x), "r"(v.y)
                 : "memory");
#else
    kvk_host_store(p, v);
#endif
}

// ---- read-only scalar (block tables, slot maps, page pairs) --------------------------------------

KVK_INLINE kvk_i32 kvk_ldg_i32(const kvk_i32* p)
{
#ifdef __CUDA_ARCH__
    kvk_i32 v;
    asm volatile("ld.global.nc.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
#else
    return kvk_host_load(p);
#endif
}
