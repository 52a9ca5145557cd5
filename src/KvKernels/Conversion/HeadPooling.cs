using System.Numerics;

namespace KvKernels.Conversion;

/// <summary>
/// MHA → GQA/MQA by pooling the key and value projection heads within each group (GQA, Ainslie et al. 2023, §3.1: the
/// group's head is the mean of its heads; WGQA: a weighted sum with given per-head, or per-head-per-channel, weights).
/// Groups are contiguous, heads <c>[G·g, (G+1)·g)</c> with g = heads / groups, so query head h still reads group
/// <c>h / (Hq / groups)</c>, the standard GQA mapping; queries and the output projection are unchanged.
/// </summary>
public static class HeadPooling
{
    /// <summary>
    /// Pools the rows of a per-head weight <paramref name="weight"/> <c>[heads·rowsPerHead, columns]</c> (an
    /// <c>nn.Linear</c> weight <c>[out, in]</c>, or a bias with one column) into <paramref name="destination"/>
    /// <c>[groups·rowsPerHead, columns]</c>: <c>dest[G, r, :] = Σ_{h∈G} w_h(r) · W[h, r, :]</c>.
    /// </summary>
    /// <param name="weight">Source rows, row-major.</param>
    /// <param name="heads">Heads in <paramref name="weight"/>.</param>
    /// <param name="rowsPerHead">Rows per head (the head dim).</param>
    /// <param name="groups">Heads after pooling: a divisor of <paramref name="heads"/> (1 = MQA, heads = identity).</param>
    /// <param name="headWeights">Empty: the mean (sum in fp32, then divided by g, so integer-valued inputs pool
    /// exactly); <c>[heads]</c>: one weight per head; <c>[heads·rowsPerHead]</c>: one weight per head and row (WGQA's
    /// vector variant). Weights are used as given (not normalised).</param>
    /// <param name="destination">Pooled rows.</param>
    /// <exception cref="ArgumentException">A size that does not fit (the parameter is named).</exception>
    public static void Pool(ReadOnlySpan<float> weight, int heads, int rowsPerHead, int groups, ReadOnlySpan<float> headWeights, Span<float> destination)
    {
        CheckGroups(heads, groups);
        if (rowsPerHead < 1) throw new ArgumentException($"rowsPerHead is {rowsPerHead}; expected ≥ 1.", nameof(rowsPerHead));
        long rows = (long)heads * rowsPerHead;
        if (weight.Length % rows != 0 || weight.Length == 0)
            throw new ArgumentException($"weight has {weight.Length} elements; expected heads·rowsPerHead = {rows} rows of equal length.", nameof(weight));
        int columns = (int)(weight.Length / rows);
        if (destination.Length != (long)groups * rowsPerHead * columns)
            throw new ArgumentException($"destination has {destination.Length} elements; expected groups·rowsPerHead·columns = {(long)groups * rowsPerHead * columns}.", nameof(destination));
        if (headWeights.Length != 0 && headWeights.Length != heads && headWeights.Length != rows)
            throw new ArgumentException($"headWeights has {headWeights.Length} elements; expected 0 (mean), {heads} (one per head) or {rows} (one per head and row).", nameof(headWeights));
        for (int i = 0; i < headWeights.Length; i++)
            if (!float.IsFinite(headWeights[i])) throw new ArgumentException($"headWeights[{i}] is {headWeights[i]}; expected a finite weight.", nameof(headWeights));

        int g = heads / groups;
        for (int group = 0; group < groups; group++)
            for (int r = 0; r < rowsPerHead; r++)
            {
                var target = destination.Slice((group * rowsPerHead + r) * columns, columns);
                target.Clear();
                for (int k = 0; k < g; k++)
                {
                    int h = group * g + k;
                    var source = weight.Slice((h * rowsPerHead + r) * columns, columns);
                    float w = headWeights.Length == 0 ? 1f : headWeights.Length == heads ? headWeights[h] : headWeights[h * rowsPerHead + r];
                    MultiplyAdd(source, w, target);
                }
                if (headWeights.Length == 0) Scale(target, g);
            }
    }

    /// <summary>Checks that <paramref name="groups"/> divides <paramref name="heads"/>.</summary>
    /// <exception cref="ArgumentException">It does not (the message lists the divisors).</exception>
    public static void CheckGroups(int heads, int groups)
    {
        if (heads < 1) throw new ArgumentException($"heads is {heads}; expected ≥ 1.", nameof(heads));
        if (groups < 1 || groups > heads || heads % groups != 0)
            throw new ArgumentException($"groups is {groups}; expected a divisor of the {heads} KV heads ({string.Join(", ", Divisors(heads))}).", nameof(groups));
    }

    internal static IEnumerable<int> Divisors(int n) => Enumerable.Range(1, n).Where(d => n % d == 0);

    // target += w · source, vectorised; w = 1 exactly for the mean, so the sum is plain fp32 addition in head order.
    private static void MultiplyAdd(ReadOnlySpan<float> source, float w, Span<float> target)
    {
        int i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var wv = new Vector<float>(w);
            for (; i + Vector<float>.Count <= source.Length; i += Vector<float>.Count)
                (new Vector<float>(target.Slice(i)) + wv * new Vector<float>(source.Slice(i))).CopyTo(target.Slice(i));
        }
        for (; i < source.Length; i++) target[i] += w * source[i];
    }

    private static void Scale(Span<float> target, int divisor)
    {
        float d = divisor;
        for (int i = 0; i < target.Length; i++) target[i] /= d;
    }
}
