// kvk_merge.cuh — combining split-KV partial attention states (flash-decoding's second pass), shared by every decode
// kernel family that splits a row's tokens over CTAs.
#pragma once
#include "common/kvk_types.cuh"
#include "common/kvk_math.cuh"

// Merges row `row` of `splits` partial states (normalised fp32 outputs [splits][numRows][dim], natural-log LSEs
// [splits][numRows]) with the 32 lanes of a warp: lse = ln sum_s e^lse_s, o = sum_s e^(lse_s - lse) o_s. Empty splits
// (lse -inf) weigh nothing; a row whose splits are all empty gets zeros and -inf. dim is a multiple of 4; store(offset,
// value) writes 4 results at element offset `offset` of the row (a multiple of 4). Returns the merged LSE.
template <typename Store>
KVK_INLINE float kvk_merge_splits_row(const float* partialOutput, const float* partialLse, kvk_i64 numRows, int dim, int splits,
                                      kvk_i64 row, int lane, Store store)
{
    const float log2e = 1.4426950408889634f, ln2 = 0.6931471805599453f;
    const float negInf = kvk_u32_as_f32(0xFF800000u);
    float mx = negInf;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, partialLse[(kvk_i64)s * numRows + row]);
    const bool empty = mx == negInf;
    float sum = 0.0f;
    if (!empty)
        for (int s = 0; s < splits; ++s) sum += kvk_ex2((partialLse[(kvk_i64)s * numRows + row] - mx) * log2e);
    const float inv = empty ? 0.0f : 1.0f / sum;
    for (int c = lane; c < dim / 4; c += 32) {
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (!empty) {
            for (int s = 0; s < splits; ++s) {
                const float w = kvk_ex2((partialLse[(kvk_i64)s * numRows + row] - mx) * log2e);
                if (w == 0.0f) continue;   // an empty split's zeros, or an underflow: nothing to add
                const float4 x = reinterpret_cast<const float4*>(partialOutput + ((kvk_i64)s * numRows + row) * dim)[c];
                acc.x = fmaf(w, x.x, acc.x);
                acc.y = fmaf(w, x.y, acc.y);
                acc.z = fmaf(w, x.z, acc.z);
                acc.w = fmaf(w, x.w, acc.w);
            }
        }
        store(c * 4, make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
    }
    return empty ? negInf : mx + kvk_lg2(sum) * ln2;
}
