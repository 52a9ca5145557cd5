using System.Buffers;
using System.Runtime.CompilerServices;

namespace KvKernels.Selection;

/// <summary>
/// The CPU twin of the selection kernels (<c>cuda/selection/topk.cu</c>): the same functions, validated by the same
/// specs, on host spans. Each row (or sequence, for <see cref="GlobalTopK"/>) is an exact radix select over the same
/// 32-bit keys as the GPU (12 + 12 + 8 bits, a 4096-entry histogram on the stack), followed by one pass in position
/// order that writes the kept indices; the result is the unique set that <see cref="TopKSpec"/> defines, so it equals
/// the GPU's bit for bit. Large calls run in parallel over rows (sequences). No allocation on the serial path except
/// <see cref="GlobalTopK"/>'s per-row forced-set rules (8 bytes per row, from <see cref="ArrayPool{T}"/>); the parallel
/// path also allocates what <see cref="Parallel.For(int, int, Action{int})"/> needs (its closure and tasks).
/// </summary>
public static unsafe class SelectionCpu
{
    /// <summary>Below this many score elements in total a call stays on the calling thread.</summary>
    private const long ParallelThreshold = 1L << 16;

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
        var s = spec;
        fixed (float* pScores = scores)
        fixed (int* pLengths = lengths, pIndices = indices, pCounts = counts)
        {
            var job = new TopKJob(s, pScores, pLengths, pIndices, pCounts);
            if (Environment.ProcessorCount > 1 && spec.ScoreElements >= ParallelThreshold && spec.Rows > 1) TopKParallel(job, spec.Rows);
            else job.Rows(0, spec.Rows);
        }
    }

    private static void TopKParallel(TopKJob job, int rows) => Parallel.For(0, rows, r => job.Rows(r, r + 1));

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
        spec.ValidateLengths(lengths);
        if (spec.Rows == 0) return;
        var s = spec;
        uint[] rules = ArrayPool<uint>.Shared.Rent(2 * spec.Rows);
        try
        {
            fixed (float* pScores = scores)
            fixed (int* pLengths = lengths, pIndices = indices, pCounts = counts)
            fixed (uint* pRules = rules)
            {
                var job = new GlobalJob(s, pScores, pLengths, pIndices, pCounts, pRules);
                bool parallel = Environment.ProcessorCount > 1 && spec.ScoreElements >= ParallelThreshold;
                if (parallel) GlobalParallel(job, spec.Rows, spec.Sequences);
                else
                {
                    job.ForcedRows(0, spec.Rows);
                    job.Sequences(0, spec.Sequences);
                }
            }
        }
        finally
        {
            ArrayPool<uint>.Shared.Return(rules);
        }
    }

    private static void GlobalParallel(GlobalJob job, int rows, int sequences)
    {
        Parallel.For(0, rows, r => job.ForcedRows(r, r + 1));
        Parallel.For(0, sequences, q => job.Sequences(q, q + 1));
    }

    // ---- jobs ------------------------------------------------------------------------------------------------------

    private sealed class TopKJob(TopKSpec spec, float* scores, int* lengths, int* indices, int* counts)
    {
        public void Rows(int first, int end)
        {
            int* hist = stackalloc int[SelectionKeys.Bins];
            bool smallest = spec.Order == SelectionOrder.Smallest;
            int k = spec.K;
            for (int r = first; r < end; r++)
            {
                float* row = scores + (long)r * spec.Columns;
                int length = lengths[r];
                int* output = indices + (long)r * k;
                if (length <= k)
                {
                    for (int j = 0; j < k; j++) output[j] = j < length ? j : -1;
                    counts[r] = length;
                    continue;
                }
                int s = spec.Sinks, rc = spec.Recent, need = k - s - rc;
                for (int j = 0; j < s; j++) output[j] = j;
                for (int j = 0; j < rc; j++) output[s + need + j] = length - rc + j;
                if (need > 0)
                {
                    var list = new RowList(row, s, length - rc, smallest);
                    var rule = SelectionKeys.Select(ref list, need, hist);
                    var emit = new Emit(rule, output + s, 0);
                    list.Visit(ref emit);
                }
                counts[r] = k;
            }
        }
    }

    private sealed class GlobalJob(GlobalTopKSpec spec, float* scores, int* lengths, int* indices, int* counts, uint* rules)
    {
        private readonly bool _smallest = spec.Order == SelectionOrder.Smallest;

        /// <summary>Each row's forced-set rule, as <see cref="TopKSpec"/> with K = ForcedPerRow would keep it: (0, all)
        /// when the row has at most K tokens, else the rule of its middle (row-relative positions).</summary>
        public void ForcedRows(int first, int end)
        {
            int* hist = stackalloc int[SelectionKeys.Bins];
            int k = spec.ForcedPerRow;
            for (int r = first; r < end; r++)
            {
                int length = lengths[r];
                var rule = SelectionKeys.KeepAll;
                if (length > k)
                {
                    int need = k - spec.Sinks - spec.Recent;   // ≥ 0: ForcedPerRow ≥ Sinks + Recent when a row is longer
                    var list = new RowList(scores + (long)r * spec.Columns, spec.Sinks, length - spec.Recent, _smallest);
                    rule = SelectionKeys.Select(ref list, need, hist);
                }
                rules[2 * r] = rule.Key;
                rules[2 * r + 1] = rule.Cutoff;
            }
        }

        public void Sequences(int first, int end)
        {
            int* hist = stackalloc int[SelectionKeys.Bins];
            int heads = spec.Heads, width = spec.Width;
            for (int q = first; q < end; q++)
            {
                int firstRow = q * heads;
                long total = 0;
                for (int h = 0; h < heads; h++) total += lengths[firstRow + h];
                var list = new SequenceList(spec, scores + (long)firstRow * spec.Columns, lengths + firstRow, rules + 2 * firstRow, _smallest);
                var rule = total <= spec.Budget ? SelectionKeys.KeepAll : SelectionKeys.Select(ref list, spec.Budget, hist);
                for (int h = 0; h < heads; h++)
                {
                    int* output = indices + (long)(firstRow + h) * width;
                    var emit = new Emit(rule, output, h * spec.Columns);
                    list.VisitRow(h, ref emit);
                    for (int j = emit.Count; j < width; j++) output[j] = -1;
                    counts[firstRow + h] = emit.Count;
                }
            }
        }
    }

    /// <summary>Writes the kept elements' row-relative indices (position − <c>positionBase</c>) in visit order.</summary>
    private struct Emit(SelectionKeys.Rule rule, int* output, int positionBase) : SelectionKeys.IVisitor
    {
        public int Count;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Visit(uint key, uint position)
        {
            if (rule.Keeps(key, position)) output[Count++] = (int)position - positionBase;
        }
    }

    /// <summary>Elements [begin, end) of one score row; positions are row-relative.</summary>
    private readonly struct RowList(float* row, int begin, int end, bool smallest) : SelectionKeys.IKeyList
    {
        public long Count => end - begin;

        public void Visit<TVisitor>(ref TVisitor visitor) where TVisitor : struct, SelectionKeys.IVisitor
        {
            for (int i = begin; i < end; i++) visitor.Visit(SelectionKeys.OrderKey(row[i], smallest), (uint)i);
        }
    }

    /// <summary>A sequence's rows as one list (row h, token i at position h · Columns + i); forced tokens get the
    /// sentinel key.</summary>
    private readonly struct SequenceList(GlobalTopKSpec spec, float* scores, int* lengths, uint* rules, bool smallest) : SelectionKeys.IKeyList
    {
        public long Count
        {
            get
            {
                long total = 0;
                for (int h = 0; h < spec.Heads; h++) total += lengths[h];
                return total;
            }
        }

        public void Visit<TVisitor>(ref TVisitor visitor) where TVisitor : struct, SelectionKeys.IVisitor
        {
            for (int h = 0; h < spec.Heads; h++) VisitRow(h, ref visitor);
        }

        public void VisitRow<TVisitor>(int h, ref TVisitor visitor) where TVisitor : struct, SelectionKeys.IVisitor
        {
            float* row = scores + (long)h * spec.Columns;
            int length = lengths[h];
            var forced = new SelectionKeys.Rule(rules[2 * h], rules[2 * h + 1]);
            uint basePosition = (uint)(h * spec.Columns);
            int sinks = spec.Sinks, recent = spec.Recent;
            for (int i = 0; i < length; i++)
            {
                uint key = SelectionKeys.OrderKey(row[i], smallest);
                bool isForced = i < sinks || (long)i + recent >= length || forced.Keeps(key, (uint)i);
                visitor.Visit(isForced ? SelectionKeys.Sentinel : key, basePosition + (uint)i);
            }
        }
    }
}
