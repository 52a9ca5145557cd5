using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Observation-window scoring (P2): the CPU twin against the float64 oracle, and the GPU kernels (split LSE pass, merge,
/// probability pass) against the CPU twin on every backend, within a tolerance (exp differs by ulps; the tensor-core dot
/// products round differently from the CPU's fp32 FMAs). Covers contiguous and paged storage in NHD and HND, head dims 64,
/// 72 and 128, groups 1–8, windows of 1 up to the whole prompt, every reduction pair, the non-causal mask, rows of length
/// 0 and shorter than the window, and a forced split count.
/// </summary>
public sealed class WindowScoreTests(Backends backends)
{
    /// <summary>Norm-wise relative error allowed against the float64 oracle (fp32 logits, fp32 exp within an ulp or two).</summary>
    private const double OracleTolerance = 5e-6;

    /// <summary>The same for GPU vs CPU: each side within <see cref="OracleTolerance"/> of the truth.</summary>
    private const double GpuTolerance = 1e-5;

    public sealed record WindowCase(string Name, WindowScoreSpec Spec, int[] Lengths, bool Bf16)
    {
        public override string ToString() => Name;
    }

    private static WindowScoreSpec S(int b, int w, int hq, int hkv, int d, KvCacheShape cache, ScoreReduction window, ScoreReduction group) =>
        new(b, w, hq, hkv, d, cache) { WindowReduction = window, GroupReduction = group };

    public static IReadOnlyList<WindowCase> Cases { get; } =
    [
        new("contiguous-nhd-d64-g4-w3-sum-sum", S(2, 3, 8, 2, 64, KvCacheShape.Contiguous(19), ScoreReduction.Sum, ScoreReduction.Sum), [19, 7], false),
        new("paged-nhd-d128-g1-w1-mean-mean", S(2, 1, 2, 2, 128, KvCacheShape.Paged(6, 16, 3), ScoreReduction.Mean, ScoreReduction.Mean), [33, 16], true),
        new("paged-hnd-d72-g2-w5-max-max-short-rows", S(3, 5, 4, 2, 72, KvCacheShape.Paged(6, 7, 3, KvLayout.Hnd), ScoreReduction.Max, ScoreReduction.Max),
            [19, 4, 0], false),
        new("contiguous-hnd-d64-whole-prompt-mean-mean", S(1, 19, 4, 1, 64, KvCacheShape.Contiguous(19, KvLayout.Hnd), ScoreReduction.Mean, ScoreReduction.Mean),
            [19], true),
        new("contiguous-l257-per-head-noncausal-scaled", S(1, 4, 6, 3, 64, KvCacheShape.Contiguous(257), ScoreReduction.Mean, ScoreReduction.None)
            with { Causal = false, Scale = 0.2f }, [257], false),
        new("single-key", S(1, 1, 1, 1, 64, KvCacheShape.Contiguous(1), ScoreReduction.Sum, ScoreReduction.Sum), [1], true),
        new("paged-l257-g8-w7-sum-max", S(1, 7, 8, 1, 128, KvCacheShape.Paged(17, 16, 17), ScoreReduction.Sum, ScoreReduction.Max), [257], true),
        new("paged-max-window-mean-group", S(2, 9, 6, 2, 64, KvCacheShape.Paged(10, 16, 5), ScoreReduction.Max, ScoreReduction.Mean), [64, 65], false),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int> BackendCases => Backends.CasesOnEach(Cases.Count);

    private sealed record Inputs<T>(T[] Query, T[] Keys, int[] Table) where T : unmanaged;

    private static Inputs<T> Create<T>(WindowCase c, int seed) where T : unmanaged
    {
        var spec = c.Spec;
        var rng = new Random(seed);
        var table = ScoreData.BlockTable(rng, spec.Cache, c.Lengths);
        var keys = ScoreData.Storage<T>(rng, spec.Cache, spec.NumKvHeads, spec.HeadDim, c.Lengths, table);
        var query = ScoreData.Rows<T>(rng, spec.QueryRows, spec.HeadDim);
        return new Inputs<T>(query, keys, table);
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int index)
    {
        var c = Cases[index];
        if (c.Bf16) CheckCpu<BFloat16>(c);
        else CheckCpu<Half>(c);
    }

    private static void CheckCpu<T>(WindowCase c) where T : unmanaged
    {
        var spec = c.Spec;
        var input = Create<T>(c, c.Name.Length);
        var scores = ScoreData.Poison(spec.OutputElements);
        TokenScoresCpu.WindowScores<T>(spec, input.Query, input.Keys, c.Lengths, input.Table, scores);
        var expected = new double[spec.OutputElements];
        ScoreOracle.WindowScores(spec, AttentionElements.ToDoubles<T>(input.Query), AttentionElements.ToDoubles<T>(input.Keys), c.Lengths,
            spec.Cache.IsPaged ? input.Table : null, expected);
        AssertClose(scores, expected, OracleTolerance, "CPU vs oracle");
        AssertZeroPastLengths(spec, c.Lengths, scores);
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int index)
    {
        var device = backends.Get(backend);
        var c = Cases[index];
        if (c.Bf16) CheckGpu<BFloat16>(device, c, splits: 0);
        else CheckGpu<Half>(device, c, splits: 0);
    }

    [Theory]
    [MemberData(nameof(Backend))]
    public void Gpu_ManySplits_MatchesCpu(string backend)
    {
        // A workspace of 5 splits over 257 keys: the LSE merge of several partial (max, sum) pairs, and splits of which
        // some see no key of a causal row.
        var device = backends.Get(backend);
        CheckGpu<BFloat16>(device, Cases[6] with { Spec = Cases[6].Spec with { Splits = 5 } }, splits: 5);
        CheckGpu<Half>(device, Cases[4] with { Spec = Cases[4].Spec with { Splits = 3 } }, splits: 3);
    }

    public static TheoryData<string> Backend => Backends.Names;

    private static void CheckGpu<T>(CudaDevice device, WindowCase c, int splits) where T : unmanaged
    {
        var spec = c.Spec;
        var input = Create<T>(c, c.Name.Length + 1);
        var expected = new float[spec.OutputElements];
        TokenScoresCpu.WindowScores<T>(spec, input.Query, input.Keys, c.Lengths, input.Table, expected);

        var kernels = new TokenScoreKernels(device);
        using var query = device.Allocate<T>(input.Query);
        using var keys = device.Allocate<T>(input.Keys);
        using var scores = device.Allocate<float>(ScoreData.Poison(spec.OutputElements));
        using var workspace = new WindowScoreWorkspace(device, spec.QueryRows, splits > 0 ? splits : TokenScoreKernels.MaxSplits);
        if (splits > 0) Assert.Equal(splits, kernels.PlanSplits(spec, c.Lengths.Max()));
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.BatchSize, spec.Cache.MaxPagesPerSequence);
            table.Update(input.Table, c.Lengths, spec.KeyPool);
            kernels.WindowScores(spec, query.Span, keys.Span, table, scores.Span, workspace);
            device.DefaultStream.Synchronize();
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.BatchSize);
            lengths.Update(c.Lengths, spec.Cache.MaxTokens);
            kernels.WindowScores(spec, query.Span, keys.Span, lengths, scores.Span, workspace);
            device.DefaultStream.Synchronize();
        }
        var actual = scores.ToArray();
        AssertClose(actual, [.. expected.Select(v => (double)v)], GpuTolerance, "GPU vs CPU");
        AssertZeroPastLengths(spec, c.Lengths, actual);
    }

    /// <summary>Norm-wise relative error per output row within <paramref name="tolerance"/>, no NaN, and each element within
    /// tolerance · (its row's largest value).</summary>
    private static void AssertClose(float[] actual, double[] expected, double tolerance, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        Assert.DoesNotContain(actual, float.IsNaN);
        double num = 0, den = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            num += (actual[i] - expected[i]) * (actual[i] - expected[i]);
            den += expected[i] * expected[i];
        }
        double relative = den == 0 ? Math.Sqrt(num) : Math.Sqrt(num / den);
        Assert.True(relative <= tolerance, $"{what}: relative error {relative:E3} > {tolerance:E1}");
        double scale = expected.Length == 0 ? 0 : expected.Max(Math.Abs);
        for (int i = 0; i < actual.Length; i++)
            Assert.True(Math.Abs(actual[i] - expected[i]) <= 4 * tolerance * Math.Max(Math.Abs(expected[i]), 1e-3 * scale) + 1e-30,
                $"{what}: [{i}] {actual[i]} vs {expected[i]}");
    }

    private static void AssertZeroPastLengths(in WindowScoreSpec spec, int[] lengths, float[] scores)
    {
        int heads = spec.OutputHeads, maxTokens = spec.Cache.MaxTokens;
        for (int b = 0; b < spec.BatchSize; b++)
            for (int h = 0; h < heads; h++)
                for (int n = lengths[b]; n < maxTokens; n++)
                    Assert.True(scores[((long)b * heads + h) * maxTokens + n] == 0, $"score of (b {b}, head {h}, position {n} ≥ length) is not 0");
    }

    [Fact]
    public void Probabilities_SumToWindowQueries_PerHead()
    {
        // With sum over the window and no group reduction, each query head's row sums to the number of present queries
        // (each present query's probabilities sum to 1): a check independent of the oracle.
        var spec = S(2, 5, 4, 2, 64, KvCacheShape.Contiguous(30), ScoreReduction.Sum, ScoreReduction.None);
        int[] lengths = [30, 3];   // the second row has only 3 present queries of 5
        var rng = new Random(11);
        var keys = ScoreData.Storage<Half>(rng, spec.Cache, 2, 64, lengths, []);
        var query = ScoreData.Rows<Half>(rng, spec.QueryRows, 64);
        var scores = new float[spec.OutputElements];
        TokenScoresCpu.WindowScores<Half>(spec, query, keys, lengths, [], scores);
        for (int b = 0; b < 2; b++)
            for (int h = 0; h < 4; h++)
            {
                double sum = scores.AsSpan((b * 4 + h) * 30, 30).ToArray().Sum(v => (double)v);
                Assert.Equal(b == 0 ? 5 : 3, sum, 4);
            }
    }
}
