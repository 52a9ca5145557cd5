using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary>
/// The tensor-core decode kernel (<c>attention_decode_mma</c>) on the shapes it is for — many query rows per KV head
/// (MFA's 64 heads, group 128 over two row tiles, q_len 4 × group 16) — against the float64 oracle with the design
/// tolerances, through both kernels; every input/output type pair; split-KV equality; the P hi/lo precision with bf16
/// inputs and an fp32 output; and the wrapper's kernel choice.
/// </summary>
public sealed class DecodeAttentionMmaTests(Backends backends)
{
    private const AttentionElement F16 = AttentionElement.Float16, Bf16 = AttentionElement.BFloat16, F32 = AttentionElement.Float32;

    private static DecodeAttentionSpec Spec(int batch, int queryLength, int ratio, int kvHeads, int headDim, KvCacheShape cache,
        AttentionElement input, AttentionElement output) =>
        new(batch, queryLength, ratio * kvHeads, kvHeads, headDim, cache) { InputType = input, OutputType = output };

    private static KvCacheShape Paged(int pageSize, int maxPages, KvLayout layout, int rows, int poolKvHeads = 0) =>
        KvCacheShape.Paged(rows * maxPages + 3, pageSize, maxPages, layout, poolKvHeads);

    /// <summary>Many-row cases; lengths 0, 1 and page size ± 1 in the paged ones.</summary>
    private static readonly DecodeAttentionKernelsTests.DecodeCase[] Cases =
    [
        new("mfa64-d256-paged-nhd-pageedges", Spec(5, 1, 64, 1, 256, Paged(16, 2, KvLayout.Nhd, 5), F16, F16), [0, 1, 15, 16, 17], true),
        new("gqa128-d128-contiguous-two-rowtiles", Spec(2, 1, 128, 1, 128, KvCacheShape.Contiguous(140), Bf16, F32), [130, 33], true),
        new("gqa16-q4-d128-paged-hnd-window-sinks-softcap-alibi", Spec(2, 4, 16, 2, 128, Paged(16, 5, KvLayout.Hnd, 2), F16, Bf16) with
            { Window = 20, Sinks = 3, SoftCap = 30f, Alibi = true }, [70, 17], true),
        new("gqa16-q4-d64-contiguous-keyreuse-ragged", Spec(2, 4, 16, 2, 64, KvCacheShape.Contiguous(50), Bf16, F16) with
            { KeyReuse = true, Ragged = true }, [49, 1, 0, 16], false),
        new("gqa8-d128-paged-pool1-ragged-window-longer-than-context", Spec(2, 1, 8, 2, 128, Paged(16, 3, KvLayout.Nhd, 4, poolKvHeads: 1), Bf16, F32) with
            { Ragged = true, Window = 100, Sinks = 1 }, [0, 16, 17, 33], true),
        new("gqa12-d192v128-paged-nhd-q2", Spec(1, 2, 12, 2, 192, Paged(32, 3, KvLayout.Nhd, 1), Bf16, Bf16) with { ValueHeadDim = 128 },
            [65], true),
    ];

    public static TheoryData<string, int, string> CaseIndices
    {
        get
        {
            var data = new TheoryData<string, int, string>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < Cases.Length; i++)
                    foreach (var kernel in new[] { DecodeAttentionKernelsTests.CudaCores, DecodeAttentionKernelsTests.TensorCores })
                        data.Add(backend, i, kernel);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void ManyRows_MatchOracle(string backend, int caseIndex, string kernel)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        Assert.True(DecodeAttentionKernels.UsesTensorCores(c.Spec), "every case here is one the wrapper sends to the tensor cores");
        var ops = DecodeAttentionKernelsTests.Ops(device, kernel);
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

    public static TheoryData<string, int, int> TypePairs
    {
        get
        {
            var data = new TheoryData<string, int, int>();
            foreach (var backend in Backends.All)
                foreach (var input in new[] { F16, Bf16 })
                    foreach (var output in new[] { F16, Bf16, F32 })
                        data.Add(backend, (int)input, (int)output);
            return data;
        }
    }

    /// <summary>Every input × output type pair on the tensor-core kernel (group 8, q_len 2, lengths 0, 1, page ± 1).</summary>
    [Theory]
    [MemberData(nameof(TypePairs))]
    public void EveryTypePair_MatchesOracle(string backend, int input, int output)
    {
        var device = backends.Get(backend);
        var spec = Spec(5, 2, 8, 1, 64, Paged(32, 2, KvLayout.Nhd, 5), (AttentionElement)input, (AttentionElement)output) with { Alibi = true };
        var c = new DecodeAttentionKernelsTests.DecodeCase($"types-{input}-{output}", spec, [0, 1, 31, 32, 33], true);
        var ops = DecodeAttentionKernelsTests.Ops(device, DecodeAttentionKernelsTests.TensorCores);
        switch (spec.InputType, spec.OutputType)
        {
            case (F16, F16): Check<Half, Half>(device, ops, c); break;
            case (F16, Bf16): Check<Half, BFloat16>(device, ops, c); break;
            case (F16, F32): Check<Half, float>(device, ops, c); break;
            case (Bf16, F16): Check<BFloat16, Half>(device, ops, c); break;
            case (Bf16, Bf16): Check<BFloat16, BFloat16>(device, ops, c); break;
            default: Check<BFloat16, float>(device, ops, c); break;
        }
    }

    /// <summary>
    /// bf16 inputs, fp32 output, 1500 tokens of near-uniform attention: P rounded once to bf16 (8 bits) would leave a
    /// relative error of about 1e-4 here; the kernel's three-term split of P must stay within 1e-5, like the CUDA cores.
    /// </summary>
    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Bf16Inputs_Fp32Output_LongContext_KeepFp32Accuracy(string backend)
    {
        var device = backends.Get(backend);
        var spec = Spec(1, 1, 16, 1, 64, KvCacheShape.Contiguous(1500), Bf16, F32) with { Scale = 0.01f };
        var data = AttentionData<BFloat16>.Create(spec, new Random(5), [1500]);
        var (expected, expectedLse) = data.Expected();
        var ops = DecodeAttentionKernelsTests.Ops(device, DecodeAttentionKernelsTests.TensorCores);
        var (output, lse) = DecodeRunner.Run<BFloat16, float>(device, ops, data, spec, withLse: true, workspace: null);
        double error = AttentionElements.RelativeError<float>(output, expected);
        Assert.True(error < 1e-5, $"relative error {error:E3}");
        DecodeAttentionKernelsTests.AssertClose<float>(lse, expectedLse, 1e-5, "LSE");
        TestContext.Current.SendDiagnosticMessage($"tensor-core kernel, bf16 -> fp32, 1500 tokens: relative error {error:E3}");
    }

    public static TheoryData<string> SplitBackends => new(Backends.All);

    [Theory]
    [MemberData(nameof(SplitBackends))]
    public void ForcedSplits_OnTensorCores_GiveTheSameResultAsOneSplit(string backend)
    {
        var device = backends.Get(backend);
        var spec = Spec(2, 1, 64, 1, 128, Paged(16, 20, KvLayout.Nhd, 2), F16, F32) with { Window = 150, Sinks = 4 };
        var data = AttentionData<Half>.Create(spec, new Random(404), [300, 17]);
        var ops = DecodeAttentionKernelsTests.Ops(device, DecodeAttentionKernelsTests.TensorCores);
        using var workspace = new DecodeAttentionWorkspace(device, spec.LseElements, spec.OutputDim, maxSplits: 16);
        var (expected, expectedLse) = data.Expected();
        var (single, singleLse) = DecodeRunner.Run<Half, float>(device, ops, data, spec with { Splits = 1 }, withLse: true, workspace);
        DecodeAttentionKernelsTests.AssertClose<float>(single, expected, 1e-5, "one split vs oracle");
        DecodeAttentionKernelsTests.AssertClose<float>(singleLse, expectedLse, 1e-5, "one split LSE vs oracle");
        var singleDoubles = single.Select(x => (double)x).ToArray();
        foreach (int splits in new[] { 2, 5, 16 })
        {
            var (output, lse) = DecodeRunner.Run<Half, float>(device, ops, data, spec with { Splits = splits }, withLse: true, workspace);
            DecodeAttentionKernelsTests.AssertClose<float>(output, singleDoubles, 1e-5, $"{splits} splits vs one");
            DecodeAttentionKernelsTests.AssertClose<float>(lse, expectedLse, 1e-5, $"{splits} splits LSE vs oracle");
        }
    }

    [Fact]
    public void UsesTensorCores_FollowsTheDocumentedRule()
    {
        var cache = KvCacheShape.Contiguous(64);
        Assert.True(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 8, 2, 128, cache, F16, F16)));      // 8 rows
        Assert.True(DecodeAttentionKernels.UsesTensorCores(Spec(1, 4, 2, 2, 128, cache, F16, F16)));      // q_len 4 × group 2
        Assert.False(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 7, 1, 128, cache, F16, F16)));     // 7 rows
        Assert.False(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 1, 8, 128, cache, F16, F16)));     // MHA
        Assert.False(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 8, 1, 128, cache, F16, F16) with
            { Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f) }));                                  // RoPE: CUDA cores
        Assert.False(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 8, 1, 512, cache, F16, F16)));     // Dk > 256
        Assert.False(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 8, 1, 72, cache, F16, F16)));      // Dk % 16 != 0
        Assert.False(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 8, 1, 128, cache, F16, F16) with { ValueHeadDim = 72 }));
        Assert.True(DecodeAttentionKernels.UsesTensorCores(Spec(1, 1, 64, 1, 256, cache, Bf16, Bf16)));   // MFA
    }

    [Fact]
    public void MmaLayout_PlansRowsAndStreams()
    {
        var layout = new DecodeMmaLayout(128, 128, keyReuse: false);   // 512 B per token: 2 sub-tiles of 16 tokens
        Assert.Equal(2, layout.SubTiles);
        Assert.Equal((2, 1), layout.RowPlan(8));     // one warp tile: as many token streams as sub-tiles
        Assert.Equal((2, 1), layout.RowPlan(32));    // two warp tiles, two streams each
        Assert.Equal((1, 1), layout.RowPlan(64));    // MFA: one CTA of 64 rows
        Assert.Equal((1, 2), layout.RowPlan(128));
        var small = new DecodeMmaLayout(64, 64, keyReuse: true);
        Assert.Equal(4, small.SubTiles);
        Assert.Equal((4, 1), small.RowPlan(16));
    }

    private static void Check<TIn, TOut>(CudaDevice device, DecodeAttentionKernels ops, DecodeAttentionKernelsTests.DecodeCase c)
        where TIn : unmanaged where TOut : unmanaged
    {
        var data = AttentionData<TIn>.Create(c.Spec, new Random(c.Name.Length * 131 + c.Lengths.Sum()), c.Lengths);
        var (expected, expectedLse) = data.Expected();
        var (output, lse) = DecodeRunner.Run<TIn, TOut>(device, ops, data, c.Spec, c.Lse, workspace: null);
        DecodeAttentionKernelsTests.AssertClose(output, expected, DecodeAttentionKernelsTests.Tolerance(c.Spec.OutputType), c.Name + " output");
        if (c.Lse) DecodeAttentionKernelsTests.AssertClose<float>(lse, expectedLse, 1e-5, c.Name + " LSE");
    }
}
