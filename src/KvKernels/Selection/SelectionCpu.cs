using System.Buffers;

namespace KvKernels.Selection;

/// <summary>
/// The CPU twin of the selection kernels (<c>cuda/selection/topk.cu</c>): the same functions, validated by the same
/// specs, on host spans. Each row (each sequence, for <see cref="GlobalTopK"/>) turns its scores into the kernel's
/// 32-bit keys once (Vector256), runs an exact radix select over them (a 4096-bin histogram of the top 12 bits over
/// all keys, then 12 + 8 more bits and the tie cutoff over the chosen bin's keys only), and writes the kept indices in
/// one pass in position order. The result is the unique set that <see cref="TopKSpec"/> / <see cref="GlobalTopKSpec"/>
/// define, so it equals the GPU's bit for bit.
/// <para>Allocation: scratch from <see cref="ArrayPool{T}"/> once per call (serial) or once per worker task
/// (parallel): two 32-bit words per score of a row (top-k) or of a sequence's rows (global: up to 8 · Heads · Columns
/// bytes per worker), plus 8 bytes per row for the global selection's per-row rules. Large calls run in parallel over
/// rows (sequences) with <see cref="Parallel.For(int, int, Action{int})"/>, which allocates its closure and tasks.</para>
/// </summary>
public static unsafe class SelectionCpu
{
    /// <summary>Below this many score elements in total a call stays on the calling thread.</summary>
    private const long ParallelThreshold = 1L << 17;

    /// <summary>
    /// Per-row top-k / bottom-k with protected ranges; see <see cref="TopKSpec"/> for the rule.
    /// </summary>
    /// <param name="spec">Shape, budget, protected ranges and order.</param>
    /// <param name="scores"><c>[Rows, Columns]</c> fp32 scores (entries past a row's length are not read).</param>
    /// <param name="lengths"><c>[Rows]</c> tokens per row, each in [0, Columns].</param>
    /// <param name="indices"><c>[Rows, K]</c>, written: kept indices ascending, then −1.</param>
    /// <param name="counts"><c>[Rows]</c>, written: min(K, length).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer length or length entry, or a budget below the protected
    /// ranges (named by the exception); nothing is written.</exception>
    public static void TopK(in TopKSpec spec, ReadOnlySpan<float> scores, ReadOnlySpan<int> lengths, Span<int> indices, Span<int> counts)
    {
        spec.ValidateBuffers(scores.Length, lengths.Length, indices.Length, counts.Length);
        spec.ValidateLengths(lengths);
        if (spec.Rows == 0) return;
        fixed (float* pScores = scores)
        fixed (int* pLengths = lengths, pIndices = indices, pCounts = counts)
        {
            var job = new TopKJob(spec, pScores, pLengths, pIndices, pCounts);
            int scratch = 2 * spec.Columns;
            if (Environment.ProcessorCount > 1 && spec.Rows > 1 && spec.ScoreElements >= ParallelThreshold) RunParallel(job.Row, spec.Rows, scratch);
            else RunSerial(job.Row, 0, spec.Rows, scratch);
        }
    }

    /// <summary>
    /// Global top-k across the heads of each sequence with a per-head floor (AdaKV); see <see cref="GlobalTopKSpec"/>
    /// for the rule.
    /// </summary>
    /// <param name="spec">Shape, budget, floor fraction, protected ranges and order.</param>
    /// <param name="scores"><c>[Sequences · Heads, Columns]</c> fp32 scores.</param>
    /// <param name="lengths"><c>[Sequences · Heads]</c> tokens per row, each in [0, Columns].</param>
    /// <param name="indices"><c>[Sequences · Heads, Width]</c>, written: each row's kept indices ascending, then −1.</param>
    /// <param name="counts"><c>[Sequences · Heads]</c>, written: each row's kept count.</param>
    /// <exception cref="ArgumentException">A bad spec, buffer length or length entry, or a budget below the forced sets
    /// (named by the exception); nothing is written.</exception>
    public static void GlobalTopK(in GlobalTopKSpec spec, ReadOnlySpan<float> scores, ReadOnlySpan<int> lengths, Span<int> indices, Span<int> counts)
    {
        spec.ValidateBuffers(scores.Length, lengths.Length, indices.Length, counts.Length);
        int longest = spec.ValidateLengths(lengths);
        if (spec.Rows == 0) return;
        uint[] rules = ArrayPool<uint>.Shared.Rent(2 * spec.Rows);
        try
        {
            fixed (float* pScores = scores)
            fixed (int* pLengths = lengths, pIndices = indices, pCounts = counts)
            fixed (uint* pRules = rules)
            {
                var job = new GlobalJob(spec, pScores, pLengths, pIndices, pCounts, pRules);
                bool parallel = Environment.ProcessorCount > 1 && spec.ScoreElements >= ParallelThreshold;
                int rowScratch = 2 * longest;
                int sequenceScratch = 2 * (int)Math.Min(int.MaxValue / 2, (long)spec.Heads * longest);
                if (parallel && spec.Rows > 1) RunParallel(job.ForcedRow, spec.Rows, rowScratch);
                else RunSerial(job.ForcedRow, 0, spec.Rows, rowScratch);
                if (parallel && spec.Sequences > 1) RunParallel(job.Sequence, spec.Sequences, sequenceScratch);
                else RunSerial(job.Sequence, 0, spec.Sequences, sequenceScratch);
            }
        }
        finally
        {
            ArrayPool<uint>.Shared.Return(rules);
        }
    }

    /// <summary>One unit of work (a row or a sequence) with a histogram and a scratch of 32-bit words.</summary>
    private delegate void Unit(int index, int* hist, uint[] scratch);

    private static void RunSerial(Unit unit, int first, int end, int scratchWords)
    {
        uint[] scratch = ArrayPool<uint>.Shared.Rent(Math.Max(1, scratchWords));
        try
        {
            int* hist = stackalloc int[SelectionKeys.Bins];
            for (int i = first; i < end; i++) unit(i, hist, scratch);
        }
        finally
        {
            ArrayPool<uint>.Shared.Return(scratch);
        }
    }

    /// <summary>Units in parallel; scratch is rented once per worker task, not per unit.</summary>
    private static void RunParallel(Unit unit, int count, int scratchWords) =>
        Parallel.For(0, count,
            () => ArrayPool<uint>.Shared.Rent(Math.Max(1, scratchWords)),
            (i, _, scratch) =>
            {
                int* hist = stackalloc int[SelectionKeys.Bins];
                unit(i, hist, scratch);
                return scratch;
            },
            scratch => ArrayPool<uint>.Shared.Return(scratch));

    // ---- jobs ------------------------------------------------------------------------------------------------------

    private sealed class TopKJob(TopKSpec spec, float* scores, int* lengths, int* indices, int* counts)
    {
        private readonly bool _smallest = spec.Order == SelectionOrder.Smallest;

        public void Row(int r, int* hist, uint[] scratch)
        {
            int k = spec.K, length = lengths[r];
            int* output = indices + (long)r * k;
            if (length <= k)
            {
                for (int j = 0; j < k; j++) output[j] = j < length ? j : -1;
                counts[r] = length;
                return;
            }
            int s = spec.Sinks, rc = spec.Recent, need = k - s - rc, middle = length - s - rc;
            for (int j = 0; j < s; j++) output[j] = j;
            for (int j = 0; j < rc; j++) output[s + need + j] = length - rc + j;
            if (need > 0)
            {
                var keys = scratch.AsSpan(0, middle);
                SelectionKeys.Keys(new ReadOnlySpan<float>(scores + (long)r * spec.Columns + s, middle), keys, _smallest);
                var rule = SelectionKeys.Select(keys, need, hist, scratch.AsSpan(middle, middle));
                int* kept = output + s;
                int n = 0;
                for (int e = 0; e < middle; e++)
                    if (rule.Keeps(keys[e], (uint)e)) kept[n++] = s + e;
            }
            counts[r] = k;
        }
    }

    private sealed class GlobalJob(GlobalTopKSpec spec, float* scores, int* lengths, int* indices, int* counts, uint* rules)
    {
        private readonly bool _smallest = spec.Order == SelectionOrder.Smallest;

        /// <summary>Row r's forced-set rule, as <see cref="TopKSpec"/> with K = ForcedPerRow would keep it, in row
        /// positions: (0, all) when the row has at most K tokens, else the rule of its middle.</summary>
        public void ForcedRow(int r, int* hist, uint[] scratch)
        {
            int k = spec.ForcedPerRow, length = lengths[r];
            var rule = SelectionKeys.KeepAll;
            if (length > k)
            {
                int s = spec.Sinks, need = k - s - spec.Recent, middle = length - s - spec.Recent;   // need ≥ 0: K ≥ Sinks + Recent here
                var keys = scratch.AsSpan(0, middle);
                SelectionKeys.Keys(new ReadOnlySpan<float>(scores + (long)r * spec.Columns + s, middle), keys, _smallest);
                rule = SelectionKeys.Select(keys, need, hist, scratch.AsSpan(middle, middle));
                // Middle index e is position s + e: a tie cutoff e + 1 becomes s + e + 1 (0 stays "no tie": ties lie at ≥ s).
                if (rule.Cutoff != SelectionKeys.All) rule = rule with { Cutoff = rule.Cutoff + (uint)s };
            }
            rules[2 * r] = rule.Key;
            rules[2 * r + 1] = rule.Cutoff;
        }

        /// <summary>Sequence q: its rows' keys back to back (forced tokens as the sentinel), one select over them
        /// (list order = head, then index: the global tie order), and each row's kept indices.</summary>
        public void Sequence(int q, int* hist, uint[] scratch)
        {
            int heads = spec.Heads, width = spec.Width, firstRow = q * heads;
            int total = 0;
            for (int h = 0; h < heads; h++) total += lengths[firstRow + h];
            var keys = scratch.AsSpan(0, total);
            int offset = 0;
            for (int h = 0; h < heads; h++)
            {
                int r = firstRow + h, length = lengths[r];
                var rowKeys = keys.Slice(offset, length);
                SelectionKeys.Keys(new ReadOnlySpan<float>(scores + (long)r * spec.Columns, length), rowKeys, _smallest);
                var forced = new SelectionKeys.Rule(rules[2 * r], rules[2 * r + 1]);
                for (int i = 0; i < length; i++)
                    if (i < spec.Sinks || (long)i + spec.Recent >= length || forced.Keeps(rowKeys[i], (uint)i)) rowKeys[i] = SelectionKeys.Sentinel;
                offset += length;
            }
            var rule = total <= spec.Budget ? SelectionKeys.KeepAll : SelectionKeys.Select(keys, spec.Budget, hist, scratch.AsSpan(total, total));
            offset = 0;
            for (int h = 0; h < heads; h++)
            {
                int r = firstRow + h, length = lengths[r], n = 0;
                int* output = indices + (long)r * width;
                for (int i = 0; i < length; i++)
                    if (rule.Keeps(keys[offset + i], (uint)(offset + i))) output[n++] = i;
                for (int j = n; j < width; j++) output[j] = -1;
                counts[r] = n;
                offset += length;
            }
        }
    }
}
