// attention.cu — decode attention over a quantized paged KV cache, dequantizing in registers.
//
//   quant_decode_attention   QuantizedAttentionSpec (src/KvKernels/Quantization/QuantizedAttentionSpec.cs): for
//                            sequence b, query token i and query head h, keys n of the row's segment [0, L) are
//                            visible when n <= L + trailing - queryLength + i (the queries sit after the segment
//                            and the `trailing` tokens that follow it: KIVI's residual, SAQ's younger stairs);
//                            s_n = scale * q . k^_n, o = softmax(s) . v^, lse natural log. k^ and v^ are the
//                            dequantized K and V (KvFormat), rounded to the input type as KvQuantCpu.Dequantize
//                            writes them, so the op equals attention over the dequantized tensors. With splits > 1
//                            each split writes its normalised fp32 partial and LSE; quant_merge_splits combines.
//   quant_merge_splits       the split combine (kvk_merge.cuh).
//
// Compile-time macros: HEAD_DIM (multiple of 32, 32..256); QUERY_ROWS (4, 8 or 16 query rows per CTA; at most 8
// above D = 128); INPUT_BF16 (query and group parameters fp16/bf16);
// OUT_TYPE (0 fp16, 1 bf16, 2 fp32); K_CODEC / V_CODEC (kvk_quant.cuh ids), K_BITS / V_BITS, K_TOKENS /
// V_TOKENS (1: asymmetric groups along tokens). Run-time: layout, group sizes, scale granularities.
//
// Work decomposition (a first version, written for correctness and coalescing; see research/kernel_techniques.md
// for what the tuned kernels do): one CTA of 4 warps per (sequence, KV head, split, query-row tile). Lane l of a
// warp owns channels [l*E, l*E+E), E = HEAD_DIM / 32, of every key and value row: a warp's loads of one token row
// are one contiguous run of D * bits / 8 bytes. Each warp takes 4 tokens at a time (their loads in flight
// together), dequantizes its channels in registers, reduces the per-row dot products with butterfly shuffles,
// and keeps an online softmax (base 2) for each query row of the tile; the 4 warps' states are merged through
// shared memory at the end.
#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"
#include "common/kvk_vec.cuh"
#include "common/kvk_math.cuh"
#include "common/kvk_quant.cuh"
#include "common/kvk_merge.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef INPUT_BF16
#define INPUT_BF16 0
#endif
#ifndef OUT_TYPE
#define OUT_TYPE 0
#endif
#ifndef K_CODEC
#define K_CODEC 0
#endif
#ifndef K_BITS
#define K_BITS 8
#endif
#ifndef K_TOKENS
#define K_TOKENS 0
#endif
#ifndef V_CODEC
#define V_CODEC K_CODEC
#endif
#ifndef V_BITS
#define V_BITS K_BITS
#endif
#ifndef V_TOKENS
#define V_TOKENS 0
#endif
#ifndef QUERY_ROWS
#define QUERY_ROWS (HEAD_DIM <= 128 ? 16 : 8)
#endif

#include "common/kvk_input.cuh"

static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM >= 32 && HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(OUT_TYPE >= 0 && OUT_TYPE <= 2, "OUT_TYPE must be 0, 1 or 2");
static_assert(K_CODEC >= 0 && K_CODEC <= 3 && V_CODEC >= 0 && V_CODEC <= 3, "codec ids are 0..3");
static_assert((K_CODEC == 3 || K_BITS == 8) && (V_CODEC == 3 || V_BITS == 8), "fp8 and int8 codes are 8 bits");
static_assert((K_TOKENS == 0 || K_CODEC == 3) && (V_TOKENS == 0 || V_CODEC == 3), "token groups are asymmetric");
static_assert(QUERY_ROWS == 4 || QUERY_ROWS == 8 || QUERY_ROWS == 16, "QUERY_ROWS must be 4, 8 or 16");

namespace kvk_qattn {

#if OUT_TYPE == 0
typedef kvk_f16 out_t;
#elif OUT_TYPE == 1
typedef kvk_bf16 out_t;
#else
typedef float out_t;
#endif

enum : int {
    kWarps = 4,
    kThreads = kWarps * 32,
    kDim = HEAD_DIM,
    kE = HEAD_DIM / 32,                 // channels per lane
    kRows = QUERY_ROWS,                 // query rows per CTA (host: QuantizedAttentionKernels.RowsPerCta): registers
                                        // hold kRows x E accumulators, so the host picks the fewest that cover the group
    kUnroll = 4,                        // tokens per warp step
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

KVK_INLINE float neg_inf() { return kvk_u32_as_f32(0xFF800000u); }

KVK_INLINE float round_in(float x) { return kvk_in_to_float(kvk_float_to_in(x)); }

// Where a quantized tensor lives and how it is coded (the run-time part; codec and bits are template arguments).
struct qtensor {
    const kvk_u8* codes;
    const float* scales;
    const kvk_u16* params;
    int group, granularity;
};

// The E dequantized channels [c0, c0 + E) of (slot, head), rounded to the input type.
template <int Codec, int Bits, int Tokens>
KVK_INLINE void load_channels(const qtensor& t, kvk_i64 slot, int head, int c0, int numKvHeads, int pageSize, int hnd, float (&x)[kE])
{
    if (Codec != KVK_Q_ASYM) {
        const kvk_i64 row = kvk_q_row_index(slot, head, numKvHeads, pageSize, hnd);
        const float s = t.scales[t.granularity == KVK_Q_PER_TENSOR ? 0 : t.granularity == KVK_Q_PER_HEAD ? head : row];
        const kvk_u8* c = t.codes + row * kDim + c0;
        KVK_UNROLL
        for (int e = 0; e < kE; ++e) x[e] = round_in(kvk_q_sym_value<Codec>(c[e]) * s);
    } else if (!Tokens) {
        const kvk_i64 row = kvk_q_row_index(slot, head, numKvHeads, pageSize, hnd);
        const kvk_u16* p = t.params + (row * (kDim / t.group) + c0 / t.group) * 2;
        const float s = kvk_in_to_float(p[0]), mn = kvk_in_to_float(p[1]);
        const kvk_u32* words = reinterpret_cast<const kvk_u32*>(t.codes + row * (kDim * Bits / 8));
        KVK_UNROLL
        for (int e = 0; e < kE; ++e) {
            const int bit = (c0 + e) * Bits;
            x[e] = round_in(fmaf((float)((words[bit / 32] >> (bit % 32)) & ((1u << Bits) - 1u)), s, mn));
        }
    } else {
        const kvk_i64 block = kvk_q_block_index(slot, head, numKvHeads, pageSize, t.group, hnd);
        const int j = (int)(slot % t.group);
        const int runBytes = t.group * Bits / 8;
        KVK_UNROLL
        for (int e = 0; e < kE; ++e) {
            const kvk_i64 run = block * kDim + c0 + e;
            const kvk_u32 word = reinterpret_cast<const kvk_u32*>(t.codes + run * runBytes)[j * Bits / 32];
            const float q = (float)((word >> (j * Bits % 32)) & ((1u << Bits) - 1u));
            x[e] = round_in(fmaf(q, kvk_in_to_float(t.params[run * 2]), kvk_in_to_float(t.params[run * 2 + 1])));
        }
    }
}

KVK_INLINE void store_out(out_t* dst, float x)
{
#if OUT_TYPE == 0
    *dst = kvk_f32_to_f16(x);
#elif OUT_TYPE == 1
    *dst = kvk_f32_to_bf16(x);
#else
    *dst = x;
#endif
}

}  // namespace kvk_qattn

using namespace kvk_qattn;

extern "C" __global__ __launch_bounds__(128) void quant_decode_attention(
    const kvk_u16* __restrict__ query,
    const kvk_u8* __restrict__ kCodes, const float* __restrict__ kScales, const kvk_u16* __restrict__ kParams,
    const kvk_u8* __restrict__ vCodes, const float* __restrict__ vScales, const kvk_u16* __restrict__ vParams,
    const kvk_i32* __restrict__ lengths, const kvk_i32* __restrict__ blockTable,
    out_t* __restrict__ output, float* __restrict__ lse, float* __restrict__ partialOutput, float* __restrict__ partialLse,
    kvk_i32 batch, kvk_i32 queryLength, kvk_i32 numQueryHeads, kvk_i32 numKvHeads, kvk_i32 pageSize, kvk_i32 maxPagesPerSeq,
    kvk_i32 hnd, kvk_i32 kGroup, kvk_i32 kGranularity, kvk_i32 vGroup, kvk_i32 vGranularity,
    float scale, kvk_i32 trailing, kvk_i32 splits, kvk_i32 rowTiles)
{
    __shared__ float qTile[kRows][kDim];
    __shared__ float oTile[kWarps][kRows][kDim];
    __shared__ float mTile[kWarps][kRows], lTile[kWarps][kRows];

    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
    kvk_u32 flat = blockIdx.x;
    const int rowTile = (int)(flat % (kvk_u32)rowTiles);
    flat /= (kvk_u32)rowTiles;
    const int split = (int)(flat % (kvk_u32)splits);
    flat /= (kvk_u32)splits;
    const int kvh = (int)(flat % (kvk_u32)numKvHeads);
    const int b = (int)(flat / (kvk_u32)numKvHeads);
    if (b >= batch) return;
    const int group = numQueryHeads / numKvHeads;
    const int packedRows = queryLength * group;
    const int rowBase = rowTile * kRows;
    const int length = kvk_max(0, kvk_min(lengths[b], maxPagesPerSeq * pageSize));

    // Query rows of the tile -> shared fp32, pre-scaled by scale * log2(e) (rows past the end: zeros).
    for (int c = tid; c < kRows * kDim; c += kThreads) {
        const int r = c / kDim, d = c % kDim, pr = rowBase + r;
        float v = 0.0f;
        if (pr < packedRows) {
            const kvk_i64 qRow = ((kvk_i64)b * queryLength + pr / group) * numQueryHeads + kvh * group + pr % group;
            v = kvk_in_to_float(query[qRow * kDim + d]) * scale * kLog2e;
        }
        qTile[r][d] = v;
    }
    __syncthreads();

    // Each row's last visible token, and this split's chunk of [0, length).
    int last[kRows];
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) {
        const int pr = rowBase + r;
        last[r] = pr < packedRows ? length + trailing - queryLength + pr / group : -1;
    }
    const int chunk = (length + splits - 1) / splits;
    const int begin = kvk_min(length, split * chunk), end = kvk_min(length, begin + chunk);

    const qtensor kt{kCodes, kScales, kParams, kGroup, kGranularity};
    const qtensor vt{vCodes, vScales, vParams, vGroup, vGranularity};
    const kvk_i32* table = blockTable + (kvk_i64)b * maxPagesPerSeq;
    const int c0 = lane * kE;

    float m[kRows], l[kRows], o[kRows][kE];
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) {
        m[r] = neg_inf();
        l[r] = 0.0f;
        KVK_UNROLL
        for (int e = 0; e < kE; ++e) o[r][e] = 0.0f;
    }

    for (int n0 = begin + warp * kUnroll; n0 < end; n0 += kWarps * kUnroll) {
        float k[kUnroll][kE], v[kUnroll][kE];
        KVK_UNROLL
        for (int u = 0; u < kUnroll; ++u) {
            const int n = kvk_min(n0 + u, end - 1);   // past the chunk: a visible token's data, masked below
            const kvk_i64 slot = (kvk_i64)table[n / pageSize] * pageSize + n % pageSize;
            load_channels<K_CODEC, K_BITS, K_TOKENS>(kt, slot, kvh, c0, numKvHeads, pageSize, hnd, k[u]);
            load_channels<V_CODEC, V_BITS, V_TOKENS>(vt, slot, kvh, c0, numKvHeads, pageSize, hnd, v[u]);
        }
        KVK_UNROLL
        for (int r = 0; r < kRows; ++r) {
            if (rowBase + r >= packedRows) break;   // uniform across the CTA
            float t[kUnroll];
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                float acc = 0.0f;
                KVK_UNROLL
                for (int e = 0; e < kE; ++e) acc = fmaf(qTile[r][c0 + e], k[u][e], acc);
                KVK_UNROLL
                for (int mask = 16; mask >= 1; mask >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, mask);
                t[u] = (n0 + u < end && n0 + u <= last[r]) ? acc : neg_inf();
            }
            float mNew = m[r];
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) mNew = fmaxf(mNew, t[u]);
            if (mNew == neg_inf()) continue;   // nothing visible yet for this row
            const float alpha = kvk_ex2(m[r] - mNew);   // m = -inf gives 0
            float p[kUnroll], sum = 0.0f;
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                p[u] = kvk_ex2(t[u] - mNew);
                sum += p[u];
            }
            l[r] = l[r] * alpha + sum;
            m[r] = mNew;
            KVK_UNROLL
            for (int e = 0; e < kE; ++e) {
                float acc = o[r][e] * alpha;
                KVK_UNROLL
                for (int u = 0; u < kUnroll; ++u) acc = fmaf(p[u], v[u][e], acc);
                o[r][e] = acc;
            }
        }
    }

    // Merge the warps' states per row and write.
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) {
        if (lane == 0) {
            mTile[warp][r] = m[r];
            lTile[warp][r] = l[r];
        }
        KVK_UNROLL
        for (int e = 0; e < kE; ++e) oTile[warp][r][c0 + e] = o[r][e];
    }
    __syncthreads();
    const kvk_i64 outRows = (kvk_i64)batch * queryLength * numQueryHeads;
    for (int c = tid; c < kRows * kDim; c += kThreads) {
        const int r = c / kDim, d = c % kDim, pr = rowBase + r;
        if (pr >= packedRows) continue;
        float mx = neg_inf();
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, mTile[w][r]);
        float sum = 0.0f, acc = 0.0f;
        if (mx != neg_inf())
            for (int w = 0; w < kWarps; ++w) {
                const float f = kvk_ex2(mTile[w][r] - mx);
                sum = fmaf(lTile[w][r], f, sum);
                acc = fmaf(oTile[w][r][d], f, acc);
            }
        const bool empty = !(sum > 0.0f);
        const float value = empty ? 0.0f : acc / sum;
        const float rowLse = empty ? neg_inf() : (mx + kvk_lg2(sum)) * kLn2;
        const kvk_i64 outRow = ((kvk_i64)b * queryLength + pr / group) * numQueryHeads + kvh * group + pr % group;
        if (splits > 1) {
            partialOutput[((kvk_i64)split * outRows + outRow) * kDim + d] = value;
            if (d == 0) partialLse[(kvk_i64)split * outRows + outRow] = rowLse;
        } else {
            store_out(output + outRow * kDim + d, value);
            if (d == 0 && lse != nullptr) lse[outRow] = rowLse;
        }
    }
}

extern "C" __global__ __launch_bounds__(256) void quant_merge_splits(
    const float* __restrict__ partialOutput, const float* __restrict__ partialLse, out_t* __restrict__ output,
    float* __restrict__ lse, kvk_i32 numRows, kvk_i32 dim, kvk_i32 splits)
{
    const int lane = (int)(threadIdx.x & 31);
    const kvk_i64 warps = (kvk_i64)gridDim.x * (blockDim.x / 32);
    for (kvk_i64 row = ((kvk_i64)blockIdx.x * blockDim.x + threadIdx.x) / 32; row < numRows; row += warps) {
        const float merged = kvk_merge_splits_row(partialOutput, partialLse, numRows, dim, splits, row, lane, [&](int c, float4 v) {
            store_out(output + row * dim + c, v.x);
            store_out(output + row * dim + c + 1, v.y);
            store_out(output + row * dim + c + 2, v.z);
            store_out(output + row * dim + c + 3, v.w);
        });
        if (lse != nullptr && lane == 0) lse[row] = merged;
    }
}
