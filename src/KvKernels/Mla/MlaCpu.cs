using System.Buffers;
using System.Numerics.Tensors;
using KvKernels.Attention;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Mla;

/// <summary>Which way <see cref="MlaCpu.DecodeReference{T}"/> computes the MLA step.</summary>
public enum MlaPath
{
    /// <summary>Absorb W_UK into the query, attend over the latent rows, apply W_UV to the latent output.</summary>
    Absorbed,

    /// <summary>Decompress every cached token into per-head keys <c>[c·W_UKᵀ ; k_pe]</c> and values <c>c·W_UVᵀ</c>,
    /// then ordinary multi-head attention.</summary>
    Naive,
}

/// <summary>
/// The CPU twin of multi-head latent attention (DeepSeek-V2/V3): the latent cache write, the absorption GEMMs, latent
/// decode attention and the whole decode step, validated by the same specs as the GPU ops (<see cref="MlaAttentionSpec"/>,
/// <see cref="MlaCacheWriteSpec"/>), plus an fp32 reference of the step computed either way (<see cref="DecodeReference{T}"/>), whose agreement
/// is the proof that absorption is right.
/// </summary>
public static unsafe partial class MlaCpu
{
    /// <summary>
    /// Latent decode attention: decode attention with one KV head of RowDim, values the first LatentDim columns of each
    /// row (<see cref="MlaAttentionSpec.ToDecodeAttention"/>), on <see cref="DecodeAttentionCpu"/>.
    /// </summary>
    /// <param name="spec">Shapes, types, storage.</param>
    /// <param name="query">Packed query <c>[B, q_len, H, RowDim]</c> (q_latent then q_pe).</param>
    /// <param name="cache">Latent storage (paged pool of one head, or <c>[B, MaxTokens, 1, RowDim]</c>).</param>
    /// <param name="lengths"><c>[B]</c> tokens per sequence.</param>
    /// <param name="blockTable"><c>[B, MaxPagesPerSequence]</c> for paged storage; empty for contiguous.</param>
    /// <param name="latentOutput"><c>[B, q_len, H, LatentDim]</c> in <see cref="MlaAttentionSpec.OutputType"/>, written.</param>
    /// <param name="lse"><c>[B, q_len, H]</c> natural-log LSE, written; empty when not wanted.</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, length or page index; nothing is written.</exception>
    public static void Attend<TIn, TOut>(in MlaAttentionSpec spec, ReadOnlySpan<TIn> query, ReadOnlySpan<TIn> cache, ReadOnlySpan<int> lengths,
        ReadOnlySpan<int> blockTable, Span<TOut> latentOutput, Span<float> lse = default) where TIn : unmanaged where TOut : unmanaged
    {
        spec.Validate();
        DecodeAttentionCpu.Run(spec.ToDecodeAttention(), query, cache, default, lengths, blockTable, latentOutput, lse);
    }

    /// <summary>
    /// The whole MLA decode step, the twin of the GPU's: <see cref="AbsorbQuery{T}"/> (q_latent rounded to the input
    /// type), <see cref="Attend{TIn, TOut}"/> with the latent output in the input type, then <see cref="Unabsorb{TIn, TOut}"/>
    /// into <see cref="MlaAttentionSpec.OutputType"/>. Scratch comes from <see cref="ArrayPool{T}"/>.
    /// </summary>
    /// <param name="spec">Shapes, types, storage.</param>
    /// <param name="queryNope">q_nope <c>[B, q_len, H, NopeDim]</c>.</param>
    /// <param name="queryRope">q_pe <c>[B, q_len, H, RopeDim]</c>, already rotated at the query's position.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="cache">Latent storage.</param>
    /// <param name="lengths"><c>[B]</c> tokens per sequence.</param>
    /// <param name="blockTable"><c>[B, MaxPagesPerSequence]</c> for paged storage; empty for contiguous.</param>
    /// <param name="output"><c>[B, q_len, H, ValueDim]</c>, written.</param>
    /// <param name="lse"><c>[B, q_len, H]</c> natural-log LSE of the attention, written; empty when not wanted.</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, length or page index; nothing is written.</exception>
    public static void Decode<TIn, TOut>(in MlaAttentionSpec spec, ReadOnlySpan<TIn> queryNope, ReadOnlySpan<TIn> queryRope,
        ReadOnlySpan<TIn> weights, ReadOnlySpan<TIn> cache, ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable, Span<TOut> output,
        Span<float> lse = default) where TIn : unmanaged where TOut : unmanaged
    {
        spec.ValidateDecodeBuffers<TIn, TOut>(queryNope.Length, queryRope.Length, weights.Length, cache.Length, lengths.Length,
            blockTable.Length, output.Length, lse.Length);
        var attention = spec.ToDecodeAttention(spec.InputType);
        attention.ValidateIndices(lengths, blockTable);
        if (spec.BatchSize == 0) return;

        var latentSpec = spec with { OutputType = spec.InputType };
        TIn[] query = ArrayPool<TIn>.Shared.Rent(checked((int)spec.QueryElements));
        TIn[] latent = ArrayPool<TIn>.Shared.Rent(checked((int)spec.LatentOutputElements));
        try
        {
            var q = query.AsSpan(0, (int)spec.QueryElements);
            var o = latent.AsSpan(0, (int)spec.LatentOutputElements);
            AbsorbQuery(spec, queryNope, queryRope, weights, q);
            DecodeAttentionCpu.Run(attention, q, cache, default, lengths, blockTable, o, lse);
            Unabsorb(spec, (ReadOnlySpan<TIn>)o, weights, output);
        }
        finally
        {
            ArrayPool<TIn>.Shared.Return(query);
            ArrayPool<TIn>.Shared.Return(latent);
        }
    }

    /// <summary>
    /// The MLA decode step in fp32 from the stored 16-bit inputs, with no intermediate rounding, computed by
    /// <paramref name="path"/>: absorbed (fp32 q_latent, fp32 attention over the latent rows, fp32 un-absorption) or
    /// naive (per-head decompressed keys and values, fp32 multi-head attention). The two agree within fp32 rounding —
    /// that agreement is the correctness of absorption — and <see cref="Decode{TIn, TOut}"/> agrees with both within
    /// the rounding of its 16-bit intermediates. A reference for tests and tools: simple, single-threaded, allocating.
    /// </summary>
    /// <param name="spec">Shapes, storage and scale (<see cref="MlaAttentionSpec.OutputType"/> is ignored: the output is fp32).</param>
    /// <param name="queryNope">q_nope <c>[B, q_len, H, NopeDim]</c>.</param>
    /// <param name="queryRope">q_pe <c>[B, q_len, H, RopeDim]</c>.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="cache">Latent storage.</param>
    /// <param name="lengths"><c>[B]</c>.</param>
    /// <param name="blockTable"><c>[B, MaxPagesPerSequence]</c> for paged storage; empty for contiguous.</param>
    /// <param name="output"><c>[B, q_len, H, ValueDim]</c> fp32, written.</param>
    /// <param name="lse"><c>[B, q_len, H]</c>, written; empty when not wanted.</param>
    /// <param name="path">Absorbed or naive.</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, length or page index.</exception>
    public static void DecodeReference<T>(in MlaAttentionSpec spec, ReadOnlySpan<T> queryNope, ReadOnlySpan<T> queryRope, ReadOnlySpan<T> weights,
        ReadOnlySpan<T> cache, ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable, Span<float> output, Span<float> lse, MlaPath path)
        where T : unmanaged
    {
        var fp32 = spec with { OutputType = AttentionElement.Float32 };
        fp32.ValidateDecodeBuffers<T, float>(queryNope.Length, queryRope.Length, weights.Length, cache.Length, lengths.Length,
            blockTable.Length, output.Length, lse.Length);
        if (path is not (MlaPath.Absorbed or MlaPath.Naive)) throw new ArgumentException($"path is {path}; expected Absorbed or Naive.", nameof(path));
        var attention = spec.ToDecodeAttention(AttentionElement.Float32);
        attention.ValidateIndices(lengths, blockTable);

        var shape = spec.Shape;
        int h = shape.NumHeads, dc = shape.LatentDim, dr = shape.RopeDim, dn = shape.NopeDim, dv = shape.ValueDim, q = spec.QueryLength;
        float[] nope = Widen(queryNope), rope = Widen(queryRope), w = Widen(weights);
        float[]? latentQuery = null;
        if (path == MlaPath.Absorbed)
        {
            latentQuery = new float[spec.TokenRows * h * dc];
            AbsorbToFloat(shape, spec.TokenRows, queryNope, weights, latentQuery);
        }

        for (int b = 0; b < spec.BatchSize; b++)
        {
            int length = lengths[b];
            // This sequence's latent rows in token order, widened.
            var rows = new float[(long)length * shape.RowDim];
            for (int n = 0; n < length; n++)
            {
                int page = spec.Cache.IsPaged ? blockTable[b * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize] : 0;
                long offset = attention.StorageOffset(b, n, page, 0, shape.RowDim);
                for (int d = 0; d < shape.RowDim; d++) rows[(long)n * shape.RowDim + d] = ToSingle(cache[(int)(offset + d)]);
            }

            for (int i = 0; i < q; i++)
            {
                int visible = Math.Clamp(length - q + i + 1, 0, length);
                for (int head = 0; head < h; head++)
                {
                    long r = ((long)b * q + i) * h + head;
                    var o = output.Slice((int)(r * dv), dv);
                    float rowLse;
                    if (path == MlaPath.Absorbed)
                    {
                        var query = new float[shape.RowDim];
                        Array.Copy(latentQuery!, r * dc, query, 0, dc);
                        Array.Copy(rope, r * dr, query, dc, dr);
                        var latentOut = new float[dc];
                        rowLse = Attend(query, visible, n => rows.AsSpan(n * shape.RowDim, shape.RowDim),
                            n => rows.AsSpan(n * shape.RowDim, dc), spec.EffectiveScale, latentOut);
                        UnabsorbFromFloat(shape with { NumHeads = 1 }, 1, latentOut, weights.Slice(head * (dn + dv) * dc, (dn + dv) * dc), o);
                    }
                    else
                    {
                        // Decompress this head: k = [c·W_UKᵀ ; k_pe], v = c·W_UVᵀ for every visible token.
                        var keys = new float[(long)visible * (dn + dr)];
                        var values = new float[(long)visible * dv];
                        var wHead = w.AsSpan(head * (dn + dv) * dc, (dn + dv) * dc);
                        for (int n = 0; n < visible; n++)
                        {
                            var c = rows.AsSpan(n * shape.RowDim, dc);
                            for (int d = 0; d < dn; d++) keys[n * (dn + dr) + d] = TensorPrimitives.Dot(c, wHead.Slice(d * dc, dc));
                            rows.AsSpan(n * shape.RowDim + dc, dr).CopyTo(keys.AsSpan(n * (dn + dr) + dn, dr));
                            for (int d = 0; d < dv; d++) values[n * dv + d] = TensorPrimitives.Dot(c, wHead.Slice((dn + d) * dc, dc));
                        }
                        var query = new float[dn + dr];
                        Array.Copy(nope, r * dn, query, 0, dn);
                        Array.Copy(rope, r * dr, query, dn, dr);
                        rowLse = Attend(query, visible, n => keys.AsSpan(n * (dn + dr), dn + dr), n => values.AsSpan(n * dv, dv),
                            spec.EffectiveScale, o);
                    }
                    if (!lse.IsEmpty) lse[(int)r] = rowLse;
                }
            }
        }
    }

    private delegate ReadOnlySpan<float> RowOf(int token);

    /// <summary>fp32 attention of one query over <paramref name="count"/> tokens (two-pass softmax); returns the LSE.</summary>
    private static float Attend(ReadOnlySpan<float> query, int count, RowOf key, RowOf value, float scale, Span<float> output)
    {
        output.Clear();
        if (count == 0) return float.NegativeInfinity;
        var logits = new float[count];
        for (int n = 0; n < count; n++) logits[n] = scale * TensorPrimitives.Dot(query, key(n));
        float max = TensorPrimitives.Max(logits);
        float sum = 0;
        for (int n = 0; n < count; n++)
        {
            float p = MathF.Exp(logits[n] - max);
            sum += p;
            TensorPrimitives.MultiplyAdd(value(n), p, output, output);
        }
        TensorPrimitives.Divide(output, sum, output);
        return max + MathF.Log(sum);
    }

    private static float[] Widen<T>(ReadOnlySpan<T> values) where T : unmanaged
    {
        var result = new float[values.Length];
        for (int i = 0; i < values.Length; i++) result[i] = ToSingle(values[i]);
        return result;
    }
}
