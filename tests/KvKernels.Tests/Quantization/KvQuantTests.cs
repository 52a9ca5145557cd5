using System.Runtime.InteropServices;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Quantization;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Quantization;

/// <summary>
/// Quantize on append and dequantize, for every codec: CPU twin vs the oracle (codes, scales and group parameters bit for
/// bit; dequantized values exactly), GPU (every backend) vs CPU bit for bit, edge cases (an all-zero row, constant
/// groups, outlier channels, padding slots, page boundaries, strided sources), and bad input.
/// </summary>
public sealed class KvQuantTests(Backends backends)
{
    public sealed record QuantCase(string Name, QuantizedKvPool Pool, int NumTokens, bool Bf16, long Stride = 0, int PadEvery = 0)
    {
        public override string ToString() => Name;
    }

    private static QuantizedKvPool P(int pages, int pageSize, int hkv, int dim, KvFormat format, KvLayout layout = KvLayout.Nhd) =>
        new(new PagedKvLayout(pages, pageSize, hkv, dim, layout), format);

    public static IReadOnlyList<QuantCase> Cases { get; } =
    [
        new("fp8e4m3-token-fp16-nhd", P(4, 16, 2, 64, KvFormat.Fp8E4M3()), 37, false, PadEvery: 5),
        new("fp8e5m2-tensor-recip-bf16-hnd", P(3, 16, 2, 128, KvFormat.Fp8E5M2(KvScaleGranularity.PerTensor, Fp8ScaleConvention.MultiplyReciprocal), KvLayout.Hnd), 29, true),
        new("fp8e4m3-head-recip-fp16", P(3, 8, 3, 32, KvFormat.Fp8E4M3(KvScaleGranularity.PerKvHead, Fp8ScaleConvention.MultiplyReciprocal)), 19, false),
        new("int8-token-bf16-hnd", P(3, 16, 2, 80, KvFormat.Int8(), KvLayout.Hnd), 33, true, PadEvery: 7),
        new("int8-head-fp16", P(2, 16, 4, 16, KvFormat.Int8(KvScaleGranularity.PerKvHead)), 20, false),
        new("asym8-row-fp16", P(3, 16, 2, 48, KvFormat.Int8Asymmetric()), 31, false),
        new("kivi4-values-bf16-hnd", P(3, 16, 2, 64, KvFormat.KiviValues(4), KvLayout.Hnd), 40, true),
        new("kivi2-values-g16-fp16-strided", P(3, 16, 2, 128, KvFormat.KiviValues(2, 16)), 23, false, Stride: 2 * 128 * 3),
        new("kivi4-keys-fp16-nhd", P(4, 32, 2, 64, KvFormat.KiviKeys(4)), 96, false, PadEvery: 3),
        new("kivi2-keys-g16-bf16-hnd", P(3, 64, 2, 72, KvFormat.KiviKeys(2, 16), KvLayout.Hnd), 64, true),
        new("kivi2-keys-fp16-stride", P(2, 32, 3, 32, KvFormat.KiviKeys(2)), 64, false, Stride: 3 * 32 + 8),
        new("empty", P(2, 16, 2, 64, KvFormat.Fp8E4M3()), 0, false),
    ];

    public static TheoryData<int> CaseIndices => new(Enumerable.Range(0, Cases.Count));

    public static TheoryData<string, int> BackendCases => Backends.CasesOnEach(Cases.Count);

    /// <summary>Inputs: source rows (keys-like: a few outlier channels), slots (random distinct, every PadEvery-th −1; per
    /// group for token groups), given scales; token 0 head 0 is all zeros and token 1 head 0 (or channel 1 of the first
    /// group) is constant.</summary>
    internal sealed record Inputs<T>(KvQuantizeSpec Spec, T[] Source, int[] Slots, float[] GivenScales) where T : unmanaged;

    internal static Inputs<T> Create<T>(QuantCase c, int seed) where T : unmanaged
    {
        var spec = new KvQuantizeSpec(c.Pool, c.NumTokens, c.Stride);
        var rng = new Random(seed);
        int hkv = c.Pool.Pages.NumKvHeads, dim = c.Pool.Pages.HeadDim;
        long length = c.NumTokens == 0 ? 0 : (c.NumTokens - 1) * spec.Stride + hkv * dim;
        var source = new T[length];
        var outliers = new HashSet<int> { 1 % dim, 5 % dim, dim - 3 };
        for (int t = 0; t < c.NumTokens; t++)
            for (int h = 0; h < hkv; h++)
                for (int d = 0; d < dim; d++)
                {
                    double v = (rng.NextDouble() * 2 - 1) * (outliers.Contains(d) ? 12 : 1);
                    if (t == 0 && h == 0) v = 0;
                    if (c.Pool.TokenGroups ? d == 1 : t == 1 && h == 0) v = 0.75;
                    source[t * spec.Stride + h * dim + d] = AttentionElements.FromFloat<T>((float)v);
                }
        int slotCount = spec.SlotCount, unit = c.Pool.TokenGroups ? c.Pool.Group : 1;
        var free = Enumerable.Range(0, (int)(c.Pool.Pages.Slots / unit)).Select(i => i * unit).ToArray();
        rng.Shuffle(free);
        var slots = Enumerable.Range(0, slotCount).Select(i => c.PadEvery > 0 && i % c.PadEvery == c.PadEvery - 1 ? -1 : free[i]).ToArray();
        var given = Enumerable.Range(0, c.Pool.GivenScaleCount).Select(i => 0.01f + 0.003f * i).ToArray();
        return new Inputs<T>(spec, source, slots, given);
    }

    /// <summary>The pool buffers, filled with recognisable values so unwritten parts show.</summary>
    internal sealed record Buffers<T>(byte[] Codes, float[] TokenScales, T[] GroupParams) where T : unmanaged
    {
        public static Buffers<T> Filled(in QuantizedKvPool pool) => new(
            Enumerable.Repeat((byte)0xA5, (int)pool.CodeBytes).ToArray(),
            Enumerable.Repeat(-3f, (int)pool.TokenScaleCount).ToArray(),
            Enumerable.Repeat(AttentionElements.FromFloat<T>(-5f), (int)pool.GroupParamCount).ToArray());
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Cpu_MatchesOracle(int caseIndex)
    {
        var c = Cases[caseIndex];
        if (c.Bf16) CheckCpu<BFloat16>(c);
        else CheckCpu<Half>(c);
    }

    private static void CheckCpu<T>(QuantCase c) where T : unmanaged
    {
        var input = Create<T>(c, c.Name.Length);
        var actual = Buffers<T>.Filled(c.Pool);
        KvQuantCpu.Quantize<T>(input.Spec, input.Source, input.Slots, input.GivenScales, actual.Codes, actual.TokenScales, actual.GroupParams);

        var oracle = QuantOracle.Quantize<T>(input.Spec, AttentionElements.ToDoubles<T>(input.Source).Select(x => (float)x).ToArray(), input.Slots, input.GivenScales);
        var expected = Buffers<T>.Filled(c.Pool);
        QuantOracle.Pack(c.Pool, oracle, expected.Codes, expected.TokenScales, expected.GroupParams);
        AssertSame(expected, actual);

        // Every written element dequantizes to the oracle's value, rounded once to the element type.
        int checkedValues = 0;
        foreach (var (slot, head) in oracle.Codes.Keys)
            for (int d = 0; d < c.Pool.Pages.HeadDim; d++)
            {
                float want = QuantOracle.Dequantize(c.Pool, oracle, input.GivenScales, slot, head, d);
                float got = KvQuantCpu.DequantizeElement<T>(c.Pool, actual.Codes, c.Pool.Format.HasTokenScales ? actual.TokenScales : input.GivenScales,
                    actual.GroupParams, slot, head, d);
                Assert.True(BitConverter.SingleToInt32Bits(want) == BitConverter.SingleToInt32Bits(got), $"({slot}, {head}, {d}): {got}, oracle {want}");
                checkedValues++;
            }
        int written = input.Slots.Count(s => s >= 0) * (c.Pool.TokenGroups ? c.Pool.Group : 1) * c.Pool.Pages.NumKvHeads * c.Pool.Pages.HeadDim;
        Assert.Equal(written, checkedValues);
    }

    [Fact]
    public void EdgeRows_DecodeExactly()
    {
        // The all-zero row decodes to zeros, the constant group to its value, in every codec.
        foreach (var c in Cases.Where(c => c.NumTokens > 0))
        {
            var input = Create<Half>(c, 3);
            var buffers = Buffers<Half>.Filled(c.Pool);
            KvQuantCpu.Quantize<Half>(input.Spec, input.Source, input.Slots, input.GivenScales, buffers.Codes, buffers.TokenScales, buffers.GroupParams);
            var scales = c.Pool.Format.HasTokenScales ? buffers.TokenScales : input.GivenScales;
            int dim = c.Pool.Pages.HeadDim;
            if (input.Slots[0] < 0) continue;
            for (int d = 0; d < dim; d++)
            {
                float zero = KvQuantCpu.DequantizeElement<Half>(c.Pool, buffers.Codes, scales, buffers.GroupParams, input.Slots[0], 0, d);
                if (!c.Pool.TokenGroups) Assert.Equal(0f, zero);
            }
            if (c.Pool.Format.Codec != KvCodec.Asymmetric) continue;
            // Asymmetric: a constant group (token 1 head 0, or channel 1 of the first token group) is exact.
            long slot = c.Pool.TokenGroups ? input.Slots[0] + 5 : input.Slots[1];
            if (input.Slots[c.Pool.TokenGroups ? 0 : 1] < 0) continue;
            int channel = c.Pool.TokenGroups ? 1 : 0;
            Assert.Equal(0.75f, KvQuantCpu.DequantizeElement<Half>(c.Pool, buffers.Codes, scales, buffers.GroupParams, slot, 0, channel));
        }
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void CpuDequantize_MatchesOracle(int caseIndex)
    {
        var c = Cases[caseIndex];
        if (c.Bf16) CheckDequantize<BFloat16>(c);
        else CheckDequantize<Half>(c);
    }

    /// <summary>A full pool (every slot written) read back through a two-sequence block table.</summary>
    private static (KvQuantizeSpec Spec, T[] Source, int[] Slots, float[] Given, KvDequantizeSpec Read, int[] Table, int[] Lengths) FullPool<T>(QuantCase c, int seed)
        where T : unmanaged
    {
        int unit = c.Pool.TokenGroups ? c.Pool.Group : 1;
        var full = c with { NumTokens = (int)c.Pool.Pages.Slots, PadEvery = 0, Stride = 0 };
        var input = Create<T>(full, seed);
        int pages = c.Pool.Pages.NumPages, pageSize = c.Pool.Pages.PageSize;
        var order = Enumerable.Range(0, pages).ToArray();
        new Random(seed).Shuffle(order);
        int first = (pages + 1) / 2, maxPages = first;
        var table = new int[2 * maxPages];
        Array.Fill(table, -1);
        for (int p = 0; p < first; p++) table[p] = order[p];
        for (int p = first; p < pages; p++) table[maxPages + p - first] = order[p];
        int[] lengths = [first * pageSize - (unit == 1 ? 3 : 0), (pages - first) * pageSize];
        var read = new KvDequantizeSpec(c.Pool, 2, maxPages, maxPages * pageSize + 1);
        return (input.Spec, input.Source, input.Slots, input.GivenScales, read, table, lengths);
    }

    private static void CheckDequantize<T>(QuantCase c) where T : unmanaged
    {
        var (spec, source, slots, given, read, table, lengths) = FullPool<T>(c, 11);
        var buffers = Buffers<T>.Filled(c.Pool);
        KvQuantCpu.Quantize<T>(spec, source, slots, given, buffers.Codes, buffers.TokenScales, buffers.GroupParams);
        var oracle = QuantOracle.Quantize<T>(spec, AttentionElements.ToDoubles<T>(source).Select(x => (float)x).ToArray(), slots, given);

        var output = AttentionElements.Poisoned<T>(read.DestinationElements);
        var scales = c.Pool.Format.HasTokenScales ? buffers.TokenScales : given;
        KvQuantCpu.Dequantize<T>(read, buffers.Codes, scales, buffers.GroupParams, table, lengths, output);
        int hkv = c.Pool.Pages.NumKvHeads, dim = c.Pool.Pages.HeadDim, pageSize = c.Pool.Pages.PageSize;
        for (int b = 0; b < 2; b++)
            for (int n = 0; n < read.MaxTokens; n++)
                for (int h = 0; h < hkv; h++)
                    for (int d = 0; d < dim; d++)
                    {
                        double got = AttentionElements.ToDouble(output[((b * read.MaxTokens + n) * hkv + h) * dim + d]);
                        double want = n < lengths[b]
                            ? AttentionElements.ToDouble(AttentionElements.FromFloat<T>(QuantOracle.Dequantize(c.Pool, oracle, given,
                                (long)table[b * read.MaxPagesPerSequence + n / pageSize] * pageSize + n % pageSize, h, d)))
                            : 0;
                        Assert.True(got == want, $"[{b}, {n}, {h}, {d}] = {got}, oracle {want}");
                    }
    }

    [Theory]
    [MemberData(nameof(BackendCases))]
    public void Gpu_MatchesCpu(string backend, int caseIndex)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        if (c.Bf16) CheckGpu<BFloat16>(device, c);
        else CheckGpu<Half>(device, c);
    }

    private static void CheckGpu<T>(CudaDevice device, QuantCase c) where T : unmanaged
    {
        var ops = new KvQuantKernels(device);
        // Quantize on append (with padding slots, strides): codes, scales and parameters equal the CPU's.
        var input = Create<T>(c, c.Name.Length + 1);
        var expected = Buffers<T>.Filled(c.Pool);
        KvQuantCpu.Quantize<T>(input.Spec, input.Source, input.Slots, input.GivenScales, expected.Codes, expected.TokenScales, expected.GroupParams);
        var actual = RunQuantize(device, ops, c, input.Spec, input.Source, input.Slots, input.GivenScales, out _);
        AssertSame(expected, actual);

        // Dequantize a full pool through a block table.
        if (c.NumTokens == 0) return;
        var (spec, source, slots, given, read, table, lengths) = FullPool<T>(c, 5);
        var full = RunQuantize(device, ops, c, spec, source, slots, given, out var givenScales);
        var cpuOut = new T[read.DestinationElements];
        var scales = c.Pool.Format.HasTokenScales ? full.TokenScales : given;
        KvQuantCpu.Dequantize<T>(read, full.Codes, scales, full.GroupParams, table, lengths, cpuOut);

        using var dCodes = device.Allocate<byte>(full.Codes);
        using var dScales = device.Allocate<float>(full.TokenScales);
        using var dParams = device.Allocate<T>(full.GroupParams);
        using var dOut = device.Allocate<T>(AttentionElements.Poisoned<T>(read.DestinationElements));
        using var dTable = new DeviceBlockTable(device, 2, read.MaxPagesPerSequence);
        dTable.Update(table, lengths, c.Pool.Pages);
        ops.Dequantize(read, dCodes.Span, dScales.Span, givenScales, dParams.Span, dTable, dOut.Span);
        device.DefaultStream.Synchronize();
        givenScales?.Dispose();
        Assert.Equal(Bits(cpuOut), Bits(dOut.ToArray()));
    }

    private static Buffers<T> RunQuantize<T>(CudaDevice device, KvQuantKernels ops, QuantCase c, KvQuantizeSpec spec, T[] source, int[] slots,
        float[] given, out DeviceKvScales? givenScales) where T : unmanaged
    {
        var start = Buffers<T>.Filled(c.Pool);
        using var dSource = device.Allocate<T>(source);
        using var dCodes = device.Allocate<byte>(start.Codes);
        using var dScales = device.Allocate<float>(start.TokenScales);
        using var dParams = device.Allocate<T>(start.GroupParams);
        using var dSlots = new DeviceSlotMapping(device, Math.Max(1, slots.Length));
        if (c.Pool.TokenGroups) dSlots.UpdateGroups(slots, c.Pool.Pages, c.Pool.Group);
        else dSlots.Update(slots, c.Pool.Pages);
        givenScales = null;
        if (given.Length > 0)
        {
            givenScales = new DeviceKvScales(device, given.Length);
            givenScales.Update(given);
        }
        ops.Quantize(spec, dSource.Span, dSlots, givenScales, dCodes.Span, dScales.Span, dParams.Span);
        device.DefaultStream.Synchronize();
        return new Buffers<T>(dCodes.ToArray(), dScales.ToArray(), dParams.ToArray());
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Calibration_GpuMatchesCpuAndDefinition(string backend)
    {
        var device = backends.Get(backend);
        var rng = new Random(4);
        int tokens = 21, hkv = 3, dim = 40;
        var source = Enumerable.Range(0, tokens * hkv * dim).Select(_ => (Half)(float)(rng.NextDouble() * 8 - 4)).ToArray();
        for (int i = 0; i < dim; i++) source[(5 * hkv + 1) * dim + i] = (Half)(-90f + i % 3);   // head 1's max: |−90|
        for (int t = 0; t < tokens; t++)
            for (int i = 0; i < dim; i++) source[(t * hkv + 2) * dim + i] = Half.Zero;            // head 2 is all zeros

        var perHead = new float[hkv];
        KvQuantCpu.CalibrateScales<Half>(source, tokens, hkv, dim, 200f, perHead);
        for (int h = 0; h < hkv; h++)
        {
            double amax = Enumerable.Range(0, tokens).SelectMany(t => source.Skip((t * hkv + h) * dim).Take(dim)).Max(x => Math.Abs((double)x));
            Assert.Equal(amax > 0 ? (float)(amax / 200) : 1f, perHead[h]);
        }
        Assert.Equal(90f / 200f, perHead[1]);
        var perTensor = new float[1];
        KvQuantCpu.CalibrateScales<Half>(source, tokens, hkv, dim, 200f, perTensor);
        Assert.Equal(90f / 200f, perTensor[0]);

        using var dSource = device.Allocate<Half>(source);
        using var scales = new DeviceKvScales(device, hkv);
        var ops = new KvQuantKernels(device);
        ops.CalibrateScales(dSource.Span, tokens, hkv, dim, 200f, perKvHead: true, scales);
        device.DefaultStream.Synchronize();
        Assert.Equal(hkv, scales.Count);
        Assert.Equal(perHead, Download(scales));
        ops.CalibrateScales(dSource.Span, tokens, hkv, dim, 200f, perKvHead: false, scales);
        device.DefaultStream.Synchronize();
        Assert.Equal(perTensor, Download(scales));
    }

    private static float[] Download(DeviceKvScales scales) => scales.Scales.Slice(0, scales.Count).ToArray();

    [Fact]
    public void BadInput_IsRejected()
    {
        var c = Cases[0];
        var input = Create<Half>(c, 1);
        var b = Buffers<Half>.Filled(c.Pool);
        void Run(KvQuantizeSpec s, Half[] src, int[] slots, float[] given, byte[] codes, float[] scales, Half[] ps) =>
            KvQuantCpu.Quantize<Half>(s, src, slots, given, codes, scales, ps);
        string Param(Action a) => Assert.Throws<ArgumentException>(a).ParamName!;

        Assert.Equal("source", Param(() => Run(input.Spec, input.Source[1..], input.Slots, [], b.Codes, b.TokenScales, b.GroupParams)));
        Assert.Equal("slots", Param(() => Run(input.Spec, input.Source, input.Slots[1..], [], b.Codes, b.TokenScales, b.GroupParams)));
        Assert.Equal("codes", Param(() => Run(input.Spec, input.Source, input.Slots, [], b.Codes[1..], b.TokenScales, b.GroupParams)));
        Assert.Equal("tokenScales", Param(() => Run(input.Spec, input.Source, input.Slots, [], b.Codes, b.TokenScales[1..], b.GroupParams)));
        var dup = (int[])input.Slots.Clone();
        dup[1] = dup[0];
        Assert.Equal("slots", Param(() => Run(input.Spec, input.Source, dup, [], b.Codes, b.TokenScales, b.GroupParams)));

        // Format errors: group not dividing the head dim, unsupported bits, head dim not a multiple of 16 for 8-bit codes.
        Assert.Equal("spec", Param(() => new KvQuantizeSpec(P(2, 16, 1, 48, KvFormat.KiviValues(4, 32)), 1).Validate()));
        Assert.Equal("spec", Param(() => new KvQuantizeSpec(P(2, 16, 1, 64, new KvFormat(KvCodec.Asymmetric, 3, GroupSize: 32)), 1).Validate()));
        Assert.Equal("spec", Param(() => new KvQuantizeSpec(P(2, 16, 1, 40, KvFormat.Fp8E4M3()), 1).Validate()));
        Assert.Equal("spec", Param(() => new KvQuantizeSpec(P(2, 16, 1, 64, KvFormat.KiviKeys(4, 32)), 32).Validate()));   // page 16 < group 32
        Assert.Equal("spec", Param(() => new KvQuantizeSpec(P(2, 32, 1, 64, KvFormat.KiviKeys(4, 32)), 33).Validate()));   // not whole groups
        Assert.Equal("spec", Param(() => new KvQuantizeSpec(P(2, 16, 1, 64, KvFormat.Unquantized), 1).Validate()));

        // Given scales: missing, or not positive.
        var tensor = Cases[1];
        var tIn = Create<BFloat16>(tensor, 1);
        var tb = Buffers<BFloat16>.Filled(tensor.Pool);
        Assert.Equal("givenScales", Param(() => KvQuantCpu.Quantize<BFloat16>(tIn.Spec, tIn.Source, tIn.Slots, [], tb.Codes, tb.TokenScales, tb.GroupParams)));
        Assert.Equal("givenScales", Param(() => KvQuantCpu.Quantize<BFloat16>(tIn.Spec, tIn.Source, tIn.Slots, [0f], tb.Codes, tb.TokenScales, tb.GroupParams)));

        // Token groups: a group slot not at a multiple of G.
        var keys = Cases[8];
        var kIn = Create<Half>(keys, 1);
        var kb = Buffers<Half>.Filled(keys.Pool);
        var shifted = kIn.Slots.Select(s => s < 0 ? s : s + 1).ToArray();
        Assert.Equal("slots", Param(() => KvQuantCpu.Quantize<Half>(kIn.Spec, kIn.Source, shifted, [], kb.Codes, kb.TokenScales, kb.GroupParams)));
        Assert.Equal("groupParams", Param(() => KvQuantCpu.Quantize<Half>(kIn.Spec, kIn.Source, kIn.Slots, [], kb.Codes, kb.TokenScales, kb.GroupParams[2..])));

        // Dequantize: a page index out of range, a length beyond the sequence's pages.
        var read = new KvDequantizeSpec(c.Pool, 1, 2, 32);
        var dst = new Half[read.DestinationElements];
        Assert.Equal("blockTable", Param(() => KvQuantCpu.Dequantize<Half>(read, b.Codes, b.TokenScales, b.GroupParams, [0, 9], [20], dst)));
        Assert.Equal("sequenceLengths", Param(() => KvQuantCpu.Dequantize<Half>(read, b.Codes, b.TokenScales, b.GroupParams, [0, 1], [33], dst)));
        Assert.Equal("destination", Param(() => KvQuantCpu.Dequantize<Half>(read, b.Codes, b.TokenScales, b.GroupParams, [0, 1], [20], dst[1..])));
    }

    [Fact]
    public void Fp8_MatchesReference()
    {
        for (int code = 0; code < 256; code++)
        {
            Assert.Equal(Common.Fp8Reference.Decode(Common.Fp8Format.E4M3, (byte)code), (double)Fp8.FromE4M3((byte)code));
            var e5 = Common.Fp8Reference.Decode(Common.Fp8Format.E5M2, (byte)code);
            Assert.Equal(e5, (double)Fp8.FromE5M2((byte)code));
        }
        var rng = new Random(8);
        for (int i = 0; i < 200_000; i++)
        {
            float x = i % 2 == 0 ? (float)((rng.NextDouble() * 2 - 1) * Math.Pow(2, rng.Next(-20, 18))) : BitConverter.Int32BitsToSingle(rng.Next());
            if (float.IsNaN(x)) continue;
            Assert.Equal(Common.Fp8Reference.Encode(Common.Fp8Format.E4M3, x), Fp8.ToE4M3(x));
            Assert.Equal(Common.Fp8Reference.Encode(Common.Fp8Format.E5M2, x), Fp8.ToE5M2(x));
        }
    }

    /// <summary>Values where fp8(x / s) and fp8(x · (1/s)) differ: with s = 7, x = s · (midpoint of two codes) is exact in
    /// fp16, x / s is exactly the tie (→ the even code) while x · fl(1/s) (fl(1/7) is 4.2e-8 high) rounds just above it
    /// where the midpoint's mantissa is ≥ 1.44. Each convention gives its own
    /// code, on the CPU and on every backend.</summary>
    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Fp8Conventions_GiveTheirOwnCodes(string backend)
    {
        const float s = 7f;
        var xs = new List<Half>();
        for (int code = 1; code < 0x7E && xs.Count < 16; code++)
        {
            // s · (midpoint of codes code and code + 1), exact in fp16.
            double mid = (Fp8.FromE4M3((byte)code) + Fp8.FromE4M3((byte)(code + 1))) / 2;
            var centre = (Half)(mid * s);
            for (int step = 0; step <= 0; step++)
            {
                var x = BitConverter.UInt16BitsToHalf((ushort)(BitConverter.HalfToUInt16Bits(centre) + step));
                float xf = (float)x;
                if (Fp8.ToE4M3((float)((double)xf / s)) != Fp8.ToE4M3((float)((double)xf * (float)(1.0 / s)))) xs.Add(x);
            }
        }
        Assert.NotEmpty(xs);
        while (xs.Count % 16 != 0) xs.Add(xs[0]);
        var device = backends.Get(backend);
        var ops = new KvQuantKernels(device);
        foreach (var convention in new[] { Fp8ScaleConvention.Divide, Fp8ScaleConvention.MultiplyReciprocal })
        {
            var pool = P(1, 1, 1, xs.Count, KvFormat.Fp8E4M3(KvScaleGranularity.PerTensor, convention));
            var spec = new KvQuantizeSpec(pool, 1);
            var codes = new byte[pool.CodeBytes];
            KvQuantCpu.Quantize<Half>(spec, xs.ToArray(), [0], [s], codes, [], []);
            for (int i = 0; i < xs.Count; i++)
            {
                float x = (float)xs[i];
                byte want = convention == Fp8ScaleConvention.Divide ? Fp8.ToE4M3((float)((double)x / s)) : Fp8.ToE4M3((float)((double)x * (float)(1.0 / s)));
                Assert.Equal(want, codes[i]);
            }
            var gpu = RunQuantize(device, ops, new QuantCase("conv", pool, 1, false), spec, xs.ToArray(), [0], [s], out var given);
            given?.Dispose();
            Assert.Equal(codes, gpu.Codes);
        }
    }

    [Fact]
    public void BytesPerRow_CountsCodesAndScales()
    {
        Assert.Equal(256, KvFormat.Unquantized.BytesPerRow(128));
        Assert.Equal(132, KvFormat.Fp8E4M3().BytesPerRow(128));
        Assert.Equal(128, KvFormat.Fp8E4M3(KvScaleGranularity.PerTensor).BytesPerRow(128));
        Assert.Equal(64 + 16, KvFormat.KiviValues(4).BytesPerRow(128));        // 4 groups × (scale, min) × 2 B
        Assert.Equal(32 + 128 * 4 / 32.0, KvFormat.KiviKeys(2).BytesPerRow(128)); // per channel (scale, min) over 32 tokens
    }

    private static void AssertSame<T>(Buffers<T> expected, Buffers<T> actual) where T : unmanaged
    {
        int firstCode = Enumerable.Range(0, expected.Codes.Length).FirstOrDefault(i => expected.Codes[i] != actual.Codes[i], -1);
        Assert.True(firstCode < 0, $"codes[{firstCode}] = 0x{(firstCode < 0 ? 0 : actual.Codes[firstCode]):x2}, expected 0x{(firstCode < 0 ? 0 : expected.Codes[firstCode]):x2}");
        Assert.Equal(expected.TokenScales.Select(BitConverter.SingleToInt32Bits), actual.TokenScales.Select(BitConverter.SingleToInt32Bits));
        Assert.Equal(Bits(expected.GroupParams), Bits(actual.GroupParams));
    }

    private static ushort[] Bits<T>(T[] values) where T : unmanaged => MemoryMarshal.Cast<T, ushort>(values).ToArray();
}
