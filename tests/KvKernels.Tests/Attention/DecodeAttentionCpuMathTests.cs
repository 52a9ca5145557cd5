using KvKernels.Attention;

namespace KvKernels.Tests.Attention;

/// <summary>The SIMD building blocks of the CPU twin against scalar .NET and double-precision references.</summary>
public sealed unsafe class DecodeAttentionCpuMathTests
{
    [Fact]
    public void WidenHalf_IsExactForEveryBitPattern()
    {
        // All 65536 fp16 values, including ±0, subnormals, ±∞ and NaNs (payload kept, so compare bits).
        var source = new ushort[65536];
        for (int i = 0; i < source.Length; i++) source[i] = (ushort)i;
        var result = new float[65536];
        fixed (ushort* s = source)
        fixed (float* r = result)
            DecodeAttentionCpuMath.Widen((Half*)s, r, source.Length);
        for (int i = 0; i < source.Length; i++)
        {
            float expected = (float)BitConverter.UInt16BitsToHalf((ushort)i);
            if (float.IsNaN(expected)) Assert.True(float.IsNaN(result[i]), $"0x{i:x4} gave {result[i]}");
            else Assert.True(BitConverter.SingleToInt32Bits(expected) == BitConverter.SingleToInt32Bits(result[i]), $"0x{i:x4}: expected {expected}, got {result[i]}");
        }
    }

    [Fact]
    public void WidenBFloat16_IsExactForEveryBitPattern()
    {
        var source = new ushort[65536];
        for (int i = 0; i < source.Length; i++) source[i] = (ushort)i;
        var result = new float[65536];
        fixed (ushort* s = source)
        fixed (float* r = result)
            DecodeAttentionCpuMath.Widen((BFloat16*)s, r, source.Length);
        for (int i = 0; i < source.Length; i++)
            Assert.Equal(BitConverter.SingleToInt32Bits((float)BFloat16.FromBits((ushort)i)), BitConverter.SingleToInt32Bits(result[i]));
    }

    [Fact]
    public void ExpSubtract_IsWithinTwoUlpOfExp_AndHandlesTheEdges()
    {
        // Scores minus their max span 0 down to far below the fp32 exp range.
        const int n = 4096;
        var s = new float[n];
        var random = new Random(1);
        for (int i = 0; i < n; i++) s[i] = i < 8 ? -i * 1e-3f : -(float)(random.NextDouble() * 90);
        s[8] = float.NegativeInfinity;
        s[9] = -87.3f;
        s[10] = -88f;
        var original = (float[])s.Clone();
        float sum;
        fixed (float* p = s) sum = DecodeAttentionCpuMath.ExpSubtract(p, 0f, n);

        double expectedSum = 0;
        for (int i = 0; i < n; i++)
        {
            double e = Math.Exp(original[i]);
            expectedSum += original[i] < -87.33654f ? 0 : e;
            if (original[i] < -87.33654f)
            {
                Assert.Equal(0f, s[i]); // flushed below 2^−126 (and −∞ gives 0)
                continue;
            }
            double ulp = MathF.BitIncrement((float)e) - (float)e;
            Assert.True(Math.Abs(s[i] - e) <= 2 * ulp, $"exp({original[i]}) = {s[i]}, expected {e}");
        }
        Assert.Equal(1f, s[0]); // exp(0) is exact: the row's maximum weighs exactly 1
        Assert.Equal(expectedSum, sum, 1e-5 * expectedSum);

        var nan = new float[8];
        nan.AsSpan().Fill(-1);
        nan[3] = float.NaN;
        fixed (float* p = nan) DecodeAttentionCpuMath.ExpSubtract(p, 0f, 8);
        Assert.True(float.IsNaN(nan[3]));
        Assert.Equal((float)Math.Exp(-1), nan[0], 6);
    }

    [Fact]
    public void CosSin_MatchDoublePrecisionOfTheFp32Angles()
    {
        // Rotary angles: small ones, the pair-0 angles of long contexts (position · 1), and past the vector range (2^20).
        var angles = new List<float> { 0f, -0f, 1e-30f, 0.785398f, 1.5707964f, 3.1415927f, 4.712389f, 6.2831855f, -2.5f };
        var random = new Random(2);
        for (int i = 0; i < 300; i++) angles.Add((float)(random.NextDouble() * 200000));
        for (int i = 0; i < 40; i++) angles.Add((float)((1 << 20) + random.NextDouble() * 1e7));
        for (int i = 0; i < 13; i++) angles.Add(i * 0.37f);
        var a = angles.ToArray();
        var cos = new float[a.Length];
        var sin = new float[a.Length];
        fixed (float* pa = a, pc = cos, ps = sin) DecodeAttentionCpuMath.CosSin(pa, pc, ps, a.Length);
        for (int i = 0; i < a.Length; i++)
        {
            Assert.True(Math.Abs(cos[i] - Math.Cos(a[i])) <= 1.2e-7, $"cos({a[i]}) = {cos[i]}, expected {Math.Cos(a[i])}");
            Assert.True(Math.Abs(sin[i] - Math.Sin(a[i])) <= 1.2e-7, $"sin({a[i]}) = {sin[i]}, expected {Math.Sin(a[i])}");
        }
    }

    [Theory]
    [InlineData(64, false)]
    [InlineData(64, true)]
    [InlineData(20, false)]
    [InlineData(22, true)]
    [InlineData(3, false)]
    [InlineData(1, true)]
    public void RotateRow_MatchesScalarRotation(int pairs, bool interleaved)
    {
        var random = new Random(pairs);
        var invFreq = new float[pairs];
        for (int i = 0; i < pairs; i++) invFreq[i] = (float)Math.Pow(10000, -2.0 * i / (2 * pairs));
        var key = new float[2 * pairs + 8];
        for (int i = 0; i < key.Length; i++) key[i] = (float)(random.NextDouble() * 2 - 1);
        var expected = (float[])key.Clone();
        const int position = 1234;
        for (int i = 0; i < pairs; i++)
        {
            float angle = position * invFreq[i];
            double c = Math.Cos(angle), s = Math.Sin(angle);
            (int x, int y) = interleaved ? (2 * i, 2 * i + 1) : (i, i + pairs);
            double a = key[x], b = key[y];
            expected[x] = (float)(a * c - b * s);
            expected[y] = (float)(a * s + b * c);
        }
        var scratch = new float[3 * pairs + 8];
        fixed (float* k = key, f = invFreq, w = scratch)
            DecodeAttentionCpuMath.RotateRow(k, position, f, pairs, interleaved, w, w + pairs, w + 2 * pairs);
        for (int i = 0; i < key.Length; i++) Assert.True(Math.Abs(expected[i] - key[i]) <= 1e-6, $"dim {i}: {key[i]} vs {expected[i]}");
    }

    [Theory]
    [InlineData(8)]
    [InlineData(24)]
    [InlineData(128)]
    [InlineData(576)]
    public void DotAndAccumulate_MatchScalarSums(int dim)
    {
        var random = new Random(dim);
        float[] Row() => Enumerable.Range(0, 4 * dim).Select(_ => (float)(random.NextDouble() * 2 - 1)).ToArray();
        var q = Row(); // rows 0 and 1 are two query rows
        var k = Row();
        var acc = Row(); // rows 0 and 1: the single-row accumulator; rows 2 and 3: the pair
        var expectedAcc = (float[])acc.Clone();
        var result = new float[4];
        var pair0 = new float[4];
        var pair1 = new float[4];
        float[] p = [0.5f, -0.25f, 2f, 0f, -1f, 0f, 0.125f, 3f];
        fixed (float* pq = q, pk = k, pr = result, pa = acc, pp = p, r0 = pair0, r1 = pair1)
        {
            DecodeAttentionCpuMath.Dot4(pq, pk, dim, dim, pr);
            DecodeAttentionCpuMath.Dot2x4(pq, pq + dim, pk, dim, dim, r0, r1);
            for (int j = 0; j < 4; j++)
            {
                double expected = 0, expected1 = 0;
                for (int d = 0; d < dim; d++)
                {
                    expected += (double)q[d] * k[j * dim + d];
                    expected1 += (double)q[dim + d] * k[j * dim + d];
                }
                Assert.Equal(expected, result[j], 1e-4);
                Assert.Equal(expected, pair0[j], 1e-4);
                Assert.Equal(expected1, pair1[j], 1e-4);
                Assert.Equal(expected, DecodeAttentionCpuMath.Dot(pq, pk + j * dim, dim), 1e-4);
            }
            DecodeAttentionCpuMath.Accumulate4(pa, pp, pk, dim, dim);
            DecodeAttentionCpuMath.Accumulate2x4(pa + 2 * dim, pa + 3 * dim, pp, pp + 4, pk, dim, dim);
        }
        for (int d = 0; d < dim; d++)
        {
            double expected = expectedAcc[d], expected2 = expectedAcc[2 * dim + d], expected3 = expectedAcc[3 * dim + d];
            for (int j = 0; j < 4; j++)
            {
                expected += p[j] * k[j * dim + d];
                expected2 += p[j] * k[j * dim + d];
                expected3 += p[4 + j] * k[j * dim + d];
            }
            Assert.Equal(expected, acc[d], 1e-5);
            Assert.Equal(expected2, acc[2 * dim + d], 1e-5);
            Assert.Equal(expected3, acc[3 * dim + d], 1e-5);
            Assert.Equal(expectedAcc[dim + d], acc[dim + d]); // untouched
        }
    }
}
