using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Tests.Paging;

/// <summary>
/// Invalid calls get an <see cref="ArgumentException"/> naming the parameter, on the CPU and through the GPU wrapper,
/// and the GPU wrapper makes no device call for them (checked on a recording backend).
/// </summary>
public sealed class PagingBadInputTests
{
    private static readonly PagedKvLayout Pool = new(NumPages: 4, PageSize: 16, NumKvHeads: 2, HeadDim: 64);

    internal sealed record BadCall(string Name, string ParamName, Action<BadCallContext> Invoke)
    {
        public override string ToString() => Name;
    }

    /// <summary>Buffers of the right sizes on the host and on a fake device; each bad call breaks one thing.</summary>
    internal sealed class BadCallContext : IDisposable
    {
        public readonly CudaDevice Device;
        public readonly FakeBackend Backend;
        public readonly PagedKvKernels Gpu;
        public readonly DeviceMemory<ushort> KeyPool, ValuePool, Tokens, Contiguous, Spare;
        public readonly DeviceSlotMapping Slots;
        public readonly DeviceBlockTable Table;
        public readonly DevicePageCopies Copies;
        public readonly ushort[] HostPool = new ushort[Pool.PoolElements];
        public readonly ushort[] HostTokens = new ushort[3 * Pool.TokenElements];
        public readonly ushort[] HostContiguous = new ushort[2 * 20 * Pool.TokenElements];

        public BadCallContext()
        {
            Device = FakeBackend.CreateDevice(out Backend);
            Gpu = new PagedKvKernels(Device);
            KeyPool = Device.Allocate<ushort>(Pool.PoolElements);
            ValuePool = Device.Allocate<ushort>(Pool.PoolElements);
            Tokens = Device.Allocate<ushort>(3 * Pool.TokenElements);
            Contiguous = Device.Allocate<ushort>(2 * 20 * Pool.TokenElements);
            Spare = Device.Allocate<ushort>(Pool.PoolElements + 8);
            Slots = new DeviceSlotMapping(Device, 8);
            Slots.Update([0, 17, -1], Pool);
            Table = new DeviceBlockTable(Device, 4, 2);
            Table.Update([0, 1, 2, -1], [20, 5], Pool);
            Copies = new DevicePageCopies(Device, 4);
            Copies.Update([0, 3], Pool);
            Backend.Launches.Clear();
        }

        public void Dispose()
        {
            KeyPool.Dispose(); ValuePool.Dispose(); Tokens.Dispose(); Contiguous.Dispose(); Spare.Dispose();
            Slots.Dispose(); Table.Dispose(); Copies.Dispose(); Device.Dispose();
        }
    }

    private static readonly PagedAppendSpec Append3 = new(Pool, 3);
    private static readonly PagedBatchSpec Batch2 = new(Pool, 2, 2, 20);

    private static readonly BadCall[] AllCalls =
    [
        // CPU append
        new("cpu append: key pool too small", "keyPool", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool.AsSpan(1), c.HostPool)),
        new("cpu append: keys too short", "keys", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens.AsSpan(1), c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: slots count", "slots", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens, c.HostTokens, [0, 1], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: slot beyond the pool", "slots", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens, c.HostTokens, [0, 64, 1], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: slot below -1", "slots", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens, c.HostTokens, [0, -2, 1], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: duplicate slot", "slots", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens, c.HostTokens, [5, 1, 5], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: values without a value pool", "valuePool", c => PagedKvCache.Append<ushort>(Append3, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, [])),
        new("cpu append: negative token count", "spec", c => PagedKvCache.Append<ushort>(Append3 with { NumTokens = -1 }, c.HostTokens, c.HostTokens, [], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: stride below a token", "spec", c => PagedKvCache.Append<ushort>(Append3 with { KeyTokenStride = 5 }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: page size 0", "spec", c => PagedKvCache.Append<ushort>(Append3 with { Pool = Pool with { PageSize = 0 } }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: page size 257", "spec", c => PagedKvCache.Append<ushort>(Append3 with { Pool = Pool with { PageSize = 257 } }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: head dim not a multiple of 8", "spec", c => PagedKvCache.Append<ushort>(Append3 with { Pool = Pool with { HeadDim = 60 } }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: head dim 584", "spec", c => PagedKvCache.Append<ushort>(Append3 with { Pool = Pool with { HeadDim = 584 } }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: negative heads", "spec", c => PagedKvCache.Append<ushort>(Append3 with { Pool = Pool with { NumKvHeads = -2 } }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        new("cpu append: unknown layout", "spec", c => PagedKvCache.Append<ushort>(Append3 with { Pool = Pool with { Layout = (KvLayout)7 } }, c.HostTokens, c.HostTokens, [0, 1, 2], c.HostPool, (ushort[])c.HostPool.Clone())),
        // CPU gather / scatter
        new("cpu gather: destination too small", "keys", c => PagedKvCache.Gather<ushort>(Batch2, c.HostPool, [], [0, 1, 2, -1], [20, 5], c.HostContiguous.AsSpan(1), [])),
        new("cpu gather: sequence longer than its pages", "sequenceLengths", c => PagedKvCache.Gather<ushort>(Batch2 with { MaxTokens = 40 }, c.HostPool, [], [0, 1, 2, -1], [33, 5], new ushort[2 * 40 * Pool.TokenElements], [])),
        new("cpu gather: sequence longer than MaxTokens", "sequenceLengths", c => PagedKvCache.Gather<ushort>(Batch2 with { MaxTokens = 10 }, c.HostPool, [], [0, 1, 2, -1], [20, 5], c.HostContiguous, [])),
        new("cpu gather: negative length", "sequenceLengths", c => PagedKvCache.Gather<ushort>(Batch2, c.HostPool, [], [0, 1, 2, -1], [-1, 5], c.HostContiguous, [])),
        new("cpu gather: page index out of range", "blockTable", c => PagedKvCache.Gather<ushort>(Batch2, c.HostPool, [], [0, 4, 2, -1], [20, 5], c.HostContiguous, [])),
        new("cpu gather: page index -1 in use", "blockTable", c => PagedKvCache.Gather<ushort>(Batch2, c.HostPool, [], [0, -1, 2, -1], [20, 5], c.HostContiguous, [])),
        new("cpu gather: block table shape", "blockTable", c => PagedKvCache.Gather<ushort>(Batch2, c.HostPool, [], [0, 1, 2], [20, 5], c.HostContiguous, [])),
        new("cpu gather: lengths count", "sequenceLengths", c => PagedKvCache.Gather<ushort>(Batch2, c.HostPool, [], [0, 1, 2, -1], [20], c.HostContiguous, [])),
        new("cpu gather: layout mismatch (pool of another shape)", "keyPool", c => PagedKvCache.Gather<ushort>(Batch2 with { Pool = Pool with { NumKvHeads = 4 } }, c.HostPool, [], [0, 1, 2, -1], [20, 5], new ushort[2 * 20 * 4 * 64], [])),
        new("cpu gather: negative batch", "spec", c => PagedKvCache.Gather<ushort>(Batch2 with { BatchSize = -1 }, c.HostPool, [], [], [], c.HostContiguous, [])),
        new("cpu scatter: page used twice", "blockTable", c => PagedKvCache.Scatter<ushort>(Batch2, c.HostContiguous, [], [0, 1, 1, -1], [20, 5], c.HostPool, [])),
        // CPU page copy
        new("cpu copy: odd pair list", "pairs", c => PagedKvCache.CopyPages<ushort>(Pool, [0, 1, 2], c.HostPool, [])),
        new("cpu copy: page out of range", "pairs", c => PagedKvCache.CopyPages<ushort>(Pool, [0, 4], c.HostPool, [])),
        new("cpu copy: repeated destination", "pairs", c => PagedKvCache.CopyPages<ushort>(Pool, [0, 2, 1, 2], c.HostPool, [])),
        new("cpu copy: destination is a source", "pairs", c => PagedKvCache.CopyPages<ushort>(Pool, [0, 1, 1, 2], c.HostPool, [])),
        new("cpu copy: value pool of another size", "valuePool", c => PagedKvCache.CopyPages<ushort>(Pool, [0, 1], c.HostPool, new ushort[5])),
        // Metadata validation before upload
        new("gpu slots: beyond the pool", "slots", c => c.Slots.Update([0, 64], Pool)),
        new("gpu slots: over capacity", "slots", c => c.Slots.Update(new int[9], Pool)),
        new("gpu table: page out of range", "blockTable", c => c.Table.Update([0, 9, 2, -1], [20, 5], Pool)),
        new("gpu table: sequence longer than its pages", "sequenceLengths", c => c.Table.Update([0, 1, 2, -1], [33, 5], Pool)),
        new("gpu table: shape", "blockTable", c => c.Table.Update([0, 1, 2], [20, 5], Pool)),
        new("gpu copies: repeated destination", "pairs", c => c.Copies.Update([0, 2, 1, 2], Pool)),
        // GPU wrappers
        new("gpu append: token count differs from the mapping", "slots", c => c.Gpu.Append(Append3 with { NumTokens = 2 }, c.Tokens.Span, c.Tokens.Span, c.Slots, c.KeyPool.Span, c.ValuePool.Span)),
        new("gpu append: pool too small", "keyPool", c => c.Gpu.Append(Append3, c.Tokens.Span, c.Tokens.Span, c.Slots, c.KeyPool.Span.Slice(8), c.ValuePool.Span)),
        new("gpu append: keys too short", "keys", c => c.Gpu.Append(Append3, c.Tokens.Span.Slice(0, 10), c.Tokens.Span, c.Slots, c.KeyPool.Span, c.ValuePool.Span)),
        new("gpu append: slots validated for another pool", "slots", c => c.Gpu.Append(Append3 with { Pool = Pool with { NumPages = 2 } }, c.Tokens.Span, c.Tokens.Span, c.Slots, c.KeyPool.Span.Slice(0, 2 * Pool.PageElements), c.ValuePool.Span.Slice(0, 2 * Pool.PageElements))),
        new("gpu append: misaligned key pool", "keyPool", c => c.Gpu.Append(Append3, c.Tokens.Span, c.Tokens.Span, c.Slots, Misaligned(c.Spare), c.ValuePool.Span)),
        new("gpu append: buffer of another device", "keys", c => { using var other = FakeBackend.CreateDevice(out _); using var m = other.Allocate<ushort>(c.Tokens.Length); c.Gpu.Append(Append3, m.Span, c.Tokens.Span, c.Slots, c.KeyPool.Span, c.ValuePool.Span); }),
        new("gpu gather: destination too small", "keys", c => c.Gpu.Gather(Batch2, c.KeyPool.Span, c.ValuePool.Span, c.Table, c.Contiguous.Span.Slice(1), c.Contiguous.Span)),
        new("gpu gather: MaxTokens below the longest sequence", "table", c => c.Gpu.Gather(Batch2 with { MaxTokens = 19 }, c.KeyPool.Span, default, c.Table, c.Contiguous.Span, default)),
        new("gpu gather: batch differs from the table", "table", c => c.Gpu.Gather(Batch2 with { BatchSize = 1 }, c.KeyPool.Span, default, c.Table, c.Contiguous.Span, default)),
        new("gpu gather: values without a value pool", "valuePool", c => c.Gpu.Gather(Batch2, c.KeyPool.Span, default, c.Table, c.Contiguous.Span, c.Contiguous.Span)),
        new("gpu scatter: keys too short", "keys", c => c.Gpu.Scatter(Batch2, c.Contiguous.Span.Slice(0, 100), default, c.Table, c.KeyPool.Span, default)),
        new("gpu copy: pool too small", "keyPool", c => c.Gpu.CopyPages(Pool, c.Copies, c.KeyPool.Span.Slice(1), default)),
        new("gpu copy: pairs validated for another pool", "copies", c => c.Gpu.CopyPages(Pool with { NumPages = 2 }, c.Copies, c.KeyPool.Span.Slice(0, 2 * Pool.PageElements), default)),
    ];

    public static TheoryData<string> Calls => new(AllCalls.Select(c => c.Name));

    /// <summary>A pool-sized view starting 2 bytes into an allocation: not 8-byte aligned.</summary>
    private static DeviceSpan<ushort> Misaligned(DeviceMemory<ushort> spare) =>
        spare.Span.AsBytes().Slice(2, Pool.PoolElements * sizeof(ushort)).Cast<ushort>();

    [Theory]
    [MemberData(nameof(Calls))]
    public void InvalidCall_ThrowsArgumentExceptionNamingTheParameter_AndMakesNoDeviceCall(string name)
    {
        var call = AllCalls.Single(c => c.Name == name);
        using var context = new BadCallContext();
        int before = context.Backend.DeviceCalls;
        var e = Assert.ThrowsAny<ArgumentException>(() => call.Invoke(context));
        Assert.Equal(call.ParamName, e.ParamName);
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
        Assert.Equal(before, context.Backend.DeviceCalls);
        Assert.Empty(context.Backend.Launches);
    }
}
