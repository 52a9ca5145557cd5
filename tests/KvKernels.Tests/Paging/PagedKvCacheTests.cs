using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Paging;

/// <summary>The CPU implementation against the scalar oracle, byte for byte.</summary>
public sealed class PagedKvCacheTests
{
    [Theory]
    [MemberData(nameof(PagingCases.PoolIndices), MemberType = typeof(PagingCases))]
    public void Append_MatchesOracle(int poolIndex)
    {
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(100 + poolIndex);
        foreach (var (stridePadding, withValues) in new[] { (0, true), (24, true), (0, false) })
        {
            int tokens = (int)Math.Min(pool.Slots, 37);
            long stride = pool.TokenElements + stridePadding;
            var spec = new PagedAppendSpec(pool, tokens, stridePadding == 0 ? 0 : stride, stridePadding == 0 ? 0 : stride);
            var keys = TestData.Random<ushort>(random, tokens * stride);
            var values = withValues ? TestData.Random<ushort>(random, tokens * stride) : [];
            var slots = PagingCases.Slots(random, pool, tokens);
            var keyPool = TestData.Random<ushort>(random, pool.PoolElements);
            var valuePool = withValues ? TestData.Random<ushort>(random, pool.PoolElements) : [];
            var expectedKeys = (ushort[])keyPool.Clone();
            var expectedValues = (ushort[])valuePool.Clone();

            PagedKvCache.Append<ushort>(spec, keys, values, slots, keyPool, valuePool);
            PagingOracle.Append(pool.Layout == KvLayout.Hnd, pool.PageSize, pool.NumKvHeads, pool.HeadDim, keys, withValues ? values : null,
                stride, stride, slots, expectedKeys, withValues ? expectedValues : null);

            PagingCases.AssertSameBytes<ushort>(expectedKeys, keyPool, "key pool");
            PagingCases.AssertSameBytes<ushort>(expectedValues, valuePool, "value pool");
        }
    }

    [Theory]
    [MemberData(nameof(PagingCases.PoolIndices), MemberType = typeof(PagingCases))]
    public void Gather_MatchesOracle(int poolIndex)
    {
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(200 + poolIndex);
        var (table, lengths, maxPages) = PagingCases.Batch(random, pool);
        int maxTokens = lengths.Max() + 3;
        foreach (bool zeroFill in new[] { true, false })
        {
            var spec = new PagedBatchSpec(pool, lengths.Length, maxPages, maxTokens, zeroFill);
            var keyPool = TestData.Random<byte>(random, pool.PoolElements);
            var valuePool = TestData.Random<byte>(random, pool.PoolElements);
            var keys = TestData.Random<byte>(random, spec.ContiguousElements);
            var values = TestData.Random<byte>(random, spec.ContiguousElements);
            var expectedKeys = (byte[])keys.Clone();
            var expectedValues = (byte[])values.Clone();

            PagedKvCache.Gather<byte>(spec, keyPool, valuePool, table, lengths, keys, values);
            bool hnd = pool.Layout == KvLayout.Hnd;
            PagingOracle.Gather(hnd, pool.PageSize, pool.NumKvHeads, pool.HeadDim, maxPages, maxTokens, zeroFill, keyPool, table, lengths, expectedKeys);
            PagingOracle.Gather(hnd, pool.PageSize, pool.NumKvHeads, pool.HeadDim, maxPages, maxTokens, zeroFill, valuePool, table, lengths, expectedValues);

            PagingCases.AssertSameBytes<byte>(expectedKeys, keys, $"keys (zeroFill={zeroFill})");
            PagingCases.AssertSameBytes<byte>(expectedValues, values, $"values (zeroFill={zeroFill})");
        }
    }

    [Theory]
    [MemberData(nameof(PagingCases.PoolIndices), MemberType = typeof(PagingCases))]
    public void Scatter_MatchesOracle_AndGatherInvertsIt(int poolIndex)
    {
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(300 + poolIndex);
        var (table, lengths, maxPages) = PagingCases.Batch(random, pool);
        int maxTokens = lengths.Max() + 1;
        var spec = new PagedBatchSpec(pool, lengths.Length, maxPages, maxTokens);
        var keys = TestData.Random<uint>(random, spec.ContiguousElements);
        var keyPool = TestData.Random<uint>(random, pool.PoolElements);
        var expectedPool = (uint[])keyPool.Clone();

        PagedKvCache.Scatter<uint>(spec, keys, [], table, lengths, keyPool, []);
        PagingOracle.Scatter(pool.Layout == KvLayout.Hnd, pool.PageSize, pool.NumKvHeads, pool.HeadDim, maxPages, maxTokens, keys, table, lengths, expectedPool);
        PagingCases.AssertSameBytes<uint>(expectedPool, keyPool, "key pool");

        var back = new uint[spec.ContiguousElements];
        PagedKvCache.Gather<uint>(spec, keyPool, [], table, lengths, back, []);
        for (int b = 0; b < lengths.Length; b++)
        {
            long start = (long)b * maxTokens * pool.TokenElements;
            long valid = (long)lengths[b] * pool.TokenElements;
            Assert.Equal(keys.AsSpan((int)start, (int)valid).ToArray(), back.AsSpan((int)start, (int)valid).ToArray());
        }
    }

    [Theory]
    [MemberData(nameof(PagingCases.PoolIndices), MemberType = typeof(PagingCases))]
    public void CopyPages_MatchesOracle(int poolIndex)
    {
        var pool = PagingCases.Pools[poolIndex];
        var random = new Random(400 + poolIndex);
        var pairs = PagingCases.PagePairs(random, pool);
        var keyPool = TestData.Random<Half>(random, pool.PoolElements);
        var valuePool = TestData.Random<Half>(random, pool.PoolElements);
        var expectedKeys = (Half[])keyPool.Clone();
        var expectedValues = (Half[])valuePool.Clone();

        PagedKvCache.CopyPages<Half>(pool, pairs, keyPool, valuePool);
        PagingOracle.CopyPages((int)pool.PageElements, pairs, expectedKeys);
        PagingOracle.CopyPages((int)pool.PageElements, pairs, expectedValues);

        PagingCases.AssertSameBytes<Half>(expectedKeys, keyPool, "key pool");
        PagingCases.AssertSameBytes<Half>(expectedValues, valuePool, "value pool");
    }

    [Fact]
    public void Gather_LargeBatch_RunsInParallelAndMatchesOracle()
    {
        // Large enough (> 8 MiB moved) to take the parallel path.
        var pool = new PagedKvLayout(NumPages: 200, PageSize: 16, NumKvHeads: 8, HeadDim: 128);
        var random = new Random(7);
        int batch = 6, maxPages = 32, maxTokens = 512;
        var pages = TestData.Permutation(random, pool.NumPages);
        var table = pages.Take(batch * maxPages).ToArray();
        int[] lengths = [512, 511, 1, 0, 257, 400];
        var spec = new PagedBatchSpec(pool, batch, maxPages, maxTokens);
        var keyPool = TestData.Random<ushort>(random, pool.PoolElements);
        var valuePool = TestData.Random<ushort>(random, pool.PoolElements);
        var keys = new ushort[spec.ContiguousElements];
        var values = new ushort[spec.ContiguousElements];
        var expectedKeys = new ushort[spec.ContiguousElements];
        PagedKvCache.Gather<ushort>(spec, keyPool, valuePool, table, lengths, keys, values);
        PagingOracle.Gather(false, pool.PageSize, pool.NumKvHeads, pool.HeadDim, maxPages, maxTokens, true, keyPool, table, lengths, expectedKeys);
        PagingCases.AssertSameBytes<ushort>(expectedKeys, keys, "keys");
    }

    [Fact]
    public void AppendAndCopyPages_Large_RunInParallelAndMatchOracle()
    {
        // Over 8 MiB moved per call: the parallel path.
        var pool = new PagedKvLayout(NumPages: 700, PageSize: 16, NumKvHeads: 8, HeadDim: 128, KvLayout.Hnd);
        var random = new Random(8);
        int tokens = 5000;
        var spec = new PagedAppendSpec(pool, tokens);
        var keys = TestData.Random<ushort>(random, tokens * (long)pool.TokenElements);
        var values = TestData.Random<ushort>(random, tokens * (long)pool.TokenElements);
        var slots = PagingCases.Slots(random, pool, tokens);
        var keyPool = TestData.Random<ushort>(random, pool.PoolElements);
        var valuePool = TestData.Random<ushort>(random, pool.PoolElements);
        var expectedKeys = (ushort[])keyPool.Clone();
        var expectedValues = (ushort[])valuePool.Clone();
        PagedKvCache.Append<ushort>(spec, keys, values, slots, keyPool, valuePool);
        PagingOracle.Append(true, pool.PageSize, pool.NumKvHeads, pool.HeadDim, keys, values, pool.TokenElements, pool.TokenElements,
            slots, expectedKeys, expectedValues);
        PagingCases.AssertSameBytes<ushort>(expectedKeys, keyPool, "appended key pool");
        PagingCases.AssertSameBytes<ushort>(expectedValues, valuePool, "appended value pool");

        var pairs = PagingCases.PagePairs(random, pool);
        PagedKvCache.CopyPages<ushort>(pool, pairs, keyPool, valuePool);
        PagingOracle.CopyPages((int)pool.PageElements, pairs, expectedKeys);
        PagingOracle.CopyPages((int)pool.PageElements, pairs, expectedValues);
        PagingCases.AssertSameBytes<ushort>(expectedKeys, keyPool, "copied key pool");
        PagingCases.AssertSameBytes<ushort>(expectedValues, valuePool, "copied value pool");
    }
}
