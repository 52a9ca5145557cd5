using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Tests.Oracles;

/// <summary>
/// The float64 scalar oracle of decode attention and of merging attention states, written for clarity from the
/// definitions in <see cref="DecodeAttentionSpec"/>: one query row at a time, a full two-pass softmax, every index
/// computed from the layout's definition. Inputs are the stored values widened to double (exact for fp16/bf16).
/// Shared with KvCheck (linked source): no test framework here.
/// </summary>
public static class AttentionOracle
{
    /// <summary>Decode attention. <paramref name="output"/> is <c>[B, q_len, Hq, OutputDim]</c>, <paramref name="lse"/>
    /// <c>[B, q_len, Hq]</c> (natural log, −∞ for a query that sees nothing).</summary>
    public static void Decode(in DecodeAttentionSpec spec, double[] query, double[] keys, double[]? values, int[] lengths, int[]? blockTable,
        int[]? positions, float[]? alibiSlopes, double[] output, double[] lse)
    {
        int dk = spec.HeadDim, dOut = spec.OutputDim, group = spec.GroupSize;
        double scale = spec.EffectiveScale;
        var logits = new double[Math.Max(spec.Cache.MaxTokens, 1)];
        var key = new double[dk];

        for (int b = 0; b < spec.BatchSize; b++)
            for (int i = 0; i < spec.QueryLength; i++)
                for (int h = 0; h < spec.NumQueryHeads; h++)
                {
                    int kvh = h / group;
                    int row = spec.Ragged ? b * spec.NumKvHeads + kvh : b;
                    int storageHead = spec.PoolKvHeads == 1 ? 0 : kvh;
                    int length = lengths[row];
                    int qi = length - spec.QueryLength + i;
                    long qBase = (((long)b * spec.QueryLength + i) * spec.NumQueryHeads + h) * dk;
                    long oBase = (((long)b * spec.QueryLength + i) * spec.NumQueryHeads + h) * dOut;
                    long lseIndex = ((long)b * spec.QueryLength + i) * spec.NumQueryHeads + h;

                    double max = double.NegativeInfinity;
                    for (int n = 0; n < length; n++)
                    {
                        logits[n] = double.NegativeInfinity;
                        if (!Visible(spec, qi, n)) continue;
                        LoadKey(spec, keys, blockTable, positions, row, n, storageHead, rotate: true, key);
                        double dot = 0;
                        for (int d = 0; d < dk; d++) dot += query[qBase + d] * key[d];
                        double s = scale * dot;
                        if (spec.SoftCap > 0) s = spec.SoftCap * Math.Tanh(s / spec.SoftCap);
                        if (spec.Alibi) s -= alibiSlopes![h] * (double)(qi - n);
                        logits[n] = s;
                        max = Math.Max(max, s);
                    }

                    if (double.IsNegativeInfinity(max))
                    {
                        for (int d = 0; d < dOut; d++) output[oBase + d] = 0;
                        lse[lseIndex] = double.NegativeInfinity;
                        continue;
                    }

                    double sum = 0;
                    for (int n = 0; n < length; n++)
                        if (!double.IsNegativeInfinity(logits[n])) sum += Math.Exp(logits[n] - max);
                    for (int d = 0; d < dOut; d++) output[oBase + d] = 0;
                    var value = new double[spec.KeyReuse ? dk : dOut];   // key reuse: the first dOut columns of the key
                    for (int n = 0; n < length; n++)
                    {
                        if (double.IsNegativeInfinity(logits[n])) continue;
                        double p = Math.Exp(logits[n] - max) / sum;
                        if (spec.KeyReuse) LoadKey(spec, keys, blockTable, positions, row, n, storageHead, rotate: false, value);
                        else LoadRow(spec, values!, blockTable, row, n, storageHead, spec.ValueDim, value);
                        for (int d = 0; d < dOut; d++) output[oBase + d] += p * value[d];
                    }
                    lse[lseIndex] = max + Math.Log(sum);
                }
    }

    /// <summary>Whether a query at logical index <paramref name="qi"/> sees key <paramref name="n"/>.</summary>
    public static bool Visible(in DecodeAttentionSpec spec, int qi, int n)
    {
        if (n > qi || n < 0) return false;
        if (spec.Window == 0) return true;
        return n < spec.Sinks || n > qi - spec.Window;
    }

    /// <summary>The fp32 inverse frequency of rotary pair <paramref name="pair"/>, as the spec defines it.</summary>
    public static float InverseFrequency(in DecodeAttentionSpec spec, int pair) =>
        (float)Math.Pow(spec.Rope.Theta, -2.0 * pair / spec.RotaryDim);

    private static void LoadKey(in DecodeAttentionSpec spec, double[] keys, int[]? blockTable, int[]? positions, int row, int n, int head,
        bool rotate, double[] key)
    {
        LoadRow(spec, keys, blockTable, row, n, head, spec.HeadDim, key);
        if (!rotate || !spec.Rope.Enabled) return;
        int position = spec.Rope.ExplicitPositions ? positions![(long)row * spec.Cache.MaxTokens + n] : n;
        int rd = spec.RotaryDim;
        for (int pair = 0; pair < rd / 2; pair++)
        {
            float angle = (float)position * InverseFrequency(spec, pair);   // fp32 product, by definition
            double cos = Math.Cos(angle), sin = Math.Sin(angle);
            (int a, int c) = spec.Rope.Style == RopeStyle.RotateHalf ? (pair, pair + rd / 2) : (2 * pair, 2 * pair + 1);
            double x = key[a], y = key[c];
            key[a] = x * cos - y * sin;
            key[c] = x * sin + y * cos;
        }
    }

    private static void LoadRow(in DecodeAttentionSpec spec, double[] storage, int[]? blockTable, int row, int n, int head, int dim, double[] target)
    {
        int page = spec.Cache.IsPaged ? blockTable![(long)row * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize] : 0;
        int heads = spec.PoolKvHeads;
        long offset;
        if (spec.Cache.IsPaged)
        {
            int slot = n % spec.Cache.PageSize;
            offset = spec.Cache.Layout == KvLayout.Nhd
                ? (((long)page * spec.Cache.PageSize + slot) * heads + head) * dim
                : (((long)page * heads + head) * spec.Cache.PageSize + slot) * dim;
        }
        else
        {
            offset = spec.Cache.Layout == KvLayout.Nhd
                ? (((long)row * spec.Cache.MaxTokens + n) * heads + head) * dim
                : (((long)row * heads + head) * spec.Cache.MaxTokens + n) * dim;
        }
        for (int d = 0; d < dim; d++) target[d] = storage[offset + d];
    }

    /// <summary>Merges two attention states row by row: <c>[rows, dim]</c> outputs with <c>[rows]</c> natural-log LSEs.
    /// Weights are <c>exp(lse_x − lse)</c>; two empty states (−∞) merge to zeros and −∞.</summary>
    public static void Merge(int rows, int dim, double[] outA, double[] lseA, double[] outB, double[] lseB, double[] output, double[] lse)
    {
        for (int r = 0; r < rows; r++)
        {
            double max = Math.Max(lseA[r], lseB[r]);
            if (double.IsNegativeInfinity(max))
            {
                for (int d = 0; d < dim; d++) output[(long)r * dim + d] = 0;
                lse[r] = double.NegativeInfinity;
                continue;
            }
            double wa = Math.Exp(lseA[r] - max), wb = Math.Exp(lseB[r] - max);
            for (int d = 0; d < dim; d++)
                output[(long)r * dim + d] = (wa * outA[(long)r * dim + d] + wb * outB[(long)r * dim + d]) / (wa + wb);
            lse[r] = max + Math.Log(wa + wb);
        }
    }
}
