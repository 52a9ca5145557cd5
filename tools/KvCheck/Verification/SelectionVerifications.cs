using KvKernels.Attention;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvCheck.Verification;

/// <summary>How a selection check draws its scores.</summary>
internal enum SelectionScores
{
    /// <summary>Normal(0, 1).</summary>
    Normal,

    /// <summary>Five values (ties everywhere, −0 and +0 among them).</summary>
    FewValues,

    /// <summary>Softmax-like attention mass: most tokens near zero, a few heavy hitters.</summary>
    Attention,

    /// <summary>Normal values mixed with NaN, ±∞ and ±0.</summary>
    Special,
}

/// <summary>A per-row top-k problem; lengths are drawn per row in [MinLength, Columns] from the case seed.</summary>
internal sealed record TopKShape(string Name, TopKSpec Spec, int MinLength, SelectionScores Scores) : VerificationShape
{
    public override string Description =>
        $"{Name}: rows={Spec.Rows} n={Spec.Columns} k={Spec.K} sinks={Spec.Sinks} recent={Spec.Recent} {Spec.Order} L≥{MinLength} {Scores}";
}

/// <summary>A global (AdaKV) top-k problem; lengths drawn per row in [MinLength, Columns].</summary>
internal sealed record GlobalTopKShape(string Name, GlobalTopKSpec Spec, int MinLength, SelectionScores Scores) : VerificationShape
{
    public override string Description =>
        $"{Name}: B={Spec.Sequences} H={Spec.Heads} n={Spec.Columns} budget={Spec.Budget} α={Spec.Alpha} sinks={Spec.Sinks} recent={Spec.Recent} {Spec.Order} L≥{MinLength} {Scores}";
}

/// <summary>
/// The selection family (P7): <c>selection.topk</c> (per-row top-k / bottom-k with protected ranges) and
/// <c>selection.global_topk</c> (AdaKV's global top-k with a per-head floor). CPU twin vs the brute-force oracle, GPU
/// vs CPU: indices and counts must be identical (the kept set is unique by the tie rules).
/// </summary>
internal static class SelectionVerifications
{
    public static IReadOnlyList<IVerification> All { get; } = [new TopKVerification(), new GlobalTopKVerification()];

    internal static SelectionKernels Kernels(GpuContext gpu) => gpu.Get(device => new SelectionKernels(device));

    private static readonly float[] Few = [-1f, -0.0f, 0.0f, 0.25f, 2f];
    private static readonly float[] Specials = [float.NaN, float.PositiveInfinity, float.NegativeInfinity, -0.0f, 0.0f];

    internal static float[] Scores(Random rng, long count, SelectionScores kind)
    {
        var scores = new float[count];
        for (long i = 0; i < count; i++)
        {
            double g = Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());
            scores[i] = kind switch
            {
                SelectionScores.FewValues => Few[rng.Next(Few.Length)],
                SelectionScores.Attention => rng.Next(64) == 0 ? (float)rng.NextDouble() : (float)(rng.NextDouble() * 1e-3 * Math.Exp(-8 * rng.NextDouble())),
                SelectionScores.Special => rng.Next(5) == 0 ? Specials[rng.Next(Specials.Length)] : (float)g,
                _ => (float)g,
            };
        }
        return scores;
    }

    internal static int[] Lengths(Random rng, int rows, int min, int columns) =>
        Enumerable.Range(0, rows).Select(_ => rng.Next(Math.Min(min, columns), columns + 1)).ToArray();

    internal static int[] Poisoned(long count)
    {
        var a = new int[Math.Max(count, 0)];
        Array.Fill(a, -12345);
        return a;
    }

    /// <summary>Indices and counts compared as int32 words.</summary>
    internal static VerificationOutcome Compare(int[] indices, int[] counts, int[] expectedIndices, int[] expectedCounts) =>
        Comparison.Compare<int>("indices", indices, expectedIndices, ElementKind.U8)
            .And(Comparison.Compare<int>("counts", counts, expectedCounts, ElementKind.U8));
}

internal sealed class TopKVerification() : Verification<TopKShape>("selection", "topk", ShapeList())
{
    private static TopKShape[] ShapeList() =>
    [
        new("edge lengths, overlapping protection", new TopKSpec(6, 19, 7, Sinks: 3, Recent: 4), 0, SelectionScores.FewValues),
        new("snapkv-like decode budget", new TopKSpec(8, 4099, 512, Sinks: 4, Recent: 32), 1000, SelectionScores.Attention),
        new("ties, bottom-k", new TopKSpec(4, 1000, 100, Order: SelectionOrder.Smallest), 0, SelectionScores.FewValues),
        new("NaN and infinities", new TopKSpec(3, 257, 64, Sinks: 1), 60, SelectionScores.Special),
        new("k = 1", new TopKSpec(3, 4099, 1), 4000, SelectionScores.Normal),
        new("bench row, k = 2048 of 128k", new TopKSpec(2, 131072, 2048), 131072, SelectionScores.Normal),
        new("k = 16k of 256k, window", new TopKSpec(1, 262144, 16384, Sinks: 4, Recent: 512), 262144, SelectionScores.Attention),
    ];

    protected override VerificationOutcome RunCpu(TopKShape shape, int seed)
    {
        var (scores, lengths) = Inputs(shape, seed);
        var spec = shape.Spec;
        var (indices, counts) = Cpu(spec, scores, lengths);
        var expectedIndices = new int[spec.IndexElements];
        var expectedCounts = new int[spec.Rows];
        SelectionOracle.TopK(spec, scores, lengths, expectedIndices, expectedCounts);
        return SelectionVerifications.Compare(indices, counts, expectedIndices, expectedCounts);
    }

    protected override VerificationOutcome RunGpu(GpuContext gpu, TopKShape shape, int seed)
    {
        var (scores, lengths) = Inputs(shape, seed);
        var spec = shape.Spec;
        var (expectedIndices, expectedCounts) = Cpu(spec, scores, lengths);
        var device = gpu.Device;
        var ops = SelectionVerifications.Kernels(gpu);
        using var dScores = device.Allocate<float>(scores);
        using var dLengths = new DeviceSequenceLengths(device, Math.Max(1, spec.Rows));
        dLengths.Update(lengths, spec.Columns, gpu.Stream);
        using var dIndices = device.Allocate<int>(SelectionVerifications.Poisoned(spec.IndexElements));
        using var dCounts = device.Allocate<int>(SelectionVerifications.Poisoned(spec.Rows));
        using var workspace = device.Allocate<uint>(ops.WorkspaceElements(spec));
        ops.TopK(spec, dScores.Span, dLengths, dIndices.Span, dCounts.Span, workspace.Span, gpu.Stream);
        gpu.Stream.Synchronize();
        return SelectionVerifications.Compare(dIndices.ToArray(), dCounts.ToArray(), expectedIndices, expectedCounts);
    }

    private static (float[] Scores, int[] Lengths) Inputs(TopKShape shape, int seed)
    {
        var rng = new Random(seed);
        var lengths = SelectionVerifications.Lengths(rng, shape.Spec.Rows, shape.MinLength, shape.Spec.Columns);
        return (SelectionVerifications.Scores(rng, shape.Spec.ScoreElements, shape.Scores), lengths);
    }

    private static (int[] Indices, int[] Counts) Cpu(in TopKSpec spec, float[] scores, int[] lengths)
    {
        var indices = SelectionVerifications.Poisoned(spec.IndexElements);
        var counts = SelectionVerifications.Poisoned(spec.Rows);
        SelectionCpu.TopK(spec, scores, lengths, indices, counts);
        return (indices, counts);
    }
}

internal sealed class GlobalTopKVerification() : Verification<GlobalTopKShape>("selection", "global_topk", ShapeList())
{
    private static GlobalTopKShape[] ShapeList() =>
    [
        new("adakv decode budget", new GlobalTopKSpec(2, 8, 4099, 8 * 512, 0.2, Sinks: 4, Recent: 32), 1000, SelectionScores.Attention),
        new("ties across heads", new GlobalTopKSpec(1, 4, 1000, 300, 0.5), 0, SelectionScores.FewValues),
        new("short rows, bottom-k, α = 1", new GlobalTopKSpec(3, 3, 257, 200, 1.0, Order: SelectionOrder.Smallest), 0, SelectionScores.Special),
    ];

    protected override VerificationOutcome RunCpu(GlobalTopKShape shape, int seed)
    {
        var (scores, lengths) = Inputs(shape, seed);
        var spec = shape.Spec;
        var (indices, counts) = Cpu(spec, scores, lengths);
        var expectedIndices = new int[spec.IndexElements];
        var expectedCounts = new int[spec.Rows];
        SelectionOracle.GlobalTopK(spec, scores, lengths, expectedIndices, expectedCounts);
        return SelectionVerifications.Compare(indices, counts, expectedIndices, expectedCounts);
    }

    protected override VerificationOutcome RunGpu(GpuContext gpu, GlobalTopKShape shape, int seed)
    {
        var (scores, lengths) = Inputs(shape, seed);
        var spec = shape.Spec;
        var (expectedIndices, expectedCounts) = Cpu(spec, scores, lengths);
        var device = gpu.Device;
        var ops = SelectionVerifications.Kernels(gpu);
        using var dScores = device.Allocate<float>(scores);
        using var dLengths = new DeviceSequenceLengths(device, Math.Max(1, spec.Rows));
        dLengths.Update(lengths, spec.Columns, gpu.Stream);
        using var dIndices = device.Allocate<int>(SelectionVerifications.Poisoned(spec.IndexElements));
        using var dCounts = device.Allocate<int>(SelectionVerifications.Poisoned(spec.Rows));
        using var workspace = device.Allocate<uint>(ops.WorkspaceElements(spec));
        ops.GlobalTopK(spec, dScores.Span, dLengths, dIndices.Span, dCounts.Span, workspace.Span, gpu.Stream);
        gpu.Stream.Synchronize();
        return SelectionVerifications.Compare(dIndices.ToArray(), dCounts.ToArray(), expectedIndices, expectedCounts);
    }

    private static (float[] Scores, int[] Lengths) Inputs(GlobalTopKShape shape, int seed)
    {
        var rng = new Random(seed);
        var lengths = SelectionVerifications.Lengths(rng, shape.Spec.Rows, shape.MinLength, shape.Spec.Columns);
        return (SelectionVerifications.Scores(rng, shape.Spec.ScoreElements, shape.Scores), lengths);
    }

    private static (int[] Indices, int[] Counts) Cpu(in GlobalTopKSpec spec, float[] scores, int[] lengths)
    {
        var indices = SelectionVerifications.Poisoned(spec.IndexElements);
        var counts = SelectionVerifications.Poisoned(spec.Rows);
        SelectionCpu.GlobalTopK(spec, scores, lengths, indices, counts);
        return (indices, counts);
    }
}
