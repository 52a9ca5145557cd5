using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Tests.Paging;

/// <summary>
/// The GPU kernels against the CPU implementation, byte for byte, on every backend present. Outputs are poisoned
/// (0xFF) before each run so an element the kernel forgot to write fails the comparison.
/// </summary>
public sealed class PagedKvKernelsTests(Backends backends)
{
    public static TheoryData<string, int> Cases
    {
        get
        {
            var data = new TheoryData<string, int>();
            foreach (var backend in Backends.All)
                for (int i = 0; i < PagingCases.Pools.Length; i++) data.Add(backend, i);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Append_MatchesCpu(string backend, int poolIndex)
    {
        var device = backends.Get(backend);
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(1000 + poolIndex);
        var ops = new PagedKvKernels(device);
        foreach (var (padding, withValues) in new[] { (0, true), (8, true), (0, false) })
        {
            int tokens = (int)Math.Min(pool.Slots, 41);
            long stride = pool.TokenElements + padding;
            var spec = new PagedAppendSpec(pool, tokens, padding == 0 ? 0 : stride, padding == 0 ? 0 : stride);
            var keys = TestData.Random<ushort>(random, tokens * stride);
            var values = withValues ? TestData.Random<ushort>(random, tokens * stride) : [];
            var slots = PagingCases.Slots(random, pool, tokens);
            var keyPool = TestData.Random<ushort>(random, pool.PoolElements);
            var valuePool = withValues ? TestData.Random<ushort>(random, pool.PoolElements) : [];

            using var dKeys = device.Allocate<ushort>(keys);
            using var dValues = device.Allocate<ushort>(values);
            using var dKeyPool = device.Allocate<ushort>(keyPool);
            using var dValuePool = device.Allocate<ushort>(valuePool);
            using var dSlots = new DeviceSlotMapping(device, tokens);
            dSlots.Update(slots, pool);
            ops.Append(spec, dKeys.Span, withValues ? dValues.Span : default, dSlots, dKeyPool.Span, withValues ? dValuePool.Span : default);

            PagedKvCache.Append<ushort>(spec, keys, values, slots, keyPool, valuePool);
            PagingCases.AssertSameBytes<ushort>(keyPool, dKeyPool.ToArray(), $"key pool (padding {padding})");
            if (withValues) PagingCases.AssertSameBytes<ushort>(valuePool, dValuePool.ToArray(), $"value pool (padding {padding})");
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void GatherAndScatter_MatchCpu(string backend, int poolIndex)
    {
        var device = backends.Get(backend);
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(2000 + poolIndex);
        var ops = new PagedKvKernels(device);
        var (table, lengths, maxPages) = PagingCases.Batch(random, pool);
        int maxTokens = lengths.Max() + 2;
        using var dTable = new DeviceBlockTable(device, lengths.Length, maxPages);
        dTable.Update(table, lengths, pool);

        foreach (bool zeroFill in new[] { true, false })
        {
            var spec = new PagedBatchSpec(pool, lengths.Length, maxPages, maxTokens, zeroFill);
            var keyPool = TestData.Random<byte>(random, pool.PoolElements);
            var valuePool = TestData.Random<byte>(random, pool.PoolElements);
            var keys = new byte[spec.ContiguousElements];
            var values = new byte[spec.ContiguousElements];
            Array.Fill(keys, (byte)0xFF);
            Array.Fill(values, (byte)0xFF);
            using var dKeyPool = device.Allocate<byte>(keyPool);
            using var dValuePool = device.Allocate<byte>(valuePool);
            using var dKeys = device.Allocate<byte>(spec.ContiguousElements);
            using var dValues = device.Allocate<byte>(spec.ContiguousElements);
            dKeys.Span.FillBytes(0xFF);
            dValues.Span.FillBytes(0xFF);

            ops.Gather(spec, dKeyPool.Span, dValuePool.Span, dTable, dKeys.Span, dValues.Span);
            PagedKvCache.Gather<byte>(spec, keyPool, valuePool, table, lengths, keys, values);
            PagingCases.AssertSameBytes<byte>(keys, dKeys.ToArray(), $"gathered keys (zeroFill={zeroFill})");
            PagingCases.AssertSameBytes<byte>(values, dValues.ToArray(), $"gathered values (zeroFill={zeroFill})");

            var source = TestData.Random<byte>(random, spec.ContiguousElements);
            dKeys.CopyFrom(source);
            ops.Scatter(spec, dKeys.Span, default, dTable, dKeyPool.Span, default);
            PagedKvCache.Scatter<byte>(spec, source, [], table, lengths, keyPool, []);
            PagingCases.AssertSameBytes<byte>(keyPool, dKeyPool.ToArray(), "scattered key pool");
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void CopyPages_MatchesCpu(string backend, int poolIndex)
    {
        var device = backends.Get(backend);
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(3000 + poolIndex);
        var pairs = PagingCases.PagePairs(random, pool);
        var keyPool = TestData.Random<uint>(random, pool.PoolElements);
        var valuePool = TestData.Random<uint>(random, pool.PoolElements);
        using var dKeyPool = device.Allocate<uint>(keyPool);
        using var dValuePool = device.Allocate<uint>(valuePool);
        using var copies = new DevicePageCopies(device, Math.Max(1, pairs.Length / 2));
        copies.Update(pairs, pool);

        new PagedKvKernels(device).CopyPages(pool, copies, dKeyPool.Span, dValuePool.Span);
        PagedKvCache.CopyPages<uint>(pool, pairs, keyPool, valuePool);
        PagingCases.AssertSameBytes<uint>(keyPool, dKeyPool.ToArray(), "key pool");
        PagingCases.AssertSameBytes<uint>(valuePool, dValuePool.ToArray(), "value pool");
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void StreamOrderedCalls_CompleteBeforeASynchronousCopy(string backend)
    {
        var device = backends.Get(backend);
        var pool = new PagedKvLayout(64, 16, 8, 128);
        var random = new Random(4);
        var keys = TestData.Random<ushort>(random, 512L * pool.TokenElements);
        var slots = TestData.Permutation(random, (int)pool.Slots)[..512];
        using var stream = device.CreateStream();
        using var dKeys = device.Allocate<ushort>(keys);
        using var dPool = device.Allocate<ushort>(pool.PoolElements);
        dPool.Span.FillBytes(0);
        using var dSlots = new DeviceSlotMapping(device, 512);
        dSlots.Update(slots, pool, stream);
        new PagedKvKernels(device).Append(new PagedAppendSpec(pool, 512), dKeys.Span, default, dSlots, dPool.Span, default, stream);
        stream.Synchronize();
        var expected = new ushort[pool.PoolElements];
        PagedKvCache.Append<ushort>(new PagedAppendSpec(pool, 512), keys, [], slots, expected, []);
        PagingCases.AssertSameBytes<ushort>(expected, dPool.ToArray(), "pool");
    }
}
