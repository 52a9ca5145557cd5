using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using KvKernels.Paging;

namespace KvKernels.Bench;

/// <summary>
/// A paging benchmark shape: B sequences of N tokens, Llama-3-8B-like K and V (Hkv = 8, D = 128, fp16, page 16). Every op
/// of the suite moves the same bytes per call, M = 2 (K, V) × 2 (read, write) × B·N·Hkv·D·2 B: gather and scatter of the
/// whole batch, an append of all B·N tokens (prefill pattern), a page copy of B·N/page pairs in a pool twice that size,
/// and the copy probe copies M/2 bytes. The string form matches KvCheck's shape strings
/// (<c>B=4 N=4096 Hkv=8 D=128 page=16 NHD fp16</c>).
/// </summary>
public sealed record PagingShape(KvLayout Layout, int Batch, int Tokens) : IBytesMoved
{
    public const int PageSize = 16, Heads = 8, HeadDim = 128;

    public long TokenBytes => Heads * HeadDim * sizeof(short);
    public long Moved => 2L * 2 * Batch * Tokens * TokenBytes;
    public int Pages => Batch * Tokens / PageSize;

    public long BytesMoved(string benchmarkMethod) => Moved;

    public PagedKvLayout Pool(int pages) => new(pages, PageSize, Heads, HeadDim, Layout);

    public override string ToString() => $"B={Batch} N={Tokens} Hkv={Heads} D={HeadDim} page={PageSize} {(Layout == KvLayout.Nhd ? "NHD" : "HND")} fp16";
}

/// <summary>Host-side index patterns shared by the suites (random permutations; fixed seeds).</summary>
internal static class Patterns
{
    public static int[] Permutation(int n, Random rng)
    {
        var result = Enumerable.Range(0, n).ToArray();
        rng.Shuffle(result);
        return result;
    }

    /// <summary>Prefill slots: tokens fill random whole pages in order.</summary>
    public static int[] PrefillSlots(int tokens, int pageSize, int poolPages, Random rng)
    {
        var pages = Permutation(poolPages, rng);
        var slots = new int[tokens];
        for (int t = 0; t < tokens; t++) slots[t] = pages[t / pageSize] * pageSize + t % pageSize;
        return slots;
    }

    public static int[] Pairs(int pairs, int poolPages, Random rng)
    {
        var pages = Permutation(poolPages, rng);
        var result = new int[2 * pairs];
        for (int i = 0; i < pairs; i++)
        {
            result[2 * i] = pages[i];
            result[2 * i + 1] = pages[pairs + i];
        }
        return result;
    }

    /// <summary>Random bytes (never an all-zero buffer).</summary>
    public static T[] RandomArray<T>(long length, Random rng) where T : unmanaged
    {
        var array = new T[length];
        var bytes = MemoryMarshal.AsBytes(array.AsSpan());
        var block = new byte[1 << 20];
        rng.NextBytes(block);
        for (int offset = 0; offset < bytes.Length; offset += block.Length)
        {
            int n = Math.Min(block.Length, bytes.Length - offset);
            block.AsSpan(0, n).CopyTo(bytes.Slice(offset, n));
            block[rng.Next(block.Length)] ^= 0x5A;
        }
        return array;
    }
}

/// <summary>
/// The CPU paging ops (<see cref="PagedKvCache"/>) against a memory-copy probe that moves the same bytes in the same run:
/// the Ratio column is probe time / op time and the "% of copy" column the same in GB/s terms. Buffers are 128 MiB per
/// op call, far beyond the last-level cache, so no rotation is needed.
/// </summary>
public class PagingCpuBenchmarks : MemoryProbeBenchmarks
{
    private Half[] _keyPool = [], _valuePool = [], _keys = [], _values = [];
    private Half[] _copyKeyPool = [], _copyValuePool = [];
    private int[] _table = [], _lengths = [], _slots = [], _pairs = [];
    private PagedBatchSpec _batch;
    private PagedAppendSpec _append;
    private PagedKvLayout _copyPool;

    public static IEnumerable<PagingShape> Shapes =>
    [
        new(KvLayout.Nhd, 4, 4096),
        new(KvLayout.Hnd, 4, 4096),
    ];

    [ParamsSource(nameof(Shapes))]
    public PagingShape Shape { get; set; } = Shapes.First();

    [GlobalSetup]
    public void Setup()
    {
        var rng = new Random(20250101);
        var s = Shape;
        var pool = s.Pool(s.Pages);
        _batch = new PagedBatchSpec(pool, s.Batch, s.Tokens / PagingShape.PageSize, s.Tokens);
        _append = new PagedAppendSpec(pool, s.Batch * s.Tokens);
        _keyPool = Patterns.RandomArray<Half>(pool.PoolElements, rng);
        _valuePool = Patterns.RandomArray<Half>(pool.PoolElements, rng);
        _keys = Patterns.RandomArray<Half>(_batch.ContiguousElements, rng);
        _values = Patterns.RandomArray<Half>(_batch.ContiguousElements, rng);
        _table = Patterns.Permutation(s.Pages, rng);
        _lengths = Enumerable.Repeat(s.Tokens, s.Batch).ToArray();
        _slots = Patterns.PrefillSlots(s.Batch * s.Tokens, PagingShape.PageSize, s.Pages, rng);
        _copyPool = s.Pool(2 * s.Pages);
        _copyKeyPool = Patterns.RandomArray<Half>(_copyPool.PoolElements, rng);
        _copyValuePool = Patterns.RandomArray<Half>(_copyPool.PoolElements, rng);
        _pairs = Patterns.Pairs(s.Pages, 2 * s.Pages, rng);
        SetUpProbes(s.Moved / 2, s.Moved, rng);
    }

    [Benchmark]
    public void Append() => PagedKvCache.Append(_append, _keys, _values, _slots, _keyPool, _valuePool);

    [Benchmark]
    public void Gather() => PagedKvCache.Gather(_batch, _keyPool, _valuePool, _table, _lengths, _keys, _values);

    [Benchmark]
    public void Scatter() => PagedKvCache.Scatter(_batch, _keys, _values, _table, _lengths, _keyPool, _valuePool);

    [Benchmark]
    public void CopyPages() => PagedKvCache.CopyPages(_copyPool, _pairs, _copyKeyPool, _copyValuePool);
}
