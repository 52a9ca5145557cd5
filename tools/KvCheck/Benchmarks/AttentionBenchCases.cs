using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvCheck.Benchmarks;

/// <summary>A decode-attention model shape: query heads, KV heads, head dim.</summary>
internal sealed record AttentionModel(string Name, int QueryHeads, int KvHeads, int HeadDim);

/// <summary>
/// The decode-attention benchmark rows (issue 3): Llama-3-8B (32q/8kv D128), 64q/8kv D128, MFA / Step-3 (64q/1kv D256)
/// and MHA (32q/32kv D128); B ∈ {1, 8, 64}; N ∈ {1k, 8k, 32k, 128k} where the KV fits in 8 GiB; one query token; bf16;
/// contiguous (HND, <c>[B, Hkv, N, D]</c>: the memory PyTorch's SDPA peer reads) and page 16 (NHD, as vLLM and the
/// paging kernels write it). Every sequence holds exactly N tokens.
/// Bytes counted: K and V rows read + q read + o written. Shape strings (identical in bench/peers/attention_torch.py):
/// <c>B=8 N=8192 Hq=32 Hkv=8 D=128 contiguous bf16 q=1</c> or <c>… page=16 bf16 q=1</c>.
/// Goals: ≥ 85 % of the copy bandwidth at N ≥ 8k when B·Hkv ≥ 64; ≥ 75 % at B = 1, N ≥ 32k (split-KV).
/// </summary>
internal static class AttentionBenchCases
{
    public const long MaxKvBytes = 8L << 30;

    public static IReadOnlyList<AttentionModel> Models { get; } =
    [
        new("llama3-8b", 32, 8, 128),
        new("gqa-64-8", 64, 8, 128),
        new("mfa-step3", 64, 1, 256),
        new("mha-32", 32, 32, 128),
    ];

    public static IEnumerable<GpuBenchCase> Gpu(bool quick)
    {
        int[] batches = quick ? [1, 8] : [1, 8, 64];
        int[] lengths = quick ? [8192, 32768] : [1024, 8192, 32768, 131072];
        foreach (var m in Models)
            foreach (int b in batches)
                foreach (int n in lengths)
                {
                    if (KvBytes(m, b, n) > MaxKvBytes) continue;
                    yield return new GpuDecode(m, b, n, pageSize: 0);
                    yield return new GpuDecode(m, b, n, pageSize: 16);
                }
    }

    public static IEnumerable<CpuBenchCase> Cpu()
    {
        yield return new CpuDecode(Models[0], 1, 8192, pageSize: 0);
        yield return new CpuDecode(Models[0], 4, 4096, pageSize: 16);
        yield return new CpuDecode(Models[2], 1, 8192, pageSize: 0);
        yield return new CpuDecode(Models[3], 2, 4096, pageSize: 0);
    }

    public static long KvBytes(AttentionModel m, int batch, int tokens) => 2L * batch * tokens * m.KvHeads * m.HeadDim * 2;

    public static long QueryOutputBytes(AttentionModel m, int batch) => 2L * batch * m.QueryHeads * m.HeadDim * 2;

    public static string Shape(AttentionModel m, int batch, int tokens, int pageSize) =>
        $"B={batch} N={tokens} Hq={m.QueryHeads} Hkv={m.KvHeads} D={m.HeadDim} {(pageSize == 0 ? "contiguous" : $"page={pageSize}")} bf16 q=1";

    /// <summary>The issue's goal for this row, or null when the row has none.</summary>
    public static double? Goal(AttentionModel m, int batch, int tokens) =>
        tokens >= 8192 && batch * m.KvHeads >= 64 ? 85 : batch == 1 && tokens >= 32768 ? 75 : null;

    public static DecodeAttentionSpec Spec(AttentionModel m, int batch, int tokens, int pageSize)
    {
        var cache = pageSize == 0
            ? KvCacheShape.Contiguous(tokens, KvLayout.Hnd)
            : KvCacheShape.Paged(batch * (tokens / pageSize), pageSize, tokens / pageSize);
        return new DecodeAttentionSpec(batch, 1, m.QueryHeads, m.KvHeads, m.HeadDim, cache)
        {
            InputType = AttentionElement.BFloat16,
            OutputType = AttentionElement.BFloat16,
        };
    }

    /// <summary>A random block table: the pool's pages in random order, B rows of N / page columns.</summary>
    public static int[] BlockTable(in DecodeAttentionSpec spec, Random rng)
    {
        var pages = Enumerable.Range(0, spec.Cache.NumPages).ToArray();
        rng.Shuffle(pages);
        return pages;
    }

    /// <summary>Normal-ish bf16 values (finite, as real activations are), tiled from one host block.</summary>
    public static BFloat16[] HostValues(int count, int seed)
    {
        var rng = new Random(seed);
        var values = new BFloat16[count];
        for (int i = 0; i < count; i++) values[i] = (BFloat16)(float)(rng.NextDouble() * 2 - 1);
        return values;
    }

    /// <summary>A device buffer of <paramref name="count"/> bf16 values, filled from <paramref name="block"/>.</summary>
    public static DeviceMemory<BFloat16> Filled(CudaDevice device, long count, BFloat16[] block)
    {
        var memory = device.Allocate<BFloat16>(count);
        Fill(memory.Span, block);
        return memory;
    }

    /// <summary>Fills <paramref name="span"/> with finite random bf16 values by repeating one uploaded block.</summary>
    public static void Fill(DeviceSpan<BFloat16> span, BFloat16[] block)
    {
        for (long offset = 0; offset < span.Length; offset += block.Length)
        {
            int count = (int)Math.Min(block.Length, span.Length - offset);
            span.Slice(offset, count).CopyFrom(block.AsSpan(0, count));
        }
    }
}

internal sealed class GpuDecode(AttentionModel m, int batch, int tokens, int pageSize) : GpuBenchCase
{
    private readonly List<(DeviceMemory<BFloat16> Query, DeviceMemory<BFloat16> Keys, DeviceMemory<BFloat16> Values)> _sets = [];
    private DeviceMemory<BFloat16>? _output;
    private DeviceBlockTable? _table;
    private DeviceSequenceLengths? _lengths;
    private DecodeAttentionWorkspace? _workspace;
    private DecodeAttentionKernels? _kernels;
    private DecodeAttentionSpec _spec = AttentionBenchCases.Spec(m, batch, tokens, pageSize);

    public override string Op => "attention.decode";
    public override string Shape => AttentionBenchCases.Shape(m, batch, tokens, pageSize);
    public override long BytesMoved => AttentionBenchCases.KvBytes(m, batch, tokens) + AttentionBenchCases.QueryOutputBytes(m, batch);
    public override double? GoalPercent => AttentionBenchCases.Goal(m, batch, tokens);
    public override long SharedAllocationBytes => _spec.OutputElements * 2;
    public override long SetAllocationBytes => AttentionBenchCases.KvBytes(m, batch, tokens) + _spec.QueryElements * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _kernels = new DecodeAttentionKernels(device);
        _output = device.Allocate<BFloat16>(_spec.OutputElements);
        var lengths = Enumerable.Repeat(tokens, _spec.Rows).ToArray();
        if (_spec.Cache.IsPaged)
        {
            _table = new DeviceBlockTable(device, batch, _spec.Cache.MaxPagesPerSequence);
            _table.Update(AttentionBenchCases.BlockTable(_spec, rng), lengths, _spec.KeyPool);
        }
        else
        {
            _lengths = new DeviceSequenceLengths(device, _spec.Rows);
            _lengths.Update(lengths, _spec.Cache.MaxTokens);
        }
        _workspace = new DecodeAttentionWorkspace(device, _spec.LseElements, _spec.OutputDim, DecodeAttentionKernels.MaxPlannedSplits);
        for (int s = 0; s < sets; s++)
            _sets.Add((AttentionBenchCases.Filled(device, _spec.QueryElements, block), AttentionBenchCases.Filled(device, _spec.KeyElements, block),
                AttentionBenchCases.Filled(device, _spec.ValueElements, block)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (q, k, v) = _sets[set];
        if (_table is not null)
            _kernels!.Run(_spec, q.Span, k.Span, v.Span, _table, _output!.Span, default, _workspace, stream: stream);
        else
            _kernels!.Run(_spec, q.Span, k.Span, v.Span, _lengths!, _output!.Span, default, _workspace, stream: stream);
    }

    public override void Dispose()
    {
        foreach (var (q, k, v) in _sets)
        {
            q.Dispose();
            k.Dispose();
            v.Dispose();
        }
        _sets.Clear();
        _output?.Dispose();
        _table?.Dispose();
        _lengths?.Dispose();
        _workspace?.Dispose();
    }
}

internal sealed class CpuDecode(AttentionModel m, int batch, int tokens, int pageSize) : CpuBenchCase
{
    private readonly List<(BFloat16[] Query, BFloat16[] Keys, BFloat16[] Values)> _sets = [];
    private readonly DecodeAttentionSpec _spec = AttentionBenchCases.Spec(m, batch, tokens, pageSize);
    private BFloat16[] _output = [];
    private int[] _lengths = [];
    private int[] _table = [];

    public override string Op => "attention.decode";
    public override string Shape => AttentionBenchCases.Shape(m, batch, tokens, pageSize);
    public override long BytesMoved => AttentionBenchCases.KvBytes(m, batch, tokens) + AttentionBenchCases.QueryOutputBytes(m, batch);
    public override long SharedAllocationBytes => _spec.OutputElements * 2;
    public override long SetAllocationBytes => AttentionBenchCases.KvBytes(m, batch, tokens) + _spec.QueryElements * 2;

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _output = new BFloat16[_spec.OutputElements];
        _lengths = Enumerable.Repeat(tokens, _spec.Rows).ToArray();
        _table = _spec.Cache.IsPaged ? AttentionBenchCases.BlockTable(_spec, rng) : [];
        for (int s = 0; s < sets; s++)
        {
            BFloat16[] Make(long n)
            {
                var array = new BFloat16[n];
                for (long i = 0; i < n; i += block.Length)
                    block.AsSpan(0, (int)Math.Min(block.Length, n - i)).CopyTo(array.AsSpan((int)i));
                return array;
            }
            _sets.Add((Make(_spec.QueryElements), Make(_spec.KeyElements), Make(_spec.ValueElements)));
        }
    }

    public override void Run(int set)
    {
        var (q, k, v) = _sets[set];
        DecodeAttentionCpu.Run<BFloat16, BFloat16>(_spec, q, k, v, _lengths, _table, _output);
    }

    public override void Dispose() => _sets.Clear();
}

/// <summary>
/// <c>attention.merge_states</c>: two fp32 states of <c>rows × D</c> merged into a third (cascade attention, split-KV,
/// caches stored in several formats). Shape string <c>rows=&lt;rows&gt; D=&lt;dim&gt; fp32</c>; bytes: three outputs and
/// three LSE vectors.
/// </summary>
internal static class MergeStatesBench
{
    public static IEnumerable<GpuBenchCase> Gpu() => [new GpuMergeStates(64 * 32, 128), new GpuMergeStates(64 * 32 * 16, 128)];

    public static IEnumerable<CpuBenchCase> Cpu() => [new CpuMergeStates(64 * 32, 128)];

    public static string Shape(int rows, int dim) => $"rows={rows} D={dim} fp32";

    public static long Bytes(int rows, int dim) => 3L * rows * dim * 4 + 3L * rows * 4;
}

internal sealed class GpuMergeStates(int rows, int dim) : GpuBenchCase
{
    private readonly List<(DeviceMemory<float> A, DeviceMemory<float> LseA, DeviceMemory<float> B, DeviceMemory<float> LseB)> _sets = [];
    private DeviceMemory<float>? _output, _lse;
    private DecodeAttentionKernels? _kernels;
    private readonly MergeStatesSpec _spec = new(rows, dim);

    public override string Op => "attention.merge_states";
    public override string Shape => MergeStatesBench.Shape(rows, dim);
    public override long BytesMoved => MergeStatesBench.Bytes(rows, dim);
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => (long)rows * (dim + 1) * 4;
    public override long SetAllocationBytes => 2L * rows * (dim + 1) * 4;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        _kernels = new DecodeAttentionKernels(device);
        _output = device.Allocate<float>(_spec.Elements);
        _lse = device.Allocate<float>(rows);
        float[] Values(long n) => Enumerable.Range(0, (int)n).Select(_ => rng.NextSingle() * 2 - 1).ToArray();
        for (int s = 0; s < sets; s++)
            _sets.Add((device.Allocate<float>(Values(_spec.Elements)), device.Allocate<float>(Values(rows)),
                device.Allocate<float>(Values(_spec.Elements)), device.Allocate<float>(Values(rows))));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (a, lseA, b, lseB) = _sets[set];
        _kernels!.MergeStates(_spec, a.Span, lseA.Span, b.Span, lseB.Span, _output!.Span, _lse!.Span, stream);
    }

    public override void Dispose()
    {
        foreach (var (a, lseA, b, lseB) in _sets)
        {
            a.Dispose();
            lseA.Dispose();
            b.Dispose();
            lseB.Dispose();
        }
        _sets.Clear();
        _output?.Dispose();
        _lse?.Dispose();
    }
}

internal sealed class CpuMergeStates(int rows, int dim) : CpuBenchCase
{
    private readonly List<(float[] A, float[] LseA, float[] B, float[] LseB)> _sets = [];
    private readonly MergeStatesSpec _spec = new(rows, dim);
    private float[] _output = [], _lse = [];

    public override string Op => "attention.merge_states";
    public override string Shape => MergeStatesBench.Shape(rows, dim);
    public override long BytesMoved => MergeStatesBench.Bytes(rows, dim);
    public override long SharedAllocationBytes => (long)rows * (dim + 1) * 4;
    public override long SetAllocationBytes => 2L * rows * (dim + 1) * 4;

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        _output = new float[_spec.Elements];
        _lse = new float[rows];
        float[] Values(long n) => Enumerable.Range(0, (int)n).Select(_ => rng.NextSingle() * 2 - 1).ToArray();
        for (int s = 0; s < sets; s++) _sets.Add((Values(_spec.Elements), Values(rows), Values(_spec.Elements), Values(rows)));
    }

    public override void Run(int set)
    {
        var (a, lseA, b, lseB) = _sets[set];
        DecodeAttentionCpu.MergeStates<float>(_spec, a, lseA, b, lseB, _output, _lse);
    }

    public override void Dispose() => _sets.Clear();
}
