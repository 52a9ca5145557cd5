using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Compaction after eviction: the CPU twin against an index-by-index oracle (multi-head NHD/HND and single-head sources,
/// K rows and an fp32 side buffer), the GPU (every backend) against the CPU exactly, decode attention over the
/// compacted ragged cache against attention over the kept tokens of the original, the page allocator, and bad input.
/// </summary>
public sealed class CompactionTests(Backends backends)
{
    public sealed record CompactCase(string Name, KvCompactionSpec Spec, int[] Lengths, int Seed)
    {
        public override string ToString() => Name;
    }

    private static KvCompactionSpec S(int b, int hkv, int sourceHeads, int srcPages, int srcPage, int srcMax, KvLayout layout, int dstPages, int dstPage, int dstMax, int k) =>
        new(b, hkv, sourceHeads, srcPages, srcPage, srcMax, layout, dstPages, dstPage, dstMax, k);

    public static IReadOnlyList<CompactCase> Cases { get; } =
    [
        new("first-eviction-nhd", S(2, 3, 3, 12, 16, 5, KvLayout.Nhd, 40, 16, 3, 37), [70, 19], 1),
        new("first-eviction-hnd-odd-pages", S(2, 2, 2, 30, 7, 12, KvLayout.Hnd, 30, 5, 6, 29), [80, 3], 2),
        new("second-eviction-single-head", S(2, 2, 1, 40, 8, 6, KvLayout.Nhd, 40, 8, 3, 20), [41, 30, 0, 17], 3),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int> BackendCases => Backends.CasesOnEach(Cases.Count);

    /// <summary>Indices of one case: a shuffled source table, kept sets (random ascending subsets, count ≤ min(k, L)),
    /// a destination table from the allocator.</summary>
    internal sealed record Plan(int[] SourceTable, int[] Kept, int[] Counts, int[] DestinationTable);

    internal static Plan MakePlan(CompactCase c)
    {
        var s = c.Spec;
        var rng = new Random(c.Seed);
        var pages = Enumerable.Range(0, s.SourceNumPages).ToArray();
        rng.Shuffle(pages);
        var sourceTable = new int[s.SourceTableRows * s.SourceMaxPages];
        Array.Fill(sourceTable, -1);
        int next = 0;
        for (int t = 0; t < s.SourceTableRows; t++)
            for (int p = 0; p < (c.Lengths[t] + s.SourcePageSize - 1) / s.SourcePageSize; p++) sourceTable[t * s.SourceMaxPages + p] = pages[next++];
        var kept = Enumerable.Repeat(-1, s.Rows * s.MaxKept).ToArray();
        var counts = new int[s.Rows];
        for (int r = 0; r < s.Rows; r++)
        {
            int length = c.Lengths[s.SourceHeads == 1 ? r : r / s.NumKvHeads];
            int count = Math.Min(s.MaxKept, length) - (r % 3 == 1 ? Math.Min(2, Math.Min(s.MaxKept, length)) : 0);   // some rows keep fewer
            var chosen = Enumerable.Range(0, length).OrderBy(_ => rng.Next()).Take(count).Order().ToArray();
            counts[r] = count;
            chosen.CopyTo(kept, r * s.MaxKept);
        }
        var destinationTable = new int[s.Rows * s.DestinationMaxPages];
        new PageAllocator(s.DestinationNumPages).AllocateTable(counts, s.DestinationPageSize, s.DestinationMaxPages, destinationTable);
        return new Plan(sourceTable, kept, counts, destinationTable);
    }

    private static T[] Pool<T>(long count, Func<int, T> make) => Enumerable.Range(0, (int)count).Select(make).ToArray();

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int caseIndex)
    {
        var c = Cases[caseIndex];
        var s = c.Spec;
        var plan = MakePlan(c);
        const int d = 24;
        var source = Pool(s.SourceElements(d), i => (Half)(i % 2003 * 0.25f));
        var destination = Pool(s.DestinationElements(d), _ => Half.NaN);
        KvCompaction.Compact<Half>(s, d, source, plan.SourceTable, c.Lengths, plan.Kept, plan.Counts, plan.DestinationTable, destination);

        // Oracle: for each row and kept position, where the token lives and where it goes, from the layout definitions.
        var expected = Pool(s.DestinationElements(d), _ => Half.NaN);
        for (int r = 0; r < s.Rows; r++)
            for (int j = 0; j < plan.Counts[r]; j++)
            {
                int n = plan.Kept[r * s.MaxKept + j], b = r / s.NumKvHeads, h = r % s.NumKvHeads;
                int tableRow = s.SourceHeads == 1 ? r : b, head = s.SourceHeads == 1 ? 0 : h;
                long page = plan.SourceTable[tableRow * s.SourceMaxPages + n / s.SourcePageSize], offset = n % s.SourcePageSize;
                long from = s.SourceLayout == KvLayout.Nhd
                    ? ((page * s.SourcePageSize + offset) * s.SourceHeads + head) * d
                    : ((page * s.SourceHeads + head) * s.SourcePageSize + offset) * d;
                long to = ((long)plan.DestinationTable[r * s.DestinationMaxPages + j / s.DestinationPageSize] * s.DestinationPageSize + j % s.DestinationPageSize) * d;
                for (int x = 0; x < d; x++) expected[to + x] = source[from + x];
            }
        Assert.Equal(expected.Select(BitConverter.HalfToUInt16Bits), destination.Select(BitConverter.HalfToUInt16Bits));
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int caseIndex)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        var s = c.Spec;
        var plan = MakePlan(c);
        using var dPlan = new DeviceCompactionPlan(device, s);
        dPlan.Update(plan.SourceTable, c.Lengths, plan.Kept, plan.Counts, plan.DestinationTable);
        var ops = new CompactionKernels(device);
        // K rows of 64 fp16 (16-byte words) and an fp32 side buffer (4-byte words).
        Check<Half>(64, i => (Half)(i % 4099 * 0.125f), Half.NaN);
        Check<float>(1, i => i * 0.5f, float.NaN);

        void Check<T>(int rowElements, Func<int, T> make, T poison) where T : unmanaged
        {
            var source = Pool(s.SourceElements(rowElements), make);
            var expected = Pool(s.DestinationElements(rowElements), _ => poison);
            KvCompaction.Compact<T>(s, rowElements, source, plan.SourceTable, c.Lengths, plan.Kept, plan.Counts, plan.DestinationTable, expected);
            using var dSource = device.Allocate<T>(source);
            using var dDestination = device.Allocate<T>(Pool(s.DestinationElements(rowElements), _ => poison));
            ops.Compact(dPlan, rowElements, dSource.Span, dDestination.Span);
            device.DefaultStream.Synchronize();
            Assert.Equal(System.Runtime.InteropServices.MemoryMarshal.AsBytes(expected.AsSpan()).ToArray(),
                System.Runtime.InteropServices.MemoryMarshal.AsBytes(dDestination.ToArray().AsSpan()).ToArray());
        }
    }

    /// <summary>Attention over the compacted ragged cache (PoolKvHeads 1, lengths = counts) equals attention over the
    /// kept tokens of the original cache laid out contiguously per row.</summary>
    [Fact]
    public void CompactedCache_AttendsLikeTheKeptTokens()
    {
        var c = Cases[0];
        var s = c.Spec;
        var plan = MakePlan(c);
        const int d = 64, hq = 6;
        var rng = new Random(9);
        var keys = Pool(s.SourceElements(d), _ => (Half)(float)(rng.NextDouble() * 2 - 1));
        var values = Pool(s.SourceElements(d), _ => (Half)(float)(rng.NextDouble() * 2 - 1));
        var query = Pool(s.BatchSize * hq * d, _ => (Half)(float)(rng.NextDouble() * 2 - 1));
        var newKeys = new Half[s.DestinationElements(d)];
        var newValues = new Half[s.DestinationElements(d)];
        KvCompaction.Compact<Half>(s, d, keys, plan.SourceTable, c.Lengths, plan.Kept, plan.Counts, plan.DestinationTable, newKeys);
        KvCompaction.Compact<Half>(s, d, values, plan.SourceTable, c.Lengths, plan.Kept, plan.Counts, plan.DestinationTable, newValues);

        var ragged = new DecodeAttentionSpec(s.BatchSize, 1, hq, s.NumKvHeads, d,
            KvCacheShape.Paged(s.DestinationNumPages, s.DestinationPageSize, s.DestinationMaxPages, poolKvHeads: 1))
        { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32, Ragged = true };
        var actual = new float[s.BatchSize * hq * d];
        DecodeAttentionCpu.Run<Half, float>(ragged, query, newKeys, newValues, plan.Counts, plan.DestinationTable, actual);

        // The kept tokens gathered by hand into contiguous ragged rows [rows, MaxKept, 1, D].
        var gatheredK = new Half[s.Rows * s.MaxKept * d];
        var gatheredV = new Half[s.Rows * s.MaxKept * d];
        for (int r = 0; r < s.Rows; r++)
            for (int j = 0; j < plan.Counts[r]; j++)
            {
                int n = plan.Kept[r * s.MaxKept + j], b = r / s.NumKvHeads, h = r % s.NumKvHeads;
                long page = plan.SourceTable[b * s.SourceMaxPages + n / s.SourcePageSize];
                long from = ((page * s.SourcePageSize + n % s.SourcePageSize) * s.NumKvHeads + h) * d;
                Array.Copy(keys, from, gatheredK, (r * s.MaxKept + j) * d, d);
                Array.Copy(values, from, gatheredV, (r * s.MaxKept + j) * d, d);
            }
        var contiguous = ragged with { Cache = KvCacheShape.Contiguous(s.MaxKept, poolKvHeads: 1) };
        var expected = new float[actual.Length];
        DecodeAttentionCpu.Run<Half, float>(contiguous, query, gatheredK, gatheredV, plan.Counts, [], expected);
        Assert.InRange(AttentionElements.RelativeError<float>(actual, expected.Select(x => (double)x).ToArray()), 0, 1e-6);
    }

    [Fact]
    public void PageAllocator_AllocatesAndFrees()
    {
        var allocator = new PageAllocator(5);
        var table = new int[3 * 3];
        allocator.AllocateTable([3, 0, 9], 4, 3, table);           // 1 + 0 + 3 pages
        Assert.Equal(1, allocator.FreeCount);
        Assert.Equal(-1, table[1]);
        Assert.All(table[3..6], p => Assert.Equal(-1, p));
        var used = new[] { table[0], table[6], table[7], table[8] };
        Assert.Equal(4, used.Distinct().Count());
        Assert.All(used, p => Assert.InRange(p, 0, 4));
        // Not enough pages: nothing is taken.
        Assert.Throws<InvalidOperationException>(() => allocator.AllocateTable([5], 4, 3, new int[3]));
        Assert.Equal(1, allocator.FreeCount);
        // More pages than columns.
        Assert.Equal("counts", Assert.Throws<ArgumentException>(() => allocator.AllocateTable([13], 4, 3, new int[3])).ParamName);
        allocator.Free(table.AsSpan(6, 3));
        Assert.Equal(4, allocator.FreeCount);
        Assert.Throws<ArgumentException>(() => allocator.Free([table[6]]));                  // already free
        Assert.Throws<ArgumentException>(() => allocator.Free([table[0], table[0]]));        // twice in one call
        Assert.Equal(4, allocator.FreeCount);
    }

    [Fact]
    public void BadInput_IsRejected()
    {
        var c = Cases[0];
        var s = c.Spec;
        var plan = MakePlan(c);
        var source = new Half[s.SourceElements(8)];
        var destination = new Half[s.DestinationElements(8)];
        string Param(int[]? kept = null, int[]? counts = null, int[]? destinationTable = null, int[]? lengths = null, Half[]? dst = null) =>
            Assert.Throws<ArgumentException>(() => KvCompaction.Compact<Half>(s, 8, source, plan.SourceTable, lengths ?? c.Lengths, kept ?? plan.Kept,
                counts ?? plan.Counts, destinationTable ?? plan.DestinationTable, dst ?? destination)).ParamName!;

        var descending = (int[])plan.Kept.Clone();
        (descending[0], descending[1]) = (descending[1], descending[0]);
        Assert.Equal("kept", Param(kept: descending));
        var beyond = (int[])plan.Kept.Clone();
        beyond[plan.Counts[0] - 1] = c.Lengths[0];
        Assert.Equal("kept", Param(kept: beyond));
        var tooMany = (int[])plan.Counts.Clone();
        tooMany[0] = s.MaxKept + 1;
        Assert.Equal("counts", Param(counts: tooMany));
        var shared = (int[])plan.DestinationTable.Clone();
        shared[s.DestinationMaxPages] = shared[0];                  // row 1 reuses row 0's first page
        Assert.Equal("destinationTable", Param(destinationTable: shared));
        Assert.Equal("sourceLengths", Param(lengths: [s.SourceMaxPages * s.SourcePageSize + 1, 1]));
        Assert.Equal("destination", Param(dst: destination[1..]));
        // The same pool: destination pages must be fresh.
        var overlap = (int[])plan.DestinationTable.Clone();
        overlap[0] = plan.SourceTable[0];
        Assert.Equal("destinationTable", Assert.Throws<ArgumentException>(() =>
            s.ValidateIndices(plan.SourceTable, c.Lengths, plan.Kept, plan.Counts, overlap, samePool: true)).ParamName);
    }
}
