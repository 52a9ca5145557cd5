using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary>
/// One decode-attention test problem: a spec, the length of every row, and the seed of its random data. The name says
/// what the case exercises (it is what the test explorer shows).
/// </summary>
/// <param name="Name">Readable, unique name.</param>
/// <param name="Spec">The call.</param>
/// <param name="Lengths">Tokens per row (<see cref="DecodeAttentionSpec.Rows"/> entries).</param>
/// <param name="Seed">Seed of <see cref="Create{T}"/>'s data.</param>
/// <param name="WithLse">Whether the call asks for the LSE.</param>
public sealed record AttentionCase(string Name, DecodeAttentionSpec Spec, int[] Lengths, int Seed, bool WithLse)
{
    /// <summary>The case's random data (queries, storage with NaN in unused slots, block table, positions, slopes).</summary>
    /// <typeparam name="T">Must match <see cref="DecodeAttentionSpec.InputType"/>.</typeparam>
    public AttentionData<T> Create<T>() where T : unmanaged => AttentionData<T>.Create(Spec, new Random(Seed), Lengths);

    /// <inheritdoc/>
    public override string ToString() => Name;
}

/// <summary>
/// The covering set of decode-attention problems shared by the CPU-twin and GPU tests: every PAIR of option values
/// below appears in at least one case (a greedy pairwise generator with a fixed seed, so the list is the same on every
/// run), with boundary lengths in every case. Options: storage (contiguous, paged) × layout (NHD, HND) × ragged
/// (no, per-head rows over Hkv-head storage, per-head rows with single-head storage) × RoPE (none, rotate-half,
/// interleaved, partial rotary, explicit positions) × window/sinks × soft-cap × ALiBi × key reuse × query length
/// (1, 2, 5, 16) × group size (1, 5, 7, 8, 128) × head dims (64 … 512 and Dv ≠ Dk) × input type × output type ×
/// LSE wanted.
/// </summary>
public static class AttentionCases
{
    /// <summary>Option values of each factor, in the order <see cref="Factors"/> lists them.</summary>
    public enum Factor
    {
        /// <summary>Contiguous or paged.</summary>
        Storage,
        /// <summary>NHD or HND.</summary>
        Layout,
        /// <summary>Not ragged, ragged with Hkv-head storage, ragged with single-head storage.</summary>
        Ragged,
        /// <summary>See <see cref="RopeVariants"/>.</summary>
        Rope,
        /// <summary>See <see cref="WindowVariants"/>.</summary>
        Window,
        /// <summary>Off or on.</summary>
        SoftCap,
        /// <summary>Off or on.</summary>
        Alibi,
        /// <summary>Off or on.</summary>
        KeyReuse,
        /// <summary>See <see cref="QueryLengths"/>.</summary>
        QueryLength,
        /// <summary>See <see cref="GroupSizes"/>.</summary>
        GroupSize,
        /// <summary>See <see cref="HeadDims"/>.</summary>
        HeadDims,
        /// <summary>fp16 or bf16.</summary>
        Input,
        /// <summary>fp16, bf16 or fp32.</summary>
        Output,
        /// <summary>Without or with the LSE.</summary>
        Lse,
    }

    /// <summary>Query lengths covered.</summary>
    public static readonly int[] QueryLengths = [1, 2, 5, 16];

    /// <summary>Hq / Hkv covered.</summary>
    public static readonly int[] GroupSizes = [1, 5, 7, 8, 128];

    /// <summary>(Dk, Dv) covered: the models' head dims, and value dims that differ from the key dims.</summary>
    public static readonly (int Dk, int Dv)[] HeadDims = [(64, 64), (80, 80), (96, 96), (112, 112), (128, 128), (192, 192), (256, 256), (512, 512), (192, 128), (64, 256)];

    /// <summary>On-the-fly RoPE variants covered.</summary>
    public static readonly string[] RopeVariants = ["none", "half", "interleaved", "half-partial", "interleaved-partial-positions", "half-positions"];

    /// <summary>Window variants covered: off, a short window, a window with sinks, a window longer than any context
    /// (with sinks).</summary>
    public static readonly string[] WindowVariants = ["none", "w5", "w6s3", "w4096s2"];

    private static readonly int[] FactorSizes = [2, 2, 3, RopeVariants.Length, WindowVariants.Length, 2, 2, 2, QueryLengths.Length, GroupSizes.Length, HeadDims.Length, 2, 3, 2];

    private static readonly Lazy<IReadOnlyList<AttentionCase>> LazyAll = new(Generate);

    /// <summary>Every case, in generation order.</summary>
    public static IReadOnlyList<AttentionCase> All => LazyAll.Value;

    /// <summary>Case names for theory data.</summary>
    public static TheoryData<string> Names => new(All.Select(c => c.Name));

    /// <summary>Case names as theory rows shown in full as <c>test: case name</c> (xunit shortens long string
    /// arguments in display names): <c>[MemberData(nameof(AttentionCases.Rows), "MyTest", MemberType = …)]</c>.</summary>
    public static IEnumerable<TheoryDataRow<string>> Rows(string test) =>
        All.Select(c => new TheoryDataRow<string>(c.Name) { TestDisplayName = $"{test}: {c.Name}" });

    /// <summary>The case called <paramref name="name"/>.</summary>
    public static AttentionCase Get(string name) => All.Single(c => c.Name == name);

    /// <summary>Relative-error bound against the float64 oracle for an output type (DESIGN.md): fp32 1e-5, fp16 2e-3,
    /// bf16 1e-2.</summary>
    public static double Tolerance(AttentionElement output) => output switch
    {
        AttentionElement.Float32 => 1e-5,
        AttentionElement.Float16 => 2e-3,
        _ => 1e-2,
    };

    /// <summary>Relative-error bound of the fp32 LSE (its inputs are exact, so fp32 rounding only).</summary>
    public const double LseTolerance = 1e-5;

    /// <summary>
    /// Asserts ‖actual − expected‖/‖expected‖ ≤ <paramref name="tolerance"/>, and that every element is finite where
    /// the oracle's is (NaN never passes; −∞ LSEs must match exactly).
    /// </summary>
    public static void AssertClose<T>(ReadOnlySpan<T> actual, ReadOnlySpan<double> expected, double tolerance, string what) where T : unmanaged
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < actual.Length; i++)
        {
            double a = AttentionElements.ToDouble(actual[i]), e = expected[i];
            if (double.IsFinite(e) && !double.IsFinite(a)) Assert.Fail($"{what}: element {i} is {a}; the oracle has {e}.");
            if (!double.IsFinite(e) && a != e) Assert.Fail($"{what}: element {i} is {a}; the oracle has {e}.");
        }
        double error = AttentionElements.RelativeError(actual, expected);
        Assert.True(error <= tolerance, $"{what}: relative error {error:E3} > {tolerance:E1}.");
    }

    private static List<AttentionCase> Generate()
    {
        var rows = Pairwise(new Random(20250611));
        var cases = new List<AttentionCase>(rows.Count);
        for (int index = 0; index < rows.Count; index++) cases.Add(Build(index, rows[index]));
        return cases;
    }

    /// <summary>Key reuse reads the first Dv columns of the keys as values, so it cannot have Dv &gt; Dk.</summary>
    private static bool Compatible(int factorA, int valueA, int factorB, int valueB)
    {
        if (factorA > factorB) (factorA, valueA, factorB, valueB) = (factorB, valueB, factorA, valueA);
        if (factorA == (int)Factor.KeyReuse && factorB == (int)Factor.HeadDims)
            return valueA == 0 || HeadDims[valueB].Dv <= HeadDims[valueB].Dk;
        return true;
    }

    /// <summary>
    /// Greedy pairwise covering: each new row starts from the first uncovered pair, then gives every other factor (in a
    /// seeded random order) the compatible value that covers the most uncovered pairs with the factors already set.
    /// </summary>
    private static List<int[]> Pairwise(Random random)
    {
        int factors = FactorSizes.Length;
        var uncovered = new SortedSet<(int, int, int, int)>();
        for (int a = 0; a < factors; a++)
            for (int b = a + 1; b < factors; b++)
                for (int va = 0; va < FactorSizes[a]; va++)
                    for (int vb = 0; vb < FactorSizes[b]; vb++)
                        if (Compatible(a, va, b, vb)) uncovered.Add((a, va, b, vb));

        var result = new List<int[]>();
        while (uncovered.Count > 0)
        {
            var (fa, va, fb, vb) = uncovered.Min;
            var row = Enumerable.Repeat(-1, factors).ToArray();
            row[fa] = va;
            row[fb] = vb;
            var order = Enumerable.Range(0, factors).Where(f => row[f] < 0).ToArray();
            random.Shuffle(order);
            foreach (int f in order)
            {
                int best = -1, bestGain = -1, ties = 0;
                for (int v = 0; v < FactorSizes[f]; v++)
                {
                    bool ok = true;
                    int gain = 0;
                    for (int g = 0; g < factors && ok; g++)
                    {
                        if (row[g] < 0) continue;
                        ok = Compatible(f, v, g, row[g]);
                        if (uncovered.Contains(f < g ? (f, v, g, row[g]) : (g, row[g], f, v))) gain++;
                    }
                    if (!ok || gain < bestGain) continue;
                    // Ties go to a random value (seeded), so the rows that only fill the last pairs still vary the rest.
                    ties = gain > bestGain ? 1 : ties + 1;
                    if (gain > bestGain || random.Next(ties) == 0) (best, bestGain) = (v, gain);
                }
                row[f] = best;
            }
            for (int a = 0; a < factors; a++)
                for (int b = a + 1; b < factors; b++)
                    uncovered.Remove((a, row[a], b, row[b]));
            result.Add(row);
        }
        return result;
    }

    private static int Value(int[] row, Factor factor) => row[(int)factor];

    private static AttentionCase Build(int index, int[] row)
    {
        bool paged = Value(row, Factor.Storage) == 1;
        var layout = Value(row, Factor.Layout) == 0 ? KvLayout.Nhd : KvLayout.Hnd;
        int raggedMode = Value(row, Factor.Ragged);
        string rope = RopeVariants[Value(row, Factor.Rope)];
        string window = WindowVariants[Value(row, Factor.Window)];
        bool softCap = Value(row, Factor.SoftCap) == 1, alibi = Value(row, Factor.Alibi) == 1, keyReuse = Value(row, Factor.KeyReuse) == 1;
        int queryLength = QueryLengths[Value(row, Factor.QueryLength)];
        int group = GroupSizes[Value(row, Factor.GroupSize)];
        var (dk, dv) = HeadDims[Value(row, Factor.HeadDims)];
        var input = Value(row, Factor.Input) == 0 ? AttentionElement.Float16 : AttentionElement.BFloat16;
        var output = (AttentionElement)Value(row, Factor.Output);
        bool withLse = Value(row, Factor.Lse) == 1;

        // Sizes: few heads and sequences, so the float64 oracle stays fast; one sequence for the widest query blocks.
        // (Ragged rows over Hkv-head storage need Hkv > 1 to differ from single-head storage.)
        int kvHeads = group == 128 && raggedMode != 1 ? 1 : group == 1 ? 3 : 2;
        int batch = group * queryLength * (dk + dv) > 64 * 1024 ? 1 : 2;
        int[] pageSizes = [16, 7, 16, 1, 32];
        int pageSize = pageSizes[index % pageSizes.Length];
        int rows = raggedMode > 0 ? batch * kvHeads : batch;

        // Boundary lengths, rotated per case so each row meets each of them somewhere: empty, one token, the page
        // edges, a query block longer than the context, and longer contexts that span several tiles.
        int[] wanted = [pageSize + 1, 0, 1, Math.Max(0, pageSize - 1), pageSize, 2 * pageSize + 3, Math.Max(0, queryLength - 1), 97 + index % 41];
        var lengths = new int[rows];
        for (int r = 0; r < rows; r++) lengths[r] = wanted[(r + index) % wanted.Length];
        if (lengths.All(l => l == 0)) lengths[0] = pageSize + 1;
        int longest = lengths.Max();

        KvCacheShape cache;
        int poolHeads = raggedMode == 2 ? 1 : 0;
        if (paged)
        {
            int maxPages = (longest + pageSize - 1) / pageSize + 1;
            int pages = lengths.Sum(l => (l + pageSize - 1) / pageSize) + 3;
            cache = KvCacheShape.Paged(pages, pageSize, maxPages, layout, poolHeads);
        }
        else
        {
            cache = KvCacheShape.Contiguous(longest + 3, layout, poolHeads);
        }

        var (ropeOptions, ropeName) = rope switch
        {
            "none" => (default(RopeOptions), ""),
            "half" => (new RopeOptions(RopeStyle.RotateHalf), " rope-half"),
            "interleaved" => (new RopeOptions(RopeStyle.Interleaved, 500000f), " rope-interleaved"),
            "half-partial" => (new RopeOptions(RopeStyle.RotateHalf, 10000f, dk / 2), $" rope-half-rd{dk / 2}"),
            "interleaved-partial-positions" => (new RopeOptions(RopeStyle.Interleaved, 10000f, dk / 4, ExplicitPositions: true), $" rope-interleaved-rd{dk / 4}-positions"),
            _ => (new RopeOptions(RopeStyle.RotateHalf, 500000f, 0, ExplicitPositions: true), " rope-half-positions"),
        };
        var (windowSize, sinks) = window switch
        {
            "none" => (0, 0),
            "w5" => (5, 0),
            "w6s3" => (6, 3),
            _ => (4096, 2),
        };

        var spec = new DecodeAttentionSpec(batch, queryLength, group * kvHeads, kvHeads, dk, cache)
        {
            ValueHeadDim = dv == dk ? 0 : dv,
            InputType = input,
            OutputType = output,
            // With the soft-cap, larger logits so that tanh bends them.
            Scale = softCap ? 0.35f : 0,
            SoftCap = softCap ? 4f : 0,
            Window = windowSize,
            Sinks = sinks,
            Alibi = alibi,
            Ragged = raggedMode > 0,
            KeyReuse = keyReuse,
            Rope = ropeOptions,
        };

        string name = $"{index:D2} {(paged ? $"paged{pageSize}" : "contiguous")} {(layout == KvLayout.Nhd ? "NHD" : "HND")}"
            + (raggedMode == 1 ? " ragged" : raggedMode == 2 ? " ragged-1head" : "")
            + $" q{queryLength} {group * kvHeads}q/{kvHeads}kv D{dk}" + (dv != dk ? $"/{dv}" : "")
            + ropeName + (windowSize > 0 ? $" window{windowSize}" + (sinks > 0 ? $"+{sinks}sinks" : "") : "")
            + (softCap ? " softcap" : "") + (alibi ? " alibi" : "") + (keyReuse ? " key-reuse" : "")
            + $" {Short(input)}->{Short(output)}" + (withLse ? " +lse" : "")
            + $" L=[{string.Join(",", lengths)}]";
        return new AttentionCase(name, spec, lengths, 1000 + index, withLse);
    }

    /// <summary>fp16, bf16 or fp32.</summary>
    public static string Short(AttentionElement element) => element switch
    {
        AttentionElement.Float16 => "fp16",
        AttentionElement.BFloat16 => "bf16",
        _ => "fp32",
    };
}
