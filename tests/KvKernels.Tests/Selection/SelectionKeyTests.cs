using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>
/// The 32-bit selection keys (shared by the kernel and the CPU twin): their unsigned order is the oracle's value order
/// for every fp32 bit pattern (NaN worst in both orders, −0 = +0), no real key reaches the forced-token sentinel, and the
/// vectorized conversion equals the scalar one.
/// </summary>
public sealed class SelectionKeyTests
{
    private static float[] Values(int count, int seed)
    {
        var rng = new Random(seed);
        float[] specials = [float.NaN, -float.NaN, BitConverter.UInt32BitsToSingle(0x7F800001), BitConverter.UInt32BitsToSingle(0xFFFFFFFF),
            float.PositiveInfinity, float.NegativeInfinity, 0f, -0f, float.Epsilon, -float.Epsilon, float.MaxValue, float.MinValue, 1f, -1f];
        var values = new float[count];
        for (int i = 0; i < count; i++)
            values[i] = rng.Next(4) == 0 ? specials[rng.Next(specials.Length)] : BitConverter.UInt32BitsToSingle((uint)rng.NextInt64(0, 1L << 32));
        return values;
    }

    [Theory]
    [InlineData(SelectionOrder.Largest)]
    [InlineData(SelectionOrder.Smallest)]
    public void KeyOrder_IsTheOracleOrder_ForEveryBitPattern(SelectionOrder order)
    {
        var values = Values(4000, (int)order + 3);
        bool smallest = order == SelectionOrder.Smallest;
        for (int i = 0; i < values.Length; i++)
        {
            uint ki = SelectionKeys.OrderKey(values[i], smallest);
            Assert.NotEqual(SelectionKeys.Sentinel, ki);
            Assert.Equal(float.IsNaN(values[i]), ki == 0);
            for (int j = i + 1; j < Math.Min(values.Length, i + 40); j++)
            {
                uint kj = SelectionKeys.OrderKey(values[j], smallest);
                // Same index on both sides: the oracle compares values only.
                int better = SelectionOracle.Compare(values[i], 0, values[j], 0, order);
                int byKey = kj.CompareTo(ki);   // a higher key is better, i.e. sorts first
                Assert.True(Math.Sign(better) == Math.Sign(byKey), $"{values[i]:R} (0x{BitConverter.SingleToUInt32Bits(values[i]):X8}) vs {values[j]:R} (0x{BitConverter.SingleToUInt32Bits(values[j]):X8}): oracle {better}, keys {ki:X8} {kj:X8}");
            }
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void VectorKeys_EqualScalarKeys(bool smallest)
    {
        for (int n = 0; n <= 37; n++)
        {
            var values = Values(n, 100 + n);
            var keys = new uint[n];
            SelectionKeys.Keys(values, keys, smallest);
            for (int i = 0; i < n; i++) Assert.Equal(SelectionKeys.OrderKey(values[i], smallest), keys[i]);
        }
    }
}
