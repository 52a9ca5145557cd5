// kvk_emu_abi.h — the C ABI of the CUDA emulator (libkvk_emu.so) and the declarations its host shim
// (kvk_emulation.h) and its runtime (kvk_emu_runtime.cpp) share.
//
// Two audiences:
//  * the host program (C# P/Invoke, tests): kvk_emu_alloc / kvk_emu_free / kvk_emu_launch /
//    kvk_emu_last_error / kvk_emu_check_memory / kvk_emu_version and the error codes below;
//  * kernel code compiled against kvk_emulation.h: the per-OS-thread state behind threadIdx & co.
//    and the runtime hooks behind __syncthreads, the warp collectives and the fault reports.
// Everything here is plain C++17 for g++ (x86-64 Linux is the tested target; other glibc targets
// fall back to ucontext fibers).
#pragma once
#include <stddef.h>
#include <stdint.h>

#define KVK_EMU_ABI_VERSION 1

// ---- return codes of kvk_emu_launch / kvk_emu_last_error / kvk_emu_check_memory ------------------
enum kvk_emu_code {
    KVK_EMU_OK = 0,
    KVK_EMU_ERR_CONFIG = 1,       // invalid launch configuration (grid/block dims, null entry)
    KVK_EMU_ERR_SHARED = 2,       // shared memory over the limit
    KVK_EMU_ERR_MEMORY = 3,       // invalid address: guard page (out of bounds), freed, null, wild
    KVK_EMU_ERR_CORRUPTION = 4,   // canary damaged: an out-of-bounds write that missed the guard page
    KVK_EMU_ERR_DEADLOCK = 5,     // barrier / warp-collective deadlock (divergent __syncthreads ...)
    KVK_EMU_ERR_WARP = 6,         // misuse of a warp collective (lane not in mask, read of an exited lane, width)
    KVK_EMU_ERR_STACK = 7,        // a thread overflowed its fiber stack
    KVK_EMU_ERR_TRAP = 8,         // __trap(), assert(), trap instruction, integer division by zero
    KVK_EMU_ERR_INTERNAL = 9,     // the emulator itself failed (out of memory for fiber stacks, ...)
    KVK_EMU_ERR_FREE = 10,        // kvk_emu_free of a pointer that is not a live allocation
    KVK_EMU_ERR_TIMEOUT = 11      // the launch ran past KVK_EMU_TIMEOUT_S (infinite loop, spin-wait)
};

#ifdef __cplusplus
// CUDA's built-in index types (layout as in CUDA's vector_types.h).
struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// Per-OS-thread state, rewritten by the scheduler before it switches to a fiber. Only the OS thread
// that runs a block ever reads it, and a block never moves between OS threads.
struct kvk_emu_state_t {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    unsigned char* dynamic_shared;   // this block's dynamic shared memory (ends at a guard page)
    void* worker;                    // runtime-private
};

extern "C" {
#endif

// ---- host ABI -----------------------------------------------------------------------------------
// Device memory: usable bytes END exactly at a PROT_NONE guard page and start 16-byte aligned; the
// bytes between the requested size and the 16-aligned size, and the slack before the start, are a
// 0xCD canary. A guard page also precedes the mapping. bytes == 0 is legal (any access faults).
// Freed memory stays mapped PROT_NONE for a while (quarantine), so a use after free faults.
void* kvk_emu_alloc(size_t bytes);
// Checks the canaries; damage, or a pointer that is not a live allocation, is recorded for
// kvk_emu_last_error (nothing is thrown or printed). kvk_emu_free(NULL) does nothing.
void kvk_emu_free(void* p);

typedef void (*kvk_emu_entry)(void** args);
// Runs the grid; returns 0 or a kvk_emu_code with a one-paragraph message in `error`.
// maxSharedBytes == 0 means 48 KiB. hostThreads == 0 means the hardware concurrency (at most 64).
int kvk_emu_launch(kvk_emu_entry entry, void** args, const char* kernelName,
                   unsigned gridX, unsigned gridY, unsigned gridZ,
                   unsigned blockX, unsigned blockY, unsigned blockZ,
                   unsigned dynamicSharedBytes, unsigned maxSharedBytes, int hostThreads,
                   char* error, int errorCapacity);
int kvk_emu_version(void);
// The first error recorded outside a launch (kvk_emu_free) since the last call; 0 if none. Clears it.
int kvk_emu_last_error(char* error, int errorCapacity);
// Checks the canaries of every live allocation now (e.g. after host-side copies); repairs them.
int kvk_emu_check_memory(char* error, int errorCapacity);

// ---- hooks used by the shim (kernel side) --------------------------------------------------------
enum kvk_emu_warp_kind {
    KVK_WOP_SHFL_IDX = 0, KVK_WOP_SHFL_UP, KVK_WOP_SHFL_DOWN, KVK_WOP_SHFL_BFLY,
    KVK_WOP_BALLOT, KVK_WOP_ANY, KVK_WOP_ALL, KVK_WOP_SYNCWARP,
    KVK_WOP_MATCH_ANY, KVK_WOP_MATCH_ALL,
    KVK_WOP_REDUCE_ADD, KVK_WOP_REDUCE_MIN_U, KVK_WOP_REDUCE_MAX_U, KVK_WOP_REDUCE_MIN_S,
    KVK_WOP_REDUCE_MAX_S, KVK_WOP_REDUCE_AND, KVK_WOP_REDUCE_OR, KVK_WOP_REDUCE_XOR,
    KVK_WOP_COUNT_
};
// __syncthreads family: op 0 = count (also plain __syncthreads), 1 = and, 2 = or.
int kvk_emu_syncthreads_op(int op, int pred);
// One warp collective: every non-exited lane of `mask` must arrive at the same kind with the same
// mask. Shuffles: b and c are the PTX shfl.sync operands; value is the lane's 32/64-bit source.
// MATCH_ALL returns the mask in bits 0..31 and the predicate in bit 32.
uint64_t kvk_emu_warp_op(int kind, unsigned mask, uint64_t value, int b, int c);
unsigned kvk_emu_activemask(void);
void kvk_emu_yield(void);
void kvk_emu_trap(const char* what) __attribute__((noreturn));
void kvk_emu_assert_fail(const char* expr, const char* file, int line, const char* func) __attribute__((noreturn));
void kvk_emu_fail(int code, const char* message) __attribute__((noreturn));
void kvk_emu_misaligned(const void* p, unsigned alignment, const char* what) __attribute__((noreturn));

#ifdef __cplusplus
}  // extern "C"
// initial-exec: one %fs-relative load per access instead of a __tls_get_addr call. The 64 bytes come
// from glibc's static-TLS surplus when libkvk_emu.so is dlopen'ed (512 bytes are reserved for that by
// default). Define KVK_EMU_GENERAL_DYNAMIC_TLS (for the runtime and the kernels) to opt out.
#ifdef KVK_EMU_GENERAL_DYNAMIC_TLS
#define KVK_EMU_TLS_MODEL
#else
#define KVK_EMU_TLS_MODEL __attribute__((tls_model("initial-exec")))
#endif
extern "C" __thread kvk_emu_state_t kvk_emu_state KVK_EMU_TLS_MODEL;
#endif
