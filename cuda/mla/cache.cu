// cache.cu — the MLA latent cache write (MlaCacheWriteSpec, src/KvKernels/Mla/MlaSpec.cs):
//
//   mla_cache_write   for token t with slots[t] >= 0: cache[slot] = [RMSNorm(latent[t]) ; RoPE(ropeKey[t], positions[t])]
//
// One warp per token (8 tokens per CTA). The pool has one head, so NHD and HND place a slot's row at slot * ROW.
// - RMSNorm: lane l sums the squares of latent pairs l, l + 32, ... (fmaf, pair elements in order), then a xor
//   butterfly (masks 16, 8, 4, 2, 1) adds the lanes' partials; mean = sum / LATENT_DIM, inv = 1 / sqrtf(mean + eps)
//   (IEEE division and square root: NVRTC's defaults), y = x * inv * w. The CPU twin (MlaCpu.WriteCache) reproduces
//   this order exactly, so the latent part is bit-identical on both.
// - RoPE: lane i < ROPE_DIM / 2 rotates pair i by the fp32 angle (float)position * invFreq[i] (the host's table of
//   MlaRope.InverseFrequencies) with kvk_sincos_accurate; the CPU's sin/cos differ by an ulp or two, so the rotated
//   part agrees within one unit of the cache type.
// Inputs are read as element pairs (4-byte loads): row strides and bases must be even / 4-byte aligned (checked by
// the host).
//
// Macros: LATENT_DIM (multiple of 32, <= 512), ROPE_DIM (multiple of 16, <= 64), INPUT_BF16 (0/1), ROPE_STYLE (0 none,
// 1 rotate-half, 2 interleaved), NORMALIZE (0/1).

#include "common/kvk_types.cuh"
#include "common/kvk_fp16.cuh"
#include "common/kvk_math.cuh"

#ifndef LATENT_DIM
#define LATENT_DIM 512
#endif
#ifndef ROPE_DIM
#define ROPE_DIM 64
#endif
#ifndef INPUT_BF16
#define INPUT_BF16 1
#endif
#ifndef ROPE_STYLE
#define ROPE_STYLE 2
#endif
#ifndef NORMALIZE
#define NORMALIZE 1
#endif

static_assert(LATENT_DIM % 32 == 0 && LATENT_DIM >= 32 && LATENT_DIM <= 512, "LATENT_DIM must be a multiple of 32 in 32..512");
static_assert(ROPE_DIM % 16 == 0 && ROPE_DIM >= 16 && ROPE_DIM <= 64, "ROPE_DIM must be a multiple of 16 in 16..64");
static_assert(ROPE_STYLE >= 0 && ROPE_STYLE <= 2, "ROPE_STYLE must be 0, 1 or 2");

#include "common/kvk_input.cuh"   // after INPUT_BF16 has its default

namespace kvk_mla_cache {

enum : int {
    kRowDim = LATENT_DIM + ROPE_DIM,
    kLatentPairs = LATENT_DIM / 2,
    kPairsPerLane = (kLatentPairs + 31) / 32,
    kWarps = 8,
};

}  // namespace kvk_mla_cache

using namespace kvk_mla_cache;

extern "C" __global__ __launch_bounds__(256) void mla_cache_write(
    const kvk_u16* __restrict__ latent, const kvk_u16* __restrict__ ropeKey, const kvk_i32* __restrict__ positions,
    const kvk_i32* __restrict__ slots, const kvk_u16* __restrict__ normWeight, const float* __restrict__ invFreq,
    kvk_u16* __restrict__ cache, kvk_i32 numTokens, kvk_i64 latentStride, kvk_i64 ropeStride, float epsilon)
{
    const int lane = (int)(threadIdx.x & 31);
    const kvk_i64 t = (kvk_i64)blockIdx.x * kWarps + (threadIdx.x >> 5);
    if (t >= numTokens) return;
    const kvk_i32 slot = slots[t];
    if (slot < 0) return;
    kvk_u16* const row = cache + (kvk_i64)slot * kRowDim;

    // ---- latent: load this lane's pairs, RMSNorm, store
    const kvk_u32* src = reinterpret_cast<const kvk_u32*>(latent + t * latentStride);
    float x[kPairsPerLane][2];
    float sum = 0.0f;
    KVK_UNROLL
    for (int i = 0; i < kPairsPerLane; ++i) {
        const int p = lane + 32 * i;
        x[i][0] = x[i][1] = 0.0f;
        if (p < kLatentPairs) kvk_in_unpack2(src[p], x[i][0], x[i][1]);
        sum = fmaf(x[i][0], x[i][0], sum);
        sum = fmaf(x[i][1], x[i][1], sum);
    }
#if NORMALIZE
    for (int mask = 16; mask >= 1; mask >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, mask);
    const float inv = 1.0f / sqrtf(sum / (float)LATENT_DIM + epsilon);
    const kvk_u32* w = reinterpret_cast<const kvk_u32*>(normWeight);
#else
    (void)sum; (void)epsilon; (void)normWeight;
#endif
    KVK_UNROLL
    for (int i = 0; i < kPairsPerLane; ++i) {
        const int p = lane + 32 * i;
        if (p >= kLatentPairs) continue;
#if NORMALIZE
        float w0, w1;
        kvk_in_unpack2(w[p], w0, w1);
        reinterpret_cast<kvk_u32*>(row)[p] = kvk_in_pack2(x[i][0] * inv * w0, x[i][1] * inv * w1);
#else
        reinterpret_cast<kvk_u32*>(row)[p] = src[p];
#endif
    }

    // ---- k_pe: lane i < ROPE_DIM / 2 rotates pair i
    if (lane >= ROPE_DIM / 2) return;
    const kvk_u16* pe = ropeKey + t * ropeStride;
    kvk_u16* const dst = row + LATENT_DIM;
#if ROPE_STYLE == 0
    (void)positions; (void)invFreq;
    reinterpret_cast<kvk_u32*>(dst)[lane] = reinterpret_cast<const kvk_u32*>(pe)[lane];
#else
    const int a = ROPE_STYLE == 2 ? 2 * lane : lane;
    const int b = ROPE_STYLE == 2 ? 2 * lane + 1 : lane + ROPE_DIM / 2;
    const float xa = kvk_in_to_float(pe[a]), xb = kvk_in_to_float(pe[b]);
    float sn, cs;
    kvk_sincos_accurate((float)positions[t] * invFreq[lane], sn, cs);
    dst[a] = kvk_float_to_in(xa * cs - xb * sn);
    dst[b] = kvk_float_to_in(xa * sn + xb * cs);
#endif
}
