using KvKernels.Conversion;

namespace KvKernels.Tests.Conversion;

/// <summary>The conversion's fp32 GEMM and transpose against a float64 triple loop, at odd sizes around its 4-row
/// blocks, 256-column tiles and vector width, with offsets into larger arrays.</summary>
public sealed class SimdGemmTests
{
    [Theory]
    [InlineData(1, 1, 1)]
    [InlineData(3, 5, 7)]
    [InlineData(4, 1, 257)]
    [InlineData(5, 19, 256)]
    [InlineData(9, 33, 300)]
    [InlineData(130, 64, 129)] // large enough to run its blocks in parallel
    public void Multiply_matches_a_float64_triple_loop(int m, int k, int n)
    {
        var random = new Random(m * 1000 + k * 10 + n);
        const int aOffset = 3, bOffset = 5, cOffset = 7;
        var a = ConversionFixtures.RandomArray(random, aOffset + m * k + 2);
        var b = ConversionFixtures.RandomArray(random, bOffset + k * n + 2);
        var c = Enumerable.Repeat(float.NaN, cOffset + m * n + 2).ToArray();
        SimdGemm.Multiply(a, aOffset, m, k, b, bOffset, n, c, cOffset);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double expected = 0, magnitude = 0;
                for (int p = 0; p < k; p++)
                {
                    expected += (double)a[aOffset + i * k + p] * b[bOffset + p * n + j];
                    magnitude += Math.Abs((double)a[aOffset + i * k + p] * b[bOffset + p * n + j]);
                }
                Assert.True(Math.Abs(c[cOffset + i * n + j] - expected) <= 1e-6 * magnitude + 1e-30, $"C[{i}, {j}] = {c[cOffset + i * n + j]}, expected {expected}");
            }
        Assert.True(float.IsNaN(c[cOffset - 1]) && float.IsNaN(c[cOffset + m * n])); // nothing written outside C
        Assert.Throws<ArgumentException>(() => SimdGemm.Multiply(a, aOffset + 3, m, k, b, bOffset, n, c, cOffset));
    }

    [Fact]
    public void Transpose_swaps_rows_and_columns()
    {
        var source = Enumerable.Range(0, 37 * 45).Select(i => (float)i).ToArray();
        var t = SimdGemm.Transpose(source, 37, 45);
        for (int i = 0; i < 37; i++)
            for (int j = 0; j < 45; j++) Assert.Equal(source[i * 45 + j], t[j * 37 + i]);
    }
}
