using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Tests.Attention;

/// <summary>
/// Invalid calls to the GPU wrapper get an <see cref="ArgumentException"/> naming the parameter, and make no device call
/// (checked on a recording backend). A second recording device stands in for "another GPU".
/// </summary>
public sealed class DecodeAttentionKernelsBadInputTests : IDisposable
{
    private static readonly DecodeAttentionSpec PagedSpec = new(2, 1, 8, 2, 64, KvCacheShape.Paged(6, 16, 3))
    {
        InputType = AttentionElement.Float16, OutputType = AttentionElement.Float16,
    };

    private static readonly DecodeAttentionSpec ContiguousSpec = PagedSpec with { Cache = KvCacheShape.Contiguous(40) };

    private readonly CudaDevice _device, _other;
    private readonly FakeBackend _backend, _otherBackend;
    private readonly DecodeAttentionKernels _ops;
    private readonly DeviceMemory<Half> _query, _keys, _values, _output, _spare, _contiguousKeys, _contiguousValues;
    private readonly DeviceMemory<float> _lse;
    private readonly DeviceBlockTable _table;
    private readonly DeviceSequenceLengths _lengths;
    private readonly DecodeAttentionWorkspace _workspace;

    public DecodeAttentionKernelsBadInputTests()
    {
        _device = FakeBackend.CreateDevice(out _backend);
        _other = FakeBackend.CreateDevice(out _otherBackend);
        _ops = new DecodeAttentionKernels(_device);
        _query = _device.Allocate<Half>(PagedSpec.QueryElements);
        _keys = _device.Allocate<Half>(PagedSpec.KeyElements);
        _values = _device.Allocate<Half>(PagedSpec.ValueElements);
        _output = _device.Allocate<Half>(PagedSpec.OutputElements);
        _spare = _device.Allocate<Half>(PagedSpec.KeyElements + 8);
        _contiguousKeys = _device.Allocate<Half>(ContiguousSpec.KeyElements);
        _contiguousValues = _device.Allocate<Half>(ContiguousSpec.ValueElements);
        _lse = _device.Allocate<float>(PagedSpec.LseElements);
        _table = new DeviceBlockTable(_device, 4, 3);
        _table.Update([0, 1, -1, 2, -1, -1], [20, 5], PagedSpec.KeyPool);
        _lengths = new DeviceSequenceLengths(_device, 4);
        _lengths.Update([40, 3], 40);
        _workspace = new DecodeAttentionWorkspace(_device, PagedSpec.LseElements, 64, 4);
    }

    public void Dispose()
    {
        foreach (var d in new IDisposable[] { _query, _keys, _values, _output, _spare, _contiguousKeys, _contiguousValues, _lse, _table, _lengths, _workspace })
            d.Dispose();
        _device.Dispose();
        _other.Dispose();
    }

    private void RunPaged(DecodeAttentionSpec? spec = null, DeviceSpan<Half>? query = null, DeviceSpan<Half>? keys = null,
        DeviceSpan<Half>? values = null, DeviceBlockTable? table = null, DeviceSpan<Half>? output = null, DeviceSpan<float>? lse = null,
        DecodeAttentionWorkspace? workspace = null, DeviceSpan<int> positions = default, DeviceSpan<float> slopes = default) =>
        _ops.Run(spec ?? PagedSpec, query ?? _query.Span, keys ?? _keys.Span, values ?? _values.Span, table ?? _table, output ?? _output.Span,
            lse ?? _lse.Span, workspace, positions, slopes);

    private void RunContiguous(DecodeAttentionSpec? spec = null, DeviceSequenceLengths? lengths = null, DeviceSpan<Half>? query = null) =>
        _ops.Run(spec ?? ContiguousSpec, query ?? _query.Span, _contiguousKeys.Span, _contiguousValues.Span, lengths ?? _lengths, _output.Span);

    private void AssertRejected(string paramName, Action call)
    {
        int before = _backend.DeviceCalls;
        var e = Assert.ThrowsAny<ArgumentException>(call);
        Assert.Equal(paramName, e.ParamName);
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
        Assert.Empty(_backend.Launches);
        Assert.Equal(before, _backend.DeviceCalls);
    }

    [Fact]
    public void GoodCalls_Launch()
    {
        RunPaged(workspace: _workspace);
        RunContiguous();
        Assert.NotEmpty(_backend.Launches);
    }

    [Fact]
    public void InvalidSpec_IsRejected()
    {
        AssertRejected("spec", () => RunPaged(PagedSpec with { QueryLength = 17 }));
        AssertRejected("spec", () => RunPaged(PagedSpec with { NumQueryHeads = 9 }));
        AssertRejected("spec", () => RunPaged(PagedSpec with { Sinks = 2 }));
    }

    [Fact]
    public void StorageKind_MustMatchTheOverload()
    {
        AssertRejected("spec", () => _ops.Run(ContiguousSpec, _query.Span, _contiguousKeys.Span, _contiguousValues.Span, _table, _output.Span));
        AssertRejected("spec", () => _ops.Run(PagedSpec, _query.Span, _keys.Span, _values.Span, _lengths, _output.Span));
    }

    [Fact]
    public void BlockTable_OfAnotherPoolOrShape_IsRejected()
    {
        using var otherPool = new DeviceBlockTable(_device, 4, 3);
        otherPool.Update([0, 1, -1, 2, -1, -1], [20, 5], PagedSpec.KeyPool with { NumPages = 7 });
        AssertRejected("table", () => RunPaged(table: otherPool));
        using var otherPageSize = new DeviceBlockTable(_device, 4, 3);
        otherPageSize.Update([0, 1, -1, 2, -1, -1], [20, 5], PagedSpec.KeyPool with { PageSize = 32 });
        AssertRejected("table", () => RunPaged(table: otherPageSize));
        using var otherColumns = new DeviceBlockTable(_device, 4, 2);
        otherColumns.Update([0, 1, 2, -1], [20, 5], PagedSpec.KeyPool);
        AssertRejected("table", () => RunPaged(table: otherColumns));
        using var otherBatch = new DeviceBlockTable(_device, 4, 3);
        otherBatch.Update([0, 1, -1], [20], PagedSpec.KeyPool);
        AssertRejected("table", () => RunPaged(table: otherBatch));
        // Ragged rows are (sequence, KV head): the same table is one row per sequence, too short.
        AssertRejected("table", () => RunPaged(PagedSpec with { Ragged = true }));
        Assert.Throws<ArgumentNullException>("table", () => _ops.Run(PagedSpec, _query.Span, _keys.Span, _values.Span, (DeviceBlockTable)null!, _output.Span));
    }

    [Fact]
    public void Lengths_OfAnotherShape_AreRejected()
    {
        using var three = new DeviceSequenceLengths(_device, 4);
        three.Update([1, 2, 3], 40);
        AssertRejected("lengths", () => RunContiguous(lengths: three));
        using var tooLong = new DeviceSequenceLengths(_device, 4);
        tooLong.Update([41, 3], 64);
        AssertRejected("lengths", () => RunContiguous(lengths: tooLong));
    }

    [Fact]
    public void Workspace_TooSmall_IsRejected()
    {
        using var fewRows = new DecodeAttentionWorkspace(_device, PagedSpec.LseElements - 1, 64, 4);
        AssertRejected("workspace", () => RunPaged(workspace: fewRows));
        using var narrow = new DecodeAttentionWorkspace(_device, PagedSpec.LseElements, 56, 4);
        AssertRejected("workspace", () => RunPaged(workspace: narrow));
    }

    [Fact]
    public void Buffers_OfWrongSizeOrType_AreRejected()
    {
        AssertRejected("query", () => RunPaged(query: _query.Span.Slice(0, PagedSpec.QueryElements - 8)));
        AssertRejected("keys", () => RunPaged(keys: _spare.Span));
        AssertRejected("values", () => RunPaged(PagedSpec with { KeyReuse = true }));
        AssertRejected("output", () => RunPaged(output: _output.Span.Slice(8)));
        AssertRejected("lse", () => RunPaged(lse: _lse.Span.Slice(1)));
        AssertRejected("positions", () => RunPaged(PagedSpec with { Rope = new RopeOptions(RopeStyle.RotateHalf, ExplicitPositions: true) }));
        AssertRejected("alibiSlopes", () => RunPaged(PagedSpec with { Alibi = true }));
        AssertRejected("query", () => _ops.Run(PagedSpec, _query.Span.Cast<BFloat16>(), _keys.Span.Cast<BFloat16>(), _values.Span.Cast<BFloat16>(),
            _table, _output.Span));
        AssertRejected("output", () => _ops.Run(PagedSpec, _query.Span, _keys.Span, _values.Span, _table, _output.Span.Cast<BFloat16>()));
    }

    [Fact]
    public void MisalignedBuffers_AreRejected()
    {
        // One element in: the right length at an address that is not a multiple of 16.
        AssertRejected("keys", () => RunPaged(keys: _spare.Span.Slice(1, PagedSpec.KeyElements)));
        using var query = _device.Allocate<Half>(PagedSpec.QueryElements + 8);
        AssertRejected("query", () => RunPaged(query: query.Span.Slice(4, PagedSpec.QueryElements)));
    }

    [Fact]
    public void Buffers_OfAnotherDevice_AreRejected()
    {
        using var query = _other.Allocate<Half>(PagedSpec.QueryElements);
        AssertRejected("query", () => RunPaged(query: query.Span));
        using var table = new DeviceBlockTable(_other, 4, 3);
        table.Update([0, 1, -1, 2, -1, -1], [20, 5], PagedSpec.KeyPool);
        AssertRejected("table", () => RunPaged(table: table));
        using var lengths = new DeviceSequenceLengths(_other, 4);
        lengths.Update([40, 3], 40);
        AssertRejected("lengths", () => RunContiguous(lengths: lengths));
        using var workspace = new DecodeAttentionWorkspace(_other, 64, 64, 4);
        AssertRejected("workspace", () => RunPaged(workspace: workspace));
        Assert.Empty(_otherBackend.Launches);
    }

    [Fact]
    public void MergeStates_BadBuffers_AreRejected()
    {
        var spec = new MergeStatesSpec(4, 10);
        using var a = _device.Allocate<float>(40);
        using var l = _device.Allocate<float>(4);
        using var foreign = _other.Allocate<float>(40);
        AssertRejected("outputB", () => _ops.MergeStates(spec, a.Span, l.Span, a.Span.Slice(1), l.Span, a.Span, l.Span));
        AssertRejected("lse", () => _ops.MergeStates(spec, a.Span, l.Span, a.Span, l.Span, a.Span, l.Span.Slice(1)));
        AssertRejected("spec", () => _ops.MergeStates(new MergeStatesSpec(4, 0), a.Span, l.Span, a.Span, l.Span, a.Span, l.Span));
        AssertRejected("output", () => _ops.MergeStates(new MergeStatesSpec(4, 5), a.Span.Cast<int>().Slice(0, 20), l.Span,
            a.Span.Cast<int>().Slice(20, 20), l.Span, a.Span.Cast<int>().Slice(0, 20), l.Span));
        AssertRejected("outputA", () => _ops.MergeStates(spec, foreign.Span, l.Span, a.Span, l.Span, a.Span, l.Span));
    }

    [Fact]
    public void IndexBuffersAndWorkspace_ValidateTheirOwnArguments()
    {
        Assert.Throws<ArgumentException>("lengths", () => _lengths.Update([1, 2, 3, 4, 5], 40));
        Assert.Throws<ArgumentException>("lengths", () => _lengths.Update([1, 41], 40));
        Assert.Throws<ArgumentException>("lengths", () => _lengths.Update([-1], 40));
        Assert.Throws<ArgumentException>("maxTokens", () => _lengths.Update([], -1));
        Assert.Equal(2, _lengths.Count);   // unchanged by the failed updates
        Assert.Equal(40, _lengths.LongestSequence);
        Assert.Throws<ArgumentOutOfRangeException>("capacity", () => new DeviceSequenceLengths(_device, -1));
        Assert.Throws<ArgumentOutOfRangeException>("maxSplits", () => new DecodeAttentionWorkspace(_device, 8, 64, 0));
        Assert.Throws<ArgumentOutOfRangeException>("maxOutputDim", () => new DecodeAttentionWorkspace(_device, 8, 0, 2));
        Assert.Throws<ArgumentOutOfRangeException>("maxQueryRows", () => new DecodeAttentionWorkspace(_device, -1, 64, 2));
    }
}
