// kvk_async.cuh — asynchronous global -> shared copies (cp.async, sm_80+) and their completion.
//
//   kvk_cp_async_ca<B>(dst, src)            cp.async.ca.shared.global [dst], [src], B          B = 4, 8, 16
//   kvk_cp_async_ca<B>(dst, src, srcBytes)  ... , B, srcBytes: copies srcBytes (0..B) bytes and
//                                           ZERO-FILLS the remaining B - srcBytes bytes of dst
//   kvk_cp_async_cg16(dst, src[, srcBytes]) cp.async.cg (L2 only, bypasses L1), 16 bytes
//   kvk_cp_async_commit()                   cp.async.commit_group: closes the group of this thread's
//                                           cp.asyncs issued since the previous commit
//   kvk_cp_async_wait_group<N>()            cp.async.wait_group N: waits until at most N of this
//                                           thread's most recent committed groups are pending
//   kvk_cp_async_wait_all()                 cp.async.wait_all: every cp.async of this thread done
//
// Rules (PTX ISA, cp.async): dst is a generic pointer into shared memory (converted with
// __cvta_generic_to_shared), src a pointer into global memory (generic and global addresses of global
// memory coincide on all supported targets); both aligned to the copy size. Nothing orders a
// cp.async against this thread's other accesses until a wait: the destination may be read only
// after the wait that covers its group, and by OTHER threads only after a barrier that follows that
// wait. With srcBytes = 0 nothing is read from src (the destination is all zeros).
//
// Host twin: the copy (and zero fill) happens immediately, at issue; commit and wait are no-ops.
// That is a valid emulation because every program that is correct under the PTX rules only reads
// the destination after a wait covering the copy, and then it sees exactly what the GPU guarantees —
// the complete copy; the emulator is one of the GPU's allowed schedules (all copies finishing before
// the next instruction). What it cannot do is catch the bug of reading before the wait (or writing
// the destination while a copy is in flight): the emulator then shows the copied data where a GPU
// may show stale bytes. Group counting therefore cannot be checked here either; review it.
#pragma once
#include "common/kvk_types.cuh"

#ifndef __CUDA_ARCH__
template <int Bytes>
KVK_INLINE void kvk_cp_async_twin(void* dst, const void* src, kvk_u32 srcBytes)
{
    if (kvk_address(dst) % Bytes != 0 || kvk_address(src) % Bytes != 0) {
#ifdef KVK_EMULATION
        kvk_emu_misaligned(kvk_address(dst) % Bytes != 0 ? dst : src, (unsigned)Bytes, "cp.async");
#else
        __builtin_trap();
#endif
    }
    if (srcBytes > (kvk_u32)Bytes) {
#ifdef KVK_EMULATION
        kvk_emu_trap("cp.async with src-size larger than cp-size (undefined on a GPU)");
#else
        __builtin_trap();
#endif
    }
    unsigned char buffer[Bytes];
    __builtin_memset(buffer, 0, Bytes);
    if (srcBytes != 0) __builtin_memcpy(buffer, src, srcBytes);
    __builtin_memcpy(dst, buffer, Bytes);
}
#endif

// Copies Bytes (4, 8 or 16) from global src to shared dst, through L1 (.ca).
template <int Bytes>
KVK_INLINE void kvk_cp_async_ca(void* dst, const void* src)
{
    static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#ifdef __CUDA_ARCH__
    const kvk_u32 s = (kvk_u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" : : "r"(s), "l"(src), "n"(Bytes) : "memory");
#else
    kvk_cp_async_twin<Bytes>(dst, src, (kvk_u32)Bytes);
#endif
}

// Copies srcBytes (0 .. Bytes) from src and zero-fills the rest of the Bytes at dst.
template <int Bytes>
KVK_INLINE void kvk_cp_async_ca(void* dst, const void* src, kvk_u32 srcBytes)
{
    static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#ifdef __CUDA_ARCH__
    const kvk_u32 s = (kvk_u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" : : "r"(s), "l"(src), "n"(Bytes), "r"(srcBytes) : "memory");
#else
    kvk_cp_async_twin<Bytes>(dst, src, srcBytes);
#endif
}

// 16 bytes, cached in L2 only (.cg): the streaming form for data used once per block.
KVK_INLINE void kvk_cp_async_cg16(void* dst, const void* src)
{
#ifdef __CUDA_ARCH__
    const kvk_u32 s = (kvk_u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" : : "r"(s), "l"(src) : "memory");
#else
    kvk_cp_async_twin<16>(dst, src, 16u);
#endif
}

KVK_INLINE void kvk_cp_async_cg16(void* dst, const void* src, kvk_u32 srcBytes)
{
#ifdef __CUDA_ARCH__
    const kvk_u32 s = (kvk_u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" : : "r"(s), "l"(src), "r"(srcBytes) : "memory");
#else
    kvk_cp_async_twin<16>(dst, src, srcBytes);
#endif
}

KVK_INLINE void kvk_cp_async_commit()
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;" : : : "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still pending.
template <int N>
KVK_INLINE void kvk_cp_async_wait_group()
{
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative constant");
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;" : : "n"(N) : "memory");
#endif
}

KVK_INLINE void kvk_cp_async_wait_all()
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;" : : : "memory");
#endif
}
