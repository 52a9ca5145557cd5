using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Per-token norms (P1): the CPU twin against the float64 oracle, and the GPU kernels against the CPU twin bit for bit
/// on every backend (untouched side-buffer entries stay NaN), for the append form (slot-indexed side buffers) and the
/// whole-cache form (contiguous and paged, NHD and HND, lengths 0, page boundaries).
/// </summary>
public sealed class KeyNormTests(Backends backends)
{
    public sealed record AppendCase(string Name, PagedKvLayout Pool, int Tokens, bool Bf16, bool Keys = true, bool Values = true,
        long KeyStride = 0, long ValueStride = 0, int PadEvery = 0, VectorNorm KeyNorm = VectorNorm.L2, VectorNorm ValueNorm = VectorNorm.L1)
    {
        public AppendNormSpec Spec => new(new PagedAppendSpec(Pool, Tokens, KeyStride, ValueStride)) { KeyNorm = KeyNorm, ValueNorm = ValueNorm };

        public override string ToString() => Name;
    }

    public static IReadOnlyList<AppendCase> AppendCases { get; } =
    [
        new("d128-fp16-page16-nhd-padding", new PagedKvLayout(6, 16, 8, 128), 33, false, PadEvery: 5),
        new("d72-bf16-page7-hnd", new PagedKvLayout(5, 7, 3, 72, KvLayout.Hnd), 19, true),
        new("d64-fused-qkv-strides", new PagedKvLayout(3, 16, 2, 64), 7, false, KeyStride: 3 * 2 * 64, ValueStride: 2 * 64 + 8),
        new("d576-one-token-swapped-norms", new PagedKvLayout(2, 1, 1, 576), 1, true, KeyNorm: VectorNorm.L1, ValueNorm: VectorNorm.L2),
        new("d8-keys-only", new PagedKvLayout(4, 4, 1, 8), 13, false, Values: false, PadEvery: 4),
        new("d256-values-only", new PagedKvLayout(3, 16, 2, 256, KvLayout.Hnd), 20, true, Keys: false),
        new("empty", new PagedKvLayout(2, 16, 2, 64), 0, false),
    ];

    public sealed record CacheCase(string Name, CacheNormSpec Spec, int[] Lengths, bool Bf16, bool Keys = true, bool Values = true)
    {
        public override string ToString() => Name;
    }

    public static IReadOnlyList<CacheCase> CacheCases { get; } =
    [
        new("contiguous-nhd-d128-fp16", new CacheNormSpec(3, 2, 128, KvCacheShape.Contiguous(19)), [19, 0, 7], false),
        new("contiguous-hnd-d72-bf16", new CacheNormSpec(2, 3, 72, KvCacheShape.Contiguous(8, KvLayout.Hnd)), [1, 8], true),
        new("paged-nhd-d64-bf16-page16", new CacheNormSpec(4, 2, 64, KvCacheShape.Paged(8, 16, 3)), [16, 17, 0, 48], true),
        new("paged-hnd-d128-fp16-page7-l1-keys", new CacheNormSpec(2, 1, 128, KvCacheShape.Paged(6, 7, 3, KvLayout.Hnd))
            { KeyNorm = VectorNorm.L1, ValueNorm = VectorNorm.L2 }, [7, 20], false),
        new("contiguous-l257-keys-only", new CacheNormSpec(1, 1, 64, KvCacheShape.Contiguous(257)), [257], false, Values: false),
        new("paged-values-only-d8-page1", new CacheNormSpec(2, 2, 8, KvCacheShape.Paged(12, 1, 6)), [6, 5], true, Keys: false),
    ];

    public static TheoryData<int> AppendIndices => new(Enumerable.Range(0, AppendCases.Count));

    public static TheoryData<int> CacheIndices => new(Enumerable.Range(0, CacheCases.Count));

    public static TheoryData<string, int> AppendBackendCases => Cross(AppendCases.Count);

    public static TheoryData<string, int> CacheBackendCases => Cross(CacheCases.Count);

    private static TheoryData<string, int> Cross(int count)
    {
        var data = new TheoryData<string, int>();
        foreach (var backend in Backends.All)
            for (int i = 0; i < count; i++) data.Add(backend, i);
        return data;
    }

    private sealed record AppendInputs<T>(T[] Keys, T[] Values, int[] Slots) where T : unmanaged;

    private static AppendInputs<T> CreateAppend<T>(AppendCase c, int seed) where T : unmanaged
    {
        var spec = c.Spec.Append;
        var rng = new Random(seed);
        int dim = spec.Pool.HeadDim;
        long SourceRows(long stride) => spec.NumTokens == 0 ? 0 : ((spec.NumTokens - 1) * stride + spec.Pool.TokenElements) / dim + 1;
        // Sources are whole rows; with a stride the gaps hold random values too (they must not be read).
        var keys = c.Keys ? ScoreData.Rows<T>(rng, SourceRows(spec.KeyStride), dim, ScoreData.Outliers(rng, dim)) : [];
        var values = c.Values ? ScoreData.Rows<T>(rng, SourceRows(spec.ValueStride), dim) : [];
        var free = TestData.Permutation(rng, (int)spec.Pool.Slots);
        var slots = Enumerable.Range(0, spec.NumTokens).Select(t => c.PadEvery > 0 && t % c.PadEvery == c.PadEvery - 1 ? -1 : free[t]).ToArray();
        return new AppendInputs<T>(keys, values, slots);
    }

    [Theory]
    [MemberData(nameof(AppendIndices))]
    public void Append_Cpu_MatchesOracle(int index)
    {
        var c = AppendCases[index];
        if (c.Bf16) CheckAppendCpu<BFloat16>(c);
        else CheckAppendCpu<Half>(c);
    }

    private static void CheckAppendCpu<T>(AppendCase c) where T : unmanaged
    {
        var spec = c.Spec;
        var input = CreateAppend<T>(c, c.Name.Length);
        var keyNorms = c.Keys ? ScoreData.Poison(spec.NormElements) : [];
        var valueNorms = c.Values ? ScoreData.Poison(spec.NormElements) : [];
        TokenScoresCpu.AppendNorms<T>(spec, input.Keys, input.Values, input.Slots, keyNorms, valueNorms);

        var pool = spec.Append.Pool;
        foreach (var (source, stride, norm, actual) in new[]
                 {
                     (input.Keys, spec.Append.KeyStride, spec.KeyNorm, keyNorms),
                     (input.Values, spec.Append.ValueStride, spec.ValueNorm, valueNorms),
                 })
        {
            if (actual.Length == 0) continue;
            var expected = new double[actual.Length];
            Array.Fill(expected, double.NaN);
            ScoreOracle.AppendNorms(pool.NumKvHeads, pool.HeadDim, AttentionElements.ToDoubles<T>(source), stride, input.Slots, norm, expected);
            for (int i = 0; i < actual.Length; i++)
            {
                if (double.IsNaN(expected[i])) { Assert.True(float.IsNaN(actual[i]), $"entry {i} was written but no token maps there"); continue; }
                Assert.True(Math.Abs(actual[i] - expected[i]) <= 2e-6 * expected[i], $"entry {i}: {actual[i]} vs oracle {expected[i]}");
            }
        }
    }

    [Theory]
    [MemberData(nameof(AppendBackendCases))]
    public void Append_Gpu_MatchesCpuBitForBit(string backend, int index)
    {
        var device = backends.Get(backend);
        var c = AppendCases[index];
        if (c.Bf16) CheckAppendGpu<BFloat16>(device, c);
        else CheckAppendGpu<Half>(device, c);
    }

    private static void CheckAppendGpu<T>(CudaDevice device, AppendCase c) where T : unmanaged
    {
        var spec = c.Spec;
        var input = CreateAppend<T>(c, c.Name.Length + 1);
        var expectedKeys = c.Keys ? ScoreData.Poison(spec.NormElements) : [];
        var expectedValues = c.Values ? ScoreData.Poison(spec.NormElements) : [];
        TokenScoresCpu.AppendNorms<T>(spec, input.Keys, input.Values, input.Slots, expectedKeys, expectedValues);

        using var keys = device.Allocate<T>(input.Keys);
        using var values = device.Allocate<T>(input.Values);
        using var keyNorms = device.Allocate<float>(expectedKeys.Length == 0 ? [] : ScoreData.Poison(spec.NormElements));
        using var valueNorms = device.Allocate<float>(expectedValues.Length == 0 ? [] : ScoreData.Poison(spec.NormElements));
        using var slots = new DeviceSlotMapping(device, Math.Max(1, spec.Append.NumTokens));
        slots.Update(input.Slots, spec.Append.Pool);
        new TokenScoreKernels(device).AppendNorms(spec, keys.Span, values.Span, slots, keyNorms.Span, valueNorms.Span);
        device.DefaultStream.Synchronize();

        Assert.Equal(-1, ScoreData.FirstBitDifference(keyNorms.ToArray(), expectedKeys));
        Assert.Equal(-1, ScoreData.FirstBitDifference(valueNorms.ToArray(), expectedValues));
    }

    private sealed record CacheInputs<T>(T[] Keys, T[] Values, int[] Table) where T : unmanaged;

    private static CacheInputs<T> CreateCache<T>(CacheCase c, int seed) where T : unmanaged
    {
        var spec = c.Spec;
        var rng = new Random(seed);
        var table = ScoreData.BlockTable(rng, spec.Cache, c.Lengths);
        var keys = c.Keys ? ScoreData.Storage<T>(rng, spec.Cache, spec.NumKvHeads, spec.HeadDim, c.Lengths, table) : [];
        var values = c.Values ? ScoreData.Storage<T>(rng, spec.Cache, spec.NumKvHeads, spec.HeadDim, c.Lengths, table) : [];
        return new CacheInputs<T>(keys, values, table);
    }

    [Theory]
    [MemberData(nameof(CacheIndices))]
    public void Cache_Cpu_MatchesOracle(int index)
    {
        var c = CacheCases[index];
        if (c.Bf16) CheckCacheCpu<BFloat16>(c);
        else CheckCacheCpu<Half>(c);
    }

    private static void CheckCacheCpu<T>(CacheCase c) where T : unmanaged
    {
        var spec = c.Spec;
        var input = CreateCache<T>(c, c.Name.Length);
        var keyNorms = c.Keys ? ScoreData.Poison(spec.OutputElements) : [];
        var valueNorms = c.Values ? ScoreData.Poison(spec.OutputElements) : [];
        TokenScoresCpu.CacheNorms<T>(spec, input.Keys, input.Values, c.Lengths, input.Table, keyNorms, valueNorms);
        foreach (var (storage, norm, actual) in new[] { (input.Keys, spec.KeyNorm, keyNorms), (input.Values, spec.ValueNorm, valueNorms) })
        {
            if (actual.Length == 0) continue;
            var expected = new double[actual.Length];
            ScoreOracle.CacheNorms(spec.Cache, spec.NumKvHeads, spec.HeadDim, AttentionElements.ToDoubles<T>(storage), c.Lengths,
                spec.Cache.IsPaged ? input.Table : null, norm, expected);
            for (int i = 0; i < actual.Length; i++)
                Assert.True(Math.Abs(actual[i] - expected[i]) <= 2e-6 * expected[i], $"entry {i}: {actual[i]} vs oracle {expected[i]}");
        }
    }

    [Theory]
    [MemberData(nameof(CacheBackendCases))]
    public void Cache_Gpu_MatchesCpuBitForBit(string backend, int index)
    {
        var device = backends.Get(backend);
        var c = CacheCases[index];
        if (c.Bf16) CheckCacheGpu<BFloat16>(device, c);
        else CheckCacheGpu<Half>(device, c);
    }

    private static void CheckCacheGpu<T>(CudaDevice device, CacheCase c) where T : unmanaged
    {
        var spec = c.Spec;
        var input = CreateCache<T>(c, c.Name.Length + 1);
        var expectedKeys = c.Keys ? new float[spec.OutputElements] : [];
        var expectedValues = c.Values ? new float[spec.OutputElements] : [];
        TokenScoresCpu.CacheNorms<T>(spec, input.Keys, input.Values, c.Lengths, input.Table, expectedKeys, expectedValues);

        using var keys = device.Allocate<T>(input.Keys);
        using var values = device.Allocate<T>(input.Values);
        using var keyNorms = device.Allocate<float>(c.Keys ? ScoreData.Poison(spec.OutputElements) : []);
        using var valueNorms = device.Allocate<float>(c.Values ? ScoreData.Poison(spec.OutputElements) : []);
        var kernels = new TokenScoreKernels(device);
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.Rows, spec.Cache.MaxPagesPerSequence);
            table.Update(input.Table, c.Lengths, spec.KeyPool);
            kernels.CacheNorms(spec, keys.Span, values.Span, table, keyNorms.Span, valueNorms.Span);
            device.DefaultStream.Synchronize();
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.Rows);
            lengths.Update(c.Lengths, spec.Cache.MaxTokens);
            kernels.CacheNorms(spec, keys.Span, values.Span, lengths, keyNorms.Span, valueNorms.Span);
            device.DefaultStream.Synchronize();
        }
        Assert.Equal(-1, ScoreData.FirstBitDifference(keyNorms.ToArray(), expectedKeys));
        Assert.Equal(-1, ScoreData.FirstBitDifference(valueNorms.ToArray(), expectedValues));
    }

    [Theory]
    [InlineData(KvLayout.Nhd)]
    [InlineData(KvLayout.Hnd)]
    public void AppendNorms_AgreeWithCacheNormsOfTheSameCache(KvLayout layout)
    {
        // An engine's path: append 2 sequences' tokens into a paged pool (PagedKvCache.Append) and keep the slot-indexed
        // norms; later, the whole-cache norms through the block table must be the same bits at every (sequence, token, head).
        var pool = new PagedKvLayout(9, 7, 3, 72, layout);
        int[] lengths = [19, 12];
        int[] table = [4, 0, 7, 2, 8, 5];   // [2, 3]: sequence 0 uses pages 4, 0, 7; sequence 1 uses 2, 8
        var slots = new List<int>();
        for (int b = 0; b < 2; b++)
            for (int n = 0; n < lengths[b]; n++) slots.Add(table[b * 3 + n / 7] * 7 + n % 7);
        var rng = new Random(9);
        var keys = ScoreData.Rows<BFloat16>(rng, slots.Count * 3L, 72, ScoreData.Outliers(rng, 72));
        var values = ScoreData.Rows<BFloat16>(rng, slots.Count * 3L, 72);
        var append = new PagedAppendSpec(pool, slots.Count);
        var keyPool = new BFloat16[pool.PoolElements];
        var valuePool = new BFloat16[pool.PoolElements];
        PagedKvCache.Append<BFloat16>(append, keys, values, [.. slots], keyPool, valuePool);
        var appendSpec = new AppendNormSpec(append);
        var slotKeyNorms = new float[appendSpec.NormElements];
        var slotValueNorms = new float[appendSpec.NormElements];
        TokenScoresCpu.AppendNorms<BFloat16>(appendSpec, keys, values, [.. slots], slotKeyNorms, slotValueNorms);

        var cacheSpec = new CacheNormSpec(2, 3, 72, KvCacheShape.Paged(9, 7, 3, layout));
        var keyNorms = new float[cacheSpec.OutputElements];
        var valueNorms = new float[cacheSpec.OutputElements];
        TokenScoresCpu.CacheNorms<BFloat16>(cacheSpec, keyPool, valuePool, lengths, table, keyNorms, valueNorms);
        int t = 0;
        for (int b = 0; b < 2; b++)
            for (int n = 0; n < lengths[b]; n++, t++)
                for (int h = 0; h < 3; h++)
                {
                    int cache = (b * 3 + h) * cacheSpec.Cache.MaxTokens + n, slot = slots[t] * 3 + h;
                    Assert.Equal(BitConverter.SingleToInt32Bits(slotKeyNorms[slot]), BitConverter.SingleToInt32Bits(keyNorms[cache]));
                    Assert.Equal(BitConverter.SingleToInt32Bits(slotValueNorms[slot]), BitConverter.SingleToInt32Bits(valueNorms[cache]));
                }
    }

    [Fact]
    public void TransposedFold_IsBitIdenticalToTheScalarFold()
    {
        if (!System.Runtime.Intrinsics.X86.Avx.IsSupported) Assert.Skip("No AVX here: the CPU twin uses the scalar fold only.");
        var rng = new Random(5);
        for (int trial = 0; trial < 200; trial++)
        {
            var a = new System.Runtime.Intrinsics.Vector256<float>[8];
            for (int l = 0; l < 8; l++)
            {
                var values = new float[8];
                for (int e = 0; e < 8; e++) values[e] = ScoreData.Normal(rng) * MathF.Pow(10, rng.Next(-3, 4));
                a[l] = System.Runtime.Intrinsics.Vector256.Create(values);
            }
            float scalar = TokenScoresCpu.FoldLanes(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
            float avx = TokenScoresCpu.FoldLanesAvx(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
            Assert.Equal(BitConverter.SingleToInt32Bits(scalar), BitConverter.SingleToInt32Bits(avx));
        }
    }

    [Fact]
    public void RowNorm_FollowsTheBlockedOrder_NotASequentialSum()
    {
        // 128 elements whose plain left-to-right fp32 sum of squares differs from the blocked order: the CPU twin must
        // give the blocked order's value (what the GPU computes), not the naive one.
        var rng = new Random(7);
        var row = new Half[128];
        for (int i = 0; i < row.Length; i++) row[i] = (Half)(ScoreData.Normal(rng) * (i % 17 == 0 ? 40f : 1f));
        var spec = new CacheNormSpec(1, 1, 128, KvCacheShape.Contiguous(1));
        var norms = new float[1];
        TokenScoresCpu.CacheNorms<Half>(spec, row, [], [1], [], norms, []);

        float[] acc = new float[64];
        for (int v = 0; v < 16; v++)
            for (int e = 0; e < 8; e++)
            {
                float x = (float)row[8 * v + e];
                acc[8 * (v % 8) + e] = MathF.FusedMultiplyAdd(x, x, acc[8 * (v % 8) + e]);
            }
        static float Fold(float[] a, int o, int s) =>
            ((a[o] + a[o + 4 * s]) + (a[o + 2 * s] + a[o + 6 * s])) + ((a[o + s] + a[o + 5 * s]) + (a[o + 3 * s] + a[o + 7 * s]));
        var lanes = new float[8];
        for (int l = 0; l < 8; l++) lanes[l] = Fold(acc, 8 * l, 1);
        float blocked = MathF.Sqrt(Fold(lanes, 0, 1));
        float naive = 0;
        foreach (var h in row) naive += (float)h * (float)h;
        Assert.Equal(BitConverter.SingleToInt32Bits(blocked), BitConverter.SingleToInt32Bits(norms[0]));
        Assert.NotEqual(BitConverter.SingleToInt32Bits(MathF.Sqrt(naive)), BitConverter.SingleToInt32Bits(norms[0]));
    }
}
