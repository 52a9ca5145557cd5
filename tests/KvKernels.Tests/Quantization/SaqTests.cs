using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Quantization;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Quantization;

/// <summary>
/// SAQ's staircase: requantizing a segment one stair lower equals the oracle's dequantize-then-quantize with fresh
/// group statistics (bit for bit, CPU; GPU == CPU on every backend), and attention over a staircase (2-bit, 4-bit, 8-bit
/// stairs and an fp16 residual), segment by segment merged by LSE, equals attention over the whole dequantized sequence.
/// </summary>
public sealed class SaqTests(Backends backends)
{
    private const int PageSize = 32, Heads = 2, Dim = 64;

    private static QuantizedKvPool Pool(int pages, KvFormat format, KvLayout layout = KvLayout.Nhd) =>
        new(new PagedKvLayout(pages, PageSize, Heads, Dim, layout), format);

    public static TheoryData<int, int, bool> Steps => new()
    {
        { 8, 4, true },    // keys: token groups
        { 4, 2, true },
        { 8, 4, false },   // values: channel groups
        { 4, 2, false },
    };

    /// <summary>A source pool of <paramref name="bits"/> holding random data in every slot (keys-like outlier channel).</summary>
    private static (QuantizedKvPool Pool, KvQuantTests.Buffers<Half> Buffers, float[] Source) Source(int bits, bool keys, int pages, int seed)
    {
        var pool = Pool(pages, keys ? KvFormat.KiviKeys(bits) : KvFormat.KiviValues(bits), keys ? KvLayout.Nhd : KvLayout.Hnd);
        var rng = new Random(seed);
        int tokens = (int)pool.Pages.Slots;
        var src = new Half[(long)tokens * Heads * Dim];
        for (int i = 0; i < src.Length; i++) src[i] = (Half)(float)((rng.NextDouble() * 2 - 1) * (i % Dim == 5 ? 9 : 1));
        int unit = pool.TokenGroups ? pool.Group : 1;
        var slots = Enumerable.Range(0, tokens / unit).Select(i => i * unit).ToArray();
        var buffers = KvQuantTests.Buffers<Half>.Filled(pool);
        KvQuantCpu.Quantize<Half>(new KvQuantizeSpec(pool, tokens), src, slots, [], buffers.Codes, buffers.TokenScales, buffers.GroupParams);
        return (pool, buffers, src.Select(x => (float)x).ToArray());
    }

    [Theory]
    [MemberData(nameof(Steps))]
    public void Requantize_IsDequantizeThenQuantizeWithFreshStatistics(int from, int to, bool keys)
    {
        var (src, srcBuffers, values) = Source(from, keys, 4, from * 10 + to);
        var dst = Pool(5, keys ? KvFormat.KiviKeys(to) : KvFormat.KiviValues(to), KvLayout.Hnd);
        int[] sourcePages = [2, 0, 3], destinationPages = [4, 1, 0];
        var spec = new KvRequantizeSpec(src, dst, 3);
        var actual = KvQuantTests.Buffers<Half>.Filled(dst);
        KvQuantCpu.Requantize<Half>(spec, sourcePages, destinationPages, new QuantizedTensor<Half>(srcBuffers.Codes, [], srcBuffers.GroupParams), [],
            actual.Codes, actual.TokenScales, actual.GroupParams);

        // The oracle: the source as the oracle quantized it, dequantized and rounded to fp16, quantized again one stair down.
        int tokens = (int)src.Pages.Slots, unit = src.TokenGroups ? src.Group : 1;
        var srcOracle = QuantOracle.Quantize<Half>(new KvQuantizeSpec(src, tokens), values,
            Enumerable.Range(0, tokens / unit).Select(i => i * unit).ToArray(), []);
        var moved = new float[3 * PageSize * Heads * Dim];
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < PageSize; j++)
                for (int h = 0; h < Heads; h++)
                    for (int d = 0; d < Dim; d++)
                        moved[((i * PageSize + j) * Heads + h) * Dim + d] =
                            (float)(Half)QuantOracle.Dequantize(src, srcOracle, [], sourcePages[i] * PageSize + j, h, d);
        var dstSlots = new int[dst.TokenGroups ? 3 * PageSize / dst.Group : 3 * PageSize];
        int dstUnit = dst.TokenGroups ? dst.Group : 1;
        for (int k = 0; k < dstSlots.Length; k++) dstSlots[k] = destinationPages[k * dstUnit / PageSize] * PageSize + k * dstUnit % PageSize;
        var dstOracle = QuantOracle.Quantize<Half>(new KvQuantizeSpec(dst, 3 * PageSize), moved, dstSlots, []);
        var expected = KvQuantTests.Buffers<Half>.Filled(dst);
        QuantOracle.Pack(dst, dstOracle, expected.Codes, expected.TokenScales, expected.GroupParams);
        Assert.Equal(expected.Codes, actual.Codes);
        Assert.Equal(expected.GroupParams, actual.GroupParams);
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void GpuRequantize_MatchesCpu(string backend)
    {
        var device = backends.Get(backend);
        foreach (var (from, to, keys) in new[] { (8, 4, true), (4, 2, false) })
        {
            var (src, srcBuffers, _) = Source(from, keys, 4, 3);
            var dst = Pool(5, keys ? KvFormat.KiviKeys(to) : KvFormat.KiviValues(to));
            int[] sourcePages = [1, 3], destinationPages = [0, 2];
            var spec = new KvRequantizeSpec(src, dst, 2);
            var expected = KvQuantTests.Buffers<Half>.Filled(dst);
            KvQuantCpu.Requantize<Half>(spec, sourcePages, destinationPages, new QuantizedTensor<Half>(srcBuffers.Codes, [], srcBuffers.GroupParams), [],
                expected.Codes, expected.TokenScales, expected.GroupParams);

            var start = KvQuantTests.Buffers<Half>.Filled(dst);
            using var sCodes = device.Allocate<byte>(srcBuffers.Codes);
            using var sParams = device.Allocate<Half>(srcBuffers.GroupParams);
            using var dCodes = device.Allocate<byte>(start.Codes);
            using var dParams = device.Allocate<Half>(start.GroupParams);
            using var requantizer = new KvRequantizer<Half>(new KvQuantKernels(device), device, src.Pages, 4);
            requantizer.Requantize(spec, sourcePages, destinationPages, new DeviceQuantizedTensor<Half>(sCodes.Span, default, null, sParams.Span),
                new DeviceQuantizedTensor<Half>(dCodes.Span, default, null, dParams.Span));
            device.DefaultStream.Synchronize();
            Assert.Equal(expected.Codes, dCodes.ToArray());
            Assert.Equal(expected.GroupParams, dParams.ToArray());
        }
    }

    /// <summary>A staircase of one sequence: stairs of 2, 4 and 8 bits (64 tokens each, oldest first) and a 13-token fp16
    /// residual; each stair is attended with TrailingTokens = the tokens after it, the four states merged by LSE.</summary>
    [Fact]
    public void StaircaseAttention_EqualsWholeSequenceAttention()
    {
        const int stairTokens = 64, residual = 13, hq = 4, qLen = 2;
        int[] widths = [2, 4, 8];
        var rng = new Random(17);
        var query = Enumerable.Range(0, qLen * hq * Dim).Select(_ => (Half)(float)(rng.NextDouble() * 2 - 1)).ToArray();
        int total = widths.Length * stairTokens + residual;
        var keys = new double[total, Heads, Dim];
        var vals = new double[total, Heads, Dim];

        float[]? merged = null, mergedLse = null;
        void Merge(float[] o, float[] l)
        {
            if (merged is null) { merged = o; mergedLse = l; return; }
            var next = new float[o.Length];
            var nextLse = new float[l.Length];
            DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(l.Length, Dim), merged, mergedLse, o, l, next, nextLse);
            merged = next;
            mergedLse = nextLse;
        }

        for (int s = 0; s < widths.Length; s++)
        {
            var (kPool, kBuf, _) = Source(widths[s], true, 2, 40 + s);
            var (vPool, vBuf, _) = Source(widths[s], false, 2, 50 + s);
            var spec = new QuantizedAttentionSpec(1, qLen, hq, Heads, Dim, kPool.Pages, 2, kPool.Format, vPool.Format with { })
            {
                InputType = AttentionElement.Float16,
                OutputType = AttentionElement.Float32,
                TrailingTokens = total - (s + 1) * stairTokens,
            };
            // The value pool is HND in Source(); attention needs one geometry, so requantize values into an NHD pool of the same width.
            var vNhd = Pool(2, vPool.Format);
            var vN = KvQuantTests.Buffers<Half>.Filled(vNhd);
            KvQuantCpu.Requantize<Half>(new KvRequantizeSpec(vPool, vNhd, 2), [0, 1], [0, 1], new QuantizedTensor<Half>(vBuf.Codes, [], vBuf.GroupParams), [],
                vN.Codes, vN.TokenScales, vN.GroupParams);
            int[] table = [1, 0];
            var o = new float[qLen * hq * Dim];
            var l = new float[qLen * hq];
            QuantizedAttentionCpu.Decode<Half, float>(spec, query, new QuantizedTensor<Half>(kBuf.Codes, [], kBuf.GroupParams),
                new QuantizedTensor<Half>(vN.Codes, [], vN.GroupParams), table, [stairTokens], o, l);
            Merge(o, l);
            for (int n = 0; n < stairTokens; n++)
            {
                long slot = table[n / PageSize] * PageSize + n % PageSize;
                for (int h = 0; h < Heads; h++)
                    for (int d = 0; d < Dim; d++)
                    {
                        keys[s * stairTokens + n, h, d] = (double)(Half)KvQuantCpu.DequantizeElement<Half>(kPool, kBuf.Codes, [], kBuf.GroupParams, slot, h, d);
                        vals[s * stairTokens + n, h, d] = (double)(Half)KvQuantCpu.DequantizeElement<Half>(vNhd, vN.Codes, [], vN.GroupParams, slot, h, d);
                    }
            }
        }
        var resK = Enumerable.Range(0, residual * Heads * Dim).Select(_ => (Half)(float)(rng.NextDouble() * 2 - 1)).ToArray();
        var resV = Enumerable.Range(0, residual * Heads * Dim).Select(_ => (Half)(float)(rng.NextDouble() * 2 - 1)).ToArray();
        var resSpec = new DecodeAttentionSpec(1, qLen, hq, Heads, Dim, KvCacheShape.Contiguous(residual)) { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32 };
        var ro = new float[qLen * hq * Dim];
        var rl = new float[qLen * hq];
        DecodeAttentionCpu.Run<Half, float>(resSpec, query, resK, resV, [residual], [], ro, rl);
        Merge(ro, rl);
        for (int n = 0; n < residual; n++)
            for (int h = 0; h < Heads; h++)
                for (int d = 0; d < Dim; d++)
                {
                    keys[widths.Length * stairTokens + n, h, d] = (double)resK[(n * Heads + h) * Dim + d];
                    vals[widths.Length * stairTokens + n, h, d] = (double)resV[(n * Heads + h) * Dim + d];
                }

        var expected = new double[qLen * hq * Dim];
        double scale = 1 / Math.Sqrt(Dim);
        for (int i = 0; i < qLen; i++)
            for (int h = 0; h < hq; h++)
            {
                int row = i * hq + h, kvh = h / (hq / Heads), visible = total - qLen + i + 1;
                var sc = Enumerable.Range(0, visible).Select(n => Enumerable.Range(0, Dim).Sum(d => (double)query[row * Dim + d] * keys[n, kvh, d]) * scale).ToArray();
                double max = sc.Max(), sum = sc.Sum(x => Math.Exp(x - max));
                for (int d = 0; d < Dim; d++) expected[row * Dim + d] = Enumerable.Range(0, visible).Sum(n => Math.Exp(sc[n] - max) * vals[n, kvh, d]) / sum;
            }
        Assert.InRange(AttentionElements.RelativeError<float>(merged!, expected), 0, 1e-5);
    }

    [Fact]
    public void BadInput_IsRejected()
    {
        var src = Pool(3, KvFormat.KiviKeys(8));
        var buffers = KvQuantTests.Buffers<Half>.Filled(src);
        var dst = Pool(3, KvFormat.KiviKeys(4));
        var d = KvQuantTests.Buffers<Half>.Filled(dst);
        string Param(KvRequantizeSpec spec, int[] s, int[] t) => Assert.Throws<ArgumentException>(() => KvQuantCpu.Requantize<Half>(spec, s, t,
            new QuantizedTensor<Half>(buffers.Codes, [], buffers.GroupParams), [], d.Codes, d.TokenScales, d.GroupParams)).ParamName!;
        Assert.Equal("destinationPages", Param(new KvRequantizeSpec(src, dst, 2), [0, 1], [2, 2]));
        Assert.Equal("sourcePages", Param(new KvRequantizeSpec(src, dst, 2), [0, 3], [0, 1]));
        Assert.Equal("destinationPages", Param(new KvRequantizeSpec(src, dst, 2), [0, 1], [0]));
        Assert.Equal("spec", Param(new KvRequantizeSpec(src, new QuantizedKvPool(new PagedKvLayout(3, 32, Heads, 128), KvFormat.KiviKeys(4)), 1), [0], [0]));
    }
}
