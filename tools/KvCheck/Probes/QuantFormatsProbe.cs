using KvKernels;
using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Quantization;

namespace KvCheck.Probes;

/// <summary>
/// What each KV format costs and loses, for <c>KvCheck info</c> and the README: bytes per token per layer (K + V, with
/// scales and group parameters) at Llama-3-8B's 8 KV heads of 128, and the relative error ‖o − o_fp16‖ / ‖o_fp16‖ of decode
/// attention over the quantized cache against attention over the fp16 cache it came from (CPU twins, fixed seed):
/// keys with 4 outlier channels of 10× the rest, as real models have, values plain; one sequence of 2048 tokens,
/// 32 query heads, one query token.
/// </summary>
internal static class QuantFormatsProbe
{
    public const int KvHeads = 8, HeadDim = 128, QueryHeads = 32, Tokens = 2048, PageSize = 32;

    public sealed record Row(string Name, double BytesPerToken, double RatioToFp16, double RelativeError);

    public static IReadOnlyList<(string Name, KvFormat Key, KvFormat Value)> Formats { get; } =
    [
        ("fp8 e4m3, scale per token", KvFormat.Fp8E4M3(), KvFormat.Fp8E4M3()),
        ("fp8 e5m2, scale per token", KvFormat.Fp8E5M2(), KvFormat.Fp8E5M2()),
        ("fp8 e4m3, scale per tensor (amax/448)", KvFormat.Fp8E4M3(KvScaleGranularity.PerTensor), KvFormat.Fp8E4M3(KvScaleGranularity.PerTensor)),
        ("int8 symmetric, scale per token", KvFormat.Int8(), KvFormat.Int8()),
        ("int8 asymmetric, per token", KvFormat.Int8Asymmetric(), KvFormat.Int8Asymmetric()),
        ("KIVI-4 (K per channel, V per token, G 32)", KvFormat.KiviKeys(4), KvFormat.KiviValues(4)),
        ("KIVI-2 (K per channel, V per token, G 32)", KvFormat.KiviKeys(2), KvFormat.KiviValues(2)),
        ("4-bit per token for K and V (no KIVI split)", KvFormat.KiviValues(4), KvFormat.KiviValues(4)),
    ];

    /// <summary>Bytes per token of a layer's K and V in <paramref name="key"/> / <paramref name="value"/>.</summary>
    public static double BytesPerToken(KvFormat key, KvFormat value) => KvHeads * (key.BytesPerRow(HeadDim) + value.BytesPerRow(HeadDim));

    public static IReadOnlyList<Row> Measure()
    {
        var rng = new Random(2026);
        var pages = new PagedKvLayout(Tokens / PageSize, PageSize, KvHeads, HeadDim);
        var keys = new Half[(long)Tokens * KvHeads * HeadDim];
        var values = new Half[keys.Length];
        int[] outliers = [7, 33, 64, 101];
        for (int i = 0; i < keys.Length; i++)
        {
            keys[i] = (Half)(float)(Normal(rng) * (outliers.Contains(i % HeadDim) ? 10 : 1));
            values[i] = (Half)(float)Normal(rng);
        }
        var query = Enumerable.Range(0, QueryHeads * HeadDim).Select(_ => (Half)(float)Normal(rng)).ToArray();
        int[] table = Enumerable.Range(0, pages.NumPages).ToArray();

        // The fp16 reference: the same cache unquantized (contiguous), fp32 output.
        var reference = new float[QueryHeads * HeadDim];
        var spec16 = new DecodeAttentionSpec(1, 1, QueryHeads, KvHeads, HeadDim, KvCacheShape.Contiguous(Tokens))
            { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32 };
        DecodeAttentionCpu.Run<Half, float>(spec16, query, keys, values, [Tokens], [], reference);

        double fp16Bytes = BytesPerToken(KvFormat.Unquantized, KvFormat.Unquantized);
        var rows = new List<Row> { new("fp16 / bf16 (reference)", fp16Bytes, 1, 0) };
        foreach (var (name, keyFormat, valueFormat) in Formats)
        {
            var spec = new QuantizedAttentionSpec(1, 1, QueryHeads, KvHeads, HeadDim, pages, pages.NumPages, keyFormat, valueFormat)
                { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32 };
            var k = Quantize(spec.KeyPool, keys);
            var v = Quantize(spec.ValuePool, values);
            var output = new float[reference.Length];
            QuantizedAttentionCpu.Decode<Half, float>(spec, query, new QuantizedTensor<Half>(k.Codes, k.Scales, k.Params),
                new QuantizedTensor<Half>(v.Codes, v.Scales, v.Params), table, [Tokens], output, []);
            double diff = 0, norm = 0;
            for (int i = 0; i < output.Length; i++)
            {
                diff += (output[i] - (double)reference[i]) * (output[i] - (double)reference[i]);
                norm += (double)reference[i] * reference[i];
            }
            double bytes = BytesPerToken(keyFormat, valueFormat);
            rows.Add(new Row(name, bytes, fp16Bytes / bytes, Math.Sqrt(diff / norm)));
        }
        return rows;
    }

    /// <summary>Quantizes a packed [Tokens, Hkv, D] tensor into every slot (per-tensor scales: amax / code max).</summary>
    private static (byte[] Codes, float[] Scales, Half[] Params) Quantize(in QuantizedKvPool pool, Half[] source)
    {
        int unit = pool.TokenGroups ? pool.Group : 1;
        var given = new float[pool.GivenScaleCount];
        if (given.Length > 0) KvQuantCpu.CalibrateScales<Half>(source, Tokens, KvHeads, HeadDim, pool.Format.CodeMax, given);
        var codes = new byte[pool.CodeBytes];
        var scales = new float[pool.TokenScaleCount];
        var ps = new Half[pool.GroupParamCount];
        KvQuantCpu.Quantize<Half>(new KvQuantizeSpec(pool, Tokens), source, Enumerable.Range(0, Tokens / unit).Select(i => i * unit).ToArray(),
            given, codes, scales, ps);
        return (codes, pool.Format.HasTokenScales ? scales : given, ps);
    }

    private static double Normal(Random rng) => Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());
}
