using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Global top-k across heads with a per-head floor (AdaKV): the CPU twin against the brute-force oracle, and the GPU
/// kernels (every backend, three candidate-buffer sizes) against the CPU twin, index for index. Cases cover one head
/// (a plain top-Budget), α = 0, 0.2, 0.5 and 1, protected ranges, rows shorter than the floor, empty rows, sequences
/// that keep everything, bottom-k, ties across heads (lower head first), NaN and ±∞.
/// </summary>
public sealed class GlobalTopKTests(Backends backends)
{
    public sealed record GlobalCase(string Name, GlobalTopKSpec Spec, int[] Lengths, ScoreKind Kind)
    {
        public override string ToString() => Name;
    }

    public static IReadOnlyList<GlobalCase> Cases { get; } =
    [
        new("b1-h1-n7-budget3", new GlobalTopKSpec(1, 1, 7, 3), [7], ScoreKind.Normal),
        new("b2-h3-n19-budget20", new GlobalTopKSpec(2, 3, 19, 20), [19, 4, 17, 0, 19, 19], ScoreKind.FewValues),
        new("b2-h4-n257-alpha0.5-sink2-recent4", new GlobalTopKSpec(2, 4, 257, 200, 0.5, Sinks: 2, Recent: 4), [257, 250, 10, 100, 257, 257, 257, 1], ScoreKind.FewValues),
        new("b1-h8-n257-alpha1-bottom", new GlobalTopKSpec(1, 8, 257, 600, 1.0, Order: SelectionOrder.Smallest), [257, 3, 257, 200, 75, 76, 257, 0], ScoreKind.Special),
        new("b3-h2-n4099-budget3000-sink4-recent32", new GlobalTopKSpec(3, 2, 4099, 3000, Sinks: 4, Recent: 32), [4099, 4099, 1000, 4000, 10, 2990], ScoreKind.Normal),
        new("b2-h4-n4099-budget777-alpha0", new GlobalTopKSpec(2, 4, 4099, 777, 0.0), [4099, 4099, 4099, 4099, 100, 4099, 0, 777], ScoreKind.Attention),
        new("b1-h2-n4099-budget2000-two-values", new GlobalTopKSpec(1, 2, 4099, 2000, Sinks: 1), [4099, 3000], ScoreKind.TwoValues),
        new("b1-h2-n4096-budget900-sample-decoy", new GlobalTopKSpec(1, 2, 4096, 900, 0.1), [4096, 4096], ScoreKind.SampleDecoy),
        new("b2-h3-n19-keep-all", new GlobalTopKSpec(2, 3, 19, 30, Recent: 2), [5, 9, 0, 10, 10, 10], ScoreKind.Normal),
        new("b0", new GlobalTopKSpec(0, 4, 16, 8), [], ScoreKind.Normal),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int, string> BackendCases
    {
        get
        {
            var data = new TheoryData<string, int, string>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < Cases.Count; i++)
                    foreach (var capacity in TopKTests.Capacities) data.Add(backend, i, capacity);
            return data;
        }
    }

    private static float[] CaseScores(GlobalCase c) => SelectionData.Scores(new Random(SelectionData.Seed(c.Name)), c.Spec.ScoreElements, c.Kind);

    private static (int[] Indices, int[] Counts) Cpu(GlobalCase c, float[] scores)
    {
        var indices = SelectionData.Poisoned(c.Spec.IndexElements);
        var counts = SelectionData.Poisoned(c.Spec.Rows);
        SelectionCpu.GlobalTopK(c.Spec, scores, c.Lengths, indices, counts);
        return (indices, counts);
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int caseIndex)
    {
        var c = Cases[caseIndex];
        var scores = CaseScores(c);
        var (indices, counts) = Cpu(c, scores);
        var expectedIndices = new int[c.Spec.IndexElements];
        var expectedCounts = new int[c.Spec.Rows];
        SelectionOracle.GlobalTopK(c.Spec, scores, c.Lengths, expectedIndices, expectedCounts);
        Assert.Equal(expectedCounts, counts);
        TopKTests.AssertRows(expectedIndices, indices, c.Spec.Width, "CPU vs oracle");
        // Each sequence keeps min(Budget, its tokens).
        for (int q = 0; q < c.Spec.Sequences; q++)
        {
            long tokens = c.Lengths.AsSpan(q * c.Spec.Heads, c.Spec.Heads).ToArray().Sum(l => (long)l);
            Assert.Equal(Math.Min(c.Spec.Budget, tokens), counts.AsSpan(q * c.Spec.Heads, c.Spec.Heads).ToArray().Sum(x => (long)x));
        }
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int caseIndex, string capacity)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        var scores = CaseScores(c);
        var (expectedIndices, expectedCounts) = Cpu(c, scores);

        var ops = new SelectionKernels(device)
        {
            CapacityOverride = capacity switch
            {
                "small" => Math.Max(4, Math.Min(c.Spec.Columns - 1, 2 * c.Spec.Budget / Math.Max(1, c.Spec.Heads) + 64)),
                "tiny" => 4,
                _ => null,
            },
        };
        var spec = c.Spec;
        using var dScores = device.Allocate<float>(Math.Max(1, scores.Length));
        dScores.Span.CopyFrom(scores);
        using var dLengths = new DeviceSequenceLengths(device, Math.Max(1, spec.Rows));
        dLengths.Update(c.Lengths, spec.Columns);
        using var dIndices = device.Allocate<int>(SelectionData.Poisoned(Math.Max(1, spec.IndexElements)));
        using var dCounts = device.Allocate<int>(SelectionData.Poisoned(Math.Max(1, spec.Rows)));
        using var workspace = device.Allocate<uint>(ops.WorkspaceElements(spec));
        ops.GlobalTopK(spec, dScores.Span.Slice(0, scores.Length), dLengths, dIndices.Span.Slice(0, spec.IndexElements),
            dCounts.Span.Slice(0, spec.Rows), workspace.Span);
        device.Synchronize();
        var indices = dIndices.ToArray().AsSpan(0, (int)spec.IndexElements).ToArray();
        var counts = dCounts.ToArray().AsSpan(0, spec.Rows).ToArray();
        Assert.Equal(expectedCounts, counts);
        TopKTests.AssertRows(expectedIndices, indices, spec.Width, $"GPU ({backend}, {capacity} buffer) vs CPU");
    }

    [Fact]
    public void Cpu_ParallelPath_MatchesOracle()
    {
        // 4 × 8 rows of 4099 (131k scores): above the parallel threshold; ties from a few values.
        var spec = new GlobalTopKSpec(4, 8, 4099, 3000, 0.3, Sinks: 2, Recent: 8);
        var rng = new Random(5);
        var lengths = Enumerable.Range(0, spec.Rows).Select(_ => rng.Next(spec.Columns + 1)).ToArray();
        var scores = SelectionData.Scores(rng, spec.ScoreElements, ScoreKind.FewValues);
        var indices = SelectionData.Poisoned(spec.IndexElements);
        var counts = SelectionData.Poisoned(spec.Rows);
        SelectionCpu.GlobalTopK(spec, scores, lengths, indices, counts);
        var expectedIndices = new int[spec.IndexElements];
        var expectedCounts = new int[spec.Rows];
        SelectionOracle.GlobalTopK(spec, scores, lengths, expectedIndices, expectedCounts);
        Assert.Equal(expectedCounts, counts);
        TopKTests.AssertRows(expectedIndices, indices, spec.Width, "parallel CPU vs oracle");
    }

    [Fact]
    public void Oracle_FloorAndGlobalOrder_ByHand()
    {
        // Two heads, budget 4, α = 0.5: floor ⌊0.5·4/2⌋ = 1. Head 0 = [9 8 7 6], head 1 = [1 2 0 0].
        // Forced: head 0 keeps 0 (9), head 1 keeps 1 (2). The other 2 slots go to the best rest: 8 and 7 (head 0).
        // With α = 0 head 1 would keep nothing.
        var spec = new GlobalTopKSpec(1, 2, 4, 4, 0.5);
        float[] scores = [9, 8, 7, 6, 1, 2, 0, 0];
        var indices = new int[8];
        var counts = new int[2];
        SelectionOracle.GlobalTopK(spec, scores, [4, 4], indices, counts);
        Assert.Equal([0, 1, 2, -1, 1, -1, -1, -1], indices);
        Assert.Equal([3, 1], counts);
        SelectionOracle.GlobalTopK(spec with { Alpha = 0 }, scores, [4, 4], indices, counts);
        Assert.Equal([4, 0], counts);
        // Ties across heads go to the lower head: all scores equal, budget 3, α = 0 → head 0 keeps 0, 1, 2.
        SelectionOracle.GlobalTopK(spec with { Alpha = 0, Budget = 3 }, [1, 1, 1, 1, 1, 1, 1, 1], [4, 4], indices, counts);
        Assert.Equal([3, 0], counts);
        SelectionCpu.GlobalTopK(spec with { Alpha = 0, Budget = 3 }, [1, 1, 1, 1, 1, 1, 1, 1], [4, 4], indices, counts);
        Assert.Equal([0, 1, 2, -1, -1, -1], indices.AsSpan(0, 6).ToArray());
        Assert.Equal([3, 0], counts);
    }
}
