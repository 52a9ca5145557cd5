using KvKernels.Attention;
using KvKernels.Mla;

namespace KvKernels.Tests.Oracles;

/// <summary>
/// One random MLA decode problem: DeepSeek-like weights <c>wkv_b</c> (entries N(0, 1/LatentDim), so q_latent has
/// unit scale), q_nope and q_pe ~ N(0, 1), and a latent cache built by <see cref="AttentionData{T}"/> for the latent
/// attention (NaN in every slot no sequence uses, a few outlier channels).
/// </summary>
public sealed class MlaData<T> where T : unmanaged
{
    private MlaData(MlaAttentionSpec spec, AttentionData<T> cache) => (Spec, Cache) = (spec, cache);

    /// <summary>The problem's spec.</summary>
    public MlaAttentionSpec Spec { get; }

    /// <summary>The latent cache, lengths and block table (its Query is not used).</summary>
    public AttentionData<T> Cache { get; }

    /// <summary><c>[B, q_len, H, NopeDim]</c>.</summary>
    public T[] QueryNope { get; private init; } = [];

    /// <summary><c>[B, q_len, H, RopeDim]</c>.</summary>
    public T[] QueryRope { get; private init; } = [];

    /// <summary><c>[H, NopeDim + ValueDim, LatentDim]</c>.</summary>
    public T[] Weights { get; private init; } = [];

    /// <summary>Builds a problem; <paramref name="lengths"/> has B entries (null draws them).</summary>
    public static MlaData<T> Create(MlaAttentionSpec spec, Random random, int[]? lengths = null)
    {
        spec.Validate();
        var cache = AttentionData<T>.Create(spec.ToDecodeAttention(), random, lengths);
        float weightScale = 1f / MathF.Sqrt(spec.Shape.LatentDim);
        return new MlaData<T>(spec, cache)
        {
            QueryNope = Random(spec.NopeQueryElements, 1f, random),
            QueryRope = Random(spec.RopeQueryElements, 1f, random),
            Weights = Random(spec.Shape.WeightElements, weightScale, random),
        };
    }

    /// <summary>The oracle's absorbed step: output, LSE and latent output.</summary>
    public (double[] Output, double[] Lse, double[] LatentOutput) ExpectedAbsorbed() =>
        MlaOracle.DecodeAbsorbed(Spec, D(QueryNope), D(QueryRope), D(Weights), D(Cache.Keys), Cache.Lengths, Spec.Cache.IsPaged ? Cache.BlockTable : null);

    /// <summary>The oracle's naive step: output and LSE.</summary>
    public (double[] Output, double[] Lse) ExpectedNaive() =>
        MlaOracle.DecodeNaive(Spec, D(QueryNope), D(QueryRope), D(Weights), D(Cache.Keys), Cache.Lengths, Spec.Cache.IsPaged ? Cache.BlockTable : null);

    private static double[] D(T[] values) => AttentionElements.ToDoubles<T>(values);

    private static T[] Random(long count, float scale, Random random)
    {
        var result = new T[count];
        for (long i = 0; i < count; i++) result[i] = AttentionElements.FromFloat<T>(Normal(random) * scale);
        return result;
    }

    private static float Normal(Random random) =>
        (float)(Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble()));
}
