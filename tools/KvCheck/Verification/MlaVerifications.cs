using System.Runtime.InteropServices;
using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Mla;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvCheck.Verification;

/// <summary>A latent cache write: tokens, page size, RoPE, YaRN, norm, fused input, padding tokens.</summary>
internal sealed record MlaWriteShape(string Name, MlaCacheWriteSpec Spec, int PadEvery = 0) : VerificationShape
{
    public override string Description =>
        $"{Name}: T={Spec.NumTokens} dc={Spec.Shape.LatentDim} dr={Spec.Shape.RopeDim} page={Spec.Pool.PageSize} {Spec.Rope.Style}" +
        $"{(Spec.Rope.Yarn is null ? "" : " yarn")}{(Spec.Normalize ? " rmsnorm" : "")}{(Spec.LatentStride != 0 ? $" stride={Spec.LatentStride}" : "")}" +
        $"{(PadEvery > 0 ? $" pad=1/{PadEvery}" : "")} {Spec.ElementType}";
}

/// <summary>An MLA decode problem (latent attention or the whole step): the spec and each sequence's length.</summary>
internal sealed record MlaDecodeShape(string Name, MlaAttentionSpec Spec, int[] Lengths) : VerificationShape
{
    public override string Description
    {
        get
        {
            var s = Spec;
            string storage = s.Cache.IsPaged ? $"page={s.Cache.PageSize}" : "contiguous";
            return $"{Name}: B={s.BatchSize} q={s.QueryLength} H={s.Shape.NumHeads} dc={s.Shape.LatentDim} dr={s.Shape.RopeDim} " +
                $"N=[{string.Join(',', Lengths)}] {storage} {s.InputType}→{s.OutputType}";
        }
    }
}

/// <summary>
/// The MLA family's verifications. Cache write: CPU twin vs the float64 oracle within the element type's tolerance,
/// GPU vs CPU bit for bit in the latent part and every untouched slot (NaN), within one unit of the type in the RoPE
/// part (fp32 sin/cos differ by an ulp between the two). Latent attention and the whole step: CPU vs oracle,
/// GPU vs CPU within the output type's tolerance; the whole step also checks that the fp32 reference computed the
/// absorbed way equals the naive (decompressed) way within 1e-5 — the correctness of absorption itself.
/// </summary>
internal static class MlaVerifications
{
    public static IReadOnlyList<IVerification> All { get; } = [new MlaWriteVerification(), new MlaAttendVerification(), new MlaDecodeVerification()];

    internal static MlaKernels Kernels(GpuContext gpu) => gpu.Get(device => new MlaKernels(device));

    internal static MlaAttentionSpec Spec(int b, int q, MlaShape shape, KvCacheShape cache, AttentionElement input, AttentionElement output) =>
        new(b, q, shape, cache) { InputType = input, OutputType = output };

    /// <summary>Shapes shared by latent attention and the whole step: DeepSeek's 576/512 with TP shares of 128 heads,
    /// lengths around a 64-token page, q_len 1 and 2, fp16/bf16/fp32 outputs, contiguous, a long split row.</summary>
    internal static MlaDecodeShape[] DecodeShapes()
    {
        var bf16 = AttentionElement.BFloat16;
        var fp16 = AttentionElement.Float16;
        var fp32 = AttentionElement.Float32;
        return
        [
            new("deepseek tp8 page 64", Spec(5, 1, MlaShape.DeepSeek(16), KvCacheShape.Paged(12, 64, 3), bf16, bf16), [0, 1, 63, 64, 65]),
            new("deepseek 128 heads q2 lse", Spec(2, 2, MlaShape.DeepSeek(128), KvCacheShape.Paged(8, 64, 4), bf16, fp32), [130, 2]),
            new("fp16 odd page", Spec(2, 1, MlaShape.DeepSeek(32), KvCacheShape.Paged(30, 13, 12), fp16, fp16), [150, 37]),
            new("small dims contiguous", Spec(3, 2, new MlaShape(4, 128, 32, 64, 48), KvCacheShape.Contiguous(90), bf16, fp32), [90, 5, 1]),
            new("long context split", Spec(1, 1, MlaShape.DeepSeek(16), KvCacheShape.Paged(70, 64, 70), bf16, bf16), [4200]),
        ];
    }

    internal static VerificationOutcome Within<T>(string name, ReadOnlySpan<T> actual, ReadOnlySpan<double> expected, double tolerance)
        where T : unmanaged => AttentionVerifications.Within(name, actual, expected, tolerance);

    internal static double Tolerance(AttentionElement type) => AttentionVerifications.Tolerance(type);
}

internal sealed class MlaWriteVerification() : Verification<MlaWriteShape>("mla", "cache_write", ShapeList())
{
    private static MlaWriteShape[] ShapeList()
    {
        var deepseek = MlaShape.DeepSeek();
        static MlaCacheWriteSpec W(int tokens, MlaShape shape, int pageSize, AttentionElement type) =>
            new(tokens, shape, MlaCacheWriteSpec.LatentPool(shape, tokens / pageSize + 3, pageSize)) { ElementType = type };
        return
        [
            new("decode step", W(1, deepseek, 64, AttentionElement.BFloat16)),
            new("prefill, fused input, yarn", W(65, deepseek, 64, AttentionElement.BFloat16)
                with { LatentStride = 576, RopeStride = 576, Rope = new MlaRope(RopeStyle.Interleaved, 10000f, YarnScaling.DeepSeekV3) }),
            new("rotate-half fp16 odd page", W(37, deepseek, 13, AttentionElement.Float16) with { Rope = new MlaRope(RopeStyle.RotateHalf) }, PadEvery: 5),
            new("pre-rotated, no norm, small dims", W(9, new MlaShape(4, 128, 32, 64, 64), 7, AttentionElement.Float16)
                with { Rope = new MlaRope(RopeStyle.None), Normalize = false }),
        ];
    }

    protected override VerificationOutcome RunCpu(MlaWriteShape shape, int seed) => Dispatch(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, MlaWriteShape shape, int seed) => Dispatch(shape, seed, gpu);

    private static VerificationOutcome Dispatch(MlaWriteShape shape, int seed, GpuContext? gpu) =>
        shape.Spec.ElementType == AttentionElement.Float16 ? Run<Half>(shape, seed, gpu) : Run<BFloat16>(shape, seed, gpu);

    private static VerificationOutcome Run<T>(MlaWriteShape shape, int seed, GpuContext? gpu) where T : unmanaged
    {
        var spec = shape.Spec;
        var rng = new Random(seed);
        // Inputs: a fused [T, stride] buffer when the spec has strides, else two dense ones; positions up to ~160k.
        var latent = RandomValues<T>(rng, spec.LatentElements + spec.Shape.RopeDim, 3f);
        var rope = spec.LatentStride != 0 ? latent.AsSpan(spec.Shape.LatentDim).ToArray() : RandomValues<T>(rng, spec.RopeElements, 1f);
        var weight = spec.Normalize ? RandomValues<T>(rng, spec.Shape.LatentDim, 1f) : [];
        var positions = spec.Rope.Style == RopeStyle.None ? [] : Enumerable.Range(0, spec.NumTokens).Select(_ => rng.Next(160_000)).ToArray();
        var slotPool = Enumerable.Range(0, (int)spec.Pool.Slots).ToArray();
        rng.Shuffle(slotPool);
        var slots = Enumerable.Range(0, spec.NumTokens).Select(t => shape.PadEvery > 0 && t % shape.PadEvery == shape.PadEvery - 1 ? -1 : slotPool[t]).ToArray();
        var latentIn = latent.AsSpan(0, (int)spec.LatentElements).ToArray();
        var ropeIn = rope.AsSpan(0, (int)spec.RopeElements).ToArray();

        var cache = AttentionElements.Poisoned<T>(spec.Pool.PoolElements);
        MlaCpu.WriteCache<T>(spec, latentIn, ropeIn, positions, slots, weight, cache);
        if (gpu is null)
        {
            var expected = AttentionElements.ToDoubles<T>(AttentionElements.Poisoned<T>(spec.Pool.PoolElements));
            MlaOracle.CacheWrite(spec, AttentionElements.ToDoubles<T>(latentIn), AttentionElements.ToDoubles<T>(ropeIn), positions, slots,
                spec.Normalize ? AttentionElements.ToDoubles<T>(weight) : null, expected);
            // Compare the written rows only (the rest is NaN on both sides and must stay so).
            var written = new List<long>();
            foreach (int slot in slots.Where(s => s >= 0))
                for (int d = 0; d < spec.Shape.RowDim; d++) written.Add(spec.Pool.RowOffset(slot, 0) + d);
            var actualRows = written.Select(i => cache[i]).ToArray();
            var expectedRows = written.Select(i => expected[i]).ToArray();
            long untouched = cache.Length - written.Count;
            long stillNaN = Enumerable.Range(0, cache.Length).Count(i => double.IsNaN(AttentionElements.ToDouble(cache[i])));
            var outcome = MlaVerifications.Within<T>("rows", actualRows, expectedRows, MlaVerifications.Tolerance(spec.ElementType));
            return stillNaN == untouched ? outcome : outcome.WithFailure($"{untouched - stillNaN} untouched pool elements were written");
        }

        var device = gpu.Device;
        using var dLatent = device.Allocate<T>(latentIn);
        using var dRope = device.Allocate<T>(ropeIn);
        using var dPositions = device.Allocate<int>(positions);
        using var dWeight = device.Allocate<T>(weight);
        using var dCache = device.Allocate<T>(AttentionElements.Poisoned<T>(spec.Pool.PoolElements));
        using var mapping = new DeviceSlotMapping(device, Math.Max(1, slots.Length));
        mapping.Update(slots, spec.Pool, gpu.Stream);
        MlaVerifications.Kernels(gpu).Cache.Write(spec, dLatent.Span, dRope.Span, positions.Length == 0 ? default : dPositions.Span, mapping,
            weight.Length == 0 ? default : dWeight.Span, dCache.Span, gpu.Stream);
        gpu.Stream.Synchronize();
        // The latent part (and every untouched slot) must be bit-identical; the RoPE part within one unit of the type,
        // because the GPU's fp32 sin/cos and the CPU's differ by an ulp or two.
        var kind = typeof(T) == typeof(Half) ? ElementKind.Fp16 : ElementKind.Bf16;
        var actual = dCache.ToArray();
        var latentOrUntouched = new List<int>();
        long ropeMismatches = 0;
        string? ropeDetail = null;
        double ulp = typeof(T) == typeof(Half) ? 1.0 / 1024 : 1.0 / 128, maxRel = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            double e = AttentionElements.ToDouble(cache[i]);
            if (double.IsNaN(e) || i % spec.Shape.RowDim < spec.Shape.LatentDim)
            {
                latentOrUntouched.Add(i);
                continue;
            }
            double a = AttentionElements.ToDouble(actual[i]);
            double rel = Math.Abs(a - e) / Math.Max(Math.Abs(e), 1e-30);
            maxRel = Math.Max(maxRel, double.IsNaN(rel) ? double.PositiveInfinity : rel);
            if (!(Math.Abs(a - e) <= ulp * Math.Abs(e) + 1e-6))
            {
                ropeMismatches++;
                ropeDetail ??= $"rope pool[{i}] = {a:G5} vs expected {e:G5} (more than one unit apart)";
            }
        }
        var exact = Comparison.Compare<ushort>("pool",
            MemoryMarshal.Cast<T, ushort>(latentOrUntouched.Select(i => actual[i]).ToArray()),
            MemoryMarshal.Cast<T, ushort>(latentOrUntouched.Select(i => cache[i]).ToArray()), kind);
        return exact.And(new VerificationOutcome(actual.Length - latentOrUntouched.Count, ropeMismatches, maxRel, ropeDetail));
    }

    private static T[] RandomValues<T>(Random rng, long count, float scale) where T : unmanaged
    {
        var values = new T[count];
        for (long i = 0; i < count; i++) values[i] = AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1) * scale);
        return values;
    }
}

/// <summary>Latent decode attention (<see cref="MlaAttentionKernels"/> / <see cref="MlaCpu.Attend{TIn, TOut}"/>).</summary>
internal sealed class MlaAttendVerification() : Verification<MlaDecodeShape>("mla", "attend", MlaVerifications.DecodeShapes())
{
    protected override VerificationOutcome RunCpu(MlaDecodeShape shape, int seed) => Dispatch(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, MlaDecodeShape shape, int seed) => Dispatch(shape, seed, gpu);

    private static VerificationOutcome Dispatch(MlaDecodeShape shape, int seed, GpuContext? gpu) => (shape.Spec.InputType, shape.Spec.OutputType) switch
    {
        (AttentionElement.Float16, AttentionElement.Float16) => Run<Half, Half>(shape, seed, gpu),
        (AttentionElement.Float16, _) => Run<Half, float>(shape, seed, gpu),
        (_, AttentionElement.BFloat16) => Run<BFloat16, BFloat16>(shape, seed, gpu),
        _ => Run<BFloat16, float>(shape, seed, gpu),
    };

    private static VerificationOutcome Run<TIn, TOut>(MlaDecodeShape shape, int seed, GpuContext? gpu) where TIn : unmanaged where TOut : unmanaged
    {
        var spec = shape.Spec;
        var attention = spec.ToDecodeAttention();
        var data = AttentionData<TIn>.Create(attention, new Random(seed), shape.Lengths);
        var output = new TOut[spec.LatentOutputElements];
        var lse = new float[attention.LseElements];
        MlaCpu.Attend<TIn, TOut>(spec, data.Query, data.Keys, data.Lengths, data.BlockTable, output, lse);
        double tolerance = MlaVerifications.Tolerance(spec.OutputType);
        if (gpu is null)
        {
            var (expected, expectedLse) = data.Expected();
            return MlaVerifications.Within<TOut>("output", output, expected, tolerance).And(MlaVerifications.Within<float>("lse", lse, expectedLse, 1e-5));
        }

        var device = gpu.Device;
        using var q = device.Allocate<TIn>(data.Query);
        using var cache = device.Allocate<TIn>(data.Keys);
        using var dOut = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.LatentOutputElements));
        using var dLse = device.Allocate<float>(AttentionElements.Poisoned<float>(attention.LseElements));
        using var workspace = new DecodeAttentionWorkspace(device, attention.LseElements, spec.Shape.LatentDim, DecodeAttentionKernels.MaxPlannedSplits);
        var kernels = MlaVerifications.Kernels(gpu).Attention;
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.BatchSize, spec.Cache.MaxPagesPerSequence);
            table.Update(data.BlockTable, data.Lengths, attention.KeyPool, gpu.Stream);
            kernels.Run(spec, q.Span, cache.Span, table, dOut.Span, dLse.Span, workspace, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.BatchSize);
            lengths.Update(data.Lengths, spec.Cache.MaxTokens, gpu.Stream);
            kernels.Run(spec, q.Span, cache.Span, lengths, dOut.Span, dLse.Span, workspace, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        return MlaVerifications.Within<TOut>("output", dOut.ToArray(), AttentionElements.ToDoubles<TOut>(output), tolerance)
            .And(MlaVerifications.Within<float>("lse", dLse.ToArray(), AttentionElements.ToDoubles<float>(lse), 1e-5));
    }
}

/// <summary>The whole step (<see cref="MlaKernels.Decode{TIn, TOut}(in MlaAttentionSpec, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceBlockTable, DeviceSpan{TOut}, MlaWorkspace, DeviceSpan{float}, CudaStream?)"/>
/// / <see cref="MlaCpu.Decode{TIn, TOut}"/>).</summary>
internal sealed class MlaDecodeVerification() : Verification<MlaDecodeShape>("mla", "decode", MlaVerifications.DecodeShapes())
{
    protected override VerificationOutcome RunCpu(MlaDecodeShape shape, int seed) => Dispatch(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, MlaDecodeShape shape, int seed) => Dispatch(shape, seed, gpu);

    private static VerificationOutcome Dispatch(MlaDecodeShape shape, int seed, GpuContext? gpu) => (shape.Spec.InputType, shape.Spec.OutputType) switch
    {
        (AttentionElement.Float16, AttentionElement.Float16) => Run<Half, Half>(shape, seed, gpu),
        (AttentionElement.Float16, _) => Run<Half, float>(shape, seed, gpu),
        (_, AttentionElement.BFloat16) => Run<BFloat16, BFloat16>(shape, seed, gpu),
        _ => Run<BFloat16, float>(shape, seed, gpu),
    };

    private static VerificationOutcome Run<TIn, TOut>(MlaDecodeShape shape, int seed, GpuContext? gpu) where TIn : unmanaged where TOut : unmanaged
    {
        var spec = shape.Spec;
        var data = MlaData<TIn>.Create(spec, new Random(seed), shape.Lengths);
        var cache = data.Cache;
        var output = new TOut[spec.OutputElements];
        var lse = new float[cache.Spec.LseElements];
        MlaCpu.Decode<TIn, TOut>(spec, data.QueryNope, data.QueryRope, data.Weights, cache.Keys, cache.Lengths, cache.BlockTable, output, lse);
        double tolerance = MlaVerifications.Tolerance(spec.OutputType);
        if (gpu is null)
        {
            var expected = data.ExpectedAbsorbed();
            var absorbed = new float[spec.OutputElements];
            var naive = new float[spec.OutputElements];
            MlaCpu.DecodeReference<TIn>(spec, data.QueryNope, data.QueryRope, data.Weights, cache.Keys, cache.Lengths, cache.BlockTable, absorbed, default, MlaPath.Absorbed);
            MlaCpu.DecodeReference<TIn>(spec, data.QueryNope, data.QueryRope, data.Weights, cache.Keys, cache.Lengths, cache.BlockTable, naive, default, MlaPath.Naive);
            // The 16-bit q_latent and o_lat of the twin cost up to a few of the input type's ulps on top of the output's rounding.
            double stepTolerance = Math.Max(tolerance, spec.InputType == AttentionElement.Float16 ? 2e-3 : 1e-2);
            return MlaVerifications.Within<TOut>("output", output, expected.Output, stepTolerance)
                .And(MlaVerifications.Within<float>("lse", lse, expected.Lse, 1e-2))
                .And(MlaVerifications.Within<float>("absorbed vs naive (fp32)", absorbed, AttentionElements.ToDoubles<float>(naive), 1e-5));
        }

        var device = gpu.Device;
        using var qNope = device.Allocate<TIn>(data.QueryNope);
        using var qPe = device.Allocate<TIn>(data.QueryRope);
        using var weights = device.Allocate<TIn>(data.Weights);
        using var dCache = device.Allocate<TIn>(cache.Keys);
        using var dOut = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.OutputElements));
        using var dLse = device.Allocate<float>(AttentionElements.Poisoned<float>(cache.Spec.LseElements));
        using var workspace = new MlaWorkspace(device, spec.TokenRows * spec.Shape.NumHeads, spec.Shape.RowDim);
        var kernels = MlaVerifications.Kernels(gpu);
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.BatchSize, spec.Cache.MaxPagesPerSequence);
            table.Update(cache.BlockTable, cache.Lengths, cache.Spec.KeyPool, gpu.Stream);
            kernels.Decode(spec, qNope.Span, qPe.Span, weights.Span, dCache.Span, table, dOut.Span, workspace, dLse.Span, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.BatchSize);
            lengths.Update(cache.Lengths, spec.Cache.MaxTokens, gpu.Stream);
            kernels.Decode(spec, qNope.Span, qPe.Span, weights.Span, dCache.Span, lengths, dOut.Span, workspace, dLse.Span, gpu.Stream);
            gpu.Stream.Synchronize();
        }
        // GPU and CPU GEMMs sum in different orders: a q_latent element may round to the neighbouring 16-bit value.
        double gpuTolerance = Math.Max(tolerance, spec.InputType == AttentionElement.Float16 ? 2e-3 : 1e-2);
        return MlaVerifications.Within<TOut>("output", dOut.ToArray(), AttentionElements.ToDoubles<TOut>(output), gpuTolerance)
            .And(MlaVerifications.Within<float>("lse", dLse.ToArray(), AttentionElements.ToDoubles<float>(lse), 1e-3));
    }
}
