using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Mla;
using KvKernels.Paging;

namespace KvCheck.Benchmarks;

/// <summary>
/// The MLA benchmark rows (issue 4), DeepSeek dims (latent 512, RoPE 64, nope 128, value 128), bf16, one query token,
/// page 64, every sequence exactly N tokens: H ∈ {16, 32, 64, 128} (tensor-parallel shares of 128 heads),
/// B ∈ {1, 16, 64, 128}, N ∈ {1k, 4k, 16k} (quick: H ∈ {16, 128}, B ∈ {1, 64}, N ∈ {4k, 16k}).
/// <list type="bullet">
/// <item><c>mla.attend</c>: latent attention alone. Bytes: the latent rows B·N·576·2 + q + o. FLOPs 2·B·H·N·(576 + 512).
/// Goal ≥ 80 % of the copy bandwidth where it is memory-bound (H ≤ 32: ≤ 64 FLOP/byte); the compute-bound rows
/// (H = 128) report TFLOP/s instead.</item>
/// <item><c>mla.decode</c>: the whole step (absorb, attend, un-absorb). Bytes add the weights H·256·512·2 and q_nope,
/// q_pe, the output.</item>
/// <item><c>mla.cache_write</c>: T tokens' rows (decode: T = B of one step; prefill: 16k tokens): read c_kv and k_pe,
/// write 576-wide rows.</item>
/// </list>
/// Shape strings (identical in bench/peers/mla_torch.py): <c>B=64 N=4096 H=16 q=1 page=64 bf16</c>;
/// <c>T=16384 prefill page=64 bf16</c>.
/// </summary>
internal static class MlaBenchCases
{
    public const int PageSize = 64;

    public static IEnumerable<GpuBenchCase> Gpu(bool quick)
    {
        int[] heads = quick ? [16, 128] : [16, 32, 64, 128];
        int[] batches = quick ? [1, 64] : [1, 16, 64, 128];
        int[] lengths = quick ? [4096, 16384] : [1024, 4096, 16384];
        foreach (int h in heads)
            foreach (int b in batches)
                foreach (int n in lengths)
                    yield return new GpuMlaStep(h, b, n, wholeStep: false);
        foreach (int h in heads)
            foreach (int b in batches)
                foreach (int n in lengths)
                    yield return new GpuMlaStep(h, b, n, wholeStep: true);
        yield return new GpuMlaCacheWrite(128, decode: true);
        yield return new GpuMlaCacheWrite(16384, decode: false);
    }

    public static IEnumerable<CpuBenchCase> Cpu() => [new CpuMlaStep(16, 1, 4096, wholeStep: false), new CpuMlaStep(16, 1, 4096, wholeStep: true)];

    public static string Shape(int heads, int batch, int tokens) => $"B={batch} N={tokens} H={heads} q=1 page={PageSize} bf16";

    public static MlaAttentionSpec Spec(int heads, int batch, int tokens) =>
        new(batch, 1, MlaShape.DeepSeek(heads), KvCacheShape.Paged(batch * (tokens / PageSize), PageSize, tokens / PageSize))
        {
            InputType = AttentionElement.BFloat16,
            OutputType = AttentionElement.BFloat16,
        };

    public static long CacheBytes(int batch, int tokens) => (long)batch * tokens * 576 * 2;

    public static long Bytes(in MlaAttentionSpec spec, int tokens, bool wholeStep) => wholeStep
        ? CacheBytes(spec.BatchSize, tokens) + spec.Shape.WeightElements * 2 + (spec.NopeQueryElements + spec.RopeQueryElements + spec.OutputElements) * 2
        : CacheBytes(spec.BatchSize, tokens) + (spec.QueryElements + spec.LatentOutputElements) * 2;

    public static long Flops(in MlaAttentionSpec spec, int tokens, bool wholeStep)
    {
        long attention = 2L * spec.BatchSize * spec.Shape.NumHeads * tokens * (576 + 512);
        long gemms = 2L * spec.BatchSize * spec.Shape.NumHeads * (128 * 512 + 512 * 128);
        return wholeStep ? attention + gemms : attention;
    }
}

/// <summary><c>mla.attend</c> or <c>mla.decode</c> on the GPU at one shape.</summary>
internal sealed class GpuMlaStep(int heads, int batch, int tokens, bool wholeStep) : GpuBenchCase
{
    private readonly MlaAttentionSpec _spec = MlaBenchCases.Spec(heads, batch, tokens);
    private readonly List<(DeviceMemory<BFloat16> Query, DeviceMemory<BFloat16> Cache)> _sets = [];
    private DeviceMemory<BFloat16>? _nope, _rope, _weights, _output;
    private DeviceBlockTable? _table;
    private MlaWorkspace? _workspace;
    private MlaKernels? _kernels;

    public override string Op => wholeStep ? "mla.decode" : "mla.attend";
    public override string Shape => MlaBenchCases.Shape(heads, batch, tokens);
    public override long BytesMoved => MlaBenchCases.Bytes(_spec, tokens, wholeStep);
    public override long Flops => MlaBenchCases.Flops(_spec, tokens, wholeStep);
    public override double? GoalPercent => !wholeStep && heads <= 32 ? 80 : null;
    public override long SharedAllocationBytes => (_spec.Shape.WeightElements + _spec.NopeQueryElements + _spec.RopeQueryElements + _spec.OutputElements
        + 2 * _spec.QueryElements) * 2 + (long)_splits * _spec.TokenRows * heads * (576 + 1) * 4;

    /// <summary>The split count the heuristic plans for this shape on an H100-sized GPU (the workspace holds that many).</summary>
    private int _splits = 64;
    public override long SetAllocationBytes => MlaBenchCases.CacheBytes(batch, tokens) + _spec.QueryElements * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        DeviceMemory<BFloat16> Make(long n) => AttentionBenchCases.Filled(device, n, block);
        _kernels = new MlaKernels(device);
        var attention = _spec.ToDecodeAttention();
        _splits = Math.Max(1, new DecodeAttentionKernels(device).PlanSplits(attention, tokens));
        _table = new DeviceBlockTable(device, batch, _spec.Cache.MaxPagesPerSequence);
        var pages = Enumerable.Range(0, _spec.Cache.NumPages).ToArray();
        rng.Shuffle(pages);
        _table.Update(pages, Enumerable.Repeat(tokens, batch).ToArray(), attention.KeyPool);
        _workspace = new MlaWorkspace(device, _spec.TokenRows * heads, 576, _splits);
        _output = device.Allocate<BFloat16>(wholeStep ? _spec.OutputElements : _spec.LatentOutputElements);
        if (wholeStep)
        {
            _nope = Make(_spec.NopeQueryElements);
            _rope = Make(_spec.RopeQueryElements);
            _weights = Make(_spec.Shape.WeightElements);
        }
        for (int s = 0; s < sets; s++) _sets.Add((Make(_spec.QueryElements), Make(attention.KeyElements)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (query, cache) = _sets[set];
        if (wholeStep)
            _kernels!.Decode(_spec, _nope!.Span, _rope!.Span, _weights!.Span, cache.Span, _table!, _output!.Span, _workspace!, default, stream);
        else
            _kernels!.Attention.Run(_spec, query.Span, cache.Span, _table!, _output!.Span, default, _workspace!.Attention, stream);
    }

    public override void Dispose()
    {
        foreach (var (query, cache) in _sets)
        {
            query.Dispose();
            cache.Dispose();
        }
        _sets.Clear();
        _nope?.Dispose();
        _rope?.Dispose();
        _weights?.Dispose();
        _output?.Dispose();
        _table?.Dispose();
        _workspace?.Dispose();
        _kernels?.Dispose();
    }
}

/// <summary><c>mla.cache_write</c>: T tokens of DeepSeek rows (RMSNorm + interleaved RoPE) into a page-64 pool.</summary>
internal sealed class GpuMlaCacheWrite(int tokens, bool decode) : GpuBenchCase
{
    // Decode writes one token per sequence, each on its own page; prefill fills consecutive slots.
    private readonly MlaCacheWriteSpec _spec = new(tokens, MlaShape.DeepSeek(),
        MlaCacheWriteSpec.LatentPool(MlaShape.DeepSeek(), decode ? tokens : tokens / MlaBenchCases.PageSize + 1))
    {
        ElementType = AttentionElement.BFloat16,
    };
    private readonly List<(DeviceMemory<BFloat16> Latent, DeviceMemory<BFloat16> Rope, DeviceMemory<BFloat16> Cache)> _sets = [];
    private DeviceMemory<BFloat16>? _weight;
    private DeviceMemory<int>? _positions;
    private DeviceSlotMapping? _slots;
    private MlaCacheKernels? _kernels;

    public override string Op => "mla.cache_write";
    public override string Shape => $"T={tokens} {(decode ? "decode" : "prefill")} page={MlaBenchCases.PageSize} bf16";
    public override long BytesMoved => (long)tokens * (512 + 64) * 2 * 2 + 512 * 2;
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => tokens * 8L + 1024;
    public override long SetAllocationBytes => (long)tokens * 576 * 2 + _spec.Pool.PoolElements * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        DeviceMemory<BFloat16> Make(long n) => AttentionBenchCases.Filled(device, n, block);
        _kernels = new MlaCacheKernels(device);
        _weight = Make(512);
        _positions = device.Allocate<int>(Enumerable.Range(0, tokens).Select(_ => rng.Next(1 << 17)).ToArray());
        var slots = Enumerable.Range(0, tokens).Select(t => decode ? t * MlaBenchCases.PageSize + rng.Next(MlaBenchCases.PageSize) : t).ToArray();
        _slots = new DeviceSlotMapping(device, tokens);
        _slots.Update(slots, _spec.Pool);
        for (int s = 0; s < sets; s++) _sets.Add((Make((long)tokens * 512), Make((long)tokens * 64), Make(_spec.Pool.PoolElements)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (latent, rope, cache) = _sets[set];
        _kernels!.Write(_spec, latent.Span, rope.Span, _positions!.Span, _slots!, _weight!.Span, cache.Span, stream);
    }

    public override void Dispose()
    {
        foreach (var (latent, rope, cache) in _sets)
        {
            latent.Dispose();
            rope.Dispose();
            cache.Dispose();
        }
        _sets.Clear();
        _weight?.Dispose();
        _positions?.Dispose();
        _slots?.Dispose();
        _kernels?.Dispose();
    }
}

/// <summary>The CPU twin of <c>mla.attend</c> / <c>mla.decode</c>.</summary>
internal sealed class CpuMlaStep(int heads, int batch, int tokens, bool wholeStep) : CpuBenchCase
{
    private readonly MlaAttentionSpec _spec = MlaBenchCases.Spec(heads, batch, tokens);
    private readonly List<(BFloat16[] Query, BFloat16[] Cache)> _sets = [];
    private BFloat16[] _nope = [], _rope = [], _weights = [], _output = [];
    private int[] _lengths = [], _table = [];

    public override string Op => wholeStep ? "mla.decode" : "mla.attend";
    public override string Shape => MlaBenchCases.Shape(heads, batch, tokens);
    public override long BytesMoved => MlaBenchCases.Bytes(_spec, tokens, wholeStep);
    public override long Flops => MlaBenchCases.Flops(_spec, tokens, wholeStep);
    public override long SharedAllocationBytes => (_spec.Shape.WeightElements + _spec.OutputElements + _spec.LatentOutputElements) * 2;
    public override long SetAllocationBytes => MlaBenchCases.CacheBytes(batch, tokens) + _spec.QueryElements * 2;

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        BFloat16[] Make(long n)
        {
            var array = new BFloat16[n];
            for (long i = 0; i < n; i += block.Length) block.AsSpan(0, (int)Math.Min(block.Length, n - i)).CopyTo(array.AsSpan((int)i));
            return array;
        }
        _lengths = Enumerable.Repeat(tokens, batch).ToArray();
        var pages = Enumerable.Range(0, _spec.Cache.NumPages).ToArray();
        rng.Shuffle(pages);
        _table = pages;
        _output = new BFloat16[wholeStep ? _spec.OutputElements : _spec.LatentOutputElements];
        if (wholeStep)
        {
            _nope = Make(_spec.NopeQueryElements);
            _rope = Make(_spec.RopeQueryElements);
            _weights = Make(_spec.Shape.WeightElements);
        }
        for (int s = 0; s < sets; s++) _sets.Add((Make(_spec.QueryElements), Make(_spec.ToDecodeAttention().KeyElements)));
    }

    public override void Run(int set)
    {
        var (query, cache) = _sets[set];
        if (wholeStep) MlaCpu.Decode<BFloat16, BFloat16>(_spec, _nope, _rope, _weights, cache, _lengths, _table, _output);
        else MlaCpu.Attend<BFloat16, BFloat16>(_spec, query, cache, _lengths, _table, _output);
    }

    public override void Dispose() => _sets.Clear();
}
