using KvKernels.Attention;
using KvKernels.Mla;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Mla;

/// <summary>The float64 oracle's absorbed and naive MLA steps agree: absorption is exact algebra, so they differ by
/// double rounding only. A wrong W_UK/W_UV slice, a transposed weight or a mis-scaled logit breaks it.</summary>
public sealed class MlaOracleTests
{
    public static TheoryData<int, int, int, int, int, int> Shapes => new()
    {
        // heads, latent, rope, nope, value, q_len
        { 4, 64, 16, 32, 24, 1 },
        { 3, 96, 32, 16, 40, 2 },
        { 16, 512, 64, 128, 128, 2 },
    };

    [Theory]
    [MemberData(nameof(Shapes))]
    public void AbsorbedEqualsNaive(int heads, int latent, int rope, int nope, int value, int queryLength)
    {
        var shape = new MlaShape(heads, latent, rope, nope, value);
        var spec = new MlaAttentionSpec(2, queryLength, shape, KvCacheShape.Paged(6, 16, 3))
        {
            InputType = AttentionElement.BFloat16, OutputType = AttentionElement.Float32,
        };
        var data = MlaData<BFloat16>.Create(spec, new Random(heads * 7 + latent), [37, queryLength == 1 ? 1 : 2]);
        var absorbed = data.ExpectedAbsorbed();
        var naive = data.ExpectedNaive();
        Assert.Contains(naive.Output, x => x != 0);
        Assert.Equal(naive.Output.Length, absorbed.Output.Length);
        for (int i = 0; i < naive.Output.Length; i++) Assert.Equal(naive.Output[i], absorbed.Output[i], 1e-10);
        for (int i = 0; i < naive.Lse.Length; i++) Assert.Equal(naive.Lse[i], absorbed.Lse[i], 1e-10);
    }

    [Fact]
    public void NaiveDiffersWhenTheRopePartIsDropped()
    {
        // The oracle must depend on q_pe·k_pe: zeroing q_pe changes the result (guards against a test that cannot fail).
        var spec = new MlaAttentionSpec(1, 1, new MlaShape(2, 64, 16, 32, 32), KvCacheShape.Contiguous(40))
        {
            InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32,
        };
        var data = MlaData<Half>.Create(spec, new Random(3), [40]);
        var full = data.ExpectedNaive();
        Array.Fill(data.QueryRope, Half.Zero);
        var noRope = data.ExpectedNaive();
        Assert.True(full.Output.Zip(noRope.Output).Max(p => Math.Abs(p.First - p.Second)) > 1e-3);
    }
}
