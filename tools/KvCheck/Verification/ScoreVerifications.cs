using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvCheck.Verification;

/// <summary>Per-token norms: the append form (<see cref="Append"/> set) or the whole-cache form (<see cref="Cache"/> set).</summary>
internal sealed record NormShape(string Name, bool Bf16, AppendNormSpec? Append = null, CacheNormSpec? Cache = null, int[]? Lengths = null,
    int PadEvery = 0) : VerificationShape
{
    public override string Description
    {
        get
        {
            string type = Bf16 ? "bf16" : "fp16";
            if (Append is { } a)
            {
                var p = a.Append.Pool;
                return $"{Name}: append T={a.Append.NumTokens} Hkv={p.NumKvHeads} D={p.HeadDim} page={p.PageSize} {p.Layout} " +
                    $"k={a.KeyNorm} v={a.ValueNorm}{(PadEvery > 0 ? $" pad=1/{PadEvery}" : "")} {type}";
            }
            var c = Cache!.Value;
            string storage = c.Cache.IsPaged ? $"page={c.Cache.PageSize}" : "contiguous";
            return $"{Name}: cache B={c.Rows} Hkv={c.NumKvHeads} D={c.HeadDim} N=[{string.Join(',', Lengths!)}] {storage} {c.Cache.Layout} " +
                $"k={c.KeyNorm} v={c.ValueNorm} {type}";
        }
    }
}

/// <summary>Pooling of <c>[Rows, Length]</c> scores.</summary>
internal sealed record PoolShape(string Name, PoolingSpec Spec, int[]? Lengths) : VerificationShape
{
    public override string Description =>
        $"{Name}: rows={Spec.Rows} L={Spec.Length} k={Spec.KernelSize} {Spec.Kind}" +
        (Lengths is null ? "" : $" lengths/{Spec.EffectiveRowsPerLength} rows");
}

/// <summary>Observation-window scoring.</summary>
internal sealed record WindowShape(string Name, WindowScoreSpec Spec, int[] Lengths, bool Bf16) : VerificationShape
{
    public override string Description
    {
        get
        {
            var s = Spec;
            string storage = s.Cache.IsPaged ? $"page={s.Cache.PageSize}" : "contiguous";
            return $"{Name}: B={s.BatchSize} W={s.WindowSize} Hq={s.NumQueryHeads} Hkv={s.NumKvHeads} D={s.HeadDim} N=[{string.Join(',', Lengths)}] " +
                $"{storage} {s.Cache.Layout} {s.WindowReduction}/{s.GroupReduction}{(s.Causal ? "" : " non-causal")} {(Bf16 ? "bf16" : "fp16")}";
        }
    }
}

/// <summary>
/// The token-scoring verifications (selection family). Norms and pooling: CPU twin vs the float64 oracle (norms within
/// 2e-6 per element, the average within its fp32 summation bound, the max exactly), GPU vs CPU bit for bit (every
/// untouched side-buffer entry stays NaN). Window scores: CPU vs oracle within 5e-6, GPU vs CPU within 1e-5 (relative,
/// norm-wise; exp and tensor-core dot products differ by ulps).
/// </summary>
internal static class ScoreVerifications
{
    public static IReadOnlyList<IVerification> All { get; } = [new NormVerification(), new PoolVerification(), new WindowScoreVerification()];

    internal static TokenScoreKernels Kernels(GpuContext gpu) => gpu.Get(device => new TokenScoreKernels(device));

    internal static float Normal(Random rng)
    {
        double u = 1.0 - rng.NextDouble(), v = rng.NextDouble();
        return (float)(Math.Sqrt(-2.0 * Math.Log(u)) * Math.Cos(2 * Math.PI * v));
    }

    /// <summary>Rows like real keys: standard normal with three outlier channels ×8.</summary>
    internal static T[] Rows<T>(Random rng, long count, int dim) where T : unmanaged
    {
        var outliers = new HashSet<int>(Enumerable.Range(0, 3).Select(_ => rng.Next(dim)));
        var values = new T[count * dim];
        for (long i = 0; i < values.Length; i++)
            values[i] = AttentionElements.FromFloat<T>(Normal(rng) * (outliers.Contains((int)(i % dim)) ? 8f : 1f));
        return values;
    }

    internal static int[] BlockTable(Random rng, in KvCacheShape cache, int[] lengths)
    {
        if (!cache.IsPaged) return [];
        var table = new int[lengths.Length * cache.MaxPagesPerSequence];
        Array.Fill(table, -1);
        var pages = BatchShape.Permutation(cache.NumPages, rng);
        int next = 0;
        for (int b = 0; b < lengths.Length; b++)
            for (int p = 0; p < (lengths[b] + cache.PageSize - 1) / cache.PageSize; p++)
                table[b * cache.MaxPagesPerSequence + p] = pages[next++];
        return table;
    }

    /// <summary>Cache storage: NaN everywhere, random key-like rows (three outlier channels ×8) where a sequence has tokens.</summary>
    internal static T[] Storage<T>(Random rng, in KvCacheShape cache, int heads, int dim, int[] lengths, int[] table) where T : unmanaged
    {
        long tokens = cache.IsPaged ? (long)cache.NumPages * cache.PageSize : (long)lengths.Length * cache.MaxTokens;
        var storage = AttentionElements.Poisoned<T>(tokens * heads * dim);
        var outliers = new HashSet<int>(Enumerable.Range(0, 3).Select(_ => rng.Next(dim)));
        for (int b = 0; b < lengths.Length; b++)
            for (int n = 0; n < lengths[b]; n++)
                for (int h = 0; h < heads; h++)
                {
                    long offset = ScoreOracle.RowOffset(cache, heads, dim, cache.IsPaged ? table : null, b, n, h);
                    for (int d = 0; d < dim; d++) storage[offset + d] = AttentionElements.FromFloat<T>(Normal(rng) * (outliers.Contains(d) ? 8f : 1f));
                }
        return storage;
    }

    internal static float[] Poison(long length)
    {
        var array = new float[length];
        Array.Fill(array, float.NaN);
        return array;
    }

    /// <summary>Per-element |a − e| ≤ tolerance · |e| (NaN on both sides counts as equal: untouched entries).</summary>
    internal static VerificationOutcome PerElement(string name, ReadOnlySpan<float> actual, ReadOnlySpan<double> expected, Func<int, double> bound)
    {
        long mismatches = 0;
        double maxRel = 0;
        string? detail = null;
        for (int i = 0; i < expected.Length; i++)
        {
            double a = actual[i], e = expected[i];
            if (double.IsNaN(a) && double.IsNaN(e)) continue;
            double rel = Math.Abs(a - e) / Math.Max(Math.Abs(e), 1e-30);
            maxRel = Math.Max(maxRel, double.IsNaN(rel) ? double.PositiveInfinity : rel);
            if (!(Math.Abs(a - e) <= bound(i)))
            {
                mismatches++;
                detail ??= $"{name}[{i}] = {a:G8} vs oracle {e:G8}";
            }
        }
        return new VerificationOutcome(expected.Length, mismatches, maxRel, detail);
    }

    internal static VerificationOutcome Bits(string name, float[] actual, float[] expected) =>
        Comparison.Compare<float>(name, actual, expected, ElementKind.U8);
}

internal sealed class NormVerification() : Verification<NormShape>("selection", "norms", ShapeList())
{
    private static NormShape[] ShapeList()
    {
        static AppendNormSpec A(PagedKvLayout pool, int tokens, long keyStride = 0, long valueStride = 0) =>
            new(new PagedAppendSpec(pool, tokens, keyStride, valueStride));
        return
        [
            new("decode step llama", false, A(new PagedKvLayout(40, 16, 8, 128), 33), PadEvery: 7),
            new("prefill fused qkv hnd", true, A(new PagedKvLayout(20, 16, 4, 128, KvLayout.Hnd), 257, 3 * 4 * 128, 3 * 4 * 128)),
            new("odd dims page 7", false, A(new PagedKvLayout(9, 7, 3, 72), 19) with { KeyNorm = VectorNorm.L1, ValueNorm = VectorNorm.L2 }, PadEvery: 4),
            new("cache contiguous nhd", true, Cache: new CacheNormSpec(3, 8, 128, KvCacheShape.Contiguous(300)), Lengths: [300, 0, 17]),
            new("cache paged hnd d64", false, Cache: new CacheNormSpec(2, 2, 64, KvCacheShape.Paged(40, 16, 20, KvLayout.Hnd)), Lengths: [257, 16]),
            new("cache paged d576 page 1", true, Cache: new CacheNormSpec(2, 1, 576, KvCacheShape.Paged(12, 1, 8)), Lengths: [7, 1]),
        ];
    }

    protected override VerificationOutcome RunCpu(NormShape shape, int seed) => shape.Bf16 ? Run<BFloat16>(shape, seed, null) : Run<Half>(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, NormShape shape, int seed) =>
        shape.Bf16 ? Run<BFloat16>(shape, seed, gpu) : Run<Half>(shape, seed, gpu);

    private static VerificationOutcome Run<T>(NormShape shape, int seed, GpuContext? gpu) where T : unmanaged =>
        shape.Append is { } append ? RunAppend<T>(append, shape.PadEvery, seed, gpu) : RunCache<T>(shape.Cache!.Value, shape.Lengths!, seed, gpu);

    private static VerificationOutcome RunAppend<T>(AppendNormSpec spec, int padEvery, int seed, GpuContext? gpu) where T : unmanaged
    {
        var rng = new Random(seed);
        var pool = spec.Append.Pool;
        long Rows(long stride) => spec.Append.NumTokens == 0 ? 0 : ((spec.Append.NumTokens - 1) * stride + pool.TokenElements) / pool.HeadDim + 1;
        var keys = ScoreVerifications.Rows<T>(rng, Rows(spec.Append.KeyStride), pool.HeadDim);
        var values = ScoreVerifications.Rows<T>(rng, Rows(spec.Append.ValueStride), pool.HeadDim);
        var free = BatchShape.Permutation((int)pool.Slots, rng);
        var slots = Enumerable.Range(0, spec.Append.NumTokens).Select(t => padEvery > 0 && t % padEvery == padEvery - 1 ? -1 : free[t]).ToArray();
        var keyNorms = ScoreVerifications.Poison(spec.NormElements);
        var valueNorms = ScoreVerifications.Poison(spec.NormElements);
        TokenScoresCpu.AppendNorms<T>(spec, keys, values, slots, keyNorms, valueNorms);
        if (gpu is null)
        {
            var outcome = VerificationOutcome.Empty;
            foreach (var (source, stride, norm, actual, name) in new[]
                     {
                         (keys, spec.Append.KeyStride, spec.KeyNorm, keyNorms, "keyNorms"),
                         (values, spec.Append.ValueStride, spec.ValueNorm, valueNorms, "valueNorms"),
                     })
            {
                var expected = new double[actual.Length];
                Array.Fill(expected, double.NaN);
                ScoreOracle.AppendNorms(pool.NumKvHeads, pool.HeadDim, AttentionElements.ToDoubles<T>(source), stride, slots, norm, expected);
                outcome = outcome.And(ScoreVerifications.PerElement(name, actual, expected, i => 2e-6 * Math.Abs(expected[i])));
            }
            return outcome;
        }

        var device = gpu.Device;
        using var dKeys = device.Allocate<T>(keys);
        using var dValues = device.Allocate<T>(values);
        using var dKeyNorms = device.Allocate<float>(ScoreVerifications.Poison(spec.NormElements));
        using var dValueNorms = device.Allocate<float>(ScoreVerifications.Poison(spec.NormElements));
        using var mapping = new DeviceSlotMapping(device, Math.Max(1, slots.Length));
        mapping.Update(slots, pool, gpu.Stream);
        ScoreVerifications.Kernels(gpu).AppendNorms(spec, dKeys.Span, dValues.Span, mapping, dKeyNorms.Span, dValueNorms.Span, gpu.Stream);
        gpu.Stream.Synchronize();
        return ScoreVerifications.Bits("keyNorms", dKeyNorms.ToArray(), keyNorms).And(ScoreVerifications.Bits("valueNorms", dValueNorms.ToArray(), valueNorms));
    }

    private static VerificationOutcome RunCache<T>(CacheNormSpec spec, int[] lengths, int seed, GpuContext? gpu) where T : unmanaged
    {
        var rng = new Random(seed);
        var table = ScoreVerifications.BlockTable(rng, spec.Cache, lengths);
        var keys = ScoreVerifications.Storage<T>(rng, spec.Cache, spec.NumKvHeads, spec.HeadDim, lengths, table);
        var values = ScoreVerifications.Storage<T>(rng, spec.Cache, spec.NumKvHeads, spec.HeadDim, lengths, table);
        var keyNorms = new float[spec.OutputElements];
        var valueNorms = new float[spec.OutputElements];
        TokenScoresCpu.CacheNorms<T>(spec, keys, values, lengths, table, keyNorms, valueNorms);
        if (gpu is null)
        {
            var outcome = VerificationOutcome.Empty;
            foreach (var (storage, norm, actual, name) in new[] { (keys, spec.KeyNorm, keyNorms, "keyNorms"), (values, spec.ValueNorm, valueNorms, "valueNorms") })
            {
                var expected = new double[actual.Length];
                ScoreOracle.CacheNorms(spec.Cache, spec.NumKvHeads, spec.HeadDim, AttentionElements.ToDoubles<T>(storage), lengths,
                    spec.Cache.IsPaged ? table : null, norm, expected);
                outcome = outcome.And(ScoreVerifications.PerElement(name, actual, expected, i => 2e-6 * Math.Abs(expected[i])));
            }
            return outcome;
        }

        var device = gpu.Device;
        using var dKeys = device.Allocate<T>(keys);
        using var dValues = device.Allocate<T>(values);
        using var dKeyNorms = device.Allocate<float>(ScoreVerifications.Poison(spec.OutputElements));
        using var dValueNorms = device.Allocate<float>(ScoreVerifications.Poison(spec.OutputElements));
        var kernels = ScoreVerifications.Kernels(gpu);
        if (spec.Cache.IsPaged)
        {
            using var dTable = new DeviceBlockTable(device, spec.Rows, spec.Cache.MaxPagesPerSequence);
            dTable.Update(table, lengths, spec.KeyPool, gpu.Stream);
            kernels.CacheNorms(spec, dKeys.Span, dValues.Span, dTable, dKeyNorms.Span, dValueNorms.Span, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        else
        {
            using var dLengths = new DeviceSequenceLengths(device, spec.Rows);
            dLengths.Update(lengths, spec.Cache.MaxTokens, gpu.Stream);
            kernels.CacheNorms(spec, dKeys.Span, dValues.Span, dLengths, dKeyNorms.Span, dValueNorms.Span, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        return ScoreVerifications.Bits("keyNorms", dKeyNorms.ToArray(), keyNorms).And(ScoreVerifications.Bits("valueNorms", dValueNorms.ToArray(), valueNorms));
    }
}

internal sealed class PoolVerification() : Verification<PoolShape>("selection", "pool", ShapeList())
{
    private static PoolShape[] ShapeList() =>
    [
        new("snapkv avg k5", new PoolingSpec(3 * 8, 1000, 5) { RowsPerLength = 8 }, [1000, 999, 17]),
        new("longbench max k7", new PoolingSpec(8, 4096, 7, PoolingKind.Max), null),
        new("k wider than rows", new PoolingSpec(4, 19, 31), [19, 7, 1, 0]),
        new("max k255 odd rows", new PoolingSpec(5, 257, 255, PoolingKind.Max) { RowsPerLength = 5 }, [200]),
        new("k1 identity", new PoolingSpec(2, 7, 1), null),
    ];

    protected override VerificationOutcome RunCpu(PoolShape shape, int seed) => Run(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, PoolShape shape, int seed) => Run(shape, seed, gpu);

    private static VerificationOutcome Run(PoolShape shape, int seed, GpuContext? gpu)
    {
        var spec = shape.Spec;
        var rng = new Random(seed);
        var input = new float[spec.Elements];
        for (int i = 0; i < input.Length; i++) input[i] = (float)Math.Exp(3 * ScoreVerifications.Normal(rng)) * 1e-3f * (rng.Next(10) == 0 ? -1 : 1);
        var output = ScoreVerifications.Poison(spec.Elements);
        TokenScoresCpu.Pool(spec, input, shape.Lengths ?? [], output);
        if (gpu is null)
        {
            var expected = new double[spec.Elements];
            var magnitude = new double[spec.Elements];
            ScoreOracle.Pool(spec.Rows, spec.Length, spec.KernelSize, spec.Kind, [.. input.Select(v => (double)v)], shape.Lengths,
                spec.EffectiveRowsPerLength, expected);
            ScoreOracle.Pool(spec.Rows, spec.Length, spec.KernelSize, PoolingKind.Average, [.. input.Select(v => Math.Abs((double)v))], shape.Lengths,
                spec.EffectiveRowsPerLength, magnitude);
            // Max exactly; the average within the fp32 summation bound k·2⁻²⁴·mean|x| (+ the division's half ulp).
            return ScoreVerifications.PerElement("output", output, expected,
                i => spec.Kind == PoolingKind.Max ? 0 : (spec.KernelSize + 1) * Math.ScaleB(1, -24) * magnitude[i]);
        }

        var device = gpu.Device;
        using var x = device.Allocate<float>(input);
        using var y = device.Allocate<float>(ScoreVerifications.Poison(spec.Elements));
        using var lengths = shape.Lengths is null ? null : new DeviceSequenceLengths(device, shape.Lengths.Length);
        lengths?.Update(shape.Lengths, spec.Length, gpu.Stream);
        ScoreVerifications.Kernels(gpu).Pool(spec, x.Span, lengths, y.Span, gpu.Stream);
        gpu.Stream.Synchronize();
        return ScoreVerifications.Bits("output", y.ToArray(), output);
    }
}

internal sealed class WindowScoreVerification() : Verification<WindowShape>("selection", "window_scores", ShapeList())
{
    private const double OracleTolerance = 5e-6, GpuTolerance = 1e-5;

    private static WindowShape[] ShapeList()
    {
        static WindowScoreSpec S(int b, int w, int hq, int hkv, int d, KvCacheShape cache, ScoreReduction window, ScoreReduction group) =>
            new(b, w, hq, hkv, d, cache) { WindowReduction = window, GroupReduction = group };
        return
        [
            new("snapkv llama gqa", S(2, 32, 32, 8, 128, KvCacheShape.Paged(40, 16, 20), ScoreReduction.Sum, ScoreReduction.Sum), [300, 33], true),
            new("kvpress mean/mean hnd", S(1, 16, 8, 2, 128, KvCacheShape.Contiguous(500, KvLayout.Hnd), ScoreReduction.Mean, ScoreReduction.Mean), [500], false),
            new("per head, d64, short rows", S(3, 8, 8, 4, 64, KvCacheShape.Paged(30, 7, 10, KvLayout.Hnd), ScoreReduction.Sum, ScoreReduction.None),
                [70, 5, 0], false),
            new("whole prompt max/max d72", S(1, 45, 4, 1, 72, KvCacheShape.Contiguous(45), ScoreReduction.Max, ScoreReduction.Max), [45], true),
            new("tova w1 mha non-causal", S(2, 1, 4, 4, 64, KvCacheShape.Contiguous(257), ScoreReduction.Sum, ScoreReduction.Mean) with { Causal = false },
                [257, 1], true),
        ];
    }

    protected override VerificationOutcome RunCpu(WindowShape shape, int seed) => shape.Bf16 ? Run<BFloat16>(shape, seed, null) : Run<Half>(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, WindowShape shape, int seed) =>
        shape.Bf16 ? Run<BFloat16>(shape, seed, gpu) : Run<Half>(shape, seed, gpu);

    private static VerificationOutcome Run<T>(WindowShape shape, int seed, GpuContext? gpu) where T : unmanaged
    {
        var spec = shape.Spec;
        var rng = new Random(seed);
        var table = ScoreVerifications.BlockTable(rng, spec.Cache, shape.Lengths);
        var keys = ScoreVerifications.Storage<T>(rng, spec.Cache, spec.NumKvHeads, spec.HeadDim, shape.Lengths, table);
        var query = ScoreVerifications.Rows<T>(rng, spec.QueryRows, spec.HeadDim);
        var scores = ScoreVerifications.Poison(spec.OutputElements);
        TokenScoresCpu.WindowScores<T>(spec, query, keys, shape.Lengths, table, scores);
        if (gpu is null)
        {
            var expected = new double[spec.OutputElements];
            ScoreOracle.WindowScores(spec, AttentionElements.ToDoubles<T>(query), AttentionElements.ToDoubles<T>(keys), shape.Lengths,
                spec.Cache.IsPaged ? table : null, expected);
            return AttentionVerifications.Within<float>("scores", scores, expected, OracleTolerance);
        }

        var device = gpu.Device;
        var kernels = ScoreVerifications.Kernels(gpu);
        using var dQuery = device.Allocate<T>(query);
        using var dKeys = device.Allocate<T>(keys);
        using var dScores = device.Allocate<float>(ScoreVerifications.Poison(spec.OutputElements));
        using var workspace = new WindowScoreWorkspace(device, spec.QueryRows, TokenScoreKernels.MaxSplits);
        if (spec.Cache.IsPaged)
        {
            using var dTable = new DeviceBlockTable(device, spec.BatchSize, spec.Cache.MaxPagesPerSequence);
            dTable.Update(table, shape.Lengths, spec.KeyPool, gpu.Stream);
            kernels.WindowScores(spec, dQuery.Span, dKeys.Span, dTable, dScores.Span, workspace, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        else
        {
            using var dLengths = new DeviceSequenceLengths(device, spec.BatchSize);
            dLengths.Update(shape.Lengths, spec.Cache.MaxTokens, gpu.Stream);
            kernels.WindowScores(spec, dQuery.Span, dKeys.Span, dLengths, dScores.Span, workspace, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        return AttentionVerifications.Within<float>("scores", dScores.ToArray(), [.. scores.Select(v => (double)v)], GpuTolerance);
    }
}
