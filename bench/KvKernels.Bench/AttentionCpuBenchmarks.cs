using BenchmarkDotNet.Attributes;
using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Bench;

/// <summary>
/// A decode-attention benchmark shape: B sequences of N cached tokens, Hq query heads over Hkv KV heads of dim D, one
/// query token, fp16 keys and values, contiguous or paged storage. The bytes an op must move are the KV bytes
/// M = 2 (K, V) × B·N·Hkv·D·2 B (queries and outputs are under 0.1 % of that); the copy probes copy M/2 bytes, which
/// also moves M. The string form follows KvCheck's shape strings.
/// </summary>
public sealed record AttentionCpuShape(int QueryHeads, int KvHeads, int HeadDim, int Batch, int Tokens, int PageSize) : IBytesMoved
{
    public long KvBytes => 2L * Batch * Tokens * KvHeads * HeadDim * sizeof(short);

    public long BytesMoved(string benchmarkMethod) => KvBytes;

    public DecodeAttentionSpec Spec
    {
        get
        {
            var cache = PageSize == 0
                ? KvCacheShape.Contiguous(Tokens)
                : KvCacheShape.Paged(Batch * Tokens / PageSize, PageSize, Tokens / PageSize);
            return new DecodeAttentionSpec(Batch, 1, QueryHeads, KvHeads, HeadDim, cache);
        }
    }

    public override string ToString() =>
        $"B={Batch} N={Tokens} Hq={QueryHeads} Hkv={KvHeads} D={HeadDim} {(PageSize == 0 ? "contiguous" : $"page={PageSize}")} fp16";
}

/// <summary>
/// The CPU twin of decode attention (<see cref="DecodeAttentionCpu"/>) against memory probes that move the same bytes in
/// the same run: the one-thread copy (baseline, for the "% of copy" column), the copy split over all cores, and a
/// read-only sweep over all cores (attention only reads the cache, so this is its ceiling). Shapes: Llama-3-8B-like
/// GQA (32q/8kv D128), MQA with a wide head (64q/1kv D256), MHA (32q/32kv D128); B = 1 to 8, N = 1k to 8k;
/// contiguous and page 16. The caches are 8 MiB (MQA, B = 1, compute-bound anyway) to 128 MiB, read once per call.
/// </summary>
public class AttentionCpuBenchmarks : MemoryProbeBenchmarks
{
    private Half[] _query = [], _keys = [], _values = [], _output = [];
    private float[] _lse = [];
    private int[] _lengths = [], _table = [];
    private DecodeAttentionSpec _spec;

    public static IEnumerable<AttentionCpuShape> Shapes =>
    [
        new(32, 8, 128, 1, 8192, 0),
        new(32, 8, 128, 1, 8192, 16),
        new(32, 8, 128, 8, 4096, 16),
        new(64, 1, 256, 1, 8192, 16),
        new(64, 1, 256, 8, 2048, 0),
        new(32, 32, 128, 1, 2048, 0),
        new(32, 32, 128, 4, 1024, 16),
    ];

    [ParamsSource(nameof(Shapes))]
    public AttentionCpuShape Shape { get; set; } = Shapes.First();

    [GlobalSetup]
    public void Setup()
    {
        var rng = new Random(20250611);
        var s = Shape;
        _spec = s.Spec;
        _query = RandomHalves(_spec.QueryElements, rng);
        _keys = RandomHalves(_spec.KeyElements, rng);
        _values = RandomHalves(_spec.ValueElements, rng);
        _output = new Half[_spec.OutputElements];
        _lse = new float[_spec.LseElements];
        _lengths = Enumerable.Repeat(s.Tokens, s.Batch).ToArray();
        _table = s.PageSize == 0 ? [] : Patterns.Permutation(_spec.Cache.NumPages, rng);
        SetUpProbes(s.KvBytes / 2, s.KvBytes, rng);
    }

    /// <summary>Values in [−2, 2) (random bytes would be NaN and ∞ as fp16), a 1 Mi-element random block repeated.</summary>
    private static Half[] RandomHalves(long length, Random rng)
    {
        var block = new Half[Math.Min(length, 1 << 20)];
        for (int i = 0; i < block.Length; i++) block[i] = (Half)(rng.NextSingle() * 4 - 2);
        var result = new Half[length];
        for (long offset = 0; offset < length; offset += block.Length)
            block.AsSpan(0, (int)Math.Min(block.Length, length - offset)).CopyTo(result.AsSpan((int)offset));
        return result;
    }

    /// <summary>Decode attention of one query token per sequence, fp16 output and the LSE.</summary>
    [Benchmark]
    public void Decode() =>
        DecodeAttentionCpu.Run<Half, Half>(_spec, _query, _keys, _values, _lengths, _table, _output, _lse);
}
