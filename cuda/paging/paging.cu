// paging.cu — moving KV rows between paged K/V pools and contiguous tensors.
//
//   paging_append      vLLM reshape_and_cache: the Hkv rows of token t go to slot slots[t] of the
//                      pools (slot < 0 marks a padding token: nothing is written for it).
//   paging_gather      pools -> contiguous [B, maxTokens, Hkv, row] through the block table; tokens
//                      in [seqLens[b], maxTokens) are zeroed when zeroFill != 0, else left untouched.
//   paging_scatter     contiguous -> pools, the exact reverse of gather for tokens < seqLens[b].
//   paging_copy_pages  whole-page copies inside each pool (prefix sharing, copy-on-write).
// In every kernel the value tensors are optional: with a null value pointer only keys move.
//
// Layouts and row addressing: common/kvk_paged.cuh. The kernels are byte-typed: a row is rowBytes
// bytes of any element type (fp16, bf16, fp8, int8, packed int4, ...).
//
// Compile-time macros (defaults below):
//   VEC_BYTES      16 or 8: bytes per vector access. The host picks 16 when rowBytes and every base
//                  pointer and stride are multiples of 16, else 8 (rowBytes is always a multiple of 8).
//   KV_LAYOUT_HND  0 = NHD [pages, page_size, Hkv, row], 1 = HND [pages, Hkv, page_size, row].
//   PAGING_UNROLL  vectors each thread loads before it stores, per tensor (default 4).
//
// How the copies are organised (all four kernels are pure copies: no shared memory, no barriers):
// - The work of one item (the whole append, one sequence of gather/scatter, one page pair) is a
//   flat list of vectors, token-major: vector j = head * vecsPerRow + v of token n. Consecutive
//   threads take consecutive vectors, so a warp reads and writes whole contiguous rows (in NHD a
//   token's Hkv rows are one contiguous run on both sides) and every access is a full 16-/8-byte
//   vector, coalesced across the warp.
// - Grid-stride loops cover any gridDim and blockDim. x (and z) spread the vectors of an item over
//   threads; y strides over the items of gather/scatter (sequences) and copy_pages (page pairs).
//   append has no y role and uses every block of the grid for its one list.
// - Each thread first issues PAGING_UNROLL independent loads per tensor (K and V together: up to
//   8 x 16 B in flight per thread), then the stores: enough bytes in flight to cover DRAM latency
//   at moderate occupancy (research/kernel_techniques.md §1.2).
// - No division per vector: kvk_grid_walker turns the flat index into (token, j) with adds, the
//   page lookup splits the token index with a multiply-high (kvk_fastdiv), and the block table /
//   slot map is read once per vector through the read-only path (lanes of a warp mostly share the
//   token, so it is one broadcast transaction).
// - Loads use ld.global.nc.L1::no_allocate: every source is read exactly once and not written by
//   the kernel (copy_pages: the host guarantees no destination page is also a source page).
//   Stores are plain write-back stores: the destination is usually read by the next kernel.
// - Byte offsets are 64-bit everywhere.
// - __launch_bounds__(1024) holds every kernel to 64 registers, so any legal block size launches;
//   with NVRTC 12.4 all variants (sm_80/89/90/90a x VEC_BYTES x layout) fit with no spills.
//   PAGING_UNROLL=2 is the knob if a future compiler spills.
//
// Launch sizing (host): vectors per item = Hkv * rowBytes / VEC_BYTES per token (append: times
// numTokens; gather/scatter: times maxTokens per sequence; copy_pages: pageBytes / VEC_BYTES per
// pair). Enough x-blocks to fill the GPU a few waves over, but not more than about
// vectors / (blockDim * PAGING_UNROLL): surplus threads only test the loop bound and exit.
//
// Defensive clamps (cost nothing per vector): gather/scatter treat seqLens[b] as
// min(max(seqLens[b], 0), maxTokens, maxPagesPerSeq * pageSize), so a bad length can neither run
// past the output row nor past the sequence's block-table row; copy_pages skips a pair with a
// negative page, as append skips a negative slot. Page numbers read from the tables are trusted.
#include "common/kvk_types.cuh"
#include "common/kvk_index.cuh"
#include "common/kvk_vec.cuh"
#include "common/kvk_paged.cuh"

#ifndef VEC_BYTES
#define VEC_BYTES 16
#endif
#ifndef KV_LAYOUT_HND
#define KV_LAYOUT_HND 0
#endif
#ifndef PAGING_UNROLL
#define PAGING_UNROLL 4
#endif

static_assert(VEC_BYTES == 16 || VEC_BYTES == 8, "VEC_BYTES must be 16 or 8");
static_assert(KV_LAYOUT_HND == 0 || KV_LAYOUT_HND == 1, "KV_LAYOUT_HND must be 0 or 1");
static_assert(PAGING_UNROLL >= 1 && PAGING_UNROLL <= 16, "PAGING_UNROLL must be in [1, 16]");

namespace kvk_paging {

typedef kvk_vec<VEC_BYTES>::type vec_t;
typedef kvk_paged_layout<KV_LAYOUT_HND, VEC_BYTES> layout_t;
enum { kUnroll = PAGING_UNROLL };   // an enum, not a variable: nothing is emitted to global memory

KVK_INLINE const vec_t* vec_at(const kvk_u8* base, kvk_i64 byteOffset)
{
    return reinterpret_cast<const vec_t*>(base + byteOffset);
}

KVK_INLINE vec_t* vec_at(kvk_u8* base, kvk_i64 byteOffset)
{
    return reinterpret_cast<vec_t*>(base + byteOffset);
}

// Shapes every kernel needs before it can build a layout (rowBytes a multiple of VEC_BYTES is the
// host's promise; a row smaller than one vector would make the vector count zero).
KVK_INLINE bool valid_shape(kvk_i32 numKvHeads, kvk_i32 pageSize, kvk_i32 rowBytes)
{
    return numKvHeads > 0 && pageSize > 0 && rowBytes >= VEC_BYTES;
}

// Tokens of sequence b that are read from / written to the pool (see the clamps above).
KVK_INLINE kvk_u32 clamped_length(const kvk_i32* seqLens, kvk_u32 b, kvk_i32 maxTokens, kvk_i64 tableTokens)
{
    const kvk_i64 len = kvk_ldg_i32(seqLens + b);
    return (kvk_u32)kvk_max<kvk_i64>(0, kvk_min<kvk_i64>(len, kvk_min<kvk_i64>(maxTokens, tableTokens)));
}

}  // namespace kvk_paging

using namespace kvk_paging;

extern "C" __global__ __launch_bounds__(1024) void paging_append(
    const kvk_u8* __restrict__ key, const kvk_u8* __restrict__ value, const kvk_i32* __restrict__ slots,
    kvk_u8* __restrict__ keyPool, kvk_u8* __restrict__ valuePool,
    kvk_i32 numTokens, kvk_i32 numKvHeads, kvk_i32 pageSize, kvk_i32 rowBytes,
    kvk_i64 keyTokenStride, kvk_i64 valueTokenStride)
{
    if (numTokens <= 0 || !valid_shape(numKvHeads, pageSize, rowBytes)) return;
    const layout_t layout(pageSize, numKvHeads, rowBytes);
    const bool hasValue = value != nullptr && valuePool != nullptr;
    const kvk_u32 tokens = (kvk_u32)numTokens;

    // Flat list: token t (unit) x vector j of its Hkv rows (sub). Source rows of a token are
    // contiguous: key + t * keyTokenStride + j * VEC_BYTES.
    kvk_grid_walker w(kvk_grid_span_xyz(), layout.vecsPerToken, tokens);
    while (w.unit < tokens) {
        vec_t k[kUnroll], v[kUnroll];
        kvk_i64 dst[kUnroll];
        bool ok[kUnroll];
        KVK_UNROLL
        for (int u = 0; u < kUnroll; ++u) {
            const kvk_u32 t = w.unit, j = w.sub;
            w.advance();
            const bool inRange = t < tokens;
            // The source row is read even for a padding token (slot < 0): it is valid memory, and
            // the data load then does not wait for the slot load.
            const kvk_i32 slot = inRange ? kvk_ldg_i32(slots + t) : -1;
            // (Zeroed only so that no compiler sees a maybe-uninitialised read: a vector that was
            // not loaded is never stored. The same holds in scatter and copy_pages.)
            k[u] = vec_t{};
            v[u] = vec_t{};
            if (inRange) {
                const kvk_i64 inOff = (kvk_i64)j * VEC_BYTES;
                k[u] = kvk_ld_nc(vec_at(key, (kvk_i64)t * keyTokenStride + inOff));
                if (hasValue) v[u] = kvk_ld_nc(vec_at(value, (kvk_i64)t * valueTokenStride + inOff));
            }
            ok[u] = slot >= 0;
            dst[u] = ok[u] ? layout.slot_vec_offset(slot, j) : 0;
        }
        KVK_UNROLL
        for (int u = 0; u < kUnroll; ++u) {
            if (!ok[u]) continue;
            kvk_st(vec_at(keyPool, dst[u]), k[u]);
            if (hasValue) kvk_st(vec_at(valuePool, dst[u]), v[u]);
        }
    }
}

extern "C" __global__ __launch_bounds__(1024) void paging_gather(
    const kvk_u8* __restrict__ keyPool, const kvk_u8* __restrict__ valuePool,
    const kvk_i32* __restrict__ blockTable, const kvk_i32* __restrict__ seqLens,
    kvk_u8* __restrict__ keyOut, kvk_u8* __restrict__ valueOut,
    kvk_i32 batch, kvk_i32 maxPagesPerSeq, kvk_i32 maxTokens, kvk_i32 numKvHeads, kvk_i32 pageSize,
    kvk_i32 rowBytes, kvk_i32 zeroFill)
{
    if (batch <= 0 || maxTokens <= 0 || maxPagesPerSeq < 0 || !valid_shape(numKvHeads, pageSize, rowBytes)) return;
    const layout_t layout(pageSize, numKvHeads, rowBytes);
    const bool hasValue = valuePool != nullptr && valueOut != nullptr;
    const kvk_i64 tableTokens = (kvk_i64)maxPagesPerSeq * pageSize;
    // The thread's starting position is the same for every sequence: decompose it once.
    const kvk_grid_span span = kvk_grid_span_xz();
    const kvk_grid_walker first(span, layout.vecsPerToken, (kvk_u32)maxTokens);

    for (kvk_u32 b = blockIdx.y; b < (kvk_u32)batch; b += gridDim.y) {
        const kvk_u32 len = clamped_length(seqLens, b, maxTokens, tableTokens);
        const kvk_u32 end = zeroFill ? (kvk_u32)maxTokens : len;
        const kvk_i32* table = blockTable + (kvk_i64)b * maxPagesPerSeq;
        // The output side is contiguous in walk order: flat vector index f of the sequence is at
        // byte f * VEC_BYTES of its [maxTokens, Hkv, row] block, and f < end * vecsPerToken says
        // whether the position is in range. So the store phase needs no per-vector state beyond
        // the loaded data (this keeps the kernel within 64 registers without spilling).
        vec_t* keyDst = vec_at(keyOut, (kvk_i64)b * maxTokens * layout.tokenBytes);
        vec_t* valueDst = hasValue ? vec_at(valueOut, (kvk_i64)b * maxTokens * layout.tokenBytes) : nullptr;
        const kvk_u64 endFlat = (kvk_u64)end * layout.vecsPerToken;

        kvk_grid_walker w = first;
        while (w.unit < end) {
            const kvk_u64 flat0 = kvk_mad_wide_u32(w.unit, layout.vecsPerToken, w.sub);
            vec_t k[kUnroll], v[kUnroll];
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                const kvk_u32 n = w.unit, j = w.sub;
                w.advance();
                k[u] = vec_t{};   // tokens in [len, end) are the zero fill
                v[u] = vec_t{};
                if (n < len) {
                    kvk_u32 pageIndex, offset;
                    layout.split_token(n, pageIndex, offset);
                    const kvk_i32 page = kvk_ldg_i32(table + pageIndex);
                    const kvk_i64 src = layout.vec_offset(page, offset, j);
                    k[u] = kvk_ld_nc(vec_at(keyPool, src));
                    if (hasValue) v[u] = kvk_ld_nc(vec_at(valuePool, src));
                }
            }
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                const kvk_u64 f = flat0 + u * span.stride;
                if (f >= endFlat) break;   // positions only grow with u
                kvk_st(keyDst + f, k[u]);
                if (hasValue) kvk_st(valueDst + f, v[u]);
            }
        }
    }
}

extern "C" __global__ __launch_bounds__(1024) void paging_scatter(
    const kvk_u8* __restrict__ keyIn, const kvk_u8* __restrict__ valueIn,
    const kvk_i32* __restrict__ blockTable, const kvk_i32* __restrict__ seqLens,
    kvk_u8* __restrict__ keyPool, kvk_u8* __restrict__ valuePool,
    kvk_i32 batch, kvk_i32 maxPagesPerSeq, kvk_i32 maxTokens, kvk_i32 numKvHeads, kvk_i32 pageSize,
    kvk_i32 rowBytes)
{
    if (batch <= 0 || maxTokens <= 0 || maxPagesPerSeq < 0 || !valid_shape(numKvHeads, pageSize, rowBytes)) return;
    const layout_t layout(pageSize, numKvHeads, rowBytes);
    const bool hasValue = valueIn != nullptr && valuePool != nullptr;
    const kvk_i64 tableTokens = (kvk_i64)maxPagesPerSeq * pageSize;
    const kvk_grid_walker first(kvk_grid_span_xz(), layout.vecsPerToken, (kvk_u32)maxTokens);

    for (kvk_u32 b = blockIdx.y; b < (kvk_u32)batch; b += gridDim.y) {
        const kvk_u32 len = clamped_length(seqLens, b, maxTokens, tableTokens);
        const kvk_i32* table = blockTable + (kvk_i64)b * maxPagesPerSeq;
        const kvk_i64 inBase = (kvk_i64)b * maxTokens * layout.tokenBytes;

        kvk_grid_walker w = first;
        while (w.unit < len) {
            vec_t k[kUnroll], v[kUnroll];
            kvk_i64 dst[kUnroll];
            bool ok[kUnroll];
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                const kvk_u32 n = w.unit, j = w.sub;
                w.advance();
                ok[u] = n < len;
                k[u] = vec_t{};
                v[u] = vec_t{};
                dst[u] = 0;
                if (ok[u]) {
                    const kvk_i64 src = inBase + (kvk_i64)n * layout.tokenBytes + (kvk_i64)j * VEC_BYTES;
                    k[u] = kvk_ld_nc(vec_at(keyIn, src));
                    if (hasValue) v[u] = kvk_ld_nc(vec_at(valueIn, src));
                    kvk_u32 pageIndex, offset;
                    layout.split_token(n, pageIndex, offset);
                    dst[u] = layout.vec_offset(kvk_ldg_i32(table + pageIndex), offset, j);
                }
            }
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                if (!ok[u]) continue;
                kvk_st(vec_at(keyPool, dst[u]), k[u]);
                if (hasValue) kvk_st(vec_at(valuePool, dst[u]), v[u]);
            }
        }
    }
}

// The pool is both read and written (disjoint pages), so its pointers are not __restrict__.
extern "C" __global__ __launch_bounds__(1024) void paging_copy_pages(
    kvk_u8* keyPool, kvk_u8* valuePool,
    const kvk_i32* __restrict__ pairs, kvk_i32 numPairs, kvk_i64 pageBytes)
{
    if (numPairs <= 0 || pageBytes < VEC_BYTES) return;
    const kvk_u64 numVecs = (kvk_u64)pageBytes / VEC_BYTES;
    const bool hasValue = valuePool != nullptr;
    const kvk_grid_span span = kvk_grid_span_xz();

    for (kvk_u32 p = blockIdx.y; p < (kvk_u32)numPairs; p += gridDim.y) {
        const kvk_i32 srcPage = kvk_ldg_i32(pairs + 2 * (kvk_i64)p);
        const kvk_i32 dstPage = kvk_ldg_i32(pairs + 2 * (kvk_i64)p + 1);
        if (srcPage < 0 || dstPage < 0) continue;
        const vec_t* keySrc = vec_at(static_cast<const kvk_u8*>(keyPool), srcPage * pageBytes);
        vec_t* keyDst = vec_at(keyPool, dstPage * pageBytes);
        const vec_t* valueSrc = hasValue ? vec_at(static_cast<const kvk_u8*>(valuePool), srcPage * pageBytes) : nullptr;
        vec_t* valueDst = hasValue ? vec_at(valuePool, dstPage * pageBytes) : nullptr;

        for (kvk_u64 i = span.start; i < numVecs; i += kUnroll * span.stride) {
            vec_t k[kUnroll], v[kUnroll];
            bool ok[kUnroll];
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                const kvk_u64 idx = i + u * span.stride;
                ok[u] = idx < numVecs;
                k[u] = vec_t{};
                v[u] = vec_t{};
                if (ok[u]) {
                    k[u] = kvk_ld_nc(keySrc + idx);
                    if (hasValue) v[u] = kvk_ld_nc(valueSrc + idx);
                }
            }
            KVK_UNROLL
            for (int u = 0; u < kUnroll; ++u) {
                if (!ok[u]) continue;
                const kvk_u64 idx = i + u * span.stride;
                kvk_st(keyDst + idx, k[u]);
                if (hasValue) kvk_st(valueDst + idx, v[u]);
            }
        }
    }
}
