using System.Runtime.CompilerServices;

namespace KvKernels.Paging;

/// <summary>
/// CPU implementations of the paged-KV-cache ops: the same functions as the GPU kernels in <c>cuda/paging</c>,
/// validated by the same specs, on host spans. Rows are copied with vectorized memory moves; large calls run in
/// parallel over tokens or sequences. Small calls allocate nothing.
/// </summary>
public static unsafe class PagedKvCache
{
    /// <summary>Below this many bytes moved a call stays on the calling thread.</summary>
    private const long ParallelThresholdBytes = 8L << 20;

    /// <summary>Writes each token's K and V rows into its slot (vLLM <c>reshape_and_cache</c>); slot −1 is skipped.</summary>
    /// <param name="spec">Pool shape, token count and source strides.</param>
    /// <param name="keys">Source keys <c>[NumTokens, KeyStride]</c> (the first Hkv·D elements of each token are read).</param>
    /// <param name="values">Source values, or empty for a keys-only cache.</param>
    /// <param name="slots">Destination slot per token, −1 to skip.</param>
    /// <param name="keyPool">The key pool, written.</param>
    /// <param name="valuePool">The value pool, written; empty when <paramref name="values"/> is.</param>
    /// <exception cref="ArgumentException">A shape, length or slot is invalid; nothing is written.</exception>
    public static void Append<T>(in PagedAppendSpec spec, ReadOnlySpan<T> keys, ReadOnlySpan<T> values, ReadOnlySpan<int> slots,
        Span<T> keyPool, Span<T> valuePool) where T : unmanaged
    {
        spec.Validate<T>(keys.Length, values.Length, slots.Length, keyPool.Length, valuePool.Length);
        spec.ValidateSlots(slots);
        // Sequential on purpose: appends scatter short rows to random pages, and on the machines measured two threads
        // contending for those misses were slower than one (KvCheck bench, CPU rows).
        var pool = spec.Pool;
        bool withValues = !valuePool.IsEmpty;
        for (int t = 0; t < spec.NumTokens; t++)
        {
            int slot = slots[t];
            if (slot < 0) continue;
            for (int h = 0; h < pool.NumKvHeads; h++)
            {
                long destination = pool.RowOffset(slot, h);
                keys.Slice((int)(t * spec.KeyStride + (long)h * pool.HeadDim), pool.HeadDim)
                    .CopyTo(keyPool.Slice((int)destination, pool.HeadDim));
                if (withValues)
                    values.Slice((int)(t * spec.ValueStride + (long)h * pool.HeadDim), pool.HeadDim)
                        .CopyTo(valuePool.Slice((int)destination, pool.HeadDim));
            }
        }
    }

    /// <summary>
    /// Copies each sequence's tokens from the pools into contiguous <c>[B, MaxTokens, Hkv, D]</c> buffers; rows past a
    /// sequence's length are zeroed when <see cref="PagedBatchSpec.ZeroFillPadding"/> is set.
    /// </summary>
    /// <exception cref="ArgumentException">A shape, length, sequence length or page index is invalid; nothing is written.</exception>
    public static void Gather<T>(in PagedBatchSpec spec, ReadOnlySpan<T> keyPool, ReadOnlySpan<T> valuePool,
        ReadOnlySpan<int> blockTable, ReadOnlySpan<int> sequenceLengths, Span<T> keys, Span<T> values) where T : unmanaged
    {
        spec.Validate<T>(keyPool.Length, valuePool.Length, blockTable.Length, sequenceLengths.Length, keys.Length, values.Length);
        spec.ValidateBatch(blockTable, sequenceLengths, pagesWritten: false);
        fixed (T* kp = keyPool, vp = valuePool, k = keys, v = values)
        fixed (int* table = blockTable, lengths = sequenceLengths)
        {
            var job = new BatchJob<T>(spec, kp, vp, table, lengths, k, v, scatter: false);
            Run(ref job, spec.BatchSize, spec.ContiguousElements * Unsafe.SizeOf<T>() * (valuePool.IsEmpty ? 1 : 2));
        }
    }

    /// <summary>
    /// Copies each sequence's first <c>sequenceLengths[b]</c> tokens from contiguous <c>[B, MaxTokens, Hkv, D]</c> buffers
    /// into the pools (the reverse of <see cref="Gather{T}"/>); pool rows of other tokens are untouched.
    /// </summary>
    /// <exception cref="ArgumentException">A shape, length, sequence length or page index is invalid, or a page is
    /// used twice; nothing is written.</exception>
    public static void Scatter<T>(in PagedBatchSpec spec, ReadOnlySpan<T> keys, ReadOnlySpan<T> values,
        ReadOnlySpan<int> blockTable, ReadOnlySpan<int> sequenceLengths, Span<T> keyPool, Span<T> valuePool) where T : unmanaged
    {
        spec.Validate<T>(keyPool.Length, valuePool.Length, blockTable.Length, sequenceLengths.Length, keys.Length, values.Length);
        spec.ValidateBatch(blockTable, sequenceLengths, pagesWritten: true);
        fixed (T* kp = keyPool, vp = valuePool, k = keys, v = values)
        fixed (int* table = blockTable, lengths = sequenceLengths)
        {
            var job = new BatchJob<T>(spec, kp, vp, table, lengths, k, v, scatter: true);
            Run(ref job, spec.BatchSize, spec.ContiguousElements * Unsafe.SizeOf<T>() * (valuePool.IsEmpty ? 1 : 2));
        }
    }

    /// <summary>Copies whole pages: for each (source, destination) pair of <paramref name="pairs"/> (<c>[n, 2]</c>),
    /// the destination page of the key pool (and of the value pool, when not empty) becomes a copy of the source page.</summary>
    /// <exception cref="ArgumentException">A length or page index is invalid, a destination repeats, or a page is both
    /// source and destination; nothing is written.</exception>
    public static void CopyPages<T>(in PagedKvLayout pool, ReadOnlySpan<int> pairs, Span<T> keyPool, Span<T> valuePool) where T : unmanaged
    {
        PageCopyValidation.Validate<T>(pool, keyPool.Length, valuePool.Length, pairs);
        fixed (T* kp = keyPool, vp = valuePool)
        fixed (int* p = pairs)
        {
            var job = new CopyPagesJob<T>(pool.PageElements, p, kp, vp);
            Run(ref job, pairs.Length / 2, pairs.Length / 2 * pool.PageElements * Unsafe.SizeOf<T>() * (valuePool.IsEmpty ? 2 : 4));
        }
    }

    private interface IRangeJob
    {
        void Execute(int index);
    }

    private static void Run<TJob>(ref TJob job, int count, long bytes) where TJob : struct, IRangeJob
    {
        if (bytes < ParallelThresholdBytes || count < 2 || Environment.ProcessorCount == 1)
        {
            for (int i = 0; i < count; i++) job.Execute(i);
            return;
        }
        // A few contiguous ranges per core: items can be tiny (one token's rows), so never one task per item.
        var copy = job; // the job holds only pointers and values, so a copy shares the buffers
        int chunks = Math.Min(count, Environment.ProcessorCount * 4);
        Parallel.For(0, chunks, chunk =>
        {
            int start = (int)((long)count * chunk / chunks), end = (int)((long)count * (chunk + 1) / chunks);
            for (int i = start; i < end; i++) copy.Execute(i);
        });
    }

    /// <summary>Copy of one page pair (destinations are distinct and never sources, so pairs are independent).</summary>
    private readonly struct CopyPagesJob<T>(long pageElements, int* pairs, T* keyPool, T* valuePool) : IRangeJob where T : unmanaged
    {
        public void Execute(int i)
        {
            long bytes = pageElements * sizeof(T);
            long source = pairs[2 * i] * pageElements, destination = pairs[2 * i + 1] * pageElements;
            Buffer.MemoryCopy(keyPool + source, keyPool + destination, bytes, bytes);
            if (valuePool != null) Buffer.MemoryCopy(valuePool + source, valuePool + destination, bytes, bytes);
        }
    }

    /// <summary>Gather or scatter of one sequence; pointer-based so it can run on worker threads.</summary>
    private readonly struct BatchJob<T>(in PagedBatchSpec spec, T* keyPool, T* valuePool, int* blockTable, int* lengths,
        T* keys, T* values, bool scatter) : IRangeJob where T : unmanaged
    {
        private readonly PagedBatchSpec _spec = spec;

        public void Execute(int b)
        {
            var pool = _spec.Pool;
            int d = pool.HeadDim, tokenElements = pool.TokenElements;
            int length = lengths[b];
            long rowBytes = (long)d * sizeof(T);
            for (int n = 0; n < length; n++)
            {
                long slot = (long)blockTable[(long)b * _spec.MaxPagesPerSequence + n / pool.PageSize] * pool.PageSize + n % pool.PageSize;
                long contiguous = ((long)b * _spec.MaxTokens + n) * tokenElements;
                for (int h = 0; h < pool.NumKvHeads; h++)
                {
                    long row = pool.RowOffset(slot, h);
                    long flat = contiguous + (long)h * d;
                    if (scatter)
                    {
                        Buffer.MemoryCopy(keys + flat, keyPool + row, rowBytes, rowBytes);
                        if (valuePool != null) Buffer.MemoryCopy(values + flat, valuePool + row, rowBytes, rowBytes);
                    }
                    else
                    {
                        Buffer.MemoryCopy(keyPool + row, keys + flat, rowBytes, rowBytes);
                        if (valuePool != null) Buffer.MemoryCopy(valuePool + row, values + flat, rowBytes, rowBytes);
                    }
                }
            }
            if (!scatter && _spec.ZeroFillPadding && length < _spec.MaxTokens)
            {
                long start = ((long)b * _spec.MaxTokens + length) * tokenElements;
                long count = (long)(_spec.MaxTokens - length) * tokenElements;
                new Span<byte>(keys + start, checked((int)(count * sizeof(T)))).Clear();
                if (valuePool != null) new Span<byte>(values + start, checked((int)(count * sizeof(T)))).Clear();
            }
        }
    }
}
