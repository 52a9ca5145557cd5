using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Mla;
using KvKernels.Paging;
using KvKernels.Tests.Attention;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Mla;

/// <summary>
/// Latent decode attention on every backend against the float64 oracle (tolerances of the output type; outputs and
/// LSE poisoned; unused cache slots NaN): DeepSeek's 576/512 rows, H = 16 and 128, q_len 1 and 2, lengths around a
/// 64-token page, an odd page size, contiguous storage, and forced split-KV.
/// </summary>
public sealed class MlaAttentionKernelsTests(Backends backends)
{
    private const AttentionElement F16 = AttentionElement.Float16, Bf16 = AttentionElement.BFloat16, F32 = AttentionElement.Float32;

    public sealed record MlaCase(string Name, MlaAttentionSpec Spec, int[] Lengths)
    {
        public override string ToString() => Name;
    }

    private static MlaAttentionSpec Spec(int heads, int queryLength, KvCacheShape cache, AttentionElement input, AttentionElement output, int splits = 0) =>
        new(0, queryLength, MlaShape.DeepSeek(heads), cache) { InputType = input, OutputType = output, Splits = splits };

    public static IReadOnlyList<MlaCase> Cases { get; } =
    [
        new("h16-q1-page64-edges", Spec(16, 1, KvCacheShape.Paged(14, 64, 3), Bf16, Bf16), [0, 1, 63, 64, 65]),
        new("h128-q2-page64-fp32-out", Spec(128, 2, KvCacheShape.Paged(6, 64, 3), Bf16, F32), [130, 2]),
        new("h16-q2-page13-fp16", Spec(16, 2, KvCacheShape.Paged(20, 13, 10), F16, F16), [120, 7]),
        new("h32-q1-contiguous", Spec(32, 1, KvCacheShape.Contiguous(100), Bf16, F32), [100, 33]),
        new("h16-q1-split3", Spec(16, 1, KvCacheShape.Paged(12, 64, 12), Bf16, F32, splits: 3), [700]),
    ];

    public static TheoryData<string, int, string> CaseIndices
    {
        get
        {
            var data = new TheoryData<string, int, string>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < Cases.Count; i++)
                    foreach (var kernel in new[] { "cuda-cores", "tensor-cores" }) data.Add(backend, i, kernel);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Attend_MatchesOracle(string backend, int caseIndex, string kernel)
    {
        var device = backends.Get(backend);
        var c = Cases[caseIndex];
        var spec = c.Spec with { BatchSize = c.Lengths.Length };
        var ops = new MlaAttentionKernels(device)
        {
            KernelChoice = kernel == "tensor-cores" ? DecodeKernelChoice.TensorCores : DecodeKernelChoice.CudaCores,
        };
        Assert.Equal(kernel == "tensor-cores" ? DecodeKernel.Wide : DecodeKernel.CudaCores, ops.KernelFor(spec));
        Assert.True(DecodeAttentionKernels.UsesTensorCores(spec.ToDecodeAttention()), "every MLA case here has enough rows for the tensor cores");
        switch (spec.InputType, spec.OutputType)
        {
            case (F16, F16): Check<Half, Half>(device, ops, spec, c); break;
            case (Bf16, Bf16): Check<BFloat16, BFloat16>(device, ops, spec, c); break;
            default: Check<BFloat16, float>(device, ops, spec, c); break;
        }
    }

    private static void Check<TIn, TOut>(CudaDevice device, MlaAttentionKernels ops, MlaAttentionSpec spec, MlaCase c)
        where TIn : unmanaged where TOut : unmanaged
    {
        var attention = spec.ToDecodeAttention();
        var data = AttentionData<TIn>.Create(attention, new Random(c.Name.Length * 31 + c.Lengths.Sum()), c.Lengths);
        var (expected, expectedLse) = data.Expected();
        using var q = device.Allocate<TIn>(data.Query);
        using var cache = device.Allocate<TIn>(data.Keys);
        using var output = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.LatentOutputElements));
        using var lse = device.Allocate<float>(AttentionElements.Poisoned<float>(attention.LseElements));
        using var workspace = new DecodeAttentionWorkspace(device, attention.LseElements, spec.Shape.LatentDim, maxSplits: 8);
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.BatchSize, spec.Cache.MaxPagesPerSequence);
            table.Update(data.BlockTable, data.Lengths, attention.KeyPool);
            ops.Run(spec, q.Span, cache.Span, table, output.Span, lse.Span, workspace);
        }
        else
        {
            using var lengths = new DeviceSequenceLengths(device, spec.BatchSize);
            lengths.Update(data.Lengths, spec.Cache.MaxTokens);
            ops.Run(spec, q.Span, cache.Span, lengths, output.Span, lse.Span, workspace);
        }
        device.DefaultStream.Synchronize();
        double tolerance = spec.OutputType switch { F32 => 1e-5, F16 => 2e-3, _ => 1e-2 };
        Assert.InRange(AttentionElements.RelativeError<TOut>(output.ToArray(), expected), 0, tolerance);
        Assert.InRange(AttentionElements.RelativeError<float>(lse.ToArray(), expectedLse), 0, 1e-5);
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void BadInput_IsRejectedBeforeAnyLaunch(string backend)
    {
        var device = backends.Get(backend);
        var spec = Spec(16, 1, KvCacheShape.Paged(4, 64, 2), Bf16, Bf16) with { BatchSize = 1 };
        var attention = spec.ToDecodeAttention();
        using var q = device.Allocate<BFloat16>(spec.QueryElements);
        using var cache = device.Allocate<BFloat16>(attention.KeyElements);
        using var output = device.Allocate<BFloat16>(spec.LatentOutputElements);
        using var table = new DeviceBlockTable(device, 1, 2);
        table.Update([0, 1], [70], attention.KeyPool);
        var ops = new MlaAttentionKernels(device);
        Assert.Equal("query", Assert.Throws<ArgumentException>(() => ops.Run(spec, q.Span.Slice(1), cache.Span, table, output.Span)).ParamName);
        Assert.Equal("keys", Assert.Throws<ArgumentException>(() => ops.Run(spec, q.Span, cache.Span.Slice(8), table, output.Span)).ParamName);
        Assert.Equal("output", Assert.Throws<ArgumentException>(() => ops.Run(spec, q.Span, cache.Span, table, output.Span.Slice(512))).ParamName);
        // A pool of two heads is not a latent cache.
        var twoHeads = spec with { Cache = KvCacheShape.Paged(4, 64, 2, KvLayout.Nhd, poolKvHeads: 2) };
        Assert.Equal("spec", Assert.Throws<ArgumentException>(() => ops.Run(twoHeads, q.Span, cache.Span, table, output.Span)).ParamName);
        // A table validated for another pool.
        using var other = new DeviceBlockTable(device, 1, 2);
        other.Update([0, 1], [70], attention.KeyPool with { NumPages = 5 });
        Assert.Equal("table", Assert.Throws<ArgumentException>(() => ops.Run(spec, q.Span, cache.Span, other, output.Span)).ParamName);
    }
}
