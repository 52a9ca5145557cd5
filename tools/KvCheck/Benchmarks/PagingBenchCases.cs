using System.Runtime.InteropServices;
using KvCheck.Probes;
using KvCheck.Verification;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvCheck.Benchmarks;

/// <summary>
/// The paging benchmark rows. GPU: Llama-3-8B-like K and V (Hkv = 8, D = 128, fp16, page 16) in NHD and HND — gather and
/// scatter of B × N tokens (B = 8, N = 4096: 256 MiB moved; B = 32, N = 8192: 2 GiB moved), append of 256 decode tokens
/// and of a 4096-token prefill, and page copy of 1024 and 4096 page pairs. CPU: the same ops at sizes that fit a small
/// machine. The index patterns are documented on each case so that the peers (bench/peers/paging_torch.py) build the same.
/// </summary>
internal static class PagingBenchCases
{
    public static PagingGeometry Llama(KvLayout layout) => new(ElementKind.Fp16, layout, 16, 8, 128);

    public static IEnumerable<GpuBenchCase> Gpu()
    {
        var nhd = Llama(KvLayout.Nhd);
        var hnd = Llama(KvLayout.Hnd);
        yield return new GpuAppend(nhd, 256, decode: true, poolPages: 8192);
        yield return new GpuAppend(hnd, 256, decode: true, poolPages: 8192);
        yield return new GpuAppend(nhd, 4096, decode: false, poolPages: 8192);
        yield return new GpuAppend(hnd, 4096, decode: false, poolPages: 8192);
        yield return new GpuBatch(nhd, 8, 4096, scatter: false);
        yield return new GpuBatch(hnd, 8, 4096, scatter: false);
        yield return new GpuBatch(nhd, 32, 8192, scatter: false);
        yield return new GpuBatch(hnd, 32, 8192, scatter: false);
        yield return new GpuBatch(nhd, 8, 4096, scatter: true);
        yield return new GpuBatch(nhd, 32, 8192, scatter: true);
        yield return new GpuBatch(hnd, 32, 8192, scatter: true);
        yield return new GpuCopyPages(nhd, 1024, poolPages: 16384);
        yield return new GpuCopyPages(nhd, 4096, poolPages: 16384);
    }

    public static IEnumerable<CpuBenchCase> Cpu()
    {
        var nhd = Llama(KvLayout.Nhd);
        var hnd = Llama(KvLayout.Hnd);
        yield return new CpuAppend(nhd, 256, decode: true, poolPages: 1024);
        yield return new CpuAppend(nhd, 4096, decode: false, poolPages: 1024);
        yield return new CpuAppend(hnd, 4096, decode: false, poolPages: 1024);
        yield return new CpuBatch(nhd, 4, 4096, scatter: false);
        yield return new CpuBatch(hnd, 4, 4096, scatter: false);
        yield return new CpuBatch(nhd, 4, 4096, scatter: true);
        yield return new CpuCopyPages(nhd, 256, poolPages: 2048);
        yield return new CpuCopyPages(nhd, 1024, poolPages: 2048);
    }

    internal static long TokenBytes(PagingGeometry g) => (long)g.Heads * g.HeadDim * 2;

    internal static int Pools(PagingGeometry g) => g.KeysOnly ? 1 : 2;

    /// <summary>
    /// Append slots. decode: <paramref name="tokens"/> distinct random pages, each token at a random offset of its page
    /// (one new token per sequence). prefill: ⌈tokens / page⌉ distinct random pages filled in order.
    /// </summary>
    internal static int[] AppendSlots(int tokens, bool decode, int pageSize, int poolPages, Random rng)
    {
        var pages = BatchShape.Permutation(poolPages, rng);
        var slots = new int[tokens];
        for (int t = 0; t < tokens; t++)
            slots[t] = decode ? pages[t] * pageSize + rng.Next(pageSize) : pages[t / pageSize] * pageSize + t % pageSize;
        return slots;
    }

    /// <summary>Block table <c>[B, N / page]</c>: a random permutation of all B · N / page pages of the pool.</summary>
    internal static int[] BlockTable(int batch, int tokens, int pageSize, Random rng) =>
        BatchShape.Permutation(batch * tokens / pageSize, rng);

    /// <summary>Page pairs: a random permutation of the pool; the first <paramref name="pairs"/> pages are sources, the next destinations.</summary>
    internal static int[] PagePairs(int pairs, int poolPages, Random rng)
    {
        var pages = BatchShape.Permutation(poolPages, rng);
        var result = new int[2 * pairs];
        for (int i = 0; i < pairs; i++)
        {
            result[2 * i] = pages[i];
            result[2 * i + 1] = pages[pairs + i];
        }
        return result;
    }

    private static readonly Lazy<byte[]> RandomChunk = new(() =>
    {
        var chunk = new byte[16 << 20];
        BandwidthProbe.RandomFill(chunk, 4242);
        return chunk;
    });

    /// <summary>Fills device memory with random bytes (never all zeros) by uploading a random 16 MiB chunk repeatedly.</summary>
    internal static void FillRandom<T>(DeviceSpan<T> span) where T : unmanaged
    {
        var bytes = span.AsBytes();
        var chunk = RandomChunk.Value;
        for (long offset = 0; offset < bytes.Length; offset += chunk.Length)
        {
            long length = Math.Min(chunk.Length, bytes.Length - offset);
            bytes.Slice(offset, length).CopyFrom(chunk.AsSpan(0, (int)length));
        }
    }

    internal static void FillRandom<T>(Span<T> span, int seed) where T : unmanaged => BandwidthProbe.RandomFill(MemoryMarshal.AsBytes(span), seed);
}

// ---------------------------------------------------------------------------------------------- GPU

internal sealed class GpuAppend(PagingGeometry g, int tokens, bool decode, int poolPages) : GpuBenchCase
{
    private readonly List<(DeviceMemory<Half> Keys, DeviceMemory<Half>? Values, DeviceSlotMapping Slots)> _sets = [];
    private DeviceMemory<Half>? _keyPool, _valuePool;
    private PagedKvKernels? _kernels;
    private PagedAppendSpec _spec;

    public override string Op => "paging.append";
    public override string Shape => ShapeText.Append(tokens, decode, g);
    public override long BytesMoved => 2L * tokens * PagingBenchCases.TokenBytes(g) * PagingBenchCases.Pools(g);
    public override long SharedAllocationBytes => (long)poolPages * g.PageSize * PagingBenchCases.TokenBytes(g) * PagingBenchCases.Pools(g);
    public override long SetAllocationBytes => tokens * PagingBenchCases.TokenBytes(g) * PagingBenchCases.Pools(g) + 4L * tokens;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var pool = g.Pool(poolPages);
        _spec = new PagedAppendSpec(pool, tokens);
        _kernels = new PagedKvKernels(device);
        _keyPool = device.Allocate<Half>(pool.PoolElements);
        PagingBenchCases.FillRandom(_keyPool.Span);
        if (!g.KeysOnly)
        {
            _valuePool = device.Allocate<Half>(pool.PoolElements);
            PagingBenchCases.FillRandom(_valuePool.Span);
        }
        for (int s = 0; s < sets; s++)
        {
            var keys = device.Allocate<Half>((long)tokens * pool.TokenElements);
            PagingBenchCases.FillRandom(keys.Span);
            DeviceMemory<Half>? values = null;
            if (!g.KeysOnly)
            {
                values = device.Allocate<Half>((long)tokens * pool.TokenElements);
                PagingBenchCases.FillRandom(values.Span);
            }
            var slots = new DeviceSlotMapping(device, tokens);
            slots.Update(PagingBenchCases.AppendSlots(tokens, decode, g.PageSize, poolPages, rng), pool);
            _sets.Add((keys, values, slots));
        }
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (keys, values, slots) = _sets[set];
        _kernels!.Append(_spec, keys.Span, values is null ? default : values.Span, slots, _keyPool!.Span,
            _valuePool is null ? default : _valuePool.Span, stream);
    }

    public override void Dispose()
    {
        foreach (var (keys, values, slots) in _sets)
        {
            keys.Dispose();
            values?.Dispose();
            slots.Dispose();
        }
        _sets.Clear();
        _keyPool?.Dispose();
        _valuePool?.Dispose();
    }
}

/// <summary>Gather (pools → contiguous) or scatter (contiguous → pools) of B sequences of exactly N tokens each; MaxTokens = N.</summary>
internal sealed class GpuBatch(PagingGeometry g, int batch, int tokens, bool scatter) : GpuBenchCase
{
    private readonly List<(DeviceMemory<Half> KeyPool, DeviceMemory<Half>? ValuePool, DeviceMemory<Half> Keys, DeviceMemory<Half>? Values, DeviceBlockTable Table)> _sets = [];
    private PagedKvKernels? _kernels;
    private PagedBatchSpec _spec;

    private long Elements => (long)batch * tokens * g.Heads * g.HeadDim;

    public override string Op => scatter ? "paging.scatter" : "paging.gather";
    public override string Shape => ShapeText.Batch(batch, tokens, g);
    public override long BytesMoved => 2L * Elements * 2 * PagingBenchCases.Pools(g);
    public override long SharedAllocationBytes => 0;
    public override long SetAllocationBytes => 2L * Elements * 2 * PagingBenchCases.Pools(g) + 8L * batch * (tokens / g.PageSize + 1);

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        int pages = batch * tokens / g.PageSize;
        var pool = g.Pool(pages);
        _spec = new PagedBatchSpec(pool, batch, tokens / g.PageSize, tokens);
        _kernels = new PagedKvKernels(device);
        var lengths = Enumerable.Repeat(tokens, batch).ToArray();
        for (int s = 0; s < sets; s++)
        {
            DeviceMemory<Half> Make(long n)
            {
                var m = device.Allocate<Half>(n);
                PagingBenchCases.FillRandom(m.Span);
                return m;
            }
            var keyPool = Make(pool.PoolElements);
            var valuePool = g.KeysOnly ? null : Make(pool.PoolElements);
            var keys = Make(_spec.ContiguousElements);
            var values = g.KeysOnly ? null : Make(_spec.ContiguousElements);
            var table = new DeviceBlockTable(device, batch, _spec.MaxPagesPerSequence);
            table.Update(PagingBenchCases.BlockTable(batch, tokens, g.PageSize, rng), lengths, pool);
            _sets.Add((keyPool, valuePool, keys, values, table));
        }
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (keyPool, valuePool, keys, values, table) = _sets[set];
        var vp = valuePool is null ? default : valuePool.Span;
        var v = values is null ? default : values.Span;
        if (scatter) _kernels!.Scatter(_spec, keys.Span, v, table, keyPool.Span, vp, stream);
        else _kernels!.Gather(_spec, keyPool.Span, vp, table, keys.Span, v, stream);
    }

    public override void Dispose()
    {
        foreach (var (keyPool, valuePool, keys, values, table) in _sets)
        {
            keyPool.Dispose();
            valuePool?.Dispose();
            keys.Dispose();
            values?.Dispose();
            table.Dispose();
        }
        _sets.Clear();
    }
}

internal sealed class GpuCopyPages(PagingGeometry g, int pairs, int poolPages) : GpuBenchCase
{
    private readonly List<DevicePageCopies> _sets = [];
    private DeviceMemory<Half>? _keyPool, _valuePool;
    private PagedKvKernels? _kernels;
    private PagedKvLayout _pool;

    private long PageBytes => g.PageSize * PagingBenchCases.TokenBytes(g);

    public override string Op => "paging.copy_pages";
    public override string Shape => ShapeText.CopyPages(pairs, g);
    public override long BytesMoved => 2L * pairs * PageBytes * PagingBenchCases.Pools(g);
    public override long SharedAllocationBytes => poolPages * PageBytes * PagingBenchCases.Pools(g);
    public override long SetAllocationBytes => 8L * pairs;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        _pool = g.Pool(poolPages);
        _kernels = new PagedKvKernels(device);
        _keyPool = device.Allocate<Half>(_pool.PoolElements);
        PagingBenchCases.FillRandom(_keyPool.Span);
        if (!g.KeysOnly)
        {
            _valuePool = device.Allocate<Half>(_pool.PoolElements);
            PagingBenchCases.FillRandom(_valuePool.Span);
        }
        for (int s = 0; s < sets; s++)
        {
            var copies = new DevicePageCopies(device, pairs);
            copies.Update(PagingBenchCases.PagePairs(pairs, poolPages, rng), _pool);
            _sets.Add(copies);
        }
    }

    public override void Enqueue(CudaStream stream, int set) =>
        _kernels!.CopyPages(_pool, _sets[set], _keyPool!.Span, _valuePool is null ? default : _valuePool.Span, stream);

    public override void Dispose()
    {
        foreach (var copies in _sets) copies.Dispose();
        _sets.Clear();
        _keyPool?.Dispose();
        _valuePool?.Dispose();
    }
}

// ---------------------------------------------------------------------------------------------- CPU

internal sealed class CpuAppend(PagingGeometry g, int tokens, bool decode, int poolPages) : CpuBenchCase
{
    private readonly List<(Half[] Keys, Half[]? Values, int[] Slots)> _sets = [];
    private Half[] _keyPool = [];
    private Half[]? _valuePool;
    private PagedAppendSpec _spec;

    public override string Op => "paging.append";
    public override string Shape => ShapeText.Append(tokens, decode, g);
    public override long BytesMoved => 2L * tokens * PagingBenchCases.TokenBytes(g) * PagingBenchCases.Pools(g);
    public override long SharedAllocationBytes => (long)poolPages * g.PageSize * PagingBenchCases.TokenBytes(g) * PagingBenchCases.Pools(g);
    public override long SetAllocationBytes => tokens * PagingBenchCases.TokenBytes(g) * PagingBenchCases.Pools(g) + 4L * tokens;

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        var pool = g.Pool(poolPages);
        _spec = new PagedAppendSpec(pool, tokens);
        _keyPool = new Half[pool.PoolElements];
        PagingBenchCases.FillRandom<Half>(_keyPool, seed + 1);
        if (!g.KeysOnly)
        {
            _valuePool = new Half[pool.PoolElements];
            PagingBenchCases.FillRandom<Half>(_valuePool, seed + 2);
        }
        for (int s = 0; s < sets; s++)
        {
            var keys = new Half[tokens * pool.TokenElements];
            PagingBenchCases.FillRandom<Half>(keys, seed + 10 + 2 * s);
            Half[]? values = null;
            if (!g.KeysOnly)
            {
                values = new Half[tokens * pool.TokenElements];
                PagingBenchCases.FillRandom<Half>(values, seed + 11 + 2 * s);
            }
            _sets.Add((keys, values, PagingBenchCases.AppendSlots(tokens, decode, g.PageSize, poolPages, rng)));
        }
    }

    public override void Run(int set)
    {
        var (keys, values, slots) = _sets[set];
        PagedKvCache.Append(_spec, keys, values, slots, _keyPool, _valuePool);
    }

    public override void Dispose() => _sets.Clear();
}

internal sealed class CpuBatch(PagingGeometry g, int batch, int tokens, bool scatter) : CpuBenchCase
{
    private readonly List<(Half[] KeyPool, Half[]? ValuePool, Half[] Keys, Half[]? Values, int[] Table)> _sets = [];
    private int[] _lengths = [];
    private PagedBatchSpec _spec;

    private long Elements => (long)batch * tokens * g.Heads * g.HeadDim;

    public override string Op => scatter ? "paging.scatter" : "paging.gather";
    public override string Shape => ShapeText.Batch(batch, tokens, g);
    public override long BytesMoved => 2L * Elements * 2 * PagingBenchCases.Pools(g);
    public override long SharedAllocationBytes => 0;
    public override long SetAllocationBytes => 2L * Elements * 2 * PagingBenchCases.Pools(g) + 4L * batch * (tokens / g.PageSize);

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        var pool = g.Pool(batch * tokens / g.PageSize);
        _spec = new PagedBatchSpec(pool, batch, tokens / g.PageSize, tokens);
        _lengths = Enumerable.Repeat(tokens, batch).ToArray();
        for (int s = 0; s < sets; s++)
        {
            Half[] Make(long n, int salt)
            {
                var a = new Half[n];
                PagingBenchCases.FillRandom<Half>(a, seed + 16 * s + salt);
                return a;
            }
            _sets.Add((Make(pool.PoolElements, 1), g.KeysOnly ? null : Make(pool.PoolElements, 2),
                Make(_spec.ContiguousElements, 3), g.KeysOnly ? null : Make(_spec.ContiguousElements, 4),
                PagingBenchCases.BlockTable(batch, tokens, g.PageSize, rng)));
        }
    }

    public override void Run(int set)
    {
        var (keyPool, valuePool, keys, values, table) = _sets[set];
        if (scatter) PagedKvCache.Scatter(_spec, keys, values, table, _lengths, keyPool, valuePool);
        else PagedKvCache.Gather(_spec, keyPool, valuePool, table, _lengths, keys, values);
    }

    public override void Dispose() => _sets.Clear();
}

internal sealed class CpuCopyPages(PagingGeometry g, int pairs, int poolPages) : CpuBenchCase
{
    private readonly List<int[]> _sets = [];
    private Half[] _keyPool = [];
    private Half[]? _valuePool;
    private PagedKvLayout _pool;

    private long PageBytes => g.PageSize * PagingBenchCases.TokenBytes(g);

    public override string Op => "paging.copy_pages";
    public override string Shape => ShapeText.CopyPages(pairs, g);
    public override long BytesMoved => 2L * pairs * PageBytes * PagingBenchCases.Pools(g);
    public override long SharedAllocationBytes => poolPages * PageBytes * PagingBenchCases.Pools(g);
    public override long SetAllocationBytes => 8L * pairs;

    public override void Prepare(int sets, int seed)
    {
        var rng = new Random(seed);
        _pool = g.Pool(poolPages);
        _keyPool = new Half[_pool.PoolElements];
        PagingBenchCases.FillRandom<Half>(_keyPool, seed + 1);
        if (!g.KeysOnly)
        {
            _valuePool = new Half[_pool.PoolElements];
            PagingBenchCases.FillRandom<Half>(_valuePool, seed + 2);
        }
        for (int s = 0; s < sets; s++) _sets.Add(PagingBenchCases.PagePairs(pairs, poolPages, rng));
    }

    public override void Run(int set) => PagedKvCache.CopyPages(_pool, _sets[set], _keyPool, _valuePool);

    public override void Dispose() => _sets.Clear();
}
