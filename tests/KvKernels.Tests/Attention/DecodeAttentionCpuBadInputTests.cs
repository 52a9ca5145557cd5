using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Tests.Attention;

/// <summary>
/// Invalid calls of <see cref="DecodeAttentionCpu.Run{TIn, TOut}"/> throw an <see cref="ArgumentException"/> naming
/// the parameter, before anything is written.
/// </summary>
public sealed class DecodeAttentionCpuBadInputTests
{
    /// <summary>Two sequences, 8 query heads over 2 KV heads, D = 64, paged pool of 4 pages of 16.</summary>
    private static readonly DecodeAttentionSpec Good = new(2, 1, 8, 2, 64, KvCacheShape.Paged(4, 16, 2));

    /// <summary>A call whose buffers are sized for <paramref name="spec"/> unless overridden.</summary>
    private sealed class Call(DecodeAttentionSpec spec)
    {
        public DecodeAttentionSpec Spec = spec;
        public Half[] Query = new Half[Math.Max(0, spec.QueryElements)];
        public Half[] Keys = new Half[Math.Max(0, spec.KeyElements)];
        public Half[] Values = new Half[Math.Max(0, spec.ValueElements)];
        public int[] Lengths = Enumerable.Repeat(Math.Min(5, spec.Cache.MaxTokens), Math.Max(0, spec.Rows)).ToArray();
        public int[] Table = Enumerable.Range(0, (int)Math.Max(0, spec.BlockTableElements)).Select(i => i % Math.Max(1, spec.Cache.NumPages)).ToArray();
        public Half[] Output = new Half[Math.Max(0, spec.OutputElements)];
        public float[] Lse = [];
        public int[] Positions = new int[Math.Max(0, spec.PositionElements)];
        public float[] Slopes = new float[spec.Alibi ? spec.NumQueryHeads : 0];

        public void Invoke() => DecodeAttentionCpu.Run<Half, Half>(Spec, Query, Keys, Values, Lengths, Table, Output, Lse, Positions, Slopes);
    }

    private static Action Spec(DecodeAttentionSpec spec) => new Call(spec).Invoke;

    private static Action With(Action<Call> change, DecodeAttentionSpec? spec = null)
    {
        var call = new Call(spec ?? Good);
        change(call);
        return call.Invoke;
    }

    private static readonly Dictionary<string, (string Param, Func<Action> Make)> Cases = new()
    {
        ["query heads not a multiple of KV heads"] = ("spec", () => Spec(Good with { NumQueryHeads = 9 })),
        ["query heads fewer than KV heads"] = ("spec", () => Spec(Good with { NumQueryHeads = 1 })),
        ["group size 129"] = ("spec", () => Spec(Good with { NumQueryHeads = 258 })),
        ["head dim 60"] = ("spec", () => Spec(Good with { HeadDim = 60 })),
        ["head dim 600"] = ("spec", () => Spec(Good with { HeadDim = 600 })),
        ["value head dim 12"] = ("spec", () => Spec(Good with { ValueHeadDim = 12 })),
        ["query length 0"] = ("spec", () => Spec(Good with { QueryLength = 0 })),
        ["query length 17"] = ("spec", () => Spec(Good with { QueryLength = 17 })),
        ["negative batch"] = ("spec", () => Spec(Good with { BatchSize = -1 })),
        ["window below 0"] = ("spec", () => Spec(Good with { Window = -1 })),
        ["sinks without a window"] = ("spec", () => Spec(Good with { Sinks = 2 })),
        ["NaN scale"] = ("spec", () => Spec(Good with { Scale = float.NaN })),
        ["infinite scale"] = ("spec", () => Spec(Good with { Scale = float.PositiveInfinity })),
        ["negative soft-cap"] = ("spec", () => Spec(Good with { SoftCap = -1 })),
        ["single-head pool without ragged rows"] = ("spec", () => Spec(Good with { Cache = Good.Cache with { PoolKvHeads = 1 } })),
        ["pool of 3 KV heads for 2"] = ("spec", () => Spec(Good with { Cache = Good.Cache with { PoolKvHeads = 3 } })),
        ["odd rotary dim"] = ("spec", () => Spec(Good with { Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, 7) })),
        ["rotary dim beyond the head"] = ("spec", () => Spec(Good with { Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, 66) })),
        ["rope theta 1"] = ("spec", () => Spec(Good with { Rope = new RopeOptions(RopeStyle.Interleaved, 1f) })),
        ["explicit positions without RoPE"] = ("spec", () => Spec(Good with { Rope = new RopeOptions(RopeStyle.None, 10000f, 0, true) })),
        ["key reuse with a value head dim above the key's"] = ("spec", () => Spec(Good with { KeyReuse = true, ValueHeadDim = Good.HeadDim + 8 })),
        ["output type fp32 given fp16 output"] = ("output", () => Spec(Good with { OutputType = AttentionElement.Float32 })),
        ["input type bf16 given fp16 query"] = ("query", () => Spec(Good with { InputType = AttentionElement.BFloat16 })),
        ["input type fp32"] = ("spec", () => Spec(Good with { InputType = AttentionElement.Float32 })),
        ["query too short"] = ("query", () => With(c => c.Query = new Half[c.Query.Length - 1])),
        ["keys too long"] = ("keys", () => With(c => c.Keys = new Half[c.Keys.Length + 8])),
        ["values missing"] = ("values", () => With(c => c.Values = [])),
        ["values given with key reuse"] = ("values", () => With(c => c.Values = new Half[c.Keys.Length], Good with { KeyReuse = true })),
        ["output too short"] = ("output", () => With(c => c.Output = new Half[c.Output.Length - 64])),
        ["lse of the wrong size"] = ("lse", () => With(c => c.Lse = new float[3])),
        ["lengths count"] = ("lengths", () => With(c => c.Lengths = [1])),
        ["block table for contiguous storage"] = ("blockTable", () => With(c => c.Table = [0], Good with { Cache = KvCacheShape.Contiguous(32) })),
        ["block table shape"] = ("blockTable", () => With(c => c.Table = [0, 1, 2])),
        ["positions missing"] = ("positions", () => With(c => c.Positions = [], Good with { Rope = new RopeOptions(RopeStyle.RotateHalf, 10000f, 0, true) })),
        ["positions without explicit positions"] = ("positions", () => With(c => c.Positions = new int[64])),
        ["slopes missing with ALiBi"] = ("alibiSlopes", () => With(c => c.Slopes = [], Good with { Alibi = true })),
        ["slopes without ALiBi"] = ("alibiSlopes", () => With(c => c.Slopes = new float[8])),
        ["length beyond MaxTokens (contiguous)"] = ("lengths", () => With(c => c.Lengths = [33, 1], Good with { Cache = KvCacheShape.Contiguous(32) })),
        ["length beyond the block table (paged)"] = ("lengths", () => With(c => c.Lengths = [33, 1])),
        ["negative length"] = ("lengths", () => With(c => c.Lengths = [-1, 1])),
        ["page index out of range"] = ("blockTable", () => With(c => { c.Table = [0, 4, 1, 2]; c.Lengths = [20, 5]; })),
        ["page -1 in use"] = ("blockTable", () => With(c => { c.Table = [0, -1, 1, 2]; c.Lengths = [20, 1]; })),
    };

    public static TheoryData<string> Names => new(Cases.Keys);

    [Theory]
    [MemberData(nameof(Names))]
    public void InvalidCall_ThrowsArgumentExceptionNamingTheParameter(string name)
    {
        var (param, make) = Cases[name];
        Action call;
        try
        {
            call = make();
        }
        catch (Exception e)
        {
            throw new InvalidOperationException("building the call failed", e);
        }
        var e2 = Assert.ThrowsAny<ArgumentException>(call);
        Assert.Equal(param, e2.ParamName);
        Assert.False(string.IsNullOrWhiteSpace(e2.Message));
    }

    [Fact]
    public void InvalidIndex_WritesNothing()
    {
        var call = new Call(Good);
        call.Table = [0, 4, 1, 2];
        call.Lengths = [20, 3];
        call.Output.AsSpan().Fill(Half.NaN);
        Assert.Throws<ArgumentException>(call.Invoke);
        Assert.All(call.Output, x => Assert.True(Half.IsNaN(x)));
    }

    [Fact]
    public void GoodCall_Succeeds()
    {
        // The baseline every bad call departs from is itself valid.
        new Call(Good).Invoke();
        new Call(Good with { Cache = KvCacheShape.Contiguous(32) }).Invoke();
    }
}
