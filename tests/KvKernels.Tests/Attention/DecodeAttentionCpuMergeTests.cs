using KvKernels.Attention;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Attention;

/// <summary><see cref="DecodeAttentionCpu.MergeStates{T}"/> against the oracle's merge, and as the split-KV identity.</summary>
public sealed class DecodeAttentionCpuMergeTests
{
    /// <summary>Random states: outputs ~N(0,1), LSEs spread over ±30 so weights span many orders, some rows empty.</summary>
    private static (T[] Output, float[] Lse) State<T>(Random random, int rows, int dim, double emptyFraction) where T : unmanaged
    {
        var output = new T[(long)rows * dim];
        var lse = new float[rows];
        for (int r = 0; r < rows; r++)
        {
            bool empty = random.NextDouble() < emptyFraction;
            lse[r] = empty ? float.NegativeInfinity : (float)(random.NextDouble() * 60 - 30);
            for (int d = 0; d < dim; d++)
                output[(long)r * dim + d] = AttentionElements.FromFloat<T>(empty ? 0 : (float)(random.NextDouble() * 4 - 2));
        }
        return (output, lse);
    }

    private static double[] Doubles(float[] values) => values.Select(x => (double)x).ToArray();

    public static TheoryData<string, int, int> Shapes()
    {
        var data = new TheoryData<string, int, int>();
        foreach (string type in new[] { "fp16", "bf16", "fp32" })
        {
            data.Add(type, 37, 128);
            data.Add(type, 5, 1);
            data.Add(type, 3, 1024);
        }
        data.Add("fp32", 2200, 512); // over 2^20 elements: the parallel path
        data.Add("fp16", 0, 64);
        return data;
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void MatchesOracle(string type, int rows, int dim)
    {
        switch (type)
        {
            case "fp16": Check<Half>(2e-3); break;
            case "bf16": Check<BFloat16>(1e-2); break;
            default: Check<float>(1e-6); break;
        }

        void Check<T>(double tolerance) where T : unmanaged
        {
            var random = new Random(rows * 7 + dim);
            var (a, lseA) = State<T>(random, rows, dim, 0.2);
            var (b, lseB) = State<T>(random, rows, dim, 0.2);
            var output = AttentionElements.Poisoned<T>((long)rows * dim);
            var lse = AttentionElements.Poisoned<float>(rows);
            DecodeAttentionCpu.MergeStates<T>(new MergeStatesSpec(rows, dim), a, lseA, b, lseB, output, lse);

            var expected = new double[(long)rows * dim];
            var expectedLse = new double[rows];
            AttentionOracle.Merge(rows, dim, AttentionElements.ToDoubles<T>(a), Doubles(lseA), AttentionElements.ToDoubles<T>(b), Doubles(lseB),
                expected, expectedLse);
            AttentionCases.AssertClose<T>(output, expected, tolerance, "merged output");
            AttentionCases.AssertClose<float>(lse, expectedLse, 1e-6, "merged lse");
        }
    }

    [Fact]
    public void EmptyStates_AreIdentity_AndTheirOutputsAreNeverRead()
    {
        const int rows = 3, dim = 8;
        var random = new Random(1);
        var (a, lseA) = State<float>(random, rows, dim, 0);
        // b: every row empty, with garbage (NaN, ∞) where an empty state's output would be.
        var b = Enumerable.Range(0, rows * dim).Select(i => i % 2 == 0 ? float.NaN : float.PositiveInfinity).ToArray();
        float[] lseB = [float.NegativeInfinity, float.NegativeInfinity, float.NegativeInfinity];
        var output = new float[rows * dim];
        var lse = new float[rows];

        DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(rows, dim), a, lseA, b, lseB, output, lse);
        Assert.Equal(a, output);
        Assert.Equal(lseA, lse);

        DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(rows, dim), b, lseB, a, lseA, output, lse);
        Assert.Equal(a, output);
        Assert.Equal(lseA, lse);

        DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(rows, dim), b, lseB, (float[])b.Clone(), lseB, output, lse);
        Assert.All(output, x => Assert.Equal(0f, x));
        Assert.All(lse, x => Assert.Equal(float.NegativeInfinity, x));
    }

    [Fact]
    public void IsAssociativeAndCommutative_InFp32()
    {
        const int rows = 64, dim = 96;
        var random = new Random(2);
        var (a, la) = State<float>(random, rows, dim, 0.1);
        var (b, lb) = State<float>(random, rows, dim, 0.1);
        var (c, lc) = State<float>(random, rows, dim, 0.1);
        var spec = new MergeStatesSpec(rows, dim);
        (float[] O, float[] L) Merge((float[] O, float[] L) x, (float[] O, float[] L) y)
        {
            var o = new float[rows * dim];
            var l = new float[rows];
            DecodeAttentionCpu.MergeStates<float>(spec, x.O, x.L, y.O, y.L, o, l);
            return (o, l);
        }

        var left = Merge(Merge((a, la), (b, lb)), (c, lc));
        var right = Merge((a, la), Merge((b, lb), (c, lc)));
        var swapped = Merge((c, lc), Merge((b, lb), (a, la)));
        AttentionCases.AssertClose<float>(left.O, right.O.Select(x => (double)x).ToArray(), 1e-6, "(a∘b)∘c vs a∘(b∘c)");
        AttentionCases.AssertClose<float>(left.L, Doubles(right.L), 1e-6, "lse (a∘b)∘c vs a∘(b∘c)");
        AttentionCases.AssertClose<float>(swapped.O, left.O.Select(x => (double)x).ToArray(), 1e-6, "c∘(b∘a)");
    }

    [Theory]
    [InlineData(40, 17)]
    [InlineData(100, 64)]
    [InlineData(9, 0)]
    public void SplitKv_MergeOfTwoHalves_EqualsTheWholeContext(int length, int split)
    {
        // One query token, no window: attention over keys [0, L) is the merge of attention over [0, split) and
        // [split, L), each run as its own context.
        const int d = 128;
        var spec = new DecodeAttentionSpec(1, 1, 8, 2, d, KvCacheShape.Contiguous(length)) { OutputType = AttentionElement.Float32 };
        var whole = AttentionData<Half>.Create(spec, new Random(length), [length]);
        var full = new float[spec.OutputElements];
        var fullLse = new float[spec.LseElements];
        DecodeAttentionCpu.Run<Half, float>(spec, whole.Query, whole.Keys, whole.Values, [length], [], full, fullLse);

        (float[] O, float[] L) Part(int start, int count)
        {
            var part = spec with { Cache = KvCacheShape.Contiguous(count) };
            var keys = new Half[part.KeyElements];
            var values = new Half[part.ValueElements];
            int token = 2 * d; // NHD: one token is Hkv · D elements
            Array.Copy(whole.Keys, start * token, keys, 0, count * token);
            Array.Copy(whole.Values, start * token, values, 0, count * token);
            var o = new float[spec.OutputElements];
            var l = new float[spec.LseElements];
            DecodeAttentionCpu.Run<Half, float>(part, whole.Query, keys, values, [count], [], o, l);
            return (o, l);
        }

        var first = Part(0, split);
        var second = Part(split, length - split);
        var merged = new float[spec.OutputElements];
        var mergedLse = new float[spec.LseElements];
        DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(8, d), first.O, first.L, second.O, second.L, merged, mergedLse);

        AttentionCases.AssertClose<float>(merged, full.Select(x => (double)x).ToArray(), 1e-5, "merged halves");
        AttentionCases.AssertClose<float>(mergedLse, Doubles(fullLse), 1e-6, "merged lse");
    }

    public static TheoryData<string> BadCalls => new(BadCallsByName.Keys);

    private static readonly Dictionary<string, (string Param, Action Call)> BadCallsByName = new()
    {
        ["rows negative"] = ("spec", () => Merge<float>(new MergeStatesSpec(-1, 8), 0, 0)),
        ["head dim 0"] = ("spec", () => Merge<float>(new MergeStatesSpec(1, 0), 0, 0)),
        ["head dim 1025"] = ("spec", () => Merge<float>(new MergeStatesSpec(1, 1025), 1025, 1)),
        ["element type double"] = ("output", () => Merge<double>(new MergeStatesSpec(1, 8), 8, 1)),
        ["outputA short"] = ("outputA", () => DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(2, 8), new float[15], new float[2], new float[16], new float[2], new float[16], new float[2])),
        ["lseB long"] = ("lseB", () => DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(2, 8), new float[16], new float[2], new float[16], new float[3], new float[16], new float[2])),
        ["output aliases outputA"] = ("output", () => { var a = new float[16]; DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(2, 8), a, new float[2], new float[16], new float[2], a, new float[2]); }),
        ["lse aliases lseB"] = ("lse", () => { var l = new float[2]; DecodeAttentionCpu.MergeStates<float>(new MergeStatesSpec(2, 8), new float[16], new float[2], new float[16], l, new float[16], l); }),
    };

    private static void Merge<T>(MergeStatesSpec spec, int elements, int rows) where T : unmanaged =>
        DecodeAttentionCpu.MergeStates<T>(spec, new T[elements], new float[rows], new T[elements], new float[rows], new T[elements], new float[rows]);

    [Theory]
    [MemberData(nameof(BadCalls))]
    public void InvalidCall_ThrowsArgumentExceptionNamingTheParameter(string name)
    {
        var (param, call) = BadCallsByName[name];
        var e = Assert.ThrowsAny<ArgumentException>(call);
        Assert.Equal(param, e.ParamName);
    }
}
