using KvKernels.Selection;

namespace KvKernels.Tests.Oracles;

/// <summary>
/// Brute-force oracles of the selection ops, written for clarity and independent of the radix select: every candidate
/// is sorted by a comparison of its score as a double (NaN worse than every number, equal values by lower index), the
/// protected tokens are forced in, and the kept indices are sorted ascending. Shared with KvCheck (linked source), so
/// keep it dependency-free.
/// </summary>
public static class SelectionOracle
{
    /// <summary>Negative when (a at ia) is better than (b at ib): by value in the given order, NaN last, then lower index.</summary>
    public static int Compare(double a, int ia, double b, int ib, SelectionOrder order)
    {
        bool nanA = double.IsNaN(a), nanB = double.IsNaN(b);
        if (nanA != nanB) return nanA ? 1 : -1;
        if (!nanA && a != b)   // −0.0 == +0.0 here
            return order == SelectionOrder.Largest ? (a > b ? -1 : 1) : (a < b ? -1 : 1);
        return ia.CompareTo(ib);
    }

    /// <summary>The kept indices of one row (ascending): all of [0, length) when length ≤ k, else the sinks, the recent
    /// window and the best k − sinks − recent of the rest.</summary>
    public static int[] TopKRow(ReadOnlySpan<float> row, int length, int k, int sinks, int recent, SelectionOrder order)
    {
        if (length <= k) return Enumerable.Range(0, length).ToArray();
        var kept = new SortedSet<int>();
        for (int i = 0; i < sinks; i++) kept.Add(i);
        for (int i = length - recent; i < length; i++) kept.Add(i);
        if (kept.Count != sinks + recent || kept.Count > k) throw new ArgumentException("protected ranges overlap or exceed k");
        var middle = new List<(double Value, int Index)>();
        for (int i = sinks; i < length - recent; i++) middle.Add((row[i], i));
        middle.Sort((x, y) => Compare(x.Value, x.Index, y.Value, y.Index, order));
        foreach (var (_, index) in middle.Take(k - kept.Count)) kept.Add(index);
        return kept.ToArray();
    }

    /// <summary>
    /// Per-row top-k into indices <c>[rows, k]</c> (−1 padded) and counts <c>[rows]</c>.
    /// </summary>
    public static void TopK(in TopKSpec spec, float[] scores, int[] lengths, int[] indices, int[] counts)
    {
        for (int r = 0; r < spec.Rows; r++)
        {
            var row = scores.AsSpan(r * spec.Columns, spec.Columns);
            var kept = TopKRow(row, lengths[r], spec.K, spec.Sinks, spec.Recent, spec.Order);
            for (int j = 0; j < spec.K; j++) indices[r * spec.K + j] = j < kept.Length ? kept[j] : -1;
            counts[r] = kept.Length;
        }
    }

    /// <summary>
    /// Global top-k with a per-head floor into indices <c>[rows, Width]</c> (−1 padded) and counts <c>[rows]</c>: per
    /// sequence, each head's forced set is <see cref="TopKRow"/> with k = max(⌊α·Budget/H⌋, sinks + recent); then the
    /// remaining budget goes to the best unforced tokens of all heads, by value, then lower head, then lower index.
    /// </summary>
    public static void GlobalTopK(in GlobalTopKSpec spec, float[] scores, int[] lengths, int[] indices, int[] counts)
    {
        int floor = (int)Math.Floor(spec.Alpha * spec.Budget / spec.Heads);
        int forcedK = (int)Math.Min(spec.Columns, Math.Max(floor, (long)spec.Sinks + spec.Recent));
        int width = Math.Min(spec.Columns, spec.Budget);
        for (int q = 0; q < spec.Sequences; q++)
        {
            var kept = new SortedSet<int>[spec.Heads];
            var rest = new List<(double Value, int Head, int Index)>();
            long total = 0;
            for (int h = 0; h < spec.Heads; h++)
            {
                int r = q * spec.Heads + h;
                var row = scores.AsSpan(r * spec.Columns, spec.Columns);
                total += lengths[r];
                kept[h] = new SortedSet<int>(TopKRow(row, lengths[r], forcedK, spec.Sinks, spec.Recent, spec.Order));
                for (int i = 0; i < lengths[r]; i++)
                    if (!kept[h].Contains(i)) rest.Add((row[i], h, i));
            }
            long forced = kept.Sum(s => (long)s.Count);
            if (forced > spec.Budget) throw new ArgumentException("forced sets exceed the budget");
            long remaining = total <= spec.Budget ? rest.Count : spec.Budget - forced;
            var order = spec.Order;
            rest.Sort((x, y) =>
            {
                int c = Compare(x.Value, 0, y.Value, 0, order);
                if (c != 0) return c;
                return x.Head != y.Head ? x.Head.CompareTo(y.Head) : x.Index.CompareTo(y.Index);
            });
            foreach (var (_, head, index) in rest.Take((int)remaining)) kept[head].Add(index);
            for (int h = 0; h < spec.Heads; h++)
            {
                int r = q * spec.Heads + h;
                var list = kept[h].ToArray();
                for (int j = 0; j < width; j++) indices[r * width + j] = j < list.Length ? list[j] : -1;
                counts[r] = list.Length;
            }
        }
    }
}
