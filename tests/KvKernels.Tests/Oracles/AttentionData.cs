using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Tests.Oracles;

/// <summary>Conversions between the attention element types and double, for building inputs and comparing outputs.</summary>
public static class AttentionElements
{
    /// <summary>The value of an fp16, bf16 or fp32 element.</summary>
    public static double ToDouble<T>(T value) where T : unmanaged =>
        value switch
        {
            Half h => (double)h,
            BFloat16 b => (float)b,
            float f => f,
            _ => throw new NotSupportedException(typeof(T).Name),
        };

    /// <summary>Rounds <paramref name="value"/> to <typeparamref name="T"/> (round to nearest even).</summary>
    public static T FromFloat<T>(float value) where T : unmanaged
    {
        if (typeof(T) == typeof(Half)) return (T)(object)(Half)value;
        if (typeof(T) == typeof(BFloat16)) return (T)(object)(BFloat16)value;
        if (typeof(T) == typeof(float)) return (T)(object)value;
        throw new NotSupportedException(typeof(T).Name);
    }

    /// <summary>Every element widened to double.</summary>
    public static double[] ToDoubles<T>(ReadOnlySpan<T> values) where T : unmanaged
    {
        var result = new double[values.Length];
        for (int i = 0; i < values.Length; i++) result[i] = ToDouble(values[i]);
        return result;
    }

    /// <summary>An array of <paramref name="length"/> NaNs of <typeparamref name="T"/> (poison for outputs).</summary>
    public static T[] Poisoned<T>(long length) where T : unmanaged
    {
        var array = new T[length];
        array.AsSpan().Fill(FromFloat<T>(float.NaN));
        return array;
    }

    /// <summary>‖actual − expected‖₂ / ‖expected‖₂ (absolute when the reference is all zeros); NaN if any element is
    /// NaN, or if infinities do not match.</summary>
    public static double RelativeError<T>(ReadOnlySpan<T> actual, ReadOnlySpan<double> expected) where T : unmanaged
    {
        if (actual.Length != expected.Length) return double.NaN;
        double num = 0, den = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            double a = ToDouble(actual[i]), e = expected[i];
            if (double.IsNaN(a) || double.IsNaN(e)) return double.NaN;
            if (double.IsInfinity(e) || double.IsInfinity(a))
            {
                if (a != e) return double.NaN;
                continue;
            }
            num += (a - e) * (a - e);
            den += e * e;
        }
        return den == 0 ? Math.Sqrt(num) : Math.Sqrt(num / den);
    }
}

/// <summary>
/// One random decode-attention problem for a spec: query, K/V storage (paged or contiguous), lengths, block table,
/// positions and ALiBi slopes, built the way an engine's cache looks. Slots that no row uses are filled with NaN, so a
/// kernel that reads past a length (or multiplies a masked V by 0) poisons its output. Keys carry a few outlier
/// channels (×8), as real models' keys do.
/// </summary>
/// <typeparam name="T">fp16 (<see cref="Half"/>) or bf16 (<see cref="BFloat16"/>).</typeparam>
public sealed class AttentionData<T> where T : unmanaged
{
    private AttentionData(DecodeAttentionSpec spec) => Spec = spec;

    /// <summary>The problem's spec.</summary>
    public DecodeAttentionSpec Spec { get; }

    /// <summary><c>[B, q_len, Hq, Dk]</c>.</summary>
    public T[] Query { get; private init; } = [];

    /// <summary>Key storage.</summary>
    public T[] Keys { get; private init; } = [];

    /// <summary>Value storage; empty with key reuse.</summary>
    public T[] Values { get; private init; } = [];

    /// <summary><c>[rows]</c>.</summary>
    public int[] Lengths { get; private init; } = [];

    /// <summary><c>[rows, MaxPagesPerSequence]</c>, unused entries −1; empty for contiguous storage.</summary>
    public int[] BlockTable { get; private init; } = [];

    /// <summary><c>[rows, MaxTokens]</c> when the spec reads explicit positions, else empty.</summary>
    public int[] Positions { get; private init; } = [];

    /// <summary><c>[Hq]</c> ALiBi slopes when the spec uses them, else empty.</summary>
    public float[] AlibiSlopes { get; private init; } = [];

    /// <summary>
    /// Builds a problem. <paramref name="lengths"/> gives each row's length (<see cref="DecodeAttentionSpec.Rows"/>
    /// entries); null draws lengths in [0, MaxTokens]. Paged storage gives each row distinct random pages (the pool
    /// must have enough); <paramref name="sharePages"/> instead lets every row read the pages of row 0 (prefix
    /// sharing), which needs equal lengths.
    /// </summary>
    public static AttentionData<T> Create(DecodeAttentionSpec spec, Random random, int[]? lengths = null, bool sharePages = false)
    {
        spec.Validate();
        int rows = spec.Rows;
        lengths ??= Enumerable.Range(0, rows).Select(_ => random.Next(spec.Cache.MaxTokens + 1)).ToArray();
        if (lengths.Length != rows) throw new ArgumentException($"lengths has {lengths.Length} entries; the spec has {rows} rows.", nameof(lengths));

        var query = new T[spec.QueryElements];
        for (long i = 0; i < query.Length; i++) query[i] = AttentionElements.FromFloat<T>(Normal(random));

        int[] table = [];
        if (spec.Cache.IsPaged)
        {
            var c = spec.Cache;
            table = new int[(long)rows * c.MaxPagesPerSequence];
            table.AsSpan().Fill(-1);
            var pages = Enumerable.Range(0, c.NumPages).ToArray();
            random.Shuffle(pages);
            int next = 0;
            for (int r = 0; r < rows; r++)
            {
                int needed = (lengths[r] + c.PageSize - 1) / c.PageSize;
                for (int p = 0; p < needed; p++)
                {
                    if (sharePages && r > 0)
                    {
                        table[(long)r * c.MaxPagesPerSequence + p] = table[p];
                        continue;
                    }
                    if (next == pages.Length)
                        throw new InvalidOperationException($"The pool has {c.NumPages} pages; the lengths need more.");
                    table[(long)r * c.MaxPagesPerSequence + p] = pages[next++];
                }
            }
        }

        // Storage: NaN everywhere, then every slot a row uses gets a value (keys with outlier channels).
        var keys = AttentionElements.Poisoned<T>(spec.KeyElements);
        var values = spec.KeyReuse ? [] : AttentionElements.Poisoned<T>(spec.ValueElements);
        var outliers = new HashSet<int>(Enumerable.Range(0, 3).Select(_ => random.Next(spec.HeadDim)));
        for (int r = 0; r < rows; r++)
        {
            int firstHead = spec.Ragged ? (spec.PoolKvHeads == 1 ? 0 : r % spec.NumKvHeads) : 0;
            int headCount = spec.Ragged ? 1 : spec.PoolKvHeads;
            for (int n = 0; n < lengths[r]; n++)
            {
                int page = spec.Cache.IsPaged ? table[(long)r * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize] : 0;
                for (int head = firstHead; head < firstHead + headCount; head++)
                {
                    long k = spec.StorageOffset(r, n, page, head, spec.HeadDim);
                    for (int d = 0; d < spec.HeadDim; d++)
                        keys[k + d] = AttentionElements.FromFloat<T>(Normal(random) * (outliers.Contains(d) ? 8f : 1f));
                    if (spec.KeyReuse) continue;
                    long v = spec.StorageOffset(r, n, page, head, spec.ValueDim);
                    for (int d = 0; d < spec.ValueDim; d++) values[v + d] = AttentionElements.FromFloat<T>(Normal(random));
                }
            }
        }

        int[] positions = [];
        if (spec.PositionElements > 0)
        {
            // Positions as a ring buffer or a compacted cache has them: increasing with gaps, offset per row.
            positions = new int[spec.PositionElements];
            for (int r = 0; r < rows; r++)
            {
                int position = random.Next(4096);
                for (int n = 0; n < spec.Cache.MaxTokens; n++)
                {
                    positions[(long)r * spec.Cache.MaxTokens + n] = position;
                    position += 1 + random.Next(3);
                }
            }
        }

        float[] slopes = [];
        if (spec.Alibi)
        {
            // The ALiBi paper's geometric slopes 2^(−8(h+1)/Hq).
            slopes = new float[spec.NumQueryHeads];
            for (int h = 0; h < slopes.Length; h++) slopes[h] = MathF.Pow(2f, -8f * (h + 1) / spec.NumQueryHeads);
        }

        return new AttentionData<T>(spec)
        {
            Query = query, Keys = keys, Values = values, Lengths = lengths, BlockTable = table, Positions = positions, AlibiSlopes = slopes,
        };
    }

    /// <summary>The oracle's output <c>[B, q_len, Hq, OutputDim]</c> and LSE <c>[B, q_len, Hq]</c>.</summary>
    public (double[] Output, double[] Lse) Expected()
    {
        var output = new double[Spec.OutputElements];
        var lse = new double[Spec.LseElements];
        AttentionOracle.Decode(Spec, AttentionElements.ToDoubles<T>(Query), AttentionElements.ToDoubles<T>(Keys),
            Spec.KeyReuse ? null : AttentionElements.ToDoubles<T>(Values), Lengths, Spec.Cache.IsPaged ? BlockTable : null,
            Positions.Length > 0 ? Positions : null, Spec.Alibi ? AlibiSlopes : null, output, lse);
        return (output, lse);
    }

    /// <summary>A standard normal sample (Box–Muller).</summary>
    private static float Normal(Random random)
    {
        double u = 1.0 - random.NextDouble(), v = random.NextDouble();
        return (float)(Math.Sqrt(-2.0 * Math.Log(u)) * Math.Cos(2 * Math.PI * v));
    }
}
