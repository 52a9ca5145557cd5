using KvKernels.Attention;
using KvKernels.Mla;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Mla;

/// <summary>The CPU twin of MLA: absorption GEMMs, latent attention and the whole step against the float64 oracle, and
/// the fp32 reference's absorbed path against its naive path (the correctness of absorption, at fp32 tolerance).</summary>
public sealed class MlaCpuTests
{
    public static TheoryData<string, int, int, int, int[]> Cases => new()
    {
        // name, heads, q_len, page size (0 = contiguous), lengths
        { "tp8 page 64 around a page", 16, 1, 64, [0, 1, 63, 64, 65] },
        { "128 heads q2", 128, 2, 64, [66, 2] },
        { "odd page, q2", 24, 2, 13, [40, 1] },
        { "contiguous", 8, 1, 0, [70, 3] },
    };

    private static MlaAttentionSpec Spec(MlaShape shape, int queryLength, int pageSize, int[] lengths, AttentionElement input, AttentionElement output)
    {
        int maxTokens = lengths.Max() + 5;
        var cache = pageSize == 0
            ? KvCacheShape.Contiguous(maxTokens)
            : KvCacheShape.Paged(lengths.Sum(l => (l + pageSize - 1) / pageSize) + 2, pageSize, (maxTokens + pageSize - 1) / pageSize);
        return new MlaAttentionSpec(lengths.Length, queryLength, shape, cache) { InputType = input, OutputType = output };
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Decode_MatchesOracle_AndAbsorbedEqualsNaiveInFp32(string name, int heads, int queryLength, int pageSize, int[] lengths)
    {
        _ = name;
        var spec = Spec(MlaShape.DeepSeek(heads), queryLength, pageSize, lengths, AttentionElement.BFloat16, AttentionElement.Float32);
        var data = MlaData<BFloat16>.Create(spec, new Random(heads + queryLength), lengths);
        var c = data.Cache;
        var expected = data.ExpectedAbsorbed();

        var output = new float[spec.OutputElements];
        var lse = new float[c.Spec.LseElements];
        MlaCpu.Decode<BFloat16, float>(spec, data.QueryNope, data.QueryRope, data.Weights, c.Keys, c.Lengths, c.BlockTable, output, lse);
        // q_latent and o_lat are bf16 (as on the GPU): bf16 tolerance.
        Assert.InRange(AttentionElements.RelativeError<float>(output, expected.Output), 0, 1e-2);
        Assert.InRange(AttentionElements.RelativeError<float>(lse, expected.Lse), 0, 1e-2);

        var absorbed = new float[spec.OutputElements];
        var naive = new float[spec.OutputElements];
        var absorbedLse = new float[c.Spec.LseElements];
        var naiveLse = new float[c.Spec.LseElements];
        MlaCpu.DecodeReference<BFloat16>(spec, data.QueryNope, data.QueryRope, data.Weights, c.Keys, c.Lengths, c.BlockTable, absorbed, absorbedLse, MlaPath.Absorbed);
        MlaCpu.DecodeReference<BFloat16>(spec, data.QueryNope, data.QueryRope, data.Weights, c.Keys, c.Lengths, c.BlockTable, naive, naiveLse, MlaPath.Naive);
        Assert.InRange(AttentionElements.RelativeError<float>(absorbed, AttentionElements.ToDoubles<float>(naive)), 0, 1e-5);
        Assert.InRange(AttentionElements.RelativeError<float>(absorbedLse, AttentionElements.ToDoubles<float>(naiveLse)), 0, 1e-5);
        // And both fp32 paths against the float64 oracle, at fp32 tolerance.
        Assert.InRange(AttentionElements.RelativeError<float>(naive, data.ExpectedNaive().Output), 0, 1e-5);
        Assert.InRange(AttentionElements.RelativeError<float>(absorbed, expected.Output), 0, 1e-5);
    }

    [Theory]
    [InlineData(1, 1, 4, 64, 16, 32, 24)]
    [InlineData(3, 2, 16, 128, 32, 64, 40)]
    [InlineData(7, 1, 128, 512, 64, 128, 128)]
    public void AbsorbAndUnabsorb_MatchOracle(int batch, int queryLength, int heads, int latent, int rope, int nope, int value)
    {
        var shape = new MlaShape(heads, latent, rope, nope, value);
        var spec = new MlaAttentionSpec(batch, queryLength, shape, KvCacheShape.Contiguous(1))
        {
            InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32,
        };
        var rng = new Random(batch * 31 + heads);
        var qNope = TestValues<Half>(rng, spec.NopeQueryElements);
        var qPe = TestValues<Half>(rng, spec.RopeQueryElements);
        var weights = TestValues<Half>(rng, shape.WeightElements, 1 / MathF.Sqrt(latent));
        var latentOut = TestValues<Half>(rng, spec.LatentOutputElements);
        var d = AttentionElements.ToDoubles<Half>;

        var query = AttentionElements.Poisoned<Half>(spec.QueryElements);
        MlaCpu.AbsorbQuery<Half>(spec, qNope, qPe, weights, query);
        var expectedQuery = MlaOracle.PackQuery(shape, spec.TokenRows, MlaOracle.Absorb(shape, spec.TokenRows, d(qNope), d(weights)), d(qPe));
        Assert.InRange(AttentionElements.RelativeError<Half>(query, expectedQuery), 0, 2e-3);

        var output = AttentionElements.Poisoned<float>(spec.OutputElements);
        MlaCpu.Unabsorb<Half, float>(spec, latentOut, weights, output);
        Assert.InRange(AttentionElements.RelativeError<float>(output, MlaOracle.Unabsorb(shape, spec.TokenRows, d(latentOut), d(weights))), 0, 1e-5);
    }

    [Fact]
    public void Attend_MatchesOracle()
    {
        var spec = Spec(MlaShape.DeepSeek(16), 2, 64, [65, 1, 0], AttentionElement.Float16, AttentionElement.Float16);
        var data = AttentionData<Half>.Create(spec.ToDecodeAttention(), new Random(5), [65, 1, 0]);
        var output = AttentionElements.Poisoned<Half>(spec.LatentOutputElements);
        var lse = new float[data.Spec.LseElements];
        MlaCpu.Attend<Half, Half>(spec, data.Query, data.Keys, data.Lengths, data.BlockTable, output, lse);
        var (expected, expectedLse) = data.Expected();
        Assert.InRange(AttentionElements.RelativeError<Half>(output, expected), 0, 2e-3);
        Assert.InRange(AttentionElements.RelativeError<float>(lse, expectedLse), 0, 1e-5);
    }

    private static T[] TestValues<T>(Random rng, long count, float scale = 1f) where T : unmanaged
    {
        var values = new T[count];
        for (long i = 0; i < count; i++) values[i] = AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1) * scale);
        return values;
    }
}
