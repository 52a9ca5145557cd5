using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Quantization;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Quantization;

/// <summary>
/// Decode attention over quantized caches: the CPU twin against a float64 oracle over the dequantized tensors (which
/// <see cref="KvQuantTests"/> holds to the format's definition), the GPU kernel (every backend) against the CPU twin, a
/// KIVI cache (quantized part + fp16 residual, merged by LSE) against attention over the whole dequantized sequence,
/// and bad input.
/// </summary>
public sealed class QuantizedAttentionTests(Backends backends)
{
    public sealed record AttnCase(string Name, QuantizedAttentionSpec Spec, int[] Lengths, int Splits = 0)
    {
        public override string ToString() => Name;
    }

    private static QuantizedAttentionSpec S(int b, int qLen, int hq, int hkv, int d, int pages, int pageSize, int maxPages, KvFormat k, KvFormat v,
        AttentionElement type, AttentionElement output, KvLayout layout = KvLayout.Nhd) =>
        new(b, qLen, hq, hkv, d, new PagedKvLayout(pages, pageSize, hkv, d, layout), maxPages, k, v) { InputType = type, OutputType = output };

    public static IReadOnlyList<AttnCase> Cases { get; } =
    [
        new("fp8-token-gqa4-bf16", S(3, 1, 8, 2, 128, 12, 16, 4, KvFormat.Fp8E4M3(), KvFormat.Fp8E4M3(), AttentionElement.BFloat16, AttentionElement.BFloat16), [0, 1, 63]),
        new("fp8e5m2-tensor-fp32out-qlen3", S(2, 3, 4, 1, 64, 8, 16, 4, KvFormat.Fp8E5M2(KvScaleGranularity.PerTensor), KvFormat.Fp8E5M2(KvScaleGranularity.PerTensor),
            AttentionElement.Float16, AttentionElement.Float32, KvLayout.Hnd), [37, 2]),
        new("int8-head-mha-fp16", S(2, 1, 3, 3, 96, 10, 8, 5, KvFormat.Int8(KvScaleGranularity.PerKvHead), KvFormat.Int8(), AttentionElement.Float16, AttentionElement.Float16), [40, 19]),
        new("kivi4-gqa8-bf16-split", S(2, 1, 16, 2, 128, 10, 32, 5, KvFormat.KiviKeys(4), KvFormat.KiviValues(4), AttentionElement.BFloat16, AttentionElement.Float32), [160, 96], 3),
        new("kivi2-g16-qlen2-hnd", S(1, 2, 4, 2, 64, 6, 32, 6, KvFormat.KiviKeys(2, 16), KvFormat.KiviValues(2, 16), AttentionElement.Float16, AttentionElement.Float16, KvLayout.Hnd), [176]),
        new("mixed-fp8k-kivi4v-d256", S(1, 1, 4, 1, 256, 4, 32, 4, KvFormat.Fp8E4M3(), KvFormat.KiviValues(4), AttentionElement.BFloat16, AttentionElement.BFloat16), [97]),
        new("asym8-row-qlen4-rows20", S(1, 4, 5, 1, 32, 4, 16, 4, KvFormat.Int8Asymmetric(), KvFormat.Int8Asymmetric(), AttentionElement.Float16, AttentionElement.Float32), [50]),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int> BackendCases => Backends.CasesOnEach(Cases.Count);

    /// <summary>A quantized cache: every slot of both pools written from random keys (outlier channels) and values; block
    /// table = the pages in a shuffled order, sequence by sequence.</summary>
    internal sealed record Cache<T>(KvQuantTests.Buffers<T> K, KvQuantTests.Buffers<T> V, float[] KGiven, float[] VGiven, int[] Table, T[] Query)
        where T : unmanaged;

    internal static Cache<T> Build<T>(AttnCase c, int seed) where T : unmanaged
    {
        var spec = c.Spec;
        var rng = new Random(seed);
        KvQuantTests.Buffers<T> Fill(QuantizedKvPool pool, float outlier, out float[] given)
        {
            int unit = pool.TokenGroups ? pool.Group : 1;
            int tokens = (int)pool.Pages.Slots;
            var src = new T[(long)tokens * pool.Pages.TokenElements];
            for (int i = 0; i < src.Length; i++)
                src[i] = AttentionElements.FromFloat<T>((float)((rng.NextDouble() * 2 - 1) * (i % pool.Pages.HeadDim == 3 ? outlier : 1)));
            var slots = Enumerable.Range(0, tokens / unit).Select(i => i * unit).ToArray();
            given = Enumerable.Range(0, pool.GivenScaleCount).Select(h => outlier / 400f * (1 + h)).ToArray();
            var buffers = KvQuantTests.Buffers<T>.Filled(pool);
            KvQuantCpu.Quantize<T>(new KvQuantizeSpec(pool, tokens), src, slots, given, buffers.Codes, buffers.TokenScales, buffers.GroupParams);
            return buffers;
        }
        var k = Fill(spec.KeyPool, 10f, out var kGiven);
        var v = Fill(spec.ValuePool, 2f, out var vGiven);
        var pages = Enumerable.Range(0, spec.Pages.NumPages).ToArray();
        rng.Shuffle(pages);
        var table = new int[spec.BatchSize * spec.MaxPagesPerSequence];
        int next = 0;
        for (int b = 0; b < spec.BatchSize; b++)
            for (int p = 0; p < spec.MaxPagesPerSequence; p++)
                table[b * spec.MaxPagesPerSequence + p] = p * spec.Pages.PageSize < c.Lengths[b] ? pages[next++] : -1;
        var query = Enumerable.Range(0, (int)spec.Elements).Select(_ => AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1))).ToArray();
        return new Cache<T>(k, v, kGiven, vGiven, table, query);
    }

    private static QuantizedTensor<T> Keys<T>(QuantizedAttentionSpec s, Cache<T> c) where T : unmanaged =>
        new(c.K.Codes, s.KeyFormat.HasTokenScales ? c.K.TokenScales : c.KGiven, c.K.GroupParams);

    private static QuantizedTensor<T> Values<T>(QuantizedAttentionSpec s, Cache<T> c) where T : unmanaged =>
        new(c.V.Codes, s.ValueFormat.HasTokenScales ? c.V.TokenScales : c.VGiven, c.V.GroupParams);

    /// <summary>float64 attention over the dequantized tensors (KvQuantCpu.Dequantize, rounded to the element type).</summary>
    private static (double[] Output, double[] Lse) Oracle<T>(AttnCase c, Cache<T> cache) where T : unmanaged
    {
        var s = c.Spec;
        int maxTokens = s.MaxPagesPerSequence * s.Pages.PageSize;
        var read = new KvDequantizeSpec(s.KeyPool, s.BatchSize, s.MaxPagesPerSequence, maxTokens);
        var k = new T[read.DestinationElements];
        var v = new T[read.DestinationElements];
        KvQuantCpu.Dequantize<T>(read, cache.K.Codes, Keys(s, cache).Scales, cache.K.GroupParams, cache.Table, c.Lengths, k);
        KvQuantCpu.Dequantize<T>(read with { Pool = s.ValuePool }, cache.V.Codes, Values(s, cache).Scales, cache.V.GroupParams, cache.Table, c.Lengths, v);
        var output = new double[s.Elements];
        var lse = new double[s.Rows];
        int d = s.HeadDim, hkv = s.NumKvHeads, g = s.NumQueryHeads / hkv;
        for (int b = 0; b < s.BatchSize; b++)
            for (int i = 0; i < s.QueryLength; i++)
                for (int h = 0; h < s.NumQueryHeads; h++)
                {
                    long row = ((long)b * s.QueryLength + i) * s.NumQueryHeads + h;
                    int visible = Math.Clamp(c.Lengths[b] + s.TrailingTokens - s.QueryLength + i + 1, 0, c.Lengths[b]);
                    var scores = new double[visible];
                    for (int n = 0; n < visible; n++)
                    {
                        double acc = 0;
                        for (int x = 0; x < d; x++)
                            acc += AttentionElements.ToDouble(cache.Query[row * d + x]) * AttentionElements.ToDouble(k[(((long)b * maxTokens + n) * hkv + h / g) * d + x]);
                        scores[n] = acc * s.EffectiveScale;
                    }
                    double max = visible == 0 ? 0 : scores.Max(), sum = scores.Sum(x => Math.Exp(x - max));
                    lse[row] = visible == 0 ? double.NegativeInfinity : max + Math.Log(sum);
                    for (int x = 0; x < d; x++)
                    {
                        double acc = 0;
                        for (int n = 0; n < visible; n++)
                            acc += Math.Exp(scores[n] - max) * AttentionElements.ToDouble(v[(((long)b * maxTokens + n) * hkv + h / g) * d + x]);
                        output[row * d + x] = visible == 0 ? 0 : acc / sum;
                    }
                }
        return (output, lse);
    }

    private static double Tolerance(AttentionElement output) => output switch
    {
        AttentionElement.Float32 => 1e-5,
        AttentionElement.Float16 => 2e-3,
        _ => 1e-2,
    };

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int caseIndex)
    {
        var c = Cases[caseIndex];
        switch (c.Spec.InputType, c.Spec.OutputType)
        {
            case (AttentionElement.BFloat16, AttentionElement.BFloat16): CheckCpu<BFloat16, BFloat16>(c); break;
            case (AttentionElement.BFloat16, AttentionElement.Float32): CheckCpu<BFloat16, float>(c); break;
            case (AttentionElement.Float16, AttentionElement.Float16): CheckCpu<Half, Half>(c); break;
            default: CheckCpu<Half, float>(c); break;
        }
    }

    private static void CheckCpu<TIn, TOut>(AttnCase c) where TIn : unmanaged where TOut : unmanaged
    {
        var cache = Build<TIn>(c, c.Name.Length);
        var output = AttentionElements.Poisoned<TOut>(c.Spec.Elements);
        var lse = new float[c.Spec.Rows];
        QuantizedAttentionCpu.Decode<TIn, TOut>(c.Spec, cache.Query, Keys(c.Spec, cache), Values(c.Spec, cache), cache.Table, c.Lengths, output, lse);
        var (expected, expectedLse) = Oracle(c, cache);
        Assert.InRange(AttentionElements.RelativeError<TOut>(output, expected), 0, Tolerance(c.Spec.OutputType));
        for (int r = 0; r < lse.Length; r++)
            if (double.IsNegativeInfinity(expectedLse[r])) Assert.Equal(float.NegativeInfinity, lse[r]);
            else Assert.InRange(Math.Abs(lse[r] - expectedLse[r]), 0, 1e-5 * Math.Max(1, Math.Abs(expectedLse[r])));
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int caseIndex)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        switch (c.Spec.InputType, c.Spec.OutputType)
        {
            case (AttentionElement.BFloat16, AttentionElement.BFloat16): CheckGpu<BFloat16, BFloat16>(device, c); break;
            case (AttentionElement.BFloat16, AttentionElement.Float32): CheckGpu<BFloat16, float>(device, c); break;
            case (AttentionElement.Float16, AttentionElement.Float16): CheckGpu<Half, Half>(device, c); break;
            default: CheckGpu<Half, float>(device, c); break;
        }
    }

    private static void CheckGpu<TIn, TOut>(CudaDevice device, AttnCase c) where TIn : unmanaged where TOut : unmanaged
    {
        var spec = c.Spec with { Splits = c.Splits };
        var cache = Build<TIn>(c, c.Name.Length + 7);
        var expected = new TOut[spec.Elements];
        var expectedLse = new float[spec.Rows];
        QuantizedAttentionCpu.Decode<TIn, TOut>(spec, cache.Query, Keys(spec, cache), Values(spec, cache), cache.Table, c.Lengths, expected, expectedLse);

        using var query = device.Allocate<TIn>(cache.Query);
        using var kCodes = device.Allocate<byte>(cache.K.Codes);
        using var kScales = device.Allocate<float>(cache.K.TokenScales);
        using var kParams = device.Allocate<TIn>(cache.K.GroupParams);
        using var vCodes = device.Allocate<byte>(cache.V.Codes);
        using var vScales = device.Allocate<float>(cache.V.TokenScales);
        using var vParams = device.Allocate<TIn>(cache.V.GroupParams);
        using var kGiven = new DeviceKvScales(device, Math.Max(1, cache.KGiven.Length));
        using var vGiven = new DeviceKvScales(device, Math.Max(1, cache.VGiven.Length));
        if (cache.KGiven.Length > 0) kGiven.Update(cache.KGiven);
        if (cache.VGiven.Length > 0) vGiven.Update(cache.VGiven);
        using var table = new DeviceBlockTable(device, spec.BatchSize, spec.MaxPagesPerSequence);
        table.Update(cache.Table, c.Lengths, spec.Pages);
        using var output = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.Elements));
        using var lse = device.Allocate<float>(spec.Rows);
        using var workspace = new DecodeAttentionWorkspace(device, spec.Rows, spec.HeadDim, 8);
        new QuantizedAttentionKernels(device).Decode(spec, query.Span, new DeviceQuantizedTensor<TIn>(kCodes.Span, kScales.Span, kGiven, kParams.Span),
            new DeviceQuantizedTensor<TIn>(vCodes.Span, vScales.Span, vGiven, vParams.Span), table, output.Span, lse.Span, workspace);
        device.DefaultStream.Synchronize();

        var actual = output.ToArray();
        Assert.InRange(AttentionElements.RelativeError<TOut>(actual, AttentionElements.ToDoubles<TOut>(expected)), 0, Tolerance(spec.OutputType));
        var actualLse = lse.ToArray();
        for (int r = 0; r < actualLse.Length; r++)
            if (float.IsNegativeInfinity(expectedLse[r])) Assert.Equal(float.NegativeInfinity, actualLse[r]);
            else Assert.InRange(Math.Abs(actualLse[r] - expectedLse[r]), 0, 1e-5 * Math.Max(1, Math.Abs(expectedLse[r])));
    }

    /// <summary>KIVI: the first Q tokens quantized (keys by token groups, values per token), the last R in fp16; attention
    /// over each part with TrailingTokens = R for the quantized one, merged by LSE, equals attention over the whole
    /// dequantized sequence. q_len 2 makes the causal mask cross into the residual.</summary>
    [Fact]
    public void KiviSegments_MergeToWholeSequenceAttention()
    {
        var c = new AttnCase("kivi", S(1, 2, 4, 2, 64, 4, 32, 4, KvFormat.KiviKeys(4), KvFormat.KiviValues(4), AttentionElement.Float16, AttentionElement.Float32), [96]);
        var cache = Build<Half>(c, 21);
        const int residual = 13;
        var s = c.Spec with { TrailingTokens = residual };
        int d = s.HeadDim, hkv = s.NumKvHeads;
        var rng = new Random(5);
        var resK = Enumerable.Range(0, residual * hkv * d).Select(_ => (Half)(float)(rng.NextDouble() * 2 - 1)).ToArray();
        var resV = Enumerable.Range(0, residual * hkv * d).Select(_ => (Half)(float)(rng.NextDouble() * 2 - 1)).ToArray();

        var quantOut = new float[s.Elements];
        var quantLse = new float[s.Rows];
        QuantizedAttentionCpu.Decode<Half, float>(s, cache.Query, Keys(s, cache), Values(s, cache), cache.Table, c.Lengths, quantOut, quantLse);
        var resSpec = new DecodeAttentionSpec(1, 2, 4, 2, d, KvCacheShape.Contiguous(residual)) { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32 };
        var resOut = new float[s.Elements];
        var resLse = new float[s.Rows];
        DecodeAttentionCpu.Run<Half, float>(resSpec, cache.Query, resK, resV, [residual], [], resOut, resLse);
        var merged = new float[s.Elements];
        var mergedLse = new float[s.Rows];
        DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec((int)s.Rows, d), quantOut, quantLse, resOut, resLse, merged, mergedLse);

        // The whole sequence: dequantized quantized part, then the residual, causal for the two query tokens at the end.
        int total = c.Lengths[0] + residual, maxTokens = s.MaxPagesPerSequence * s.Pages.PageSize;
        var read = new KvDequantizeSpec(s.KeyPool, 1, s.MaxPagesPerSequence, maxTokens);
        var qk = new Half[read.DestinationElements];
        var qv = new Half[read.DestinationElements];
        KvQuantCpu.Dequantize<Half>(read, cache.K.Codes, [], cache.K.GroupParams, cache.Table, c.Lengths, qk);
        KvQuantCpu.Dequantize<Half>(read with { Pool = s.ValuePool }, cache.V.Codes, [], cache.V.GroupParams, cache.Table, c.Lengths, qv);
        double Key(int n, int h, int x) => n < c.Lengths[0] ? (double)qk[(n * hkv + h) * d + x] : (double)resK[((n - c.Lengths[0]) * hkv + h) * d + x];
        double Val(int n, int h, int x) => n < c.Lengths[0] ? (double)qv[(n * hkv + h) * d + x] : (double)resV[((n - c.Lengths[0]) * hkv + h) * d + x];
        var expected = new double[s.Elements];
        for (int i = 0; i < 2; i++)
            for (int h = 0; h < 4; h++)
            {
                int row = i * 4 + h, kvh = h / 2, visible = total - 2 + i + 1;
                var scores = Enumerable.Range(0, visible).Select(n =>
                    Enumerable.Range(0, d).Sum(x => (double)cache.Query[row * d + x] * Key(n, kvh, x)) * s.EffectiveScale).ToArray();
                double max = scores.Max(), sum = scores.Sum(x => Math.Exp(x - max));
                for (int x = 0; x < d; x++)
                    expected[row * d + x] = Enumerable.Range(0, visible).Sum(n => Math.Exp(scores[n] - max) * Val(n, kvh, x)) / sum;
            }
        Assert.InRange(AttentionElements.RelativeError<float>(merged, expected), 0, 1e-5);
    }

    [Fact]
    public void BadInput_IsRejected()
    {
        var c = Cases[0];
        var cache = Build<BFloat16>(c, 1);
        var output = new BFloat16[c.Spec.Elements];
        string Param(QuantizedAttentionSpec s, int[]? lengths = null, int[]? table = null, BFloat16[]? query = null, byte[]? kCodes = null) =>
            Assert.Throws<ArgumentException>(() => QuantizedAttentionCpu.Decode<BFloat16, BFloat16>(s, query ?? cache.Query,
                new QuantizedTensor<BFloat16>(kCodes ?? cache.K.Codes, cache.K.TokenScales, cache.K.GroupParams), Values(s, cache),
                table ?? cache.Table, lengths ?? c.Lengths, output, [])).ParamName!;
        Assert.Equal("spec", Param(c.Spec with { HeadDim = 120 }));
        Assert.Equal("spec", Param(c.Spec with { NumQueryHeads = 7 }));
        Assert.Equal("spec", Param(c.Spec with { KeyFormat = KvFormat.Unquantized }));
        Assert.Equal("spec", Param(c.Spec with { TrailingTokens = -1 }));
        Assert.Equal("query", Param(c.Spec, query: cache.Query[1..]));
        Assert.Equal("keys", Param(c.Spec, kCodes: cache.K.Codes[1..]));
        Assert.Equal("sequenceLengths", Param(c.Spec, lengths: [0, 1, 65]));     // 4 pages of 16
        var badTable = (int[])cache.Table.Clone();
        badTable[4] = 99;
        Assert.Equal("blockTable", Param(c.Spec, table: badTable));
        Assert.Equal("query", Assert.Throws<ArgumentException>(() => QuantizedAttentionCpu.Decode<Half, BFloat16>(c.Spec, new Half[c.Spec.Elements],
            default, default, cache.Table, c.Lengths, output, [])).ParamName);
    }
}
