using KvKernels.Attention;
using KvKernels.Selection;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Selection;

/// <summary>StreamingLLM's sink + ring cache: slots and positions by simulation, and decode attention over the ring
/// (storage order, explicit RoPE positions) against attention over the same tokens laid out in stream order.</summary>
public sealed class StreamingLlmTests
{
    [Theory]
    [InlineData(4, 7)]
    [InlineData(0, 5)]
    [InlineData(3, 1)]
    public void SlotsAndPositions_MatchASimulatedStream(int sinks, int window)
    {
        var spec = new StreamingLlmSpec(sinks, window);
        var storage = new List<long>();
        for (long p = 0; p < 40; p++)
        {
            int slot = spec.Slot(p);
            if (slot == storage.Count) storage.Add(p);
            else storage[slot] = p;
            long seen = p + 1;
            Assert.Equal(storage.Count, spec.Length(seen));
            var positions = new int[storage.Count];
            spec.FillPositions(seen, StreamingPositions.Original, positions);
            for (int s = 0; s < storage.Count; s++)
            {
                Assert.Equal(storage[s], spec.PositionAt(s, seen));
                Assert.Equal(storage[s], positions[s]);
            }
            // Cache positions: each stored token's rank in stream order.
            spec.FillPositions(seen, StreamingPositions.CacheIndex, positions);
            var ranks = storage.Select(x => storage.Count(y => y < x)).ToArray();
            Assert.Equal(ranks, positions);
            // The kept set is the sinks and the last `window` tokens.
            var kept = Enumerable.Range(0, (int)seen).Select(x => (long)x).Where(x => x < sinks || x >= seen - window).ToHashSet();
            Assert.True(kept.SetEquals(storage));
        }
    }

    [Fact]
    public void RingAttention_EqualsStreamOrderAttention()
    {
        var spec = new StreamingLlmSpec(3, 8);
        const int tokens = 50, hkv = 2, hq = 4, d = 32;
        var rng = new Random(12);
        // Pre-RoPE keys of every stream position (RoPE is applied in attention at the cache positions).
        var streamK = new Half[tokens * hkv * d];
        var streamV = new Half[tokens * hkv * d];
        for (int i = 0; i < streamK.Length; i++)
        {
            streamK[i] = (Half)(float)(rng.NextDouble() * 2 - 1);
            streamV[i] = (Half)(float)(rng.NextDouble() * 2 - 1);
        }
        var query = Enumerable.Range(0, hq * d).Select(_ => (Half)(float)(rng.NextDouble() * 2 - 1)).ToArray();

        // The ring storage after the whole stream: one contiguous row of Capacity tokens.
        int capacity = spec.Capacity, length = spec.Length(tokens);
        var ringK = new Half[capacity * hkv * d];
        var ringV = new Half[capacity * hkv * d];
        for (int p = 0; p < tokens; p++)
        {
            int slot = spec.Slot(p);
            Array.Copy(streamK, p * hkv * d, ringK, slot * hkv * d, hkv * d);
            Array.Copy(streamV, p * hkv * d, ringV, slot * hkv * d, hkv * d);
        }
        var positions = new int[capacity];
        spec.FillPositions(tokens, StreamingPositions.CacheIndex, positions);
        var ringSpec = new DecodeAttentionSpec(1, 1, hq, hkv, d, KvCacheShape.Contiguous(capacity))
        {
            InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32,
            Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, ExplicitPositions: true),
        };
        var actual = new float[hq * d];
        DecodeAttentionCpu.Run<Half, float>(ringSpec, query, ringK, ringV, [length], [], actual, positions: positions);

        // The same tokens in stream order (sinks, then the last window), positions = their index.
        var kept = Enumerable.Range(0, tokens).Where(p => p < spec.Sinks || p >= tokens - spec.Window).ToArray();
        var orderedK = kept.SelectMany(p => streamK.Skip(p * hkv * d).Take(hkv * d)).ToArray();
        var orderedV = kept.SelectMany(p => streamV.Skip(p * hkv * d).Take(hkv * d)).ToArray();
        var orderedSpec = ringSpec with { Cache = KvCacheShape.Contiguous(kept.Length), Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f) };
        var expected = new float[hq * d];
        DecodeAttentionCpu.Run<Half, float>(orderedSpec, query, orderedK, orderedV, [kept.Length], [], expected);
        Assert.InRange(AttentionElements.RelativeError<float>(actual, expected.Select(x => (double)x).ToArray()), 0, 1e-5);
    }

    [Fact]
    public void BadInput_IsRejected()
    {
        Assert.Equal("spec", Assert.Throws<ArgumentException>(() => new StreamingLlmSpec(2, 0).Validate()).ParamName);
        Assert.Equal("spec", Assert.Throws<ArgumentException>(() => new StreamingLlmSpec(-1, 4).Validate()).ParamName);
        Assert.Equal("positions", Assert.Throws<ArgumentException>(() => new StreamingLlmSpec(2, 4).FillPositions(10, StreamingPositions.Original, new int[5])).ParamName);
        Assert.Throws<ArgumentOutOfRangeException>(() => new StreamingLlmSpec(2, 4).Slot(-1));
    }
}
