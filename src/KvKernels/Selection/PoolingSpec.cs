namespace KvKernels.Selection;

/// <summary>The pooling of <see cref="PoolingSpec"/>.</summary>
public enum PoolingKind
{
    /// <summary>Average with zero padding counted in the divisor (always ÷ k): <c>torch.nn.functional.avg_pool1d(x, k,
    /// stride=1, padding=k//2, count_include_pad=True)</c>, SnapKV's default.</summary>
    Average,

    /// <summary>Maximum with −∞ padding: <c>max_pool1d(x, k, stride=1, padding=k//2)</c>.</summary>
    Max,
}

/// <summary>
/// 1-D pooling along tokens (primitive P5) of fp32 rows <c>[Rows, Length]</c> into <c>[Rows, Length]</c>, stride 1,
/// odd kernel size k, window centred on the token: output j reads inputs j − k/2 … j + k/2.
/// <para>
/// Each row has a length (all <see cref="Length"/> when no lengths are given; else <c>lengths[r / RowsPerLength]</c>, so
/// <c>[B, Hkv, L]</c> scores can share the per-sequence lengths <c>[B]</c> with <see cref="RowsPerLength"/> = Hkv).
/// Positions at or past a row's length are padding: they count as 0 (average) or −∞ (max) inside windows, and their own
/// outputs are written 0.
/// </para>
/// <para>
/// The result is bit-identical on the GPU and the CPU: the average adds the inputs of the window that lie inside the row
/// in ascending position, starting from +0, then divides by k (IEEE); the maximum starts at −∞ and, in ascending
/// position, takes an input when it is greater than the current value (so NaN inputs are skipped).
/// </para>
/// </summary>
/// <param name="Rows">Rows (≥ 0).</param>
/// <param name="Length">Entries per row, L (≥ 0).</param>
/// <param name="KernelSize">Odd, 1 … <see cref="MaxKernelSize"/>.</param>
/// <param name="Kind">Average or max.</param>
public readonly record struct PoolingSpec(int Rows, int Length, int KernelSize, PoolingKind Kind = PoolingKind.Average)
{
    /// <summary>Largest kernel size.</summary>
    public const int MaxKernelSize = 255;

    /// <summary>Consecutive rows that share one entry of the lengths (0 means 1).</summary>
    public int RowsPerLength { get; init; }

    /// <summary><see cref="RowsPerLength"/> with 0 resolved to 1.</summary>
    public int EffectiveRowsPerLength => RowsPerLength == 0 ? 1 : RowsPerLength;

    /// <summary>Entries of the input and of the output: <c>Rows · Length</c>.</summary>
    public long Elements => (long)Rows * Length;

    /// <summary>Entries of the lengths when given: <c>Rows / RowsPerLength</c>.</summary>
    public int LengthCount => Rows / EffectiveRowsPerLength;

    /// <summary>Checks the spec and the buffer lengths; <paramref name="lengths"/> is 0 when every row is full.</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void Validate(long input, long output, int lengths)
    {
        const string p = "spec";
        if (Rows < 0) throw new ArgumentException($"Rows is {Rows}; expected ≥ 0.", p);
        if (Length < 0) throw new ArgumentException($"Length is {Length}; expected ≥ 0.", p);
        if (KernelSize < 1 || KernelSize > MaxKernelSize || KernelSize % 2 == 0)
            throw new ArgumentException($"KernelSize is {KernelSize}; expected an odd size in 1..{MaxKernelSize} (the window is centred on the token).", p);
        if (Kind is not (PoolingKind.Average or PoolingKind.Max)) throw new ArgumentException($"Kind is {Kind}; expected Average or Max.", p);
        if (RowsPerLength < 0) throw new ArgumentException($"RowsPerLength is {RowsPerLength}; expected ≥ 0 (0 means 1).", p);
        if (Rows % EffectiveRowsPerLength != 0)
            throw new ArgumentException($"Rows is {Rows}; expected a multiple of RowsPerLength = {EffectiveRowsPerLength}.", p);
        if (Elements > int.MaxValue) throw new ArgumentException($"Rows · Length = {Elements}; at most 2^31 − 1 entries are supported.", p);
        ScoreChecks.Exactly(input, Elements, nameof(input));
        ScoreChecks.Exactly(output, Elements, nameof(output));
        if (lengths != 0) ScoreChecks.Exactly(lengths, LengthCount, nameof(lengths));
    }

    /// <summary>Checks every length in [0, Length].</summary>
    /// <exception cref="ArgumentException">Names the entry.</exception>
    public void ValidateLengths(ReadOnlySpan<int> lengths)
    {
        for (int i = 0; i < lengths.Length; i++)
            if ((uint)lengths[i] > (uint)Length)
                throw new ArgumentException($"lengths[{i}] is {lengths[i]}; expected 0..Length = {Length}.", nameof(lengths));
    }
}
