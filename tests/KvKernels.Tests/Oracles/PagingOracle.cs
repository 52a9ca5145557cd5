namespace KvKernels.Tests.Oracles;

/// <summary>
/// Scalar oracles of the paged-cache ops, written for clarity: every element's position is computed from the
/// layout's definition, one element at a time. Elements are compared as raw values (byte-exact), so the oracle is
/// generic over the element type. Shared with KvCheck (linked source), so keep it dependency-free.
/// </summary>
public static class PagingOracle
{
    /// <summary>Index of element (page, offset-in-page, head, d) in a pool of the given layout.</summary>
    public static long PoolIndex(bool hnd, int pageSize, int heads, int headDim, long page, int offset, int head, int d) =>
        hnd ? ((page * heads + head) * pageSize + offset) * headDim + d
            : ((page * pageSize + offset) * heads + head) * headDim + d;

    /// <summary>Append: token t's element (h, d) goes to slot slots[t]; −1 skips.</summary>
    public static void Append<T>(bool hnd, int pageSize, int heads, int headDim, T[] keys, T[]? values, long keyStride, long valueStride,
        int[] slots, T[] keyPool, T[]? valuePool)
    {
        for (int t = 0; t < slots.Length; t++)
        {
            if (slots[t] < 0) continue;
            long page = slots[t] / pageSize;
            int offset = slots[t] % pageSize;
            for (int h = 0; h < heads; h++)
                for (int d = 0; d < headDim; d++)
                {
                    long target = PoolIndex(hnd, pageSize, heads, headDim, page, offset, h, d);
                    keyPool[target] = keys[t * keyStride + h * headDim + d];
                    if (values is not null && valuePool is not null) valuePool[target] = values[t * valueStride + h * headDim + d];
                }
        }
    }

    /// <summary>Gather into [B, maxTokens, heads, headDim]; padding rows zero when zeroFill (default(T)), else untouched.</summary>
    public static void Gather<T>(bool hnd, int pageSize, int heads, int headDim, int maxPages, int maxTokens, bool zeroFill,
        T[] pool, int[] blockTable, int[] lengths, T[] output)
    {
        for (int b = 0; b < lengths.Length; b++)
            for (int n = 0; n < maxTokens; n++)
                for (int h = 0; h < heads; h++)
                    for (int d = 0; d < headDim; d++)
                    {
                        long target = (((long)b * maxTokens + n) * heads + h) * headDim + d;
                        if (n < lengths[b])
                        {
                            long page = blockTable[b * maxPages + n / pageSize];
                            output[target] = pool[PoolIndex(hnd, pageSize, heads, headDim, page, n % pageSize, h, d)];
                        }
                        else if (zeroFill)
                        {
                            output[target] = default!;
                        }
                    }
    }

    /// <summary>Scatter from [B, maxTokens, heads, headDim]: only tokens below each length are written.</summary>
    public static void Scatter<T>(bool hnd, int pageSize, int heads, int headDim, int maxPages, int maxTokens,
        T[] input, int[] blockTable, int[] lengths, T[] pool)
    {
        for (int b = 0; b < lengths.Length; b++)
            for (int n = 0; n < lengths[b]; n++)
                for (int h = 0; h < heads; h++)
                    for (int d = 0; d < headDim; d++)
                    {
                        long page = blockTable[b * maxPages + n / pageSize];
                        pool[PoolIndex(hnd, pageSize, heads, headDim, page, n % pageSize, h, d)] =
                            input[(((long)b * maxTokens + n) * heads + h) * headDim + d];
                    }
    }

    /// <summary>Page copy: each destination page becomes its source page (pairs are [n, 2]).</summary>
    public static void CopyPages<T>(int pageElements, int[] pairs, T[] pool)
    {
        for (int i = 0; i < pairs.Length; i += 2)
            for (int e = 0; e < pageElements; e++)
                pool[(long)pairs[i + 1] * pageElements + e] = pool[(long)pairs[i] * pageElements + e];
    }
}
