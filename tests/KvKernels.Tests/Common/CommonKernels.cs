using KvKernels.Compilation;

namespace KvKernels.Tests.Common;

/// <summary>
/// Test kernels for the inline-PTX helpers of <c>cuda/common</c> (kvk_fp8, kvk_math, kvk_mma, kvk_async). One source
/// calls every helper: the compile gate builds it for every target, and each test launches one of its kernels on every
/// backend. Fragments are built here straight from the PTX ISA tables, independently of the helpers' host twins.
/// </summary>
internal static class CommonKernels
{
    public const string Source = """
        #include "common/kvk_types.cuh"
        #include "common/kvk_fp8.cuh"
        #include "common/kvk_math.cuh"
        #include "common/kvk_mma.cuh"
        #include "common/kvk_async.cuh"

        // ---- fp8 -----------------------------------------------------------------------------------------
        // Thread i converts in[i] to e4m3 and e5m2; even threads also pack (in[i], in[i+1]) as a pair and threads
        // i % 4 == 0 pack four values. n is a multiple of 4.
        extern "C" __global__ __launch_bounds__(256) void kvk_test_fp8_encode(
            const float* in, kvk_u8* e4m3, kvk_u8* e5m2, kvk_u16* e4m3Pairs, kvk_u16* e5m2Pairs,
            kvk_u32* e4m3Quads, kvk_u32* e5m2Quads, int n)
        {
            const int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= n) return;
            e4m3[i] = kvk_f32_to_e4m3(in[i]).bits;
            e5m2[i] = kvk_f32_to_e5m2(in[i]).bits;
            if ((i & 1) == 0) {
                e4m3Pairs[i / 2] = kvk_pack_e4m3x2(in[i], in[i + 1]);
                e5m2Pairs[i / 2] = kvk_pack_e5m2x2(in[i], in[i + 1]);
            }
            if ((i & 3) == 0) {
                e4m3Quads[i / 4] = kvk_pack_e4m3x4(in[i], in[i + 1], in[i + 2], in[i + 3]);
                e5m2Quads[i / 4] = kvk_pack_e5m2x4(in[i], in[i + 1], in[i + 2], in[i + 3]);
            }
        }

        // Thread i decodes the pair codes[i] (byte 0 = element 0) every way the header offers. n is even.
        extern "C" __global__ __launch_bounds__(256) void kvk_test_fp8_decode(
            const kvk_u16* codes, kvk_u32* e4m3F16, kvk_u32* e5m2F16, kvk_u32* e4m3Trick, kvk_u32* e4m3F16x4,
            kvk_u32* e5m2F16x4, float* e4m3F32, float* e5m2F32, float* e4m3Scalar, float* e5m2Scalar, int n)
        {
            const int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= n) return;
            const kvk_u16 v = codes[i];
            e4m3F16[i] = kvk_e4m3x2_to_f16x2(v);
            e5m2F16[i] = kvk_e5m2x2_to_f16x2(v);
            e4m3Trick[i] = kvk_e4m3x2_to_f16x2_bias_trick(v);
            kvk_e4m3x2_to_f32x2(v, e4m3F32[2 * i], e4m3F32[2 * i + 1]);
            kvk_e5m2x2_to_f32x2(v, e5m2F32[2 * i], e5m2F32[2 * i + 1]);
            e4m3Scalar[i] = kvk_e4m3_to_f32(kvk_e4m3{(kvk_u8)(v & 0xFFu)});
            e5m2Scalar[i] = kvk_e5m2_to_f32(kvk_e5m2{(kvk_u8)(v & 0xFFu)});
            if ((i & 1) == 0) {
                const kvk_u32 quad = (kvk_u32)codes[i] | ((kvk_u32)codes[i + 1] << 16);
                kvk_u32 h[2];
                kvk_e4m3x4_to_f16x4(quad, h);
                e4m3F16x4[i] = h[0];
                e4m3F16x4[i + 1] = h[1];
                kvk_e5m2x4_to_f16x4(quad, h);
                e5m2F16x4[i] = h[0];
                e5m2F16x4[i + 1] = h[1];
            }
        }

        // ---- ex2 / lg2 / rcp -----------------------------------------------------------------------------
        extern "C" __global__ __launch_bounds__(256) void kvk_test_math(const float* in, float* ex2, float* lg2, float* rcp, int n)
        {
            const int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= n) return;
            ex2[i] = kvk_ex2(in[i]);
            lg2[i] = kvk_lg2(in[i]);
            rcp[i] = kvk_rcp(in[i]);
        }

        // ---- mma.m16n8k16 --------------------------------------------------------------------------------
        // One warp. A: 16x16 row-major, B: 16x8 stored [k][n], C and D: 16x8 row-major, elements as 16-bit bits.
        // D[0..127]: fragments built from the ISA table with plain loads. D[128..255]: A by ldmatrix.x4 and B by
        // ldmatrix.x2.trans from B stored [k][n]. D[256..383]: B by ldmatrix.x2 from B^T stored [n][k].
        // D[384..511]: the accumulate-in-place overload, applied twice (A*B + A*B + C).
        __device__ __forceinline__ kvk_u32 kvk_test_pair(kvk_u16 lo, kvk_u16 hi) { return (kvk_u32)lo | ((kvk_u32)hi << 16); }

        __device__ __forceinline__ void kvk_test_store_d(float* D, const float (&d)[4], kvk_u32 g, kvk_u32 t)
        {
            D[g * 8 + 2 * t] = d[0];
            D[g * 8 + 2 * t + 1] = d[1];
            D[(g + 8) * 8 + 2 * t] = d[2];
            D[(g + 8) * 8 + 2 * t + 1] = d[3];
        }

        extern "C" __global__ __launch_bounds__(32) void kvk_test_mma(const kvk_u16* A, const kvk_u16* B, const float* C, float* D, int bf16)
        {
            __shared__ __align__(16) kvk_u16 sA[16 * 16];
            __shared__ __align__(16) kvk_u16 sB[16 * 8];
            __shared__ __align__(16) kvk_u16 sBt[8 * 16];
            const kvk_u32 lane = kvk_lane_id();
            const kvk_u32 g = lane >> 2, t = lane & 3u;

            kvk_u32 a[4], b[2];
            a[0] = kvk_test_pair(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
            a[1] = kvk_test_pair(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
            a[2] = kvk_test_pair(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
            a[3] = kvk_test_pair(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
            b[0] = kvk_test_pair(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
            b[1] = kvk_test_pair(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
            float c[4], d[4];
            c[0] = C[g * 8 + 2 * t];
            c[1] = C[g * 8 + 2 * t + 1];
            c[2] = C[(g + 8) * 8 + 2 * t];
            c[3] = C[(g + 8) * 8 + 2 * t + 1];
            if (bf16) kvk_mma_m16n8k16_bf16(d, a, b, c);
            else kvk_mma_m16n8k16_f16(d, a, b, c);
            kvk_test_store_d(D, d, g, t);

            for (kvk_u32 i = lane; i < 256; i += 32) sA[i] = A[i];
            for (kvk_u32 i = lane; i < 128; i += 32) {
                sB[i] = B[i];
                sBt[(i % 8) * 16 + i / 8] = B[i];     // B[k][n] -> Bt[n][k]
            }
            __syncwarp();
            kvk_u32 a2[4], b2[2], b3[2];
            kvk_ldmatrix_x4(a2, &sA[(lane % 16) * 16 + (lane / 16) * 8]);
            kvk_ldmatrix_x2_trans(b2, &sB[(lane % 16) * 8]);
            kvk_ldmatrix_x2(b3, &sBt[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
            if (bf16) kvk_mma_m16n8k16_bf16(d, a2, b2, c);
            else kvk_mma_m16n8k16_f16(d, a2, b2, c);
            kvk_test_store_d(D + 128, d, g, t);
            if (bf16) kvk_mma_m16n8k16_bf16(d, a2, b3, c);
            else kvk_mma_m16n8k16_f16(d, a2, b3, c);
            kvk_test_store_d(D + 256, d, g, t);

            float acc[4] = {c[0], c[1], c[2], c[3]};
            for (int rep = 0; rep < 2; ++rep) {
                if (bf16) kvk_mma_m16n8k16_bf16(acc, a, b);
                else kvk_mma_m16n8k16_f16(acc, a, b);
            }
            kvk_test_store_d(D + 384, acc, g, t);
        }

        // ---- ldmatrix / movmatrix ------------------------------------------------------------------------
        // One warp. tile[32][8]: row j of matrix i is tile[8i + j]; lane L copies row L into the 16-byte slot rowSlot[L]
        // of shared memory and passes that slot as its row address. out[v][lane][4] for the variants v = x1, x2, x4,
        // x1.trans, x2.trans, x4.trans, then movmatrix applied to each register of x4; registers a variant does not load
        // are written as 0xDEADBEEF.
        __device__ __forceinline__ void kvk_test_store_regs(kvk_u32* out, int variant, kvk_u32 lane, const kvk_u32* r, int n)
        {
            for (int i = 0; i < 4; ++i) out[(variant * 32 + (int)lane) * 4 + i] = i < n ? r[i] : 0xDEADBEEFu;
        }

        extern "C" __global__ __launch_bounds__(32) void kvk_test_ldmatrix(const kvk_u16* tile, const int* rowSlot, kvk_u32* out)
        {
            __shared__ __align__(16) kvk_u16 slots[64 * 8];
            const kvk_u32 lane = kvk_lane_id();
            kvk_u16* row = &slots[rowSlot[lane] * 8];
            for (int c = 0; c < 8; ++c) row[c] = tile[lane * 8 + c];
            __syncwarp();
            kvk_u32 r1[1], r2[2], r4[4];
            kvk_ldmatrix_x1(r1, row);
            kvk_test_store_regs(out, 0, lane, r1, 1);
            kvk_ldmatrix_x2(r2, row);
            kvk_test_store_regs(out, 1, lane, r2, 2);
            kvk_ldmatrix_x4(r4, row);
            kvk_test_store_regs(out, 2, lane, r4, 4);
            kvk_u32 m[4];
            for (int i = 0; i < 4; ++i) m[i] = kvk_movmatrix_trans(r4[i]);
            kvk_test_store_regs(out, 6, lane, m, 4);
            kvk_ldmatrix_x1_trans(r1, row);
            kvk_test_store_regs(out, 3, lane, r1, 1);
            kvk_ldmatrix_x2_trans(r2, row);
            kvk_test_store_regs(out, 4, lane, r2, 2);
            kvk_ldmatrix_x4_trans(r4, row);
            kvk_test_store_regs(out, 5, lane, r4, 4);
        }

        // ---- cp.async ------------------------------------------------------------------------------------
        // Thread i (of the block) copies, from src + 48 * (global thread index): 4 bytes at +0 (.ca), 8 at +8 (.ca), 16 at
        // +16 (.ca) and 16 at +32 (.cg), with src-size sizes[4 * i + k] (-1: the form without src-size), in three
        // commit groups {4, 8}, {16 .ca}, {16 .cg}, then reads each group back after the wait that covers it.
        // The shared slots are filled with 0xAB first, so zero fill shows. out has 48 bytes per thread.
        extern "C" __global__ __launch_bounds__(64) void kvk_test_cp_async(const kvk_u8* src, const int* sizes, kvk_u8* out)
        {
            __shared__ __align__(16) kvk_u8 s4[64 * 4];
            __shared__ __align__(16) kvk_u8 s8[64 * 8];
            __shared__ __align__(16) kvk_u8 s16a[64 * 16];
            __shared__ __align__(16) kvk_u8 s16b[64 * 16];
            const int tid = threadIdx.x;
            const int gid = blockIdx.x * blockDim.x + tid;
            for (int k = 0; k < 4; ++k) s4[tid * 4 + k] = 0xAB;
            for (int k = 0; k < 8; ++k) s8[tid * 8 + k] = 0xAB;
            for (int k = 0; k < 16; ++k) { s16a[tid * 16 + k] = 0xAB; s16b[tid * 16 + k] = 0xAB; }
            __syncthreads();

            const kvk_u8* s = src + 48 * gid;
            const int* sz = sizes + 4 * gid;
            if (sz[0] < 0) kvk_cp_async_ca<4>(&s4[tid * 4], s);
            else kvk_cp_async_ca<4>(&s4[tid * 4], s, (kvk_u32)sz[0]);
            if (sz[1] < 0) kvk_cp_async_ca<8>(&s8[tid * 8], s + 8);
            else kvk_cp_async_ca<8>(&s8[tid * 8], s + 8, (kvk_u32)sz[1]);
            kvk_cp_async_commit();
            if (sz[2] < 0) kvk_cp_async_ca<16>(&s16a[tid * 16], s + 16);
            else kvk_cp_async_ca<16>(&s16a[tid * 16], s + 16, (kvk_u32)sz[2]);
            kvk_cp_async_commit();
            if (sz[3] < 0) kvk_cp_async_cg16(&s16b[tid * 16], s + 32);
            else kvk_cp_async_cg16(&s16b[tid * 16], s + 32, (kvk_u32)sz[3]);
            kvk_cp_async_commit();

            kvk_u8* o = out + 48 * gid;
            kvk_cp_async_wait_group<2>();
            for (int k = 0; k < 4; ++k) o[k] = s4[tid * 4 + k];
            for (int k = 0; k < 8; ++k) o[8 + k] = s8[tid * 8 + k];
            kvk_cp_async_wait_group<1>();
            for (int k = 0; k < 16; ++k) o[16 + k] = s16a[tid * 16 + k];
            kvk_cp_async_wait_all();
            for (int k = 0; k < 16; ++k) o[32 + k] = s16b[tid * 16 + k];
            for (int k = 4; k < 8; ++k) o[k] = 0;
        }
        """;

    public static readonly KernelSpecialization Specialization = KernelSpecialization.FromText("tests/common_helpers.cu", Source);

    public static readonly string[] EntryPoints =
        ["kvk_test_fp8_encode", "kvk_test_fp8_decode", "kvk_test_math", "kvk_test_mma", "kvk_test_ldmatrix", "kvk_test_cp_async"];
}
