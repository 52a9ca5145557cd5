// compact.cu — gather-compaction of a paged cache after eviction (research/kv_algorithms.md §6, P8).
//
//   selection_compact   for every row r = b * Hkv + h (a sequence's KV head), its kept tokens kept[r][0 .. count[r])
//                       (ascending token indices of the row's source sequence) are copied, in order, into the row's
//                       fresh single-head pages dstTable[r][*]: kept token j goes to slot dstTable[r][j / P'] * P' +
//                       j % P' of a pool with one KV head (decode attention's ragged layout, PoolKvHeads = 1).
//                       The source is either a pool of Hkv heads addressed by the sequence's table row b (the first
//                       eviction) or a single-head pool addressed by row r (later ones), NHD or HND.
//
// The kernel is byte-typed: a (slot, head) element is rowBytes bytes (K or V rows of any type, quantization codes,
// or one fp32 side value: scores, norms, per-token scales), so every buffer that follows the tokens moves with the
// same launch shape. Tables and indices were validated on the host (DeviceCompactionPlan).
//
// Kept indices are [rows, maxKept] with the row's count in counts[r] (entries past it are not read): the layout of
// the selection kernels' output. Work: one flat list of (row, kept position, 4- or 16-byte word) items; consecutive
// threads take consecutive words of a token row, so copies are coalesced within each row; grid-stride loops.
#include "common/kvk_types.cuh"
#include "common/kvk_vec.cuh"

namespace kvk_compact {

// Byte offset of (slot, head) in a pool of `heads` heads, pages of pageSize slots, rows of rowBytes bytes.
KVK_INLINE kvk_i64 element_offset(kvk_i64 page, int offset, int head, int heads, int pageSize, int hnd, int rowBytes)
{
    const kvk_i64 index = hnd ? (page * heads + head) * pageSize + offset : (page * pageSize + offset) * heads + head;
    return index * rowBytes;
}

template <typename Word>
KVK_INLINE void copy_words(const kvk_u8* __restrict__ source, kvk_u8* __restrict__ destination, const kvk_i32* __restrict__ sourceTable,
    const kvk_i32* __restrict__ kept, const kvk_i32* __restrict__ counts, const kvk_i32* __restrict__ destinationTable,
    int rows, int numKvHeads, int sourceHeads, int sourcePageSize, int sourceMaxPages, int sourceHnd, int destinationPageSize,
    int destinationMaxPages, int rowBytes, int maxKept)
{
    const int words = rowBytes / (int)sizeof(Word);
    const kvk_i64 work = (kvk_i64)rows * maxKept * words;
    const kvk_i64 stride = (kvk_i64)gridDim.x * blockDim.x;
    for (kvk_i64 w = (kvk_i64)blockIdx.x * blockDim.x + threadIdx.x; w < work; w += stride) {
        const int word = (int)(w % words);
        const kvk_i64 item = w / words;
        const int r = (int)(item / maxKept), j = (int)(item % maxKept);
        if (j >= counts[r]) continue;
        const int token = kept[item];
        const int b = r / numKvHeads, h = r % numKvHeads;
        const bool perRow = sourceHeads == 1;
        const kvk_i32* srcRow = sourceTable + (kvk_i64)(perRow ? r : b) * sourceMaxPages;
        const kvk_i64 srcOffset = element_offset(srcRow[token / sourcePageSize], token % sourcePageSize, perRow ? 0 : h, sourceHeads,
                                                 sourcePageSize, sourceHnd, rowBytes);
        const kvk_i64 dstOffset = element_offset(destinationTable[(kvk_i64)r * destinationMaxPages + j / destinationPageSize],
                                                 j % destinationPageSize, 0, 1, destinationPageSize, 0, rowBytes);
        reinterpret_cast<Word*>(destination + dstOffset)[word] = reinterpret_cast<const Word*>(source + srcOffset)[word];
    }
}

}  // namespace kvk_compact

using namespace kvk_compact;

// wordBytes 16 when rowBytes and both base pointers are multiples of 16 (host's choice), else 4.
extern "C" __global__ void selection_compact(
    const kvk_u8* __restrict__ source, kvk_u8* __restrict__ destination, const kvk_i32* __restrict__ sourceTable,
    const kvk_i32* __restrict__ kept, const kvk_i32* __restrict__ counts, const kvk_i32* __restrict__ destinationTable,
    kvk_i32 rows, kvk_i32 numKvHeads, kvk_i32 sourceHeads, kvk_i32 sourcePageSize, kvk_i32 sourceMaxPages, kvk_i32 sourceHnd,
    kvk_i32 destinationPageSize, kvk_i32 destinationMaxPages, kvk_i32 rowBytes, kvk_i32 maxKept, kvk_i32 wordBytes)
{
    if (wordBytes == 16)
        copy_words<kvk_v16>(source, destination, sourceTable, kept, counts, destinationTable, rows, numKvHeads, sourceHeads, sourcePageSize,
                            sourceMaxPages, sourceHnd, destinationPageSize, destinationMaxPages, rowBytes, maxKept);
    else
        copy_words<kvk_u32>(source, destination, sourceTable, kept, counts, destinationTable, rows, numKvHeads, sourceHeads, sourcePageSize,
                            sourceMaxPages, sourceHnd, destinationPageSize, destinationMaxPages, rowBytes, maxKept);
}
