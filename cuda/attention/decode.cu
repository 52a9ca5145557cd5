// decode.cu — fused decode attention over a KV cache (q_len 1..16, GQA/MQA/MHA), its split-KV combine,
// and the standalone merge of two attention states.
//
//   attention_decode        the op of DecodeAttentionSpec (src/KvKernels/Attention/DecodeAttentionSpec.cs):
//                           visibility (causal inside the q_len new tokens, sliding window + sink tokens),
//                           scale, soft-cap tanh, ALiBi, on-the-fly RoPE of the keys, key reuse (V := the
//                           un-rotated K), ragged rows, contiguous and paged NHD/HND storage. With splits == 1
//                           it writes the output (and the natural-log LSE when asked); with splits > 1 each
//                           split writes its fp32 normalised partial output and natural-log LSE to the
//                           workspace (an empty split writes zeros and -inf).
//   attention_decode_mma    the same op on tensor cores (query rows packed into the MMA's M dimension), for the
//                           specializations without RoPE and with Dk, Dv multiples of 16 up to 256 (a trapping
//                           stub in the others); same arguments, same split workspace. See its own comment.
//   attention_merge_splits  combines the splits' partials into the output type and the optional LSE.
//   attention_merge_states  MergeStatesSpec: two (output, LSE) states -> one, element type OUT_TYPE.
//
// Compile-time macros (defaults below): HEAD_DIM (Dk) and VALUE_DIM (Dv), multiples of 8 in 8..576;
// INPUT_BF16 (0 fp16 / 1 bf16 query, keys, values); OUT_TYPE (0 fp16, 1 bf16, 2 fp32 output; also the
// element type of attention_merge_states); PAGED (0 contiguous, 1 paged); KV_LAYOUT_HND (0 NHD, 1 HND);
// ROPE_STYLE (0 none, 1 rotate-half, 2 interleaved); KEY_REUSE (0/1: V is the first VALUE_DIM columns of K;
// needs VALUE_DIM <= HEAD_DIM).
// Everything that does not shape the loops is a run-time argument: window, sinks, scale, soft-cap, ALiBi
// (slopes pointer non-null), explicit RoPE positions (positions pointer non-null), rotary dim and theta.
//
// Work decomposition (research/kernel_techniques.md §1.4, §1.7, §1.9):
// - One CTA of 4 warps per (storage row, KV head, split, query-row tile). The query rows of a KV head are
//   the q_len x group (token, head) pairs, packed row p = token * group + head-in-group. A CTA holds
//   (4 / tokenStreams) x kRows of them; when a KV head has more rows than that, further row tiles go to
//   other CTAs, and EACH ROW TILE RE-READS THE KV CHUNK (from L2 when the tiles run together: they are
//   adjacent in blockIdx.x). Up to 16 rows (8 for head dims > 256) share every K/V byte loaded from HBM.
// - tokenStreams (1, 2 or 4, chosen by the host) splits the warps between row groups and token streams:
//   with few rows (MHA decode: 1 row per KV head) the 4 warps take different tokens of each tile and
//   their softmax states are merged through shared memory at the end.
// - K and V tiles of kTile tokens go to shared memory with 16-byte cp.async.cg, double buffered: tile
//   k + 2 is in flight while tile k is computed. The block-table lookup for tile k + 2 is issued before
//   tile k is computed, so its latency hides behind the math. Tokens past the chunk are zero-filled
//   (src-size 0): unused cache slots may hold NaN and 0 * NaN would poison the output.
// - Only tokens some row of the CTA can see are streamed: with a window, the list is [0, sinks) followed
//   by [L - q_len - window + 1, L), and a split covers a contiguous chunk of that list, chunk =
//   ceil(count / splits) rounded up to the tile, computed here from the row's length (so a captured CUDA
//   graph stays valid when lengths change).
// - QK: lane (token t = lane % kKt, part = lane / kKt) dots its part of the key row with each of the
//   warp's rows (query in shared memory as fp32, pre-scaled), then the parts are summed with shuffles.
//   Key rows are padded so the 16-byte loads of a quarter warp hit 8 distinct bank groups.
// - Online softmax in base 2: logits * log2(e), p = ex2(s - m), guarded so a fully masked tile never
//   computes (-inf) - (-inf). fp32 accumulation throughout; the output is converted once.
// - PV: lane (token group, 16-byte column chunk) accumulates p * v for its chunk; p comes from the QK
//   lane of the token by a shuffle. Token groups are folded with shuffles at the end.
// - RoPE: after a tile lands, the CTA rotates it into an fp32 tile (rotating the 16-bit keys in place
//   would round them); the angle is the spec's fp32 product (float)pos * invFreq[i], with
//   invFreq[i] = (float)pow((double)theta, -2i / rotaryDim) and an accurate sincos (kvk_sincos_accurate:
//   angles reach 1e5 rad, where __sincosf is useless). With key reuse the raw 16-bit tile is the value tile.
// This kernel uses CUDA cores only; attention_decode_mma (below) is the tensor-core variant for many rows per KV head.
#include "common/kvk_types.cuh"
#include "common/kvk_index.cuh"
#include "common/kvk_fp16.cuh"
#include "common/kvk_vec.cuh"
#include "common/kvk_async.cuh"
#include "common/kvk_math.cuh"
#include "common/kvk_merge.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef VALUE_DIM
#define VALUE_DIM HEAD_DIM
#endif
#ifndef INPUT_BF16
#define INPUT_BF16 0
#endif
#ifndef OUT_TYPE
#define OUT_TYPE 0
#endif
#ifndef PAGED
#define PAGED 1
#endif
#ifndef KV_LAYOUT_HND
#define KV_LAYOUT_HND 0
#endif
#ifndef ROPE_STYLE
#define ROPE_STYLE 0
#endif
#ifndef KEY_REUSE
#define KEY_REUSE 0
#endif

static_assert(HEAD_DIM % 8 == 0 && HEAD_DIM >= 8 && HEAD_DIM <= 576, "HEAD_DIM must be a multiple of 8 in 8..576");
static_assert(VALUE_DIM % 8 == 0 && VALUE_DIM >= 8 && VALUE_DIM <= 576, "VALUE_DIM must be a multiple of 8 in 8..576");
static_assert(INPUT_BF16 == 0 || INPUT_BF16 == 1, "INPUT_BF16 must be 0 or 1");

#include "common/kvk_input.cuh"   // after INPUT_BF16 has its default
static_assert(OUT_TYPE >= 0 && OUT_TYPE <= 2, "OUT_TYPE must be 0 (fp16), 1 (bf16) or 2 (fp32)");
static_assert(PAGED == 0 || PAGED == 1, "PAGED must be 0 or 1");
static_assert(KV_LAYOUT_HND == 0 || KV_LAYOUT_HND == 1, "KV_LAYOUT_HND must be 0 or 1");
static_assert(ROPE_STYLE >= 0 && ROPE_STYLE <= 2, "ROPE_STYLE must be 0, 1 or 2");
static_assert(KEY_REUSE == 0 || KEY_REUSE == 1, "KEY_REUSE must be 0 or 1");
static_assert(KEY_REUSE == 0 || VALUE_DIM <= HEAD_DIM, "KEY_REUSE reads the first VALUE_DIM columns of the keys as values");

namespace kvk_attn {

#if INPUT_BF16
typedef kvk_bf16 in_t;
#else
typedef kvk_f16 in_t;
#endif

#if OUT_TYPE == 0
typedef kvk_f16 out_t;
#elif OUT_TYPE == 1
typedef kvk_bf16 out_t;
#else
typedef float out_t;
#endif

__host__ __device__ constexpr int pow2_floor(int x) { return x < 2 ? 1 : 2 * pow2_floor(x / 2); }
__host__ __device__ constexpr int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round16(int bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ constexpr int max_int(int a, int b) { return a < b ? b : a; }

// Row stride (in 16-byte units) of a key tile read by the QK lanes, >= units. A quarter warp's 8 lanes
// are min(8, kt) tokens x (8 / min(8, kt)) consecutive units; they hit 8 distinct 16-byte bank groups
// when stride % (2q) == q with q = max(1, 8 / kt) (an odd stride when 8 tokens share the quarter).
__host__ __device__ constexpr int padded_stride(int units, int kt)
{
    return units % (2 * (kt >= 8 ? 1 : 8 / kt)) == (kt >= 8 ? 1 : 8 / kt) ? units : padded_stride(units + 1, kt);
}

// The host (DecodeAttentionKernels.cs, DecodeLayout) computes the same numbers: keep them in step.
enum : int {
    kWarps = 4,
    kThreads = kWarps * 32,
    kDk = HEAD_DIM,
    kDv = VALUE_DIM,
    kRope = ROPE_STYLE != 0 ? 1 : 0,
    // Tokens per warp sub-tile: about 4 KB of K+V per warp sub-tile, 16 KB per stage.
    kTokenBytes = 2 * (kDk + (KEY_REUSE ? 0 : kDv)),
    kKt = clamp_int(pow2_floor(4096 / kTokenBytes), 2, 32),
    kTile = kWarps * kKt,                        // tokens per pipeline stage
    kLpt = 32 / kKt,                             // QK lanes per token
    kUnitElems = kRope ? 4 : 8,                  // key elements per 16-byte unit of the QK tile
    kKUnits = kDk / kUnitElems,
    kKStride = padded_stride(kKUnits, kKt),      // QK tile row stride (units)
    kKUnitsPerLane = ceil_div(kKUnits, kLpt),
    kRawUnits = kDk / 8,                         // 16-bit key row in 16-byte units
    kKStageStride = kRope ? kRawUnits : kKStride,
    kVUnits = kDv / 8,
    kTg = kVUnits <= 32 ? 32 / kVUnits : 1,      // PV token groups per warp
    kVpl = kVUnits <= 32 ? 1 : ceil_div(kVUnits, 32),   // PV column chunks per lane
    kVStride = KEY_REUSE ? kKStageStride : kVUnits,
    kPvSteps = ceil_div(kKt, kTg),
    kRows = (kDk > 256 || kDv > 256) ? 2 : 4,    // query rows per warp
    kMaxCtaRows = kWarps * kRows,
    // Shared memory (bytes), in this order; the merge scratch reuses the pipeline buffers.
    kQBytes = kMaxCtaRows * kDk * 4,
    kIdxBytes = 2 * kTile * 8,
    kPosBytes = kRope ? round16(2 * kTile * 4) : 0,
    kFreqBytes = kRope ? round16(kDk / 2 * 4) : 0,
    kKStageBytes = kTile * kKStageStride * 16,   // per stage
    kVStageBytes = KEY_REUSE ? 0 : kTile * kVUnits * 16,
    kRotBytes = kRope ? kTile * kKStride * 16 : 0,
    kPipeBytes = 2 * kKStageBytes + 2 * kVStageBytes + kRotBytes,
    kScratchBytes = round16(kMaxCtaRows * (kDv + 2) * 4),
    kSharedBytes = kQBytes + kIdxBytes + kPosBytes + kFreqBytes + max_int(kPipeBytes, kScratchBytes),
};

static_assert(kKt * kLpt == 32, "a warp sub-tile is kKt tokens x kLpt lanes");
static_assert(kTile <= kThreads, "one thread per token computes the tile's addresses");
static_assert(kDk / 2 <= 4 * kThreads, "RoPE frequency table");

KVK_INLINE float neg_inf() { return kvk_u32_as_f32(0xFF800000u); }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 8 inputs (one 16-byte vector) -> float.
KVK_INLINE void unpack8(const kvk_v16& v, float (&f)[8])
{
#if INPUT_BF16
    kvk_unpack_bf16x2(v.x, f[0], f[1]);
    kvk_unpack_bf16x2(v.y, f[2], f[3]);
    kvk_unpack_bf16x2(v.z, f[4], f[5]);
    kvk_unpack_bf16x2(v.w, f[6], f[7]);
#else
    kvk_unpack_f16x2(v.x, f[0], f[1]);
    kvk_unpack_f16x2(v.y, f[2], f[3]);
    kvk_unpack_f16x2(v.z, f[4], f[5]);
    kvk_unpack_f16x2(v.w, f[6], f[7]);
#endif
}

KVK_INLINE kvk_u32 pack_out(float lo, float hi)
{
#if OUT_TYPE == 1
    return kvk_pack_bf16x2(lo, hi);
#else
    return kvk_pack_f16x2(lo, hi);
#endif
}

// Stores 8 results at dst (16-byte aligned; 32-byte for fp32).
KVK_INLINE void store8(out_t* dst, const float (&f)[8])
{
#if OUT_TYPE == 2
    kvk_st(reinterpret_cast<kvk_v16*>(dst), kvk_v16{kvk_f32_as_u32(f[0]), kvk_f32_as_u32(f[1]), kvk_f32_as_u32(f[2]), kvk_f32_as_u32(f[3])});
    kvk_st(reinterpret_cast<kvk_v16*>(dst) + 1, kvk_v16{kvk_f32_as_u32(f[4]), kvk_f32_as_u32(f[5]), kvk_f32_as_u32(f[6]), kvk_f32_as_u32(f[7])});
#else
    kvk_st(reinterpret_cast<kvk_v16*>(dst), kvk_v16{pack_out(f[0], f[1]), pack_out(f[2], f[3]), pack_out(f[4], f[5]), pack_out(f[6], f[7])});
#endif
}

// Stores 4 results at dst (8-byte aligned; 16-byte for fp32).
KVK_INLINE void store4(out_t* dst, float a, float b, float c, float d)
{
#if OUT_TYPE == 2
    kvk_st(reinterpret_cast<kvk_v16*>(dst), kvk_v16{kvk_f32_as_u32(a), kvk_f32_as_u32(b), kvk_f32_as_u32(c), kvk_f32_as_u32(d)});
#else
    kvk_st(reinterpret_cast<kvk_v8*>(dst), kvk_v8{pack_out(a, b), pack_out(c, d)});
#endif
}

KVK_INLINE float out_to_float(out_t x)
{
#if OUT_TYPE == 0
    return kvk_f16_to_f32(x);
#elif OUT_TYPE == 1
    return kvk_bf16_to_f32(x);
#else
    return x;
#endif
}

KVK_INLINE out_t float_to_out(float x)
{
#if OUT_TYPE == 0
    return kvk_f32_to_f16(x);
#elif OUT_TYPE == 1
    return kvk_f32_to_bf16(x);
#else
    return x;
#endif
}

KVK_INLINE float warp_max(float x, int firstMask, int endMask)
{
    for (int mask = firstMask; mask < endMask; mask <<= 1) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, mask));
    return x;
}

KVK_INLINE float warp_sum(float x, int firstMask, int endMask)
{
    for (int mask = firstMask; mask < endMask; mask <<= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, mask);
    return x;
}

// The visible token list of a CTA: [0, aEnd) then [bStart, length); position e of the list is token
// e < aEnd ? e : bStart + (e - aEnd).
struct token_list {
    int aEnd, bStart, count;

    KVK_INLINE token_list(int length, int queryLength, int window, int sinks)
    {
        bStart = 0;
        aEnd = 0;
        if (window > 0) {
            // The first query token (index length - queryLength) sees keys from its index - window + 1 on.
            const kvk_i64 first = (kvk_i64)length - queryLength - window + 1;
            bStart = first > 0 ? (int)first : 0;
            aEnd = kvk_min(sinks, bStart);
        }
        count = aEnd + (length - bStart);
    }

    KVK_INLINE int token(int e) const { return e < aEnd ? e : bStart + (e - aEnd); }
};

// A CTA's place in the grid and the constants of its (storage row, KV head). blockIdx.x =
// ((b * Hkv + kvh) * splits + split) * rowTiles + rowTile: the row tiles of one KV chunk are neighbours, so
// their re-reads of it come from L2. Query rows are packed p = token * group + head-in-group.
struct decode_cta {
    int rowTile, split, kvh, b;
    int queryLength, numQueryHeads, group, packedRows, storageRow;

    KVK_INLINE decode_cta(int splits, int rowTiles, int queryLength_, int numQueryHeads_, int numKvHeads, int ragged)
    {
        kvk_u32 flat = blockIdx.x;
        rowTile = (int)(flat % (kvk_u32)rowTiles);
        flat /= (kvk_u32)rowTiles;
        split = (int)(flat % (kvk_u32)splits);
        flat /= (kvk_u32)splits;
        kvh = (int)(flat % (kvk_u32)numKvHeads);
        b = (int)(flat / (kvk_u32)numKvHeads);
        queryLength = queryLength_;
        numQueryHeads = numQueryHeads_;
        group = numQueryHeads / numKvHeads;
        packedRows = queryLength * group;
        storageRow = ragged ? b * numKvHeads + kvh : b;
    }

    // The row's cached length, clamped to [0, maxTokens] (only for b < batch).
    KVK_INLINE int length(const kvk_i32* lengths, int maxTokens) const
    {
        return kvk_max(0, kvk_min(kvk_ldg_i32(lengths + storageRow), maxTokens));
    }

    // Index of packed row pr in the [batch][queryLength][numQueryHeads] query and output rows.
    KVK_INLINE kvk_i64 global_row(int pr) const
    {
        return ((kvk_i64)b * queryLength + pr / group) * numQueryHeads + (kvh * group + pr % group);
    }

    // Packed row pr's query index in the sequence (-1: a padding row sees nothing) and ALiBi slope.
    KVK_INLINE void row_constants(int pr, int length, const float* alibiSlopes, int& qIndex, float& slope) const
    {
        qIndex = -1;
        slope = 0.0f;
        if (pr < packedRows) {
            qIndex = length - queryLength + pr / group;
            if (alibiSlopes != nullptr) slope = alibiSlopes[kvh * group + pr % group];
        }
    }
};

// This split's chunk [begin, end) of the visible token list (chunk = ceil(count / splits) rounded up to the
// tile) and its number of tiles.
struct decode_chunk {
    token_list list;
    int begin, end, tiles;

    KVK_INLINE decode_chunk(const token_list& list_, int split, int splits, int tile) : list(list_)
    {
        const kvk_i64 chunk = ((kvk_i64)ceil_div(list.count, splits) + tile - 1) / tile * tile;
        begin = (int)kvk_min<kvk_i64>(list.count, split * chunk);
        end = (int)kvk_min<kvk_i64>(list.count, begin + chunk);
        tiles = ceil_div(end - begin, tile);
    }
};

// Storage row (in head rows of Dk or Dv elements) of list position e, or -1 past the chunk; with RoPE also
// the token's position (explicit or its index).
struct kv_locator {
    token_list list;
    int end, storageRow, kvh, poolKvHeads, maxTokens, slotsPerPage;
    const kvk_i32* positions;
#if PAGED
    kvk_fastdiv pageDiv;
    const kvk_i32* table;
#endif

    KVK_INLINE kv_locator(const decode_cta& cta, const decode_chunk& chunk, const kvk_i32* blockTable, const kvk_i32* positions_,
                          int poolKvHeads_, int maxTokens_, int pageSize, int maxPagesPerSeq)
        : list(chunk.list), end(chunk.end), storageRow(cta.storageRow), kvh(cta.kvh), poolKvHeads(poolKvHeads_),
          maxTokens(maxTokens_), positions(positions_)
#if PAGED
          , pageDiv((kvk_u32)pageSize), table(blockTable + (kvk_i64)cta.storageRow * maxPagesPerSeq)
#endif
    {
#if PAGED
        slotsPerPage = pageSize;
#else
        (void)blockTable; (void)pageSize; (void)maxPagesPerSeq;
        slotsPerPage = maxTokens;
#endif
    }

    KVK_INLINE kvk_i64 operator()(int e, int& pos) const
    {
        pos = 0;
        if (e >= end) return -1;
        const int n = list.token(e);
        // The storage head is derived here, where it is used: computed up front (live from the kernel's start)
        // it cost attention_decode_mma a spill at Dk = Dv = 256 and attention_decode 9 registers on sm_90.
        const int storageHead = poolKvHeads == 1 ? 0 : kvh;
#if ROPE_STYLE != 0
        pos = positions != nullptr ? kvk_ldg_i32(positions + (kvk_i64)storageRow * maxTokens + n) : n;
#endif
#if PAGED
        kvk_u32 pageIndex, offset;
        pageDiv.divmod((kvk_u32)n, pageIndex, offset);
        const kvk_i64 page = kvk_ldg_i32(table + pageIndex);
#else
        const kvk_i64 page = storageRow;
        const kvk_u32 offset = (kvk_u32)n;
#endif
#if KV_LAYOUT_HND
        return (page * poolKvHeads + storageHead) * slotsPerPage + offset;
#else
        return (page * slotsPerPage + offset) * poolKvHeads + storageHead;
#endif
    }
};

// The double-buffered K/V stages of a CTA of Threads threads (0: the run-time `threads`): stage s holds Tile tokens, key rows of KStride
// and value rows of VStride 16-byte units (a raw 16-bit row is kDk / 8 or kDv / 8 units; the rest is
// padding), and the tokens' storage rows (and RoPE positions, tokenPos null without RoPE) live in
// rowIndex[s] (tokenPos[s]).
template <int Tile, int Threads, int KStride, int VStride>
struct kv_stages {
    enum : int {
        kStageBytes = Tile * KStride * 16,
        vStageBytes = KEY_REUSE ? 0 : Tile * VStride * 16,
    };
    kvk_i64* rowIndex;
    kvk_i32* tokenPos;
    kvk_u8* kStage;
    kvk_u8* vStage;
    int threads = Threads;

    KVK_INLINE int step() const { return Threads > 0 ? Threads : threads; }

    KVK_INLINE const kvk_u8* k_tile(int s) const { return kStage + s * kStageBytes; }
    // With key reuse the raw 16-bit key tile is the value tile.
    KVK_INLINE const kvk_u8* v_tile(int s) const { return KEY_REUSE ? k_tile(s) : vStage + s * vStageBytes; }

    // Thread tid (< Tile) records its token's storage row and position in stage s.
    KVK_INLINE void set_row(int s, int tid, kvk_i64 row, int pos) const
    {
        if (tid < Tile) {
            rowIndex[s * Tile + tid] = row;
            if (kRope) tokenPos[s * Tile + tid] = pos;
        }
    }

    // Issues the cp.asyncs of tile t (t < numTiles) into stage s from rowIndex[s]; always commits a group.
    // Tokens past the chunk (row -1) are zero-filled (src-size 0; see the file comment).
    KVK_INLINE void issue(int t, int s, int numTiles, const in_t* keys, const in_t* values, int tid) const
    {
        if (t < numTiles) {
            const kvk_i64* idx = rowIndex + s * Tile;
            kvk_u8* kDst = kStage + s * kStageBytes;
            for (int c = tid; c < Tile * (kDk / 8); c += step()) {
                const int token = c / (kDk / 8), u = c % (kDk / 8);
                const kvk_i64 row = idx[token];
                const in_t* src = row >= 0 ? keys + row * kDk + u * 8 : keys;
                kvk_cp_async_cg16(kDst + (token * KStride + u) * 16, src, row >= 0 ? 16u : 0u);
            }
#if !KEY_REUSE
            kvk_u8* vDst = vStage + s * vStageBytes;
            for (int c = tid; c < Tile * (kDv / 8); c += step()) {
                const int token = c / (kDv / 8), u = c % (kDv / 8);
                const kvk_i64 row = idx[token];
                const in_t* src = row >= 0 ? values + row * kDv + u * 8 : values;
                kvk_cp_async_cg16(vDst + (token * VStride + u) * 16, src, row >= 0 ? 16u : 0u);
            }
#else
            (void)values;
#endif
        }
        kvk_cp_async_commit();
    }

    // Prologue: the addresses of tiles 0 and 1 (list positions from `begin`), then their loads.
    KVK_INLINE void start(const kv_locator& locate, int begin, int numTiles, const in_t* keys, const in_t* values, int tid) const
    {
        KVK_UNROLL
        for (int s = 0; s < 2; ++s) {
            if (tid < Tile) {
                int pos;
                const kvk_i64 row = locate(begin + s * Tile + tid, pos);
                set_row(s, tid, row, pos);
            }
        }
        __syncthreads();
        issue(0, 0, numTiles, keys, values, tid);
        issue(1, 1, numTiles, keys, values, tid);
    }
};

// Base-2 logit of a key (index n, raw score already scaled) for a row with query index qIndex, or -inf where
// the row cannot see it: soft-cap, ALiBi bias, then causality, the window and the sinks.
KVK_INLINE float logit2(float score, int n, bool inChunk, int qIndex, float slope, bool alibi, float softCap, int window, int sinks)
{
    if (softCap > 0.0f) score = softCap * tanhf(score / softCap);
    if (alibi) score -= slope * (float)(qIndex - n);
    const bool visible = inChunk && n <= qIndex && (window == 0 || n < sinks || qIndex - n < window);
    return visible ? score * kLog2e : neg_inf();
}

// The max to subtract in ex2: 0 while the row has seen nothing, so that (-inf) - (-inf) is never computed.
KVK_INLINE float max_for_ex2(float m) { return m == neg_inf() ? 0.0f : m; }

// Merges softmax state (m2, l2) into (m, l); the outputs are then o * a1 + o2 * a2.
KVK_INLINE void merge_state(float& m, float& l, float m2, float l2, float& a1, float& a2)
{
    const float mNew = fmaxf(m, m2);
    const float mUse = max_for_ex2(mNew);
    a1 = kvk_ex2(m - mUse);
    a2 = kvk_ex2(m2 - mUse);
    l = l * a1 + l2 * a2;
    m = mNew;
}

// A row's final state: the factor of its output (1 / (l * lScale), lScale the factor P carried) and its
// natural-log LSE; a row that saw nothing gets 0 and -inf.
struct row_result {
    float inv, lse;

    KVK_INLINE row_result(float m, float l, float lScale)
    {
        const bool empty = !(l > 0.0f);
        inv = empty ? 0.0f : 1.0f / (l * lScale);
        lse = empty ? neg_inf() : (m + kvk_lg2(l)) * kLn2;
    }
};

// The LSE of output row outRow: this split's partial LSE with splits > 1, else the optional LSE output.
KVK_INLINE void write_lse(float* lse, float* partialLse, int split, int splits, kvk_i64 outRows, kvk_i64 outRow, float value)
{
    if (splits > 1) partialLse[(kvk_i64)split * outRows + outRow] = value;
    else if (lse != nullptr) lse[outRow] = value;
}

// This split's fp32 partial output row outRow (splits > 1).
KVK_INLINE float* partial_row(float* partialOutput, int split, kvk_i64 outRows, kvk_i64 outRow)
{
    return partialOutput + ((kvk_i64)split * outRows + outRow) * kDv;
}

}  // namespace kvk_attn

using namespace kvk_attn;

extern "C" __global__ __launch_bounds__(128, 3) void attention_decode(
    const in_t* __restrict__ query, const in_t* __restrict__ keys, const in_t* __restrict__ values,
    const kvk_i32* __restrict__ lengths, const kvk_i32* __restrict__ blockTable, const kvk_i32* __restrict__ positions,
    const float* __restrict__ alibiSlopes, out_t* __restrict__ output, float* __restrict__ lse,
    float* __restrict__ partialOutput, float* __restrict__ partialLse,
    kvk_i32 batch, kvk_i32 queryLength, kvk_i32 numQueryHeads, kvk_i32 numKvHeads, kvk_i32 ragged, kvk_i32 poolKvHeads,
    kvk_i32 maxTokens, kvk_i32 pageSize, kvk_i32 maxPagesPerSeq,
    float scale, float softCap, kvk_i32 window, kvk_i32 sinks, kvk_i32 rotaryDim, float ropeTheta,
    kvk_i32 splits, kvk_i32 tokenStreams, kvk_i32 rowTiles, kvk_i32 sharedBytes)
{
    // The host sizes the dynamic shared memory from the same formula; a mismatch is a library bug.
    if (sharedBytes != kSharedBytes) __trap();
    KVK_DYNAMIC_SHARED(kvk_u8, smem);
    float* const qTile = reinterpret_cast<float*>(smem);                                     // [kMaxCtaRows][kDk]
    kvk_i64* const rowIndex = reinterpret_cast<kvk_i64*>(smem + kQBytes);                    // [2][kTile]
    kvk_i32* const tokenPos = reinterpret_cast<kvk_i32*>(smem + kQBytes + kIdxBytes);        // [2][kTile] (RoPE)
    float* const invFreq = reinterpret_cast<float*>(smem + kQBytes + kIdxBytes + kPosBytes); // [kDk / 2] (RoPE)
    kvk_u8* const pipe = smem + kQBytes + kIdxBytes + kPosBytes + kFreqBytes;
    // K stages [2][kTile][kKStageStride] units, then V stages [2][kTile][kVUnits] units.
    const kv_stages<kTile, kThreads, kKStageStride, kVUnits> stages{
        rowIndex, tokenPos, pipe, pipe + 2 * kKStageBytes};
    float* const kRot = reinterpret_cast<float*>(pipe + 2 * kKStageBytes + 2 * kVStageBytes);  // [kTile][kKStride] units

    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;

    const decode_cta cta(splits, rowTiles, queryLength, numQueryHeads, numKvHeads, ragged);
    if (cta.b >= batch) return;
    const int length = cta.length(lengths, maxTokens);
    const int split = cta.split, packedRows = cta.packedRows;

    const int rowGroups = kWarps / tokenStreams;
    const int ctaRows = rowGroups * kRows;
    const int rowBase = cta.rowTile * ctaRows;
    const int wr = warp / tokenStreams, wt = warp % tokenStreams;

    // ---- query rows -> shared memory, fp32, pre-multiplied by the scale (rows past the end are zeros)
    for (int c = tid; c < ctaRows * (kDk / 8); c += kThreads) {
        const int r = c / (kDk / 8), u = c % (kDk / 8);
        const int pr = rowBase + r;
        float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (pr < packedRows) {
            const in_t* q = query + cta.global_row(pr) * kDk + u * 8;
            unpack8(kvk_ld_nc(reinterpret_cast<const kvk_v16*>(q)), f);
            KVK_UNROLL
            for (int e = 0; e < 8; ++e) f[e] *= scale;
        }
        float* dst = qTile + r * kDk + u * 8;
        reinterpret_cast<float4*>(dst)[0] = make_float4(f[0], f[1], f[2], f[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
#if ROPE_STYLE != 0
    for (int i = tid; i < rotaryDim / 2; i += kThreads)
        invFreq[i] = (float)pow((double)ropeTheta, -2.0 * i / rotaryDim);
#endif

    // ---- this split's chunk of the visible token list
    const decode_chunk chunk(token_list(length, queryLength, window, sinks), split, splits, kTile);
    const token_list& list = chunk.list;
    const int eBegin = chunk.begin, eEnd = chunk.end, numTiles = chunk.tiles;

    // Per-row constants of this warp's rows (warp-uniform): the query's logical index and ALiBi slope.
    int qIndex[kRows];
    float slope[kRows];
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) cta.row_constants(rowBase + wr * kRows + r, length, alibiSlopes, qIndex[r], slope[r]);

    const kv_locator locate(cta, chunk, blockTable, positions, poolKvHeads, maxTokens, pageSize, maxPagesPerSeq);
    stages.start(locate, eBegin, numTiles, keys, values, tid);

    // Online softmax state of this warp's rows: m (base-2 max, warp-uniform), l (this lane's share of the
    // sum), o (this lane's column chunks).
    float m[kRows], l[kRows], o[kRows][kVpl][8];
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) {
        m[r] = neg_inf();
        l[r] = 0.0f;
        KVK_UNROLL
        for (int j = 0; j < kVpl; ++j)
            KVK_UNROLL
            for (int e = 0; e < 8; ++e) o[r][j][e] = 0.0f;
    }

    // Lane roles. QK: token qkToken of the sub-tile, key units qkPart + kLpt * u. PV: token group pvGroup,
    // column chunks pvChunk + 32 * j (lanes past kTg * kVUnits only compute what nobody reads).
    const int qkToken = lane % kKt, qkPart = lane / kKt;
    const int pvGroup = kTg > 1 ? lane / kVUnits : 0;
    const int pvChunk = kTg > 1 ? lane % kVUnits : lane;
#if ROPE_STYLE != 0
    const int halfRotary = rotaryDim / 2;
    const kvk_fastdiv halfDiv((kvk_u32)kvk_max(halfRotary, 1));
    const int plainDims = kDk - rotaryDim;
    const kvk_fastdiv plainDiv((kvk_u32)kvk_max(plainDims, 1));
#endif

    for (int k = 0; k < numTiles; ++k) {
        const int s = k & 1;
        // Address of tile k + 2, loaded now so that the table read overlaps this tile's math.
        kvk_i64 nextRow = -1;
        int nextPos = 0;
        if (tid < kTile) nextRow = locate(eBegin + (k + 2) * kTile + tid, nextPos);

        kvk_cp_async_wait_group<1>();   // tile k has landed (this thread's copies) ...
        __syncthreads();                // ... and everyone's

#if ROPE_STYLE != 0
        {
            // Rotate the 16-bit tile into the fp32 QK tile.
            const kvk_u16* raw = reinterpret_cast<const kvk_u16*>(stages.k_tile(s));
            const kvk_i32* pos = tokenPos + s * kTile;
            for (int c = tid; c < kTile * halfRotary; c += kThreads) {
                kvk_u32 token, i;
                halfDiv.divmod((kvk_u32)c, token, i);
                const float angle = __fmul_rn((float)pos[token], invFreq[i]);
                float sn, cs;
                kvk_sincos_accurate(angle, sn, cs);
                const int a = ROPE_STYLE == 1 ? (int)i : 2 * (int)i;
                const int bIdx = ROPE_STYLE == 1 ? (int)i + halfRotary : 2 * (int)i + 1;
                const float x = kvk_in_to_float(raw[token * kDk + a]), y = kvk_in_to_float(raw[token * kDk + bIdx]);
                float* dst = kRot + token * (kKStride * 4);
                dst[a] = x * cs - y * sn;
                dst[bIdx] = x * sn + y * cs;
            }
            for (int c = tid; c < kTile * plainDims; c += kThreads) {
                kvk_u32 token, d;
                plainDiv.divmod((kvk_u32)c, token, d);
                kRot[token * (kKStride * 4) + rotaryDim + (int)d] = kvk_in_to_float(raw[token * kDk + rotaryDim + (int)d]);
            }
            __syncthreads();
        }
        const kvk_u8* const qkTile = reinterpret_cast<const kvk_u8*>(kRot);
#else
        const kvk_u8* const qkTile = stages.k_tile(s);
#endif
        const kvk_u8* const pvTile = stages.v_tile(s);

        for (int sub = wt; sub < kWarps; sub += tokenStreams) {
            // ---- QK: this lane's part of token qkToken's dot product with each row
            const int tileToken = sub * kKt + qkToken;
            const int e = eBegin + k * kTile + tileToken;
            const bool inChunk = e < eEnd;
            const int n = list.token(e);
            float acc[kRows];
            KVK_UNROLL
            for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
            KVK_UNROLL
            for (int u = 0; u < kKUnitsPerLane; ++u) {
                const int unit = u * kLpt + qkPart;
                if (kKUnits % kLpt != 0 && unit >= kKUnits) break;
                const kvk_u8* kp = qkTile + (tileToken * kKStride + unit) * 16;
                float kf[kUnitElems];
#if ROPE_STYLE != 0
                const float4 k4 = *reinterpret_cast<const float4*>(kp);
                kf[0] = k4.x; kf[1] = k4.y; kf[2] = k4.z; kf[3] = k4.w;
#else
                unpack8(*reinterpret_cast<const kvk_v16*>(kp), kf);
#endif
                KVK_UNROLL
                for (int r = 0; r < kRows; ++r) {
                    const float* qp = qTile + (wr * kRows + r) * kDk + unit * kUnitElems;
                    KVK_UNROLL
                    for (int h = 0; h < kUnitElems / 4; ++h) {
                        const float4 q4 = reinterpret_cast<const float4*>(qp)[h];
                        acc[r] = fmaf(q4.x, kf[4 * h + 0], acc[r]);
                        acc[r] = fmaf(q4.y, kf[4 * h + 1], acc[r]);
                        acc[r] = fmaf(q4.z, kf[4 * h + 2], acc[r]);
                        acc[r] = fmaf(q4.w, kf[4 * h + 3], acc[r]);
                    }
                }
            }

            // ---- logits -> online softmax (every part lane of a token holds the same values)
            float p[kRows];
            KVK_UNROLL
            for (int r = 0; r < kRows; ++r) {
                const float t2 = logit2(warp_sum(acc[r], kKt, 32), n, inChunk, qIndex[r], slope[r], alibiSlopes != nullptr,
                                        softCap, window, sinks);
                const float mNew = fmaxf(m[r], warp_max(t2, 1, kKt));
                const float mUse = max_for_ex2(mNew);
                const float alpha = kvk_ex2(m[r] - mUse);
                p[r] = kvk_ex2(t2 - mUse);
                l[r] = l[r] * alpha + (qkPart == 0 ? p[r] : 0.0f);
                m[r] = mNew;
                KVK_UNROLL
                for (int j = 0; j < kVpl; ++j)
                    KVK_UNROLL
                    for (int x = 0; x < 8; ++x) o[r][j][x] *= alpha;
            }

            // ---- PV: p of token t lives in lane t
            KVK_UNROLL
            for (int step = 0; step < kPvSteps; ++step) {
                const int t = step * kTg + pvGroup;
                const int tc = kvk_min(t, kKt - 1);
                float pv[kRows];
                KVK_UNROLL
                for (int r = 0; r < kRows; ++r) {
                    pv[r] = __shfl_sync(0xFFFFFFFFu, p[r], tc);
                    if (kKt % kTg != 0 && t >= kKt) pv[r] = 0.0f;   // V is finite (zero-filled past the chunk)
                }
                KVK_UNROLL
                for (int j = 0; j < kVpl; ++j) {
                    const int chunkIndex = kvk_min(pvChunk + 32 * j, kVUnits - 1);
                    float vf[8];
                    unpack8(*reinterpret_cast<const kvk_v16*>(pvTile + ((sub * kKt + tc) * kVStride + chunkIndex) * 16), vf);
                    KVK_UNROLL
                    for (int r = 0; r < kRows; ++r)
                        KVK_UNROLL
                        for (int x = 0; x < 8; ++x) o[r][j][x] = fmaf(pv[r], vf[x], o[r][j][x]);
                }
            }
        }

        stages.set_row(s, tid, nextRow, nextPos);
        __syncthreads();   // stage s and its addresses are free
        stages.issue(k + 2, s, numTiles, keys, values, tid);
    }
    kvk_cp_async_wait_all();

    // ---- fold: l over the warp, o over the token groups (into lanes pvGroup == 0)
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) l[r] = warp_sum(l[r], 1, 32);
    if (kTg > 1) {
        KVK_UNROLL
        for (int r = 0; r < kRows; ++r)
            KVK_UNROLL
            for (int j = 0; j < kVpl; ++j)
                KVK_UNROLL
                for (int x = 0; x < 8; ++x) {
                    // Every shuffle reads the unfolded value: lane c gathers lanes c + g * kVUnits.
                    const float mine = o[r][j][x];
                    float sum = mine;
                    KVK_UNROLL
                    for (int g = 1; g < kTg; ++g) sum += __shfl_sync(0xFFFFFFFFu, mine, (lane + g * kVUnits) & 31);
                    o[r][j][x] = sum;
                }
    }
    // Lanes that own output columns: token group 0, chunks below kVUnits.
    const bool ownsColumns = pvGroup == 0 && pvChunk < kVUnits;

    // ---- merge the token streams of each row group (through shared memory; it reuses the pipeline buffers)
    if (tokenStreams > 1) {
        __syncthreads();   // every warp is done with the pipeline buffers
        float* const ml = reinterpret_cast<float*>(pipe);   // [kWarps * kRows][2]
        float* const so = ml + kMaxCtaRows * 2;              // [kWarps * kRows][kDv]
        KVK_UNROLL
        for (int r = 0; r < kRows; ++r) {
            const int slot = warp * kRows + r;
            if (lane == 0) {
                ml[slot * 2] = m[r];
                ml[slot * 2 + 1] = l[r];
            }
            KVK_UNROLL
            for (int j = 0; j < kVpl; ++j) {
                const int ch = pvChunk + 32 * j;
                if (ownsColumns && ch < kVUnits) {
                    float4* dst = reinterpret_cast<float4*>(so + slot * kDv + ch * 8);
                    dst[0] = make_float4(o[r][j][0], o[r][j][1], o[r][j][2], o[r][j][3]);
                    dst[1] = make_float4(o[r][j][4], o[r][j][5], o[r][j][6], o[r][j][7]);
                }
            }
        }
        __syncthreads();
        if (wt == 0) {
            for (int other = 1; other < tokenStreams; ++other) {
                KVK_UNROLL
                for (int r = 0; r < kRows; ++r) {
                    const int slot = (warp + other) * kRows + r;
                    float a1, a2;
                    merge_state(m[r], l[r], ml[slot * 2], ml[slot * 2 + 1], a1, a2);
                    KVK_UNROLL
                    for (int j = 0; j < kVpl; ++j) {
                        const int ch = kvk_min(pvChunk + 32 * j, kVUnits - 1);
                        const float4* src = reinterpret_cast<const float4*>(so + slot * kDv + ch * 8);
                        const float4 x0 = src[0], x1 = src[1];
                        const float add[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                        KVK_UNROLL
                        for (int x = 0; x < 8; ++x) o[r][j][x] = o[r][j][x] * a1 + add[x] * a2;
                    }
                }
            }
        }
    }
    if (wt != 0) return;

    // ---- results: o / l and the natural-log LSE, or this split's partial state
    const kvk_i64 outRows = (kvk_i64)batch * queryLength * numQueryHeads;
    KVK_UNROLL
    for (int r = 0; r < kRows; ++r) {
        const int pr = rowBase + wr * kRows + r;
        if (pr >= packedRows) break;
        const kvk_i64 outRow = cta.global_row(pr);
        const row_result res(m[r], l[r], 1.0f);
        KVK_UNROLL
        for (int j = 0; j < kVpl; ++j) {
            const int ch = pvChunk + 32 * j;
            if (!ownsColumns || ch >= kVUnits) continue;
            float f[8];
            KVK_UNROLL
            for (int x = 0; x < 8; ++x) f[x] = o[r][j][x] * res.inv;
            if (splits == 1) {
                store8(output + outRow * kDv + ch * 8, f);
            } else {
                float4* dst = reinterpret_cast<float4*>(partial_row(partialOutput, split, outRows, outRow) + ch * 8);
                dst[0] = make_float4(f[0], f[1], f[2], f[3]);
                dst[1] = make_float4(f[4], f[5], f[6], f[7]);
            }
        }
        if (lane == 0) write_lse(lse, partialLse, split, splits, outRows, outRow, res.lse);
    }
}

// ================================================================================================
// attention_decode_mma — the same op on tensor cores (mma.sync m16n8k16, fp32 accumulators), for the
// specializations KVK_DECODE_MMA admits (no RoPE; Dk and Dv multiples of 16 up to 256). The host picks it
// when a KV head has enough query rows to fill the MMA's M dimension (DecodeAttentionKernels.UsesTensorCores);
// in the other specializations it is a stub that traps.
// - Rows on M: the q_len x group rows of a KV head (row p = token * group + head) are packed 16 per warp
//   tile; a CTA holds (4 / tokenStreams) warp tiles, so up to 64 rows (MFA's 64 heads) share every K/V byte.
//   With fewer rows the warps split each stage's 16-token sub-tiles between token streams instead, merged
//   through shared memory at the end (a two-level tree: at most 2 warps' partial states in flight).
// - K and V stages as in attention_decode (cp.async double buffering, token list, split chunks), rows
//   padded by one 16-byte unit so ldmatrix's 8 row addresses hit 8 distinct bank groups.
// - QK: S (16 rows x 16 tokens) = Q K^T with the query in the input type (exact: no pre-scaling), A from
//   ldmatrix.x4 of the query tile, B from ldmatrix.x4 of the key rows; the scale is applied to S in fp32.
// - PV: the S accumulators are the A fragments of P (FA2's register reuse); V through ldmatrix.x4.trans.
//   P must be in the input type: P = sum of kPTerms terms, each the input-type rounding of what the
//   previous terms left (fp16: 11 bits each, bf16: 8), one MMA per term. kPTerms gives a relative error
//   of P below the output's tolerance: fp32 output 2 (fp16, 2^-22) or 3 (bf16, exact); fp16/bf16
//   output 1 (fp16) or 2 (bf16). fp16 P is scaled by 2^15 (p <= 1) so the low term stays out of the
//   subnormal range; the accumulators carry the factor and the final 1 / l removes it.
// ================================================================================================
#define KVK_DECODE_MMA (ROPE_STYLE == 0 && HEAD_DIM % 16 == 0 && HEAD_DIM <= 256 && \
                        VALUE_DIM % 16 == 0 && VALUE_DIM <= 256)
// attention_decode_mma_wide (see its comment): key reuse with a head past 256 (MLA's 576/512).
#define KVK_DECODE_WIDE (ROPE_STYLE == 0 && KEY_REUSE && HEAD_DIM % 16 == 0 && VALUE_DIM % 32 == 0 && \
                         VALUE_DIM <= 512 && (HEAD_DIM > 256 || VALUE_DIM > 256))
#if KVK_DECODE_MMA || KVK_DECODE_WIDE
#include "common/kvk_mma.cuh"
#endif

namespace kvk_attn_mma {
using namespace kvk_attn;

// The host (DecodeAttentionKernels.cs, DecodeMmaLayout) computes the same numbers: keep them in step.
enum : int {
    mWarps = 4,
    mThreads = mWarps * 32,
    mTokenBytes = 2 * (kDk + (KEY_REUSE ? 0 : kDv)),
    mSub = clamp_int(pow2_floor(16384 / (16 * mTokenBytes)), 1, 4),   // 16-token sub-tiles per stage (~16 KB)
    mTile = 16 * mSub,
    mQStride = kDk / 8 + 1,                      // 16-byte units per row, odd: conflict-free ldmatrix
    mKStride = kDk / 8 + 1,
    mVStride = KEY_REUSE ? mKStride : kDv / 8 + 1,
    mMaxCtaRows = mWarps * 16,
    mQBytes = mMaxCtaRows * mQStride * 16,
    mIdxBytes = 2 * mTile * 8,
    mKStageBytes = mTile * mKStride * 16,
    mVStageBytes = KEY_REUSE ? 0 : mTile * mVStride * 16,
    mPipeBytes = 2 * mKStageBytes + 2 * mVStageBytes,
    mScratchBytes = 2 * 16 * (kDv + 2) * 4,       // two warps' (o, m, l) in the token-stream merge
    mSharedBytes = mQBytes + mIdxBytes + max_int(mPipeBytes, mScratchBytes),
    mPTerms = OUT_TYPE == 2 ? (INPUT_BF16 ? 3 : 2) : (INPUT_BF16 ? 2 : 1),
    mTermsOuter = mPTerms > 2 && kDv > 128 ? 1 : 0,   // PV loops terms outside the columns (registers)
};

static_assert(mTile <= mThreads, "one thread per token computes the tile's addresses");

constexpr float kPScale = INPUT_BF16 ? 1.0f : 32768.0f;

#if KVK_DECODE_MMA || KVK_DECODE_WIDE
KVK_INLINE void mma16816(float (&acc)[4], const kvk_u32 (&a)[4], kvk_u32 b0, kvk_u32 b1)
{
    const kvk_u32 b[2] = {b0, b1};
#if INPUT_BF16
    kvk_mma_m16n8k16_bf16(acc, a, b);
#else
    kvk_mma_m16n8k16_f16(acc, a, b);
#endif
}

// The CTA's query rows rowBase .. rowBase + rows - 1 -> shared memory in the input type, `stride` 16-byte units
// per row (rows past the end are zeros), for the tensor-core kernels' ldmatrix.
KVK_INLINE void load_query_tile(kvk_u8* qTile, int stride, int rows, int rowBase, const decode_cta& cta, const in_t* query, int tid, int threads)
{
    for (int c = tid; c < rows * (kDk / 8); c += threads) {
        const int r = c / (kDk / 8), u = c % (kDk / 8);
        const int pr = rowBase + r;
        kvk_v16 v = {0u, 0u, 0u, 0u};
        if (pr < cta.packedRows) v = kvk_ld_nc(reinterpret_cast<const kvk_v16*>(query + cta.global_row(pr) * kDk + u * 8));
        *reinterpret_cast<kvk_v16*>(qTile + (r * stride + u) * 16) = v;
    }
}

// The next term of P: the A fragment {row g: tokens 0-7, row g+8: 0-7, row g: 8-15, row g+8: 8-15} (S's two n8
// tiles in place) rounded to the input type; with `more`, sc keeps what this term missed (exact: Sterbenz).
KVK_INLINE void take_term(float (&sc)[2][4], kvk_u32 (&pa)[4], bool more)
{
    KVK_UNROLL
    for (int f = 0; f < 4; ++f) {
        float& lo = sc[f >> 1][2 * (f & 1)];
        float& hi = sc[f >> 1][2 * (f & 1) + 1];
        pa[f] = kvk_in_pack2(lo, hi);
        if (more) {
            float rlo, rhi;
            kvk_in_unpack2(pa[f], rlo, rhi);
            lo -= rlo;
            hi -= rhi;
        }
    }
}

// Stores the pair (a, b) of columns col, col + 1 (col even).
KVK_INLINE void store2(out_t* dst, float a, float b)
{
#if OUT_TYPE == 2
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
#else
    *reinterpret_cast<kvk_u32*>(dst) = pack_out(a, b);
#endif
}
#endif

}  // namespace kvk_attn_mma

using namespace kvk_attn_mma;

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_mma(
    const in_t* __restrict__ query, const in_t* __restrict__ keys, const in_t* __restrict__ values,
    const kvk_i32* __restrict__ lengths, const kvk_i32* __restrict__ blockTable, const kvk_i32* __restrict__ positions,
    const float* __restrict__ alibiSlopes, out_t* __restrict__ output, float* __restrict__ lse,
    float* __restrict__ partialOutput, float* __restrict__ partialLse,
    kvk_i32 batch, kvk_i32 queryLength, kvk_i32 numQueryHeads, kvk_i32 numKvHeads, kvk_i32 ragged, kvk_i32 poolKvHeads,
    kvk_i32 maxTokens, kvk_i32 pageSize, kvk_i32 maxPagesPerSeq,
    float scale, float softCap, kvk_i32 window, kvk_i32 sinks, kvk_i32 rotaryDim, float ropeTheta,
    kvk_i32 splits, kvk_i32 tokenStreams, kvk_i32 rowTiles, kvk_i32 sharedBytes)
{
#if !KVK_DECODE_MMA
    __trap();   // the host never launches it for this specialization
#else
    (void)rotaryDim; (void)ropeTheta;
    if (sharedBytes != mSharedBytes) __trap();
    KVK_DYNAMIC_SHARED(kvk_u8, smem);
    kvk_u8* const qTile = smem;                                                     // [64][mQStride] units
    kvk_i64* const rowIndex = reinterpret_cast<kvk_i64*>(smem + mQBytes);           // [2][mTile]
    kvk_u8* const pipe = smem + mQBytes + mIdxBytes;
    // K stages [2][mTile][mKStride] units, then V stages [2][mTile][mVStride] units.
    const kv_stages<mTile, mThreads, mKStride, mVStride> stages{rowIndex, nullptr, pipe, pipe + 2 * mKStageBytes};

    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;

    const decode_cta cta(splits, rowTiles, queryLength, numQueryHeads, numKvHeads, ragged);
    if (cta.b >= batch) return;
    const int length = cta.length(lengths, maxTokens);
    const int split = cta.split, packedRows = cta.packedRows;

    const int rowGroups = mWarps / tokenStreams;
    const int ctaRows = rowGroups * 16;
    const int rowBase = cta.rowTile * ctaRows;
    const int wr = warp / tokenStreams, wt = warp % tokenStreams;

    load_query_tile(qTile, mQStride, ctaRows, rowBase, cta, query, tid, mThreads);

    const decode_chunk chunk(token_list(length, queryLength, window, sinks), split, splits, mTile);
    const token_list& list = chunk.list;
    const int eBegin = chunk.begin, eEnd = chunk.end, numTiles = chunk.tiles;

    // This lane's two rows: g and g + 8 of the warp tile.
    int qIndex[2];
    float slope[2];
    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) cta.row_constants(rowBase + wr * 16 + g + 8 * rr, length, alibiSlopes, qIndex[rr], slope[rr]);

    const kv_locator locate(cta, chunk, blockTable, positions, poolKvHeads, maxTokens, pageSize, maxPagesPerSeq);
    stages.start(locate, eBegin, numTiles, keys, values, tid);

    // Online softmax state of rows g, g + 8: m (base 2, the same in the 4 lanes of a quad), l (this lane's
    // tokens only), o (C fragments of the 16 x Dv output: o[j] = columns 8j + 2 * t4, +1).
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
    float o[kDv / 8][4];
    KVK_UNROLL
    for (int j = 0; j < kDv / 8; ++j)
        KVK_UNROLL
        for (int x = 0; x < 4; ++x) o[j][x] = 0.0f;

    // ldmatrix row addresses that do not change between tiles.
    const kvk_u8* const qRow = qTile + ((wr * 16 + (lane & 15)) * mQStride + (lane >> 4)) * 16;
    const int kRowOffset = (((lane >> 4) * 8 + (lane & 7)) * mKStride + ((lane >> 3) & 1)) * 16;
    const int vRowOffset = (((lane & 7) + ((lane >> 3) & 1) * 8) * mVStride + (lane >> 4)) * 16;

    for (int k = 0; k < numTiles; ++k) {
        const int s = k & 1;
        kvk_i64 nextRow = -1;
        int nextPos = 0;
        if (tid < mTile) nextRow = locate(eBegin + (k + 2) * mTile + tid, nextPos);

        kvk_cp_async_wait_group<1>();
        __syncthreads();

        const kvk_u8* const kTileP = stages.k_tile(s);
        const kvk_u8* const vTileP = stages.v_tile(s);

        for (int sub = wt; sub < mSub; sub += tokenStreams) {
            // ---- QK: S[row][token] for 16 rows x 16 tokens (two n8 tiles)
            float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
            const kvk_u8* const kSub = kTileP + sub * 16 * mKStride * 16 + kRowOffset;
            // Partly unrolled: with Dv = 256 the 128 accumulators leave no room for 16 k-steps of loads in flight.
#pragma unroll 4
            for (int kk = 0; kk < kDk / 16; ++kk) {
                kvk_u32 a[4], kb[4];
                kvk_ldmatrix_x4(a, qRow + kk * 32);
                kvk_ldmatrix_x4(kb, kSub + kk * 32);
                mma16816(sc[0], a, kb[0], kb[1]);
                mma16816(sc[1], a, kb[2], kb[3]);
            }

            // ---- logits -> online softmax; element i of n-tile j: row g + 8 * (i >> 1), token 8j + 2 * t4 + (i & 1)
            float tileMax[2] = {neg_inf(), neg_inf()};
            KVK_UNROLL
            for (int j = 0; j < 2; ++j)
                KVK_UNROLL
                for (int i = 0; i < 4; ++i) {
                    const int rr = i >> 1;
                    const int e = eBegin + k * mTile + sub * 16 + 8 * j + 2 * t4 + (i & 1);
                    const int n = list.token(e);
                    sc[j][i] = logit2(sc[j][i] * scale, n, e < eEnd, qIndex[rr], slope[rr], alibiSlopes != nullptr, softCap, window, sinks);
                    tileMax[rr] = fmaxf(tileMax[rr], sc[j][i]);
                }
            float alpha[2], mUse[2];
            KVK_UNROLL
            for (int rr = 0; rr < 2; ++rr) {
                const float mNew = fmaxf(m[rr], warp_max(tileMax[rr], 1, 4));
                mUse[rr] = max_for_ex2(mNew);
                alpha[rr] = kvk_ex2(m[rr] - mUse[rr]);
                m[rr] = mNew;
                l[rr] *= alpha[rr];
            }
            KVK_UNROLL
            for (int j = 0; j < 2; ++j)
                KVK_UNROLL
                for (int i = 0; i < 4; ++i) {
                    sc[j][i] = kvk_ex2(sc[j][i] - mUse[i >> 1]);
                    l[i >> 1] += sc[j][i];
                    sc[j][i] *= kPScale;
                }
            KVK_UNROLL
            for (int j = 0; j < kDv / 8; ++j) {
                o[j][0] *= alpha[0];
                o[j][1] *= alpha[0];
                o[j][2] *= alpha[1];
                o[j][3] *= alpha[1];
            }

            // ---- PV: o (16 x Dv) += P (16 x 16 tokens) V (16 tokens x Dv), P as a sum of input-type terms
            const kvk_u8* const vSub = vTileP + sub * 16 * mVStride * 16 + vRowOffset;
            if (mTermsOuter) {
                // One term at a time (V fragments reloaded per term): 3 terms x 4 registers do not fit beside
                // 128 accumulators.
                KVK_UNROLL
                for (int term = 0; term < mPTerms; ++term) {
                    kvk_u32 pa[4];
                    take_term(sc, pa, term + 1 < mPTerms);
                    KVK_UNROLL
                    for (int cp = 0; cp < kDv / 16; ++cp) {
                        kvk_u32 vb[4];
                        kvk_ldmatrix_x4_trans(vb, vSub + cp * 32);
                        mma16816(o[2 * cp], pa, vb[0], vb[1]);
                        mma16816(o[2 * cp + 1], pa, vb[2], vb[3]);
                    }
                }
            } else {
                kvk_u32 pa[mPTerms][4];
                KVK_UNROLL
                for (int term = 0; term < mPTerms; ++term) take_term(sc, pa[term], term + 1 < mPTerms);
                KVK_UNROLL
                for (int cp = 0; cp < kDv / 16; ++cp) {
                    kvk_u32 vb[4];
                    kvk_ldmatrix_x4_trans(vb, vSub + cp * 32);
                    KVK_UNROLL
                    for (int term = 0; term < mPTerms; ++term) {
                        mma16816(o[2 * cp], pa[term], vb[0], vb[1]);
                        mma16816(o[2 * cp + 1], pa[term], vb[2], vb[3]);
                    }
                }
            }
        }

        stages.set_row(s, tid, nextRow, nextPos);
        __syncthreads();   // stage s and its addresses are free
        stages.issue(k + 2, s, numTiles, keys, values, tid);
    }
    kvk_cp_async_wait_all();

    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) l[rr] = warp_sum(l[rr], 1, 4);

    // ---- merge the token streams of each row group: halve the streams until one is left
    if (tokenStreams > 1) {
        __syncthreads();   // every warp is done with the pipeline buffers
        float* const so = reinterpret_cast<float*>(pipe);     // [2][16][kDv]
        float* const ml = so + 2 * 16 * kDv;                   // [2][16][2]
        for (int step = tokenStreams / 2; step >= 1; step /= 2) {
            if (wt >= step && wt < 2 * step) {
                const int slot = wr * step + (wt - step);
                KVK_UNROLL
                for (int j = 0; j < kDv / 8; ++j)
                    KVK_UNROLL
                    for (int rr = 0; rr < 2; ++rr)
                        *reinterpret_cast<float2*>(so + (slot * 16 + g + 8 * rr) * kDv + 8 * j + 2 * t4) =
                            make_float2(o[j][2 * rr], o[j][2 * rr + 1]);
                if (t4 == 0)
                    KVK_UNROLL
                    for (int rr = 0; rr < 2; ++rr) {
                        ml[(slot * 16 + g + 8 * rr) * 2] = m[rr];
                        ml[(slot * 16 + g + 8 * rr) * 2 + 1] = l[rr];
                    }
            }
            __syncthreads();
            if (wt < step) {
                const int slot = wr * step + wt;
                float a1[2], a2[2];
                KVK_UNROLL
                for (int rr = 0; rr < 2; ++rr)
                    merge_state(m[rr], l[rr], ml[(slot * 16 + g + 8 * rr) * 2], ml[(slot * 16 + g + 8 * rr) * 2 + 1], a1[rr], a2[rr]);
                KVK_UNROLL
                for (int j = 0; j < kDv / 8; ++j)
                    KVK_UNROLL
                    for (int rr = 0; rr < 2; ++rr) {
                        const float2 x = *reinterpret_cast<const float2*>(so + (slot * 16 + g + 8 * rr) * kDv + 8 * j + 2 * t4);
                        o[j][2 * rr] = o[j][2 * rr] * a1[rr] + x.x * a2[rr];
                        o[j][2 * rr + 1] = o[j][2 * rr + 1] * a1[rr] + x.y * a2[rr];
                    }
            }
            __syncthreads();
        }
    }
    if (wt != 0) return;

    // ---- results: o / (l * kPScale) and the natural-log LSE, or this split's partial state
    const kvk_i64 outRows = (kvk_i64)batch * queryLength * numQueryHeads;
    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) {
        const int pr = rowBase + wr * 16 + g + 8 * rr;
        if (pr >= packedRows) continue;
        const kvk_i64 outRow = cta.global_row(pr);
        const row_result res(m[rr], l[rr], kPScale);
        KVK_UNROLL
        for (int j = 0; j < kDv / 8; ++j) {
            const int col = 8 * j + 2 * t4;
            const float x0 = o[j][2 * rr] * res.inv, x1 = o[j][2 * rr + 1] * res.inv;
            if (splits == 1)
                store2(output + outRow * kDv + col, x0, x1);
            else
                *reinterpret_cast<float2*>(partial_row(partialOutput, split, outRows, outRow) + col) = make_float2(x0, x1);
        }
        if (t4 == 0) write_lse(lse, partialLse, split, splits, outRows, outRow, res.lse);
    }
#endif
}

// ================================================================================================
// attention_decode_mma_wide — the same op on tensor cores for key reuse with a head past 256 columns: MLA's
// latent rows (Dk = 576, V = the first Dv = 512 columns of each row, one KV head shared by 16-128 query heads).
// A warp's 16 x Dv output would need 256 accumulator registers per thread, so warps work in PAIRS that split the
// output columns: warp h (0, 1) of pair r owns query rows 16r .. 16r + 15 of the CTA's row tile and output columns
// h * Dv/2 .. (h + 1) * Dv/2 - 1 (128 fp32 accumulators per thread at Dv = 512).
// - A CTA has rowGroups (1, 2 or 4, chosen by the host from the rows: the `tokenStreams` argument) pairs, 64 x
//   rowGroups threads; more rows than 16 x rowGroups go to further row tiles (CTAs), which re-read the chunk from L2.
// - Stages of 32 tokens x Dk in shared memory (rows padded to an odd number of 16-byte units), double buffered
//   with cp.async as in the other kernels; the query tile in the input type. Every K byte is loaded once per CTA
//   and serves as K (QK) and, in its first Dv columns, as V (PV).
// - Per tile, warp h computes S for its 16 rows x tokens 16h .. 16h + 15 (QK over all Dk: Dk/16 k-steps x 2 n8
//   tiles), the pair agrees on the running row max through shared memory, each warp turns its S into P (the same
//   1-3 input-type terms as attention_decode_mma) and hands its P fragments to its partner through shared memory;
//   then PV over all 32 tokens into its half of the columns. Four barriers per tile (stage ready, maxima, P, stage
//   free). At the end the pair adds its two partial sums l, and each warp writes its columns.
// ================================================================================================
namespace kvk_attn_wide {
using namespace kvk_attn;
using namespace kvk_attn_mma;

// The host (DecodeAttentionKernels.cs, DecodeWideLayout) computes the same numbers: keep them in step.
enum : int {
    wTile = 32,
    wKStride = kDk / 8 + 1,                     // odd: conflict-free ldmatrix
    wHalf = kDv / 2,                            // output columns per warp
    wIdxBytes = 2 * wTile * 8,
    wStageBytes = wTile * wKStride * 16,
    wPipeBytes = 2 * wStageBytes,
    wPairBytes = 2 * 16 * 4 + 2 * mPTerms * 32 * 16,   // two warps' row maxima, then their P fragments
};

KVK_INLINE int wide_shared_bytes(int rowGroups) { return rowGroups * 16 * wKStride * 16 + wIdxBytes + wPipeBytes + rowGroups * wPairBytes; }

}  // namespace kvk_attn_wide

extern "C" __global__ __launch_bounds__(256, 1) void attention_decode_mma_wide(
    const in_t* __restrict__ query, const in_t* __restrict__ keys, const in_t* __restrict__ values,
    const kvk_i32* __restrict__ lengths, const kvk_i32* __restrict__ blockTable, const kvk_i32* __restrict__ positions,
    const float* __restrict__ alibiSlopes, out_t* __restrict__ output, float* __restrict__ lse,
    float* __restrict__ partialOutput, float* __restrict__ partialLse,
    kvk_i32 batch, kvk_i32 queryLength, kvk_i32 numQueryHeads, kvk_i32 numKvHeads, kvk_i32 ragged, kvk_i32 poolKvHeads,
    kvk_i32 maxTokens, kvk_i32 pageSize, kvk_i32 maxPagesPerSeq,
    float scale, float softCap, kvk_i32 window, kvk_i32 sinks, kvk_i32 rotaryDim, float ropeTheta,
    kvk_i32 splits, kvk_i32 rowGroups, kvk_i32 rowTiles, kvk_i32 sharedBytes)
{
#if !KVK_DECODE_WIDE
    __trap();   // the host never launches it for this specialization
#else
    using namespace kvk_attn_wide;
    (void)values; (void)rotaryDim; (void)ropeTheta;
    if (sharedBytes != wide_shared_bytes(rowGroups) || (int)blockDim.x != 64 * rowGroups) __trap();
    KVK_DYNAMIC_SHARED(kvk_u8, smem);
    const int qBytes = rowGroups * 16 * wKStride * 16;
    kvk_u8* const qTile = smem;                                                          // [16 rowGroups][wKStride] units
    kvk_i64* const rowIndex = reinterpret_cast<kvk_i64*>(smem + qBytes);                 // [2][wTile]
    kvk_u8* const pipe = smem + qBytes + wIdxBytes;                                      // [2][wTile][wKStride] units
    kvk_u8* const pairs = pipe + wPipeBytes;                                             // [rowGroups][wPairBytes]
    const int threads = 64 * rowGroups;
    const kv_stages<wTile, 0, wKStride, wKStride> stages{rowIndex, nullptr, pipe, nullptr, threads};

    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int pair = warp >> 1, half = warp & 1;
    float* const maxima = reinterpret_cast<float*>(pairs + pair * wPairBytes);                       // [2][16]
    kvk_v16* const frags = reinterpret_cast<kvk_v16*>(pairs + pair * wPairBytes + 2 * 16 * 4);       // [2][terms][32]

    const decode_cta cta(splits, rowTiles, queryLength, numQueryHeads, numKvHeads, ragged);
    if (cta.b >= batch) return;
    const int length = cta.length(lengths, maxTokens);
    const int split = cta.split, packedRows = cta.packedRows;
    const int rowBase = cta.rowTile * rowGroups * 16;

    load_query_tile(qTile, wKStride, rowGroups * 16, rowBase, cta, query, tid, threads);

    const decode_chunk chunk(token_list(length, queryLength, window, sinks), split, splits, wTile);
    const token_list& list = chunk.list;
    const int eBegin = chunk.begin, eEnd = chunk.end, numTiles = chunk.tiles;

    int qIndex[2];
    float slope[2];
    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) cta.row_constants(rowBase + pair * 16 + g + 8 * rr, length, alibiSlopes, qIndex[rr], slope[rr]);

    const kv_locator locate(cta, chunk, blockTable, positions, poolKvHeads, maxTokens, pageSize, maxPagesPerSeq);
    stages.start(locate, eBegin, numTiles, keys, values, tid);

    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
    float o[wHalf / 8][4];
    KVK_UNROLL
    for (int j = 0; j < wHalf / 8; ++j)
        KVK_UNROLL
        for (int x = 0; x < 4; ++x) o[j][x] = 0.0f;

    const kvk_u8* const qRow = qTile + ((pair * 16 + (lane & 15)) * wKStride + (lane >> 4)) * 16;
    const int kRowOffset = ((16 * half + (lane >> 4) * 8 + (lane & 7)) * wKStride + ((lane >> 3) & 1)) * 16;
    const int vRowOffset = (((lane & 7) + ((lane >> 3) & 1) * 8) * wKStride + (lane >> 4)) * 16 + (half * wHalf / 8) * 16;

    for (int k = 0; k < numTiles; ++k) {
        const int s = k & 1;
        kvk_i64 nextRow = -1;
        int nextPos = 0;
        if (tid < wTile) nextRow = locate(eBegin + (k + 2) * wTile + tid, nextPos);

        kvk_cp_async_wait_group<1>();
        __syncthreads();
        const kvk_u8* const tile = stages.k_tile(s);

        // ---- QK: S[row][token] for the pair's 16 rows x this warp's 16 tokens
        float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll 4
        for (int kk = 0; kk < kDk / 16; ++kk) {
            kvk_u32 a[4], kb[4];
            kvk_ldmatrix_x4(a, qRow + kk * 32);
            kvk_ldmatrix_x4(kb, tile + kRowOffset + kk * 32);
            mma16816(sc[0], a, kb[0], kb[1]);
            mma16816(sc[1], a, kb[2], kb[3]);
        }
        float tileMax[2] = {neg_inf(), neg_inf()};
        KVK_UNROLL
        for (int j = 0; j < 2; ++j)
            KVK_UNROLL
            for (int i = 0; i < 4; ++i) {
                const int rr = i >> 1;
                const int e = eBegin + k * wTile + 16 * half + 8 * j + 2 * t4 + (i & 1);
                sc[j][i] = logit2(sc[j][i] * scale, list.token(e), e < eEnd, qIndex[rr], slope[rr], alibiSlopes != nullptr, softCap, window, sinks);
                tileMax[rr] = fmaxf(tileMax[rr], sc[j][i]);
            }
        KVK_UNROLL
        for (int rr = 0; rr < 2; ++rr) {
            tileMax[rr] = warp_max(tileMax[rr], 1, 4);
            if (t4 == 0) maxima[half * 16 + g + 8 * rr] = tileMax[rr];
        }
        __syncthreads();

        // ---- the pair's common running max, then this warp's P (kPScale-scaled) and its partial l
        float alpha[2], mUse[2];
        KVK_UNROLL
        for (int rr = 0; rr < 2; ++rr) {
            const float mNew = fmaxf(m[rr], fmaxf(tileMax[rr], maxima[(half ^ 1) * 16 + g + 8 * rr]));
            mUse[rr] = max_for_ex2(mNew);
            alpha[rr] = kvk_ex2(m[rr] - mUse[rr]);
            m[rr] = mNew;
            l[rr] *= alpha[rr];
        }
        KVK_UNROLL
        for (int j = 0; j < 2; ++j)
            KVK_UNROLL
            for (int i = 0; i < 4; ++i) {
                sc[j][i] = kvk_ex2(sc[j][i] - mUse[i >> 1]);
                l[i >> 1] += sc[j][i];
                sc[j][i] *= kPScale;
            }
        KVK_UNROLL
        for (int j = 0; j < wHalf / 8; ++j) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        KVK_UNROLL
        for (int term = 0; term < mPTerms; ++term) {
            kvk_u32 pa[4];
            take_term(sc, pa, term + 1 < mPTerms);
            frags[(half * mPTerms + term) * 32 + lane] = kvk_v16{pa[0], pa[1], pa[2], pa[3]};
        }
        __syncthreads();

        // ---- PV: o (16 x this warp's columns) += P (16 x 32 tokens) V (32 tokens x the columns); the tokens of
        // k-step ks came from warp ks of the pair, its P terms from shared memory, one term at a time.
        KVK_UNROLL
        for (int ks = 0; ks < 2; ++ks) {
            const kvk_u8* const vSub = tile + ks * 16 * wKStride * 16 + vRowOffset;
#pragma unroll 1
            for (int term = 0; term < mPTerms; ++term) {
                const kvk_v16 f = frags[(ks * mPTerms + term) * 32 + lane];
                const kvk_u32 pa[4] = {f.x, f.y, f.z, f.w};
                KVK_UNROLL
                for (int cp = 0; cp < wHalf / 16; ++cp) {
                    kvk_u32 vb[4];
                    kvk_ldmatrix_x4_trans(vb, vSub + cp * 32);
                    mma16816(o[2 * cp], pa, vb[0], vb[1]);
                    mma16816(o[2 * cp + 1], pa, vb[2], vb[3]);
                }
            }
        }

        stages.set_row(s, tid, nextRow, nextPos);
        __syncthreads();   // stage s, its addresses, the maxima and the fragments are free
        stages.issue(k + 2, s, numTiles, keys, values, tid);
    }
    kvk_cp_async_wait_all();

    // ---- the pair's l: each warp summed its own tokens
    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) {
        l[rr] = warp_sum(l[rr], 1, 4);
        if (t4 == 0) maxima[half * 16 + g + 8 * rr] = l[rr];
    }
    __syncthreads();
    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) l[rr] += maxima[(half ^ 1) * 16 + g + 8 * rr];

    // ---- results: this warp's columns of o / (l * kPScale), the LSE (warp 0 of the pair), or the split's partials
    const kvk_i64 outRows = (kvk_i64)batch * queryLength * numQueryHeads;
    KVK_UNROLL
    for (int rr = 0; rr < 2; ++rr) {
        const int pr = rowBase + pair * 16 + g + 8 * rr;
        if (pr >= packedRows) continue;
        const kvk_i64 outRow = cta.global_row(pr);
        const row_result res(m[rr], l[rr], kPScale);
        KVK_UNROLL
        for (int j = 0; j < wHalf / 8; ++j) {
            const int col = half * wHalf + 8 * j + 2 * t4;
            const float x0 = o[j][2 * rr] * res.inv, x1 = o[j][2 * rr + 1] * res.inv;
            if (splits == 1)
                store2(output + outRow * kDv + col, x0, x1);
            else
                *reinterpret_cast<float2*>(partial_row(partialOutput, split, outRows, outRow) + col) = make_float2(x0, x1);
        }
        if (half == 0 && t4 == 0) write_lse(lse, partialLse, split, splits, outRows, outRow, res.lse);
    }
#endif
}

// One warp per output row (kvk_merge.cuh); dim is a multiple of 8.
extern "C" __global__ __launch_bounds__(256) void attention_merge_splits(
    const float* __restrict__ partialOutput, const float* __restrict__ partialLse, out_t* __restrict__ output,
    float* __restrict__ lse, kvk_i32 numRows, kvk_i32 dim, kvk_i32 splits)
{
    const int lane = (int)(threadIdx.x & 31);
    const kvk_i64 warps = (kvk_i64)gridDim.x * (blockDim.x / 32);
    for (kvk_i64 row = ((kvk_i64)blockIdx.x * blockDim.x + threadIdx.x) / 32; row < numRows; row += warps) {
        const float merged = kvk_merge_splits_row(partialOutput, partialLse, numRows, dim, splits, row, lane,
            [&](int c, float4 v) { store4(output + row * dim + c, v.x, v.y, v.z, v.w); });
        if (lse != nullptr && lane == 0) lse[row] = merged;
    }
}

// MergeStatesSpec: one warp per row; any dim (1..1024), element type out_t.
extern "C" __global__ __launch_bounds__(256) void attention_merge_states(
    const out_t* __restrict__ outputA, const float* __restrict__ lseA, const out_t* __restrict__ outputB,
    const float* __restrict__ lseB, out_t* __restrict__ output, float* __restrict__ lse, kvk_i32 rows, kvk_i32 dim)
{
    const int lane = (int)(threadIdx.x & 31);
    const kvk_i64 warps = (kvk_i64)gridDim.x * (blockDim.x / 32);
    for (kvk_i64 row = ((kvk_i64)blockIdx.x * blockDim.x + threadIdx.x) / 32; row < rows; row += warps) {
        const float la = lseA[row], lb = lseB[row];
        const float mx = fmaxf(la, lb);
        const bool empty = mx == neg_inf();
        const float wa = empty ? 0.0f : kvk_ex2((la - mx) * kLog2e);
        const float wb = empty ? 0.0f : kvk_ex2((lb - mx) * kLog2e);
        const float inv = empty ? 0.0f : 1.0f / (wa + wb);
        const kvk_i64 base = row * dim;
        for (int c = lane; c < dim; c += 32) {
            // A state that weighs nothing is skipped, not multiplied by 0 (its output may be anything).
            const float a = wa > 0.0f ? wa * out_to_float(outputA[base + c]) : 0.0f;
            const float bv = wb > 0.0f ? wb * out_to_float(outputB[base + c]) : 0.0f;
            output[base + c] = float_to_out((a + bv) * inv);
        }
        if (lane == 0) lse[row] = empty ? neg_inf() : mx + kvk_lg2(wa + wb) * kLn2;
    }
}
