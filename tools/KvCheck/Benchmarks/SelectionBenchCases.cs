using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Selection;

namespace KvCheck.Benchmarks;

/// <summary>
/// The selection benchmark rows (P7, issue 6). Scores are fp32 Normal(0, 1) (drawn on the host per buffer set), every
/// row at its full length n, no protected ranges, top-k.
/// <list type="bullet">
/// <item><c>selection.topk</c>: per-row top-k, rows = B · Hkv. The goal row is k = 2048 of n = 128k with 8 × 32 rows:
/// ≥ 3× <c>torch.topk</c> (+ the sort of the indices that matches this op's ascending output), timed by
/// bench/peers/selection_torch.py on the same shapes; no %-of-copy goal is set.</item>
/// <item><c>selection.global_topk</c>: AdaKV's global top-k per sequence with α = 0.2, budget = Hkv · k.</item>
/// </list>
/// Bytes: the scores read once (rows · n · 4) + the indices written (rows · k · 4, global: rows · min(n, budget) · 4) +
/// the counts (rows · 4). Shape strings (identical in bench/peers/selection_torch.py):
/// <c>B=8 Hkv=32 n=131072 k=2048 fp32</c>, <c>B=8 Hkv=32 n=131072 budget=65536 alpha=0.2 fp32</c>.
/// </summary>
internal static class SelectionBenchCases
{
    public static IEnumerable<GpuBenchCase> Gpu()
    {
        yield return new GpuTopK(8, 32, 131072, 2048);
        yield return new GpuTopK(32, 8, 32768, 1024);
        yield return new GpuTopK(1, 8, 262144, 16384);
        yield return new GpuTopK(8, 32, 131072, 64);
        yield return new GpuGlobalTopK(8, 32, 131072, 32 * 2048);
    }

    public static IEnumerable<CpuBenchCase> Cpu() => [new CpuTopK(1, 8, 32768, 1024), new CpuGlobalTopK(1, 8, 32768, 8 * 1024)];

    public static string TopKShape(int batch, int heads, int n, int k) => $"B={batch} Hkv={heads} n={n} k={k} fp32";

    public static string GlobalShape(int batch, int heads, int n, int budget) => $"B={batch} Hkv={heads} n={n} budget={budget} alpha=0.2 fp32";

    public static long TopKBytes(int rows, int n, int k) => (long)rows * n * 4 + (long)rows * k * 4 + rows * 4L;

    /// <summary>Normal(0, 1) scores from <paramref name="seed"/>.</summary>
    public static float[] Scores(long count, int seed)
    {
        var rng = new Random(seed);
        var scores = new float[count];
        for (long i = 0; i + 1 < count; i += 2)
        {
            double r = Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())), t = 2 * Math.PI * rng.NextDouble();
            scores[i] = (float)(r * Math.Cos(t));
            scores[i + 1] = (float)(r * Math.Sin(t));
        }
        if (count % 2 == 1) scores[count - 1] = (float)rng.NextDouble();
        return scores;
    }
}

/// <summary><c>selection.topk</c> on the GPU: k of n per row, B · Hkv rows.</summary>
internal sealed class GpuTopK(int batch, int heads, int n, int k) : GpuBenchCase
{
    private readonly TopKSpec _spec = new(batch * heads, n, k);
    private readonly List<DeviceMemory<float>> _sets = [];
    private DeviceMemory<int>? _indices, _counts;
    private DeviceMemory<uint>? _workspace;
    private DeviceSequenceLengths? _lengths;
    private SelectionKernels? _kernels;

    public override string Op => "selection.topk";
    public override string Shape => SelectionBenchCases.TopKShape(batch, heads, n, k);
    public override long BytesMoved => SelectionBenchCases.TopKBytes(_spec.Rows, n, k);
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => (_spec.IndexElements + _spec.Rows) * 4 + (long)_spec.Rows * 2 * Math.Min(n, 2L * k + 16384) * 4;
    public override long SetAllocationBytes => _spec.ScoreElements * 4;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        _kernels = new SelectionKernels(device);
        _lengths = new DeviceSequenceLengths(device, _spec.Rows);
        _lengths.Update(Enumerable.Repeat(n, _spec.Rows).ToArray(), n);
        _indices = device.Allocate<int>(_spec.IndexElements);
        _counts = device.Allocate<int>(_spec.Rows);
        _workspace = device.Allocate<uint>(_kernels.WorkspaceElements(_spec));
        for (int s = 0; s < sets; s++) _sets.Add(device.Allocate<float>(SelectionBenchCases.Scores(_spec.ScoreElements, seed + 17 * s)));
    }

    public override void Enqueue(CudaStream stream, int set) =>
        _kernels!.TopK(_spec, _sets[set].Span, _lengths!, _indices!.Span, _counts!.Span, _workspace!.Span, stream);

    public override void Dispose()
    {
        foreach (var s in _sets) s.Dispose();
        _sets.Clear();
        _indices?.Dispose();
        _counts?.Dispose();
        _workspace?.Dispose();
        _lengths?.Dispose();
    }
}

/// <summary><c>selection.global_topk</c> on the GPU: AdaKV (α = 0.2) with budget per sequence.</summary>
internal sealed class GpuGlobalTopK(int batch, int heads, int n, int budget) : GpuBenchCase
{
    private readonly GlobalTopKSpec _spec = new(batch, heads, n, budget, 0.2);
    private readonly List<DeviceMemory<float>> _sets = [];
    private DeviceMemory<int>? _indices, _counts;
    private DeviceMemory<uint>? _workspace;
    private DeviceSequenceLengths? _lengths;
    private SelectionKernels? _kernels;

    public override string Op => "selection.global_topk";
    public override string Shape => SelectionBenchCases.GlobalShape(batch, heads, n, budget);
    public override long BytesMoved => _spec.ScoreElements * 4 + _spec.IndexElements * 4 + _spec.Rows * 4L;
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => (_spec.IndexElements + _spec.Rows) * 4 + _spec.Rows * 4096L * 4 + 4 * Math.Max(
        (long)_spec.Rows * 2 * Math.Min(n, 2L * _spec.ForcedPerRow + 16384),
        (long)batch * (2 * Math.Min((long)heads * n, 2L * budget + 16384) + budget));
    public override long SetAllocationBytes => _spec.ScoreElements * 4;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        _kernels = new SelectionKernels(device);
        _lengths = new DeviceSequenceLengths(device, _spec.Rows);
        _lengths.Update(Enumerable.Repeat(n, _spec.Rows).ToArray(), n);
        _indices = device.Allocate<int>(_spec.IndexElements);
        _counts = device.Allocate<int>(_spec.Rows);
        _workspace = device.Allocate<uint>(_kernels.WorkspaceElements(_spec));
        for (int s = 0; s < sets; s++) _sets.Add(device.Allocate<float>(SelectionBenchCases.Scores(_spec.ScoreElements, seed + 17 * s)));
    }

    public override void Enqueue(CudaStream stream, int set) =>
        _kernels!.GlobalTopK(_spec, _sets[set].Span, _lengths!, _indices!.Span, _counts!.Span, _workspace!.Span, stream);

    public override void Dispose()
    {
        foreach (var s in _sets) s.Dispose();
        _sets.Clear();
        _indices?.Dispose();
        _counts?.Dispose();
        _workspace?.Dispose();
        _lengths?.Dispose();
    }
}

/// <summary><c>selection.topk</c> on the CPU twin.</summary>
internal sealed class CpuTopK(int batch, int heads, int n, int k) : CpuBenchCase
{
    private readonly TopKSpec _spec = new(batch * heads, n, k);
    private readonly List<float[]> _sets = [];
    private int[] _lengths = [], _indices = [], _counts = [];

    public override string Op => "selection.topk";
    public override string Shape => SelectionBenchCases.TopKShape(batch, heads, n, k);
    public override long BytesMoved => SelectionBenchCases.TopKBytes(_spec.Rows, n, k);
    public override long SharedAllocationBytes => (_spec.IndexElements + 2L * _spec.Rows) * 4;
    public override long SetAllocationBytes => _spec.ScoreElements * 4;

    public override void Prepare(int sets, int seed)
    {
        _lengths = Enumerable.Repeat(n, _spec.Rows).ToArray();
        _indices = new int[_spec.IndexElements];
        _counts = new int[_spec.Rows];
        for (int s = 0; s < sets; s++) _sets.Add(SelectionBenchCases.Scores(_spec.ScoreElements, seed + 17 * s));
    }

    public override void Run(int set) => SelectionCpu.TopK(_spec, _sets[set], _lengths, _indices, _counts);

    public override void Dispose() => _sets.Clear();
}

/// <summary><c>selection.global_topk</c> on the CPU twin.</summary>
internal sealed class CpuGlobalTopK(int batch, int heads, int n, int budget) : CpuBenchCase
{
    private readonly GlobalTopKSpec _spec = new(batch, heads, n, budget, 0.2);
    private readonly List<float[]> _sets = [];
    private int[] _lengths = [], _indices = [], _counts = [];

    public override string Op => "selection.global_topk";
    public override string Shape => SelectionBenchCases.GlobalShape(batch, heads, n, budget);
    public override long BytesMoved => _spec.ScoreElements * 4 + _spec.IndexElements * 4 + _spec.Rows * 4L;
    public override long SharedAllocationBytes => (_spec.IndexElements + 2L * _spec.Rows) * 4;
    public override long SetAllocationBytes => _spec.ScoreElements * 4;

    public override void Prepare(int sets, int seed)
    {
        _lengths = Enumerable.Repeat(n, _spec.Rows).ToArray();
        _indices = new int[_spec.IndexElements];
        _counts = new int[_spec.Rows];
        for (int s = 0; s < sets; s++) _sets.Add(SelectionBenchCases.Scores(_spec.ScoreElements, seed + 17 * s));
    }

    public override void Run(int set) => SelectionCpu.GlobalTopK(_spec, _sets[set], _lengths, _indices, _counts);

    public override void Dispose() => _sets.Clear();
}
