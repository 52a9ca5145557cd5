namespace KvKernels.Attention;

/// <summary>
/// Merging two attention states over disjoint key sets (cascade attention, split-KV, caches stored in several
/// formats): <c>(o_a, lse_a)</c> and <c>(o_b, lse_b)</c>, outputs <c>[Rows, HeadDim]</c> and natural-log LSEs
/// <c>[Rows]</c>, give <c>lse = ln(e^lse_a + e^lse_b)</c> and <c>o = (e^(lse_a − lse)·o_a + e^(lse_b − lse)·o_b)</c>.
/// A state with <c>lse = −∞</c> is empty and weighs nothing; two empty states merge to zeros and −∞. The merge is
/// associative and commutative up to rounding.
/// </summary>
/// <param name="Rows">Rows (for example tokens × query heads), ≥ 0.</param>
/// <param name="HeadDim">Columns of each output row, 1–1024.</param>
public readonly record struct MergeStatesSpec(int Rows, int HeadDim)
{
    /// <summary>Largest head dim.</summary>
    public const int MaxHeadDim = 1024;

    /// <summary>Elements of one output tensor.</summary>
    public long Elements => (long)Rows * HeadDim;

    /// <summary>Checks the spec, the element type (fp16, bf16 or fp32) and every buffer length.</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void Validate<T>(long outputA, long lseA, long outputB, long lseB, long output, long lse) where T : unmanaged
    {
        if (Rows < 0) throw new ArgumentException($"Rows is {Rows}; expected ≥ 0.", "spec");
        if (HeadDim is < 1 or > MaxHeadDim) throw new ArgumentException($"HeadDim is {HeadDim}; expected 1..{MaxHeadDim}.", "spec");
        if (DecodeAttentionSpec.ElementOf<T>() is null)
            throw new ArgumentException($"Element type {typeof(T).Name} is not supported; expected Half, BFloat16 or float.", nameof(output));
        Exactly(outputA, Elements, nameof(outputA));
        Exactly(lseA, Rows, nameof(lseA));
        Exactly(outputB, Elements, nameof(outputB));
        Exactly(lseB, Rows, nameof(lseB));
        Exactly(output, Elements, nameof(output));
        Exactly(lse, Rows, nameof(lse));
    }

    private static void Exactly(long actual, long expected, string paramName)
    {
        if (actual != expected) throw new ArgumentException($"{paramName} has {actual} elements; expected {expected}.", paramName);
    }
}
