using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Selection;

namespace KvKernels.Tests.Oracles;

/// <summary>
/// Scalar float64 oracles of the token-scoring primitives (norms, pooling, observation-window scores), written for
/// clarity from the definitions in research/kv_algorithms.md §2.3–2.5: every address is computed from the layout's
/// definition, every sum in double in the obvious order. Shared with KvCheck (linked source), so keep it free of test
/// framework types.
/// </summary>
public static class ScoreOracle
{
    /// <summary>‖x‖₂ or ‖x‖₁ of <paramref name="row"/>, in double.</summary>
    public static double Norm(ReadOnlySpan<double> row, VectorNorm norm)
    {
        double sum = 0;
        foreach (double x in row) sum += norm == VectorNorm.L2 ? x * x : Math.Abs(x);
        return norm == VectorNorm.L2 ? Math.Sqrt(sum) : sum;
    }

    /// <summary>Element offset of row (sequence <paramref name="b"/>, token <paramref name="n"/>, head <paramref name="h"/>)
    /// in a cache of <paramref name="cache"/>'s storage: paged through the block table, or contiguous.</summary>
    public static long RowOffset(in KvCacheShape cache, int heads, int dim, int[]? blockTable, int b, int n, int h)
    {
        bool hnd = cache.Layout == KvLayout.Hnd;
        if (cache.IsPaged)
        {
            long page = blockTable![b * cache.MaxPagesPerSequence + n / cache.PageSize];
            int offset = n % cache.PageSize;
            return hnd ? ((page * heads + h) * cache.PageSize + offset) * dim : ((page * cache.PageSize + offset) * heads + h) * dim;
        }
        return hnd ? (((long)b * heads + h) * cache.MaxTokens + n) * dim : (((long)b * cache.MaxTokens + n) * heads + h) * dim;
    }

    /// <summary>Append norms: output[slots[t]·Hkv + h] = norm of token t's row h (read at t·stride + h·D); −1 skips.</summary>
    public static void AppendNorms(int heads, int dim, double[] source, long stride, int[] slots, VectorNorm norm, double[] output)
    {
        for (int t = 0; t < slots.Length; t++)
        {
            if (slots[t] < 0) continue;
            for (int h = 0; h < heads; h++)
                output[(long)slots[t] * heads + h] = Norm(source.AsSpan((int)(t * stride + (long)h * dim), dim), norm);
        }
    }

    /// <summary>Cache norms <c>[rows, heads, maxTokens]</c>: the norm of each cached row, 0 past each length.</summary>
    public static void CacheNorms(in KvCacheShape cache, int heads, int dim, double[] storage, int[] lengths, int[]? blockTable,
        VectorNorm norm, double[] output)
    {
        for (int b = 0; b < lengths.Length; b++)
            for (int h = 0; h < heads; h++)
                for (int n = 0; n < cache.MaxTokens; n++)
                    output[((long)b * heads + h) * cache.MaxTokens + n] = n < lengths[b]
                        ? Norm(storage.AsSpan((int)RowOffset(cache, heads, dim, blockTable, b, n, h), dim), norm)
                        : 0;
    }

    /// <summary>
    /// Pooling of rows <c>[rows, length]</c>: output j (&lt; the row's length) is the average over positions j − k/2 … j + k/2
    /// with out-of-row positions counted as 0 and the divisor always k, or the maximum over the in-row positions; 0 past
    /// the length. <paramref name="lengths"/> null means full rows; else row r has <c>lengths[r / rowsPerLength]</c>.
    /// </summary>
    public static void Pool(int rows, int length, int kernelSize, PoolingKind kind, double[] input, int[]? lengths, int rowsPerLength,
        double[] output)
    {
        int half = kernelSize / 2;
        for (int r = 0; r < rows; r++)
        {
            int len = lengths is null ? length : lengths[r / rowsPerLength];
            for (int j = 0; j < length; j++)
            {
                double result = 0;
                if (j < len)
                {
                    double sum = 0, max = double.NegativeInfinity;
                    for (int t = j - half; t <= j + half; t++)
                    {
                        double x = t >= 0 && t < len ? input[(long)r * length + t] : 0;   // zero padding
                        sum += x;
                        if (t >= 0 && t < len) max = Math.Max(max, x);                   // −∞ padding
                    }
                    result = kind == PoolingKind.Max ? max : sum / kernelSize;
                }
                output[(long)r * length + j] = result;
            }
        }
    }

    /// <summary>
    /// Observation-window scores <c>[B, OutputHeads, MaxTokens]</c>: for each sequence and query head, each present window
    /// query's softmax (double) over the keys it sees, then per key the window reduction and the group reduction.
    /// </summary>
    public static void WindowScores(in WindowScoreSpec spec, double[] query, double[] keys, int[] lengths, int[]? blockTable, double[] output)
    {
        int w = spec.WindowSize, hq = spec.NumQueryHeads, hkv = spec.NumKvHeads, d = spec.HeadDim, g = hq / hkv;
        int maxTokens = spec.Cache.MaxTokens;
        double scale = spec.Scale == 0 ? 1.0 / Math.Sqrt(d) : spec.Scale;
        Array.Clear(output);
        for (int b = 0; b < spec.BatchSize; b++)
        {
            int len = lengths[b];
            for (int kvh = 0; kvh < hkv; kvh++)
            {
                var group = new double[maxTokens];
                for (int j = 0; j < g; j++)
                {
                    int h = kvh * g + j;
                    var head = new double[maxTokens];
                    for (int i = 0; i < w; i++)
                    {
                        int position = len - w + i;
                        if (position < 0) continue;   // absent query
                        int last = spec.Causal ? position : len - 1;
                        var logits = new double[last + 1];
                        for (int n = 0; n <= last; n++)
                        {
                            long k = RowOffset(spec.Cache, hkv, d, blockTable, b, n, kvh);
                            long q = (((long)b * w + i) * hq + h) * d;
                            double dot = 0;
                            for (int c = 0; c < d; c++) dot += query[q + c] * keys[k + c];
                            logits[n] = dot * scale;
                        }
                        double max = logits.Max(), total = logits.Sum(s => Math.Exp(s - max));
                        for (int n = 0; n <= last; n++)
                        {
                            double p = Math.Exp(logits[n] - max) / total;
                            head[n] = spec.WindowReduction == ScoreReduction.Max ? Math.Max(head[n], p) : head[n] + p;
                        }
                    }
                    if (spec.WindowReduction == ScoreReduction.Mean)
                        for (int n = 0; n < maxTokens; n++) head[n] /= w;
                    if (spec.GroupReduction == ScoreReduction.None)
                    {
                        head.CopyTo(output, ((long)b * hq + h) * maxTokens);
                        continue;
                    }
                    for (int n = 0; n < maxTokens; n++)
                        group[n] = spec.GroupReduction == ScoreReduction.Max ? Math.Max(group[n], head[n]) : group[n] + head[n];
                }
                if (spec.GroupReduction == ScoreReduction.None) continue;
                if (spec.GroupReduction == ScoreReduction.Mean)
                    for (int n = 0; n < maxTokens; n++) group[n] /= g;
                group.CopyTo(output, ((long)b * hkv + kvh) * maxTokens);
            }
        }
    }
}
