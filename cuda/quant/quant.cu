// quant.cu — quantized KV storage: quantize on append, dequantize a batch, calibrate scales.
//
//   quant_quantize        source rows [numTokens, Hkv, D] (token stride in elements) -> codes (+ per-token fp32
//                         scales, + (scale, minimum) pairs in the input type) at each token's slot; for token-axis
//                         formats (KIVI keys) one slot per group of G tokens, the slot of its first token.
//   quant_dequantize      block table + lengths -> contiguous [B, maxTokens, Hkv, D] in the input type (zeros past
//                         each sequence's length).
//   quant_amax            |x| maxima of [numTokens, Hkv, D] into amaxBits[1 or Hkv] (atomicMax on the bits of
//                         non-negative floats: order-independent, so deterministic); the host zeroes amaxBits first.
//   quant_amax_scales     scales[i] = amax > 0 ? amax / divisor : 1.
//
// The math is KvFormat's (src/KvKernels/Quantization/KvFormat.cs) and its CPU twin KvQuantCpu: fp32, IEEE
// division, rintf (half to even), fp8 via kvk_fp8.cuh (RNE, satfinite), fmaf for asymmetric decoding. Codes,
// scales and parameters equal the CPU's bit for bit.
//
// Compile-time macros: INPUT_BF16 (0 fp16, 1 bf16 data and group parameters); QUANT_CODEC (0 fp8 e4m3,
// 1 fp8 e5m2, 2 int8 symmetric, 3 asymmetric); QUANT_BITS (8; 4 or 2 for asymmetric). Run-time: the layout
// (NHD/HND), group axis and size, scale granularity (0 tensor, 1 KV head, 2 token), fp8 convention.
//
// Storage (QuantizedKvPool): channel-axis rows of D * BITS / 8 bytes per (slot, head), slot-major like a paged
// pool; token-axis blocks [page][page_size / G][Hkv] (NHD) or [page][Hkv][page_size / G] (HND) of D runs of
// G * BITS / 8 bytes. Codes are packed low bits first into little-endian 32-bit words.
//
// Work decomposition: these are small streaming kernels run once per step (append) or for tests (dequantize);
// one thread per unit of independent work, grid-stride loops:
//   quantize, channel axis   one thread per (token, head, group of G channels); fp8/int8 one per (token, head)
//   quantize, token axis     one thread per (group of G tokens, head, channel): neighbouring lanes read
//                            neighbouring channels of the same token, so the loads coalesce
//   dequantize               one thread per (sequence, token, head, 8 channels): one 16-byte store
#include "common/kvk_types.cuh"
#include "common/kvk_index.cuh"
#include "common/kvk_fp16.cuh"
#include "common/kvk_fp8.cuh"
#include "common/kvk_vec.cuh"
#include "common/kvk_quant.cuh"

#ifndef INPUT_BF16
#define INPUT_BF16 0
#endif
#ifndef QUANT_CODEC
#define QUANT_CODEC 0
#endif
#ifndef QUANT_BITS
#define QUANT_BITS 8
#endif

#include "common/kvk_input.cuh"

static_assert(QUANT_CODEC >= 0 && QUANT_CODEC <= 3, "QUANT_CODEC must be 0..3");
static_assert(QUANT_CODEC == 3 ? (QUANT_BITS == 8 || QUANT_BITS == 4 || QUANT_BITS == 2) : QUANT_BITS == 8,
              "fp8 and int8 codes are 8 bits; asymmetric codes 8, 4 or 2");

namespace kvk_quant {

enum : int { kBits = QUANT_BITS, kCodeMax = (1 << QUANT_BITS) - 1 };
enum : int { kPerTensor = KVK_Q_PER_TENSOR, kPerHead = KVK_Q_PER_HEAD, kPerToken = KVK_Q_PER_TOKEN };

KVK_INLINE kvk_u32 sym_code(float x, float s, int reciprocal) { return kvk_q_sym_code<QUANT_CODEC>(x, s, reciprocal); }
KVK_INLINE float sym_value(kvk_u32 code) { return kvk_q_sym_value<QUANT_CODEC>(code); }
KVK_INLINE kvk_u32 asym_code(float x, float s, float mn) { return kvk_q_asym_code<kBits>(x, s, mn); }

KVK_INLINE float load_in(const kvk_u16* p) { return kvk_in_to_float(*p); }

// Quantizes the n values x[0], x[stride], ... (n a multiple of 32 / kBits) as one asymmetric group: stores the
// rounded (scale, minimum) at param and the packed codes as n * kBits / 32 words at dst.
KVK_INLINE void quantize_group(const kvk_u16* x, kvk_i64 stride, int n, kvk_u32* dst, kvk_u16* param)
{
    float mn = load_in(x), mx = mn;
    for (int j = 1; j < n; ++j) {
        const float v = load_in(x + j * stride);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
    const kvk_u16 sBits = kvk_float_to_in((mx - mn) / (float)kCodeMax);
    const kvk_u16 mnBits = kvk_float_to_in(mn);
    param[0] = sBits;
    param[1] = mnBits;
    const float s = kvk_in_to_float(sBits), m = kvk_in_to_float(mnBits);
    const int perWord = 32 / kBits;
    for (int w = 0; w < n / perWord; ++w) {
        kvk_u32 word = 0;
        for (int j = 0; j < perWord; ++j) word |= asym_code(load_in(x + (w * perWord + j) * stride), s, m) << (j * kBits);
        dst[w] = word;
    }
}

}  // namespace kvk_quant

using namespace kvk_quant;

extern "C" __global__ void quant_quantize(
    const kvk_u16* __restrict__ source, const kvk_i32* __restrict__ slots, const float* __restrict__ givenScales,
    kvk_u8* __restrict__ codes, float* __restrict__ tokenScales, kvk_u16* __restrict__ groupParams,
    kvk_i32 numSlots, kvk_i64 tokenStride, kvk_i32 numKvHeads, kvk_i32 headDim, kvk_i32 pageSize, kvk_i32 hnd,
    kvk_i32 tokenAxis, kvk_i32 group, kvk_i32 granularity, kvk_i32 reciprocal)
{
    const kvk_i64 stride = (kvk_i64)gridDim.x * blockDim.x;
    const kvk_i64 first = (kvk_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (tokenAxis) {
        // (group of tokens i, head h, channel c), c fastest.
        const kvk_i64 work = (kvk_i64)numSlots * numKvHeads * headDim;
        for (kvk_i64 w = first; w < work; w += stride) {
            const int c = (int)(w % headDim);
            const int h = (int)(w / headDim % numKvHeads);
            const kvk_i64 i = w / headDim / numKvHeads;
            const kvk_i32 slot = slots[i];
            if (slot < 0) continue;
            const kvk_i64 run = kvk_q_block_index(slot, h, numKvHeads, pageSize, group, hnd) * headDim + c;
            quantize_group(source + i * group * tokenStride + (kvk_i64)h * headDim + c, tokenStride, group,
                           reinterpret_cast<kvk_u32*>(codes + run * (group * kBits / 8)), groupParams + run * 2);
        }
        return;
    }
#if QUANT_CODEC == 3
    (void)givenScales; (void)tokenScales; (void)granularity; (void)reciprocal;
    // (token t, head h, channel group k), k fastest.
    const int groups = headDim / group;
    const kvk_i64 work = (kvk_i64)numSlots * numKvHeads * groups;
    for (kvk_i64 w = first; w < work; w += stride) {
        const int k = (int)(w % groups);
        const int h = (int)(w / groups % numKvHeads);
        const kvk_i64 t = w / groups / numKvHeads;
        const kvk_i32 slot = slots[t];
        if (slot < 0) continue;
        const kvk_i64 row = kvk_q_row_index(slot, h, numKvHeads, pageSize, hnd);
        quantize_group(source + t * tokenStride + (kvk_i64)h * headDim + k * group, 1, group,
                       reinterpret_cast<kvk_u32*>(codes + row * (headDim * kBits / 8) + k * (group * kBits / 8)),
                       groupParams + (row * groups + k) * 2);
    }
#else
    (void)groupParams; (void)group;
    // (token t, head h), h fastest.
    const kvk_i64 work = (kvk_i64)numSlots * numKvHeads;
    for (kvk_i64 w = first; w < work; w += stride) {
        const int h = (int)(w % numKvHeads);
        const kvk_i64 t = w / numKvHeads;
        const kvk_i32 slot = slots[t];
        if (slot < 0) continue;
        const kvk_u16* x = source + t * tokenStride + (kvk_i64)h * headDim;
        const kvk_i64 row = kvk_q_row_index(slot, h, numKvHeads, pageSize, hnd);
        float scale;
        if (granularity == kPerToken) {
            float amax = 0.0f;
            for (int c = 0; c < headDim; ++c) amax = fmaxf(amax, fabsf(load_in(x + c)));
            scale = amax / kvk_q_sym_max<QUANT_CODEC>();
            tokenScales[row] = scale;
        } else {
            scale = givenScales[granularity == kPerTensor ? 0 : h];
        }
        kvk_u32* dst = reinterpret_cast<kvk_u32*>(codes + row * headDim);
        for (int c = 0; c < headDim; c += 4) {
            dst[c / 4] = sym_code(load_in(x + c), scale, reciprocal) | (sym_code(load_in(x + c + 1), scale, reciprocal) << 8) |
                         (sym_code(load_in(x + c + 2), scale, reciprocal) << 16) | (sym_code(load_in(x + c + 3), scale, reciprocal) << 24);
        }
    }
#endif
}

extern "C" __global__ void quant_dequantize(
    const kvk_u8* __restrict__ codes, const float* __restrict__ scales, const kvk_u16* __restrict__ groupParams,
    const kvk_i32* __restrict__ blockTable, const kvk_i32* __restrict__ lengths, kvk_u16* __restrict__ destination,
    kvk_i32 batch, kvk_i32 maxPagesPerSeq, kvk_i32 maxTokens, kvk_i32 numKvHeads, kvk_i32 headDim, kvk_i32 pageSize,
    kvk_i32 hnd, kvk_i32 tokenAxis, kvk_i32 group, kvk_i32 granularity)
{
    const int chunks = headDim / 8;
    const kvk_i64 work = (kvk_i64)batch * maxTokens * numKvHeads * chunks;
    const kvk_i64 stride = (kvk_i64)gridDim.x * blockDim.x;
    for (kvk_i64 w = (kvk_i64)blockIdx.x * blockDim.x + threadIdx.x; w < work; w += stride) {
        const int u = (int)(w % chunks);
        const int h = (int)(w / chunks % numKvHeads);
        const kvk_i64 bn = w / chunks / numKvHeads;
        const int n = (int)(bn % maxTokens), b = (int)(bn / maxTokens);
        float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int length = kvk_max(0, kvk_min(lengths[b], kvk_min(maxTokens, maxPagesPerSeq * pageSize)));
        if (n < length) {
            const kvk_i64 slot = (kvk_i64)blockTable[(kvk_i64)b * maxPagesPerSeq + n / pageSize] * pageSize + n % pageSize;
#if QUANT_CODEC == 3
            (void)scales; (void)granularity;
            if (tokenAxis) {
                const kvk_i64 block = kvk_q_block_index(slot, h, numKvHeads, pageSize, group, hnd);
                const int j = (int)(slot % group);
                for (int e = 0; e < 8; ++e) {
                    const kvk_i64 run = block * headDim + u * 8 + e;
                    const kvk_u32 word = reinterpret_cast<const kvk_u32*>(codes + run * (group * kBits / 8))[j * kBits / 32];
                    const kvk_u32 q = (word >> (j * kBits % 32)) & kCodeMax;
                    f[e] = fmaf((float)q, kvk_in_to_float(groupParams[run * 2]), kvk_in_to_float(groupParams[run * 2 + 1]));
                }
            } else {
                const kvk_i64 row = kvk_q_row_index(slot, h, numKvHeads, pageSize, hnd);
                const kvk_u32* words = reinterpret_cast<const kvk_u32*>(codes + row * (headDim * kBits / 8));
                const kvk_u16* param = groupParams + (row * (headDim / group) + u * 8 / group) * 2;
                const float s = kvk_in_to_float(param[0]), mn = kvk_in_to_float(param[1]);
                for (int e = 0; e < 8; ++e) {
                    const int bit = (u * 8 + e) * kBits;
                    f[e] = fmaf((float)((words[bit / 32] >> (bit % 32)) & kCodeMax), s, mn);
                }
            }
#else
            (void)groupParams; (void)tokenAxis; (void)group;
            const kvk_i64 row = kvk_q_row_index(slot, h, numKvHeads, pageSize, hnd);
            const float s = scales[granularity == kPerTensor ? 0 : granularity == kPerHead ? h : row];
            const kvk_u8* c = codes + row * headDim + u * 8;
            for (int e = 0; e < 8; ++e) f[e] = sym_value(c[e]) * s;
#endif
        }
        kvk_v16 out;
        out.x = kvk_in_pack2(f[0], f[1]);
        out.y = kvk_in_pack2(f[2], f[3]);
        out.z = kvk_in_pack2(f[4], f[5]);
        out.w = kvk_in_pack2(f[6], f[7]);
        kvk_st(reinterpret_cast<kvk_v16*>(destination + (bn * numKvHeads + h) * headDim + u * 8), out);
    }
}

extern "C" __global__ void quant_amax(const kvk_u16* __restrict__ source, kvk_i64 numTokens, kvk_i32 numKvHeads, kvk_i32 headDim,
                                      kvk_i32 perHead, kvk_u32* __restrict__ amaxBits)
{
    // One thread per (token, head) row; the row's max goes to its target with one atomicMax.
    const kvk_i64 work = numTokens * numKvHeads;
    const kvk_i64 stride = (kvk_i64)gridDim.x * blockDim.x;
    for (kvk_i64 w = (kvk_i64)blockIdx.x * blockDim.x + threadIdx.x; w < work; w += stride) {
        const kvk_u16* x = source + w * headDim;
        float amax = 0.0f;
        for (int c = 0; c < headDim; ++c) amax = fmaxf(amax, fabsf(load_in(x + c)));
        atomicMax(amaxBits + (perHead ? (int)(w % numKvHeads) : 0), kvk_f32_as_u32(amax));
    }
}

extern "C" __global__ void quant_amax_scales(const kvk_u32* __restrict__ amaxBits, kvk_i32 count, float divisor, float* __restrict__ scales)
{
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < count) {
        const float amax = kvk_u32_as_f32(amaxBits[i]);
        scales[i] = amax > 0.0f ? amax / divisor : 1.0f;
    }
}
