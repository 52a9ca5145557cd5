using System.Runtime.InteropServices;
using KvKernels;
using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Quantization;
using KvKernels.Tests.Oracles;

namespace KvCheck.Verification;

/// <summary>A quantize-on-append problem: the pool (geometry + format), tokens, padding, element type.</summary>
internal sealed record QuantizeShape(QuantizedKvPool Pool, int Tokens, bool Bf16, int PadEvery = 0) : VerificationShape
{
    public override string Description =>
        $"{Pool.Format}: T={Tokens} Hkv={Pool.Pages.NumKvHeads} D={Pool.Pages.HeadDim} page={Pool.Pages.PageSize} " +
        $"{(Pool.Pages.Layout == KvLayout.Nhd ? "NHD" : "HND")} {(Bf16 ? "bf16" : "fp16")}{(PadEvery > 0 ? $" pad=1/{PadEvery}" : "")}";
}

/// <summary>A quantized decode-attention problem: the spec and each sequence's length.</summary>
internal sealed record QuantAttentionShape(QuantizedAttentionSpec Spec, int[] Lengths) : VerificationShape
{
    public override string Description =>
        $"K {Spec.KeyFormat} V {Spec.ValueFormat}: B={Spec.BatchSize} q={Spec.QueryLength} Hq={Spec.NumQueryHeads} Hkv={Spec.NumKvHeads} " +
        $"D={Spec.HeadDim} page={Spec.Pages.PageSize} N=[{string.Join(',', Lengths)}] {Spec.InputType}→{Spec.OutputType}";
}

/// <summary>
/// The quantization family. Quantize: the CPU twin's codes, scales and group parameters against the oracle bit for bit,
/// and every written element's dequantized value exactly; on the GPU, quantize and dequantize against the CPU bit for
/// bit. Attention: the CPU twin against a float64 oracle over the dequantized tensors, the GPU against the CPU within
/// the output type's tolerance.
/// </summary>
internal static class QuantVerifications
{
    public static IReadOnlyList<IVerification> All { get; } = [new QuantizeVerification(), new QuantAttentionVerification()];

    internal static KvQuantKernels Kernels(GpuContext gpu) => gpu.Get(device => new KvQuantKernels(device));

    internal static T[] Random<T>(Random rng, long count, int dim) where T : unmanaged
    {
        var values = new T[count];
        for (long i = 0; i < count; i++)
            values[i] = AttentionElements.FromFloat<T>((float)((rng.NextDouble() * 2 - 1) * (i % dim == 3 ? 12 : 1)));
        return values;
    }

    /// <summary>Quantizes <paramref name="source"/> into fresh buffers on the CPU.</summary>
    internal static (byte[] Codes, float[] TokenScales, T[] Params) Quantize<T>(in KvQuantizeSpec spec, T[] source, int[] slots, float[] given)
        where T : unmanaged
    {
        var codes = new byte[spec.Pool.CodeBytes];
        var scales = new float[spec.Pool.TokenScaleCount];
        var ps = new T[spec.Pool.GroupParamCount];
        KvQuantCpu.Quantize<T>(spec, source, slots, given, codes, scales, ps);
        return (codes, scales, ps);
    }

    internal static VerificationOutcome Bits<T>(string name, T[] actual, T[] expected) where T : unmanaged =>
        Comparison.Compare<byte>(name, MemoryMarshal.AsBytes(actual.AsSpan()), MemoryMarshal.AsBytes(expected.AsSpan()), ElementKind.U8);
}

internal sealed class QuantizeVerification() : Verification<QuantizeShape>("quant", "quantize", ShapeList())
{
    private static QuantizedKvPool P(int pages, int pageSize, int hkv, int dim, KvFormat format, KvLayout layout = KvLayout.Nhd) =>
        new(new PagedKvLayout(pages, pageSize, hkv, dim, layout), format);

    private static QuantizeShape[] ShapeList() =>
    [
        new(P(4, 16, 8, 128, KvFormat.Fp8E4M3()), 61, true, PadEvery: 7),
        new(P(3, 16, 2, 64, KvFormat.Fp8E5M2(KvScaleGranularity.PerKvHead, Fp8ScaleConvention.MultiplyReciprocal), KvLayout.Hnd), 37, false),
        new(P(3, 16, 3, 96, KvFormat.Int8()), 41, false),
        new(P(3, 16, 2, 48, KvFormat.Int8Asymmetric()), 19, true),
        new(P(4, 32, 2, 128, KvFormat.KiviValues(4)), 77, false, PadEvery: 5),
        new(P(4, 32, 2, 128, KvFormat.KiviKeys(4)), 96, true),
        new(P(3, 64, 1, 72, KvFormat.KiviKeys(2, 16), KvLayout.Hnd), 128, false, PadEvery: 3),
        new(P(3, 16, 4, 64, KvFormat.KiviValues(2, 16), KvLayout.Hnd), 33, true),
    ];

    protected override VerificationOutcome RunCpu(QuantizeShape shape, int seed) => shape.Bf16 ? Run<BFloat16>(shape, seed, null) : Run<Half>(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, QuantizeShape shape, int seed) =>
        shape.Bf16 ? Run<BFloat16>(shape, seed, gpu) : Run<Half>(shape, seed, gpu);

    private static VerificationOutcome Run<T>(QuantizeShape shape, int seed, GpuContext? gpu) where T : unmanaged
    {
        var pool = shape.Pool;
        var rng = new Random(seed);
        var spec = new KvQuantizeSpec(pool, shape.Tokens);
        var source = QuantVerifications.Random<T>(rng, (long)shape.Tokens * pool.Pages.TokenElements, pool.Pages.HeadDim);
        int unit = pool.TokenGroups ? pool.Group : 1;
        var free = Enumerable.Range(0, (int)(pool.Pages.Slots / unit)).Select(i => i * unit).ToArray();
        rng.Shuffle(free);
        var slots = Enumerable.Range(0, spec.SlotCount).Select(i => shape.PadEvery > 0 && i % shape.PadEvery == shape.PadEvery - 1 ? -1 : free[i]).ToArray();
        var given = Enumerable.Range(0, pool.GivenScaleCount).Select(i => 0.02f + 0.005f * i).ToArray();
        var cpu = QuantVerifications.Quantize(spec, source, slots, given);

        if (gpu is null)
        {
            var oracle = QuantOracle.Quantize<T>(spec, AttentionElements.ToDoubles<T>(source).Select(x => (float)x).ToArray(), slots, given);
            var codes = new byte[pool.CodeBytes];
            var scales = new float[pool.TokenScaleCount];
            var ps = new T[pool.GroupParamCount];
            QuantOracle.Pack(pool, oracle, codes, scales, ps);
            var outcome = QuantVerifications.Bits("codes", cpu.Codes, codes)
                .And(QuantVerifications.Bits("tokenScales", cpu.TokenScales, scales))
                .And(QuantVerifications.Bits("groupParams", cpu.Params, ps));
            long wrong = 0;
            foreach (var (slot, head) in oracle.Codes.Keys)
                for (int d = 0; d < pool.Pages.HeadDim; d++)
                {
                    float want = QuantOracle.Dequantize(pool, oracle, given, slot, head, d);
                    float got = KvQuantCpu.DequantizeElement<T>(pool, cpu.Codes, pool.Format.HasTokenScales ? cpu.TokenScales : given, cpu.Params, slot, head, d);
                    if (BitConverter.SingleToInt32Bits(want) != BitConverter.SingleToInt32Bits(got)) wrong++;
                }
            return wrong == 0 ? outcome : outcome.WithFailure($"{wrong} dequantized values differ from the oracle");
        }

        var device = gpu.Device;
        var ops = QuantVerifications.Kernels(gpu);
        using var dSource = device.Allocate<T>(source);
        using var dCodes = device.Allocate<byte>(pool.CodeBytes);
        using var dScales = device.Allocate<float>(Math.Max(1, pool.TokenScaleCount));
        using var dParams = device.Allocate<T>(Math.Max(1, pool.GroupParamCount));
        dCodes.Span.FillBytes(0, gpu.Stream);
        dScales.Span.FillBytes(0, gpu.Stream);
        dParams.Span.FillBytes(0, gpu.Stream);
        using var mapping = new DeviceSlotMapping(device, Math.Max(1, slots.Length));
        if (pool.TokenGroups) mapping.UpdateGroups(slots, pool.Pages, pool.Group, gpu.Stream);
        else mapping.Update(slots, pool.Pages, gpu.Stream);
        using var givenScales = new DeviceKvScales(device, Math.Max(1, given.Length));
        if (given.Length > 0) givenScales.Update(given, gpu.Stream);
        ops.Quantize(spec, dSource.Span, mapping, given.Length > 0 ? givenScales : null, dCodes.Span,
            pool.TokenScaleCount > 0 ? dScales.Span : default, pool.GroupParamCount > 0 ? dParams.Span : default, gpu.Stream);

        // Dequantize every written token back through a one-sequence block table of all pages.
        int maxTokens = (int)pool.Pages.Slots;
        var read = new KvDequantizeSpec(pool, 1, pool.Pages.NumPages, maxTokens);
        var table = Enumerable.Range(0, pool.Pages.NumPages).ToArray();
        using var dTable = new DeviceBlockTable(device, 1, pool.Pages.NumPages);
        dTable.Update(table, [maxTokens], pool.Pages, gpu.Stream);
        using var dOut = device.Allocate<T>(read.DestinationElements);
        ops.Dequantize(read, dCodes.Span, pool.TokenScaleCount > 0 ? dScales.Span : default, given.Length > 0 ? givenScales : null,
            pool.GroupParamCount > 0 ? dParams.Span : default, dTable, dOut.Span, gpu.Stream);
        gpu.Stream.Synchronize();

        // The CPU's buffers started as zeros too, so unwritten parts compare equal as well.
        var expectedOut = new T[read.DestinationElements];
        KvQuantCpu.Dequantize<T>(read, cpu.Codes, pool.Format.HasTokenScales ? cpu.TokenScales : given, cpu.Params, table, [maxTokens], expectedOut);
        var gpuScales = dScales.ToArray();
        var gpuParams = dParams.ToArray();
        return QuantVerifications.Bits("codes", dCodes.ToArray(), cpu.Codes)
            .And(QuantVerifications.Bits("tokenScales", gpuScales.AsSpan(0, cpu.TokenScales.Length).ToArray(), cpu.TokenScales))
            .And(QuantVerifications.Bits("groupParams", gpuParams.AsSpan(0, cpu.Params.Length).ToArray(), cpu.Params))
            .And(QuantVerifications.Bits("dequantized", dOut.ToArray(), expectedOut));
    }
}

internal sealed class QuantAttentionVerification() : Verification<QuantAttentionShape>("quant", "attention", ShapeList())
{
    private static QuantizedAttentionSpec S(int b, int q, int hq, int hkv, int d, int pages, int pageSize, int maxPages, KvFormat k, KvFormat v,
        AttentionElement input, AttentionElement output) =>
        new(b, q, hq, hkv, d, new PagedKvLayout(pages, pageSize, hkv, d), maxPages, k, v) { InputType = input, OutputType = output };

    private static QuantAttentionShape[] ShapeList()
    {
        var bf16 = AttentionElement.BFloat16;
        var fp16 = AttentionElement.Float16;
        var fp32 = AttentionElement.Float32;
        return
        [
            new(S(3, 1, 32, 8, 128, 16, 16, 5, KvFormat.Fp8E4M3(), KvFormat.Fp8E4M3(), bf16, bf16), [0, 17, 65]),
            new(S(2, 2, 8, 2, 128, 12, 16, 6, KvFormat.Int8(), KvFormat.Int8(), fp16, fp32), [90, 1]),
            new(S(2, 1, 16, 2, 128, 16, 32, 8, KvFormat.KiviKeys(4), KvFormat.KiviValues(4), bf16, fp32), [224, 32]),
            new(S(1, 1, 4, 1, 64, 8, 32, 8, KvFormat.KiviKeys(2), KvFormat.KiviValues(2), fp16, fp16), [256]),
            new(S(1, 1, 8, 1, 256, 4, 32, 4, KvFormat.Fp8E5M2(KvScaleGranularity.PerTensor), KvFormat.KiviValues(4), bf16, bf16), [100]),
        ];
    }

    protected override VerificationOutcome RunCpu(QuantAttentionShape shape, int seed) => Dispatch(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, QuantAttentionShape shape, int seed) => Dispatch(shape, seed, gpu);

    private static VerificationOutcome Dispatch(QuantAttentionShape shape, int seed, GpuContext? gpu) => (shape.Spec.InputType, shape.Spec.OutputType) switch
    {
        (AttentionElement.Float16, AttentionElement.Float16) => Run<Half, Half>(shape, seed, gpu),
        (AttentionElement.Float16, _) => Run<Half, float>(shape, seed, gpu),
        (_, AttentionElement.BFloat16) => Run<BFloat16, BFloat16>(shape, seed, gpu),
        _ => Run<BFloat16, float>(shape, seed, gpu),
    };

    private static VerificationOutcome Run<TIn, TOut>(QuantAttentionShape shape, int seed, GpuContext? gpu) where TIn : unmanaged where TOut : unmanaged
    {
        var spec = shape.Spec;
        var rng = new Random(seed);
        // Every slot of both pools written; the block table hands out pages in a shuffled order.
        int tokens = (int)spec.Pages.Slots;
        (byte[] Codes, float[] Scales, TIn[] Params, float[] Given) Fill(QuantizedKvPool pool)
        {
            int unit = pool.TokenGroups ? pool.Group : 1;
            var source = QuantVerifications.Random<TIn>(rng, (long)tokens * pool.Pages.TokenElements, pool.Pages.HeadDim);
            var given = Enumerable.Range(0, pool.GivenScaleCount).Select(h => 0.03f * (1 + h)).ToArray();
            var q = QuantVerifications.Quantize(new KvQuantizeSpec(pool, tokens), source, Enumerable.Range(0, tokens / unit).Select(i => i * unit).ToArray(), given);
            return (q.Codes, pool.Format.HasTokenScales ? q.TokenScales : given, q.Params, given);
        }
        var k = Fill(spec.KeyPool);
        var v = Fill(spec.ValuePool);
        var pages = Enumerable.Range(0, spec.Pages.NumPages).ToArray();
        rng.Shuffle(pages);
        var table = new int[spec.BatchSize * spec.MaxPagesPerSequence];
        int next = 0;
        for (int b = 0; b < spec.BatchSize; b++)
            for (int p = 0; p < spec.MaxPagesPerSequence; p++)
                table[b * spec.MaxPagesPerSequence + p] = p * spec.Pages.PageSize < shape.Lengths[b] ? pages[next++] : -1;
        var query = QuantVerifications.Random<TIn>(rng, spec.Elements, spec.HeadDim);

        var output = new TOut[spec.Elements];
        var lse = new float[spec.Rows];
        QuantizedAttentionCpu.Decode<TIn, TOut>(spec, query, new QuantizedTensor<TIn>(k.Codes, k.Scales, k.Params),
            new QuantizedTensor<TIn>(v.Codes, v.Scales, v.Params), table, shape.Lengths, output, lse);
        double tolerance = AttentionVerifications.Tolerance(spec.OutputType);

        if (gpu is null)
        {
            var (expected, expectedLse) = Oracle(spec, shape.Lengths, table, query, k, v);
            return AttentionVerifications.Within<TOut>("output", output, expected, tolerance)
                .And(AttentionVerifications.Within<float>("lse", lse, expectedLse, 1e-5));
        }

        var device = gpu.Device;
        using var dQuery = device.Allocate<TIn>(query);
        using var kCodes = device.Allocate<byte>(k.Codes);
        using var kScales = device.Allocate<float>(spec.KeyFormat.HasTokenScales ? k.Scales : [0f]);
        using var kParams = device.Allocate<TIn>(k.Params.Length > 0 ? k.Params : new TIn[1]);
        using var vCodes = device.Allocate<byte>(v.Codes);
        using var vScales = device.Allocate<float>(spec.ValueFormat.HasTokenScales ? v.Scales : [0f]);
        using var vParams = device.Allocate<TIn>(v.Params.Length > 0 ? v.Params : new TIn[1]);
        using var kGiven = new DeviceKvScales(device, Math.Max(1, k.Given.Length));
        using var vGiven = new DeviceKvScales(device, Math.Max(1, v.Given.Length));
        if (k.Given.Length > 0) kGiven.Update(k.Given, gpu.Stream);
        if (v.Given.Length > 0) vGiven.Update(v.Given, gpu.Stream);
        using var dTable = new DeviceBlockTable(device, spec.BatchSize, spec.MaxPagesPerSequence);
        dTable.Update(table, shape.Lengths, spec.Pages, gpu.Stream);
        using var dOut = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.Elements));
        using var dLse = device.Allocate<float>(spec.Rows);
        using var workspace = new DecodeAttentionWorkspace(device, spec.Rows, spec.HeadDim, 16);
        gpu.Get(d => new QuantizedAttentionKernels(d)).Decode(spec, dQuery.Span,
            new DeviceQuantizedTensor<TIn>(kCodes.Span, kScales.Span, kGiven, kParams.Span),
            new DeviceQuantizedTensor<TIn>(vCodes.Span, vScales.Span, vGiven, vParams.Span), dTable, dOut.Span, dLse.Span, workspace, gpu.Stream);
        gpu.Stream.Synchronize();
        return AttentionVerifications.Within<TOut>("output", dOut.ToArray(), AttentionVerifications.Doubles<TOut>(output), tolerance)
            .And(AttentionVerifications.Within<float>("lse", dLse.ToArray(), AttentionVerifications.Doubles<float>(lse), 1e-5));
    }

    /// <summary>float64 attention over the dequantized tensors (KvQuantCpu.Dequantize, rounded to the element type).</summary>
    private static (double[] Output, double[] Lse) Oracle<TIn>(in QuantizedAttentionSpec spec, int[] lengths, int[] table, TIn[] query,
        (byte[] Codes, float[] Scales, TIn[] Params, float[] Given) k, (byte[] Codes, float[] Scales, TIn[] Params, float[] Given) v) where TIn : unmanaged
    {
        int maxTokens = spec.MaxPagesPerSequence * spec.Pages.PageSize, d = spec.HeadDim, hkv = spec.NumKvHeads, g = spec.NumQueryHeads / hkv;
        var read = new KvDequantizeSpec(spec.KeyPool, spec.BatchSize, spec.MaxPagesPerSequence, maxTokens);
        var kd = new TIn[read.DestinationElements];
        var vd = new TIn[read.DestinationElements];
        KvQuantCpu.Dequantize<TIn>(read, k.Codes, k.Scales, k.Params, table, lengths, kd);
        KvQuantCpu.Dequantize<TIn>(read with { Pool = spec.ValuePool }, v.Codes, v.Scales, v.Params, table, lengths, vd);
        var output = new double[spec.Elements];
        var lse = new double[spec.Rows];
        for (int b = 0; b < spec.BatchSize; b++)
            for (int i = 0; i < spec.QueryLength; i++)
                for (int h = 0; h < spec.NumQueryHeads; h++)
                {
                    long row = ((long)b * spec.QueryLength + i) * spec.NumQueryHeads + h;
                    int visible = Math.Clamp(lengths[b] + spec.TrailingTokens - spec.QueryLength + i + 1, 0, lengths[b]);
                    var s = new double[visible];
                    for (int n = 0; n < visible; n++)
                    {
                        double acc = 0;
                        for (int x = 0; x < d; x++)
                            acc += AttentionElements.ToDouble(query[row * d + x]) * AttentionElements.ToDouble(kd[(((long)b * maxTokens + n) * hkv + h / g) * d + x]);
                        s[n] = acc * spec.EffectiveScale;
                    }
                    double max = visible == 0 ? 0 : s.Max(), sum = s.Sum(x => Math.Exp(x - max));
                    lse[row] = visible == 0 ? double.NegativeInfinity : max + Math.Log(sum);
                    for (int x = 0; x < d; x++)
                    {
                        double acc = 0;
                        for (int n = 0; n < visible; n++) acc += Math.Exp(s[n] - max) * AttentionElements.ToDouble(vd[(((long)b * maxTokens + n) * hkv + h / g) * d + x]);
                        output[row * d + x] = visible == 0 ? 0 : acc / sum;
                    }
                }
        return (output, lse);
    }
}
