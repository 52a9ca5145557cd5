using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Selection;

namespace KvKernels.Tests.Selection;

/// <summary>Bad input to the scoring ops is an <see cref="ArgumentException"/> naming the parameter, on the CPU twin and
/// on the GPU wrapper (emulated backend), before anything is written or launched.</summary>
public sealed class ScoreBadInputTests(Backends backends)
{
    private static string? Param(Action action) => Assert.ThrowsAny<ArgumentException>(action).ParamName;

    [Fact]
    public void Pooling_RejectsBadSpecsAndBuffers()
    {
        var x = new float[2 * 10];
        var y = new float[2 * 10];
        Assert.Equal("spec", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 4), x, [], y)));    // even kernel
        Assert.Equal("spec", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 0), x, [], y)));
        Assert.Equal("spec", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 257), x, [], y)));
        Assert.Equal("spec", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3, (PoolingKind)7), x, [], y)));
        Assert.Equal("spec", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3) { RowsPerLength = 3 }, x, [5], y)));
        Assert.Equal("input", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3), x[1..], [], y)));
        Assert.Equal("output", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3), x, [], y[1..])));
        Assert.Equal("lengths", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3), x, [10], y)));
        Assert.Equal("lengths", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3), x, [10, 11], y)));
        Assert.Equal("lengths", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3), x, [-1, 3], y)));
        var shared = new float[20];
        Assert.Equal("output", Param(() => TokenScoresCpu.Pool(new PoolingSpec(2, 10, 3), shared, [], shared)));
        Assert.All(y, v => Assert.Equal(0f, v));   // nothing was written
    }

    [Fact]
    public void AppendNorms_RejectsBadSpecsAndBuffers()
    {
        var pool = new PagedKvLayout(2, 4, 2, 16);
        var spec = new AppendNormSpec(new PagedAppendSpec(pool, 3));
        var keys = new Half[3 * 32];
        var values = new Half[3 * 32];
        var norms = new float[spec.NormElements];
        int[] slots = [0, 5, -1];
        void Run(AppendNormSpec s, Half[] k, Half[] v, int[] sl, float[] kn, float[] vn) => TokenScoresCpu.AppendNorms<Half>(s, k, v, sl, kn, vn);
        Assert.Equal("keyNorms", Param(() => Run(spec, keys, values, slots, norms[1..], norms)));      // side buffer size
        Assert.Equal("valueNorms", Param(() => Run(spec, keys, values, slots, norms, [])));            // values without their buffer
        Assert.Equal("keys", Param(() => Run(spec, keys[..^1], values, slots, norms, norms)));
        Assert.Equal("keys", Param(() => Run(spec, [], [], slots, [], [])));                           // nothing to do
        Assert.Equal("slots", Param(() => Run(spec, keys, values, [0, 1], norms, norms)));
        Assert.Equal("slots", Param(() => Run(spec, keys, values, [0, 0, 1], norms, norms)));          // duplicate slot
        Assert.Equal("slots", Param(() => Run(spec, keys, values, [0, 8, 1], norms, norms)));          // slot out of the pool
        Assert.Equal("spec", Param(() => Run(spec with { Append = spec.Append with { KeyTokenStride = 16 } }, keys, values, slots, norms, norms)));
        Assert.Equal("spec", Param(() => Run(spec with { KeyNorm = (VectorNorm)5 }, keys, values, slots, norms, norms)));
        Assert.Equal("spec", Param(() => Run(spec with { Append = spec.Append with { Pool = pool with { HeadDim = 12 } } }, keys, values, slots, norms, norms)));
        Assert.Equal("keys", Param(() => TokenScoresCpu.AppendNorms<float>(spec, new float[96], [], slots, norms, [])));   // element type
        Assert.All(norms, v => Assert.Equal(0f, v));
    }

    [Fact]
    public void CacheNorms_RejectsBadSpecsAndBuffers()
    {
        var spec = new CacheNormSpec(2, 2, 16, KvCacheShape.Paged(4, 4, 2));
        var keys = new BFloat16[spec.StorageElements];
        var norms = new float[spec.OutputElements];
        int[] table = [0, 1, 2, -1];
        void Run(CacheNormSpec s, BFloat16[] k, int[] len, int[] tab, float[] kn) => TokenScoresCpu.CacheNorms<BFloat16>(s, k, [], len, tab, kn, []);
        Assert.Equal("keyNorms", Param(() => Run(spec, keys, [8, 3], table, new float[norms.Length - 1])));
        Assert.Equal("keys", Param(() => Run(spec, keys[1..], [8, 3], table, norms)));
        Assert.Equal("lengths", Param(() => Run(spec, keys, [8], table, norms)));
        Assert.Equal("lengths", Param(() => Run(spec, keys, [9, 3], table, norms)));                   // past MaxTokens
        Assert.Equal("blockTable", Param(() => Run(spec, keys, [8, 3], [0, 1, 7, -1], norms)));        // page out of range
        Assert.Equal("blockTable", Param(() => Run(spec, keys, [8, 3], [0, 1, 2], norms)));
        Assert.Equal("spec", Param(() => Run(spec with { Cache = spec.Cache with { PoolKvHeads = 1 } }, keys, [8, 3], table, norms)));
        Assert.Equal("spec", Param(() => Run(spec with { HeadDim = 20 }, keys, [8, 3], table, norms)));
        Assert.Equal("spec", Param(() => Run(spec with { Rows = -1 }, keys, [8, 3], table, norms)));
        Assert.All(norms, v => Assert.Equal(0f, v));
    }

    [Fact]
    public void WindowScores_RejectsBadSpecsAndBuffers()
    {
        var spec = new WindowScoreSpec(1, 4, 4, 2, 16, KvCacheShape.Contiguous(10));
        var query = new Half[spec.QueryElements];
        var keys = new Half[spec.KeyElements];
        var scores = new float[spec.OutputElements];
        void Run(WindowScoreSpec s, Half[] q, int[] len, float[] o) => TokenScoresCpu.WindowScores<Half>(s, q, keys, len, [], o);
        Assert.Equal("spec", Param(() => Run(spec with { WindowSize = 11 }, query, [10], scores)));      // W > L
        Assert.Equal("spec", Param(() => Run(spec with { WindowSize = 0 }, query, [10], scores)));
        Assert.Equal("spec", Param(() => Run(spec with { NumQueryHeads = 3 }, query, [10], scores)));    // head ratio not integral
        Assert.Equal("spec", Param(() => Run(spec with { NumQueryHeads = 1 }, query, [10], scores)));
        Assert.Equal("spec", Param(() => Run(spec with { HeadDim = 264 }, query, [10], scores)));
        Assert.Equal("spec", Param(() => Run(spec with { WindowReduction = ScoreReduction.None }, query, [10], scores)));
        Assert.Equal("spec", Param(() => Run(spec with { GroupReduction = (ScoreReduction)9 }, query, [10], scores)));
        Assert.Equal("spec", Param(() => Run(spec with { Scale = float.NaN }, query, [10], scores)));
        Assert.Equal("spec", Param(() => Run(spec with { Splits = TokenScoreKernels.MaxSplits + 1 }, query, [10], scores)));
        Assert.Equal("scores", Param(() => Run(spec, query, [10], scores[1..])));                       // destination too small
        Assert.Equal("scores", Param(() => Run(spec with { GroupReduction = ScoreReduction.None }, query, [10], scores)));   // needs Hq rows
        Assert.Equal("query", Param(() => Run(spec, query[8..], [10], scores)));
        Assert.Equal("lengths", Param(() => Run(spec, query, [11], scores)));
        Assert.Equal("lengths", Param(() => Run(spec, query, [10, 10], scores)));
        Assert.Equal("blockTable", Param(() => TokenScoresCpu.WindowScores<Half>(spec, query, keys, [10], [0], scores)));
        Assert.All(scores, v => Assert.Equal(0f, v));
    }

    [Fact]
    public void GpuWrappers_RejectBadBuffersAndIndexBuffers()
    {
        var device = backends.Get("emulated");
        var kernels = new TokenScoreKernels(device);

        // Window scores: storage overload, alignment, workspace, lengths.
        var spec = new WindowScoreSpec(1, 4, 4, 2, 16, KvCacheShape.Contiguous(10));
        using var query = device.Allocate<Half>(spec.QueryElements + 1);
        using var keys = device.Allocate<Half>(spec.KeyElements);
        using var scores = device.Allocate<float>(spec.OutputElements);
        using var lengths = new DeviceSequenceLengths(device, 2);
        lengths.Update([10], 10);
        using var workspace = new WindowScoreWorkspace(device, spec.QueryRows, 4);
        using var small = new WindowScoreWorkspace(device, spec.QueryRows - 1, 4);
        var q = query.Span.Slice(0, spec.QueryElements);
        Assert.Equal("query", Param(() => kernels.WindowScores(spec, query.Span.Slice(1, spec.QueryElements), keys.Span, lengths, scores.Span, workspace)));
        Assert.Equal("workspace", Param(() => kernels.WindowScores(spec, q, keys.Span, lengths, scores.Span, small)));
        Assert.Equal("scores", Param(() => kernels.WindowScores(spec, q, keys.Span, lengths, scores.Span.Slice(1), workspace)));
        using var table = new DeviceBlockTable(device, 1, 2);
        Assert.Equal("spec", Param(() => kernels.WindowScores(spec, q, keys.Span, table, scores.Span, workspace)));   // contiguous spec, paged overload
        lengths.Update([10, 10], 10);
        Assert.Equal("lengths", Param(() => kernels.WindowScores(spec, q, keys.Span, lengths, scores.Span, workspace)));

        // Norms: a slot mapping of another pool; a block table of another shape.
        var pool = new PagedKvLayout(2, 4, 2, 16);
        var append = new AppendNormSpec(new PagedAppendSpec(pool, 2));
        using var source = device.Allocate<Half>(2 * pool.TokenElements);
        using var sideBuffer = device.Allocate<float>(append.NormElements);
        using var slots = new DeviceSlotMapping(device, 2);
        slots.Update([0, 1], pool with { NumPages = 3 });
        Assert.Equal("slots", Param(() => kernels.AppendNorms(append, source.Span, default, slots, sideBuffer.Span, default)));
        slots.Update([0, 1], pool);
        Assert.Equal("valueNorms", Param(() => kernels.AppendNorms(append, source.Span, source.Span, slots, sideBuffer.Span, default)));

        var cacheSpec = new CacheNormSpec(2, 2, 16, KvCacheShape.Paged(4, 4, 2));
        using var cacheKeys = device.Allocate<Half>(cacheSpec.StorageElements);
        using var cacheNorms = device.Allocate<float>(cacheSpec.OutputElements);
        using var oneRow = new DeviceBlockTable(device, 2, 2);
        oneRow.Update([0, 1], [8], cacheSpec.KeyPool);
        Assert.Equal("table", Param(() => kernels.CacheNorms(cacheSpec, cacheKeys.Span, default, oneRow, cacheNorms.Span, default)));

        // Pooling in place.
        using var rows = device.Allocate<float>(20);
        Assert.Equal("output", Param(() => kernels.Pool(new PoolingSpec(2, 10, 3), rows.Span, null, rows.Span)));
        using var poolLengths = new DeviceSequenceLengths(device, 3);
        poolLengths.Update([1, 2, 3], 10);
        using var other = device.Allocate<float>(20);
        Assert.Equal("lengths", Param(() => kernels.Pool(new PoolingSpec(2, 10, 3), rows.Span, poolLengths, other.Span)));
    }
}
