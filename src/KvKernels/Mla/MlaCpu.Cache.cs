using KvKernels.Attention;
using KvKernels.Paging;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Mla;

public static unsafe partial class MlaCpu
{
    /// <summary>
    /// The latent cache write (<see cref="MlaCacheWriteSpec"/>): for each token with a slot, RMSNorm of the latent
    /// (sum of squares in the GPU kernel's order: 32 lane partials over element pairs, then a xor butterfly — so the
    /// latent part equals the GPU's bit for bit) and RoPE of k_pe at its position (fp32 angle, sin/cos within an ulp of
    /// the GPU's), written as one row at the slot of the pool. Slot −1 skips the token; other slots are untouched.
    /// </summary>
    /// <param name="spec">Shapes, pool, RoPE, norm options.</param>
    /// <param name="latent">c_kv <c>[T, LatentDim]</c> with row stride <see cref="MlaCacheWriteSpec.LatentStride"/>.</param>
    /// <param name="ropeKey">k_pe before RoPE <c>[T, RopeDim]</c> with row stride <see cref="MlaCacheWriteSpec.RopeStride"/>.</param>
    /// <param name="positions"><c>[T]</c> token positions (any int; RoPE at a negative position is defined); empty without RoPE.</param>
    /// <param name="slots"><c>[T]</c> destination slots (page · page size + offset) or −1.</param>
    /// <param name="normWeight">RMSNorm weight <c>[LatentDim]</c>; empty without <see cref="MlaCacheWriteSpec.Normalize"/>.</param>
    /// <param name="cache">The latent pool, written at the slots.</param>
    /// <exception cref="ArgumentException">A bad spec, buffer length, element type or slot; nothing is written.</exception>
    public static void WriteCache<T>(in MlaCacheWriteSpec spec, ReadOnlySpan<T> latent, ReadOnlySpan<T> ropeKey, ReadOnlySpan<int> positions,
        ReadOnlySpan<int> slots, ReadOnlySpan<T> normWeight, Span<T> cache) where T : unmanaged
    {
        spec.ValidateBuffers<T>(latent.Length, ropeKey.Length, positions.Length, slots.Length, normWeight.Length, cache.Length);
        new PagedAppendSpec(spec.Pool, spec.NumTokens).ValidateSlots(slots);
        var shape = spec.Shape;
        int dc = shape.LatentDim, dr = shape.RopeDim, pairs = dr / 2;
        bool rope = spec.Rope.Style != RopeStyle.None, interleaved = spec.Rope.Style == RopeStyle.Interleaved;
        float* invFreq = stackalloc float[32];
        float* angles = stackalloc float[32];
        float* cos = stackalloc float[32];
        float* sin = stackalloc float[32];
        if (rope) spec.Rope.InverseFrequencies(dr).AsSpan().CopyTo(new Span<float>(invFreq, pairs));
        float* partial = stackalloc float[32];

        for (int t = 0; t < spec.NumTokens; t++)
        {
            if (slots[t] < 0) continue;
            var x = latent.Slice(t * spec.EffectiveLatentStride, dc);
            var row = cache.Slice((int)((long)slots[t] * shape.RowDim), shape.RowDim);
            if (spec.Normalize)
            {
                float inv = 1f / MathF.Sqrt(SumOfSquares(x, partial) / dc + spec.Epsilon);
                for (int d = 0; d < dc; d++) row[d] = FromSingle<T>(ToSingle(x[d]) * inv * ToSingle(normWeight[d]));
            }
            else
            {
                x.CopyTo(row);
            }

            var pe = ropeKey.Slice(t * spec.EffectiveRopeStride, dr);
            var target = row.Slice(dc, dr);
            if (!rope)
            {
                pe.CopyTo(target);
                continue;
            }
            float position = positions[t];
            for (int i = 0; i < pairs; i++) angles[i] = position * invFreq[i];
            CosSin(angles, cos, sin, pairs);
            for (int i = 0; i < pairs; i++)
            {
                int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + pairs;
                float xa = ToSingle(pe[a]), xb = ToSingle(pe[b]);
                target[a] = FromSingle<T>(xa * cos[i] - xb * sin[i]);
                target[b] = FromSingle<T>(xa * sin[i] + xb * cos[i]);
            }
        }
    }

    /// <summary>Σ x² in the GPU kernel's order: lane l of 32 accumulates (fused) the pairs l, l + 32, …, element by element;
    /// then partials are added by the xor butterfly of masks 16, 8, 4, 2, 1.</summary>
    private static float SumOfSquares<T>(ReadOnlySpan<T> x, float* partial) where T : unmanaged
    {
        int pairs = x.Length / 2;
        for (int lane = 0; lane < 32; lane++)
        {
            float sum = 0;
            for (int p = lane; p < pairs; p += 32)
            {
                float a = ToSingle(x[2 * p]), b = ToSingle(x[2 * p + 1]);
                sum = MathF.FusedMultiplyAdd(a, a, sum);
                sum = MathF.FusedMultiplyAdd(b, b, sum);
            }
            partial[lane] = sum;
        }
        float* next = stackalloc float[32];
        for (int mask = 16; mask >= 1; mask >>= 1)
        {
            for (int lane = 0; lane < 32; lane++) next[lane] = partial[lane] + partial[lane ^ mask];
            for (int lane = 0; lane < 32; lane++) partial[lane] = next[lane];
        }
        return partial[0];
    }
}
