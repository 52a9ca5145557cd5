using System.Buffers;
using System.Numerics.Tensors;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Mla;

public static unsafe partial class MlaCpu
{
    /// <summary>
    /// Query absorption: <c>query[m, h, 0 … LatentDim) = q_nope[m, h] · W_UK[h]</c> (fp32 accumulation, one rounding to
    /// the input type) and <c>query[m, h, LatentDim …) = q_pe[m, h]</c> — the packed query latent attention takes.
    /// </summary>
    /// <param name="spec">Shapes and types (M = B · q_len rows).</param>
    /// <param name="queryNope">q_nope <c>[B, q_len, H, NopeDim]</c>.</param>
    /// <param name="queryRope">q_pe <c>[B, q_len, H, RopeDim]</c>.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="query">Packed query <c>[B, q_len, H, RowDim]</c>, written.</param>
    /// <exception cref="ArgumentException">A bad spec, element type or buffer length; nothing is written.</exception>
    public static void AbsorbQuery<T>(in MlaAttentionSpec spec, ReadOnlySpan<T> queryNope, ReadOnlySpan<T> queryRope, ReadOnlySpan<T> weights,
        Span<T> query) where T : unmanaged
    {
        spec.ValidateAbsorbBuffers<T>(queryNope.Length, queryRope.Length, weights.Length, query.Length);
        var shape = spec.Shape;
        int dc = shape.LatentDim, dr = shape.RopeDim, rowDim = shape.RowDim;
        float[] row = ArrayPool<float>.Shared.Rent(dc);
        float[] widened = ArrayPool<float>.Shared.Rent(shape.NopeDim * dc);
        try
        {
            for (int h = 0; h < shape.NumHeads; h++)
            {
                WidenRows(weights.Slice(h * (shape.NopeDim + shape.ValueDim) * dc, shape.NopeDim * dc), widened);
                for (long m = 0; m < spec.TokenRows; m++)
                {
                    long r = m * shape.NumHeads + h;
                    AbsorbRow(queryNope.Slice((int)(r * shape.NopeDim), shape.NopeDim), widened, dc, row);
                    var target = query.Slice((int)(r * rowDim), rowDim);
                    for (int c = 0; c < dc; c++) target[c] = FromSingle<T>(row[c]);
                    queryRope.Slice((int)(r * dr), dr).CopyTo(target.Slice(dc));
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(row);
            ArrayPool<float>.Shared.Return(widened);
        }
    }

    /// <summary>
    /// Output un-absorption: <c>output[m, h, d] = Σ_c o_lat[m, h, c] · W_UV[h][d, c]</c> (fp32 accumulation, one rounding
    /// to the output type).
    /// </summary>
    /// <param name="spec">Shapes and types.</param>
    /// <param name="latentOutput">o_lat <c>[B, q_len, H, LatentDim]</c> in the input type.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="output"><c>[B, q_len, H, ValueDim]</c> in the output type, written.</param>
    /// <exception cref="ArgumentException">A bad spec, element type or buffer length; nothing is written.</exception>
    public static void Unabsorb<TIn, TOut>(in MlaAttentionSpec spec, ReadOnlySpan<TIn> latentOutput, ReadOnlySpan<TIn> weights, Span<TOut> output)
        where TIn : unmanaged where TOut : unmanaged
    {
        spec.ValidateUnabsorbBuffers<TIn, TOut>(latentOutput.Length, weights.Length, output.Length);
        var shape = spec.Shape;
        int dc = shape.LatentDim, dv = shape.ValueDim;
        float[] latent = ArrayPool<float>.Shared.Rent(dc);
        float[] widened = ArrayPool<float>.Shared.Rent(dv * dc);
        try
        {
            for (int h = 0; h < shape.NumHeads; h++)
            {
                WidenRows(weights.Slice((h * (shape.NopeDim + dv) + shape.NopeDim) * dc, dv * dc), widened);
                for (long m = 0; m < spec.TokenRows; m++)
                {
                    long r = m * shape.NumHeads + h;
                    var source = latentOutput.Slice((int)(r * dc), dc);
                    for (int c = 0; c < dc; c++) latent[c] = ToSingle(source[c]);
                    var target = output.Slice((int)(r * dv), dv);
                    for (int d = 0; d < dv; d++) target[d] = FromSingle<TOut>(TensorPrimitives.Dot(latent.AsSpan(0, dc), widened.AsSpan(d * dc, dc)));
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(latent);
            ArrayPool<float>.Shared.Return(widened);
        }
    }

    /// <summary><see cref="AbsorbQuery{T}"/>'s q_latent <c>[M, H, LatentDim]</c> in fp32, not rounded (the fp32 reference).</summary>
    internal static void AbsorbToFloat<T>(in MlaShape shape, long tokenRows, ReadOnlySpan<T> queryNope, ReadOnlySpan<T> weights, Span<float> queryLatent)
        where T : unmanaged
    {
        int dc = shape.LatentDim;
        var widened = new float[shape.NopeDim * dc];
        for (int h = 0; h < shape.NumHeads; h++)
        {
            WidenRows(weights.Slice(h * (shape.NopeDim + shape.ValueDim) * dc, shape.NopeDim * dc), widened);
            for (long m = 0; m < tokenRows; m++)
            {
                long r = m * shape.NumHeads + h;
                AbsorbRow(queryNope.Slice((int)(r * shape.NopeDim), shape.NopeDim), widened, dc, queryLatent.Slice((int)(r * dc), dc));
            }
        }
    }

    /// <summary><see cref="Unabsorb{TIn, TOut}"/> from an fp32 latent output into fp32 (the fp32 reference).</summary>
    internal static void UnabsorbFromFloat<T>(in MlaShape shape, long tokenRows, ReadOnlySpan<float> latentOutput, ReadOnlySpan<T> weights,
        Span<float> output) where T : unmanaged
    {
        int dc = shape.LatentDim, dv = shape.ValueDim;
        var widened = new float[dv * dc];
        for (int h = 0; h < shape.NumHeads; h++)
        {
            WidenRows(weights.Slice((h * (shape.NopeDim + dv) + shape.NopeDim) * dc, dv * dc), widened);
            for (long m = 0; m < tokenRows; m++)
            {
                long r = m * shape.NumHeads + h;
                var latent = latentOutput.Slice((int)(r * dc), dc);
                for (int d = 0; d < dv; d++) output[(int)(r * dv + d)] = TensorPrimitives.Dot(latent, widened.AsSpan(d * dc, dc));
            }
        }
    }

    /// <summary>row = Σ_d nope[d] · W[d, :], accumulated over d in order (W widened, <c>[nope, dc]</c>).</summary>
    private static void AbsorbRow<T>(ReadOnlySpan<T> nope, ReadOnlySpan<float> weights, int dc, Span<float> row) where T : unmanaged
    {
        row.Slice(0, dc).Clear();
        for (int d = 0; d < nope.Length; d++)
            TensorPrimitives.MultiplyAdd(weights.Slice(d * dc, dc), ToSingle(nope[d]), row.Slice(0, dc), row.Slice(0, dc));
    }

    /// <summary>Widens a weight block (a whole number of rows: every MLA dim is a multiple of 8) to fp32, vectorised.</summary>
    private static void WidenRows<T>(ReadOnlySpan<T> source, Span<float> destination) where T : unmanaged
    {
        fixed (T* s = source)
        fixed (float* d = destination)
            KvKernels.Attention.DecodeAttentionCpuMath.Widen(s, d, source.Length);
    }
}
