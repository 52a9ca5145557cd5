// absorb.cu — MLA weight absorption on CUDA cores (MlaAttentionSpec, src/KvKernels/Mla/MlaSpec.cs), for hosts
// without cuBLAS and for the emulator; with cuBLAS the library runs the same GEMMs there and uses only
// mla_pack_rope from this file.
//
//   mla_absorb_query  query[m, h, 0..LATENT) = q_nope[m, h] . W_UK[h]   (rounded once to the input type)
//                     query[m, h, LATENT..ROW) = q_pe[m, h]              (copied)
//   mla_unabsorb      output[m, h, d] = sum_c o_lat[m, h, c] . W_UV[h][d, c]   (rounded once to OUT_TYPE)
//   mla_pack_rope     query[m, h, LATENT..ROW) = q_pe[m, h]   (the copy alone, after a cuBLAS absorption)
//
// Weights are DeepSeek's wkv_b as [H, NOPE_DIM + VALUE_DIM, LATENT_DIM]: W_UK[h] = rows 0..NOPE_DIM-1 of head h,
// W_UV[h] = the next VALUE_DIM rows. fp32 accumulation over the reduced dim in index order per thread.
// Decode has few token rows (M = B * q_len) and 16-32 MB of weights: the weights are the bytes that matter, so
// each CTA streams one weight tile once per chunk of kRows token rows, the rows' inputs staged in shared memory.
//
// Macros: LATENT_DIM (multiple of 32), ROPE_DIM (even), NOPE_DIM, VALUE_DIM (multiples of 8), INPUT_BF16 (0/1),
// OUT_TYPE (0 fp16, 1 bf16, 2 fp32: mla_unabsorb's output).

#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"

#ifndef LATENT_DIM
#define LATENT_DIM 512
#endif
#ifndef ROPE_DIM
#define ROPE_DIM 64
#endif
#ifndef NOPE_DIM
#define NOPE_DIM 128
#endif
#ifndef VALUE_DIM
#define VALUE_DIM 128
#endif
#ifndef INPUT_BF16
#define INPUT_BF16 1
#endif
#ifndef OUT_TYPE
#define OUT_TYPE 1
#endif

static_assert(LATENT_DIM % 32 == 0 && LATENT_DIM >= 32 && LATENT_DIM <= 512, "LATENT_DIM must be a multiple of 32 in 32..512");
static_assert(ROPE_DIM % 2 == 0 && ROPE_DIM >= 2 && ROPE_DIM <= 64, "ROPE_DIM must be even, at most 64");
static_assert(NOPE_DIM % 8 == 0 && NOPE_DIM <= 256 && VALUE_DIM % 8 == 0 && VALUE_DIM <= 256, "NOPE_DIM, VALUE_DIM: multiples of 8 up to 256");
static_assert(OUT_TYPE >= 0 && OUT_TYPE <= 2, "OUT_TYPE must be 0, 1 or 2");

#include "common/kvk_input.cuh"   // after INPUT_BF16 has its default

namespace kvk_mla_absorb {

enum : int {
    kRowDim = LATENT_DIM + ROPE_DIM,
    kWeightRows = NOPE_DIM + VALUE_DIM,
    kRows = 16,                       // token rows per CTA: each thread keeps kRows x 2 accumulators
    kAbsorbThreads = 128,             // 2 latent columns per thread: 256 columns per CTA
    kAbsorbColumns = 2 * kAbsorbThreads,
    kUnabsorbWarps = 8,               // one output column per warp
};

// q_pe rows [m0, m0 + rows) of head h -> the tails of their packed query rows (ROPE_DIM / 2 pairs per row).
KVK_INLINE void copy_rope(const kvk_u32* qPe, kvk_u32* query, kvk_i64 firstRow, int rows, int rowStep, int tid, int threads)
{
    for (int i = tid; i < rows * (ROPE_DIM / 2); i += threads) {
        const kvk_i64 r = firstRow + (kvk_i64)(i / (ROPE_DIM / 2)) * rowStep;
        const int p = i % (ROPE_DIM / 2);
        query[(r * kRowDim + LATENT_DIM) / 2 + p] = qPe[r * (ROPE_DIM / 2) + p];
    }
}

}  // namespace kvk_mla_absorb

using namespace kvk_mla_absorb;

// grid (ceil(LATENT_DIM / 256), H, ceil(M / kRows)), 128 threads. Thread t owns latent columns 2c, 2c + 1 of the
// CTA's 256; the CTA's kRows token rows of q_nope (head h) are staged in shared memory as fp32.
extern "C" __global__ __launch_bounds__(128) void mla_absorb_query(
    const kvk_u16* __restrict__ queryNope, const kvk_u16* __restrict__ queryRope, const kvk_u16* __restrict__ weights,
    kvk_u16* __restrict__ query, kvk_i32 tokenRows, kvk_i32 heads)
{
    __shared__ float x[kRows][NOPE_DIM];
    const int tid = (int)threadIdx.x, h = (int)blockIdx.y;
    const int m0 = (int)blockIdx.z * kRows;
    const int rows = tokenRows - m0 < kRows ? tokenRows - m0 : kRows;

    for (int i = tid; i < rows * NOPE_DIM; i += kAbsorbThreads) {
        const int r = i / NOPE_DIM, d = i % NOPE_DIM;
        x[r][d] = kvk_in_to_float(queryNope[((kvk_i64)(m0 + r) * heads + h) * NOPE_DIM + d]);
    }
    if (blockIdx.x == 0)
        copy_rope(reinterpret_cast<const kvk_u32*>(queryRope), reinterpret_cast<kvk_u32*>(query), (kvk_i64)m0 * heads + h, rows, heads,
                  tid, kAbsorbThreads);
    __syncthreads();

    const int c = (int)blockIdx.x * kAbsorbColumns + 2 * tid;
    if (c >= LATENT_DIM) return;
    const kvk_u32* w = reinterpret_cast<const kvk_u32*>(weights + (kvk_i64)h * kWeightRows * LATENT_DIM + c);
    float acc[kRows][2];
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < NOPE_DIM; ++d) {
        float w0, w1;
        kvk_in_unpack2(w[d * (LATENT_DIM / 2)], w0, w1);
        KVK_UNROLL
        for (int r = 0; r < kRows; ++r) {
            acc[r][0] = fmaf(x[r][d], w0, acc[r][0]);
            acc[r][1] = fmaf(x[r][d], w1, acc[r][1]);
        }
    }
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r)
        if (r < rows)
            reinterpret_cast<kvk_u32*>(query)[(((kvk_i64)(m0 + r) * heads + h) * kRowDim + c) / 2] = kvk_in_pack2(acc[r][0], acc[r][1]);
}

// grid (ceil(VALUE_DIM / 8), H, ceil(M / kRows)), 256 threads. Warp w computes output column d = 8 * blockIdx.x + w:
// lane l dots the latent columns 2l + 64k, 2l + 64k + 1 of W_UV[h][d] with the CTA's kRows latent rows (fp32 in
// shared memory), then the lanes' partial sums are added by a fixed butterfly.
extern "C" __global__ __launch_bounds__(256) void mla_unabsorb(
    const kvk_u16* __restrict__ latentOutput, const kvk_u16* __restrict__ weights, void* __restrict__ output,
    kvk_i32 tokenRows, kvk_i32 heads)
{
    __shared__ float o[kRows][LATENT_DIM];
    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5, h = (int)blockIdx.y;
    const int m0 = (int)blockIdx.z * kRows;
    const int rows = tokenRows - m0 < kRows ? tokenRows - m0 : kRows;

    for (int i = tid; i < rows * LATENT_DIM; i += kUnabsorbWarps * 32) {
        const int r = i / LATENT_DIM, c = i % LATENT_DIM;
        o[r][c] = kvk_in_to_float(latentOutput[((kvk_i64)(m0 + r) * heads + h) * LATENT_DIM + c]);
    }
    __syncthreads();

    const int d = (int)blockIdx.x * kUnabsorbWarps + warp;
    if (d >= VALUE_DIM) return;
    const kvk_u32* w = reinterpret_cast<const kvk_u32*>(weights + ((kvk_i64)h * kWeightRows + NOPE_DIM + d) * LATENT_DIM);
    float acc[kRows];
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    KVK_UNROLL
    for (int k = 0; k < (LATENT_DIM + 63) / 64; ++k) {
        const int c = 2 * lane + 64 * k;
        if (LATENT_DIM % 64 != 0 && c >= LATENT_DIM) break;   // a latent dim of 32 mod 64: half the lanes idle last
        float w0, w1;
        kvk_in_unpack2(w[c / 2], w0, w1);
        KVK_UNROLL
        for (int r = 0; r < kRows; ++r) acc[r] = fmaf(o[r][c + 1], w1, fmaf(o[r][c], w0, acc[r]));
    }
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r)
        for (int mask = 16; mask >= 1; mask >>= 1) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], mask);
    if (lane != 0) return;
    for (int r = 0; r < rows; ++r) {
        const kvk_i64 index = ((kvk_i64)(m0 + r) * heads + h) * VALUE_DIM + d;
#if OUT_TYPE == 0
        static_cast<kvk_f16*>(output)[index] = kvk_f32_to_f16(acc[r]);
#elif OUT_TYPE == 1
        static_cast<kvk_bf16*>(output)[index] = kvk_f32_to_bf16(acc[r]);
#else
        static_cast<float*>(output)[index] = acc[r];
#endif
    }
}

// One thread per q_pe pair: the packed query's tail after a cuBLAS absorption wrote its head.
extern "C" __global__ __launch_bounds__(256) void mla_pack_rope(const kvk_u16* __restrict__ queryRope, kvk_u16* __restrict__ query, kvk_i32 rows)
{
    const kvk_i64 i = (kvk_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (kvk_i64)rows * (ROPE_DIM / 2)) return;
    const kvk_i64 r = i / (ROPE_DIM / 2);
    const int p = (int)(i % (ROPE_DIM / 2));
    reinterpret_cast<kvk_u32*>(query)[(r * kRowDim + LATENT_DIM) / 2 + p] = reinterpret_cast<const kvk_u32*>(queryRope)[i];
}
