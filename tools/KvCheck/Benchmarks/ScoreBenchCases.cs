using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Selection;

namespace KvCheck.Benchmarks;

/// <summary>
/// The token-scoring benchmark rows (issue 6), bf16, paged NHD pools of page 16, every sequence exactly N tokens:
/// <list type="bullet">
/// <item><c>selection.norms</c>: ‖k‖₂ (and ‖v‖₁) of every cached token → <c>[B, Hkv, N]</c> fp32. Bytes: the rows read
/// (B·N·Hkv·D·2 per tensor) + the norms written (4 per row per tensor).</item>
/// <item><c>selection.norms_append</c>: the same for T appended tokens into slot-indexed side buffers.</item>
/// <item><c>selection.pool</c>: avg pooling k = 7 of <c>[B·Hkv, N]</c> fp32. Bytes: read + write 4 per entry.</item>
/// <item><c>selection.window_scores</c>: SnapKV scoring of the last W queries against N keys. Bytes: the keys once
/// (B·N·Hkv·D·2; the kernels read them twice, once per pass, so 50 % of copy is the two-pass ceiling) + the queries +
/// the scores. FLOPs: two passes of 2·B·Hq·W·N·D.</item>
/// </list>
/// Shape strings: <c>B=1 N=32768 Hkv=8 D=128 page=16 bf16 keys+values</c>; <c>T=32768 Hkv=8 D=128 page=16 bf16 keys+values</c>;
/// <c>rows=128 N=32768 k=7 avg</c>; <c>B=1 W=32 N=32768 Hq=32 Hkv=8 D=128 page=16 bf16 sum/sum</c>. No goals yet.
/// </summary>
internal static class ScoreBenchCases
{
    public const int PageSize = 16;

    public static IEnumerable<GpuBenchCase> Gpu(bool quick)
    {
        yield return new GpuCacheNorms(1, 32768, 8, 128, values: false);
        yield return new GpuCacheNorms(1, 32768, 8, 128, values: true);
        if (!quick) yield return new GpuCacheNorms(16, 8192, 8, 128, values: true);
        yield return new GpuAppendNorms(32768, 8, 128);
        yield return new GpuPool(128, 32768, 7);
        yield return new GpuWindowScores(1, 32, 32768, 32, 8, 128, ScoreReduction.Sum, ScoreReduction.Sum);
        if (!quick)
        {
            yield return new GpuWindowScores(4, 64, 8192, 32, 8, 128, ScoreReduction.Mean, ScoreReduction.Mean);
            yield return new GpuWindowScores(1, 32, 131072, 32, 8, 128, ScoreReduction.Sum, ScoreReduction.Sum);
        }
    }

    public static IEnumerable<CpuBenchCase> Cpu() =>
    [
        new CpuCacheNorms(1, 4096, 8, 128),
        new CpuPool(64, 8192, 7),
        new CpuWindowScores(1, 16, 2048, 32, 8, 128),
    ];

    public static KvCacheShape Cache(int batch, int tokens) => KvCacheShape.Paged(batch * ((tokens + PageSize - 1) / PageSize), PageSize, (tokens + PageSize - 1) / PageSize);

    /// <summary>A block table giving each sequence its own random pages.</summary>
    public static int[] Table(in KvCacheShape cache, int batch, int seed)
    {
        var pages = Enumerable.Range(0, cache.NumPages).ToArray();
        new Random(seed).Shuffle(pages);
        return pages[..(batch * cache.MaxPagesPerSequence)];
    }

    public static BFloat16[] Host(long count, BFloat16[] block)
    {
        var array = new BFloat16[count];
        for (long i = 0; i < count; i += block.Length) block.AsSpan(0, (int)Math.Min(block.Length, count - i)).CopyTo(array.AsSpan((int)i));
        return array;
    }
}

/// <summary><c>selection.norms</c> over a paged cache on the GPU.</summary>
internal sealed class GpuCacheNorms(int batch, int tokens, int heads, int dim, bool values) : GpuBenchCase
{
    private readonly CacheNormSpec _spec = new(batch, heads, dim, ScoreBenchCases.Cache(batch, tokens));
    private readonly List<(DeviceMemory<BFloat16> Keys, DeviceMemory<BFloat16>? Values)> _sets = [];
    private DeviceMemory<float>? _keyNorms, _valueNorms;
    private DeviceBlockTable? _table;
    private TokenScoreKernels? _kernels;

    public override string Op => "selection.norms";
    public override string Shape => $"B={batch} N={tokens} Hkv={heads} D={dim} page={ScoreBenchCases.PageSize} bf16 {(values ? "keys+values" : "keys")}";
    private int Tensors => values ? 2 : 1;
    public override long BytesMoved => Tensors * ((long)batch * tokens * heads * dim * 2 + (long)batch * tokens * heads * 4);
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => Tensors * _spec.OutputElements * 4;
    public override long SetAllocationBytes => Tensors * _spec.StorageElements * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _kernels = new TokenScoreKernels(device);
        _table = new DeviceBlockTable(device, batch, _spec.Cache.MaxPagesPerSequence);
        _table.Update(ScoreBenchCases.Table(_spec.Cache, batch, seed), Enumerable.Repeat(tokens, batch).ToArray(), _spec.KeyPool);
        _keyNorms = device.Allocate<float>(_spec.OutputElements);
        _valueNorms = values ? device.Allocate<float>(_spec.OutputElements) : null;
        for (int s = 0; s < sets; s++)
            _sets.Add((AttentionBenchCases.Filled(device, _spec.StorageElements, block), values ? AttentionBenchCases.Filled(device, _spec.StorageElements, block) : null));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (k, v) = _sets[set];
        _kernels!.CacheNorms(_spec, k.Span, v is null ? default : v.Span, _table!, _keyNorms!.Span, _valueNorms is null ? default : _valueNorms.Span, stream);
    }

    public override void Dispose()
    {
        foreach (var (k, v) in _sets)
        {
            k.Dispose();
            v?.Dispose();
        }
        _sets.Clear();
        _keyNorms?.Dispose();
        _valueNorms?.Dispose();
        _table?.Dispose();
    }
}

/// <summary><c>selection.norms_append</c>: T tokens' K and V norms into slot-indexed side buffers (consecutive slots).</summary>
internal sealed class GpuAppendNorms(int tokens, int heads, int dim) : GpuBenchCase
{
    private readonly AppendNormSpec _spec = new(new PagedAppendSpec(new PagedKvLayout(tokens / ScoreBenchCases.PageSize + 1, ScoreBenchCases.PageSize, heads, dim), tokens));
    private readonly List<(DeviceMemory<BFloat16> Keys, DeviceMemory<BFloat16> Values)> _sets = [];
    private DeviceMemory<float>? _keyNorms, _valueNorms;
    private DeviceSlotMapping? _slots;
    private TokenScoreKernels? _kernels;

    public override string Op => "selection.norms_append";
    public override string Shape => $"T={tokens} Hkv={heads} D={dim} page={ScoreBenchCases.PageSize} bf16 keys+values";
    public override long BytesMoved => 2 * ((long)tokens * heads * dim * 2 + (long)tokens * heads * 4);
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => 2 * _spec.NormElements * 4 + tokens * 4L;
    public override long SetAllocationBytes => 2L * tokens * heads * dim * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _kernels = new TokenScoreKernels(device);
        _slots = new DeviceSlotMapping(device, tokens);
        _slots.Update(Enumerable.Range(0, tokens).ToArray(), _spec.Append.Pool);
        _keyNorms = device.Allocate<float>(_spec.NormElements);
        _valueNorms = device.Allocate<float>(_spec.NormElements);
        long elements = (long)tokens * heads * dim;
        for (int s = 0; s < sets; s++) _sets.Add((AttentionBenchCases.Filled(device, elements, block), AttentionBenchCases.Filled(device, elements, block)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (k, v) = _sets[set];
        _kernels!.AppendNorms(_spec, k.Span, v.Span, _slots!, _keyNorms!.Span, _valueNorms!.Span, stream);
    }

    public override void Dispose()
    {
        foreach (var (k, v) in _sets)
        {
            k.Dispose();
            v.Dispose();
        }
        _sets.Clear();
        _keyNorms?.Dispose();
        _valueNorms?.Dispose();
        _slots?.Dispose();
    }
}

/// <summary><c>selection.pool</c>: average pooling of fp32 score rows on the GPU.</summary>
internal sealed class GpuPool(int rows, int length, int kernelSize) : GpuBenchCase
{
    private readonly PoolingSpec _spec = new(rows, length, kernelSize);
    private readonly List<(DeviceMemory<float> Input, DeviceMemory<float> Output)> _sets = [];
    private TokenScoreKernels? _kernels;

    public override string Op => "selection.pool";
    public override string Shape => $"rows={rows} N={length} k={kernelSize} avg";
    public override long BytesMoved => 2 * _spec.Elements * 4;
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => 0;
    public override long SetAllocationBytes => 2 * _spec.Elements * 4;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var host = new float[_spec.Elements];
        for (int i = 0; i < host.Length; i++) host[i] = (float)rng.NextDouble();
        _kernels = new TokenScoreKernels(device);
        for (int s = 0; s < sets; s++) _sets.Add((device.Allocate<float>(host), device.Allocate<float>(_spec.Elements)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (input, output) = _sets[set];
        _kernels!.Pool(_spec, input.Span, null, output.Span, stream);
    }

    public override void Dispose()
    {
        foreach (var (input, output) in _sets)
        {
            input.Dispose();
            output.Dispose();
        }
        _sets.Clear();
    }
}

/// <summary><c>selection.window_scores</c> on the GPU over a paged cache.</summary>
internal sealed class GpuWindowScores(int batch, int window, int tokens, int queryHeads, int kvHeads, int dim, ScoreReduction windowReduction,
    ScoreReduction groupReduction) : GpuBenchCase
{
    private readonly WindowScoreSpec _spec = new(batch, window, queryHeads, kvHeads, dim, ScoreBenchCases.Cache(batch, tokens))
    {
        WindowReduction = windowReduction,
        GroupReduction = groupReduction,
    };
    private readonly List<(DeviceMemory<BFloat16> Query, DeviceMemory<BFloat16> Keys)> _sets = [];
    private DeviceMemory<float>? _scores;
    private DeviceBlockTable? _table;
    private WindowScoreWorkspace? _workspace;
    private TokenScoreKernels? _kernels;

    public override string Op => "selection.window_scores";
    public override string Shape =>
        $"B={batch} W={window} N={tokens} Hq={queryHeads} Hkv={kvHeads} D={dim} page={ScoreBenchCases.PageSize} bf16 " +
        $"{windowReduction.ToString().ToLowerInvariant()}/{groupReduction.ToString().ToLowerInvariant()}";
    public override long BytesMoved => (long)batch * tokens * kvHeads * dim * 2 + _spec.QueryElements * 2 + _spec.OutputElements * 4;
    public override long Flops => 2 * 2L * batch * queryHeads * window * tokens * dim;
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => _spec.OutputElements * 4 + _spec.QueryRows * 4 * (2 * TokenScoreKernels.MaxSplits + 1);
    public override long SetAllocationBytes => _spec.KeyElements * 2 + _spec.QueryElements * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _kernels = new TokenScoreKernels(device);
        _table = new DeviceBlockTable(device, batch, _spec.Cache.MaxPagesPerSequence);
        _table.Update(ScoreBenchCases.Table(_spec.Cache, batch, seed), Enumerable.Repeat(tokens, batch).ToArray(), _spec.KeyPool);
        _scores = device.Allocate<float>(_spec.OutputElements);
        _workspace = new WindowScoreWorkspace(device, _spec.QueryRows, TokenScoreKernels.MaxSplits);
        for (int s = 0; s < sets; s++)
            _sets.Add((AttentionBenchCases.Filled(device, _spec.QueryElements, block), AttentionBenchCases.Filled(device, _spec.KeyElements, block)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (query, keys) = _sets[set];
        _kernels!.WindowScores(_spec, query.Span, keys.Span, _table!, _scores!.Span, _workspace!, stream);
    }

    public override void Dispose()
    {
        foreach (var (query, keys) in _sets)
        {
            query.Dispose();
            keys.Dispose();
        }
        _sets.Clear();
        _scores?.Dispose();
        _table?.Dispose();
        _workspace?.Dispose();
    }
}

/// <summary><c>selection.norms</c> (keys and values) on the CPU.</summary>
internal sealed class CpuCacheNorms(int batch, int tokens, int heads, int dim) : CpuBenchCase
{
    private readonly CacheNormSpec _spec = new(batch, heads, dim, ScoreBenchCases.Cache(batch, tokens));
    private readonly List<(BFloat16[] Keys, BFloat16[] Values)> _sets = [];
    private float[] _keyNorms = [], _valueNorms = [];
    private int[] _lengths = [], _table = [];

    public override string Op => "selection.norms";
    public override string Shape => $"B={batch} N={tokens} Hkv={heads} D={dim} page={ScoreBenchCases.PageSize} bf16 keys+values";
    public override long BytesMoved => 2 * ((long)batch * tokens * heads * dim * 2 + (long)batch * tokens * heads * 4);
    public override long SharedAllocationBytes => 2 * _spec.OutputElements * 4;
    public override long SetAllocationBytes => 2 * _spec.StorageElements * 2;

    public override void Prepare(int sets, int seed)
    {
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _lengths = Enumerable.Repeat(tokens, batch).ToArray();
        _table = ScoreBenchCases.Table(_spec.Cache, batch, seed);
        _keyNorms = new float[_spec.OutputElements];
        _valueNorms = new float[_spec.OutputElements];
        for (int s = 0; s < sets; s++) _sets.Add((ScoreBenchCases.Host(_spec.StorageElements, block), ScoreBenchCases.Host(_spec.StorageElements, block)));
    }

    public override void Run(int set)
    {
        var (k, v) = _sets[set];
        TokenScoresCpu.CacheNorms<BFloat16>(_spec, k, v, _lengths, _table, _keyNorms, _valueNorms);
    }

    public override void Dispose() => _sets.Clear();
}

/// <summary><c>selection.pool</c> on the CPU.</summary>
internal sealed class CpuPool(int rows, int length, int kernelSize) : CpuBenchCase
{
    private readonly PoolingSpec _spec = new(rows, length, kernelSize);
    private readonly List<(float[] Input, float[] Output)> _sets = [];

    public override string Op => "selection.pool";
    public override string Shape => $"rows={rows} N={length} k={kernelSize} avg";
    public override long BytesMoved => 2 * _spec.Elements * 4;
    public override long SharedAllocationBytes => 0;
    public override long SetAllocationBytes => 2 * _spec.Elements * 4;

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        for (int s = 0; s < sets; s++)
        {
            var input = new float[_spec.Elements];
            for (int i = 0; i < input.Length; i++) input[i] = (float)rng.NextDouble();
            _sets.Add((input, new float[_spec.Elements]));
        }
    }

    public override void Run(int set) => TokenScoresCpu.Pool(_spec, _sets[set].Input, [], _sets[set].Output);

    public override void Dispose() => _sets.Clear();
}

/// <summary><c>selection.window_scores</c> on the CPU (a smaller shape: the CPU does the FLOPs on its cores).</summary>
internal sealed class CpuWindowScores(int batch, int window, int tokens, int queryHeads, int kvHeads, int dim) : CpuBenchCase
{
    private readonly WindowScoreSpec _spec = new(batch, window, queryHeads, kvHeads, dim, ScoreBenchCases.Cache(batch, tokens));
    private readonly List<(BFloat16[] Query, BFloat16[] Keys)> _sets = [];
    private float[] _scores = [];
    private int[] _lengths = [], _table = [];

    public override string Op => "selection.window_scores";
    public override string Shape => $"B={batch} W={window} N={tokens} Hq={queryHeads} Hkv={kvHeads} D={dim} page={ScoreBenchCases.PageSize} bf16 sum/sum";
    public override long BytesMoved => (long)batch * tokens * kvHeads * dim * 2 + _spec.QueryElements * 2 + _spec.OutputElements * 4;
    public override long Flops => 2 * 2L * batch * queryHeads * window * tokens * dim;
    public override long SharedAllocationBytes => _spec.OutputElements * 4;
    public override long SetAllocationBytes => _spec.KeyElements * 2 + _spec.QueryElements * 2;

    public override void Prepare(int sets, int seed)
    {
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _lengths = Enumerable.Repeat(tokens, batch).ToArray();
        _table = ScoreBenchCases.Table(_spec.Cache, batch, seed);
        _scores = new float[_spec.OutputElements];
        for (int s = 0; s < sets; s++) _sets.Add((ScoreBenchCases.Host(_spec.QueryElements, block), ScoreBenchCases.Host(_spec.KeyElements, block)));
    }

    public override void Run(int set) =>
        TokenScoresCpu.WindowScores<BFloat16>(_spec, _sets[set].Query, _sets[set].Keys, _lengths, _table, _scores);

    public override void Dispose() => _sets.Clear();
}
