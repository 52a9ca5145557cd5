// scores.cu — token-scoring primitives for KV-cache eviction (research/kv_algorithms.md §2.3–2.5, §6 P1, P2, P5, P6):
//
//   selection_norms_append     ‖k‖₂ / ‖v‖₁ (either norm for either tensor) of the Hkv rows of each appended token,
//                              into fp32 side buffers indexed like the pools: norms[slot * Hkv + head]. Addressed like
//                              paging_append (source [T, Hkv, D] with token strides, slots[T], slot < 0 skipped), so an
//                              engine launches it right after PagedKvKernels.Append with the same slot mapping.
//   selection_norms_cache      the same norms over a whole cache (paged or contiguous, NHD or HND) -> [rows, Hkv, L]
//                              fp32 (L = MaxTokens); positions at or past a row's length are written 0.
//   selection_pool             1-D pooling along tokens, stride 1, odd kernel k, of fp32 rows [rows, L]: average with
//                              zero padding counted (always / k) or max with -inf padding; per-row lengths (positions
//                              at or past the length are padding, and are written 0).
//   selection_window_partials  SnapKV observation-window scoring, pass 1: per (row tile, key split) the running max and
//                              exp-sum of each window query row's scaled logits over the split's visible keys.
//   selection_window_lse       pass 1b: merges the splits of each row, in split order -> log2-domain LSE.
//   selection_window_scores    pass 2: recomputes each logit, p = 2^(s·log2e - lse2), and reduces p per key column over
//                              the W queries (sum | mean | max) and then over the g heads of the group (sum | mean | max |
//                              none) -> [B, Hkv, L] (or [B, Hq, L] with none).
//
// Norms: bit-identical to the CPU twin (TokenScoresCpu). A row of D elements (D a multiple of 8) is D/8 16-byte vectors;
// 8 consecutive lanes of a warp own a row (4 rows per warp). Lane s (0..7) takes vectors s, s+8, s+16, ... in
// ascending order and keeps 8 accumulators, one per element position e of a vector: acc[e] = fmaf(x, x, acc[e]) (L2)
// or acc[e] + |x| (L1), in fp32 from exactly widened fp16/bf16. Then, in the lane, ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7));
// then a xor butterfly over the 8 lanes (masks 4, 2, 1); L2 takes IEEE sqrtf. Every multiply-add is an explicit fmaf and
// no other product feeds an add, so NVRTC's default contraction (--fmad=true) cannot change the order or the rounding.
//
// Pooling: bit-identical to the CPU twin. Output j of a row of length len (j < len) sums x[t] for t = j - k/2 ... j + k/2
// clamped to [0, len), in ascending t, starting from +0, then divides by k (IEEE division); max starts at -inf and, in
// ascending t, takes x[t] when x[t] > current (a NaN input is skipped; the CPU twin uses the same comparison).
//
// Window scoring (the op of WindowScoreSpec): rows of a KV head's group are ordered R = hh * W + i (query head
// kvh * g + hh, window query i). Window query i sits at position L - W + i; a query at a negative position (a row with
// L < W) is absent and contributes nothing; a present query sees keys 0 .. L - W + i when causal, else all L keys.
// Logits s = (q · k) * scale in fp32 from tensor-core m16n8k16 MMAs (fp16/bf16 inputs, fp32 accumulation), kept in the
// log2 domain (s2 = dot * (scale * log2 e)) with ex2.approx / lg2.approx. The exp makes the result differ from the
// CPU twin by a few ulp, so the two are compared with a tolerance (research/kv_algorithms.md §7 note 2).
// - Work split. A CTA of 4 warps stages 64 query rows (16 per warp) and 64-key tiles in shared memory as raw 16-bit
//   rows (zero padded to a multiple of 16 columns, +8 elements of padding per row so ldmatrix is conflict-free); each
//   warp computes its 16 x 64 logits with HEAD_DIM/16 x 8 MMAs. A warp whose rows cannot see any key of the tile skips
//   the MMAs (causal windows as long as the prompt skip about half the work).
// - Pass 1 (selection_window_partials): grid (row tiles x B·Hkv, splits). Each split covers a contiguous chunk of the
//   row's keys (a multiple of 64); per row it keeps the running max m and the lane-partial exp-sum l (online softmax),
//   adds the quad's partial sums with a xor butterfly at the end, and writes (m, l) to partials[bh][split][R].
// - Pass 1b (selection_window_lse): lse2 = M + lg2(Σ_split l_s · 2^(m_s - M)), splits in ascending order.
// - Pass 2 (selection_window_scores): grid (key tiles x B·Hkv). A CTA owns 64 key columns and loops over ALL rows of
//   the group, 64 at a time: the warps write p to a shared tile, then thread j < 64 folds column j row by row in
//   ascending R: the window reduction per head in ascending i, and at each head boundary the head's value (divided by W
//   for mean) into the group reduction in ascending head order (divided by g at the end for mean; written per query
//   head for none). Each column is reduced by one thread of one CTA in a fixed order: deterministic, no atomics, no
//   cross-CTA second stage needed. Columns at or past the row's length are written 0.
//
// Macros: INPUT_BF16 (0 fp16, 1 bf16: element type of keys, values, queries), HEAD_DIM (window scoring only: a multiple
// of 8 in 8..256; the norm and pooling kernels take the head dim at run time and are the same in every specialization).
// Storage for the window and cache-norm kernels is a run-time choice: paged (pageSize > 0: block table [rows,
// maxPagesPerSeq]) or contiguous (pageSize = 0: [rows, maxTokens, Hkv, D] / [rows, Hkv, maxTokens, D]), NHD or HND.
// Host promises (checked by TokenScoreKernels): 16-byte aligned bases and token strides; lengths in [0, maxTokens];
// pages of the table in range; item counts below 2^31.

#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"
#include "common/kvk_index.cuh"
#include "common/kvk_vec.cuh"
#include "common/kvk_math.cuh"
#include "common/kvk_mma.cuh"

#ifndef INPUT_BF16
#define INPUT_BF16 0
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

static_assert(INPUT_BF16 == 0 || INPUT_BF16 == 1, "INPUT_BF16 must be 0 or 1");
static_assert(HEAD_DIM % 8 == 0 && HEAD_DIM >= 8 && HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 8 in 8..256");

#include "common/kvk_input.cuh"   // after INPUT_BF16 has its default

namespace kvk_scores {

enum : int {
    kNormLanes = 8,     // lanes per row
    kNormBatch = 4,     // vectors per lane loaded before they are accumulated
    kWarps = 4,         // window kernels: warps per CTA
    kThreads = 32 * kWarps,
    kRows = 16 * kWarps,                    // query rows staged per CTA step
    kKeys = 64,                             // keys per tile
    kDimPad = (HEAD_DIM + 15) / 16 * 16,    // the MMA's K extent
    kUnits = kDimPad / 8,                   // 16-byte units of a staged row holding data or zero padding
    kDataUnits = HEAD_DIM / 8,              // units holding data
    kStride = kDimPad + 8,                  // elements between staged rows
    kPStride = kKeys + 1,                   // floats between rows of the probability tile
    kStageBytes = kRows * kStride * 2,      // one staged query block (or key tile: kKeys == kRows)
    kPartialsShared = 2 * kStageBytes,
    kScoresShared = 2 * kStageBytes + kRows * kPStride * 4,
};
static_assert(kKeys == kRows, "query blocks and key tiles share one staging size");

enum : int { kNormL1 = 1, kNormL2 = 2 };
enum : int { kReduceSum = 0, kReduceMean = 1, kReduceMax = 2, kReduceNone = 3 };

KVK_INLINE float neg_inf() { return kvk_u32_as_f32(0xFF800000u); }
KVK_INLINE float pos_inf() { return kvk_u32_as_f32(0x7F800000u); }

// ---- norms ---------------------------------------------------------------------------------------------------------

KVK_INLINE void accumulate8(float (&acc)[8], const kvk_v16& v, int kind)
{
    float x[8];
    kvk_in_unpack2(v.x, x[0], x[1]);
    kvk_in_unpack2(v.y, x[2], x[3]);
    kvk_in_unpack2(v.z, x[4], x[5]);
    kvk_in_unpack2(v.w, x[6], x[7]);
    if (kind == kNormL2) {
        KVK_UNROLL
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(x[e], x[e], acc[e]);
    } else {
        KVK_UNROLL
        for (int e = 0; e < 8; ++e) acc[e] = acc[e] + fabsf(x[e]);
    }
}

// This lane's share of a row: vectors sub, sub + 8, ... (ascending), folded to one value in the lane's fixed order.
// A null row (idle group) or kind 0 contributes +0.
struct norm_lane {
    float acc[8];

    KVK_INLINE norm_lane()
    {
        KVK_UNROLL
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    }

    KVK_INLINE float fold() const
    {
        return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    }
};

// Both tensors of one (token, head) at once, so the loads of K and V are in flight together.
KVK_INLINE void lane_norms(const kvk_v16* krow, const kvk_v16* vrow, int vecs, int sub, int keyKind, int valueKind,
                           norm_lane& k, norm_lane& v)
{
    for (int v0 = sub; v0 < vecs; v0 += kNormLanes * kNormBatch) {
        kvk_v16 kb[kNormBatch], vb[kNormBatch];
        KVK_UNROLL
        for (int u = 0; u < kNormBatch; ++u) {
            const int idx = v0 + u * kNormLanes;
            kb[u] = kvk_v16{};
            vb[u] = kvk_v16{};
            if (idx < vecs) {
                if (krow != nullptr) kb[u] = kvk_ld_nc(krow + idx);
                if (vrow != nullptr) vb[u] = kvk_ld_nc(vrow + idx);
            }
        }
        KVK_UNROLL
        for (int u = 0; u < kNormBatch; ++u) {
            if (v0 + u * kNormLanes >= vecs) break;
            if (krow != nullptr) accumulate8(k.acc, kb[u], keyKind);
            if (vrow != nullptr) accumulate8(v.acc, vb[u], valueKind);
        }
    }
}

// The 8 lanes' values combined by a xor butterfly (every lane of the warp must call it: full-mask shuffles).
KVK_INLINE float group_sum(float x)
{
    KVK_UNROLL
    for (int mask = 4; mask >= 1; mask >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, mask);
    return x;
}

KVK_INLINE float finish_norm(float sum, int kind) { return kind == kNormL2 ? sqrtf(sum) : sum; }

// ---- cache addressing ---------------------------------------------------------------------------------------------

// Head-row index (in rows of D elements) of token n of storage row b, KV head h. Paged when pageSize > 0 (the page of
// token n is table[b * maxPagesPerSeq + n / pageSize]); contiguous storage is the same formula with one page of
// maxTokens slots per row.
struct kv_address {
    const kvk_i32* table;
    kvk_fastdiv pageDiv;
    int slotsPerPage, heads, maxPagesPerSeq;
    bool paged, hnd;

    KVK_INLINE kv_address(const kvk_i32* blockTable, int pageSize, int maxTokens, int numKvHeads, int maxPages, int layoutHnd)
        : table(blockTable), pageDiv((kvk_u32)(pageSize > 0 ? pageSize : 1)), slotsPerPage(pageSize > 0 ? pageSize : maxTokens),
          heads(numKvHeads), maxPagesPerSeq(maxPages), paged(pageSize > 0), hnd(layoutHnd != 0)
    {
    }

    KVK_INLINE kvk_i64 row(int b, int n, int h) const
    {
        kvk_i64 page;
        kvk_u32 offset;
        if (paged) {
            kvk_u32 pageIndex;
            pageDiv.divmod((kvk_u32)n, pageIndex, offset);
            page = kvk_ldg_i32(table + (kvk_i64)b * maxPagesPerSeq + pageIndex);
        } else {
            page = b;
            offset = (kvk_u32)n;
        }
        return hnd ? (page * heads + h) * slotsPerPage + offset : (page * slotsPerPage + offset) * heads + h;
    }
};

// ---- window scoring -------------------------------------------------------------------------------------------------

// The problem of one window-scoring launch.
struct window_problem {
    const kvk_u16* query;
    const kvk_u16* keys;
    kv_address kv;
    kvk_fastdiv windowDiv;
    int window, numQueryHeads, group, rowsTotal;
    bool causal;

    KVK_INLINE window_problem(const kvk_u16* q, const kvk_u16* k, const kvk_i32* blockTable, int window_, int hq, int hkv,
                              int maxTokens, int pageSize, int maxPages, int layoutHnd, int causal_)
        : query(q), keys(k), kv(blockTable, pageSize, maxTokens, hkv, maxPages, layoutHnd), windowDiv((kvk_u32)window_),
          window(window_), numQueryHeads(hq), group(hq / hkv), rowsTotal(hq / hkv * window_), causal(causal_ != 0)
    {
    }

    // Last key row R may see (-1: none; R past the group's rows or a query at a negative position).
    KVK_INLINE int last_visible(int R, int len) const
    {
        if (R >= rowsTotal) return -1;
        const int i = (int)(R - windowDiv.div((kvk_u32)R) * (kvk_u32)window);
        const int position = len - window + i;
        if (position < 0) return -1;
        return causal ? position : len - 1;
    }
};

// Stages query rows R0 .. R0 + kRows - 1 of (b, kvh) as raw 16-bit rows; rows past the group and the padding columns
// are zeros.
KVK_INLINE void stage_queries(const window_problem& p, kvk_u16* sQ, int b, int kvh, int R0)
{
    for (int idx = (int)threadIdx.x; idx < kRows * kUnits; idx += kThreads) {
        const int r = idx / kUnits, u = idx - r * kUnits;
        const int R = R0 + r;
        kvk_v16 v = kvk_v16{};
        if (R < p.rowsTotal && u < kDataUnits) {
            kvk_u32 hh, i;
            p.windowDiv.divmod((kvk_u32)R, hh, i);
            const kvk_i64 row = ((kvk_i64)b * p.window + i) * p.numQueryHeads + (kvk_i64)kvh * p.group + hh;
            v = kvk_ld_nc(reinterpret_cast<const kvk_v16*>(p.query + row * HEAD_DIM) + u);
        }
        *reinterpret_cast<kvk_v16*>(sQ + r * kStride + u * 8) = v;
    }
}

// Stages keys n0 .. n0 + kKeys - 1 of (b, kvh); keys at or past `end` and the padding columns are zeros.
KVK_INLINE void stage_keys(const window_problem& p, kvk_u16* sK, int b, int kvh, int n0, int end)
{
    for (int idx = (int)threadIdx.x; idx < kKeys * kUnits; idx += kThreads) {
        const int j = idx / kUnits, u = idx - j * kUnits;
        const int n = n0 + j;
        kvk_v16 v = kvk_v16{};
        if (n < end && u < kDataUnits)
            v = kvk_ld_nc(reinterpret_cast<const kvk_v16*>(p.keys + p.kv.row(b, n, kvh) * HEAD_DIM) + u);
        *reinterpret_cast<kvk_v16*>(sK + j * kStride + u * 8) = v;
    }
}

KVK_INLINE void mma(float (&acc)[4], const kvk_u32 (&a)[4], const kvk_u32 (&b)[2])
{
#if INPUT_BF16
    kvk_mma_m16n8k16_bf16(acc, a, b);
#else
    kvk_mma_m16n8k16_f16(acc, a, b);
#endif
}

// The warp's 16 x 64 dot products: acc[nt][c] is row (lane >> 2) + 8 * (c >> 1), key nt * 8 + 2 * (lane & 3) + (c & 1).
KVK_INLINE void warp_logits(const kvk_u16* sQ, const kvk_u16* sK, int warp, int lane, float (&acc)[8][4])
{
    KVK_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
        KVK_UNROLL
        for (int c = 0; c < 4; ++c) acc[nt][c] = 0.0f;
    }
    const kvk_u16* aRow = sQ + (warp * 16 + (lane & 15)) * kStride + (lane >> 4) * 8;
    const kvk_u16* bRow = sK + ((lane >> 4) * 8 + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;
    KVK_UNROLL
    for (int k0 = 0; k0 < kDimPad; k0 += 16) {
        kvk_u32 a[4];
        kvk_ldmatrix_x4(a, aRow + k0);
        KVK_UNROLL
        for (int pair = 0; pair < 4; ++pair) {
            kvk_u32 bb[4];
            kvk_ldmatrix_x4(bb, bRow + pair * 16 * kStride + k0);
            const kvk_u32 b0[2] = {bb[0], bb[1]};
            const kvk_u32 b1[2] = {bb[2], bb[3]};
            mma(acc[2 * pair], a, b0);
            mma(acc[2 * pair + 1], a, b1);
        }
    }
}

// The largest last-visible key over the warp's rows (warp-uniform).
KVK_INLINE int warp_max(int x)
{
    KVK_UNROLL
    for (int mask = 16; mask >= 1; mask >>= 1) x = kvk_max(x, __shfl_xor_sync(0xFFFFFFFFu, x, mask));
    return x;
}

}  // namespace kvk_scores

using namespace kvk_scores;

extern "C" __global__ __launch_bounds__(256, 3) void selection_norms_append(
    const kvk_u16* __restrict__ keys, const kvk_u16* __restrict__ values, const kvk_i32* __restrict__ slots,
    float* __restrict__ keyNorms, float* __restrict__ valueNorms,
    kvk_i32 numTokens, kvk_i32 numKvHeads, kvk_i32 headDim, kvk_i64 keyTokenStride, kvk_i64 valueTokenStride,
    kvk_i32 keyKind, kvk_i32 valueKind)
{
    if (numTokens <= 0 || numKvHeads <= 0 || headDim < 8) return;
    const bool withKeys = keys != nullptr && keyNorms != nullptr, withValues = values != nullptr && valueNorms != nullptr;
    const kvk_u32 items = (kvk_u32)numTokens * (kvk_u32)numKvHeads;   // < 2^31 (host)
    const int lane = (int)(threadIdx.x & 31), sub = lane & 7, group = lane >> 3;
    const kvk_u32 warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, warps = (gridDim.x * blockDim.x) >> 5;
    const int vecs = headDim / 8;
    const kvk_fastdiv headDiv((kvk_u32)numKvHeads);

    // The loop bound is warp-uniform (4 items per warp per step), so every lane reaches the shuffles.
    for (kvk_u64 base = (kvk_u64)warp * 4; base < items; base += (kvk_u64)warps * 4) {
        const kvk_u64 item = base + group;
        kvk_u32 t = 0, h = 0;
        kvk_i32 slot = -1;
        if (item < items) {
            headDiv.divmod((kvk_u32)item, t, h);
            slot = kvk_ldg_i32(slots + t);
        }
        const bool live = slot >= 0;
        const kvk_v16* krow = live && withKeys ? reinterpret_cast<const kvk_v16*>(keys + t * keyTokenStride + (kvk_i64)h * headDim) : nullptr;
        const kvk_v16* vrow = live && withValues ? reinterpret_cast<const kvk_v16*>(values + t * valueTokenStride + (kvk_i64)h * headDim) : nullptr;
        norm_lane k, v;
        lane_norms(krow, vrow, vecs, sub, keyKind, valueKind, k, v);
        const float kn = finish_norm(group_sum(k.fold()), keyKind);
        const float vn = finish_norm(group_sum(v.fold()), valueKind);
        if (!live || sub != 0) continue;
        const kvk_i64 out = (kvk_i64)slot * numKvHeads + h;
        if (withKeys) keyNorms[out] = kn;
        if (withValues) valueNorms[out] = vn;
    }
}

extern "C" __global__ __launch_bounds__(256, 3) void selection_norms_cache(
    const kvk_u16* __restrict__ keys, const kvk_u16* __restrict__ values, const kvk_i32* __restrict__ lengths,
    const kvk_i32* __restrict__ blockTable, float* __restrict__ keyNorms, float* __restrict__ valueNorms,
    kvk_i32 rows, kvk_i32 numKvHeads, kvk_i32 headDim, kvk_i32 maxTokens, kvk_i32 pageSize, kvk_i32 maxPagesPerSeq,
    kvk_i32 layoutHnd, kvk_i32 keyKind, kvk_i32 valueKind)
{
    if (rows <= 0 || numKvHeads <= 0 || maxTokens <= 0 || headDim < 8) return;
    const bool withKeys = keys != nullptr && keyNorms != nullptr, withValues = values != nullptr && valueNorms != nullptr;
    const kvk_u32 items = (kvk_u32)rows * (kvk_u32)numKvHeads * (kvk_u32)maxTokens;   // < 2^31 (host)
    const int lane = (int)(threadIdx.x & 31), sub = lane & 7, group = lane >> 3;
    const kvk_u32 warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, warps = (gridDim.x * blockDim.x) >> 5;
    const int vecs = headDim / 8;
    const kvk_fastdiv tokenDiv((kvk_u32)maxTokens), headDiv((kvk_u32)numKvHeads);
    const kv_address kv(blockTable, pageSize, maxTokens, numKvHeads, maxPagesPerSeq, layoutHnd);

    // Items in output order: ((r * Hkv + h) * maxTokens + n); 4 per warp per step (warp-uniform bound).
    for (kvk_u64 base = (kvk_u64)warp * 4; base < items; base += (kvk_u64)warps * 4) {
        const kvk_u64 item = base + group;
        bool live = false;
        kvk_i64 row = 0;
        if (item < items) {
            kvk_u32 rh, n, r, h;
            tokenDiv.divmod((kvk_u32)item, rh, n);
            headDiv.divmod(rh, r, h);
            const kvk_i32 len = kvk_ldg_i32(lengths + r);
            live = (kvk_i32)n < len;
            if (live) row = kv.row((int)r, (int)n, (int)h);
        }
        const kvk_v16* krow = live && withKeys ? reinterpret_cast<const kvk_v16*>(keys + row * headDim) : nullptr;
        const kvk_v16* vrow = live && withValues ? reinterpret_cast<const kvk_v16*>(values + row * headDim) : nullptr;
        norm_lane k, v;
        lane_norms(krow, vrow, vecs, sub, keyKind, valueKind, k, v);
        const float kn = finish_norm(group_sum(k.fold()), keyKind);
        const float vn = finish_norm(group_sum(v.fold()), valueKind);
        if (item >= items || sub != 0) continue;
        // A position past the row's length gets 0 (the norm of nothing), so the output is fully defined.
        if (withKeys) keyNorms[item] = live ? kn : 0.0f;
        if (withValues) valueNorms[item] = live ? vn : 0.0f;
    }
}

extern "C" __global__ __launch_bounds__(256) void selection_pool(
    const float* __restrict__ input, float* __restrict__ output, const kvk_i32* __restrict__ lengths,
    kvk_i32 rows, kvk_i32 length, kvk_i32 rowsPerLength, kvk_i32 kernelSize, kvk_i32 isMax)
{
    if (rows <= 0 || length <= 0 || kernelSize < 1 || rowsPerLength < 1) return;
    const kvk_u32 items = (kvk_u32)rows * (kvk_u32)length;   // < 2^31 (host)
    const kvk_fastdiv lengthDiv((kvk_u32)length), groupDiv((kvk_u32)rowsPerLength);
    const int half = kernelSize / 2;
    const float divisor = (float)kernelSize;
    for (kvk_u32 item = blockIdx.x * blockDim.x + threadIdx.x; item < items; item += gridDim.x * blockDim.x) {
        kvk_u32 r, j;
        lengthDiv.divmod(item, r, j);
        const int len = lengths != nullptr ? kvk_min(kvk_max(kvk_ldg_i32(lengths + groupDiv.div(r)), 0), length) : length;
        float out = 0.0f;
        if ((int)j < len) {
            const float* x = input + (kvk_i64)r * length;
            const int lo = kvk_max((int)j - half, 0), hi = kvk_min((int)j + half, len - 1);
            if (isMax) {
                float m = neg_inf();
                for (int t = lo; t <= hi; ++t) {
                    const float value = x[t];
                    m = value > m ? value : m;
                }
                out = m;
            } else {
                float s = 0.0f;
                for (int t = lo; t <= hi; ++t) s = s + x[t];
                out = s / divisor;
            }
        }
        output[item] = out;
    }
}

extern "C" __global__ __launch_bounds__(128, 4) void selection_window_partials(
    const kvk_u16* __restrict__ query, const kvk_u16* __restrict__ keys, const kvk_i32* __restrict__ lengths,
    const kvk_i32* __restrict__ blockTable, float* __restrict__ partials,
    kvk_i32 batch, kvk_i32 window, kvk_i32 numQueryHeads, kvk_i32 numKvHeads, kvk_i32 maxTokens, kvk_i32 pageSize,
    kvk_i32 maxPagesPerSeq, kvk_i32 layoutHnd, kvk_i32 causal, float scaleLog2, kvk_i32 splits, kvk_i32 rowTiles,
    kvk_i32 sharedBytes)
{
    if (sharedBytes != kPartialsShared || (int)blockDim.x != kThreads) __trap();
    KVK_DYNAMIC_SHARED(kvk_u8, smem);
    kvk_u16* const sQ = reinterpret_cast<kvk_u16*>(smem);
    kvk_u16* const sK = reinterpret_cast<kvk_u16*>(smem + kStageBytes);

    const window_problem p(query, keys, blockTable, window, numQueryHeads, numKvHeads, maxTokens, pageSize, maxPagesPerSeq,
                           layoutHnd, causal);
    const int rowTile = (int)(blockIdx.x % (kvk_u32)rowTiles), bh = (int)(blockIdx.x / (kvk_u32)rowTiles);
    const int b = bh / numKvHeads, kvh = bh - b * numKvHeads, split = (int)blockIdx.y;
    if (b >= batch) return;
    const int len = kvk_ldg_i32(lengths + b);
    const int chunk = ((len + splits - 1) / splits + kKeys - 1) / kKeys * kKeys;
    const int begin = kvk_min(len, split * chunk), end = kvk_min(len, begin + chunk);
    const int R0 = rowTile * kRows;

    const int warp = (int)(threadIdx.x >> 5), lane = (int)(threadIdx.x & 31);
    const int rowA = R0 + warp * 16 + (lane >> 2), rowB = rowA + 8;
    const int visA = p.last_visible(rowA, len), visB = p.last_visible(rowB, len);
    const int warpVisible = warp_max(kvk_max(visA, visB));

    stage_queries(p, sQ, b, kvh, R0);
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
    for (int n0 = begin; n0 < end; n0 += kKeys) {
        __syncthreads();   // the previous tile is consumed (and, the first time, the queries are staged)
        stage_keys(p, sK, b, kvh, n0, end);
        __syncthreads();
        if (n0 > warpVisible) continue;   // warp-uniform: no row of this warp sees a key of the tile
        float acc[8][4];
        warp_logits(sQ, sK, warp, lane, acc);
        KVK_UNROLL
        for (int h = 0; h < 2; ++h) {
            // Keys this row sees: n <= last (its causal limit, and the split's end).
            const int last = kvk_min(h == 0 ? visA : visB, end - 1);
            const int first = n0 + 2 * (lane & 3);
            float mx = neg_inf();
            KVK_UNROLL
            for (int nt = 0; nt < 8; ++nt) {
                KVK_UNROLL
                for (int c = 0; c < 2; ++c) {
                    const float value = acc[nt][2 * h + c] * scaleLog2;
                    if (first + nt * 8 + c <= last && value > mx) mx = value;
                }
            }
            mx = kvk_max(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
            mx = kvk_max(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
            const float mNew = kvk_max(m[h], mx);
            if (mNew == neg_inf()) continue;   // nothing visible to this row yet (uniform over the quad; no shuffles follow)
            float sum = 0.0f;
            KVK_UNROLL
            for (int nt = 0; nt < 8; ++nt) {
                KVK_UNROLL
                for (int c = 0; c < 2; ++c)
                    if (first + nt * 8 + c <= last) sum += kvk_ex2(acc[nt][2 * h + c] * scaleLog2 - mNew);
            }
            l[h] = l[h] * kvk_ex2(m[h] - mNew) + sum;   // m[h] = -inf the first time: 2^-inf = 0
            m[h] = mNew;
        }
    }
    KVK_UNROLL
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xFFFFFFFFu, l[h], 1);
        l[h] += __shfl_xor_sync(0xFFFFFFFFu, l[h], 2);
    }
    if ((lane & 3) != 0) return;
    float* out = partials + ((kvk_i64)bh * splits + split) * p.rowsTotal * 2;
    if (rowA < p.rowsTotal) {
        out[2 * (kvk_i64)rowA] = m[0];
        out[2 * (kvk_i64)rowA + 1] = l[0];
    }
    if (rowB < p.rowsTotal) {
        out[2 * (kvk_i64)rowB] = m[1];
        out[2 * (kvk_i64)rowB + 1] = l[1];
    }
}

extern "C" __global__ __launch_bounds__(256) void selection_window_lse(
    const float* __restrict__ partials, float* __restrict__ lse, kvk_i32 groups, kvk_i32 rowsTotal, kvk_i32 splits)
{
    const kvk_u32 items = (kvk_u32)groups * (kvk_u32)rowsTotal;   // < 2^31 (host)
    const kvk_fastdiv rowDiv((kvk_u32)(rowsTotal > 0 ? rowsTotal : 1));
    for (kvk_u32 item = blockIdx.x * blockDim.x + threadIdx.x; item < items; item += gridDim.x * blockDim.x) {
        kvk_u32 bh, R;
        rowDiv.divmod(item, bh, R);
        const float* in = partials + (kvk_i64)bh * splits * rowsTotal * 2 + 2 * (kvk_i64)R;
        const kvk_i64 step = 2 * (kvk_i64)rowsTotal;
        float M = neg_inf();
        for (int s = 0; s < splits; ++s) M = kvk_max(M, in[s * step]);
        float result = pos_inf();   // a row that sees no key: every p of pass 2 is then 2^-inf = 0
        if (M != neg_inf()) {
            float total = 0.0f;
            for (int s = 0; s < splits; ++s) total += in[s * step + 1] * kvk_ex2(in[s * step] - M);
            result = M + kvk_lg2(total);
        }
        lse[item] = result;
    }
}

extern "C" __global__ __launch_bounds__(128, 4) void selection_window_scores(
    const kvk_u16* __restrict__ query, const kvk_u16* __restrict__ keys, const kvk_i32* __restrict__ lengths,
    const kvk_i32* __restrict__ blockTable, const float* __restrict__ lse, float* __restrict__ scores,
    kvk_i32 batch, kvk_i32 window, kvk_i32 numQueryHeads, kvk_i32 numKvHeads, kvk_i32 maxTokens, kvk_i32 pageSize,
    kvk_i32 maxPagesPerSeq, kvk_i32 layoutHnd, kvk_i32 causal, float scaleLog2, kvk_i32 windowReduce,
    kvk_i32 groupReduce, kvk_i32 keyTiles, kvk_i32 sharedBytes)
{
    if (sharedBytes != kScoresShared || (int)blockDim.x != kThreads) __trap();
    KVK_DYNAMIC_SHARED(kvk_u8, smem);
    kvk_u16* const sQ = reinterpret_cast<kvk_u16*>(smem);
    kvk_u16* const sK = reinterpret_cast<kvk_u16*>(smem + kStageBytes);
    float* const sP = reinterpret_cast<float*>(smem + 2 * kStageBytes);

    const window_problem p(query, keys, blockTable, window, numQueryHeads, numKvHeads, maxTokens, pageSize, maxPagesPerSeq,
                           layoutHnd, causal);
    const int tile = (int)(blockIdx.x % (kvk_u32)keyTiles), bh = (int)(blockIdx.x / (kvk_u32)keyTiles);
    const int b = bh / numKvHeads, kvh = bh - b * numKvHeads;
    if (b >= batch) return;
    const int len = kvk_ldg_i32(lengths + b);
    const int n0 = tile * kKeys;
    const int tid = (int)threadIdx.x;
    const int column = n0 + tid;
    const bool perHead = groupReduce == kReduceNone;
    const int g = p.group;

    // Output rows: (b, kvh) with a group reduction, or each query head (b, kvh * g + hh) without.
    auto out_row = [&](int hh) -> float* {
        const kvk_i64 r = perHead ? (kvk_i64)b * numQueryHeads + (kvk_i64)kvh * g + hh : (kvk_i64)bh;
        return scores + r * maxTokens;
    };

    if (n0 >= len) {   // CTA-uniform: no key of the tile exists
        if (tid < kKeys && column < maxTokens) {
            if (perHead) {
                for (int hh = 0; hh < g; ++hh) out_row(hh)[column] = 0.0f;
            } else {
                out_row(0)[column] = 0.0f;
            }
        }
        return;
    }

    stage_keys(p, sK, b, kvh, n0, len);
    const int warp = tid >> 5, lane = tid & 31;
    const float* rowLse = lse + (kvk_i64)bh * p.rowsTotal;
    float headAcc = 0.0f, groupAcc = 0.0f;   // p >= 0, so 0 is also the identity of max
    int head = 0, headEnd = window;

    for (int R0 = 0; R0 < p.rowsTotal; R0 += kRows) {
        __syncthreads();   // the previous block's probabilities are folded; sQ and sP are free
        stage_queries(p, sQ, b, kvh, R0);
        __syncthreads();
        const int rowA = R0 + warp * 16 + (lane >> 2), rowB = rowA + 8;
        const int visA = p.last_visible(rowA, len), visB = p.last_visible(rowB, len);
        const int warpVisible = warp_max(kvk_max(visA, visB));
        float* const pA = sP + (warp * 16 + (lane >> 2)) * kPStride + 2 * (lane & 3);
        float* const pB = pA + 8 * kPStride;
        if (n0 > warpVisible) {   // warp-uniform: every p of these rows is 0
            KVK_UNROLL
            for (int nt = 0; nt < 8; ++nt) {
                pA[nt * 8] = pA[nt * 8 + 1] = 0.0f;
                pB[nt * 8] = pB[nt * 8 + 1] = 0.0f;
            }
        } else {
            float acc[8][4];
            warp_logits(sQ, sK, warp, lane, acc);
            const float lseA = rowA < p.rowsTotal ? rowLse[rowA] : pos_inf();
            const float lseB = rowB < p.rowsTotal ? rowLse[rowB] : pos_inf();
            KVK_UNROLL
            for (int nt = 0; nt < 8; ++nt) {
                KVK_UNROLL
                for (int c = 0; c < 2; ++c) {
                    const int n = n0 + nt * 8 + 2 * (lane & 3) + c;
                    pA[nt * 8 + c] = n <= visA ? kvk_ex2(acc[nt][c] * scaleLog2 - lseA) : 0.0f;
                    pB[nt * 8 + c] = n <= visB ? kvk_ex2(acc[nt][2 + c] * scaleLog2 - lseB) : 0.0f;
                }
            }
        }
        __syncthreads();
        if (tid < kKeys) {
            const int rows = kvk_min<int>(kRows, p.rowsTotal - R0);
            for (int r = 0; r < rows; ++r) {
                if (R0 + r == headEnd) {   // head boundary: fold the finished head into the group
                    const float value = windowReduce == kReduceMean ? headAcc / (float)window : headAcc;
                    if (perHead) {
                        if (column < maxTokens) out_row(head)[column] = value;
                    } else {
                        groupAcc = groupReduce == kReduceMax ? (value > groupAcc ? value : groupAcc) : groupAcc + value;
                    }
                    headAcc = 0.0f;
                    ++head;
                    headEnd += window;
                }
                const float pr = sP[r * kPStride + tid];
                headAcc = windowReduce == kReduceMax ? (pr > headAcc ? pr : headAcc) : headAcc + pr;
            }
        }
    }
    if (tid >= kKeys || column >= maxTokens) return;
    // The last head ends with the rows.
    const float value = windowReduce == kReduceMean ? headAcc / (float)window : headAcc;
    if (perHead) {
        out_row(head)[column] = value;
        return;
    }
    groupAcc = groupReduce == kReduceMax ? (value > groupAcc ? value : groupAcc) : groupAcc + value;
    out_row(0)[column] = groupReduce == kReduceMean ? groupAcc / (float)g : groupAcc;
}
