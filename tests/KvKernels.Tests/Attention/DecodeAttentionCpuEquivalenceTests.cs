using System.Runtime.InteropServices;
using KvKernels.Attention;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary>
/// Identities the CPU twin must satisfy between differently expressed calls of the same attention: key reuse against
/// explicit values, RoPE on the fly against pre-rotated keys, cross-layer sharing of one cache, paged against
/// contiguous storage, prefix-shared pages.
/// </summary>
public sealed class DecodeAttentionCpuEquivalenceTests
{
    private static readonly int[] Lengths = [0, 1, 17, 40, 33];

    private static DecodeAttentionSpec Paged(KvLayout layout, int group = 4, int headDim = 64) =>
        new(Lengths.Length, 2, 2 * group, 2, headDim, KvCacheShape.Paged(20, 8, 6, layout)) { OutputType = AttentionElement.Float32 };

    private static float[] RunFloat<T>(in DecodeAttentionSpec spec, T[] query, T[] keys, T[] values, int[] lengths, int[] table,
        int[]? positions = null, float[]? lse = null) where T : unmanaged
    {
        var output = AttentionElements.Poisoned<float>(spec.OutputElements);
        DecodeAttentionCpu.Run<T, float>(spec, query, keys, values, lengths, table, output, lse ?? [], positions ?? []);
        return output;
    }

    [Theory]
    [InlineData(RopeStyle.None, KvLayout.Nhd)]
    [InlineData(RopeStyle.RotateHalf, KvLayout.Hnd)]
    [InlineData(RopeStyle.Interleaved, KvLayout.Nhd)]
    public void KeyReuse_EqualsExplicitValuesThatCopyTheUnrotatedKeys(RopeStyle rope, KvLayout layout)
    {
        var spec = Paged(layout) with { KeyReuse = true, Rope = new RopeOptions(rope), Window = 20, Sinks = 2 };
        var data = AttentionData<Half>.Create(spec, new Random(11), Lengths);
        var reuse = RunFloat(spec, data.Query, data.Keys, [], data.Lengths, data.BlockTable);

        // The same call with values: a copy of the key storage (never rotated: RoPE applies to scores only).
        var plain = spec with { KeyReuse = false };
        var explicitValues = RunFloat(plain, data.Query, data.Keys, (Half[])data.Keys.Clone(), data.Lengths, data.BlockTable);

        Assert.Equal(explicitValues, reuse);
        AttentionCases.AssertClose<float>(reuse, data.Expected().Output, 1e-5, "key reuse");
    }

    [Theory]
    [InlineData(RopeStyle.RotateHalf, 0, false)]
    [InlineData(RopeStyle.RotateHalf, 32, true)]
    [InlineData(RopeStyle.Interleaved, 0, true)]
    [InlineData(RopeStyle.Interleaved, 48, false)]
    public void RopeOnTheFly_EqualsPreRotatedKeys(RopeStyle style, int rotaryDim, bool explicitPositions)
    {
        Check<Half>(2e-3);
        Check<BFloat16>(1e-2);

        void Check<T>(double tolerance) where T : unmanaged
        {
            var spec = Paged(KvLayout.Nhd) with
            {
                InputType = typeof(T) == typeof(Half) ? AttentionElement.Float16 : AttentionElement.BFloat16,
                Rope = new RopeOptions(style, 10000f, rotaryDim, explicitPositions),
            };
            var data = AttentionData<T>.Create(spec, new Random(rotaryDim + (explicitPositions ? 1 : 0)), Lengths);
            var onTheFly = RunFloat(spec, data.Query, data.Keys, data.Values, data.Lengths, data.BlockTable, data.Positions);

            // Rotate every stored key on the host in fp32 (the spec's angles), store it back in T, then run without RoPE.
            var rotated = (T[])data.Keys.Clone();
            int rd = spec.RotaryDim;
            for (int r = 0; r < spec.Rows; r++)
                for (int n = 0; n < data.Lengths[r]; n++)
                {
                    int page = data.BlockTable[r * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize];
                    int position = explicitPositions ? data.Positions[r * spec.Cache.MaxTokens + n] : n;
                    for (int head = 0; head < spec.NumKvHeads; head++)
                    {
                        long offset = spec.StorageOffset(r, n, page, head, spec.HeadDim);
                        for (int pair = 0; pair < rd / 2; pair++)
                        {
                            float angle = position * AttentionOracle.InverseFrequency(spec, pair);
                            float cos = (float)Math.Cos(angle), sin = (float)Math.Sin(angle);
                            (long a, long c) = style == RopeStyle.RotateHalf ? (offset + pair, offset + pair + rd / 2) : (offset + 2 * pair, offset + 2 * pair + 1);
                            float x = (float)AttentionElements.ToDouble(data.Keys[a]), y = (float)AttentionElements.ToDouble(data.Keys[c]);
                            rotated[a] = AttentionElements.FromFloat<T>(x * cos - y * sin);
                            rotated[c] = AttentionElements.FromFloat<T>(x * sin + y * cos);
                        }
                    }
                }
            var preRotated = RunFloat(spec with { Rope = default }, data.Query, rotated, data.Values, data.Lengths, data.BlockTable);

            double error = AttentionElements.RelativeError<float>(onTheFly, preRotated.Select(x => (double)x).ToArray());
            Assert.True(error < tolerance, $"{typeof(T).Name}: on the fly vs pre-rotated, relative error {error:E3}.");
            AttentionCases.AssertClose<float>(onTheFly, data.Expected().Output, 1e-5, "RoPE on the fly vs oracle");
        }
    }

    [Fact]
    public void CrossLayerSharing_TwoLayersReadOneCache_EachEqualsItsOwnRun()
    {
        // CLA/YOCO: two layers with different queries attend over the same key/value buffers (the same spans).
        var spec = Paged(KvLayout.Hnd, group: 8) with
        {
            InputType = AttentionElement.BFloat16, Rope = new RopeOptions(RopeStyle.RotateHalf), Window = 25,
        };
        var layer1 = AttentionData<BFloat16>.Create(spec, new Random(21), Lengths);
        var query2 = AttentionData<BFloat16>.Create(spec, new Random(22), Lengths).Query;
        var keysBefore = (BFloat16[])layer1.Keys.Clone();
        var valuesBefore = (BFloat16[])layer1.Values.Clone();

        var shared1 = RunFloat(spec, layer1.Query, layer1.Keys, layer1.Values, layer1.Lengths, layer1.BlockTable);
        var shared2 = RunFloat(spec, query2, layer1.Keys, layer1.Values, layer1.Lengths, layer1.BlockTable);

        // The cache is read only, and each layer's result equals a run on its own copy of the cache.
        Assert.True(PagingCasesBytes(keysBefore, layer1.Keys) && PagingCasesBytes(valuesBefore, layer1.Values), "the cache was written");
        var own1 = RunFloat(spec, layer1.Query, (BFloat16[])keysBefore.Clone(), (BFloat16[])valuesBefore.Clone(), layer1.Lengths, layer1.BlockTable);
        var own2 = RunFloat(spec, query2, (BFloat16[])keysBefore.Clone(), (BFloat16[])valuesBefore.Clone(), layer1.Lengths, layer1.BlockTable);
        Assert.Equal(own1, shared1);
        Assert.Equal(own2, shared2);
        Assert.NotEqual(shared1, shared2);
        AttentionCases.AssertClose<float>(shared1, layer1.Expected().Output, 1e-5, "layer 1");
    }

    private static bool PagingCasesBytes<T>(T[] a, T[] b) where T : unmanaged =>
        MemoryMarshal.AsBytes(a.AsSpan()).SequenceEqual(MemoryMarshal.AsBytes(b.AsSpan()));

    [Theory]
    [InlineData(KvLayout.Nhd, false)]
    [InlineData(KvLayout.Hnd, false)]
    [InlineData(KvLayout.Nhd, true)]
    [InlineData(KvLayout.Hnd, true)]
    public void Paged_EqualsContiguous_OnTheSameData(KvLayout layout, bool ragged)
    {
        var spec = Paged(layout) with { Ragged = ragged, Alibi = true, SoftCap = 10 };
        int[] lengths = ragged ? [.. Lengths, .. Lengths.Reverse()] : Lengths;
        var data = AttentionData<Half>.Create(spec with { Cache = KvCacheShape.Paged(40, 8, 6, layout) }, new Random(31), lengths);
        spec = data.Spec;

        // Gather the pages into a dense [rows, MaxTokens, Hkv, D] (or HND) buffer with the spec's own addressing.
        var contiguous = spec with { Cache = KvCacheShape.Contiguous(spec.Cache.MaxTokens, layout) };
        var keys = AttentionElements.Poisoned<Half>(contiguous.KeyElements);
        var values = AttentionElements.Poisoned<Half>(contiguous.ValueElements);
        for (int r = 0; r < spec.Rows; r++)
            for (int n = 0; n < lengths[r]; n++)
            {
                int page = data.BlockTable[r * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize];
                for (int head = 0; head < spec.NumKvHeads; head++)
                {
                    Array.Copy(data.Keys, spec.StorageOffset(r, n, page, head, 64), keys, contiguous.StorageOffset(r, n, 0, head, 64), 64);
                    Array.Copy(data.Values, spec.StorageOffset(r, n, page, head, 64), values, contiguous.StorageOffset(r, n, 0, head, 64), 64);
                }
            }

        var paged = new float[spec.OutputElements];
        var dense = new float[spec.OutputElements];
        var pagedLse = new float[spec.LseElements];
        var denseLse = new float[spec.LseElements];
        DecodeAttentionCpu.Run<Half, float>(spec, data.Query, data.Keys, data.Values, lengths, data.BlockTable, paged, pagedLse, [], data.AlibiSlopes);
        DecodeAttentionCpu.Run<Half, float>(contiguous, data.Query, keys, values, lengths, [], dense, denseLse, [], data.AlibiSlopes);

        // Same tokens in the same order: the same arithmetic, bit for bit.
        Assert.Equal(dense, paged);
        Assert.Equal(denseLse, pagedLse);
        AttentionCases.AssertClose<float>(paged, data.Expected().Output, 1e-5, "paged");
    }

    [Theory]
    [InlineData(KvLayout.Nhd, 1)]
    [InlineData(KvLayout.Hnd, 5)]
    public void PrefixSharedPages_MatchOracle_AndEqualRowsGiveEqualOutputs(KvLayout layout, int queryLength)
    {
        // Every sequence reads sequence 0's pages; with equal queries they must give identical outputs.
        var spec = new DecodeAttentionSpec(3, queryLength, 8, 2, 128, KvCacheShape.Paged(8, 16, 4, layout)) { OutputType = AttentionElement.Float32 };
        var data = AttentionData<Half>.Create(spec, new Random(41 + queryLength), [50, 50, 50], sharePages: true);
        long perSequence = spec.QueryElements / 3;
        Array.Copy(data.Query, 0, data.Query, perSequence, perSequence);
        var output = RunFloat(spec, data.Query, data.Keys, data.Values, data.Lengths, data.BlockTable);

        long outPerSequence = spec.OutputElements / 3;
        Assert.Equal(output.AsSpan(0, (int)outPerSequence).ToArray(), output.AsSpan((int)outPerSequence, (int)outPerSequence).ToArray());
        AttentionCases.AssertClose<float>(output, data.Expected().Output, 1e-5, "shared pages");
    }
}
