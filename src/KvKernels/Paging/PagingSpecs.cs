using System.Buffers;

namespace KvKernels.Paging;

/// <summary>
/// Append (vLLM <c>reshape_and_cache</c>): token <c>t</c>'s K and V rows <c>[Hkv, D]</c> are written to slot
/// <c>slots[t]</c> of the paged pools; slot −1 marks a padding token and is skipped.
/// </summary>
/// <param name="Pool">The pools' shape.</param>
/// <param name="NumTokens">Tokens to append (≥ 0).</param>
/// <param name="KeyTokenStride">Elements between consecutive tokens of the key source; 0 means packed
/// (<c>Hkv · D</c>). A larger stride reads K out of a fused QKV buffer without a copy.</param>
/// <param name="ValueTokenStride">The same for the value source.</param>
public readonly record struct PagedAppendSpec(PagedKvLayout Pool, int NumTokens, long KeyTokenStride = 0, long ValueTokenStride = 0)
{
    /// <summary>The key token stride in elements, with 0 resolved to packed.</summary>
    public long KeyStride => KeyTokenStride == 0 ? Pool.TokenElements : KeyTokenStride;

    /// <summary>The value token stride in elements, with 0 resolved to packed.</summary>
    public long ValueStride => ValueTokenStride == 0 ? Pool.TokenElements : ValueTokenStride;

    /// <summary>Elements a source of <paramref name="stride"/> must hold.</summary>
    private long SourceElements(long stride) => NumTokens == 0 ? 0 : (NumTokens - 1) * stride + Pool.TokenElements;

    /// <summary>Checks the spec and every buffer length. An empty value pool with an empty value source means keys only.</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void Validate<T>(long keys, long values, int slots, long keyPool, long valuePool) where T : unmanaged
    {
        Pool.Validate<T>("spec");
        if (NumTokens < 0) throw new ArgumentException($"NumTokens is {NumTokens}; expected ≥ 0.", "spec");
        if (KeyTokenStride != 0 && KeyTokenStride < Pool.TokenElements)
            throw new ArgumentException($"KeyTokenStride is {KeyTokenStride}; expected 0 or ≥ Hkv·D = {Pool.TokenElements}.", "spec");
        if (ValueTokenStride != 0 && ValueTokenStride < Pool.TokenElements)
            throw new ArgumentException($"ValueTokenStride is {ValueTokenStride}; expected 0 or ≥ Hkv·D = {Pool.TokenElements}.", "spec");
        PagingChecks.Length(keyPool, Pool.PoolElements, "keyPool");
        PagingChecks.AtLeast(keys, SourceElements(KeyStride), "keys");
        PagingChecks.KeysOnlyOrBoth(values, valuePool, Pool.PoolElements, SourceElements(ValueStride));
        if (slots != NumTokens) throw new ArgumentException($"slots has {slots} entries; expected NumTokens = {NumTokens}.", nameof(slots));
    }

    /// <summary>
    /// Checks slot values: each −1 or in [0, pool slots), and no slot written twice (the GPU writes tokens in
    /// parallel, so a duplicate would make the result depend on timing).
    /// </summary>
    public void ValidateSlots(ReadOnlySpan<int> slots)
    {
        long poolSlots = Pool.Slots;
        int used = 0;
        int[] sorted = ArrayPool<int>.Shared.Rent(Math.Max(slots.Length, 1));
        try
        {
            for (int t = 0; t < slots.Length; t++)
            {
                int slot = slots[t];
                if (slot == -1) continue;
                if (slot < -1 || slot >= poolSlots)
                    throw new ArgumentException($"slots[{t}] is {slot}; expected −1 (skip) or a slot in [0, {poolSlots}).", nameof(slots));
                sorted[used++] = slot;
            }
            var span = sorted.AsSpan(0, used);
            span.Sort();
            for (int i = 1; i < span.Length; i++)
                if (span[i] == span[i - 1])
                    throw new ArgumentException($"Slot {span[i]} appears more than once; each token needs its own slot.", nameof(slots));
        }
        finally
        {
            ArrayPool<int>.Shared.Return(sorted);
        }
    }
}

/// <summary>
/// Gather and scatter between paged pools and contiguous <c>[B, MaxTokens, Hkv, D]</c> buffers, for a batch of
/// sequences described by a block table <c>[B, MaxPagesPerSequence]</c> (int32 page indices) and lengths <c>[B]</c>.
/// Token <c>n</c> of sequence <c>b</c> lives in page <c>blockTable[b, n / PageSize]</c> at offset <c>n % PageSize</c>.
/// </summary>
/// <param name="Pool">The pools' shape.</param>
/// <param name="BatchSize">Sequences (≥ 0).</param>
/// <param name="MaxPagesPerSequence">Columns of the block table (≥ 1).</param>
/// <param name="MaxTokens">Token capacity per sequence of the contiguous buffer (N_max).</param>
/// <param name="ZeroFillPadding">Gather only: write zeros to the contiguous rows past each sequence's length
/// (true, the default), or leave them untouched.</param>
public readonly record struct PagedBatchSpec(PagedKvLayout Pool, int BatchSize, int MaxPagesPerSequence, int MaxTokens, bool ZeroFillPadding = true)
{
    /// <summary>Elements of one contiguous buffer: <c>B · MaxTokens · Hkv · D</c>.</summary>
    public long ContiguousElements => (long)BatchSize * MaxTokens * Pool.TokenElements;

    /// <summary>Checks the spec and every buffer length. Empty value pool and value buffer mean keys only.</summary>
    /// <param name="keyPool">Length of the key pool.</param>
    /// <param name="valuePool">Length of the value pool (0: keys only).</param>
    /// <param name="blockTable">Length of the block table.</param>
    /// <param name="sequenceLengths">Length of the lengths array.</param>
    /// <param name="keys">Length of the contiguous key buffer.</param>
    /// <param name="values">Length of the contiguous value buffer (0: keys only).</param>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void Validate<T>(long keyPool, long valuePool, int blockTable, int sequenceLengths, long keys, long values) where T : unmanaged
    {
        Pool.Validate<T>("spec");
        if (BatchSize < 0) throw new ArgumentException($"BatchSize is {BatchSize}; expected ≥ 0.", "spec");
        if (MaxPagesPerSequence < 1) throw new ArgumentException($"MaxPagesPerSequence is {MaxPagesPerSequence}; expected ≥ 1.", "spec");
        if (MaxTokens < 0) throw new ArgumentException($"MaxTokens is {MaxTokens}; expected ≥ 0.", "spec");
        PagingChecks.Length(keyPool, Pool.PoolElements, nameof(keyPool));
        if (blockTable != (long)BatchSize * MaxPagesPerSequence)
            throw new ArgumentException($"blockTable has {blockTable} entries; expected BatchSize · MaxPagesPerSequence = {(long)BatchSize * MaxPagesPerSequence}.", nameof(blockTable));
        if (sequenceLengths != BatchSize)
            throw new ArgumentException($"sequenceLengths has {sequenceLengths} entries; expected BatchSize = {BatchSize}.", nameof(sequenceLengths));
        PagingChecks.AtLeast(keys, ContiguousElements, nameof(keys));
        PagingChecks.KeysOnlyOrBoth(values, valuePool, Pool.PoolElements, ContiguousElements);
    }

    /// <summary>
    /// Checks the batch's metadata: every length in [0, min(MaxTokens, MaxPagesPerSequence · PageSize)] and every
    /// page a sequence uses in [0, NumPages). Entries past a sequence's last page are not read and may hold anything
    /// (−1 padding is usual). With <paramref name="pagesWritten"/> (scatter), no page may be used twice in the batch,
    /// since the GPU writes sequences in parallel. Returns the longest sequence.
    /// </summary>
    /// <exception cref="ArgumentException">Names the offending parameter and entry.</exception>
    public int ValidateBatch(ReadOnlySpan<int> blockTable, ReadOnlySpan<int> sequenceLengths, bool pagesWritten) =>
        ValidateBatch(blockTable, sequenceLengths, pagesWritten ? PageUse.Write : PageUse.Read, out _);

    internal enum PageUse { Read, Track, Write }

    internal int ValidateBatch(ReadOnlySpan<int> blockTable, ReadOnlySpan<int> sequenceLengths, PageUse use, out bool pagesDistinct)
    {
        int maxSequence = (int)Math.Min(MaxTokens, (long)MaxPagesPerSequence * Pool.PageSize);
        int longest = 0;
        pagesDistinct = true;
        bool[]? seen = use != PageUse.Read ? ArrayPool<bool>.Shared.Rent(Pool.NumPages) : null;
        try
        {
            seen?.AsSpan(0, Pool.NumPages).Clear();
            for (int b = 0; b < sequenceLengths.Length; b++)
            {
                int length = sequenceLengths[b];
                if (length < 0 || length > maxSequence)
                {
                    string limit = MaxTokens < (long)MaxPagesPerSequence * Pool.PageSize
                        ? $"MaxTokens = {MaxTokens} (the contiguous buffer)"
                        : $"MaxPagesPerSequence · PageSize = {(long)MaxPagesPerSequence * Pool.PageSize} (the sequence's pages)";
                    throw new ArgumentException($"sequenceLengths[{b}] is {length}; expected 0..{limit}.", nameof(sequenceLengths));
                }
                longest = Math.Max(longest, length);
                int pages = (length + Pool.PageSize - 1) / Pool.PageSize;
                for (int p = 0; p < pages; p++)
                {
                    int page = blockTable[b * MaxPagesPerSequence + p];
                    if ((uint)page >= (uint)Pool.NumPages)
                        throw new ArgumentException($"blockTable[{b}, {p}] is {page}; expected a page in [0, {Pool.NumPages}).", nameof(blockTable));
                    if (seen is null) continue;
                    if (seen[page])
                    {
                        if (use == PageUse.Write)
                            throw new ArgumentException($"Page {page} is used twice in the batch (blockTable[{b}, {p}]); scatter writes each page once.", nameof(blockTable));
                        pagesDistinct = false;
                    }
                    seen[page] = true;
                }
            }
        }
        finally
        {
            if (seen is not null) ArrayPool<bool>.Shared.Return(seen);
        }
        return longest;
    }
}

/// <summary>
/// Page copy for prefix sharing and copy-on-write: <c>pairs</c> is <c>[n, 2]</c> int32 (source page, destination
/// page); each destination page becomes a copy of its source, in the K pool and (when given) the V pool.
/// </summary>
public static class PageCopyValidation
{
    /// <summary>Checks the pool lengths and the pairs: indices in range, destinations distinct, no destination also a
    /// source (the GPU copies all pairs at once, so either would make the result depend on timing).</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public static void Validate<T>(in PagedKvLayout pool, long keyPool, long valuePool, ReadOnlySpan<int> pairs) where T : unmanaged
    {
        pool.Validate<T>(nameof(pool));
        PagingChecks.Length(keyPool, pool.PoolElements, nameof(keyPool));
        if (valuePool != 0) PagingChecks.Length(valuePool, pool.PoolElements, nameof(valuePool));
        if (pairs.Length % 2 != 0)
            throw new ArgumentException($"pairs has {pairs.Length} entries; expected an even count ([n, 2] source, destination).", nameof(pairs));
        byte[] role = ArrayPool<byte>.Shared.Rent(pool.NumPages); // bit 0: source, bit 1: destination
        try
        {
            role.AsSpan(0, pool.NumPages).Clear();
            for (int i = 0; i < pairs.Length; i += 2)
            {
                int source = pairs[i], destination = pairs[i + 1];
                if ((uint)source >= (uint)pool.NumPages)
                    throw new ArgumentException($"pairs[{i / 2}].source is {source}; expected a page in [0, {pool.NumPages}).", nameof(pairs));
                if ((uint)destination >= (uint)pool.NumPages)
                    throw new ArgumentException($"pairs[{i / 2}].destination is {destination}; expected a page in [0, {pool.NumPages}).", nameof(pairs));
                if ((role[destination] & 2) != 0)
                    throw new ArgumentException($"Destination page {destination} appears twice (pair {i / 2}); expected distinct destinations.", nameof(pairs));
                role[source] |= 1;
                role[destination] |= 2;
            }
            for (int i = 0; i < pairs.Length; i += 2)
                if ((role[pairs[i + 1]] & 1) != 0)
                    throw new ArgumentException($"Page {pairs[i + 1]} is both a destination and a source; expected disjoint sets.", nameof(pairs));
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(role);
        }
    }
}

internal static class PagingChecks
{
    public static void Length(long actual, long expected, string paramName)
    {
        if (actual != expected) throw new ArgumentException($"{paramName} has {actual} elements; expected {expected}.", paramName);
    }

    public static void AtLeast(long actual, long expected, string paramName)
    {
        if (actual < expected) throw new ArgumentException($"{paramName} has {actual} elements; expected at least {expected}.", paramName);
    }

    /// <summary>Values are optional as a pair: both buffers empty (keys only) or both present and large enough.</summary>
    public static void KeysOnlyOrBoth(long values, long valuePool, long poolElements, long valueElements)
    {
        if (valuePool == 0 && values == 0) return;
        if (valuePool == 0) throw new ArgumentException("valuePool is empty but values were given; pass both or neither.", nameof(valuePool));
        Length(valuePool, poolElements, nameof(valuePool));
        if (values == 0 && valueElements > 0) throw new ArgumentException("values is empty but a valuePool was given; pass both or neither.", nameof(values));
        AtLeast(values, valueElements, nameof(values));
    }
}
