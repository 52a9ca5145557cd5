using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Paging;

/// <summary>The README's quick start, as written (only the device is chosen per backend), so the documented API stays true.</summary>
public sealed class ReadmeQuickStartTests(Backends backends)
{
    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void QuickStart_RunsAsWritten_AndGpuMatchesCpu(string backend)
    {
        var device = backends.Get(backend);
        var random = new Random(11);
        Half[] newKeys = Enumerable.Range(0, 2 * 8 * 128).Select(_ => (Half)(random.NextSingle() - 0.5f)).ToArray();
        Half[] newValues = Enumerable.Range(0, 2 * 8 * 128).Select(_ => (Half)(random.NextSingle() - 0.5f)).ToArray();
        int[] sequenceLengths = [39, 7];
        int[] blockTable = new int[sequenceLengths.Length * 512];
        Array.Fill(blockTable, -1);
        blockTable[0] = 0; blockTable[1] = 1; blockTable[2] = 2; // sequence 0: slots 0..38 (37 and 38 just appended)
        blockTable[512] = 9;                                      // sequence 1: page 9
        Half[] query = Enumerable.Range(0, sequenceLengths.Length * 32 * 128).Select(_ => (Half)(random.NextSingle() - 0.5f)).ToArray();
        Half[] output = new Half[sequenceLengths.Length * 32 * 128];

        // --- README ---
        var pool = new PagedKvLayout(NumPages: 4096, PageSize: 16, NumKvHeads: 8, HeadDim: 128, KvLayout.Nhd);

        Half[] keyPool = new Half[pool.PoolElements], valuePool = new Half[pool.PoolElements];
        PagedKvCache.Append<Half>(new PagedAppendSpec(pool, NumTokens: 2), newKeys, newValues, slots: [37, 38],
            keyPool, valuePool);

        using var kPool = device.Allocate<Half>(pool.PoolElements);
        using var vPool = device.Allocate<Half>(pool.PoolElements);
        kPool.Span.FillBytes(0);
        vPool.Span.FillBytes(0);
        using var k = device.Allocate<Half>(newKeys);
        using var v = device.Allocate<Half>(newValues);
        using var slotMapping = new DeviceSlotMapping(device, capacity: 256);
        slotMapping.Update([37, 38], pool);
        var paging = new PagedKvKernels(device);
        paging.Append(new PagedAppendSpec(pool, 2), k.Span, v.Span, slotMapping, kPool.Span, vPool.Span, device.DefaultStream);

        using var table = new DeviceBlockTable(device, maxBatchSize: 64, maxPagesPerSequence: 512);
        table.Update(blockTable, sequenceLengths, pool);
        var batch = new PagedBatchSpec(pool, BatchSize: sequenceLengths.Length, MaxPagesPerSequence: 512, MaxTokens: 8192);
        using var kOut = device.Allocate<Half>(batch.ContiguousElements);
        using var vOut = device.Allocate<Half>(batch.ContiguousElements);
        paging.Gather(batch, kPool.Span, vPool.Span, table, kOut.Span, vOut.Span);

        var attention = new DecodeAttentionSpec(BatchSize: sequenceLengths.Length, QueryLength: 1, NumQueryHeads: 32,
            NumKvHeads: 8, HeadDim: 128, KvCacheShape.Paged(pool.NumPages, pool.PageSize, maxPagesPerSequence: 512));
        using var q = device.Allocate<Half>(query);
        using var o = device.Allocate<Half>(attention.OutputElements);
        using var workspace = new DecodeAttentionWorkspace(device, maxQueryRows: 64 * 32, maxOutputDim: 128, maxSplits: 64);
        new DecodeAttentionKernels(device).Run(attention, q.Span, kPool.Span, vPool.Span, table, o.Span, workspace: workspace);
        DecodeAttentionCpu.Run<Half, Half>(attention, query, keyPool, valuePool, sequenceLengths, blockTable, output);
        // --- end of README ---
        var spec = batch;

        device.DefaultStream.Synchronize();
        var expectedKeys = new Half[spec.ContiguousElements];
        var expectedValues = new Half[spec.ContiguousElements];
        PagedKvCache.Gather<Half>(spec, keyPool, valuePool, blockTable, sequenceLengths, expectedKeys, expectedValues);
        PagingCases.AssertSameBytes<Half>(expectedKeys, kOut.ToArray(), "gathered keys");
        PagingCases.AssertSameBytes<Half>(expectedValues, vOut.ToArray(), "gathered values");
        // The appended token 37 is row 37 of sequence 0.
        Assert.Equal(newKeys.AsSpan(0, 1024).ToArray(), expectedKeys.AsSpan(37 * 1024, 1024).ToArray());

        // The attention output: the GPU agrees with the CPU twin, and the CPU twin with the oracle.
        var expected = new double[attention.OutputElements];
        AttentionOracle.Decode(attention, AttentionElements.ToDoubles<Half>(query), AttentionElements.ToDoubles<Half>(keyPool),
            AttentionElements.ToDoubles<Half>(valuePool), sequenceLengths, blockTable, null, null, expected, new double[attention.LseElements]);
        Assert.InRange(AttentionElements.RelativeError<Half>(output, expected), 0, 2e-3);
        Assert.InRange(AttentionElements.RelativeError<Half>(o.ToArray(), AttentionElements.ToDoubles<Half>(output)), 0, 2e-3);
    }
}
