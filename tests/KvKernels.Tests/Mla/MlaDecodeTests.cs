using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Mla;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Mla;

/// <summary>
/// The whole MLA decode step on every backend (absorb → latent attention → un-absorb through <see cref="MlaKernels"/>)
/// against the CPU twin <see cref="MlaCpu.Decode{TIn, TOut}"/>, and bad input rejected before any launch.
/// </summary>
public sealed class MlaDecodeTests(Backends backends)
{
    public static TheoryData<string, int, int, int> Cases
    {
        get
        {
            var data = new TheoryData<string, int, int, int>();
            foreach (var backend in Backends.All)
            {
                data.Add(backend, 16, 1, 64);    // heads, q_len, page size (0 = contiguous)
                data.Add(backend, 128, 2, 64);
                data.Add(backend, 8, 1, 0);
            }
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Decode_MatchesCpuTwin(string backend, int heads, int queryLength, int pageSize)
    {
        var device = backends.Get(backend);
        int[] lengths = heads == 128 ? [66, 3] : [0, 1, 64, 65];
        var cache = pageSize == 0 ? KvCacheShape.Contiguous(70) : KvCacheShape.Paged(12, pageSize, 3);
        var spec = new MlaAttentionSpec(lengths.Length, queryLength, MlaShape.DeepSeek(heads), cache)
        {
            InputType = AttentionElement.BFloat16, OutputType = heads == 128 ? AttentionElement.Float32 : AttentionElement.BFloat16,
        };
        if (spec.OutputType == AttentionElement.Float32) Check<float>(device, spec, lengths);
        else Check<BFloat16>(device, spec, lengths);
    }

    private static void Check<TOut>(CudaDevice device, MlaAttentionSpec spec, int[] lengths) where TOut : unmanaged
    {
        var data = MlaData<BFloat16>.Create(spec, new Random(spec.Shape.NumHeads + lengths.Sum()), lengths);
        var c = data.Cache;
        var expected = new TOut[spec.OutputElements];
        var expectedLse = new float[c.Spec.LseElements];
        MlaCpu.Decode<BFloat16, TOut>(spec, data.QueryNope, data.QueryRope, data.Weights, c.Keys, c.Lengths, c.BlockTable, expected, expectedLse);

        using var ops = new MlaKernels(device);
        using var qNope = device.Allocate<BFloat16>(data.QueryNope);
        using var qPe = device.Allocate<BFloat16>(data.QueryRope);
        using var weights = device.Allocate<BFloat16>(data.Weights);
        using var pool = device.Allocate<BFloat16>(c.Keys);
        using var output = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.OutputElements));
        using var lse = device.Allocate<float>(AttentionElements.Poisoned<float>(c.Spec.LseElements));
        using var workspace = new MlaWorkspace(device, spec.TokenRows * spec.Shape.NumHeads, spec.Shape.RowDim, maxSplits: 4);
        if (spec.Cache.IsPaged)
        {
            using var table = new DeviceBlockTable(device, spec.BatchSize, spec.Cache.MaxPagesPerSequence);
            table.Update(c.BlockTable, c.Lengths, c.Spec.KeyPool);
            ops.Decode(spec, qNope.Span, qPe.Span, weights.Span, pool.Span, table, output.Span, workspace, lse.Span);
        }
        else
        {
            using var sequenceLengths = new DeviceSequenceLengths(device, spec.BatchSize);
            sequenceLengths.Update(c.Lengths, spec.Cache.MaxTokens);
            ops.Decode(spec, qNope.Span, qPe.Span, weights.Span, pool.Span, sequenceLengths, output.Span, workspace, lse.Span);
        }
        device.DefaultStream.Synchronize();
        // Same rounding points on both sides; GEMM summation order may move a bf16 q_latent or o_lat element by one unit.
        Assert.InRange(AttentionElements.RelativeError<TOut>(output.ToArray(), AttentionElements.ToDoubles<TOut>(expected)), 0, 1e-2);
        Assert.InRange(AttentionElements.RelativeError<float>(lse.ToArray(), AttentionElements.ToDoubles<float>(expectedLse)), 0, 1e-3);
        // And the GPU's step against the float64 oracle.
        Assert.InRange(AttentionElements.RelativeError<TOut>(output.ToArray(), data.ExpectedAbsorbed().Output), 0, 1e-2);
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void BadInput_IsRejectedBeforeAnyLaunch(string backend)
    {
        var device = backends.Get(backend);
        var spec = new MlaAttentionSpec(1, 1, MlaShape.DeepSeek(16), KvCacheShape.Paged(4, 64, 2))
        {
            InputType = AttentionElement.BFloat16, OutputType = AttentionElement.BFloat16,
        };
        var attention = spec.ToDecodeAttention();
        using var ops = new MlaKernels(device);
        using var qNope = device.Allocate<BFloat16>(spec.NopeQueryElements);
        using var qPe = device.Allocate<BFloat16>(spec.RopeQueryElements);
        using var weights = device.Allocate<BFloat16>(spec.Shape.WeightElements);
        using var pool = device.Allocate<BFloat16>(attention.KeyElements);
        using var output = device.Allocate<BFloat16>(AttentionElements.Poisoned<BFloat16>(spec.OutputElements));
        using var table = new DeviceBlockTable(device, 1, 2);
        table.Update([0, 1], [70], attention.KeyPool);
        using var workspace = new MlaWorkspace(device, 16, 576, 4);
        using var small = new MlaWorkspace(device, 8, 576, 4);
        ArgumentException Bad(Action a) => Assert.Throws<ArgumentException>(a);
        Assert.Equal("weights", Bad(() => ops.Decode(spec, qNope.Span, qPe.Span, weights.Span.Slice(512 * 128), pool.Span, table, output.Span, workspace)).ParamName);
        Assert.Equal("queryNope", Bad(() => ops.Decode(spec, qNope.Span.Slice(1), qPe.Span, weights.Span, pool.Span, table, output.Span, workspace)).ParamName);
        Assert.Equal("queryRope", Bad(() => ops.Decode(spec, qNope.Span, qPe.Span.Slice(2), weights.Span, pool.Span, table, output.Span, workspace)).ParamName);
        Assert.Equal("cache", Bad(() => ops.Decode(spec, qNope.Span, qPe.Span, weights.Span, pool.Span.Slice(8), table, output.Span, workspace)).ParamName);
        Assert.Equal("output", Bad(() => ops.Decode(spec, qNope.Span, qPe.Span, weights.Span, pool.Span, table, output.Span.Slice(1), workspace)).ParamName);
        Assert.Equal("workspace", Bad(() => ops.Decode(spec, qNope.Span, qPe.Span, weights.Span, pool.Span, table, output.Span, small)).ParamName);
        // 576 ≠ 512 + 32: a shape whose rope dim does not match the cache rows.
        var wrongRope = spec with { Shape = spec.Shape with { RopeDim = 32 } };
        Assert.Equal("cache", Bad(() => ops.Decode(wrongRope, qNope.Span, qPe.Span.Slice(0, wrongRope.RopeQueryElements), weights.Span, pool.Span, table, output.Span, workspace)).ParamName);
        // Nothing was written.
        Assert.All(output.ToArray(), x => Assert.True(float.IsNaN((float)x)));
    }
}
