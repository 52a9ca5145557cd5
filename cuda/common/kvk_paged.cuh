// kvk_paged.cuh — address arithmetic of paged K/V pools, shared by every kernel that reads or
// writes them (paging/, and the paged attention kernels).
//
// A pool is a byte array of pages; a row is one (token, KV head) vector of rowBytes bytes
// (head_dim x element size, so the same code serves fp16, bf16, fp8, int8, packed int4, ...):
//   NHD (KV_LAYOUT_HND = 0): [num_pages, page_size, Hkv, row]  — a token's Hkv rows are contiguous
//   HND (KV_LAYOUT_HND = 1): [num_pages, Hkv, page_size, row]  — a head's page_size rows are contiguous
// A whole page (page_size * Hkv * rowBytes bytes) is contiguous in both. A slot is
// page * page_size + offset. All byte offsets are 64-bit: pools can be many GiB.
//
// Inside a token, vectors are numbered j = head * vecsPerRow + v (v = vector within the row), the
// order of a contiguous [Hkv, row] token; in NHD that is also the pool order, so vector j of a token
// is simply j * VB bytes after its first row, and only HND has to split j into (head, v).
#pragma once
#include "common/kvk_types.cuh"
#include "common/kvk_index.cuh"

template <int HND, int VB>
struct kvk_paged_layout {
    kvk_i64 pageBytes;      // pageSize * Hkv * rowBytes
    kvk_i64 tokenBytes;     // Hkv * rowBytes: one token's rows
    kvk_i64 tokenStride;    // bytes between consecutive offsets of one head in a page
    kvk_i64 headStride;     // bytes between consecutive heads of one token
    kvk_u32 vecsPerRow;     // rowBytes / VB
    kvk_u32 vecsPerToken;   // Hkv * vecsPerRow
    kvk_fastdiv pageDiv;    // by pageSize: slot or token index -> (page, offset)
    kvk_fastdiv rowDiv;     // by vecsPerRow: j -> (head, v); used by HND only

    // Requires pageSize >= 1, numKvHeads >= 1, rowBytes a positive multiple of VB.
    KVK_INLINE kvk_paged_layout(kvk_i32 pageSize, kvk_i32 numKvHeads, kvk_i32 rowBytes)
        : pageBytes((kvk_i64)pageSize * numKvHeads * rowBytes),
          tokenBytes((kvk_i64)numKvHeads * rowBytes),
          tokenStride(HND ? (kvk_i64)rowBytes : (kvk_i64)numKvHeads * rowBytes),
          headStride(HND ? (kvk_i64)pageSize * rowBytes : (kvk_i64)rowBytes),
          vecsPerRow((kvk_u32)rowBytes / VB),
          vecsPerToken((kvk_u32)numKvHeads * ((kvk_u32)rowBytes / VB)),
          pageDiv((kvk_u32)pageSize),
          rowDiv((kvk_u32)rowBytes / VB)
    {
    }

    // Byte offset of the row (token `offset` of page `page`, KV head `head`). The one formula for
    // both layouts: only the two strides differ.
    KVK_INLINE kvk_i64 row_offset(kvk_i32 page, kvk_u32 offset, kvk_u32 head) const
    {
        return (kvk_i64)page * pageBytes + (kvk_i64)offset * tokenStride + (kvk_i64)head * headStride;
    }

    // Byte offset of vector j (0 <= j < vecsPerToken) of token `offset` in page `page`.
    KVK_INLINE kvk_i64 vec_offset(kvk_i32 page, kvk_u32 offset, kvk_u32 j) const
    {
        if constexpr (HND != 0) {
            kvk_u32 head, v;
            rowDiv.divmod(j, head, v);
            return row_offset(page, offset, head) + (kvk_i64)v * VB;
        }
        return row_offset(page, offset, 0) + (kvk_i64)j * VB;
    }

    // Same, for the token stored at `slot` (>= 0). In NHD, slot * tokenBytes is already the offset
    // of the token's first row (pageBytes = pageSize * tokenBytes), so no division is needed.
    KVK_INLINE kvk_i64 slot_vec_offset(kvk_i32 slot, kvk_u32 j) const
    {
        if constexpr (HND != 0) {
            kvk_u32 page, offset;
            pageDiv.divmod((kvk_u32)slot, page, offset);
            return vec_offset((kvk_i32)page, offset, j);
        }
        return (kvk_i64)slot * tokenBytes + (kvk_i64)j * VB;
    }

    // Logical token index n of a sequence -> (index into its block-table row, offset in the page).
    KVK_INLINE void split_token(kvk_u32 n, kvk_u32& pageIndex, kvk_u32& offset) const
    {
        pageDiv.divmod(n, pageIndex, offset);
    }
};
