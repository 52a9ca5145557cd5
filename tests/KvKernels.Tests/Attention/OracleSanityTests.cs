using KvKernels.Attention;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary>The float64 attention oracle itself, on cases whose answers are worked out by hand here.</summary>
public sealed class OracleSanityTests
{
    private const int D = 8;

    private static DecodeAttentionSpec Spec(int maxTokens) => new(1, 1, 1, 1, D, KvCacheShape.Contiguous(maxTokens));

    private static double[] Row(params double[] values)
    {
        var row = new double[D];
        values.CopyTo(row, 0);
        return row;
    }

    [Fact]
    public void LengthOne_OutputsTheOnlyValue_AndLseIsItsScore()
    {
        var spec = Spec(1) with { Scale = 0.5f };
        double[] q = Row(1, 2, 0, 0, 0, 0, 0, -1);
        double[] k = Row(3, -1, 5, 0, 0, 0, 0, 2);
        double[] v = Row(0.25, -4, 1, 1, 0, 0, 7, 0);
        var output = new double[D];
        var lse = new double[1];
        AttentionOracle.Decode(spec, q, k, v, [1], null, null, null, output, lse);

        // q·k = 3 − 2 − 2 = −1, scaled by 0.5: one key gets all the weight.
        Assert.Equal(v, output);
        Assert.Equal(-0.5, lse[0], 15);
    }

    [Fact]
    public void IdenticalKeys_AverageTheVisibleValues()
    {
        var spec = Spec(6);
        double[] q = Row(1, 1, 1, 1, 1, 1, 1, 1);
        var keys = new double[6 * D];
        var values = new double[6 * D];
        for (int n = 0; n < 6; n++)
        {
            Row(0.5, 0, 0, 0, 0, 0, 0, 0).CopyTo(keys, n * D);
            for (int d = 0; d < D; d++) values[n * D + d] = n * 10 + d;
        }
        var output = new double[D];
        var lse = new double[1];
        AttentionOracle.Decode(spec, q, keys, values, [4], null, null, null, output, lse);

        // Four visible keys (the length is 4), equal scores s = 0.5 · scale (the fp32 value 1/√8): the mean of
        // values 0..3, lse = s + ln 4.
        for (int d = 0; d < D; d++) Assert.Equal((0 + 10 + 20 + 30) / 4.0 + d, output[d], 12);
        Assert.Equal(0.5 * (double)(1f / MathF.Sqrt(8)) + Math.Log(4), lse[0], 12);
    }

    [Fact]
    public void WindowAndSinks_VisibilityTable()
    {
        var spec = Spec(8) with { Window = 3, Sinks = 1 };
        // Query at index 5: sink 0, window 3..5; never the future.
        bool[] expected = [true, false, false, true, true, true, false, false];
        for (int n = 0; n < 8; n++) Assert.Equal(expected[n], AttentionOracle.Visible(spec, 5, n));
        // Query at index 1: the window 0..1 already holds the sink.
        Assert.True(AttentionOracle.Visible(spec, 1, 0));
        Assert.True(AttentionOracle.Visible(spec, 1, 1));
        Assert.False(AttentionOracle.Visible(spec, 1, 2));
        // No window: causal only; a query before the context sees nothing.
        var causal = Spec(8);
        for (int n = 0; n < 8; n++) Assert.Equal(n <= 4, AttentionOracle.Visible(causal, 4, n));
        Assert.False(AttentionOracle.Visible(causal, -1, 0));
    }

    [Fact]
    public void QueryBeforeTheContext_OutputsZerosAndNegativeInfinity()
    {
        // Query length 2 over a context of 1: the first query's index is −1, it sees nothing.
        var spec = new DecodeAttentionSpec(1, 2, 1, 1, D, KvCacheShape.Contiguous(1));
        var q = new double[2 * D];
        q[0] = 1;
        var output = new double[2 * D];
        var lse = new double[2];
        AttentionOracle.Decode(spec, q, Row(1), Row(3, 3), [1], null, null, null, output, lse);
        Assert.Equal(new double[D], output.AsSpan(0, D).ToArray());
        Assert.Equal(double.NegativeInfinity, lse[0]);
        Assert.Equal(Row(3, 3), output.AsSpan(D, D).ToArray());
    }

    [Fact]
    public void Rope_RotatesTheFirstPairByPositionTimesOne()
    {
        // Pair 0 has inverse frequency θ^0 = 1, so a unit key e0 at position p becomes (cos p, …, sin p at dim 4):
        // with q = e0 the score is scale · cos p.
        var spec = new DecodeAttentionSpec(1, 1, 1, 1, D, KvCacheShape.Contiguous(1))
        {
            Scale = 1, Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, 0, ExplicitPositions: true),
        };
        var output = new double[D];
        var lse = new double[1];
        AttentionOracle.Decode(spec, Row(1), Row(1), Row(1), [1], null, [3], null, output, lse);
        Assert.Equal(Math.Cos(3), lse[0], 12);
        Assert.Equal(1f, AttentionOracle.InverseFrequency(spec, 0));
        Assert.Equal((float)Math.Pow(10000, -0.5), AttentionOracle.InverseFrequency(spec, 2));

        // Interleaved pairs (0, 1): with q = e1 the score is sin p.
        spec = spec with { Rope = spec.Rope with { Style = RopeStyle.Interleaved } };
        AttentionOracle.Decode(spec, Row(0, 1), Row(1), Row(1), [1], null, [3], null, output, lse);
        Assert.Equal(Math.Sin(3), lse[0], 12);
    }

    [Fact]
    public void Alibi_AndSoftCap_ShiftAndBendScores()
    {
        // Two keys with score 0 (q = 0): ALiBi slope 1 gives −1 and 0, so weights e^−1 : 1.
        var spec = Spec(2) with { Alibi = true };
        var values = new double[2 * D];
        values[0] = 1;     // v0 = e0
        values[D + 1] = 1; // v1 = e1
        var output = new double[D];
        var lse = new double[1];
        AttentionOracle.Decode(spec, new double[D], new double[2 * D], values, [2], null, null, [1f], output, lse);
        double w0 = Math.Exp(-1) / (1 + Math.Exp(-1));
        Assert.Equal(w0, output[0], 12);
        Assert.Equal(1 - w0, output[1], 12);
        Assert.Equal(Math.Log(1 + Math.Exp(-1)), lse[0], 12);

        // Soft-cap 2 on a score of 10: 2·tanh(5).
        spec = Spec(1) with { Scale = 1, SoftCap = 2 };
        AttentionOracle.Decode(spec, Row(10), Row(1), Row(1), [1], null, null, null, output, lse);
        Assert.Equal(2 * Math.Tanh(5), lse[0], 12);
    }

    [Fact]
    public void Merge_WithAnEmptyState_IsTheStateItself_AndTwoEmptiesAreEmpty()
    {
        double[] a = [1, -2, 3, 0.5, 7, 8];
        double[] lseA = [0.3, double.NegativeInfinity];
        double[] b = [9, 9, 9, double.NaN, double.NaN, double.NaN]; // row 1 of b is empty too: its output must not be read
        double[] lseB = [double.NegativeInfinity, double.NegativeInfinity];
        var output = new double[6];
        var lse = new double[2];
        AttentionOracle.Merge(2, 3, a, lseA, b, lseB, output, lse);
        Assert.Equal([1, -2, 3], output.AsSpan(0, 3).ToArray());
        Assert.Equal(0.3, lse[0]);
        Assert.Equal([0, 0, 0], output.AsSpan(3, 3).ToArray());
        Assert.Equal(double.NegativeInfinity, lse[1]);
    }

    [Fact]
    public void Merge_OfEqualWeights_AveragesAndAddsLn2()
    {
        var output = new double[2];
        var lse = new double[1];
        AttentionOracle.Merge(1, 2, [1, 4], [1.5], [3, 0], [1.5], output, lse);
        Assert.Equal([2, 2], output);
        Assert.Equal(1.5 + Math.Log(2), lse[0], 15);

        // Weights e^0 : e^(ln 3) = 1 : 3.
        AttentionOracle.Merge(1, 2, [4, 0], [0], [0, 4], [Math.Log(3)], output, lse);
        Assert.Equal(1, output[0], 14);
        Assert.Equal(3, output[1], 14);
        Assert.Equal(Math.Log(4), lse[0], 14);
    }
}
