using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary>
/// The GPU decode-attention kernels against the float64 oracle, on every backend present, with the design tolerances
/// (fp32 outputs 1e-5, fp16 2e-3, bf16 1e-2 relative; LSE 1e-5). Outputs and LSEs are poisoned (NaN) before each run,
/// unused cache slots hold NaN, so an unwritten element or a masked value multiplied by 0 fails. Every case runs
/// through the CUDA-core kernel and, where it supports the case, the tensor-core kernel (forced, whatever the row count).
/// </summary>
public sealed class DecodeAttentionKernelsTests(Backends backends)
{
    private const AttentionElement F16 = AttentionElement.Float16, Bf16 = AttentionElement.BFloat16, F32 = AttentionElement.Float32;

    /// <summary>One problem: the spec, each row's length and whether the LSE is asked for.</summary>
    public sealed record DecodeCase(string Name, DecodeAttentionSpec Spec, int[] Lengths, bool Lse)
    {
        public override string ToString() => Name;
    }

    private static DecodeAttentionSpec Spec(int batch, int queryLength, int ratio, int kvHeads, int headDim, KvCacheShape cache,
        AttentionElement input, AttentionElement output) =>
        new(batch, queryLength, ratio * kvHeads, kvHeads, headDim, cache) { InputType = input, OutputType = output };

    private static KvCacheShape Paged(int pageSize, int maxPages, KvLayout layout, int rows, int poolKvHeads = 0) =>
        KvCacheShape.Paged(rows * maxPages + 3, pageSize, maxPages, layout, poolKvHeads);

    /// <summary>
    /// A covering set: every pair of storage × layout × ragged × RoPE style (explicit positions, partial rotary) ×
    /// window/sinks × soft-cap × ALiBi × key reuse × q_len {1, 3, 16} × group {1, 5, 7, 8, 128} × head dims
    /// {64, 80, 96, 128, 192/128, 256, 512, 576} × input {fp16, bf16} × output {fp16, bf16, fp32} × LSE appears in
    /// some case, with lengths 0, 1, page size ± 1 and a window longer than the context.
    /// </summary>
    public static IReadOnlyList<DecodeCase> Cases { get; } =
    [
        new("mha-d64-contiguous-nhd", Spec(3, 1, 1, 2, 64, KvCacheShape.Contiguous(300), F16, F16), [0, 1, 300], true),
        new("gqa5-d80-paged-hnd-rotatehalf-q3", Spec(2, 3, 5, 2, 80, Paged(16, 2, KvLayout.Hnd, 2), Bf16, F32) with
            { Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f) }, [15, 17], true),
        new("gqa7-d96-contiguous-hnd-interleaved-explicit-window-sinks", Spec(2, 1, 7, 1, 96, KvCacheShape.Contiguous(160, KvLayout.Hnd), F16, Bf16) with
            { Rope = new RopeOptions(RopeStyle.Interleaved, 500000f, ExplicitPositions: true), Window = 40, Sinks = 4 }, [150, 33], false),
        new("gqa8-d192v128-paged-nhd-softcap-alibi-q16", Spec(2, 16, 8, 2, 192, Paged(32, 2, KvLayout.Nhd, 2), F16, F32) with
            { ValueHeadDim = 128, SoftCap = 30f, Alibi = true }, [20, 61], true),
        new("mqa128-d128-paged-nhd-ragged-keyreuse", Spec(2, 1, 128, 1, 128, Paged(16, 19, KvLayout.Nhd, 2), Bf16, Bf16) with
            { Ragged = true, KeyReuse = true }, [300, 1], true),
        new("mha-d256-paged-pool1-ragged-partialrotary-window-q3", Spec(2, 3, 1, 2, 256, Paged(16, 13, KvLayout.Nhd, 4, poolKvHeads: 1), F16, F16) with
            { Ragged = true, Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, RotaryDim: 64), Window = 64 }, [0, 65, 200, 17], true),
        new("gqa8-d512-paged-hnd-softcap", Spec(1, 1, 8, 1, 512, Paged(8, 14, KvLayout.Hnd, 1), Bf16, Bf16) with
            { SoftCap = 50f }, [111], true),
        new("gqa16-d576-contiguous-keyreuse-interleaved-partial", Spec(2, 1, 16, 1, 576, KvCacheShape.Contiguous(80), Bf16, F32) with
            { KeyReuse = true, Rope = new RopeOptions(RopeStyle.Interleaved, 10000f, RotaryDim: 64) }, [77, 5], false),
        new("mha-d128-contiguous-window-longer-than-context-alibi-q3", Spec(2, 3, 1, 2, 128, KvCacheShape.Contiguous(256), F16, F32) with
            { Window = 1000, Sinks = 2, Alibi = true }, [5, 250], true),
        new("gqa5-d128-contiguous-hnd-ragged-rotatehalf-explicit-window-softcap-keyreuse-q16", Spec(2, 16, 5, 1, 128, KvCacheShape.Contiguous(210, KvLayout.Hnd), Bf16, F16) with
            { Ragged = true, Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, ExplicitPositions: true), Window = 30, Sinks = 3, SoftCap = 20f, KeyReuse = true }, [200, 16], true),
        new("gqa7-d64-paged-hnd-ragged-interleaved-window-alibi-q16", Spec(2, 16, 7, 2, 64, Paged(16, 9, KvLayout.Hnd, 4), F16, Bf16) with
            { Ragged = true, Rope = new RopeOptions(RopeStyle.Interleaved, 10000f), Window = 50, Alibi = true }, [33, 0, 16, 129], false),
        new("gqa8-d96-paged-nhd-rotatehalf-explicit-partial-softcap-keyreuse-q3", Spec(1, 3, 8, 2, 96, Paged(16, 10, KvLayout.Nhd, 1), Bf16, Bf16) with
            { Rope = new RopeOptions(RopeStyle.RotateHalf, 1000000f, RotaryDim: 32, ExplicitPositions: true), SoftCap = 10f, KeyReuse = true }, [159], false),
        new("gqa8-d128-contiguous-all-empty", Spec(2, 1, 8, 1, 128, KvCacheShape.Contiguous(64), F16, F16), [0, 0], true),
        new("gqa5-d128-paged-nhd-pageedges-q3", Spec(3, 3, 5, 1, 128, Paged(16, 2, KvLayout.Nhd, 3), Bf16, F16), [16, 17, 1], true),
        new("gqa5-d192-paged-hnd-interleaved-explicit-partial-softcap-alibi-keyreuse", Spec(2, 1, 5, 2, 192, Paged(8, 12, KvLayout.Hnd, 2), Bf16, F32) with
            { Rope = new RopeOptions(RopeStyle.Interleaved, 10000f, RotaryDim: 32, ExplicitPositions: true), SoftCap = 15f, Alibi = true, KeyReuse = true },
            [96, 9], true),
        new("mha-d512-contiguous-nhd-streams4", Spec(2, 1, 1, 2, 512, KvCacheShape.Contiguous(140), F16, F32), [130, 7], true),
        new("gqa3-d576v512-paged-nhd-streams2", Spec(1, 1, 3, 2, 576, Paged(16, 6, KvLayout.Nhd, 1), Bf16, Bf16) with { ValueHeadDim = 512 },
            [81], true),
        new("gqa128-d256-contiguous-nhd-q3", Spec(1, 3, 128, 1, 256, KvCacheShape.Contiguous(100), F16, F16), [100], false),
        // Wide key-reuse heads (the wide tensor-core kernel): every option it shares with the others.
        new("gqa24-d576v512-paged-hnd-ragged-keyreuse-window-sinks-softcap-alibi-q2", Spec(2, 2, 24, 2, 576, Paged(16, 6, KvLayout.Hnd, 4), Bf16, F32) with
            { ValueHeadDim = 512, KeyReuse = true, Ragged = true, Window = 40, Sinks = 3, SoftCap = 30f, Alibi = true }, [0, 90, 17, 65], true),
        new("gqa40-d320v288-contiguous-keyreuse-q1", Spec(1, 1, 40, 1, 320, KvCacheShape.Contiguous(70), F16, F16) with
            { ValueHeadDim = 288, KeyReuse = true }, [70], true),
    ];

    /// <summary>The kernel names of test rows: the CUDA-core kernel and the tensor-core kernel.</summary>
    internal const string CudaCores = "cuda-cores", TensorCores = "tensor-cores";

    /// <summary>The kernels that can run <paramref name="spec"/>.</summary>
    internal static IEnumerable<string> KernelsFor(in DecodeAttentionSpec spec) =>
        DecodeAttentionKernels.TensorCoresSupport(spec) || DecodeAttentionKernels.WideSupport(spec) ? [CudaCores, TensorCores] : [CudaCores];

    /// <summary>Ops on <paramref name="device"/> that run <paramref name="kernel"/>.</summary>
    internal static DecodeAttentionKernels Ops(CudaDevice device, string kernel) => new(device)
    {
        KernelChoice = kernel == TensorCores ? DecodeKernelChoice.TensorCores : DecodeKernelChoice.CudaCores,
    };

    public static TheoryData<string, int, string> CaseIndices
    {
        get
        {
            var data = new TheoryData<string, int, string>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < Cases.Count; i++)
                    foreach (var kernel in KernelsFor(Cases[i].Spec)) data.Add(backend, i, kernel);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Decode_MatchesOracle(string backend, int caseIndex, string kernel)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        var ops = Ops(device, kernel);
        switch (c.Spec.InputType, c.Spec.OutputType)
        {
            case (F16, F16): Check<Half, Half>(device, ops, c); break;
            case (F16, Bf16): Check<Half, BFloat16>(device, ops, c); break;
            case (F16, F32): Check<Half, float>(device, ops, c); break;
            case (Bf16, F16): Check<BFloat16, Half>(device, ops, c); break;
            case (Bf16, Bf16): Check<BFloat16, BFloat16>(device, ops, c); break;
            default: Check<BFloat16, float>(device, ops, c); break;
        }
    }

    private static void Check<TIn, TOut>(CudaDevice device, DecodeAttentionKernels ops, DecodeCase c) where TIn : unmanaged where TOut : unmanaged
    {
        var data = AttentionData<TIn>.Create(c.Spec, new Random(c.Name.Length * 7919 + c.Lengths.Sum()), c.Lengths);
        var (expected, expectedLse) = data.Expected();
        var (output, lse) = DecodeRunner.Run<TIn, TOut>(device, ops, data, c.Spec, c.Lse, workspace: null);
        AssertClose(output, expected, Tolerance(c.Spec.OutputType), c.Name + " output");
        if (c.Lse) AssertClose<float>(lse, expectedLse, 1e-5, c.Name + " LSE");
        // A row that sees nothing: zeros, and −∞ for the LSE (compared exactly by RelativeError).
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void RopeAngles_OfLargePositions_UseTheSpecsFp32Angle(string backend)
    {
        // Positions around 1e5..2e5: the angle of pair 0 reaches 2e5 rad, where a fast sincos loses every digit.
        var device = backends.Get(backend);
        var spec = Spec(1, 1, 4, 1, 64, KvCacheShape.Contiguous(70), F16, F32) with
        {
            Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, ExplicitPositions: true),
        };
        var data = AttentionData<Half>.Create(spec, new Random(31), [70]);
        for (int i = 0; i < data.Positions.Length; i++) data.Positions[i] += 100_000 + 1000 * i;
        var (expected, expectedLse) = data.Expected();
        var (output, lse) = DecodeRunner.Run<Half, float>(device, new DecodeAttentionKernels(device), data, spec, withLse: true, workspace: null);
        AssertClose<float>(output, expected, 1e-5, "output");
        AssertClose<float>(lse, expectedLse, 1e-5, "LSE");
    }

    public static TheoryData<string, int, string> SplitCases
    {
        get
        {
            var data = new TheoryData<string, int, string>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < SplitSpecs.Length; i++)
                    foreach (var kernel in KernelsFor(SplitSpecs[i].Spec)) data.Add(backend, i, kernel);
            return data;
        }
    }

    private static readonly (DecodeAttentionSpec Spec, int[] Lengths)[] SplitSpecs =
    [
        (Spec(3, 1, 4, 2, 128, Paged(16, 20, KvLayout.Nhd, 3), F16, F32) with { Window = 100, Sinks = 5 }, [300, 1, 0]),
        (Spec(2, 3, 5, 1, 64, KvCacheShape.Contiguous(260, KvLayout.Hnd), F16, F32) with
            { Rope = new RopeOptions(RopeStyle.Interleaved, 10000f), SoftCap = 25f, Alibi = true }, [259, 40]),
    ];

    [Theory]
    [MemberData(nameof(SplitCases))]
    public void ForcedSplits_GiveTheSameResultAsOneSplit(string backend, int index, string kernel)
    {
        var device = backends.Get(backend);
        var (baseSpec, lengths) = SplitSpecs[index];
        var data = AttentionData<Half>.Create(baseSpec, new Random(100 + index), lengths);
        var ops = Ops(device, kernel);
        using var workspace = new DecodeAttentionWorkspace(device, baseSpec.LseElements, baseSpec.OutputDim, maxSplits: 64);
        var (expected, expectedLse) = data.Expected();
        var spec = data.Spec;
        var (single, singleLse) = DecodeRunner.Run<Half, float>(device, ops, data, spec with { Splits = 1 }, withLse: true, workspace);
        AssertClose<float>(single, expected, 1e-5, "one split vs oracle");
        var singleDoubles = single.Select(x => (double)x).ToArray();
        var singleLseDoubles = singleLse.Select(x => (double)x).ToArray();
        // 40 splits of a ≤ 300-token row leave most splits empty (chunks are whole tiles).
        foreach (int splits in new[] { 2, 3, 7, 40 })
        {
            var (output, lse) = DecodeRunner.Run<Half, float>(device, ops, data, spec with { Splits = splits }, withLse: true, workspace);
            AssertClose<float>(output, singleDoubles, 1e-5, $"{splits} splits vs one");
            AssertClose<float>(lse, singleLseDoubles, 1e-5, $"{splits} splits LSE vs one");
            AssertClose<float>(output, expected, 1e-5, $"{splits} splits vs oracle");
        }
        // The heuristic (Splits = 0) with a workspace, and without the LSE.
        var (planned, _) = DecodeRunner.Run<Half, float>(device, ops, data, spec, withLse: false, workspace);
        AssertClose<float>(planned, expected, 1e-5, "planned splits vs oracle");
        AssertClose<float>(singleLse, expectedLse, 1e-5, "one split LSE vs oracle");
    }

    public static TheoryData<string, string> BackendsAndKernels
    {
        get
        {
            var data = new TheoryData<string, string>();
            foreach (var backend in Backends.All)
                foreach (var kernel in new[] { CudaCores, TensorCores }) data.Add(backend, kernel);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(BackendsAndKernels))]
    public void Splits_WithFp16Output_MatchOracle(string backend, string kernel)
    {
        var device = backends.Get(backend);
        var spec = Spec(1, 16, 8, 1, 128, Paged(16, 19, KvLayout.Hnd, 1), Bf16, F16) with { Splits = 3 };
        var data = AttentionData<BFloat16>.Create(spec, new Random(77), [300]);
        using var workspace = new DecodeAttentionWorkspace(device, spec.LseElements, 128, maxSplits: 4);
        var (expected, expectedLse) = data.Expected();
        var (output, lse) = DecodeRunner.Run<BFloat16, Half>(device, Ops(device, kernel), data, spec, withLse: true, workspace);
        AssertClose(output, expected, 2e-3, "output");
        AssertClose<float>(lse, expectedLse, 1e-5, "LSE");
    }

    public static TheoryData<string, string, int> MergeCases
    {
        get
        {
            var data = new TheoryData<string, string, int>();
            foreach (var backend in Backends.All)
                foreach (var type in new[] { "fp16", "bf16", "fp32" })
                    foreach (int dim in new[] { 1, 7, 130, 1024 })
                        data.Add(backend, type, dim);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(MergeCases))]
    public void MergeStates_MatchesOracle(string backend, string type, int dim)
    {
        var device = backends.Get(backend);
        var ops = new DecodeAttentionKernels(device);
        switch (type)
        {
            case "fp16": CheckMerge<Half>(device, ops, dim, 2e-3); break;
            case "bf16": CheckMerge<BFloat16>(device, ops, dim, 1e-2); break;
            default: CheckMerge<float>(device, ops, dim, 1e-5); break;
        }
    }

    private static void CheckMerge<T>(CudaDevice device, DecodeAttentionKernels ops, int dim, double tolerance) where T : unmanaged
    {
        const int rows = 37;
        var random = new Random(dim * 31 + rows);
        var spec = new MergeStatesSpec(rows, dim);
        var outA = new T[spec.Elements];
        var outB = new T[spec.Elements];
        var lseA = new float[rows];
        var lseB = new float[rows];
        for (int i = 0; i < outA.Length; i++)
        {
            outA[i] = AttentionElements.FromFloat<T>((float)(random.NextDouble() * 2 - 1));
            outB[i] = AttentionElements.FromFloat<T>((float)(random.NextDouble() * 2 - 1));
        }
        for (int r = 0; r < rows; r++)
        {
            lseA[r] = (float)(random.NextDouble() * 20 - 10);
            lseB[r] = (float)(random.NextDouble() * 20 - 10);
            // Empty states: A, B or both, with NaN outputs where an empty state's output is never meant to be read.
            if (r % 5 == 1) lseA[r] = float.NegativeInfinity;
            if (r % 7 == 2) lseB[r] = float.NegativeInfinity;
            if (r % 11 == 3) lseA[r] = lseB[r] = float.NegativeInfinity;
            if (r % 3 == 0) lseB[r] = lseA[r] + 30;   // one state dominates
        }
        // The oracle sees the stored (rounded) values; empty states' outputs are poisoned after it ran.
        var expected = new double[spec.Elements];
        var expectedLse = new double[rows];
        AttentionOracle.Merge(rows, dim, AttentionElements.ToDoubles<T>(outA), lseA.Select(x => (double)x).ToArray(),
            AttentionElements.ToDoubles<T>(outB), lseB.Select(x => (double)x).ToArray(), expected, expectedLse);
        for (int r = 0; r < rows; r++)
        {
            if (float.IsNegativeInfinity(lseA[r])) outA.AsSpan(r * dim, dim).Fill(AttentionElements.FromFloat<T>(float.NaN));
            if (float.IsNegativeInfinity(lseB[r])) outB.AsSpan(r * dim, dim).Fill(AttentionElements.FromFloat<T>(float.NaN));
        }

        using var dA = device.Allocate<T>(outA);
        using var dB = device.Allocate<T>(outB);
        using var dLseA = device.Allocate<float>(lseA);
        using var dLseB = device.Allocate<float>(lseB);
        using var dOut = device.Allocate<T>(AttentionElements.Poisoned<T>(spec.Elements));
        using var dLse = device.Allocate<float>(AttentionElements.Poisoned<float>(rows));
        ops.MergeStates(spec, dA.Span, dLseA.Span, dB.Span, dLseB.Span, dOut.Span, dLse.Span);
        AssertClose(dOut.ToArray(), expected, tolerance, "merged output");
        AssertClose<float>(dLse.ToArray(), expectedLse, 1e-6, "merged LSE");
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void EmptyBatch_AndEmptyMerge_WriteNothingAndSucceed(string backend)
    {
        var device = backends.Get(backend);
        var ops = new DecodeAttentionKernels(device);
        var spec = Spec(0, 1, 4, 2, 128, KvCacheShape.Paged(4, 16, 2), F16, F16);
        using var keys = device.Allocate<Half>(spec.KeyElements);
        using var values = device.Allocate<Half>(spec.ValueElements);
        using var table = new DeviceBlockTable(device, 1, 2);
        table.Update([], [], spec.KeyPool);
        ops.Run<Half, Half>(spec, default, keys.Span, values.Span, table, default);
        ops.MergeStates<Half>(new MergeStatesSpec(0, 64), default, default, default, default, default, default);
    }

    internal static double Tolerance(AttentionElement output) => output switch
    {
        AttentionElement.Float32 => 1e-5,
        AttentionElement.Float16 => 2e-3,
        _ => 1e-2,
    };

    internal static void AssertClose<T>(ReadOnlySpan<T> actual, ReadOnlySpan<double> expected, double tolerance, string what) where T : unmanaged
    {
        double error = AttentionElements.RelativeError(actual, expected);
        Assert.True(error < tolerance, $"{what}: relative error {error:E3} (tolerance {tolerance:E1}; NaN means an unwritten or poisoned element)");
    }
}

/// <summary>Uploads an <see cref="AttentionData{T}"/> problem, runs the GPU op on poisoned outputs and downloads them.</summary>
internal static class DecodeRunner
{
    public static (TOut[] Output, float[] Lse) Run<TIn, TOut>(CudaDevice device, DecodeAttentionKernels ops, AttentionData<TIn> data,
        DecodeAttentionSpec spec, bool withLse, DecodeAttentionWorkspace? workspace) where TIn : unmanaged where TOut : unmanaged
    {
        using var query = device.Allocate<TIn>(data.Query);
        using var keys = device.Allocate<TIn>(data.Keys);
        using var values = device.Allocate<TIn>(data.Values);
        using var positions = device.Allocate<int>(data.Positions);
        using var slopes = device.Allocate<float>(data.AlibiSlopes);
        using var output = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.OutputElements));
        using var lse = device.Allocate<float>(AttentionElements.Poisoned<float>(withLse ? spec.LseElements : 0));
        var valueSpan = spec.KeyReuse ? default : values.Span;
        var positionSpan = spec.PositionElements > 0 ? positions.Span : default;
        var slopeSpan = spec.Alibi ? slopes.Span : default;
        var lseSpan = withLse ? lse.Span : default;
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.Rows, spec.Cache.MaxPagesPerSequence);
            table.Update(data.BlockTable, data.Lengths, spec.KeyPool);
            ops.Run(spec, query.Span, keys.Span, valueSpan, table, output.Span, lseSpan, workspace, positionSpan, slopeSpan);
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.Rows);
            lengths.Update(data.Lengths, spec.Cache.MaxTokens);
            ops.Run(spec, query.Span, keys.Span, valueSpan, lengths, output.Span, lseSpan, workspace, positionSpan, slopeSpan);
        }
        return (output.ToArray(), withLse ? lse.ToArray() : []);
    }
}
