using KvKernels.Attention;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>Random inputs for the scoring tests: rows drawn like real keys (standard normal, a few outlier channels ×8),
/// block tables with random distinct pages, poisoned storage outside the rows a sequence uses.</summary>
internal static class ScoreData
{
    /// <summary>A standard normal sample (Box–Muller).</summary>
    public static float Normal(Random random)
    {
        double u = 1.0 - random.NextDouble(), v = random.NextDouble();
        return (float)(Math.Sqrt(-2.0 * Math.Log(u)) * Math.Cos(2 * Math.PI * v));
    }

    /// <summary><paramref name="count"/> rows of <paramref name="dim"/> elements; channels in <paramref name="outliers"/> are ×8.</summary>
    public static T[] Rows<T>(Random random, long count, int dim, IReadOnlySet<int>? outliers = null, float scale = 1f) where T : unmanaged
    {
        var values = new T[count * dim];
        for (long i = 0; i < values.Length; i++)
        {
            float factor = outliers is not null && outliers.Contains((int)(i % dim)) ? 8f : 1f;
            values[i] = AttentionElements.FromFloat<T>(Normal(random) * factor * scale);
        }
        return values;
    }

    /// <summary>Three random outlier channels of a head dim.</summary>
    public static HashSet<int> Outliers(Random random, int dim) => [.. Enumerable.Range(0, 3).Select(_ => random.Next(dim))];

    /// <summary>A block table <c>[rows, maxPages]</c> giving each row distinct random pages for its length (−1 elsewhere).</summary>
    public static int[] BlockTable(Random random, in KvCacheShape cache, int[] lengths)
    {
        if (!cache.IsPaged) return [];
        var table = new int[lengths.Length * cache.MaxPagesPerSequence];
        Array.Fill(table, -1);
        var pages = Enumerable.Range(0, cache.NumPages).ToArray();
        random.Shuffle(pages);
        int next = 0;
        for (int b = 0; b < lengths.Length; b++)
            for (int p = 0; p < (lengths[b] + cache.PageSize - 1) / cache.PageSize; p++)
                table[b * cache.MaxPagesPerSequence + p] = pages[next++];
        return table;
    }

    /// <summary>
    /// Storage of a cache: NaN everywhere, then a random row (keys-like) at every (sequence, token &lt; length, head) — so a
    /// kernel that reads a row no sequence uses poisons its output.
    /// </summary>
    public static T[] Storage<T>(Random random, in KvCacheShape cache, int heads, int dim, int[] lengths, int[] table) where T : unmanaged
    {
        long tokens = cache.IsPaged ? (long)cache.NumPages * cache.PageSize : (long)lengths.Length * cache.MaxTokens;
        var storage = AttentionElements.Poisoned<T>(tokens * heads * dim);
        var outliers = Outliers(random, dim);
        for (int b = 0; b < lengths.Length; b++)
            for (int n = 0; n < lengths[b]; n++)
                for (int h = 0; h < heads; h++)
                {
                    long offset = ScoreOracle.RowOffset(cache, heads, dim, cache.IsPaged ? table : null, b, n, h);
                    for (int d = 0; d < dim; d++)
                        storage[offset + d] = AttentionElements.FromFloat<T>(Normal(random) * (outliers.Contains(d) ? 8f : 1f));
                }
        return storage;
    }

    /// <summary>Largest |a − e| / max(|e|, floor) over the elements (NaN anywhere: +∞).</summary>
    public static double MaxRelative(ReadOnlySpan<float> actual, ReadOnlySpan<double> expected, double floor)
    {
        double worst = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            if (float.IsNaN(actual[i]) || double.IsNaN(expected[i])) return double.PositiveInfinity;
            worst = Math.Max(worst, Math.Abs(actual[i] - expected[i]) / Math.Max(Math.Abs(expected[i]), floor));
        }
        return worst;
    }

    /// <summary>An fp32 array of NaNs (poison for outputs).</summary>
    public static float[] Poison(long length)
    {
        var array = new float[length];
        Array.Fill(array, float.NaN);
        return array;
    }

    /// <summary>Index of the first element whose bits differ, or −1.</summary>
    public static int FirstBitDifference(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        for (int i = 0; i < a.Length; i++)
            if (BitConverter.SingleToInt32Bits(a[i]) != BitConverter.SingleToInt32Bits(b[i])) return i;
        return a.Length == b.Length ? -1 : Math.Min(a.Length, b.Length);
    }
}
