using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Per-row top-k / bottom-k: the CPU twin against the brute-force oracle, and the GPU kernel (every backend) against the
/// CPU twin, index for index, with outputs poisoned first. Cases cover n = 1, 7, 19, 257, 4099, k = 1, k = n, k ≥ L,
/// L = 0, bottom-k, protected ranges (also overlapping where L ≤ k), ties from a few values (and −0 vs +0), NaN and ±∞,
/// and misaligned rows (odd n). The GPU runs each case with the default candidate buffer, with one small enough that
/// the sampled guess decides, and with a 4-entry buffer that forces the slow path over the rows.
/// </summary>
public sealed class TopKTests(Backends backends)
{
    public sealed record TopKCase(string Name, TopKSpec Spec, int[] Lengths, ScoreKind Kind)
    {
        public override string ToString() => Name;
    }

    public static IReadOnlyList<TopKCase> Cases { get; } =
    [
        new("n1-k1", new TopKSpec(3, 1, 1), [0, 1, 1], ScoreKind.Normal),
        new("n7-k3-sink1-recent1", new TopKSpec(5, 7, 3, Sinks: 1, Recent: 1), [7, 5, 3, 4, 0], ScoreKind.Normal),
        new("n7-k2-sink1-recent1-fill", new TopKSpec(2, 7, 2, Sinks: 1, Recent: 1), [7, 6], ScoreKind.FewValues),
        new("n19-k1-bottom", new TopKSpec(4, 19, 1, Order: SelectionOrder.Smallest), [19, 2, 1, 18], ScoreKind.Normal),
        new("n19-k7-overlap", new TopKSpec(5, 19, 7, Sinks: 3, Recent: 4), [5, 19, 8, 7, 6], ScoreKind.FewValues),
        new("n19-k19", new TopKSpec(3, 19, 19, Sinks: 2), [19, 18, 0], ScoreKind.Special),
        new("n257-k64-few", new TopKSpec(4, 257, 64), [257, 200, 65, 64], ScoreKind.FewValues),
        new("n257-k200-special-bottom", new TopKSpec(3, 257, 200, Sinks: 1, Recent: 8, Order: SelectionOrder.Smallest), [257, 250, 201], ScoreKind.Special),
        new("n257-k9-special", new TopKSpec(3, 257, 9, Recent: 3), [257, 131, 10], ScoreKind.Special),
        new("n4099-k1000-sink4-recent64", new TopKSpec(3, 4099, 1000, Sinks: 4, Recent: 64), [4099, 3001, 1001], ScoreKind.Normal),
        new("n4099-k37-few-bottom", new TopKSpec(2, 4099, 37, Sinks: 2, Order: SelectionOrder.Smallest), [4099, 4000], ScoreKind.FewValues),
        new("n4099-k300-attention", new TopKSpec(3, 4099, 300, Sinks: 4, Recent: 32), [4099, 2048, 4098], ScoreKind.Attention),
        new("n4099-k500-two-values", new TopKSpec(2, 4099, 500, Sinks: 1), [4099, 3333], ScoreKind.TwoValues),
        new("n4099-k1", new TopKSpec(2, 4099, 1), [4099, 17], ScoreKind.Special),
        new("n4096-k600-sample-decoy", new TopKSpec(2, 4096, 600), [4096, 4090], ScoreKind.SampleDecoy),
        new("rows0", new TopKSpec(0, 16, 4), [], ScoreKind.Normal),
    ];

    /// <summary>Candidate-buffer sizes the GPU runs with: default, small (guess path), tiny (slow path).</summary>
    public static IReadOnlyList<string> Capacities { get; } = ["default", "small", "tiny"];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int, string> BackendCases
    {
        get
        {
            var data = new TheoryData<string, int, string>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < Cases.Count; i++)
                    foreach (var capacity in Capacities) data.Add(backend, i, capacity);
            return data;
        }
    }

    private static float[] CaseScores(TopKCase c) => SelectionData.Scores(new Random(SelectionData.Seed(c.Name)), c.Spec.ScoreElements, c.Kind);

    private static (int[] Indices, int[] Counts) Cpu(TopKCase c, float[] scores)
    {
        var indices = SelectionData.Poisoned(c.Spec.IndexElements);
        var counts = SelectionData.Poisoned(c.Spec.Rows);
        SelectionCpu.TopK(c.Spec, scores, c.Lengths, indices, counts);
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
        SelectionOracle.TopK(c.Spec, scores, c.Lengths, expectedIndices, expectedCounts);
        Assert.Equal(expectedCounts, counts);
        AssertRows(expectedIndices, indices, c.Spec.K, "CPU vs oracle");
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int caseIndex, string capacity)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        var scores = CaseScores(c);
        var (expectedIndices, expectedCounts) = Cpu(c, scores);

        var ops = new SelectionKernels(device);
        ops.CapacityOverride = capacity switch
        {
            "small" => Math.Max(4, Math.Min(c.Spec.Columns - 1, 2 * c.Spec.K + 64)),
            "tiny" => 4,
            _ => null,
        };
        var (indices, counts) = RunGpu(device, ops, c.Spec, scores, c.Lengths);
        Assert.Equal(expectedCounts, counts);
        AssertRows(expectedIndices, indices, c.Spec.K, $"GPU ({backend}, {capacity} buffer) vs CPU");
    }

    internal static (int[] Indices, int[] Counts) RunGpu(CudaDevice device, SelectionKernels ops, in TopKSpec spec, float[] scores, int[] lengths, long scoreOffset = 0)
    {
        using var dScores = device.Allocate<float>(Math.Max(1, scores.Length + scoreOffset));
        var scoreSpan = dScores.Span.Slice(scoreOffset, scores.Length);
        scoreSpan.CopyFrom(scores);
        using var dLengths = new DeviceSequenceLengths(device, Math.Max(1, spec.Rows));
        dLengths.Update(lengths, spec.Columns);
        using var dIndices = device.Allocate<int>(SelectionData.Poisoned(Math.Max(1, spec.IndexElements)));
        using var dCounts = device.Allocate<int>(SelectionData.Poisoned(Math.Max(1, spec.Rows)));
        using var workspace = device.Allocate<uint>(ops.WorkspaceElements(spec));
        ops.TopK(spec, scoreSpan, dLengths, dIndices.Span.Slice(0, spec.IndexElements), dCounts.Span.Slice(0, spec.Rows), workspace.Span);
        device.Synchronize();
        return (dIndices.ToArray().AsSpan(0, (int)spec.IndexElements).ToArray(), dCounts.ToArray().AsSpan(0, spec.Rows).ToArray());
    }

    /// <summary>Rows must match exactly; the message names the first differing row and entry.</summary>
    internal static void AssertRows(int[] expected, int[] actual, int width, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
        {
            if (expected[i] == actual[i]) continue;
            int row = i / width;
            string e = string.Join(",", expected.AsSpan(row * width, Math.Min(width, 24)).ToArray());
            string a = string.Join(",", actual.AsSpan(row * width, Math.Min(width, 24)).ToArray());
            Assert.Fail($"{what}: row {row} entry {i % width}: expected {expected[i]}, got {actual[i]}.\n expected row: {e}…\n actual row:   {a}…");
        }
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Gpu_MisalignedScores_MatchCpu(string backend)
    {
        // Scores starting 1 float into an allocation, n = 19: every row starts at a different 16-byte phase.
        var device = backends.Get(backend);
        var spec = new TopKSpec(4, 19, 5, Sinks: 1, Recent: 2);
        int[] lengths = [19, 18, 17, 9];
        var scores = SelectionData.Scores(new Random(7), spec.ScoreElements, ScoreKind.Normal);
        var expectedIndices = new int[spec.IndexElements];
        var expectedCounts = new int[spec.Rows];
        SelectionCpu.TopK(spec, scores, lengths, expectedIndices, expectedCounts);
        var ops = new SelectionKernels(device) { CapacityOverride = 4 };
        var (indices, counts) = RunGpu(device, ops, spec, scores, lengths, scoreOffset: 1);
        Assert.Equal(expectedCounts, counts);
        AssertRows(expectedIndices, indices, spec.K, "misaligned GPU vs CPU");
    }

    [Fact]
    public void Cpu_ParallelPath_MatchesOracle()
    {
        // 64 rows of 2053: above the parallel threshold.
        var spec = new TopKSpec(64, 2053, 129, Sinks: 2, Recent: 16);
        var rng = new Random(11);
        var lengths = Enumerable.Range(0, spec.Rows).Select(_ => rng.Next(spec.Columns + 1)).ToArray();
        var scores = SelectionData.Scores(rng, spec.ScoreElements, ScoreKind.FewValues);
        var indices = SelectionData.Poisoned(spec.IndexElements);
        var counts = SelectionData.Poisoned(spec.Rows);
        SelectionCpu.TopK(spec, scores, lengths, indices, counts);
        var expectedIndices = new int[spec.IndexElements];
        var expectedCounts = new int[spec.Rows];
        SelectionOracle.TopK(spec, scores, lengths, expectedIndices, expectedCounts);
        Assert.Equal(expectedCounts, counts);
        AssertRows(expectedIndices, indices, spec.K, "parallel CPU vs oracle");
    }

    [Fact]
    public void Oracle_KeepsTheObviousAnswer()
    {
        // A hand-checkable row: scores 5 4 4 9 -0 +0 NaN 1, k = 4, sink 1: keep 0 (sink), then 3 (9), 1 (4), 2 (4, tie
        // goes to the lower index); bottom-4 with recent 1 keeps 7 (recent), then 4 (-0), 5 (+0 ties -0, lower first),
        // then 1 (4): NaN is never chosen before a number.
        float[] row = [5, 4, 4, 9, -0.0f, 0.0f, float.NaN, 1];
        Assert.Equal([0, 1, 2, 3], SelectionOracle.TopKRow(row, 8, 4, 1, 0, SelectionOrder.Largest));
        Assert.Equal([1, 4, 5, 7], SelectionOracle.TopKRow(row, 8, 4, 0, 1, SelectionOrder.Smallest));
        var indices = new int[8];
        var counts = new int[2];
        SelectionCpu.TopK(new TopKSpec(2, 8, 4, Recent: 1, Order: SelectionOrder.Smallest), [.. row, .. row], [8, 3], indices, counts);
        Assert.Equal([1, 4, 5, 7, 0, 1, 2, -1], indices);
        Assert.Equal([4, 3], counts);
    }
}
