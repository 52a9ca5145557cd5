using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Mla;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Mla;

/// <summary>
/// The latent cache write: CPU twin vs the float64 oracle (within the cache type's tolerance), GPU vs CPU on every
/// backend (latent part bit for bit, RoPE part within one unit of the type; untouched slots stay NaN), YaRN's
/// frequencies vs a hand computation, and bad input.
/// </summary>
public sealed class MlaCacheWriteTests(Backends backends)
{
    public sealed record WriteCase(string Name, MlaCacheWriteSpec Spec, int PadEvery = 0)
    {
        public override string ToString() => Name;
    }

    private static MlaCacheWriteSpec W(int tokens, MlaShape shape, int pageSize, AttentionElement type) =>
        new(tokens, shape, MlaCacheWriteSpec.LatentPool(shape, tokens / pageSize + 3, pageSize)) { ElementType = type };

    public static IReadOnlyList<WriteCase> Cases { get; } =
    [
        new("decode-1-bf16-interleaved", W(1, MlaShape.DeepSeek(), 64, AttentionElement.BFloat16)),
        new("prefill-65-fused-yarn", W(65, MlaShape.DeepSeek(), 64, AttentionElement.BFloat16) with
            { LatentStride = 576, RopeStride = 576, Rope = new MlaRope(RopeStyle.Interleaved, 10000f, YarnScaling.DeepSeekV3) }),
        new("fp16-rotatehalf-page13-padding", W(37, MlaShape.DeepSeek(), 13, AttentionElement.Float16) with { Rope = new MlaRope(RopeStyle.RotateHalf) }, 5),
        new("small-dims-no-rope-no-norm", W(9, new MlaShape(4, 96, 32, 64, 64), 7, AttentionElement.Float16) with
            { Rope = new MlaRope(RopeStyle.None), Normalize = false }),
        new("small-dims-rotatehalf-eps", W(20, new MlaShape(4, 160, 16, 64, 64), 4, AttentionElement.BFloat16) with
            { Rope = new MlaRope(RopeStyle.RotateHalf, 500000f), Epsilon = 1e-2f }),
        new("empty", W(0, MlaShape.DeepSeek(), 64, AttentionElement.BFloat16)),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int> BackendCases => Backends.CasesOnEach(Cases.Count);

    /// <summary>Inputs of one case: latent, k_pe (views of one fused buffer when the spec has strides), positions,
    /// slots (random distinct, every PadEvery-th −1), weight.</summary>
    private sealed record Inputs<T>(T[] Latent, T[] Rope, int[] Positions, int[] Slots, T[] Weight) where T : unmanaged;

    private static Inputs<T> Create<T>(WriteCase c, int seed) where T : unmanaged
    {
        var spec = c.Spec;
        var rng = new Random(seed);
        var fused = Values<T>(rng, spec.LatentElements + spec.Shape.RopeDim, 3f);
        var latent = fused.AsSpan(0, (int)spec.LatentElements).ToArray();
        var rope = spec.LatentStride != 0 ? fused.AsSpan(spec.Shape.LatentDim, (int)spec.RopeElements).ToArray() : Values<T>(rng, spec.RopeElements, 1f);
        var weight = spec.Normalize ? Values<T>(rng, spec.Shape.LatentDim, 1f) : [];
        var positions = spec.Rope.Style == RopeStyle.None ? [] : Enumerable.Range(0, spec.NumTokens).Select(_ => rng.Next(160_000)).ToArray();
        var free = Enumerable.Range(0, (int)spec.Pool.Slots).ToArray();
        rng.Shuffle(free);
        var slots = Enumerable.Range(0, spec.NumTokens).Select(t => c.PadEvery > 0 && t % c.PadEvery == c.PadEvery - 1 ? -1 : free[t]).ToArray();
        return new Inputs<T>(latent, rope, positions, slots, weight);
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int caseIndex)
    {
        var c = Cases[caseIndex];
        if (c.Spec.ElementType == AttentionElement.Float16) CheckCpu<Half>(c, 2e-3);
        else CheckCpu<BFloat16>(c, 1e-2);
    }

    private static void CheckCpu<T>(WriteCase c, double tolerance) where T : unmanaged
    {
        var spec = c.Spec;
        var input = Create<T>(c, c.Name.Length);
        var cache = AttentionElements.Poisoned<T>(spec.Pool.PoolElements);
        MlaCpu.WriteCache<T>(spec, input.Latent, input.Rope, input.Positions, input.Slots, input.Weight, cache);
        var expected = new double[cache.Length];
        Array.Fill(expected, double.NaN);
        MlaOracle.CacheWrite(spec, AttentionElements.ToDoubles<T>(input.Latent), AttentionElements.ToDoubles<T>(input.Rope), input.Positions,
            input.Slots, spec.Normalize ? AttentionElements.ToDoubles<T>(input.Weight) : null, expected);
        int written = 0;
        foreach (int slot in input.Slots.Where(s => s >= 0))
        {
            long offset = spec.Pool.RowOffset(slot, 0);
            var actual = cache.AsSpan((int)offset, spec.Shape.RowDim);
            var reference = expected.AsSpan((int)offset, spec.Shape.RowDim);
            Assert.InRange(AttentionElements.RelativeError<T>(actual[..spec.Shape.LatentDim], reference[..spec.Shape.LatentDim]), 0, tolerance);
            Assert.InRange(AttentionElements.RelativeError<T>(actual[spec.Shape.LatentDim..], reference[spec.Shape.LatentDim..]), 0, tolerance);
            written += spec.Shape.RowDim;
        }
        // Everything else is untouched (still NaN).
        Assert.Equal(cache.Length - written, cache.Count(x => double.IsNaN(AttentionElements.ToDouble(x))));
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int caseIndex)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        if (c.Spec.ElementType == AttentionElement.Float16) CheckGpu<Half>(device, c, 1.0 / 1024);
        else CheckGpu<BFloat16>(device, c, 1.0 / 128);
    }

    private static void CheckGpu<T>(CudaDevice device, WriteCase c, double ulp) where T : unmanaged
    {
        var spec = c.Spec;
        var input = Create<T>(c, c.Name.Length);
        var expected = AttentionElements.Poisoned<T>(spec.Pool.PoolElements);
        MlaCpu.WriteCache<T>(spec, input.Latent, input.Rope, input.Positions, input.Slots, input.Weight, expected);

        using var latent = device.Allocate<T>(input.Latent);
        using var rope = device.Allocate<T>(input.Rope);
        using var positions = device.Allocate<int>(input.Positions);
        using var weight = device.Allocate<T>(input.Weight);
        using var cache = device.Allocate<T>(AttentionElements.Poisoned<T>(spec.Pool.PoolElements));
        using var slots = new DeviceSlotMapping(device, Math.Max(1, spec.NumTokens));
        slots.Update(input.Slots, spec.Pool);
        using var ops = new MlaCacheKernels(device);
        ops.Write(spec, latent.Span, rope.Span, positions.Span, slots, weight.Span, cache.Span);
        device.DefaultStream.Synchronize();
        var actual = cache.ToArray();

        var rowDim = spec.Shape.RowDim;
        for (int i = 0; i < actual.Length; i++)
        {
            double a = AttentionElements.ToDouble(actual[i]), e = AttentionElements.ToDouble(expected[i]);
            if (double.IsNaN(e)) { Assert.True(double.IsNaN(a), $"pool[{i}] was written but no token maps there"); continue; }
            if (i % rowDim < spec.Shape.LatentDim) Assert.True(a == e, $"latent pool[{i}] = {a}, CPU {e} (must be bit-identical)");
            else Assert.True(Math.Abs(a - e) <= ulp * Math.Abs(e) + 1e-6, $"rope pool[{i}] = {a}, CPU {e}");
        }
    }

    [Fact]
    public void YarnFrequencies_MatchDeepSeekV3ByHand()
    {
        // DeepSeek-V3: θ = 1e4, d = 64, factor 40, original 4096, β_fast 32, β_slow 1.
        // find_correction_dim(r) = d · ln(4096 / (2π r)) / (2 ln 1e4): r = 32 → 64 · 3.0142 / 18.4207 = 10.47, r = 1 → 22.52.
        // low = floor(10.47) = 10, high = ceil(22.52) = 23; pair i keeps θ^(−2i/d) for i ≤ 10, is divided by 40 for i ≥ 23.
        double low = Math.Floor(64 * Math.Log(4096 / (2 * Math.PI * 32)) / (2 * Math.Log(10000)));
        double high = Math.Ceiling(64 * Math.Log(4096 / (2 * Math.PI * 1)) / (2 * Math.Log(10000)));
        Assert.Equal(10, low);
        Assert.Equal(23, high);
        var freqs = new MlaRope(RopeStyle.Interleaved, 10000f, YarnScaling.DeepSeekV3).InverseFrequencies(64);
        Assert.Equal(32, freqs.Length);
        for (int i = 0; i < 32; i++)
        {
            double plain = Math.Pow(10000, -2.0 * i / 64);
            double ramp = Math.Clamp((i - 10) / 13.0, 0, 1);   // 0 at i ≤ 10 (keep), 1 at i ≥ 23 (divide by 40)
            double expected = plain / 40 * ramp + plain * (1 - ramp);
            Assert.Equal((float)expected, freqs[i]);
        }
        Assert.Equal((float)Math.Pow(10000, -2.0 * 31 / 64) / 40, freqs[31], 1e-12f);
        // mscale: 0.1 · ln 40 + 1 = 1.368888, squared 1.873854 (research/kv_algorithms.md §4.4: ≈ 1.8739).
        Assert.Equal(1.873854, YarnScaling.DeepSeekV3.AttentionFactor, 5);
    }

    [Fact]
    public void BadInput_IsRejected()
    {
        var spec = W(3, MlaShape.DeepSeek(), 64, AttentionElement.BFloat16);
        var c = new WriteCase("bad", spec);
        var input = Create<BFloat16>(c, 1);
        var cache = new BFloat16[spec.Pool.PoolElements];
        void Run(MlaCacheWriteSpec s, BFloat16[] latent, BFloat16[] rope, int[] positions, int[] slots, BFloat16[] weight, BFloat16[] pool) =>
            MlaCpu.WriteCache<BFloat16>(s, latent, rope, positions, slots, weight, pool);
        Assert.Equal("latent", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent[1..], input.Rope, input.Positions, input.Slots, input.Weight, cache)).ParamName);
        Assert.Equal("ropeKey", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent, input.Rope[1..], input.Positions, input.Slots, input.Weight, cache)).ParamName);
        Assert.Equal("positions", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent, input.Rope, [1], input.Slots, input.Weight, cache)).ParamName);
        Assert.Equal("normWeight", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent, input.Rope, input.Positions, input.Slots, [], cache)).ParamName);
        Assert.Equal("cache", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent, input.Rope, input.Positions, input.Slots, input.Weight, cache[1..])).ParamName);
        Assert.Equal("slots", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent, input.Rope, input.Positions, [0, 0, 1], input.Weight, cache)).ParamName);
        Assert.Equal("slots", Assert.Throws<ArgumentException>(() => Run(spec, input.Latent, input.Rope, input.Positions, [0, 1, (int)spec.Pool.Slots], input.Weight, cache)).ParamName);
        // A pool whose rows are not LatentDim + RopeDim wide (576 ≠ 512 + 32).
        var wrongPool = spec with { Pool = new PagedKvLayout(4, 64, 1, 544) };
        Assert.Equal("spec", Assert.Throws<ArgumentException>(() => Run(wrongPool, input.Latent, input.Rope, input.Positions, input.Slots, input.Weight, cache)).ParamName);
        Assert.Equal("spec", Assert.Throws<ArgumentException>(() => Run(spec with { LatentStride = 500 }, input.Latent, input.Rope, input.Positions, input.Slots, input.Weight, cache)).ParamName);
        Assert.Equal("spec", Assert.Throws<ArgumentException>(() => Run(spec with { Pool = spec.Pool with { NumKvHeads = 2 } }, input.Latent, input.Rope, input.Positions, input.Slots, input.Weight, cache)).ParamName);
    }

    private static T[] Values<T>(Random rng, long count, float scale) where T : unmanaged
    {
        var values = new T[count];
        for (long i = 0; i < count; i++) values[i] = AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1) * scale);
        return values;
    }
}
