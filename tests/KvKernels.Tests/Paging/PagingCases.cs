using System.Runtime.InteropServices;
using KvKernels.Paging;

namespace KvKernels.Tests.Paging;

/// <summary>Pool shapes covering page sizes 1..256, head dims 8..576, odd head counts and both layouts.</summary>
public static class PagingCases
{
    public static readonly PagedKvLayout[] Pools =
    [
        new(NumPages: 5, PageSize: 1, NumKvHeads: 1, HeadDim: 8, KvLayout.Nhd),
        new(NumPages: 9, PageSize: 7, NumKvHeads: 3, HeadDim: 64, KvLayout.Hnd),
        new(NumPages: 12, PageSize: 16, NumKvHeads: 8, HeadDim: 128, KvLayout.Nhd),
        new(NumPages: 12, PageSize: 16, NumKvHeads: 8, HeadDim: 128, KvLayout.Hnd),
        new(NumPages: 6, PageSize: 3, NumKvHeads: 5, HeadDim: 24, KvLayout.Nhd),
        new(NumPages: 3, PageSize: 256, NumKvHeads: 1, HeadDim: 576, KvLayout.Hnd),
        new(NumPages: 4, PageSize: 64, NumKvHeads: 2, HeadDim: 40, KvLayout.Nhd),
    ];

    public static TheoryData<int> PoolIndices
    {
        get
        {
            var data = new TheoryData<int>();
            for (int i = 0; i < Pools.Length; i++) data.Add(i);
            return data;
        }
    }

    public static bool SameBytes<T>(ReadOnlySpan<T> a, ReadOnlySpan<T> b) where T : unmanaged =>
        MemoryMarshal.AsBytes(a).SequenceEqual(MemoryMarshal.AsBytes(b));

    /// <summary>Asserts byte equality and names the first differing element.</summary>
    public static void AssertSameBytes<T>(ReadOnlySpan<T> expected, ReadOnlySpan<T> actual, string what) where T : unmanaged
    {
        Assert.Equal(expected.Length, actual.Length);
        if (SameBytes(expected, actual)) return;
        int size = System.Runtime.CompilerServices.Unsafe.SizeOf<T>();
        var e = MemoryMarshal.AsBytes(expected);
        var a = MemoryMarshal.AsBytes(actual);
        int first = 0;
        while (e[first] == a[first]) first++;
        Assert.Fail($"{what}: element {first / size} differs (first differing byte {first}: expected 0x{e[first]:x2}, got 0x{a[first]:x2}).");
    }

    /// <summary>Slots for <paramref name="tokens"/> tokens: distinct random slots of the pool, with some −1 padding.</summary>
    public static int[] Slots(Random random, in PagedKvLayout pool, int tokens)
    {
        var all = TestData.Permutation(random, (int)pool.Slots);
        var slots = new int[tokens];
        for (int t = 0; t < tokens; t++) slots[t] = random.Next(5) == 0 ? -1 : all[t];
        return slots;
    }

    /// <summary>
    /// A batch: lengths including 0, 1 and page boundaries, each sequence on its own distinct random pages
    /// (so scatter is legal), unused table entries −1.
    /// </summary>
    public static (int[] Table, int[] Lengths, int MaxPages) Batch(Random random, in PagedKvLayout pool)
    {
        int p = pool.PageSize;
        int[] wanted = [0, 1, p - 1, p, p + 1, 2 * p + 1, random.Next(1, 3 * p)];
        var pages = new Queue<int>(TestData.Permutation(random, pool.NumPages));
        var lengths = new List<int>();
        foreach (int length in wanted)
        {
            int need = (length + p - 1) / p;
            if (length < 0 || need > pages.Count) continue;
            lengths.Add(length);
            for (int i = 0; i < need; i++) pages.Dequeue();
        }
        int maxPages = Math.Max(1, lengths.Max(l => (l + p - 1) / p) + 1);
        var table = new int[lengths.Count * maxPages];
        Array.Fill(table, -1);
        pages = new Queue<int>(TestData.Permutation(random, pool.NumPages));
        for (int b = 0; b < lengths.Count; b++)
            for (int i = 0; i < (lengths[b] + p - 1) / p; i++)
                table[b * maxPages + i] = pages.Dequeue();
        return (table, lengths.ToArray(), maxPages);
    }

    /// <summary>Random disjoint (source, destination) page pairs.</summary>
    public static int[] PagePairs(Random random, in PagedKvLayout pool)
    {
        var pages = TestData.Permutation(random, pool.NumPages);
        int pairs = pool.NumPages / 2;
        var result = new int[2 * pairs];
        for (int i = 0; i < pairs; i++)
        {
            result[2 * i] = pages[i];
            result[2 * i + 1] = pages[pairs + i];
        }
        return result;
    }
}
