using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvCheck.Verification;

/// <summary>A decode-attention problem: the spec, each row's length, and a readable name of what it covers.</summary>
internal sealed record DecodeShape(string Name, DecodeAttentionSpec Spec, int[] Lengths) : VerificationShape
{
    public override string Description
    {
        get
        {
            var s = Spec;
            string storage = s.Cache.IsPaged ? $"page={s.Cache.PageSize}" : "contiguous";
            string layout = s.Cache.Layout == KvLayout.Nhd ? "NHD" : "HND";
            string dims = s.ValueDim == s.HeadDim ? $"D={s.HeadDim}" : $"Dk={s.HeadDim} Dv={s.ValueDim}";
            return $"{Name}: B={s.BatchSize} q={s.QueryLength} Hq={s.NumQueryHeads} Hkv={s.NumKvHeads} {dims} N=[{string.Join(',', Lengths)}] " +
                $"{storage} {layout} {Type(s.InputType)}→{Type(s.OutputType)}";
        }
    }

    private static string Type(AttentionElement e) => e switch
    {
        AttentionElement.Float16 => "fp16",
        AttentionElement.BFloat16 => "bf16",
        _ => "fp32",
    };
}

/// <summary>Merging two attention states of <see cref="Rows"/> × <see cref="Dim"/>; every third row has one empty state
/// and every seventh both.</summary>
internal sealed record MergeShape(int Rows, int Dim, AttentionElement Type) : VerificationShape
{
    public override string Description => $"rows={Rows} D={Dim} {Type}";
}

/// <summary>
/// The attention family's verifications. Decode: the CPU twin against the float64 oracle, and the GPU kernels against
/// the CPU twin, both within the tolerance of the output type (fp32 1e-5, fp16 2e-3, bf16 1e-2, relative L2; NaN
/// never passes); outputs poisoned with NaN before each GPU run; GPU runs use split-KV when the heuristic asks for it.
/// </summary>
internal static class AttentionVerifications
{
    public static IReadOnlyList<IVerification> All { get; } = [new DecodeVerification(), new MergeStatesVerification()];

    internal static DecodeAttentionKernels Kernels(GpuContext gpu) => gpu.Get(device => new DecodeAttentionKernels(device));

    internal static double Tolerance(AttentionElement output) => output switch
    {
        AttentionElement.Float32 => 1e-5,
        AttentionElement.Float16 => 2e-3,
        _ => 1e-2,
    };

    /// <summary>The outcome of comparing <paramref name="actual"/> with <paramref name="expected"/> at <paramref name="tolerance"/>.</summary>
    internal static VerificationOutcome Within<T>(string name, ReadOnlySpan<T> actual, ReadOnlySpan<double> expected, double tolerance) where T : unmanaged
    {
        double error = AttentionElements.RelativeError(actual, expected);
        var outcome = new VerificationOutcome(expected.Length, 0, error, null);
        return double.IsNaN(error) || error > tolerance
            ? outcome.WithFailure($"{name}: relative error {error:G3} (tolerance {tolerance:G2})")
            : outcome;
    }

    internal static double[] Doubles<T>(ReadOnlySpan<T> values) where T : unmanaged => AttentionElements.ToDoubles(values);
}

internal sealed class DecodeVerification() : Verification<DecodeShape>("attention", "decode", ShapeList())
{
    private static DecodeShape[] ShapeList()
    {
        static DecodeAttentionSpec S(int b, int q, int hq, int hkv, int d, KvCacheShape cache, AttentionElement input = AttentionElement.Float16,
            AttentionElement output = AttentionElement.Float16) => new(b, q, hq, hkv, d, cache) { InputType = input, OutputType = output };
        var bf16 = AttentionElement.BFloat16;
        var fp32 = AttentionElement.Float32;
        return
        [
            new("llama gqa paged", S(3, 1, 32, 8, 128, KvCacheShape.Paged(40, 16, 12)), [0, 17, 160]),
            new("mha contiguous hnd", S(2, 1, 4, 4, 64, KvCacheShape.Contiguous(70, KvLayout.Hnd), bf16, fp32), [1, 70]),
            new("mfa 64q/1kv d256", S(1, 1, 64, 1, 256, KvCacheShape.Paged(20, 16, 20), bf16, bf16), [257]),
            new("ratio 7, q_len 3, lse", S(2, 3, 14, 2, 96, KvCacheShape.Paged(30, 7, 14, KvLayout.Hnd)), [8, 95]),
            new("dk 192 dv 128", S(2, 2, 10, 2, 192, KvCacheShape.Contiguous(50), bf16, fp32) with { ValueHeadDim = 128 }, [49, 3]),
            new("window 32 + 4 sinks, softcap", S(2, 1, 8, 2, 128, KvCacheShape.Paged(30, 16, 12)) with { Window = 32, Sinks = 4, SoftCap = 30 }, [150, 20]),
            new("alibi", S(2, 2, 8, 8, 64, KvCacheShape.Contiguous(80), AttentionElement.Float16, fp32) with { Alibi = true }, [80, 33]),
            new("rope rotate-half, positions", S(2, 1, 16, 4, 128, KvCacheShape.Paged(30, 16, 10))
                with { Rope = new RopeOptions(RopeStyle.RotateHalf, 500000f, 0, ExplicitPositions: true) }, [100, 60]),
            new("rope interleaved, key reuse", S(2, 1, 8, 1, 256, KvCacheShape.Contiguous(64), bf16, fp32)
                with { KeyReuse = true, Rope = new RopeOptions(RopeStyle.Interleaved, 10000f, 64) }, [64, 9]),
            new("ragged per-head pages", S(2, 1, 10, 2, 80, KvCacheShape.Paged(40, 16, 8, KvLayout.Nhd, poolKvHeads: 1)) with { Ragged = true }, [0, 33, 17, 120]),
            new("q_len 16, ratio 5", S(1, 16, 5, 1, 112, KvCacheShape.Contiguous(200), bf16, bf16), [200]),
            new("head dim 512", S(1, 1, 8, 1, 512, KvCacheShape.Paged(8, 32, 8), AttentionElement.Float16, fp32), [255]),
            new("long context, split", S(1, 1, 8, 1, 128, KvCacheShape.Paged(260, 16, 260)), [4100]),
        ];
    }

    protected override VerificationOutcome RunCpu(DecodeShape shape, int seed) => Dispatch(shape, seed, gpu: null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, DecodeShape shape, int seed) => Dispatch(shape, seed, gpu);

    private static VerificationOutcome Dispatch(DecodeShape shape, int seed, GpuContext? gpu) => (shape.Spec.InputType, shape.Spec.OutputType) switch
    {
        (AttentionElement.Float16, AttentionElement.Float16) => Run<Half, Half>(shape, seed, gpu),
        (AttentionElement.Float16, AttentionElement.BFloat16) => Run<Half, BFloat16>(shape, seed, gpu),
        (AttentionElement.Float16, _) => Run<Half, float>(shape, seed, gpu),
        (_, AttentionElement.Float16) => Run<BFloat16, Half>(shape, seed, gpu),
        (_, AttentionElement.BFloat16) => Run<BFloat16, BFloat16>(shape, seed, gpu),
        _ => Run<BFloat16, float>(shape, seed, gpu),
    };

    private static VerificationOutcome Run<TIn, TOut>(DecodeShape shape, int seed, GpuContext? gpu) where TIn : unmanaged where TOut : unmanaged
    {
        var spec = shape.Spec;
        var data = AttentionData<TIn>.Create(spec, new Random(seed), shape.Lengths);
        var output = new TOut[spec.OutputElements];
        var lse = new float[spec.LseElements];
        DecodeAttentionCpu.Run<TIn, TOut>(spec, data.Query, data.Keys, data.Values, data.Lengths, data.BlockTable, output, lse,
            data.Positions, data.AlibiSlopes);
        double tolerance = AttentionVerifications.Tolerance(spec.OutputType);
        if (gpu is null)
        {
            var (expected, expectedLse) = data.Expected();
            return AttentionVerifications.Within<TOut>("output", output, expected, tolerance)
                .And(AttentionVerifications.Within<float>("lse", lse, expectedLse, 1e-5));
        }

        var device = gpu.Device;
        var stream = gpu.Stream;
        using var q = device.Allocate<TIn>(data.Query);
        using var k = device.Allocate<TIn>(data.Keys);
        using var v = device.Allocate<TIn>(data.Values);
        using var positions = device.Allocate<int>(data.Positions);
        using var slopes = device.Allocate<float>(data.AlibiSlopes);
        using var dOut = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.OutputElements));
        using var dLse = device.Allocate<float>(AttentionElements.Poisoned<float>(spec.LseElements));
        using var workspace = new DecodeAttentionWorkspace(device, spec.LseElements, spec.OutputDim, DecodeAttentionKernels.MaxPlannedSplits);
        var kernels = AttentionVerifications.Kernels(gpu);
        var values = spec.KeyReuse ? default : v.Span;
        var positionSpan = data.Positions.Length == 0 ? default : positions.Span;
        var slopeSpan = data.AlibiSlopes.Length == 0 ? default : slopes.Span;
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.Rows, spec.Cache.MaxPagesPerSequence);
            table.Update(data.BlockTable, data.Lengths, spec.KeyPool, stream);
            kernels.Run(spec, q.Span, k.Span, values, table, dOut.Span, dLse.Span, workspace, positionSpan, slopeSpan, stream);
            stream.Synchronize();
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.Rows);
            lengths.Update(data.Lengths, spec.Cache.MaxTokens, stream);
            kernels.Run(spec, q.Span, k.Span, values, lengths, dOut.Span, dLse.Span, workspace, positionSpan, slopeSpan, stream);
            stream.Synchronize();
        }
        return AttentionVerifications.Within<TOut>("output", dOut.ToArray(), AttentionVerifications.Doubles<TOut>(output), tolerance)
            .And(AttentionVerifications.Within<float>("lse", dLse.ToArray(), AttentionVerifications.Doubles<float>(lse), 1e-5));
    }
}

internal sealed class MergeStatesVerification() : Verification<MergeShape>("attention", "merge_states",
    [new(1, 8, AttentionElement.Float32), new(77, 128, AttentionElement.Float16), new(33, 512, AttentionElement.BFloat16), new(5, 1000, AttentionElement.Float32)])
{
    protected override VerificationOutcome RunCpu(MergeShape shape, int seed) => Dispatch(shape, seed, null);

    protected override VerificationOutcome RunGpu(GpuContext gpu, MergeShape shape, int seed) => Dispatch(shape, seed, gpu);

    private static VerificationOutcome Dispatch(MergeShape shape, int seed, GpuContext? gpu) => shape.Type switch
    {
        AttentionElement.Float16 => Run<Half>(shape, seed, gpu),
        AttentionElement.BFloat16 => Run<BFloat16>(shape, seed, gpu),
        _ => Run<float>(shape, seed, gpu),
    };

    private static VerificationOutcome Run<T>(MergeShape shape, int seed, GpuContext? gpu) where T : unmanaged
    {
        var rng = new Random(seed);
        var spec = new MergeStatesSpec(shape.Rows, shape.Dim);
        var a = new T[spec.Elements];
        var b = new T[spec.Elements];
        for (long i = 0; i < a.Length; i++)
        {
            a[i] = AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1));
            b[i] = AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1));
        }
        var lseA = new float[shape.Rows];
        var lseB = new float[shape.Rows];
        for (int r = 0; r < shape.Rows; r++)
        {
            lseA[r] = r % 3 == 1 || r % 7 == 6 ? float.NegativeInfinity : (float)(rng.NextDouble() * 20 - 10);
            lseB[r] = r % 7 == 6 ? float.NegativeInfinity : (float)(rng.NextDouble() * 20 - 10);
        }
        var output = new T[spec.Elements];
        var lse = new float[shape.Rows];
        DecodeAttentionCpu.MergeStates<T>(spec, a, lseA, b, lseB, output, lse);
        double tolerance = AttentionVerifications.Tolerance(shape.Type);
        if (gpu is null)
        {
            var expected = new double[spec.Elements];
            var expectedLse = new double[shape.Rows];
            AttentionOracle.Merge(shape.Rows, shape.Dim, AttentionVerifications.Doubles<T>(a), AttentionVerifications.Doubles<float>(lseA),
                AttentionVerifications.Doubles<T>(b), AttentionVerifications.Doubles<float>(lseB), expected, expectedLse);
            return AttentionVerifications.Within<T>("output", output, expected, tolerance)
                .And(AttentionVerifications.Within<float>("lse", lse, expectedLse, 1e-6));
        }

        var device = gpu.Device;
        using var dA = device.Allocate<T>(a);
        using var dB = device.Allocate<T>(b);
        using var dLseA = device.Allocate<float>(lseA);
        using var dLseB = device.Allocate<float>(lseB);
        using var dOut = device.Allocate<T>(AttentionElements.Poisoned<T>(spec.Elements));
        using var dLse = device.Allocate<float>(AttentionElements.Poisoned<float>(shape.Rows));
        AttentionVerifications.Kernels(gpu).MergeStates(spec, dA.Span, dLseA.Span, dB.Span, dLseB.Span, dOut.Span, dLse.Span, gpu.Stream);
        gpu.Stream.Synchronize();
        return AttentionVerifications.Within<T>("output", dOut.ToArray(), AttentionVerifications.Doubles<T>(output), tolerance)
            .And(AttentionVerifications.Within<float>("lse", dLse.ToArray(), AttentionVerifications.Doubles<float>(lse), 1e-6));
    }
}
