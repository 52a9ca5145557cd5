// emu_test_kernels.cu — kernels that exercise the CPU emulator (cuda/emulation/). Plain CUDA C that
// NVRTC also accepts, so the same file can be run on a GPU to compare (shuffle semantics especially).
//
//   t_*   kernels whose results the test driver checks exactly
//   f_*   planted faults: each must come back from kvk_emu_launch as an error, not a crash or a pass
#include "common/kvk_types.cuh"
#include "common/kvk_vec.cuh"

// Device-side definition until cuda/common provides it (the emulator's shim defines the host side).
#ifndef KVK_DYNAMIC_SHARED
#define KVK_DYNAMIC_SHARED(type, name)                                      \
    extern __shared__ __align__(16) unsigned char kvk_dynamic_smem_[];      \
    type* const name = reinterpret_cast<type*>(kvk_dynamic_smem_)
#endif

#define FULL_MASK 0xffffffffu

// ---- correctness --------------------------------------------------------------------------------

// Grid-stride loop: out[i] = 2 * in[i] + 1.
extern "C" __global__ __launch_bounds__(1024) void t_copy(const float* __restrict__ in, float* __restrict__ out, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = 2.0f * in[i] + 1.0f;
}

// Block reduction through static shared memory and __syncthreads (blockDim.x a power of two <= 256):
// out[blockIdx.x] = sum of the elements this block visits in a grid-stride loop.
extern "C" __global__ __launch_bounds__(256) void t_block_reduce(const float* __restrict__ in, float* __restrict__ out, int n)
{
    __shared__ float s[256];
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += in[i];
    s[threadIdx.x] = v;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// Static shared memory is undefined at block start: the emulator fills it with 0xFF every block.
// out[block] = the word thread 0 sees before anyone writes; then the block writes its index there.
extern "C" __global__ void t_shared_fill(unsigned* out)
{
    __shared__ unsigned s[4];
    if (threadIdx.x == 0) {
        out[blockIdx.x] = s[0];
        s[0] = blockIdx.x;
    }
}

// Same for dynamic shared memory.
extern "C" __global__ void t_dynamic_fill(unsigned* out)
{
    KVK_DYNAMIC_SHARED(unsigned, s);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = s[0];
        s[0] = blockIdx.x;
    }
}

// Dynamic shared memory: reverse each block's slice (threads past n contribute -1).
extern "C" __global__ void t_dynamic_shared(const int* __restrict__ in, int* __restrict__ out, int n)
{
    KVK_DYNAMIC_SHARED(int, s);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = i < n ? in[i] : -1;
    __syncthreads();
    if (i < n) out[i] = s[blockDim.x - 1 - threadIdx.x];
}

// One shuffle per thread: mode 0 idx, 1 up, 2 down, 3 xor; out[rank] = shuffled in[rank].
extern "C" __global__ void t_shuffle(const int* __restrict__ in, int* __restrict__ out, int mode, int b, int width)
{
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = in[r];
    int x;
    switch (mode) {
    case 0: x = __shfl_sync(FULL_MASK, v, b, width); break;
    case 1: x = __shfl_up_sync(FULL_MASK, v, (unsigned)b, width); break;
    case 2: x = __shfl_down_sync(FULL_MASK, v, (unsigned)b, width); break;
    default: x = __shfl_xor_sync(FULL_MASK, v, b, width); break;
    }
    out[r] = x;
}

// Every shuffled type moves its full bits: out[4 * rank + k] for float, long long, double, unsigned
// (each from lane (lane + 5) % 32 with __shfl_sync).
extern "C" __global__ void t_shuffle_types(const long long* __restrict__ in, long long* __restrict__ out)
{
    const int r = threadIdx.x;
    const int src = (int)((threadIdx.x + 5) & 31);
    const long long v = in[r];
    const float f = (float)v * 0.5f;
    const double d = (double)v * 0.25;
    const unsigned u = (unsigned)v ^ 0x80000000u;
    out[4 * r + 0] = (long long)(__shfl_sync(FULL_MASK, f, src) * 2.0f);
    out[4 * r + 1] = __shfl_sync(FULL_MASK, v * 1000003LL, src);
    out[4 * r + 2] = (long long)(__shfl_sync(FULL_MASK, d, src) * 4.0);
    out[4 * r + 3] = (long long)__shfl_sync(FULL_MASK, u, src);
}

// Votes: out[3 * rank + {0,1,2}] = ballot, any, all over the full warp; then even and odd lanes vote
// separately in divergent branches with their own masks: out2[rank] = that ballot.
extern "C" __global__ void t_vote(const int* __restrict__ pred, unsigned* __restrict__ out, unsigned* __restrict__ out2)
{
    const int r = threadIdx.x;
    const int p = pred[r];
    out[3 * r + 0] = __ballot_sync(FULL_MASK, p);
    out[3 * r + 1] = (unsigned)__any_sync(FULL_MASK, p);
    out[3 * r + 2] = (unsigned)__all_sync(FULL_MASK, p);
    if (r & 1) out2[r] = __ballot_sync(0xAAAAAAAAu, p);
    else out2[r] = __ballot_sync(0x55555555u, p);
}

// Barrier reductions: out[block * 3 + k] = __syncthreads_count / _and / _or of pred.
extern "C" __global__ void t_sync_count(const int* __restrict__ pred, int* __restrict__ out)
{
    const int p = pred[blockIdx.x * blockDim.x + threadIdx.x];
    const int c = __syncthreads_count(p);
    const int a = __syncthreads_and(p);
    const int o = __syncthreads_or(p);
    if (threadIdx.x == 0) {
        out[blockIdx.x * 3 + 0] = c;
        out[blockIdx.x * 3 + 1] = a;
        out[blockIdx.x * 3 + 2] = o;
    }
}

// Atomics from every thread of every block.
extern "C" __global__ void t_atomics(unsigned long long* counter, unsigned* hist, float* fsum, int* imax, int* imin,
                                     unsigned* bits, double* dsum, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        atomicAdd(counter, 1ull);
        atomicAdd(&hist[i % 16], 1u);
        atomicAdd(fsum, 1.0f);
        atomicMax(imax, i);
        atomicMin(imin, -i);
        atomicOr(bits, 1u << (i % 32));
        atomicAdd(dsum, 0.5);
    }
}

// Warp sum by butterfly shuffles; out[global warp] = sum over the warp's 32 values.
extern "C" __global__ void t_warp_reduce(const float* __restrict__ in, float* __restrict__ out)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = in[i];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    if ((threadIdx.x & 31) == 0) out[i / 32] = v;
}

// sm_80 warp reductions and match: out[4 * rank + k] = reduce_add, reduce_max(signed), match_any, activemask.
extern "C" __global__ void t_warp_misc(const int* __restrict__ in, unsigned* __restrict__ out)
{
    const int r = threadIdx.x;
    const int v = in[r];
    out[4 * r + 0] = (unsigned)__reduce_add_sync(FULL_MASK, v);
    out[4 * r + 1] = (unsigned)__reduce_max_sync(FULL_MASK, v);
    out[4 * r + 2] = __match_any_sync(FULL_MASK, v & 3);
    __syncwarp();
    out[4 * r + 3] = __activemask();
}

// 3-D blocks and grids: out[linear thread of the grid] encodes threadIdx and blockIdx.
extern "C" __global__ void t_dims(unsigned* out)
{
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned rank = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned g = block * (blockDim.x * blockDim.y * blockDim.z) + rank;
    out[g] = (threadIdx.x) | (threadIdx.y << 4) | (threadIdx.z << 8) | (blockIdx.x << 12) | (blockIdx.y << 16) |
             (blockIdx.z << 20);
}

// Lane 31 exits early; the others shuffle only among themselves (legal: exited lanes of the mask are
// not waited for, and nobody reads lane 31).
extern "C" __global__ void t_shfl_exited_unread(int* out)
{
    if ((threadIdx.x & 31) == 31) return;
    const int v = (int)threadIdx.x;
    out[threadIdx.x] = __shfl_sync(FULL_MASK, v, 0);
}

// Intrinsics whose host versions must follow the CUDA math API.
extern "C" __global__ void t_intrinsics(unsigned* out)
{
    if (threadIdx.x != 0) return;
    out[0] = __byte_perm(0x33221100u, 0x77665544u, 0x5140u);      // bytes 0,4,1,5 -> 0x55114400? see driver
    out[1] = (unsigned)__popc(0xF0F0F0F1u);
    out[2] = (unsigned)__clz(0x00010000);
    out[3] = (unsigned)__ffs(0x00010000);
    out[4] = __brev(0x00000001u);
    out[5] = __umulhi(0xFFFFFFFFu, 0xFFFFFFFFu);
    out[6] = (unsigned)__mul24(-3, 0x00800001);                     // low 24 bits sign-extended: 0x800001 -> -8388607
    out[7] = (unsigned)__float2int_rn(2.5f);
    out[8] = (unsigned)__float2int_rn(-3.5f);
    out[9] = (unsigned)__float2int_rz(1.0e20f);
    out[10] = __float_as_uint(__saturatef(-1.0f)) | (__float_as_uint(__saturatef(2.0f)) == 0x3f800000u ? 1u : 0u);
    out[11] = __funnelshift_l(0x80000000u, 0x00000001u, 1);
    out[12] = (unsigned)__dp4a(0x01020304, 0x01010101, 10);
    out[13] = (unsigned)max(3, 7) + (unsigned)min(-1, 2);
    out[14] = __float_as_uint(__fdividef(1.0f, 1.0e38f));
    out[15] = __float_as_uint(__expf(0.0f));
}

// A C++-linkage template kernel (exported with KVK_EMU_EXPORT_AS in the emulator build).
template <int N>
__global__ void t_template(int* out)
{
    out[threadIdx.x] = N * (int)threadIdx.x;
}

// Thread 1 sets a flag that thread 0 waits for. With __nanosleep in the loop the emulator runs the
// other fibers; without it (f_spin) the wait never ends in the emulator (fibers are not preempted).
extern "C" __global__ void t_spin_nanosleep(int* flag, int* out)
{
    volatile int* f = flag;
    if (threadIdx.x == 0) {
        while (*f == 0) __nanosleep(100);
        out[0] = *f;
    } else if (threadIdx.x == 1) {
        *f = 7;
    }
}

// ---- planted faults ---------------------------------------------------------------------------------

// One element past the end (an allocation of a whole number of pages ends at its guard page).
extern "C" __global__ void f_oob_write(float* p, int n)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) p[n] = 1.0f;
}

// One byte past an allocation whose size is not a multiple of 16: lands in the canary padding.
extern "C" __global__ void f_oob_byte(unsigned char* p, int n)
{
    if (blockIdx.x == 1 && threadIdx.x == 3) p[n] = 7;
}

// Reads one element past the end.
extern "C" __global__ void f_oob_read(const float* p, float* out, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[0] = p[i];   // i == n is one past the end
}

// Only the first warp reaches the barrier: the others skip it in a divergent branch and exit.
extern "C" __global__ void f_missing_sync(float* out)
{
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}

// Lane 31 exits; lane 30 reads it through the butterfly.
extern "C" __global__ void f_shfl_exited(int* out)
{
    if (threadIdx.x == 31) return;
    int v = (int)threadIdx.x;
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    out[threadIdx.x] = v;
}

// Deep recursion overflows the fiber stack.
__device__ __noinline__ int f_recurse_step(int depth, volatile int* sink)
{
    volatile char frame[512];
    frame[0] = (char)depth;
    frame[511] = (char)(depth >> 8);
    if (depth == 0) return frame[0];
    const int r = f_recurse_step(depth - 1, sink) + frame[511];
    *sink = r;
    return r + frame[0];
}

extern "C" __global__ void f_stack_overflow(int* out, int depth)
{
    if (threadIdx.x == 5) out[0] = f_recurse_step(depth, out + 1);
}

// A local array larger than the fiber stack (64 KiB by default).
extern "C" __global__ void f_big_frame(int* out, int i)
{
    volatile int big[40000];
    big[i] = (int)threadIdx.x;
    big[0] = 1;
    out[threadIdx.x] = big[i] + big[0];
}

// Dynamic shared memory index n = one element past dynamicSharedBytes / 4.
extern "C" __global__ void f_dynamic_oob(int n)
{
    KVK_DYNAMIC_SHARED(int, s);
    s[threadIdx.x] = 1;
    __syncthreads();
    if (threadIdx.x == 0) s[n] = 2;
}

extern "C" __global__ void f_null(int* p)
{
    if (threadIdx.x == 0) p[3] = 1;
}

extern "C" __global__ void f_write_one(float* p)
{
    if (threadIdx.x == 0) p[0] = 1.0f;
}

// A shuffle whose mask lacks the calling lane.
extern "C" __global__ void f_mask_without_self(int* out)
{
    out[threadIdx.x] = __shfl_sync(0x2u, (int)threadIdx.x, 1);
}

// Lanes of the same mask in different collectives.
extern "C" __global__ void f_divergent_collectives(int* out)
{
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(FULL_MASK, (int)threadIdx.x, 0);
    else out[threadIdx.x] = (int)__ballot_sync(FULL_MASK, 1);
}

// Half the warp waits in __syncwarp, the other half at __syncthreads.
extern "C" __global__ void f_warp_vs_block(int* out)
{
    if (threadIdx.x < 16) __syncwarp();
    else __syncthreads();
    out[threadIdx.x] = 1;
}

#ifdef KVK_EMULATION   // NVRTC has no <assert.h> without the toolkit headers
extern "C" __global__ void f_assert(int* out)
{
    assert(threadIdx.x < 40);
    out[threadIdx.x] = 1;
}
#endif

// A misaligned 16-byte load through the cuda/common host twin (traps like the GPU's misaligned address).
extern "C" __global__ void f_misaligned(const unsigned char* p, kvk_v16* out)
{
    if (threadIdx.x == 0) out[0] = kvk_ld(reinterpret_cast<const kvk_v16*>(p + 4));
}

extern "C" __global__ void f_div_zero(int* out, int d)
{
    if (threadIdx.x == 2) out[0] = 100 / d;
}

extern "C" __global__ void f_spin(int* flag)
{
    volatile int* f = flag;
    if (threadIdx.x == 0) {
        while (*f == 0) {
        }
    } else if (threadIdx.x == 1) {
        *f = 1;
    }
}

extern "C" __global__ void f_misaligned_atomic(unsigned char* p)
{
    if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned*>(p + 2), 1u);
}
