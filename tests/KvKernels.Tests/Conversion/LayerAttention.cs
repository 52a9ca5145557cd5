using KvKernels.Attention;
using KvKernels.Conversion;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Conversion;

/// <summary>How RoPE is applied when running a layer.</summary>
/// <param name="Style">Pairing; None for no RoPE.</param>
/// <param name="BlockDim">The original head dim: a compressed head of ρ·Dk dims is rotated block by block with the
/// original frequencies (what the RoPE-compatible construction preserves).</param>
/// <param name="RotaryDim">Rotated dims at the start of each block.</param>
/// <param name="InKernel">Let the attention op rotate the keys (spec RoPE, only for one block of the standard layout);
/// otherwise keys are rotated here before the op.</param>
internal readonly record struct LayerRope(RopeStyle Style, int BlockDim, int RotaryDim, bool InKernel = false)
{
    public const float Theta = 10000f;

    public static LayerRope None => new(RopeStyle.None, 0, 0);

    /// <summary>Rotates <paramref name="vector"/> (one head) to <paramref name="position"/>, with the angle computed as
    /// the attention spec defines it: fp32 position × fp32 inverse frequency.</summary>
    public void Rotate(Span<double> vector, int position)
    {
        if (Style == RopeStyle.None) return;
        for (int block = 0; block < vector.Length / BlockDim; block++)
            for (int f = 0; f < RotaryDim / 2; f++)
            {
                float inverse = (float)Math.Pow(Theta, -2.0 * f / RotaryDim);
                float angle = position * inverse;
                double cos = Math.Cos(angle), sin = Math.Sin(angle);
                var (a, b) = Style == RopeStyle.RotateHalf ? (f, f + RotaryDim / 2) : (2 * f, 2 * f + 1);
                a += block * BlockDim;
                b += block * BlockDim;
                double x = vector[a], y = vector[b];
                vector[a] = x * cos - y * sin;
                vector[b] = x * sin + y * cos;
            }
    }
}

/// <summary>
/// Runs one attention layer end to end for the last of n context tokens: projections (fp64 from the fp32 weights),
/// RoPE, decode attention over the n keys, and the output projection, giving the layer's output in model space
/// <c>[hidden]</c>, which the original and the compressed layer must agree on.
/// </summary>
internal static class LayerAttention
{
    /// <summary>The layer output with the float64 attention oracle.</summary>
    public static double[] Oracle(AttentionGeometry geo, AttentionWeights w, float[] x, int n, LayerRope rope)
    {
        var (spec, q, k, v) = Prepare(geo, w, x, n, rope);
        var o = new double[spec.OutputElements];
        AttentionOracle.Decode(spec, q, k, v, [n], null, null, null, o, new double[spec.LseElements]);
        return OutputProjection(geo, w, o);
    }

    /// <summary>The layer output with <see cref="DecodeAttentionCpu"/> (fp16 query/keys/values, fp32 output).</summary>
    public static double[] DecodeCpu(AttentionGeometry geo, AttentionWeights w, float[] x, int n, LayerRope rope)
    {
        var (spec, q, k, v) = Prepare(geo, w, x, n, rope);
        spec = spec with { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32 };
        var output = AttentionElements.Poisoned<float>(spec.OutputElements);
        try
        {
            DecodeAttentionCpu.Run<Half, float>(spec, ToHalf(q), ToHalf(k), ToHalf(v), [n], [], output);
        }
        catch (NotImplementedException)
        {
            Assert.Skip("DecodeAttentionCpu is not implemented on this branch yet (branch attn-cpu); the float64-oracle tests cover the math meanwhile.");
        }
        return OutputProjection(geo, w, output.Select(f => (double)f).ToArray());
    }

    private static Half[] ToHalf(double[] values) => values.Select(v => (Half)v).ToArray();

    private static (DecodeAttentionSpec Spec, double[] Q, double[] K, double[] V) Prepare(AttentionGeometry geo, AttentionWeights w, float[] x, int n, LayerRope rope)
    {
        int hidden = geo.HiddenSize, dk = geo.HeadDim, dv = geo.ValueDim;
        var q = Project(w.Query, w.QueryBias, x.AsSpan((n - 1) * hidden, hidden), geo.QueryHeads * dk);
        var k = new double[(long)n * geo.KvHeads * dk];
        var v = new double[(long)n * geo.KvHeads * dv];
        for (int t = 0; t < n; t++)
        {
            Project(w.Key, w.KeyBias, x.AsSpan(t * hidden, hidden), geo.KvHeads * dk).CopyTo(k, (long)t * geo.KvHeads * dk);
            Project(w.Value, w.ValueBias, x.AsSpan(t * hidden, hidden), geo.KvHeads * dv).CopyTo(v, (long)t * geo.KvHeads * dv);
        }
        for (int h = 0; h < geo.QueryHeads; h++) rope.Rotate(q.AsSpan(h * dk, dk), n - 1);
        if (!rope.InKernel)
            for (int t = 0; t < n; t++)
                for (int h = 0; h < geo.KvHeads; h++) rope.Rotate(k.AsSpan((t * geo.KvHeads + h) * dk, dk), t);

        var spec = new DecodeAttentionSpec(1, 1, geo.QueryHeads, geo.KvHeads, dk, KvCacheShape.Contiguous(n, KvLayout.Nhd))
        {
            ValueHeadDim = dv == dk ? 0 : dv,
            Rope = rope.InKernel ? new RopeOptions(rope.Style, LayerRope.Theta, rope.RotaryDim == dk ? 0 : rope.RotaryDim) : default,
        };
        return (spec, q, k, v);
    }

    private static double[] Project(float[] weight, float[]? bias, ReadOnlySpan<float> x, int rows)
    {
        var result = new double[rows];
        for (int r = 0; r < rows; r++)
        {
            double sum = bias?[r] ?? 0;
            for (int c = 0; c < x.Length; c++) sum += (double)weight[(long)r * x.Length + c] * x[c];
            result[r] = sum;
        }
        return result;
    }

    private static double[] OutputProjection(AttentionGeometry geo, AttentionWeights w, double[] heads)
    {
        int width = geo.QueryHeads * geo.ValueDim;
        var output = new double[geo.HiddenSize];
        for (int i = 0; i < geo.HiddenSize; i++)
        {
            double sum = 0;
            for (int c = 0; c < width; c++) sum += (double)w.Output[(long)i * width + c] * heads[c];
            output[i] = sum;
        }
        return output;
    }

    public static double RelativeError(double[] actual, double[] expected)
    {
        double num = 0, den = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            if (double.IsNaN(actual[i]) || double.IsNaN(expected[i])) return double.NaN;
            num += (actual[i] - expected[i]) * (actual[i] - expected[i]);
            den += expected[i] * expected[i];
        }
        return Math.Sqrt(num / den);
    }

    /// <summary>Activations with a decaying spectrum (x = A·diag(decay^j)·z), like real hidden states: most energy in a
    /// few directions, so that principal directions matter.</summary>
    public static float[] CorrelatedActivations(Random random, float[] mixing, int hidden, int tokens, double decay)
    {
        var x = new float[(long)tokens * hidden];
        var z = new double[hidden];
        for (int t = 0; t < tokens; t++)
        {
            for (int j = 0; j < hidden; j++) z[j] = Math.Pow(decay, j) * ConversionFixtures.Normal(random);
            for (int i = 0; i < hidden; i++)
            {
                double sum = 0;
                for (int j = 0; j < hidden; j++) sum += mixing[i * hidden + j] * z[j];
                x[(long)t * hidden + i] = (float)sum;
            }
        }
        return x;
    }
}
