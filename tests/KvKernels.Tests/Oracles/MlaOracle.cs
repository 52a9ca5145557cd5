using KvKernels.Attention;
using KvKernels.Mla;
using KvKernels.Paging;

namespace KvKernels.Tests.Oracles;

/// <summary>
/// The float64 oracle of multi-head latent attention, written from the definitions of <see cref="MlaAttentionSpec"/> and <see cref="MlaCacheWriteSpec"/>:
/// the latent cache write, the absorption GEMMs, and the decode step both ways — absorbed (latent attention through
/// <see cref="AttentionOracle"/>) and naive (decompress K and V per head, ordinary multi-head attention). Inputs are
/// the stored values widened to double. Shared with KvCheck (linked source): no test framework here.
/// </summary>
public static class MlaOracle
{
    /// <summary>
    /// The cache write: each token's row <c>[RMSNorm(latent) ; RoPE(ropeKey)]</c> into <paramref name="cache"/> (the
    /// pool, as doubles) at its slot; slot −1 skips. RoPE angles are the spec's fp32 products
    /// <c>(float)position · invFreq[i]</c>; everything else is double.
    /// </summary>
    public static void CacheWrite(in MlaCacheWriteSpec spec, double[] latent, double[] ropeKey, int[] positions, int[] slots,
        double[]? normWeight, double[] cache)
    {
        var shape = spec.Shape;
        int dc = shape.LatentDim, dr = shape.RopeDim;
        float[] invFreq = spec.Rope.InverseFrequencies(dr);
        var row = new double[shape.RowDim];
        for (int t = 0; t < spec.NumTokens; t++)
        {
            if (slots[t] < 0) continue;
            long li = (long)t * spec.EffectiveLatentStride, ri = (long)t * spec.EffectiveRopeStride;
            double inv = 1;
            if (spec.Normalize)
            {
                double sumSquares = 0;
                for (int d = 0; d < dc; d++) sumSquares += latent[li + d] * latent[li + d];
                inv = 1 / Math.Sqrt(sumSquares / dc + spec.Epsilon);
            }
            for (int d = 0; d < dc; d++) row[d] = latent[li + d] * inv * (spec.Normalize ? normWeight![d] : 1);
            for (int d = 0; d < dr; d++) row[dc + d] = ropeKey[ri + d];
            if (spec.Rope.Style != RopeStyle.None)
            {
                for (int i = 0; i < dr / 2; i++)
                {
                    double angle = (float)positions[t] * invFreq[i];
                    (int a, int b) = spec.Rope.Style == RopeStyle.Interleaved ? (2 * i, 2 * i + 1) : (i, i + dr / 2);
                    double x = ropeKey[ri + a], y = ropeKey[ri + b];
                    row[dc + a] = x * Math.Cos(angle) - y * Math.Sin(angle);
                    row[dc + b] = x * Math.Sin(angle) + y * Math.Cos(angle);
                }
            }
            long offset = spec.Pool.RowOffset(slots[t], 0);
            Array.Copy(row, 0, cache, offset, row.Length);
        }
    }

    /// <summary>q_latent <c>[M, H, LatentDim]</c> = q_nope[m, h] · W_UK[h], with W_UK[h] = weights[h, 0 … NopeDim − 1, :].</summary>
    public static double[] Absorb(in MlaShape shape, long tokenRows, double[] queryNope, double[] weights)
    {
        int h = shape.NumHeads, dn = shape.NopeDim, dc = shape.LatentDim;
        var result = new double[tokenRows * h * dc];
        for (long m = 0; m < tokenRows; m++)
            for (int head = 0; head < h; head++)
            {
                long q = (m * h + head) * dn, o = (m * h + head) * dc, w = (long)head * (dn + shape.ValueDim) * dc;
                for (int d = 0; d < dn; d++)
                {
                    double x = queryNope[q + d];
                    for (int c = 0; c < dc; c++) result[o + c] += x * weights[w + (long)d * dc + c];
                }
            }
        return result;
    }

    /// <summary>out <c>[M, H, ValueDim]</c> = o_lat[m, h] · W_UV[h]ᵀ, with W_UV[h] = weights[h, NopeDim …, :].</summary>
    public static double[] Unabsorb(in MlaShape shape, long tokenRows, double[] latentOutput, double[] weights)
    {
        int h = shape.NumHeads, dn = shape.NopeDim, dv = shape.ValueDim, dc = shape.LatentDim;
        var result = new double[tokenRows * h * dv];
        for (long m = 0; m < tokenRows; m++)
            for (int head = 0; head < h; head++)
            {
                long o = (m * h + head) * dc, w = ((long)head * (dn + dv) + dn) * dc;
                for (int d = 0; d < dv; d++)
                {
                    double sum = 0;
                    for (int c = 0; c < dc; c++) sum += latentOutput[o + c] * weights[w + (long)d * dc + c];
                    result[(m * h + head) * dv + d] = sum;
                }
            }
        return result;
    }

    /// <summary>The packed query <c>[M, H, RowDim]</c>: q_latent then q_pe.</summary>
    public static double[] PackQuery(in MlaShape shape, long tokenRows, double[] queryLatent, double[] queryRope)
    {
        int h = shape.NumHeads, dc = shape.LatentDim, dr = shape.RopeDim;
        var result = new double[tokenRows * h * shape.RowDim];
        for (long r = 0; r < tokenRows * h; r++)
        {
            Array.Copy(queryLatent, r * dc, result, r * shape.RowDim, dc);
            Array.Copy(queryRope, r * dr, result, r * shape.RowDim + dc, dr);
        }
        return result;
    }

    /// <summary>The whole step the absorbed way: absorb, latent attention (<see cref="AttentionOracle"/>), un-absorb.
    /// Returns the output <c>[B, q_len, H, ValueDim]</c>, the LSE <c>[B, q_len, H]</c> and the latent output.</summary>
    public static (double[] Output, double[] Lse, double[] LatentOutput) DecodeAbsorbed(in MlaAttentionSpec spec, double[] queryNope,
        double[] queryRope, double[] weights, double[] cache, int[] lengths, int[]? blockTable)
    {
        var shape = spec.Shape;
        var query = PackQuery(shape, spec.TokenRows, Absorb(shape, spec.TokenRows, queryNope, weights), queryRope);
        var attention = spec.ToDecodeAttention();
        var latentOutput = new double[spec.LatentOutputElements];
        var lse = new double[attention.LseElements];
        AttentionOracle.Decode(attention, query, cache, null, lengths, blockTable, null, null, latentOutput, lse);
        return (Unabsorb(shape, spec.TokenRows, latentOutput, weights), lse, latentOutput);
    }

    /// <summary>
    /// The whole step the naive way: per head, K = [c · W_UKᵀ ; k_pe] (NopeDim + RopeDim) and V = c · W_UVᵀ for every
    /// visible cached token, q = [q_nope ; q_pe], causal softmax over the visible tokens, o = Σ p · V. Returns the output
    /// <c>[B, q_len, H, ValueDim]</c> and the LSE.
    /// </summary>
    public static (double[] Output, double[] Lse) DecodeNaive(in MlaAttentionSpec spec, double[] queryNope, double[] queryRope,
        double[] weights, double[] cache, int[] lengths, int[]? blockTable)
    {
        var shape = spec.Shape;
        var attention = spec.ToDecodeAttention();
        int h = shape.NumHeads, dn = shape.NopeDim, dr = shape.RopeDim, dv = shape.ValueDim, dc = shape.LatentDim;
        double scale = spec.EffectiveScale;
        var output = new double[spec.OutputElements];
        var lse = new double[attention.LseElements];
        for (int b = 0; b < spec.BatchSize; b++)
        {
            int length = lengths[b];
            // Decompress every token of the sequence for every head: k_nope [n, h, dn], v [n, h, dv], k_pe [n, dr].
            var kNope = new double[(long)length * h * dn];
            var v = new double[(long)length * h * dv];
            var kPe = new double[(long)length * dr];
            for (int n = 0; n < length; n++)
            {
                int page = spec.Cache.IsPaged ? blockTable![(long)b * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize] : 0;
                long row = attention.StorageOffset(b, n, page, 0, shape.RowDim);
                for (int d = 0; d < dr; d++) kPe[(long)n * dr + d] = cache[row + dc + d];
                for (int head = 0; head < h; head++)
                {
                    long w = (long)head * (dn + dv) * dc;
                    for (int d = 0; d < dn + dv; d++)
                    {
                        double sum = 0;
                        for (int c = 0; c < dc; c++) sum += cache[row + c] * weights[w + (long)d * dc + c];
                        if (d < dn) kNope[((long)n * h + head) * dn + d] = sum;
                        else v[((long)n * h + head) * dv + d - dn] = sum;
                    }
                }
            }
            for (int i = 0; i < spec.QueryLength; i++)
            {
                int qi = length - spec.QueryLength + i;
                for (int head = 0; head < h; head++)
                {
                    long r = ((long)b * spec.QueryLength + i) * h + head;
                    var logits = new double[Math.Max(0, Math.Min(length, qi + 1))];
                    double max = double.NegativeInfinity;
                    for (int n = 0; n < logits.Length; n++)
                    {
                        double dot = 0;
                        for (int d = 0; d < dn; d++) dot += queryNope[r * dn + d] * kNope[((long)n * h + head) * dn + d];
                        for (int d = 0; d < dr; d++) dot += queryRope[r * dr + d] * kPe[(long)n * dr + d];
                        logits[n] = scale * dot;
                        max = Math.Max(max, logits[n]);
                    }
                    if (logits.Length == 0)
                    {
                        lse[r] = double.NegativeInfinity;
                        continue;
                    }
                    double sum = 0;
                    foreach (double s in logits) sum += Math.Exp(s - max);
                    for (int n = 0; n < logits.Length; n++)
                    {
                        double p = Math.Exp(logits[n] - max) / sum;
                        for (int d = 0; d < dv; d++) output[r * dv + d] += p * v[((long)n * h + head) * dv + d];
                    }
                    lse[r] = max + Math.Log(sum);
                }
            }
        }
        return (output, lse);
    }
}
