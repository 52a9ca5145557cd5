using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// 1-D pooling along tokens (P5): the CPU twin against the float64 oracle (max exactly, average within fp32 rounding),
/// and the GPU kernel against the CPU twin bit for bit on every backend; kernel sizes from 1 to wider than the row, row
/// lengths 0, 1, 7, 19, 257, shared lengths (RowsPerLength), and PyTorch's edge rule (zero padding counted, ÷ k).
/// </summary>
public sealed class PoolingTests(Backends backends)
{
    public sealed record PoolCase(string Name, PoolingSpec Spec, int[]? Lengths = null)
    {
        public override string ToString() => Name;
    }

    public static IReadOnlyList<PoolCase> Cases { get; } =
    [
        new("avg-k5-full-rows", new PoolingSpec(3, 19, 5)),
        new("max-k7-full-rows", new PoolingSpec(2, 257, 7, PoolingKind.Max)),
        new("avg-k1-identity", new PoolingSpec(2, 7, 1)),
        new("avg-k3-lengths-per-sequence", new PoolingSpec(6, 19, 3) { RowsPerLength = 2 }, [19, 0, 1]),
        new("max-k5-lengths-per-row", new PoolingSpec(4, 23, 5, PoolingKind.Max), [23, 7, 2, 0]),
        new("avg-k9-wider-than-row", new PoolingSpec(2, 7, 9), [7, 4]),
        new("max-k255-long-row", new PoolingSpec(1, 257, 255, PoolingKind.Max), [200]),
        new("avg-k31-l257", new PoolingSpec(3, 257, 31), [257, 100, 1]),
        new("empty", new PoolingSpec(0, 19, 5)),
        new("length-zero-rows", new PoolingSpec(3, 0, 5)),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int> BackendCases => Backends.CasesOnEach(Cases.Count);

    /// <summary>Scores-like input: positive, heavy-tailed (some spikes), plus a few exact zeros and negatives.</summary>
    private static float[] Input(PoolingSpec spec, int seed)
    {
        var rng = new Random(seed);
        var x = new float[spec.Elements];
        for (int i = 0; i < x.Length; i++)
        {
            double u = rng.NextDouble();
            x[i] = u < 0.05 ? 0f : u < 0.1 ? -(float)rng.NextDouble() : (float)Math.Exp(3 * ScoreData.Normal(rng)) * 1e-3f;
        }
        return x;
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int index)
    {
        var c = Cases[index];
        var spec = c.Spec;
        var input = Input(spec, index);
        var output = ScoreData.Poison(spec.Elements);
        TokenScoresCpu.Pool(spec, input, c.Lengths ?? [], output);
        var expected = new double[spec.Elements];
        ScoreOracle.Pool(spec.Rows, spec.Length, spec.KernelSize, spec.Kind, [.. input.Select(v => (double)v)], c.Lengths,
            spec.EffectiveRowsPerLength, expected);
        // An fp32 sum of k terms is within k·2⁻²⁴·Σ|x| of the exact sum (and the division adds half an ulp), so the
        // average's bound scales with the average of |x| over the window, not with the (possibly cancelled) result.
        var magnitude = new double[spec.Elements];
        ScoreOracle.Pool(spec.Rows, spec.Length, spec.KernelSize, PoolingKind.Average, [.. input.Select(v => Math.Abs((double)v))], c.Lengths,
            spec.EffectiveRowsPerLength, magnitude);
        for (int i = 0; i < output.Length; i++)
        {
            if (spec.Kind == PoolingKind.Max) Assert.True(output[i] == expected[i], $"[{i}] {output[i]} vs oracle {expected[i]}");
            else Assert.True(Math.Abs(output[i] - expected[i]) <= (spec.KernelSize + 1) * Math.ScaleB(1, -24) * magnitude[i],
                $"[{i}] {output[i]} vs oracle {expected[i]}");
        }
    }

    [Fact]
    public void Average_CountsZeroPaddingLikeTorch()
    {
        // avg_pool1d([1, 2, 3, 4], k=3, padding=1, count_include_pad=True) = [(0+1+2)/3, (1+2+3)/3, (2+3+4)/3, (3+4+0)/3].
        var output = new float[4];
        TokenScoresCpu.Pool(new PoolingSpec(1, 4, 3), [1f, 2f, 3f, 4f], [], output);
        Assert.Equal([1f, 2f, 3f, 7f / 3f], output);
        // max_pool1d with −∞ padding: [2, 3, 4, 4]; a length of 3 makes position 3 padding (written 0) and 4 unseen.
        TokenScoresCpu.Pool(new PoolingSpec(1, 4, 3, PoolingKind.Max), [1f, 2f, 3f, 4f], [3], output);
        Assert.Equal([2f, 3f, 3f, 0f], output);
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpuBitForBit(string backend, int index)
    {
        var device = backends.Get(backend);
        var c = Cases[index];
        var spec = c.Spec;
        var input = Input(spec, index + 100);
        var expected = new float[spec.Elements];
        TokenScoresCpu.Pool(spec, input, c.Lengths ?? [], expected);
        Assert.Equal(-1, ScoreData.FirstBitDifference(Run(device, spec, input, c.Lengths), expected));
    }

    [Theory]
    [MemberData(nameof(Backend))]
    public void Gpu_MatchesCpuBitForBit_WithNaNAndSignedZeros(string backend)
    {
        var device = backends.Get(backend);
        var input = new float[3 * 41];
        var rng = new Random(3);
        for (int i = 0; i < input.Length; i++)
            input[i] = (i % 7) switch { 0 => float.NaN, 1 => -0f, 2 => 0f, _ => ScoreData.Normal(rng) };
        foreach (var kind in new[] { PoolingKind.Average, PoolingKind.Max })
        {
            var spec = new PoolingSpec(3, 41, 5, kind);
            var expected = new float[spec.Elements];
            TokenScoresCpu.Pool(spec, input, [41, 40, 17], expected);
            Assert.Equal(-1, ScoreData.FirstBitDifference(Run(device, spec, input, [41, 40, 17]), expected));
        }
    }

    public static TheoryData<string> Backend => Backends.Names;

    private static float[] Run(CudaDevice device, PoolingSpec spec, float[] input, int[]? lengths)
    {
        using var x = device.Allocate<float>(input);
        using var y = device.Allocate<float>(ScoreData.Poison(spec.Elements));
        using var len = lengths is null ? null : new DeviceSequenceLengths(device, lengths.Length);
        len?.Update(lengths, spec.Length);
        new TokenScoreKernels(device).Pool(spec, x.Span, len, y.Span);
        device.DefaultStream.Synchronize();
        return y.ToArray();
    }
}
