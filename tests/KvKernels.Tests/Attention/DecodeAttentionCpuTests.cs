using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary>The CPU twin against the float64 oracle: the pairwise covering set, boundary lengths, and long contexts.</summary>
public sealed class DecodeAttentionCpuTests
{
    /// <summary>The CPU twin's output and LSE (NaN-poisoned before the call, so an unwritten element fails).</summary>
    internal sealed record CpuResult(Array Output, float[] Lse);

    /// <summary>Runs <see cref="DecodeAttentionCpu.Run{TIn, TOut}"/> on <paramref name="data"/> with the output type of
    /// its spec.</summary>
    internal static CpuResult Run<TIn>(AttentionData<TIn> data, bool withLse = true) where TIn : unmanaged =>
        data.Spec.OutputType switch
        {
            AttentionElement.Float16 => Run<TIn, Half>(data, withLse),
            AttentionElement.BFloat16 => Run<TIn, BFloat16>(data, withLse),
            _ => Run<TIn, float>(data, withLse),
        };

    internal static CpuResult Run<TIn, TOut>(AttentionData<TIn> data, bool withLse) where TIn : unmanaged where TOut : unmanaged
    {
        var spec = data.Spec;
        var output = AttentionElements.Poisoned<TOut>(spec.OutputElements);
        var lse = withLse ? AttentionElements.Poisoned<float>(spec.LseElements) : [];
        DecodeAttentionCpu.Run<TIn, TOut>(spec, data.Query, data.Keys, data.Values, data.Lengths, data.BlockTable, output, lse,
            data.Positions, data.AlibiSlopes);
        return new CpuResult(output, lse);
    }

    /// <summary>Asserts the result against the oracle with the output type's tolerance (and the LSE's).</summary>
    internal static void AssertMatchesOracle<TIn>(AttentionData<TIn> data, CpuResult result, string what) where TIn : unmanaged
    {
        var (expected, expectedLse) = data.Expected();
        double tolerance = AttentionCases.Tolerance(data.Spec.OutputType);
        switch (result.Output)
        {
            case Half[] h: AttentionCases.AssertClose<Half>(h, expected, tolerance, what + " output"); break;
            case BFloat16[] b: AttentionCases.AssertClose<BFloat16>(b, expected, tolerance, what + " output"); break;
            case float[] f: AttentionCases.AssertClose<float>(f, expected, tolerance, what + " output"); break;
            default: throw new InvalidOperationException(result.Output.GetType().Name);
        }
        if (result.Lse.Length > 0) AttentionCases.AssertClose<float>(result.Lse, expectedLse, AttentionCases.LseTolerance, what + " lse");
    }

    [Theory]
    [MemberData(nameof(AttentionCases.Rows), nameof(CoveringSet_MatchesOracle), MemberType = typeof(AttentionCases))]
    public void CoveringSet_MatchesOracle(string name)
    {
        var c = AttentionCases.Get(name);
        if (c.Spec.InputType == AttentionElement.Float16) Check<Half>(c);
        else Check<BFloat16>(c);

        static void Check<T>(AttentionCase c) where T : unmanaged
        {
            var data = c.Create<T>();
            AssertMatchesOracle(data, Run(data, c.WithLse), c.Name);
        }
    }

    [Fact]
    public void CoveringSet_CoversEveryPairOfOptionValues()
    {
        // Recover each case's option values from its spec and check every compatible pair is present.
        var seen = new HashSet<(int, int, int, int)>();
        foreach (var c in AttentionCases.All)
        {
            var s = c.Spec;
            int[] v =
            [
                s.Cache.IsPaged ? 1 : 0,
                s.Cache.Layout == KvLayout.Nhd ? 0 : 1,
                !s.Ragged ? 0 : s.Cache.PoolKvHeads == 1 ? 2 : 1,
                RopeIndex(s),
                s.Window == 0 ? 0 : s.Window == 5 ? 1 : s.Window == 6 ? 2 : 3,
                s.SoftCap > 0 ? 1 : 0,
                s.Alibi ? 1 : 0,
                s.KeyReuse ? 1 : 0,
                Array.IndexOf(AttentionCases.QueryLengths, s.QueryLength),
                Array.IndexOf(AttentionCases.GroupSizes, s.GroupSize),
                Array.IndexOf(AttentionCases.HeadDims, (s.HeadDim, s.ValueDim)),
                s.InputType == AttentionElement.Float16 ? 0 : 1,
                (int)s.OutputType,
                c.WithLse ? 1 : 0,
            ];
            Assert.DoesNotContain(-1, v);
            Assert.True(!s.Ragged || s.Cache.PoolKvHeads == 1 || s.NumKvHeads > 1, c.Name + ": ragged rows over Hkv-head storage need Hkv > 1");
            for (int a = 0; a < v.Length; a++)
                for (int b = a + 1; b < v.Length; b++)
                    seen.Add((a, v[a], b, v[b]));
        }
        int[] sizes = [2, 2, 3, AttentionCases.RopeVariants.Length, AttentionCases.WindowVariants.Length, 2, 2, 2,
            AttentionCases.QueryLengths.Length, AttentionCases.GroupSizes.Length, AttentionCases.HeadDims.Length, 2, 3, 2];
        var missing = new List<string>();
        for (int a = 0; a < sizes.Length; a++)
            for (int b = a + 1; b < sizes.Length; b++)
                for (int va = 0; va < sizes[a]; va++)
                    for (int vb = 0; vb < sizes[b]; vb++)
                    {
                        bool reuseWithSplitDims = a == (int)AttentionCases.Factor.KeyReuse && b == (int)AttentionCases.Factor.HeadDims
                            && va == 1 && AttentionCases.HeadDims[vb].Dv > AttentionCases.HeadDims[vb].Dk;
                        if (!reuseWithSplitDims && !seen.Contains((a, va, b, vb)))
                            missing.Add($"{(AttentionCases.Factor)a}={va} with {(AttentionCases.Factor)b}={vb}");
                    }
        Assert.True(missing.Count == 0, "Uncovered pairs: " + string.Join("; ", missing));
        Assert.Equal(AttentionCases.All.Count, AttentionCases.All.Select(c => c.Name).Distinct().Count());

        static int RopeIndex(in DecodeAttentionSpec s) => s.Rope.Style switch
        {
            RopeStyle.None => 0,
            RopeStyle.RotateHalf when s.Rope.ExplicitPositions => 5,
            RopeStyle.RotateHalf when s.Rope.RotaryDim != 0 => 3,
            RopeStyle.RotateHalf => 1,
            _ when s.Rope.ExplicitPositions => 4,
            _ => 2,
        };
    }

    public static TheoryData<int, int, string> Boundaries()
    {
        var data = new TheoryData<int, int, string>();
        foreach (int pageSize in new[] { 1, 16 })
            foreach (string storage in new[] { "contiguous", "paged" })
                data.Add(pageSize, 1, storage);
        data.Add(16, 5, "paged");
        data.Add(16, 16, "contiguous");
        return data;
    }

    /// <summary>Lengths 0, 1, page − 1, page, page + 1 and below the query length, every row of a batch, fp32 output.</summary>
    [Theory]
    [MemberData(nameof(Boundaries))]
    public void BoundaryLengths_MatchOracle(int pageSize, int queryLength, string storage)
    {
        int[] lengths = [0, 1, Math.Max(0, pageSize - 1), pageSize, pageSize + 1, Math.Max(0, queryLength - 1), 3 * pageSize + 2];
        int longest = lengths.Max();
        var cache = storage == "paged"
            ? KvCacheShape.Paged(lengths.Sum(l => (l + pageSize - 1) / pageSize) + 2, pageSize, (longest + pageSize - 1) / pageSize, KvLayout.Hnd)
            : KvCacheShape.Contiguous(longest);
        var spec = new DecodeAttentionSpec(lengths.Length, queryLength, 8, 2, 64, cache) { OutputType = AttentionElement.Float32 };
        var data = AttentionData<Half>.Create(spec, new Random(pageSize * 31 + queryLength), lengths);
        var result = Run(data);
        AssertMatchesOracle(data, result, "boundaries");

        // A row of length 0 (and a query index before the first key) outputs exact zeros and an LSE of −∞.
        var output = (float[])result.Output;
        for (int h = 0; h < spec.NumQueryHeads; h++)
        {
            Assert.Equal(float.NegativeInfinity, result.Lse[h]);
            Assert.All(output.AsSpan(h * 64, 64).ToArray(), x => Assert.Equal(0f, x));
        }
    }

    /// <summary>Window and sinks at every offset: window 1, window longer than the context, sinks wider than the window,
    /// sinks with a window that already covers them.</summary>
    [Theory]
    [InlineData(1, 0)]
    [InlineData(3, 1)]
    [InlineData(2, 5)]
    [InlineData(40, 4)]
    [InlineData(500, 0)]
    [InlineData(70, 3)]
    public void WindowAndSinks_MatchOracle(int window, int sinks)
    {
        // Query length 5 makes the five queries' windows differ; lengths put window edges on both sides of tile edges.
        int[] lengths = [0, 3, 33, 64, 65, 130];
        var spec = new DecodeAttentionSpec(lengths.Length, 5, 4, 2, 64, KvCacheShape.Contiguous(130))
        {
            Window = window, Sinks = sinks, InputType = AttentionElement.BFloat16, OutputType = AttentionElement.Float32,
        };
        var data = AttentionData<BFloat16>.Create(spec, new Random(window * 7 + sinks), lengths);
        AssertMatchesOracle(data, Run(data), $"window {window} sinks {sinks}");
    }

    /// <summary>Long contexts over many tiles (online-softmax rescaling), fp32 output; GQA on the parallel path.</summary>
    [Theory]
    [InlineData(1, 8, 128, "paged")]
    [InlineData(1, 8, 128, "contiguous")]
    [InlineData(2, 32, 64, "paged")]
    public void LongContext_MatchesOracle(int queryLength, int group, int headDim, string storage)
    {
        int[] lengths = [1500, 777];
        var cache = storage == "paged" ? KvCacheShape.Paged(160, 16, 96) : KvCacheShape.Contiguous(1536);
        var spec = new DecodeAttentionSpec(2, queryLength, 2 * group, 2, headDim, cache) { OutputType = AttentionElement.Float32 };
        var data = AttentionData<Half>.Create(spec, new Random(queryLength + group), lengths);
        AssertMatchesOracle(data, Run(data), "long context");
    }

    /// <summary>MQA with one sequence: the query rows of the only pair are split over the cores.</summary>
    [Fact]
    public void SinglePairManyQueryRows_SplitOverCores_MatchesOracle()
    {
        var spec = new DecodeAttentionSpec(1, 2, 64, 1, 128, KvCacheShape.Paged(40, 16, 40))
        {
            OutputType = AttentionElement.Float32, Rope = new RopeOptions(RopeStyle.RotateHalf), Window = 300, Sinks = 4,
        };
        var data = AttentionData<Half>.Create(spec, new Random(5), [600]);
        AssertMatchesOracle(data, Run(data), "MQA");
    }

    /// <summary>Large positions reach the scalar branch of the rotary sine/cosine (angles above 2^20).</summary>
    [Fact]
    public void RopeAtLargePositions_MatchesOracle()
    {
        var spec = new DecodeAttentionSpec(2, 1, 4, 2, 128, KvCacheShape.Contiguous(40))
        {
            OutputType = AttentionElement.Float32, Rope = new RopeOptions(RopeStyle.Interleaved, 10000f, 0, ExplicitPositions: true),
        };
        var data = AttentionData<Half>.Create(spec, new Random(9), [40, 33]);
        // Positions up to ~2^24 (a 16M-token ring buffer); the data's own positions are overwritten in place.
        for (int i = 0; i < data.Positions.Length; i++) data.Positions[i] = (1 << 24) - 1000 + 7 * i;
        AssertMatchesOracle(data, Run(data), "large positions");
    }

    /// <summary>A call below the parallel threshold runs on the calling thread and allocates nothing (scratch comes
    /// from the array pool, validation allocates only when it throws). A garbage collection caused by tests running
    /// beside this one may trim the pool and force one fresh rental, so the best of five calls must be 0.</summary>
    [Fact]
    public void SmallCall_AllocatesNothing()
    {
        var spec = new DecodeAttentionSpec(2, 2, 8, 2, 64, KvCacheShape.Paged(8, 16, 3))
        {
            OutputType = AttentionElement.BFloat16, Rope = new RopeOptions(RopeStyle.RotateHalf), Window = 20, Sinks = 2,
        };
        var data = AttentionData<Half>.Create(spec, new Random(4), [40, 33]);
        var output = new BFloat16[spec.OutputElements];
        var lse = new float[spec.LseElements];
        Assert.Equal(0, LeastAllocated(() =>
            DecodeAttentionCpu.Run<Half, BFloat16>(spec, data.Query, data.Keys, data.Values, data.Lengths, data.BlockTable, output, lse)));

        var merge = new MergeStatesSpec(4, 64);
        var a = new float[256];
        var b = new float[256];
        var o = new float[256];
        var l = new float[4];
        float[] la = [0, 1, 2, 3], lb = [1, 1, 1, 1];
        Assert.Equal(0, LeastAllocated(() => DecodeAttentionCpu.MergeStates<float>(merge, a, la, b, lb, o, l)));

        static long LeastAllocated(Action call)
        {
            call(); // warm: the first rental of a size allocates
            long least = long.MaxValue;
            for (int i = 0; i < 5; i++)
            {
                long before = GC.GetAllocatedBytesForCurrentThread();
                call();
                least = Math.Min(least, GC.GetAllocatedBytesForCurrentThread() - before);
            }
            return least;
        }
    }

    /// <summary>Empty batch: nothing to do, nothing read.</summary>
    [Fact]
    public void EmptyBatch_IsANoOp()
    {
        var spec = new DecodeAttentionSpec(0, 1, 8, 2, 64, KvCacheShape.Contiguous(16));
        DecodeAttentionCpu.Run<Half, Half>(spec, [], [], [], [], [], Span<Half>.Empty);
    }

    /// <summary>A NaN in a visible key reaches the output (the twin does not hide bad data), while NaN in unused slots
    /// (every case's storage) does not.</summary>
    [Fact]
    public void NaNInAVisibleKey_PropagatesToThatSequenceOnly()
    {
        var spec = new DecodeAttentionSpec(2, 1, 2, 1, 64, KvCacheShape.Contiguous(8)) { OutputType = AttentionElement.Float32 };
        var data = AttentionData<Half>.Create(spec, new Random(3), [8, 8]);
        data.Keys[3 * 64 + 5] = Half.NaN; // sequence 0, token 3
        var output = (float[])Run(data).Output;
        Assert.All(output.AsSpan(0, 2 * 64).ToArray(), x => Assert.True(float.IsNaN(x)));
        Assert.All(output.AsSpan(2 * 64).ToArray(), x => Assert.True(float.IsFinite(x)));
    }
}
