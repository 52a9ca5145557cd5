using System.Text.Json.Nodes;
using KvKernels.Attention;
using KvKernels.Conversion;

namespace KvKernels.Tests.Conversion;

/// <summary>
/// Whole-checkpoint conversions end to end (SVD with a calibration file, single files) and bad input: missing tensors,
/// wrong shapes, group counts that do not divide the heads, failures in the middle of a conversion — each a clear error
/// naming the tensor, and never a half-written output.
/// </summary>
public sealed class CheckpointConversionTests
{
    private static readonly AttentionGeometry Geo = new(Layers: 2, HiddenSize: 32, QueryHeads: 4, KvHeads: 4, HeadDim: 8);

    private static void WriteCalibration(string path, int layers, int tokens, int hidden, int seed, int skipLayer = -1)
    {
        var random = new Random(seed);
        var tensors = new List<FixtureTensor>();
        for (int i = 0; i < layers; i++)
            if (i != skipLayer)
                tensors.Add(new FixtureTensor($"model.layers.{i}.self_attn.input", SafetensorsDType.F16, [2, tokens / 2, hidden],
                    ConversionFixtures.Round(ConversionFixtures.RandomArray(random, (long)tokens * hidden), SafetensorsDType.F16)));
        ConversionFixtures.WriteFile(path, tensors);
    }

    private static AttentionWeights LayerWeights(IReadOnlyDictionary<string, (SafetensorsTensor Tensor, float[] Values, byte[] Bytes)> t, int layer)
    {
        string p = $"model.layers.{layer}.self_attn.";
        return new AttentionWeights(t[p + "q_proj.weight"].Values, t[p + "k_proj.weight"].Values, t[p + "v_proj.weight"].Values, t[p + "o_proj.weight"].Values)
        {
            QueryBias = t.TryGetValue(p + "q_proj.bias", out var qb) ? qb.Values : null,
            KeyBias = t.TryGetValue(p + "k_proj.bias", out var kb) ? kb.Values : null,
            ValueBias = t.TryGetValue(p + "v_proj.bias", out var vb) ? vb.Values : null,
        };
    }

    /// <summary>
    /// A rotate-half fp32 checkpoint with biases, 4 → 2 KV heads, calibration activations from an fp16 file ([2, 48, hidden]
    /// per layer): the written weights are the fold of the bases fitted on exactly those activations, the config says 2
    /// KV heads, the report gives each layer's retained energy and half the cache bytes.
    /// </summary>
    [Fact]
    public void Svd_conversion_of_a_checkpoint_folds_the_bases_fitted_on_the_calibration_file()
    {
        using var dir = new TempDirectory();
        ConversionFixtures.WriteLlama(dir["in"], Geo, SafetensorsDType.F32, new Random(3), biases: true);
        WriteCalibration(dir["calibration.safetensors"], Geo.Layers, 96, 32, seed: 4);
        ConversionReport report;
        using (var calibration = new SafetensorsCalibration(dir["calibration.safetensors"], batchTokens: 40))
            report = CheckpointConverter.CompressWithSvd(dir["in"], dir["out"], new SvdConversionOptions(new KvCompressionOptions(2)), calibration);

        var input = ConversionFixtures.ReadAll(dir["in"]);
        var output = ConversionFixtures.ReadAll(dir["out"]);
        var geo = Geo with { Rope = RopeStyle.RotateHalf }; // what a Hugging Face Llama config implies
        using var file = SafetensorsFile.Open(dir["calibration.safetensors"]);
        for (int layer = 0; layer < Geo.Layers; layer++)
        {
            var weights = LayerWeights(input, layer);
            var moments = new KvCovariance(geo, 2);
            var activations = file.ReadSingles(file.Get($"model.layers.{layer}.self_attn.input"));
            foreach (int start in new[] { 0, 40, 80 }) // the calibration source's batches of 40 tokens
            {
                int n = Math.Min(40, 96 - start);
                moments.AddActivations(activations.AsSpan(start * 32, n * 32), n, weights);
            }
            var bases = KvHeadBases.Fit(moments, new KvCompressionOptions(2));
            var expected = KvHeadCompression.Fold(bases, weights);
            var written = LayerWeights(output, layer);
            Assert.Equal(expected.Query, written.Query);
            Assert.Equal(expected.Key, written.Key);
            Assert.Equal(expected.Value, written.Value);
            Assert.Equal(expected.Output, written.Output);
            Assert.Equal(expected.QueryBias, written.QueryBias);
            Assert.Equal(expected.KeyBias, written.KeyBias);
            Assert.Equal(expected.ValueBias, written.ValueBias);
            Assert.Equal(bases.KeyEnergy, report.Energy[layer].KeyEnergy, 12);
            Assert.Equal(bases.ValueEnergy, report.Energy[layer].ValueEnergy, 12);
            Assert.InRange(report.Energy[layer].KeyEnergy, 0.3, 1.0);
            Assert.Equal(96, report.Energy[layer].CalibrationTokens);
        }
        Assert.Equal([16L, 32L], output["model.layers.1.self_attn.k_proj.weight"].Tensor.Shape);
        Assert.Equal([32L, 32L], output["model.layers.1.self_attn.q_proj.weight"].Tensor.Shape);
        Assert.Equal(input["model.layers.1.mlp.up_proj.weight"].Bytes, output["model.layers.1.mlp.up_proj.weight"].Bytes);
        var config = JsonNode.Parse(File.ReadAllText(dir["out/config.json"]))!.AsObject();
        Assert.Equal(2, (int)config["num_key_value_heads"]!);
        Assert.Equal(8, (int)config["head_dim"]!);
        Assert.Equal(2 * report.CacheBytesPerTokenAfter, report.CacheBytesPerTokenBefore);
    }

    [Fact]
    public void A_single_file_converts_with_a_given_geometry()
    {
        using var dir = new TempDirectory();
        var tensors = ConversionFixtures.WriteLlama(dir["model"], Geo, SafetensorsDType.F16, new Random(6), integers: true);
        File.Move(dir["model/model.safetensors"], dir["alone.safetensors"]);
        Assert.Throws<ArgumentException>(() => CheckpointConverter.ConvertToGqa(dir["alone.safetensors"], dir["gqa.safetensors"], new GqaConversionOptions(1)));
        var report = CheckpointConverter.ConvertToGqa(dir["alone.safetensors"], dir["gqa.safetensors"], new GqaConversionOptions(1) { Geometry = Geo });
        using var file = SafetensorsFile.Open(dir["gqa.safetensors"]);
        var k = file.ReadSingles(file.Get("model.layers.0.self_attn.k_proj.weight"));
        var source = tensors["model.layers.0.self_attn.k_proj.weight"].Values;
        Assert.Equal(8 * 32, k.Length);
        Assert.Equal((float)(Half)((source[5] + source[256 + 5] + source[512 + 5] + source[768 + 5]) / 4), k[5]);
        Assert.Contains("gqa mean pooling", file.Metadata["kvkernels.conversion"]);
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal(4 * report.CacheBytesPerTokenAfter, report.CacheBytesPerTokenBefore);
        Assert.False(file.Metadata.ContainsKey("kvkernels.config"));

        // With a config.json beside the file, the updated config travels in the output's metadata.
        File.Copy(dir["model/config.json"], dir["config.json"]);
        CheckpointConverter.ConvertToGqa(dir["alone.safetensors"], dir["gqa2.safetensors"], new GqaConversionOptions(2));
        using var withConfig = SafetensorsFile.Open(dir["gqa2.safetensors"]);
        Assert.Equal(2, (int)JsonNode.Parse(withConfig.Metadata["kvkernels.config"])!["num_key_value_heads"]!);
    }

    private static void AssertNothingWritten(TempDirectory dir, string[] before)
    {
        Assert.False(Directory.Exists(dir["out"]));
        Assert.False(File.Exists(dir["out"]));
        Assert.Equal(before, dir.Entries()); // no ".partial" leftovers either
    }

    [Fact]
    public void A_missing_tensor_is_named_and_nothing_is_written()
    {
        using var dir = new TempDirectory();
        var tensors = ConversionFixtures.WriteLlama(dir["full"], Geo, SafetensorsDType.BF16, new Random(1));
        Directory.CreateDirectory(dir["in"]);
        File.Copy(dir["full/config.json"], dir["in/config.json"]);
        ConversionFixtures.WriteFile(dir["in/model.safetensors"], tensors.Values.Where(t => t.Name != "model.layers.1.self_attn.k_proj.weight").ToList());
        var before = dir.Entries();

        var e = Assert.Throws<CheckpointException>(() => CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2)));
        Assert.Equal("model.layers.1.self_attn.k_proj.weight", e.TensorName);
        Assert.Contains("'model.layers.1.self_attn.k_proj.weight' is missing", e.Message);
        AssertNothingWritten(dir, before);
        e = Assert.Throws<CheckpointException>(() => CheckpointConverter.CompressWithSvd(dir["in"], dir["out"], new SvdConversionOptions(new KvCompressionOptions(2)), CalibrationSource.Gaussian(16)));
        Assert.Equal("model.layers.1.self_attn.k_proj.weight", e.TensorName);
        AssertNothingWritten(dir, before);
    }

    [Theory]
    [InlineData("model.layers.0.self_attn.v_proj.weight", new long[] { 24, 32 }, "[24, 32]; expected [32, 32]")]
    [InlineData("model.layers.1.self_attn.q_proj.weight", new long[] { 32, 16 }, "[32, 16]; expected [32, 32]")]
    [InlineData("model.layers.1.self_attn.o_proj.weight", new long[] { 32 * 32 }, "[1024]; expected [32, 32]")]
    public void A_tensor_of_the_wrong_shape_is_named_with_both_shapes_and_nothing_is_written(string name, long[] shape, string message)
    {
        using var dir = new TempDirectory();
        var tensors = ConversionFixtures.WriteLlama(dir["full"], Geo, SafetensorsDType.F32, new Random(1));
        Directory.CreateDirectory(dir["in"]);
        File.Copy(dir["full/config.json"], dir["in/config.json"]);
        var changed = tensors.Values.Select(t => t.Name == name
            ? t with { Shape = shape, Values = new float[shape.Aggregate(1L, (a, b) => a * b)] } : t).ToList();
        ConversionFixtures.WriteFile(dir["in/model.safetensors"], changed);
        Directory.Delete(dir["full"], true);
        var before = dir.Entries();

        var e = Assert.Throws<CheckpointException>(() => CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2)));
        Assert.Equal(name, e.TensorName);
        Assert.Contains(message, e.Message);
        AssertNothingWritten(dir, before);
    }

    [Fact]
    public void A_group_count_that_does_not_divide_the_heads_is_an_argument_error_before_any_output()
    {
        using var dir = new TempDirectory();
        ConversionFixtures.WriteLlama(dir["in"], Geo, SafetensorsDType.F32, new Random(1));
        var before = dir.Entries();
        var e = Assert.Throws<ArgumentException>(() => CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(3)));
        Assert.Equal("groups", e.ParamName);
        Assert.Contains("divisor of the 4 KV heads (1, 2, 4)", e.Message);
        e = Assert.Throws<ArgumentException>(() => CheckpointConverter.CompressWithSvd(dir["in"], dir["out"], new SvdConversionOptions(new KvCompressionOptions(3)), CalibrationSource.Gaussian(8)));
        Assert.Equal("groups", e.ParamName);
        AssertNothingWritten(dir, before);
    }

    /// <summary>A conversion that fails after layer 0 is written (layer 1 has no calibration tensor) removes its staged
    /// output, for a directory and for a single file; an existing output is left as it was.</summary>
    [Fact]
    public void A_conversion_that_fails_midway_leaves_nothing_half_written()
    {
        using var dir = new TempDirectory();
        ConversionFixtures.WriteLlama(dir["in"], Geo, SafetensorsDType.BF16, new Random(2), sharded: true);
        WriteCalibration(dir["calibration.safetensors"], Geo.Layers, 32, 32, seed: 1, skipLayer: 1);
        var before = dir.Entries();
        var progress = new List<ConversionProgress>();
        using (var calibration = new SafetensorsCalibration(dir["calibration.safetensors"]))
        {
            var e = Assert.Throws<CheckpointException>(() => CheckpointConverter.CompressWithSvd(dir["in"], dir["out"],
                new SvdConversionOptions(new KvCompressionOptions(2)), calibration, new HeadPoolingTests.SyncProgress(progress.Add)));
            Assert.Equal("model.layers.1.self_attn.input", e.TensorName);
        }
        Assert.Contains(progress, p => p.LayersDone == 1); // layer 0 had been written when layer 1 failed
        AssertNothingWritten(dir, before);

        // Single file, into an existing output: the old file survives untouched.
        File.WriteAllText(dir["old.safetensors"], "previous");
        WriteCalibration(dir["no-layer-0.safetensors"], Geo.Layers, 32, 32, seed: 1, skipLayer: 0);
        before = dir.Entries();
        using (var calibration = new SafetensorsCalibration(dir["no-layer-0.safetensors"]))
        {
            var e = Assert.Throws<CheckpointException>(() => CheckpointConverter.CompressWithSvd(dir["in/model-00001-of-00002.safetensors"], dir["old.safetensors"],
                new SvdConversionOptions(new KvCompressionOptions(2)) { Geometry = Geo with { Layers = 1 }, Overwrite = true }, calibration));
            Assert.Equal("model.layers.0.self_attn.input", e.TensorName);
        }
        Assert.Equal("previous", File.ReadAllText(dir["old.safetensors"]));
        Assert.Equal(before, dir.Entries());
    }

    [Fact]
    public void An_existing_output_is_not_replaced_unless_asked()
    {
        using var dir = new TempDirectory();
        ConversionFixtures.WriteLlama(dir["in"], Geo, SafetensorsDType.F32, new Random(1));
        Directory.CreateDirectory(dir["out"]);
        File.WriteAllText(dir["out/keep.txt"], "keep");
        Assert.Throws<IOException>(() => CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2)));
        Assert.Equal("keep", File.ReadAllText(dir["out/keep.txt"]));
        CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2) { Overwrite = true });
        Assert.False(File.Exists(dir["out/keep.txt"]));
        Assert.True(File.Exists(dir["out/model.safetensors"]));
        Assert.Equal(["in", "in/config.json", "in/model.safetensors", "in/tokenizer.json", "out", "out/config.json", "out/model.safetensors", "out/tokenizer.json"], dir.Entries());
    }

    [Fact]
    public void Tensor_names_can_be_overridden()
    {
        using var dir = new TempDirectory();
        var tensors = ConversionFixtures.WriteLlama(dir["hf"], Geo with { Layers = 1 }, SafetensorsDType.F32, new Random(1), integers: true);
        Directory.CreateDirectory(dir["in"]);
        File.Copy(dir["hf/config.json"], dir["in/config.json"]);
        ConversionFixtures.WriteFile(dir["in/model.safetensors"], tensors.Values.Select(t => t with { Name = t.Name.Replace("model.layers.", "h.").Replace("self_attn.", "attn.") }).ToList());
        var names = AttentionTensorNames.FromJson(JsonNode.Parse("""
            {"query": "h.{i}.attn.q_proj.weight", "key": "h.{i}.attn.k_proj.weight", "value": "h.{i}.attn.v_proj.weight", "output": "h.{i}.attn.o_proj.weight"}
            """)!.AsObject());
        CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(4) { Names = names });
        var output = ConversionFixtures.ReadAll(dir["out"]);
        Assert.Equal(tensors["model.layers.0.self_attn.k_proj.weight"].Values, output["h.0.attn.k_proj.weight"].Values);
        Assert.Throws<ArgumentException>(() => AttentionTensorNames.FromJson(JsonNode.Parse("{\"kee\": \"x.{i}\"}")!.AsObject()));
        Assert.Throws<ArgumentException>(() => AttentionTensorNames.FromJson(JsonNode.Parse("{\"key\": \"no layer index\"}")!.AsObject()));
    }

    [Fact]
    public void A_config_that_does_not_describe_the_weights_is_reported()
    {
        using var dir = new TempDirectory();
        ConversionFixtures.WriteLlama(dir["in"], Geo, SafetensorsDType.F32, new Random(1));
        var config = JsonNode.Parse(File.ReadAllText(dir["in/config.json"]))!.AsObject();
        config["num_attention_heads"] = 6; // 6 query heads over 4 KV heads
        File.WriteAllText(dir["in/config.json"], config.ToJsonString());
        var e = Assert.Throws<CheckpointException>(() => CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2)));
        Assert.Contains("QueryHeads is 6", e.Message);
        config.Remove("num_hidden_layers");
        File.WriteAllText(dir["in/config.json"], config.ToJsonString());
        e = Assert.Throws<CheckpointException>(() => CheckpointConverter.ConvertToGqa(dir["in"], dir["out"], new GqaConversionOptions(2)));
        Assert.Equal("num_hidden_layers", e.TensorName);
    }
}
