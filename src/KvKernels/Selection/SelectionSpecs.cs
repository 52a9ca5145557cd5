namespace KvKernels.Selection;

/// <summary>Which end of the score order a selection keeps.</summary>
public enum SelectionOrder
{
    /// <summary>Top-k: the highest scores (eviction by importance: H2O, SnapKV, TOVA …).</summary>
    Largest,

    /// <summary>Bottom-k: the lowest scores (for example KNorm keeps the keys of smallest L2 norm).</summary>
    Smallest,
}

/// <summary>
/// Per-row top-k / bottom-k with protected ranges (primitive P7a): scores <c>[Rows, Columns]</c> fp32, where a row is one
/// (sequence, KV head) pair (Rows = B · Hkv), and lengths <c>[Rows]</c> int32 (row r's tokens are <c>[0, L)</c>,
/// <c>L = lengths[r]</c>; scores past L are never read or chosen). Output: indices <c>[Rows, K]</c> int32 and counts
/// <c>[Rows]</c> int32.
/// <para>The rule, per row. When <c>L ≤ K</c> every token is kept: indices <c>0 … L−1</c>, count L, the other
/// <c>K − L</c> entries −1. Otherwise exactly K tokens are kept (count K): the sinks <c>[0, Sinks)</c>, the recent
/// window <c>[L − Recent, L)</c> (which can also serve as SnapKV's observation window), and the best
/// <c>K − Sinks − Recent</c> tokens of <c>[Sinks, L − Recent)</c>. Indices are written in ascending position order.</para>
/// <para>The order. Best means highest score for <see cref="SelectionOrder.Largest"/>, lowest for
/// <see cref="SelectionOrder.Smallest"/>, compared by value: −0.0 equals +0.0, and equal scores go to the lower index.
/// NaN is worse than every number in both orders (below −∞ for top-k, above +∞ for bottom-k), so a NaN is chosen only
/// when no number is left; NaNs tie with each other (lower index first). The kept set is therefore unique, and the CPU
/// (<see cref="SelectionCpu"/>) and the GPU (<see cref="SelectionKernels"/>) return the same indices, bit for bit.</para>
/// </summary>
/// <param name="Rows">Rows (B · Hkv), ≥ 0.</param>
/// <param name="Columns">Token capacity of a score row (n), ≥ 1; the row stride of the scores.</param>
/// <param name="K">Tokens kept per row, in [1, Columns]; the protected ranges count toward it.</param>
/// <param name="Sinks">Attention sinks kept at the start of every row (StreamingLLM), ≥ 0.</param>
/// <param name="Recent">Most recent tokens kept at the end of every row (window / observation window), ≥ 0.</param>
/// <param name="Order">Keep the largest (top-k) or the smallest (bottom-k) scores.</param>
public readonly record struct TopKSpec(int Rows, int Columns, int K, int Sinks = 0, int Recent = 0, SelectionOrder Order = SelectionOrder.Largest)
{
    /// <summary>Elements of the scores: <c>Rows · Columns</c>.</summary>
    public long ScoreElements => (long)Rows * Columns;

    /// <summary>Elements of the indices output: <c>Rows · K</c>.</summary>
    public long IndexElements => (long)Rows * K;

    /// <summary>Checks the shape and options.</summary>
    /// <exception cref="ArgumentException">Names <c>spec</c> and the offending field.</exception>
    public void Validate()
    {
        if (Rows < 0) throw new ArgumentException($"Rows is {Rows}; expected ≥ 0.", "spec");
        if (Columns < 1) throw new ArgumentException($"Columns is {Columns}; expected ≥ 1.", "spec");
        if (K < 1 || K > Columns) throw new ArgumentException($"K is {K}; expected 1..Columns = {Columns}.", "spec");
        if (Sinks < 0) throw new ArgumentException($"Sinks is {Sinks}; expected ≥ 0.", "spec");
        if (Recent < 0) throw new ArgumentException($"Recent is {Recent}; expected ≥ 0.", "spec");
        if (Order is not (SelectionOrder.Largest or SelectionOrder.Smallest))
            throw new ArgumentException($"Order is {Order}; expected Largest or Smallest.", "spec");
    }

    /// <summary>Checks the spec and the buffer lengths (each at least what the spec needs).</summary>
    /// <param name="scores">Length of the scores.</param>
    /// <param name="lengths">Length of the lengths array (exactly Rows).</param>
    /// <param name="indices">Length of the indices output.</param>
    /// <param name="counts">Length of the counts output.</param>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void ValidateBuffers(long scores, long lengths, long indices, long counts)
    {
        Validate();
        SelectionChecks.AtLeast(scores, ScoreElements, nameof(scores));
        if (lengths != Rows) throw new ArgumentException($"lengths has {lengths} entries; expected Rows = {Rows}.", nameof(lengths));
        SelectionChecks.AtLeast(indices, IndexElements, nameof(indices));
        SelectionChecks.AtLeast(counts, Rows, nameof(counts));
    }

    /// <summary>
    /// Checks every length in [0, Columns] and the protected ranges against the budget: when some row is longer than
    /// K, <c>Sinks + Recent</c> must not exceed K (a row of at most K tokens keeps them all, so it is never a
    /// conflict). Returns the longest row.
    /// </summary>
    /// <exception cref="ArgumentException">Names <c>lengths</c> (a bad entry) or <c>spec</c> (budget below the
    /// protected ranges).</exception>
    public int ValidateLengths(ReadOnlySpan<int> lengths)
    {
        int longest = SelectionChecks.Longest(lengths, Columns, nameof(lengths));
        ValidateProtected(longest);
        return longest;
    }

    /// <summary>The protected-range check for a batch whose longest row has <paramref name="longest"/> tokens.</summary>
    internal void ValidateProtected(int longest)
    {
        if (longest > K && (long)Sinks + Recent > K)
            throw new ArgumentException(
                $"Sinks + Recent = {(long)Sinks + Recent} exceeds K = {K}, and a row has {longest} > K tokens: the protected ranges alone would exceed the budget.",
                "spec");
    }
}

/// <summary>
/// Global top-k across the KV heads of each sequence with a per-head floor (AdaKV's safeguard; primitive P7b): scores
/// <c>[Sequences · Heads, Columns]</c> fp32 (row <c>q · Heads + h</c> is head h of sequence q), lengths
/// <c>[Sequences · Heads]</c> int32; output indices <c>[Sequences · Heads, Width]</c> int32 (<see cref="Width"/> =
/// min(Columns, Budget)) and counts <c>[Sequences · Heads]</c> int32.
/// <para>The rule, per sequence (its rows h = 0 … Heads−1, lengths L_h, the same order and tie rules as
/// <see cref="TopKSpec"/>):</para>
/// <list type="number">
/// <item>The floor F = ⌊Alpha · Budget / Heads⌋ (computed in double precision, <see cref="Floor"/>).</item>
/// <item>Each row's forced set is what <see cref="TopKSpec"/> keeps for that row with K = max(F, Sinks + Recent):
/// its sinks and recent window plus its best tokens up to that many (all L_h tokens when L_h ≤ K).</item>
/// <item>If the rows hold at most Budget tokens together, every token is kept. Otherwise the Budget − Σ|forced|
/// remaining slots go to the best tokens not yet forced, over all the sequence's rows together: ranked by score, then
/// by lower head, then by lower index. Each row then keeps exactly Budget tokens in total.</item>
/// </list>
/// <para>Row r's kept indices are written to <c>indices[r, 0 …)</c> in ascending position order, its count to
/// <c>counts[r]</c>, and −1 to the rest of its Width entries. With Alpha = 0 and no protected ranges this is a plain
/// top-Budget over the union of the heads; with Alpha = 1 every head gets ⌊Budget / Heads⌋ first.</para>
/// </summary>
/// <param name="Sequences">Sequences (B), ≥ 0.</param>
/// <param name="Heads">KV heads per sequence (Hkv), ≥ 1.</param>
/// <param name="Columns">Token capacity of a score row (n), ≥ 1; Heads · Columns must stay below 2³¹.</param>
/// <param name="Budget">Tokens kept per sequence over all its heads (K_total), in [1, Heads · Columns].</param>
/// <param name="Alpha">The floor fraction α in [0, 1] (AdaKV's default 0.2).</param>
/// <param name="Sinks">Sinks protected in every row, ≥ 0.</param>
/// <param name="Recent">Recent tokens protected in every row, ≥ 0.</param>
/// <param name="Order">Keep the largest or the smallest scores.</param>
public readonly record struct GlobalTopKSpec(int Sequences, int Heads, int Columns, int Budget, double Alpha = 0.2, int Sinks = 0, int Recent = 0,
    SelectionOrder Order = SelectionOrder.Largest)
{
    /// <summary>Rows: <c>Sequences · Heads</c>.</summary>
    public int Rows => Sequences * Heads;

    /// <summary>Tokens every head keeps at least (when it has them): ⌊Alpha · Budget / Heads⌋.</summary>
    public int Floor => (int)Math.Floor(Alpha * Budget / Heads);

    /// <summary>The per-row K of the forced sets: max(<see cref="Floor"/>, Sinks + Recent), capped at Columns.</summary>
    public int ForcedPerRow => (int)Math.Min(Columns, Math.Max(Floor, (long)Sinks + Recent));

    /// <summary>Entries per row of the indices output: min(Columns, Budget), the most one row can keep.</summary>
    public int Width => Math.Min(Columns, Budget);

    /// <summary>Elements of the scores: <c>Rows · Columns</c>.</summary>
    public long ScoreElements => (long)Rows * Columns;

    /// <summary>Elements of the indices output: <c>Rows · Width</c>.</summary>
    public long IndexElements => (long)Rows * Width;

    /// <summary>Checks the shape and options.</summary>
    /// <exception cref="ArgumentException">Names <c>spec</c> and the offending field.</exception>
    public void Validate()
    {
        if (Sequences < 0) throw new ArgumentException($"Sequences is {Sequences}; expected ≥ 0.", "spec");
        if (Heads < 1) throw new ArgumentException($"Heads is {Heads}; expected ≥ 1.", "spec");
        if (Columns < 1) throw new ArgumentException($"Columns is {Columns}; expected ≥ 1.", "spec");
        if ((long)Heads * Columns > int.MaxValue)
            throw new ArgumentException($"Heads · Columns = {(long)Heads * Columns} exceeds {int.MaxValue} (positions are 32-bit).", "spec");
        if ((long)Sequences * Heads > int.MaxValue) throw new ArgumentException($"Sequences · Heads = {(long)Sequences * Heads} exceeds {int.MaxValue}.", "spec");
        if (Budget < 1 || Budget > (long)Heads * Columns)
            throw new ArgumentException($"Budget is {Budget}; expected 1..Heads · Columns = {(long)Heads * Columns}.", "spec");
        if (!(Alpha >= 0 && Alpha <= 1)) throw new ArgumentException($"Alpha is {Alpha}; expected a number in [0, 1].", "spec");
        if (Sinks < 0) throw new ArgumentException($"Sinks is {Sinks}; expected ≥ 0.", "spec");
        if (Recent < 0) throw new ArgumentException($"Recent is {Recent}; expected ≥ 0.", "spec");
        if (Order is not (SelectionOrder.Largest or SelectionOrder.Smallest))
            throw new ArgumentException($"Order is {Order}; expected Largest or Smallest.", "spec");
    }

    /// <summary>Checks the spec and the buffer lengths (each at least what the spec needs).</summary>
    /// <param name="scores">Length of the scores.</param>
    /// <param name="lengths">Length of the lengths array (exactly Rows).</param>
    /// <param name="indices">Length of the indices output.</param>
    /// <param name="counts">Length of the counts output.</param>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void ValidateBuffers(long scores, long lengths, long indices, long counts)
    {
        Validate();
        SelectionChecks.AtLeast(scores, ScoreElements, nameof(scores));
        if (lengths != Rows) throw new ArgumentException($"lengths has {lengths} entries; expected Sequences · Heads = {Rows}.", nameof(lengths));
        SelectionChecks.AtLeast(indices, IndexElements, nameof(indices));
        SelectionChecks.AtLeast(counts, Rows, nameof(counts));
    }

    /// <summary>
    /// Checks every length in [0, Columns] and that the forced sets fit the budget. The check uses the longest row of
    /// the whole batch, so that the CPU and the GPU (which knows only that) accept the same inputs: it fails when
    /// <c>Heads · min(longest, ForcedPerRow) &gt; Budget</c>, which can only happen when Sinks + Recent exceeds the
    /// floor. Returns the longest row.
    /// </summary>
    /// <exception cref="ArgumentException">Names <c>lengths</c> (a bad entry) or <c>spec</c> (budget below the
    /// protected ranges).</exception>
    public int ValidateLengths(ReadOnlySpan<int> lengths)
    {
        int longest = SelectionChecks.Longest(lengths, Columns, nameof(lengths));
        ValidateProtected(longest);
        return longest;
    }

    /// <summary>The forced-set check for a batch whose longest row has <paramref name="longest"/> tokens.</summary>
    internal void ValidateProtected(int longest)
    {
        long forced = (long)Heads * Math.Min(longest, ForcedPerRow);
        if (forced > Budget)
            throw new ArgumentException(
                $"Heads · min(longest row {longest}, max(floor {Floor}, Sinks + Recent = {(long)Sinks + Recent})) = {forced} exceeds Budget = {Budget}: the protected ranges alone would exceed the budget.",
                "spec");
    }
}

internal static class SelectionChecks
{
    public static void AtLeast(long actual, long expected, string paramName)
    {
        if (actual < expected) throw new ArgumentException($"{paramName} has {actual} elements; expected at least {expected}.", paramName);
    }

    /// <summary>Every length in [0, columns]; returns the longest (0 when empty).</summary>
    public static int Longest(ReadOnlySpan<int> lengths, int columns, string paramName)
    {
        int longest = 0;
        for (int r = 0; r < lengths.Length; r++)
        {
            if ((uint)lengths[r] > (uint)columns)
                throw new ArgumentException($"{paramName}[{r}] is {lengths[r]}; expected 0..Columns = {columns}.", paramName);
            longest = Math.Max(longest, lengths[r]);
        }
        return longest;
    }
}
