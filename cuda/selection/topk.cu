// topk.cu — deterministic top-k / bottom-k token selection over fp32 scores (primitive P7 of issue 6).
//
//   selection_topk         per row: keep k of the row's first lengths[row] tokens: the protected ranges (sinks
//                          [0, s) and the recent window [L - r, L)) plus the best k - s - r of the rest; indices in
//                          ascending position order. Optionally (thresholds != null) it records the row's selection
//                          rule instead of / besides the indices (used by the global selection below).
//   selection_global_*     per sequence of H rows (AdaKV): each row's forced set (computed by selection_topk in
//                          threshold mode with k = max(floor, s + r)) plus the best tokens of all the sequence's rows
//                          together until the budget is spent; indices per row in ascending position order. Five
//                          kernels after the forced sets: histogram (rows), plan (sequences), collect (rows), topk
//                          (sequences), output (rows); see the section above selection_global_histogram.
//
// Order. A score maps to a 32-bit key whose unsigned order is the selection order (higher key = better):
//   - finite values and ±inf: the order-preserving map of the fp32 bits (flip all bits of negatives, set the sign bit
//     of positives), complemented for bottom-k (smallest);
//   - -0.0 is first mapped to +0.0 (the two compare equal, so they tie and the lower index wins);
//   - every NaN maps to key 0, below every other key in both orders: a NaN is never chosen before a number
//     (for top-k it ranks below -inf, for bottom-k above +inf); NaNs tie with each other.
// Real keys lie in [0x007FFFFF, 0xFF800000]; 0xFFFFFFFF is free and marks forced tokens in the global selection.
// Ties go to the lower position. The set kept is therefore unique, and the CPU twin (SelectionCpu) computes the same
// set by any exact method.
//
// Selection rule. Every selection ends as a threshold (T, cutoff): an element with key x at position p is kept iff
// x > T, or x == T and p < cutoff. The best `need` elements of a list give exactly one such pair. The kernels find it
// by a most-significant-digit radix select over the key bits in three levels (12, 12 and 8 bits):
//   level 0: a 4096-bin shared-memory histogram of key >> 20 gives the bin holding the need-th best element and the
//            count strictly above it;
//   level 1: the histogram of bits 19..8 of the elements in that bin;
//   level 2: the histogram of bits 7..0 of the elements with that 24-bit prefix: T is then known, and `rem`, the
//            number of elements equal to T still needed;
//   cutoff:  one pass in position order finds the rem-th element equal to T (cutoff = its position + 1), unless all
//            of them are needed (cutoff = 2^32 - 1). When a whole bin is needed at level 0 or 1 the select stops
//            there with T = (prefix << shift) - 1, cutoff = 0 (keep x >= prefix << shift).
// Histogram counts use shared-memory atomics, whose order cannot change an integer count; everything that depends on
// order (which tied element, where an index is written) is decided by block-wide prefix sums in position order.
//
// Data movement of selection_topk (one CTA per row, grid-stride over rows; the global selection's per-sequence select
// works the same way on a sequence's rows):
//   1. guess:   when the list is longer than the CTA's candidate buffer, a sample (32 consecutive elements out of every
//               1024: 1/32 of the row, whole 128-byte lines) gives a level-0 bin b0 that probably lies at or below
//               the exact threshold bin, aiming at 1.5x the needed count plus a margin;
//   2. stream:  one pass over the row (16-byte loads) builds the exact level-0 histogram and, in the same pass,
//               appends every element with key >> 20 >= b0 to the CTA's candidate buffer in global memory (key and
//               position, position order, via block prefix sums);
//   3. if the guess was too high (b0 above the exact bin) or the candidates overflowed the buffer, a second pass
//      collects exactly the elements at or above the exact bin when they fit;
//   4. levels 1 and 2, the tie cutoff and the output compaction then read only the candidate buffer (L2-resident);
//      when even the exact candidates do not fit (heavy ties), they read the row itself (slow path, same result).
// So a typical row is read once from HBM (plus the sample, whose lines the stream pass finds in L2); a guess that
// misses costs one more read. The output is written once, with indices in ascending position order.
// A tile is 512 threads x 2 16-byte vectors (4096 scores); the next tile's loads are issued before the current tile's
// prefix sum, which costs one barrier (each warp publishes its total, every warp scans the 16 totals itself; the
// totals alternate between two arrays so that no second barrier is needed).
// The global selection reads the scores about three times (forced sets, histograms, candidates), one CTA per row;
// only its small per-sequence steps run one CTA per sequence.
//
// Buffers: scores [rows, columns] fp32 (any alignment: tiles start at the 16-byte boundary at or before the first
// element, and lanes outside the row are masked); lengths [rows] int32 (clamped to [0, columns] on the device);
// indices [rows, k] int32, counts [rows] int32; workspace: per CTA a candidate buffer of `capacity` keys then
// `capacity` positions (capacity a multiple of 4, base 16-byte aligned). The host validates everything (k, protected
// ranges, budget) before launching; the device clamps only what it needs to stay in bounds.
//
// Compile-time macro: TOPK_THREADS (256, 512 or 1024; default 512): threads per CTA (at least 2048 / TOPK_THREADS / 2
// resident per SM).
#include "common/kvk_types.cuh"
#include "common/kvk_vec.cuh"

#ifndef TOPK_THREADS
#define TOPK_THREADS 512
#endif

static_assert(TOPK_THREADS == 256 || TOPK_THREADS == 512 || TOPK_THREADS == 1024, "TOPK_THREADS must be 256, 512 or 1024");

// Two CTAs of 512 threads per SM (64 registers per thread): with 16 KB of shared memory each, a 132-SM H100 holds 264
// rows at once.
#define TOPK_MIN_BLOCKS (2048 / TOPK_THREADS / 2)

namespace kvk_sel {

enum : kvk_u32 {
    kThreads = TOPK_THREADS,
    kWarps = kThreads / 32,
    kSub = 2,                        // 16-byte vectors per thread per tile
    kTile = kThreads * kSub * 4,     // elements per tile
    kBins = 4096,                    // level 0 and 1 digits: 12 bits; level 2: 8 bits
    kLastBins = 256,
    kSampleStride = 1024,            // the guess samples kSampleChunk elements out of every kSampleStride
    kSampleChunk = 32,
    kSentinel = 0xFFFFFFFFu,         // forced tokens (global selection); above every real key
    kNoBin = 0xFFFFFFFFu,            // "no guess"
    kAll = 0xFFFFFFFFu,              // cutoff that accepts every tie
    kPlanStream = 0,                 // global plan: the sequence's select streams its rows (candidates do not fit)
    kPlanBuffered = 1,               //   the candidates are in the sequence's buffer
    kPlanKeepAll = 2,                //   the sequence keeps every token
};

struct Threshold {
    kvk_u32 key, cutoff;
};

KVK_INLINE bool keeps(const Threshold& t, kvk_u32 key, kvk_u32 pos) { return key > t.key || (key == t.key && pos < t.cutoff); }

// The selection key of a score's bits (see the header comment).
KVK_INLINE kvk_u32 order_key(kvk_u32 bits, bool smallest)
{
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;   // NaN: the worst key in both orders
    if (bits == 0x80000000u) bits = 0;                   // -0.0 ties with +0.0
    const kvk_u32 key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return smallest ? ~key : key;
}

struct Storage {
    kvk_u32 hist[kBins];
    kvk_u32 scan[2][kWarps];
    kvk_u32 word[4];
};

// The block's shared storage: one namespace-scope variable for every kernel of the file (each launch gets its own;
// the emulator, which counts a library's static shared memory together, then sees 16.5 KB, not 16.5 KB per kernel).
__shared__ Storage block_storage;

// Each thread's handle on the block's shared storage, plus the phase of its block-wide scans (every thread makes the
// same sequence of scans, so the phase is the same in all of them).
struct Shared {
    kvk_u32 (&hist)[kBins];
    kvk_u32 (&scan)[2][kWarps];
    kvk_u32 (&word)[4];
    kvk_u32 phase;

    KVK_INLINE explicit Shared(Storage& s) : hist(s.hist), scan(s.scan), word(s.word), phase(0) {}
};

// ---- block-wide prefix sums -------------------------------------------------------------------------------------

KVK_INLINE kvk_u32 warp_inclusive_sum(kvk_u32 v, kvk_u32 lane)
{
    KVK_UNROLL
    for (int d = 1; d < 32; d <<= 1) {
        const kvk_u32 y = __shfl_up_sync(0xFFFFFFFFu, v, d);
        if (lane >= (kvk_u32)d) v += y;
    }
    return v;
}

// Exclusive prefix sum of v over the block's threads in thread order; `total` is the block's sum. Every thread must
// call it. One barrier: each warp publishes its total, then every warp scans the kWarps totals itself. The totals
// alternate between two arrays, so the next scan cannot overwrite what a slow warp still reads (the scan after next,
// which reuses the array, waits at the next scan's barrier for every warp).
KVK_INLINE kvk_u32 block_exclusive_sum(kvk_u32 v, Shared& sm, kvk_u32& total)
{
    const kvk_u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    kvk_u32* totals = sm.scan[sm.phase & 1];
    ++sm.phase;
    const kvk_u32 inclusive = warp_inclusive_sum(v, lane);
    if (lane == 31) totals[warp] = inclusive;
    __syncthreads();
    const kvk_u32 w = lane < kWarps ? totals[lane] : 0;
    const kvk_u32 wi = warp_inclusive_sum(w, lane);
    total = __shfl_sync(0xFFFFFFFFu, wi, 31);
    const kvk_u32 before = __shfl_sync(0xFFFFFFFFu, wi - w, warp);
    return before + inclusive - v;
}

// ---- tiles: elements in position order ---------------------------------------------------------------------------
//
// A tile is kTile consecutive elements; thread t holds the 16-byte vectors j * kThreads + t (j < kSub), so each warp
// load is contiguous. Element order within a tile is (j, t, q): position order.

// A tile of a score row: positions are consecutive, so one base per vector.
struct SegmentTile {
    kvk_u32 keys[kSub][4];
    kvk_u32 base[kSub];   // position of element (j, 0)
    kvk_u32 valid;        // bit j * 4 + q

    KVK_INLINE bool has(int j, int q) const { return (valid >> (j * 4 + q)) & 1u; }
    KVK_INLINE kvk_u32 key(int j, int q) const { return keys[j][q]; }
    KVK_INLINE kvk_u32 pos(int j, int q) const { return base[j] + (kvk_u32)q; }
};

// A tile of the candidate buffer: positions as stored.
struct BufferTile {
    kvk_u32 keys[kSub][4];
    kvk_u32 positions[kSub][4];
    kvk_u32 valid;

    KVK_INLINE bool has(int j, int q) const { return (valid >> (j * 4 + q)) & 1u; }
    KVK_INLINE kvk_u32 key(int j, int q) const { return keys[j][q]; }
    KVK_INLINE kvk_u32 pos(int j, int q) const { return positions[j][q]; }
};

// Ranks the flagged elements of a tile in position order: calls emit(j, q, rank) with rank = base + the number of
// flagged elements before it. Returns the tile's flagged count (the same in every thread).
template <class Emit>
KVK_INLINE kvk_u32 compact_tile(kvk_u32 flags, kvk_u32 base, Shared& sm, Emit& emit)
{
    static_assert(kSub == 2, "two 16-bit fields per scan");
    const kvk_u32 c0 = __popc(flags & 0xFu), c1 = __popc((flags >> 4) & 0xFu);
    kvk_u32 total;
    const kvk_u32 excl = block_exclusive_sum(c0 | (c1 << 16), sm, total);   // fields <= 4 * kThreads < 2^16
    kvk_u32 rank[kSub] = {base + (excl & 0xFFFFu), base + (total & 0xFFFFu) + (excl >> 16)};
    KVK_UNROLL
    for (int j = 0; j < kSub; ++j)
        KVK_UNROLL
        for (int q = 0; q < 4; ++q)
            if ((flags >> (j * 4 + q)) & 1u) emit(j, q, rank[j]++);
    return (total & 0xFFFFu) + (total >> 16);
}

// One segment of a score row: elements [begin, end) of `row`, position = posBase + element index.
struct Segment {
    const float* row;
    kvk_i64 begin, end;
    kvk_u32 posBase;
};

KVK_INLINE kvk_i64 aligned_start(const Segment& s)
{
    return s.begin - (kvk_i64)((kvk_address(s.row + s.begin) >> 2) & 3);
}

// Visits the segment's tiles in order; keyOf(i, bits) gives element i's key. Returns false when visit stopped early.
template <class KeyOf, class Visit>
KVK_INLINE bool segment_tiles(const Segment& s, const KeyOf& keyOf, Visit& visit)
{
    const kvk_u32 tid = threadIdx.x;
    // The next tile's vectors are loaded before the current tile is visited (its scan waits at a barrier), so the
    // loads stay in flight across the barrier.
    kvk_v16 next[kSub];
    auto load = [&](kvk_i64 t0) {
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j) {
            const kvk_i64 e = t0 + ((kvk_i64)j * kThreads + tid) * 4;
            next[j] = kvk_v16{};
            if (e < s.end) next[j] = kvk_ld_nc(reinterpret_cast<const kvk_v16*>(s.row + e));
        }
    };
    kvk_i64 t0 = aligned_start(s);
    load(t0);
    for (; t0 < s.end; t0 += kTile) {
        SegmentTile tile;
        tile.valid = 0;
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j) {
            const kvk_i64 e = t0 + ((kvk_i64)j * kThreads + tid) * 4;
            const kvk_u32 w[4] = {next[j].x, next[j].y, next[j].z, next[j].w};
            tile.base[j] = s.posBase + (kvk_u32)e;
            KVK_UNROLL
            for (int q = 0; q < 4; ++q) {
                const kvk_i64 i = e + q;
                const bool in = i >= s.begin && i < s.end;
                tile.keys[j][q] = in ? keyOf(i, w[q]) : 0;
                tile.valid |= (in ? 1u : 0u) << (j * 4 + q);
            }
        }
        load(t0 + kTile);
        if (!visit(tile)) return false;
    }
    return true;
}

// Histograms a sample of the segment: kSampleChunk consecutive elements (whole lines) out of every kSampleStride.
// Returns this thread's sampled count.
template <class KeyOf>
KVK_INLINE kvk_u32 sample_segment(const Segment& s, const KeyOf& keyOf, Shared& sm)
{
    enum : kvk_u32 { kVecs = kSampleChunk / 4 };
    const kvk_i64 start = aligned_start(s);
    const kvk_i64 work = (s.end - start + kSampleStride - 1) / kSampleStride * kVecs;
    kvk_u32 count = 0;
    for (kvk_i64 w = threadIdx.x; w < work; w += kThreads) {
        const kvk_i64 e = start + (w / kVecs) * kSampleStride + (w % kVecs) * 4;
        if (e >= s.end) continue;
        const kvk_v16 v = kvk_ld_nc(reinterpret_cast<const kvk_v16*>(s.row + e));
        const kvk_u32 bits[4] = {v.x, v.y, v.z, v.w};
        KVK_UNROLL
        for (int q = 0; q < 4; ++q) {
            const kvk_i64 i = e + q;
            if (i < s.begin || i >= s.end) continue;
            atomicAdd(&sm.hist[keyOf(i, bits[q]) >> 20], 1u);
            ++count;
        }
    }
    return count;
}

// ---- sources: the list a select works on --------------------------------------------------------------------------

// The candidate buffer: `count` (key, position) pairs in position order, written earlier by this CTA (plain loads:
// the kernel writes it, so the read-only path is not allowed).
struct BufferSource {
    const kvk_u32* keys;
    const kvk_u32* positions;
    kvk_u32 count;

    template <bool NeedPos, class Visit>
    KVK_INLINE bool tiles(Visit& visit) const
    {
        const kvk_u32 tid = threadIdx.x;
        for (kvk_u32 t0 = 0; t0 < count; t0 += kTile) {
            BufferTile tile;
            tile.valid = 0;
            KVK_UNROLL
            for (int j = 0; j < kSub; ++j) {
                const kvk_u32 e = t0 + (j * kThreads + tid) * 4;
                kvk_v16 k = kvk_v16{}, p = kvk_v16{};
                if (e < count) {
                    k = kvk_ld(reinterpret_cast<const kvk_v16*>(keys + e));
                    if (NeedPos) p = kvk_ld(reinterpret_cast<const kvk_v16*>(positions + e));
                }
                const kvk_u32 kk[4] = {k.x, k.y, k.z, k.w}, pp[4] = {p.x, p.y, p.z, p.w};
                KVK_UNROLL
                for (int q = 0; q < 4; ++q) {
                    tile.keys[j][q] = kk[q];
                    tile.positions[j][q] = pp[q];
                    tile.valid |= (e + q < count ? 1u : 0u) << (j * 4 + q);
                }
            }
            if (!visit(tile)) return false;
        }
        return true;
    }
};

struct PlainKey {
    bool smallest;
    KVK_INLINE kvk_u32 operator()(kvk_i64, kvk_u32 bits) const { return order_key(bits, smallest); }
};

// The unprotected middle [s, L - r) of one row (selection_topk); positions are row-relative.
struct RowSource {
    Segment seg;
    PlainKey keyOf;
    kvk_u32 total;

    template <bool NeedPos, class Visit>
    KVK_INLINE bool tiles(Visit& visit) const { return segment_tiles(seg, keyOf, visit); }

    KVK_INLINE kvk_u32 sample(Shared& sm) const { return sample_segment(seg, keyOf, sm); }
};

// A row's key in the global selection: forced tokens (protected ranges, or kept by the row's own threshold) get the
// sentinel, the rest their score's key.
struct ForcedKey {
    kvk_i64 length, sinks, recent;
    Threshold forced;
    bool smallest;

    KVK_INLINE kvk_u32 operator()(kvk_i64 i, kvk_u32 bits) const
    {
        const kvk_u32 key = order_key(bits, smallest);
        const bool isForced = i < sinks || i + recent >= length || keeps(forced, key, (kvk_u32)i);
        return isForced ? kSentinel : key;
    }
};

// The H rows of one sequence as one list (selection_global_topk): row h, token i at position h * columns + i.
struct SequenceSource {
    const float* scores;            // the sequence's first row
    const kvk_i32* lengths;         // its H lengths
    const kvk_u32* thresholds;      // its H (key, cutoff) pairs
    kvk_i32 heads, columns, sinks, recent;
    bool smallest;
    kvk_u32 total;

    KVK_INLINE kvk_i64 length(kvk_i32 h) const { return kvk_min<kvk_i64>(kvk_max<kvk_i64>(kvk_ldg_i32(lengths + h), 0), columns); }

    KVK_INLINE ForcedKey key_of(kvk_i32 h) const
    {
        const kvk_u32* t = thresholds + 2 * (kvk_i64)h;
        return ForcedKey{length(h), sinks, recent, Threshold{t[0], t[1]}, smallest};
    }

    KVK_INLINE Segment segment(kvk_i32 h) const
    {
        return Segment{scores + (kvk_i64)h * columns, 0, length(h), (kvk_u32)((kvk_i64)h * columns)};
    }

    template <bool NeedPos, class Visit>
    KVK_INLINE bool tiles(Visit& visit) const
    {
        for (kvk_i32 h = 0; h < heads; ++h)
            if (!segment_tiles(segment(h), key_of(h), visit)) return false;
        return true;
    }

    KVK_INLINE kvk_u32 sample(Shared& sm) const
    {
        kvk_u32 count = 0;
        for (kvk_i32 h = 0; h < heads; ++h) count += sample_segment(segment(h), key_of(h), sm);
        return count;
    }
};

// ---- the radix select ---------------------------------------------------------------------------------------------

KVK_INLINE void clear_hist(Shared& sm, kvk_u32 bins)
{
    for (kvk_u32 b = threadIdx.x; b < bins; b += kThreads) sm.hist[b] = 0;
    __syncthreads();
}

struct BinPick {
    kvk_u32 bin;     // the bin holding the need-th best element
    kvk_u32 above;   // elements in higher bins (< need)
    kvk_u32 count;   // elements in the bin (above + count >= need)
};

// Finds the bin of the need-th best element of the histogram (1 <= need <= its total). Thread t owns a run of
// consecutive bins; a prefix sum over threads gives each run's count of higher bins.
KVK_INLINE BinPick find_bin(Shared& sm, kvk_u32 bins, kvk_u32 need)
{
    __syncthreads();   // the histogram is complete
    const kvk_u32 per = (bins + kThreads - 1) / kThreads;
    const kvk_u32 lo = kvk_min(threadIdx.x * per, bins), hi = kvk_min(lo + per, bins);
    kvk_u32 local = 0;
    for (kvk_u32 b = lo; b < hi; ++b) local += sm.hist[b];
    kvk_u32 total;
    const kvk_u32 excl = block_exclusive_sum(local, sm, total);
    kvk_u32 above = total - excl - local;   // elements in bins >= hi
    if (above < need && above + local >= need) {
        for (kvk_u32 b = hi; b-- > lo;) {
            const kvk_u32 c = sm.hist[b];
            if (above + c >= need) {
                sm.word[0] = b;
                sm.word[1] = above;
                sm.word[2] = c;
                break;
            }
            above += c;
        }
    }
    __syncthreads();
    return BinPick{sm.word[0], sm.word[1], sm.word[2]};   // rewritten only after the next find_bin's first barrier
}

// Keep every element whose key has at least `prefix` in its top (32 - shift) bits.
KVK_INLINE Threshold whole_prefix(kvk_u32 prefix, int shift)
{
    return prefix == 0 ? Threshold{0, kAll} : Threshold{(prefix << shift) - 1, 0};
}

struct HistAll {   // level-0 histogram; with b0 != kNoBin also collects key >> 20 >= b0 into the buffer
    Shared& sm;
    kvk_u32 b0;
    kvk_u32* keys;
    kvk_u32* positions;
    kvk_u32 capacity;
    kvk_u32 count;

    template <class Tile>
    KVK_INLINE bool operator()(const Tile& t)
    {
        kvk_u32 flags = 0;
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j)
            KVK_UNROLL
            for (int q = 0; q < 4; ++q) {
                if (!t.has(j, q)) continue;
                const kvk_u32 bin = t.key(j, q) >> 20;
                atomicAdd(&sm.hist[bin], 1u);
                if (bin >= b0) flags |= 1u << (j * 4 + q);
            }
        if (b0 == kNoBin) return true;   // uniform
        auto emit = [&](int j, int q, kvk_u32 rank) {
            if (rank < capacity) {
                keys[rank] = t.key(j, q);
                positions[rank] = t.pos(j, q);
            }
        };
        count += compact_tile(flags, count, sm, emit);
        return true;
    }
};

struct Collect {   // key >> 20 >= bin into the buffer (the exact candidates)
    Shared& sm;
    kvk_u32 bin;
    kvk_u32* keys;
    kvk_u32* positions;
    kvk_u32 count;

    template <class Tile>
    KVK_INLINE bool operator()(const Tile& t)
    {
        kvk_u32 flags = 0;
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j)
            KVK_UNROLL
            for (int q = 0; q < 4; ++q)
                if (t.has(j, q) && (t.key(j, q) >> 20) >= bin) flags |= 1u << (j * 4 + q);
        auto emit = [&](int j, int q, kvk_u32 rank) {
            keys[rank] = t.key(j, q);
            positions[rank] = t.pos(j, q);
        };
        count += compact_tile(flags, count, sm, emit);
        return true;
    }
};

struct HistLevel {   // histogram of (key >> shift) & mask over the keys with key >> prefixShift == prefix
    Shared& sm;
    kvk_u32 prefix;
    int prefixShift, shift;
    kvk_u32 mask;

    template <class Tile>
    KVK_INLINE bool operator()(const Tile& t)
    {
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j)
            KVK_UNROLL
            for (int q = 0; q < 4; ++q)
                if (t.has(j, q) && (t.key(j, q) >> prefixShift) == prefix) atomicAdd(&sm.hist[(t.key(j, q) >> shift) & mask], 1u);
        return true;
    }
};

struct TieCutoff {   // position + 1 of the rem-th element equal to key, in position order
    Shared& sm;
    kvk_u32 key, rem, seen;

    template <class Tile>
    KVK_INLINE bool operator()(const Tile& t)
    {
        kvk_u32 flags = 0;
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j)
            KVK_UNROLL
            for (int q = 0; q < 4; ++q)
                if (t.has(j, q) && t.key(j, q) == key) flags |= 1u << (j * 4 + q);
        auto emit = [&](int j, int q, kvk_u32 rank) {
            if (rank + 1 == rem) sm.word[3] = t.pos(j, q) + 1;
        };
        seen += compact_tile(flags, seen, sm, emit);
        return seen < rem;   // uniform
    }
};

template <class Out>
struct Emit {   // the kept elements' positions, in order, to out[0, 1, ...]
    Shared& sm;
    Threshold rule;
    Out* out;
    kvk_u32 count;

    template <class Tile>
    KVK_INLINE bool operator()(const Tile& t)
    {
        kvk_u32 flags = 0;
        KVK_UNROLL
        for (int j = 0; j < kSub; ++j)
            KVK_UNROLL
            for (int q = 0; q < 4; ++q)
                if (t.has(j, q) && keeps(rule, t.key(j, q), t.pos(j, q))) flags |= 1u << (j * 4 + q);
        auto emit = [&](int j, int q, kvk_u32 rank) { out[rank] = (Out)t.pos(j, q); };
        count += compact_tile(flags, count, sm, emit);
        return true;
    }
};

// Levels 1 and 2 and the tie cutoff over `src`, after level 0 picked p0 for `need`.
template <class Src>
KVK_INLINE Threshold refine(const Src& src, const BinPick& p0, kvk_u32 need, Shared& sm)
{
    kvk_u32 rem = need - p0.above;
    if (rem == p0.count) return whole_prefix(p0.bin, 20);

    clear_hist(sm, kBins);
    HistLevel level1{sm, p0.bin, 20, 8, 0xFFFu};
    src.template tiles<false>(level1);
    const BinPick p1 = find_bin(sm, kBins, rem);
    const kvk_u32 prefix = (p0.bin << 12) | p1.bin;
    rem -= p1.above;
    if (rem == p1.count) return whole_prefix(prefix, 8);

    clear_hist(sm, kLastBins);
    HistLevel level2{sm, prefix, 8, 0, 0xFFu};
    src.template tiles<false>(level2);
    const BinPick p2 = find_bin(sm, kLastBins, rem);
    const kvk_u32 key = (prefix << 8) | p2.bin;
    rem -= p2.above;
    if (rem == p2.count) return Threshold{key, kAll};

    TieCutoff cut{sm, key, rem, 0};
    src.template tiles<true>(cut);
    __syncthreads();
    const kvk_u32 cutoff = sm.word[3];
    __syncthreads();
    return Threshold{key, cutoff};
}

struct Selection {
    Threshold rule;
    bool buffered;   // the kept elements are all in the candidate buffer (its first `count` entries)
    kvk_u32 count;
};

// The best `need` elements of src (0 <= need < src.total) as a threshold. Every thread must call it.
template <class Src>
KVK_INLINE Selection select(const Src& src, kvk_u32 need, kvk_u32* keys, kvk_u32* positions, kvk_u32 capacity, Shared& sm)
{
    if (need == 0) return Selection{Threshold{kSentinel, 0}, false, 0};

    // 1. The guess: collect everything when it fits, else sample.
    kvk_u32 b0 = 0;
    if (src.total > capacity) {
        clear_hist(sm, kBins);
        kvk_u32 sampled;
        block_exclusive_sum(src.sample(sm), sm, sampled);   // its barriers also complete the histogram
        const kvk_u64 expected = (kvk_u64)need * sampled / src.total;
        const kvk_u64 wanted = expected + expected / 2 + 16;
        b0 = sampled == 0 || wanted > sampled ? kNoBin : find_bin(sm, kBins, (kvk_u32)wanted).bin;
    }

    // 2. The stream pass: exact level-0 histogram, and the candidates at or above b0.
    clear_hist(sm, kBins);
    HistAll all{sm, b0, keys, positions, capacity, 0};
    src.template tiles<true>(all);
    const BinPick p0 = find_bin(sm, kBins, need);

    // 3. The candidates must hold every element at or above the exact bin.
    bool buffered = b0 != kNoBin && b0 <= p0.bin && all.count <= capacity;
    kvk_u32 count = all.count;
    if (!buffered && p0.above + p0.count <= capacity) {
        Collect exact{sm, p0.bin, keys, positions, 0};
        src.template tiles<true>(exact);
        count = exact.count;
        buffered = true;
        __syncthreads();   // the buffer is complete before anyone reads it (refine may return without a barrier)
    }

    // 4. The rest of the select.
    if (buffered) return Selection{refine(BufferSource{keys, positions, count}, p0, need, sm), true, count};
    return Selection{refine(src, p0, need, sm), false, 0};
}

// Writes the kept elements' positions in order to out (exactly `need` of them).
template <class Src, class Out>
KVK_INLINE void emit_kept(const Src& src, const Selection& s, const kvk_u32* keys, const kvk_u32* positions, Shared& sm, Out* out)
{
    Emit<Out> e{sm, s.rule, out, 0};
    if (s.buffered) BufferSource{keys, positions, s.count}.template tiles<true>(e);
    else src.template tiles<true>(e);
}

}  // namespace kvk_sel

using namespace kvk_sel;

// Per row r < rows (grid-stride over blockIdx.x), L = clamp(lengths[r], 0, columns):
//   L <= k:  indices[r] = 0, 1, ..., L - 1, then -1; counts[r] = L; threshold (0, all).
//   L > k:   indices[r] = 0..s-1, the best k - s - recent of [s, L - recent) in position order, L-recent..L-1;
//            counts[r] = k; threshold = the middle's rule (row-relative positions).
// indices/counts may be null (threshold mode), thresholds may be null. The host guarantees s + recent <= k whenever
// some row is longer than k (the device clamps the output to k entries regardless).
// workspace: per CTA, capacity keys then capacity positions (capacity a multiple of 4).
extern "C" __global__ __launch_bounds__(TOPK_THREADS, TOPK_MIN_BLOCKS) void selection_topk(
    const float* __restrict__ scores, const kvk_i32* __restrict__ lengths,
    kvk_i32* __restrict__ indices, kvk_i32* __restrict__ counts, kvk_u32* __restrict__ thresholds,
    kvk_u32* workspace, kvk_i32 rows, kvk_i32 columns, kvk_i32 k, kvk_i32 sinks, kvk_i32 recent,
    kvk_i32 smallest, kvk_i32 capacity)
{
    Shared sm(block_storage);
    if (rows <= 0 || columns <= 0 || k < 0 || sinks < 0 || recent < 0 || capacity < 0) return;
    kvk_u32* keys = workspace + (kvk_u64)blockIdx.x * 2 * (kvk_u32)capacity;
    kvk_u32* positions = keys + capacity;
    const kvk_u32 tid = threadIdx.x;

    for (kvk_u32 r = blockIdx.x; r < (kvk_u32)rows; r += gridDim.x) {
        const kvk_i32 length = kvk_min(kvk_max(kvk_ldg_i32(lengths + r), 0), columns);
        kvk_i32* out = indices ? indices + (kvk_i64)r * k : nullptr;
        if (length <= k) {
            if (out)
                for (kvk_u32 j = tid; j < (kvk_u32)k; j += kThreads) out[j] = j < (kvk_u32)length ? (kvk_i32)j : -1;
            if (tid == 0) {
                if (counts) counts[r] = length;
                if (thresholds) {
                    thresholds[2 * (kvk_u64)r] = 0;
                    thresholds[2 * (kvk_u64)r + 1] = kAll;
                }
            }
            continue;
        }
        // Protected ranges, clamped so that they fit in k (the host checked s + recent <= k).
        const kvk_i32 s = kvk_min(sinks, k), rc = kvk_min(recent, k - s);
        const kvk_u32 need = (kvk_u32)(k - s - rc);
        RowSource src{Segment{scores + (kvk_i64)r * columns, s, length - rc, 0}, PlainKey{smallest != 0}, (kvk_u32)(length - rc - s)};
        const Selection sel = select(src, need, keys, positions, (kvk_u32)capacity, sm);
        if (out) {
            for (kvk_u32 j = tid; j < (kvk_u32)s; j += kThreads) out[j] = (kvk_i32)j;
            for (kvk_u32 j = tid; j < (kvk_u32)rc; j += kThreads) out[s + need + j] = length - rc + (kvk_i32)j;
            if (need > 0) emit_kept(src, sel, keys, positions, sm, out + s);
        }
        if (tid == 0) {
            if (counts) counts[r] = k;
            if (thresholds) {
                thresholds[2 * (kvk_u64)r] = sel.rule.key;
                thresholds[2 * (kvk_u64)r + 1] = sel.rule.cutoff;
            }
        }
        __syncthreads();   // the next row reuses the shared memory and the candidate buffer
    }
}

// ---- the global selection: row-parallel passes around one CTA per sequence ------------------------------------
//
// Launch order (one stream): selection_topk in threshold mode (each row's forced rule), selection_global_histogram
// (rows), selection_global_plan (sequences), selection_global_collect (rows), selection_global_topk (sequences),
// selection_global_output (rows). The row kernels read the scores (three times with the forced sets) and write the
// indices, the sequence kernels touch only histograms and candidates, so all SMs stream. A sequence whose candidates
// do not fit its buffer (heavy ties) is done entirely by selection_global_topk, which then streams the sequence's
// rows itself (slow path, same result).
//
// Workspace words used below: histograms [rows, 4096]; plan [sequences, 4] = (bin, above, count, kPlan*);
// offsets [rows] = each row's first slot in its sequence's candidate buffer; per sequence a buffer of `capacity`
// keys, `capacity` positions and the kept list (budget rounded up to 4): `stride` words.

// Row r's level-0 histogram of its global keys (forced tokens as the sentinel) over [0, L).
extern "C" __global__ __launch_bounds__(TOPK_THREADS, TOPK_MIN_BLOCKS) void selection_global_histogram(
    const float* __restrict__ scores, const kvk_i32* __restrict__ lengths, const kvk_u32* __restrict__ thresholds,
    kvk_u32* __restrict__ histograms, kvk_i32 rows, kvk_i32 columns, kvk_i32 sinks, kvk_i32 recent, kvk_i32 smallest)
{
    Shared sm(block_storage);
    if (rows <= 0 || columns <= 0) return;
    for (kvk_u32 r = blockIdx.x; r < (kvk_u32)rows; r += gridDim.x) {
        const kvk_i64 length = kvk_min(kvk_max(kvk_ldg_i32(lengths + r), 0), columns);
        const ForcedKey keyOf{length, sinks, recent, Threshold{thresholds[2 * (kvk_u64)r], thresholds[2 * (kvk_u64)r + 1]}, smallest != 0};
        clear_hist(sm, kBins);
        HistAll all{sm, kNoBin, nullptr, nullptr, 0, 0};
        segment_tiles(Segment{scores + (kvk_i64)r * columns, 0, length, 0}, keyOf, all);
        __syncthreads();
        for (kvk_u32 b = threadIdx.x; b < kBins; b += kThreads) histograms[(kvk_u64)r * kBins + b] = sm.hist[b];
        __syncthreads();
    }
}

// Per sequence: the level-0 bin of the budget-th best key over the sum of its rows' histograms, and each row's slot
// range in the sequence's candidate buffer (its keys at or above that bin, rows in order). plan = (bin, above,
// count, kPlanBuffered) when the candidates fit `capacity`; (0, 0, 0, kPlanStream) when they do not;
// (0, 0, 0, kPlanKeepAll) when the sequence has at most `budget` tokens.
extern "C" __global__ __launch_bounds__(TOPK_THREADS, TOPK_MIN_BLOCKS) void selection_global_plan(
    const kvk_i32* __restrict__ lengths, const kvk_u32* __restrict__ histograms, kvk_u32* __restrict__ plan,
    kvk_u32* __restrict__ offsets, kvk_i32 sequences, kvk_i32 heads, kvk_i32 columns, kvk_i32 budget, kvk_i32 capacity)
{
    Shared sm(block_storage);
    if (sequences <= 0 || heads <= 0 || columns <= 0 || budget <= 0 || capacity < 0) return;
    const kvk_u32 tid = threadIdx.x;
    for (kvk_u32 q = blockIdx.x; q < (kvk_u32)sequences; q += gridDim.x) {
        const kvk_u64 firstRow = (kvk_u64)q * heads;
        kvk_u32 mine = 0, total;
        for (kvk_i32 h = (kvk_i32)tid; h < heads; h += kThreads) mine += (kvk_u32)kvk_min(kvk_max(kvk_ldg_i32(lengths + firstRow + h), 0), columns);
        block_exclusive_sum(mine, sm, total);
        // A sequence that keeps everything (2), or has more rows than the shared counters below (0: the slow path).
        if (total <= (kvk_u32)budget || heads > (kvk_i32)kBins) {
            if (tid == 0) {
                plan[4 * q] = 0;
                plan[4 * q + 1] = 0;
                plan[4 * q + 2] = 0;
                plan[4 * q + 3] = total <= (kvk_u32)budget ? kPlanKeepAll : kPlanStream;
            }
            continue;
        }
        for (kvk_u32 b = tid; b < kBins; b += kThreads) {
            kvk_u32 sum = 0;
            for (kvk_i32 h = 0; h < heads; ++h) sum += histograms[(firstRow + h) * kBins + b];
            sm.hist[b] = sum;
        }
        const BinPick p0 = find_bin(sm, kBins, (kvk_u32)budget);
        const bool fits = (kvk_u64)p0.above + p0.count <= (kvk_u32)capacity;
        __syncthreads();   // everyone has p0 before the histogram becomes the row counters
        // Row h's candidates: its keys in bins >= p0.bin. Counted per row in shared memory (integer atomics).
        for (kvk_u32 h = tid; h < (kvk_u32)heads; h += kThreads) sm.hist[h] = 0;
        __syncthreads();
        for (kvk_u32 b = p0.bin + tid; b < kBins; b += kThreads)
            for (kvk_i32 h = 0; h < heads; ++h) {
                const kvk_u32 c = histograms[(firstRow + h) * kBins + b];
                if (c) atomicAdd(&sm.hist[h], c);
            }
        __syncthreads();
        // Offsets: exclusive prefix over rows; thread t owns a run of consecutive rows.
        const kvk_u32 per = ((kvk_u32)heads + kThreads - 1) / kThreads;
        const kvk_u32 lo = kvk_min(tid * per, (kvk_u32)heads), hi = kvk_min(lo + per, (kvk_u32)heads);
        kvk_u32 local = 0, all;
        for (kvk_u32 h = lo; h < hi; ++h) local += sm.hist[h];
        kvk_u32 offset = block_exclusive_sum(local, sm, all);
        for (kvk_u32 h = lo; h < hi; ++h) {
            offsets[firstRow + h] = offset;
            offset += sm.hist[h];
        }
        if (tid == 0) {
            plan[4 * q] = p0.bin;
            plan[4 * q + 1] = p0.above;
            plan[4 * q + 2] = p0.count;
            plan[4 * q + 3] = fits ? kPlanBuffered : kPlanStream;
        }
        __syncthreads();   // the counters are read before the next sequence reuses the shared memory
    }
}

// Row r of a planned sequence: its global keys in bins >= plan.bin, in position order, to the sequence's candidate
// buffer from offsets[r] on (positions h * columns + i).
extern "C" __global__ __launch_bounds__(TOPK_THREADS, TOPK_MIN_BLOCKS) void selection_global_collect(
    const float* __restrict__ scores, const kvk_i32* __restrict__ lengths, const kvk_u32* __restrict__ thresholds,
    const kvk_u32* __restrict__ plan, const kvk_u32* __restrict__ offsets, kvk_u32* __restrict__ buffers,
    kvk_i32 rows, kvk_i32 heads, kvk_i32 columns, kvk_i32 sinks, kvk_i32 recent, kvk_i32 smallest, kvk_i32 capacity, kvk_i32 budget)
{
    Shared sm(block_storage);
    if (rows <= 0 || heads <= 0 || columns <= 0 || capacity < 0 || budget <= 0) return;
    const kvk_u64 stride = 2 * (kvk_u64)capacity + (((kvk_u32)budget + 3) & ~3u);
    for (kvk_u32 r = blockIdx.x; r < (kvk_u32)rows; r += gridDim.x) {
        const kvk_u32 q = r / (kvk_u32)heads, h = r - q * (kvk_u32)heads;
        if (plan[4 * q + 3] != kPlanBuffered) continue;   // uniform
        const kvk_i64 length = kvk_min(kvk_max(kvk_ldg_i32(lengths + r), 0), columns);
        const ForcedKey keyOf{length, sinks, recent, Threshold{thresholds[2 * (kvk_u64)r], thresholds[2 * (kvk_u64)r + 1]}, smallest != 0};
        kvk_u32* keys = buffers + q * stride + offsets[r];
        Collect collect{sm, plan[4 * q], keys, keys + capacity, 0};
        segment_tiles(Segment{scores + (kvk_i64)r * columns, 0, length, h * (kvk_u32)columns}, keyOf, collect);
        __syncthreads();
    }
}

// Per sequence q < sequences (grid-stride over blockIdx.x), rows q * heads + h: each row's forced tokens (thresholds
// from selection_topk in threshold mode with k = max(floor, s + r), plus the protected ranges) are kept; the rest of
// the budget goes to the best other tokens of all the sequence's rows, ties to the lower row, then the lower index.
// A buffered sequence finishes the select on the candidates selection_global_collect wrote; a streamed one runs the
// whole select over its rows here (the buffer then serves as this CTA's candidate buffer); a keep-all one is left to
// selection_global_output. The kept positions (h * columns + i, ascending) go to the sequence's kept list, and each
// row's run of it, (first, count), overwrites the row's forced rule in `thresholds`.
extern "C" __global__ __launch_bounds__(TOPK_THREADS, TOPK_MIN_BLOCKS) void selection_global_topk(
    const float* __restrict__ scores, const kvk_i32* __restrict__ lengths, kvk_u32* thresholds,
    const kvk_u32* __restrict__ plan, kvk_u32* buffers, kvk_i32 sequences, kvk_i32 heads, kvk_i32 columns,
    kvk_i32 budget, kvk_i32 sinks, kvk_i32 recent, kvk_i32 smallest, kvk_i32 capacity)
{
    Shared sm(block_storage);
    if (sequences <= 0 || heads <= 0 || columns <= 0 || budget <= 0 || capacity < 0) return;
    const kvk_u64 stride = 2 * (kvk_u64)capacity + (((kvk_u32)budget + 3) & ~3u);   // 16-byte aligned buffers
    const kvk_u32 tid = threadIdx.x;

    for (kvk_u32 q = blockIdx.x; q < (kvk_u32)sequences; q += gridDim.x) {
        const kvk_u32 how = plan[4 * q + 3];
        if (how == kPlanKeepAll) continue;   // uniform
        kvk_u32* keys = buffers + q * stride;
        kvk_u32* positions = keys + capacity;
        kvk_u32* kept = positions + capacity;
        const kvk_i64 firstRow = (kvk_i64)q * heads;
        SequenceSource src{scores + firstRow * columns, lengths + firstRow, thresholds + 2 * firstRow,
                           heads, columns, sinks, recent, smallest != 0, 0};
        kvk_u32 mine = 0;
        for (kvk_i32 h = (kvk_i32)tid; h < heads; h += kThreads) mine += (kvk_u32)src.length(h);
        block_exclusive_sum(mine, sm, src.total);   // > budget: the plan said so

        Selection sel;
        if (how == kPlanBuffered) {
            const BinPick p0{plan[4 * q], plan[4 * q + 1], plan[4 * q + 2]};
            const kvk_u32 count = p0.above + p0.count;
            sel = Selection{refine(BufferSource{keys, positions, count}, p0, (kvk_u32)budget, sm), true, count};
        } else {
            sel = select(src, (kvk_u32)budget, keys, positions, (kvk_u32)capacity, sm);
        }
        emit_kept(src, sel, keys, positions, sm, kept);
        __syncthreads();   // the kept list (global memory, this block) is complete

        // Row h's kept positions are the run [lower_bound(h * columns), lower_bound((h + 1) * columns)) of the list.
        auto lower_bound = [&](kvk_u32 value) {
            kvk_u32 lo = 0, hi = (kvk_u32)budget;
            while (lo < hi) {
                const kvk_u32 mid = (lo + hi) / 2;
                if (kept[mid] < value) lo = mid + 1;
                else hi = mid;
            }
            return lo;
        };
        for (kvk_i32 h = (kvk_i32)tid; h < heads; h += kThreads) {
            const kvk_u32 first = lower_bound((kvk_u32)h * (kvk_u32)columns);
            const kvk_u32 last = lower_bound((kvk_u32)(h + 1) * (kvk_u32)columns);
            thresholds[2 * (firstRow + h)] = first;
            thresholds[2 * (firstRow + h) + 1] = last - first;
        }
        __syncthreads();   // the next sequence reuses the shared memory and the buffers
    }
}

// Row r (grid-stride): its kept indices, ascending, to indices[r, 0..) and -1 up to `width`; counts[r]. A keep-all
// sequence's rows keep 0 .. L-1; the others copy their run (first, count) of the sequence's kept list.
extern "C" __global__ __launch_bounds__(TOPK_THREADS, TOPK_MIN_BLOCKS) void selection_global_output(
    const kvk_i32* __restrict__ lengths, const kvk_u32* __restrict__ runs, const kvk_u32* __restrict__ plan,
    const kvk_u32* __restrict__ buffers, kvk_i32* __restrict__ indices, kvk_i32* __restrict__ counts,
    kvk_i32 rows, kvk_i32 heads, kvk_i32 columns, kvk_i32 budget, kvk_i32 width, kvk_i32 capacity)
{
    if (rows <= 0 || heads <= 0 || columns <= 0 || budget <= 0 || width < 0 || capacity < 0) return;
    const kvk_u64 stride = 2 * (kvk_u64)capacity + (((kvk_u32)budget + 3) & ~3u);
    for (kvk_u32 r = blockIdx.x; r < (kvk_u32)rows; r += gridDim.x) {
        const kvk_u32 q = r / (kvk_u32)heads, h = r - q * (kvk_u32)heads;
        kvk_i32* out = indices + (kvk_i64)r * width;
        if (plan[4 * q + 3] == kPlanKeepAll) {
            const kvk_u32 length = (kvk_u32)kvk_min(kvk_max(kvk_ldg_i32(lengths + r), 0), columns);
            for (kvk_u32 j = threadIdx.x; j < (kvk_u32)width; j += kThreads) out[j] = j < length ? (kvk_i32)j : -1;
            if (threadIdx.x == 0) counts[r] = (kvk_i32)length;
            continue;
        }
        const kvk_u32 first = runs[2 * (kvk_u64)r], count = runs[2 * (kvk_u64)r + 1];
        const kvk_u32* kept = buffers + q * stride + 2 * (kvk_u64)capacity + first;
        const kvk_u32 base = h * (kvk_u32)columns;
        for (kvk_u32 j = threadIdx.x; j < (kvk_u32)width; j += kThreads) out[j] = j < count ? (kvk_i32)(kept[j] - base) : -1;
        if (threadIdx.x == 0) counts[r] = (kvk_i32)count;
    }
}
