using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Tests.Paging;

/// <summary>
/// Holds the GPU wrapper to the kernels' ABI without a GPU: on a recording backend, each op launches the right entry
/// point of the right specialization, with as many arguments as the kernel declares and the values it expects.
/// </summary>
public sealed class PagingLaunchTests : IDisposable
{
    private static readonly PagedKvLayout Pool = new(NumPages: 8, PageSize: 16, NumKvHeads: 4, HeadDim: 128, KvLayout.Hnd);

    private readonly CudaDevice _device;
    private readonly FakeBackend _backend;
    private readonly PagedKvKernels _ops;

    public PagingLaunchTests()
    {
        _device = FakeBackend.CreateDevice(out _backend);
        foreach (var name in PagedKvKernels.EntryPoints)
            _backend.ArgumentCounts[name] = KernelSignatures.Parameters(PagedKvKernels.Source, name).Count;
        _ops = new PagedKvKernels(_device);
    }

    public void Dispose() => _device.Dispose();

    [Fact]
    public void Signatures_HaveTheParameterCountsTheWrapperPasses()
    {
        Assert.Equal(11, _backend.ArgumentCounts["paging_append"]);
        Assert.Equal(13, _backend.ArgumentCounts["paging_gather"]);
        Assert.Equal(12, _backend.ArgumentCounts["paging_scatter"]);
        Assert.Equal(5, _backend.ArgumentCounts["paging_copy_pages"]);
        var append = KernelSignatures.Parameters(PagedKvKernels.Source, "paging_append");
        Assert.Equal("kvk_i64", append[^1]);
        Assert.Equal("kvk_i32", append[5]);
    }

    [Fact]
    public void Append_LaunchesWithTheKernelsArguments()
    {
        using var keys = _device.Allocate<ushort>(3 * 600);
        using var keyPool = _device.Allocate<ushort>(Pool.PoolElements);
        using var slots = new DeviceSlotMapping(_device, 4);
        slots.Update([5, -1, 100], Pool);
        _ops.Append(new PagedAppendSpec(Pool, 3, KeyTokenStride: 600), keys.Span, default, slots, keyPool.Span, default);

        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("paging_append", launch.Kernel);
        Assert.Equal("KV_LAYOUT_HND=1 VEC_BYTES=16", launch.Defines);
        Assert.Equal(256u, launch.Block.X);
        ulong[] expected = [keys.Pointer, 0, slots.Slots.Pointer, keyPool.Pointer, 0, 3, 4, 16, 256, 1200, 512 * 2];
        Assert.Equal(expected, launch.Arguments);
    }

    [Fact]
    public void Gather_UsesEightByteVectorsForAnOddRow_AndPassesZeroFill()
    {
        var pool = Pool with { HeadDim = 8, Layout = KvLayout.Nhd };
        using var keyPool = _device.Allocate<byte>(pool.PoolElements);
        using var valuePool = _device.Allocate<byte>(pool.PoolElements);
        using var table = new DeviceBlockTable(_device, 2, 3);
        table.Update([1, 2, -1, 3, -1, -1], [20, 9], pool);
        var spec = new PagedBatchSpec(pool, 2, 3, 24, ZeroFillPadding: false);
        using var keys = _device.Allocate<byte>(spec.ContiguousElements);
        using var values = _device.Allocate<byte>(spec.ContiguousElements);
        _ops.Gather(spec, keyPool.Span, valuePool.Span, table, keys.Span, values.Span);

        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("paging_gather", launch.Kernel);
        Assert.Equal("KV_LAYOUT_HND=0 VEC_BYTES=8", launch.Defines);
        Assert.Equal(2u, launch.Grid.Y);
        Assert.Equal(13, launch.Arguments.Length);
        Assert.Equal([keyPool.Pointer, valuePool.Pointer], launch.Arguments[..2]);
        Assert.Equal([keys.Pointer, values.Pointer], launch.Arguments[4..6]);
        Assert.Equal<ulong>([2, 3, 24, 4, 16, 8, 0], launch.Arguments[6..]);
    }

    [Fact]
    public void Scatter_RefusesATableThatReusesAPage_ButGatherAcceptsIt()
    {
        using var keyPool = _device.Allocate<ushort>(Pool.PoolElements);
        using var table = new DeviceBlockTable(_device, 2, 1);
        table.Update([3, 3], [16, 4], Pool); // prefix sharing: both sequences read page 3
        var spec = new PagedBatchSpec(Pool, 2, 1, 16);
        using var keys = _device.Allocate<ushort>(spec.ContiguousElements);
        _ops.Gather(spec, keyPool.Span, default, table, keys.Span, default);
        Assert.Throws<ArgumentException>("table", () => _ops.Scatter(spec, keys.Span, default, table, keyPool.Span, default));
        Assert.Single(_backend.Launches);
    }

    [Fact]
    public void CopyPages_PassesPairsAndPageBytes()
    {
        using var keyPool = _device.Allocate<ushort>(Pool.PoolElements);
        using var valuePool = _device.Allocate<ushort>(Pool.PoolElements);
        using var copies = new DevicePageCopies(_device, 8);
        copies.Update([0, 5, 1, 6], Pool);
        _ops.CopyPages(Pool, copies, keyPool.Span, valuePool.Span);
        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("paging_copy_pages", launch.Kernel);
        Assert.Equal<ulong>([keyPool.Pointer, valuePool.Pointer], launch.Arguments[..2]);
        Assert.Equal<ulong>([2, (ulong)(Pool.PageElements * 2)], launch.Arguments[3..]);
        Assert.Equal(2u, launch.Grid.Y);
    }

    [Fact]
    public void EmptyWork_LaunchesNothing()
    {
        using var keyPool = _device.Allocate<ushort>(Pool.PoolElements);
        using var slots = new DeviceSlotMapping(_device, 4);
        slots.Update([], Pool);
        using var keys = _device.Allocate<ushort>(0);
        _ops.Append(new PagedAppendSpec(Pool, 0), keys.Span, default, slots, keyPool.Span, default);
        Assert.Empty(_backend.Launches);
    }
}
