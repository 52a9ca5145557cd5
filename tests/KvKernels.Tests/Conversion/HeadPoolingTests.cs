using System.Text.Json.Nodes;
using KvKernels.Conversion;

namespace KvKernels.Tests.Conversion;

/// <summary>MHA → GQA/MQA by mean and weighted pooling: hand-computed cases, the identity, and whole checkpoints.</summary>
public sealed class HeadPoolingTests
{
    // 4 heads × 2 rows × 3 columns, head-major: head 0 rows, head 1 rows, …
    private static readonly float[] W =
    [
        1, 2, 3, 4, 5, 6,
        3, 2, 1, 0, 1, 0,
        -1, -1, -1, 2, 2, 2,
        5, 0, 5, -2, 4, 8,
    ];

    private static float[] Pool(float[] weight, int heads, int rows, int groups, float[] headWeights)
    {
        var result = new float[weight.Length / heads * groups];
        HeadPooling.Pool(weight, heads, rows, groups, headWeights, result);
        return result;
    }

    [Fact]
    public void Mean_pooling_into_two_groups_equals_the_hand_computation() =>
        Assert.Equal([2, 2, 2, 2, 3, 3, 2, -0.5f, 2, 0, 3, 5], Pool(W, 4, 2, 2, []));

    [Fact]
    public void Mean_pooling_into_one_group_is_mqa() =>
        Assert.Equal([2, 0.75f, 2, 1, 3, 4], Pool(W, 4, 2, 1, []));

    [Fact]
    public void Mean_pooling_sums_then_divides() =>
        Assert.Equal([4f / 3f], Pool([1, 1, 2], 3, 1, 1, [])); // one rounding of 4/3, not three of 1/3

    [Fact]
    public void Weighted_pooling_with_one_weight_per_head_equals_the_hand_computation() =>
        Assert.Equal([5, 4, 3, 2, 4, 3, -7, -2, -7, 6, 0, -4], Pool(W, 4, 2, 2, [0.5f, 1.5f, 2f, -1f]));

    [Fact]
    public void Weighted_pooling_with_one_weight_per_head_and_channel_equals_the_hand_computation() =>
        Assert.Equal([1, 2, 3, 0, 1, 0, 1.5f, -1, 1.5f, 1, 4, 6], Pool(W, 4, 2, 2, [1, 0, 0, 1, 1, 1, 0.5f, 0.5f]));

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(8)]
    public void Pooling_with_as_many_groups_as_heads_is_the_identity(int heads)
    {
        var weight = ConversionFixtures.RandomArray(new Random(heads), heads * 5 * 7);
        var pooled = Pool(weight, heads, 5, heads, []);
        Assert.Equal(weight.Select(BitConverter.SingleToInt32Bits), pooled.Select(BitConverter.SingleToInt32Bits));
    }

    [Theory]
    [InlineData(4, 3)]
    [InlineData(4, 0)]
    [InlineData(4, 8)]
    [InlineData(6, 4)]
    public void A_group_count_that_does_not_divide_the_heads_is_an_argument_error(int heads, int groups)
    {
        var e = Assert.Throws<ArgumentException>(() => Pool(new float[heads * 2], heads, 2, groups, []));
        Assert.Equal("groups", e.ParamName);
        Assert.Contains($"divisor of the {heads} KV heads", e.Message);
    }

    [Fact]
    public void Bad_weights_and_sizes_are_argument_errors()
    {
        Assert.Equal("headWeights", Assert.Throws<ArgumentException>(() => Pool(W, 4, 2, 2, [1, 2, 3])).ParamName);
        Assert.Equal("headWeights", Assert.Throws<ArgumentException>(() => Pool(W, 4, 2, 2, [1, float.NaN, 1, 1])).ParamName);
        Assert.Equal("weight", Assert.Throws<ArgumentException>(() => Pool(W[..^1], 4, 2, 2, [])).ParamName);
        Assert.Equal("destination", Assert.Throws<ArgumentException>(() => HeadPooling.Pool(W, 4, 2, 2, [], new float[5])).ParamName);
    }

    /// <summary>
    /// A sharded bf16 GQA checkpoint (8 query heads, 4 KV heads, biases) to 2 KV heads: K and V and their biases are the
    /// group means computed here from the input's values; every other tensor is byte-identical; the config, index and
    /// other files follow.
    /// </summary>
    [Fact]
    public void A_sharded_checkpoint_converts_to_gqa_with_mean_pooling()
    {
        using var dir = new TempDirectory();
        var geo = new AttentionGeometry(Layers: 3, HiddenSize: 16, QueryHeads: 8, KvHeads: 4, HeadDim: 8);
        var input = ConversionFixtures.WriteLlama(dir["in"], geo, SafetensorsDType.BF16, new Random(5), sharded: true, biases: true, integers: true);
        var progress = new List<ConversionProgress>();
        var report = CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2), new SyncProgress(progress.Add));

        var output = ConversionFixtures.ReadAll(dir["out"]);
        Assert.Equal(input.Keys.Order(), output.Keys.Order());
        foreach (var (name, tensor) in input)
        {
            bool pooled = name.Contains(".k_proj.", StringComparison.Ordinal) || name.Contains(".v_proj.", StringComparison.Ordinal);
            if (!pooled)
            {
                Assert.Equal(tensor.Shape, output[name].Tensor.Shape);
                Assert.Equal(tensor.Values, output[name].Values);
                continue;
            }
            int rows = 8, columns = name.EndsWith(".bias", StringComparison.Ordinal) ? 1 : 16;
            var expected = new float[2 * rows * columns];
            for (int g = 0; g < 2; g++)
                for (int i = 0; i < rows * columns; i++)
                    expected[g * rows * columns + i] = (tensor.Values[(2 * g) * rows * columns + i] + tensor.Values[(2 * g + 1) * rows * columns + i]) / 2;
            Assert.Equal(expected, output[name].Values);
            Assert.Equal(SafetensorsDType.BF16, output[name].Tensor.DType);
            Assert.Equal(columns == 1 ? [16L] : [16L, 16L], output[name].Tensor.Shape);
        }

        var config = JsonNode.Parse(File.ReadAllText(dir["out/config.json"]))!.AsObject();
        Assert.Equal(2, (int)config["num_key_value_heads"]!);
        Assert.Equal(8, (int)config["num_attention_heads"]!);
        Assert.Equal("LlamaForCausalLM", (string)config["architectures"]![0]!);
        Assert.Equal(File.ReadAllText(dir["in/tokenizer.json"]), File.ReadAllText(dir["out/tokenizer.json"]));
        var index = JsonNode.Parse(File.ReadAllText(dir["out/" + Checkpoint.IndexFileName]))!.AsObject();
        Assert.Equal(output.Values.Sum(t => t.Tensor.ByteLength), (long)index["metadata"]!["total_size"]!);
        Assert.Equal(output.Count, index["weight_map"]!.AsObject().Count);
        Assert.Equal(["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", Checkpoint.IndexFileName, "tokenizer.json"],
            Directory.EnumerateFiles(dir["out"]).Select(Path.GetFileName).Order(StringComparer.Ordinal));

        Assert.Equal(3L * 4 * (8 + 8) * 2, report.CacheBytesPerTokenBefore);
        Assert.Equal(3L * 2 * (8 + 8) * 2, report.CacheBytesPerTokenAfter);
        Assert.Equal(3, progress[^1].LayersDone);
        Assert.Equal(Enumerable.Range(0, 4), progress.Select(p => p.LayersDone).Distinct());
    }

    [Fact]
    public void Weighted_pooling_reads_its_weights_from_a_file()
    {
        using var dir = new TempDirectory();
        var geo = new AttentionGeometry(Layers: 2, HiddenSize: 8, QueryHeads: 4, KvHeads: 4, HeadDim: 8);
        var input = ConversionFixtures.WriteLlama(dir["in"], geo, SafetensorsDType.F32, new Random(9));
        float[] keyWeights = [0.25f, 0.75f, 2f, -1f];
        float[] valueWeights = Enumerable.Range(0, 32).Select(i => 0.125f * (i % 5)).ToArray(); // per head and channel
        ConversionFixtures.WriteFile(dir["weights.safetensors"],
        [
            new("model.layers.0.self_attn.k_head_weights", SafetensorsDType.F32, [4], keyWeights),
            new("model.layers.0.self_attn.v_head_weights", SafetensorsDType.F32, [4, 8], valueWeights),
        ]);
        var options = new GqaConversionOptions(2).WithHeadWeightsFrom(dir["weights.safetensors"], geo.Layers);
        CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], options);
        var output = ConversionFixtures.ReadAll(dir["out"]);

        for (int layer = 0; layer < 2; layer++)
        {
            var k = input[$"model.layers.{layer}.self_attn.k_proj.weight"].Values;
            var v = input[$"model.layers.{layer}.self_attn.v_proj.weight"].Values;
            var kOut = output[$"model.layers.{layer}.self_attn.k_proj.weight"].Values;
            var vOut = output[$"model.layers.{layer}.self_attn.v_proj.weight"].Values;
            for (int g = 0; g < 2; g++)
                for (int r = 0; r < 8; r++)
                    for (int c = 0; c < 8; c++)
                    {
                        int h0 = 2 * g, h1 = 2 * g + 1;
                        float k0 = k[(h0 * 8 + r) * 8 + c], k1 = k[(h1 * 8 + r) * 8 + c], v0 = v[(h0 * 8 + r) * 8 + c], v1 = v[(h1 * 8 + r) * 8 + c];
                        float kExpected = layer == 0 ? keyWeights[h0] * k0 + keyWeights[h1] * k1 : (k0 + k1) / 2;
                        float vExpected = layer == 0 ? valueWeights[h0 * 8 + r] * v0 + valueWeights[h1 * 8 + r] * v1 : (v0 + v1) / 2;
                        Assert.Equal(kExpected, kOut[(g * 8 + r) * 8 + c], 6);
                        Assert.Equal(vExpected, vOut[(g * 8 + r) * 8 + c], 6);
                    }
        }
    }

    /// <summary>IProgress that reports on the calling thread (Progress&lt;T&gt; posts to the thread pool).</summary>
    internal sealed class SyncProgress(Action<ConversionProgress> report) : IProgress<ConversionProgress>
    {
        public void Report(ConversionProgress value) => report(value);
    }
}
