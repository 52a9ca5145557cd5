using System.Text.Json.Nodes;
using KvKernels.Conversion;

namespace KvKernels.Tests.Conversion;

/// <summary>A temporary directory removed after the test.</summary>
internal sealed class TempDirectory : IDisposable
{
    public TempDirectory()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "kvkernels-conversion-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string this[string name] => System.IO.Path.Combine(Path, name);

    /// <summary>Every entry (files and directories, recursively), relative, sorted: to prove nothing was left behind.</summary>
    public string[] Entries() => Directory.EnumerateFileSystemEntries(Path, "*", SearchOption.AllDirectories)
        .Select(p => System.IO.Path.GetRelativePath(Path, p)).Order(StringComparer.Ordinal).ToArray();

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>A tensor to write into a fixture: fp32 values rounded to the dtype.</summary>
internal sealed record FixtureTensor(string Name, SafetensorsDType DType, long[] Shape, float[] Values);

/// <summary>Builds tiny Hugging Face-style model directories and safetensors files for the conversion tests.</summary>
internal static class ConversionFixtures
{
    public static float Normal(Random random)
    {
        double u = 1 - random.NextDouble(), v = random.NextDouble();
        return (float)(Math.Sqrt(-2 * Math.Log(u)) * Math.Cos(2 * Math.PI * v));
    }

    public static float[] RandomArray(Random random, long length, float scale = 1f)
    {
        var a = new float[length];
        for (long i = 0; i < length; i++) a[i] = scale * Normal(random);
        return a;
    }

    /// <summary>Small integers: sums and means of a few of them (power-of-two counts) are exact in fp32, fp16 and bf16.</summary>
    public static float[] IntegerArray(Random random, long length)
    {
        var a = new float[length];
        for (long i = 0; i < length; i++) a[i] = random.Next(-64, 65);
        return a;
    }

    public static void WriteFile(string path, IReadOnlyList<FixtureTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var writer = SafetensorsWriter.Create(path, tensors.Select(t => new TensorDeclaration(t.Name, t.DType, t.Shape)).ToList(), metadata);
        foreach (var t in tensors) writer.WriteTensor(t.Name, t.Values);
        writer.Complete();
    }

    /// <summary>The value after rounding to <paramref name="dtype"/>.</summary>
    public static float Round(float value, SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F16 => (float)(Half)value,
        SafetensorsDType.BF16 => (float)(BFloat16)value,
        _ => value,
    };

    public static float[] Round(float[] values, SafetensorsDType dtype) => values.Select(v => Round(v, dtype)).ToArray();

    /// <summary>
    /// A Llama-shaped model directory: config.json, tokenizer.json, and the weights in one file or two shards with an
    /// index. Returns the tensors written (values already rounded to the dtype).
    /// </summary>
    public static Dictionary<string, FixtureTensor> WriteLlama(string directory, AttentionGeometry geo, SafetensorsDType dtype, Random random,
        bool sharded = false, bool biases = false, bool integers = false, Func<int, string, float[]?>? attention = null)
    {
        Directory.CreateDirectory(directory);
        int hidden = geo.HiddenSize, d = geo.HeadDim, dv = geo.ValueDim, vocab = 11, ffn = 24;
        var tensors = new List<FixtureTensor>();
        float[] Values(long n) => integers ? IntegerArray(random, n) : RandomArray(random, n, 0.25f);
        void Add(string name, params long[] shape) => tensors.Add(new FixtureTensor(name, dtype, shape, Values(shape.Aggregate(1L, (a, b) => a * b))));
        Add("model.embed_tokens.weight", vocab, hidden);
        for (int i = 0; i < geo.Layers; i++)
        {
            string p = $"model.layers.{i}.";
            Add(p + "input_layernorm.weight", hidden);
            Add(p + "mlp.down_proj.weight", hidden, ffn);
            Add(p + "mlp.gate_proj.weight", ffn, hidden);
            Add(p + "mlp.up_proj.weight", ffn, hidden);
            Add(p + "post_attention_layernorm.weight", hidden);
            Add(p + "self_attn.k_proj.weight", geo.KvHeads * d, hidden);
            if (biases) Add(p + "self_attn.k_proj.bias", geo.KvHeads * d);
            Add(p + "self_attn.o_proj.weight", hidden, geo.QueryHeads * dv);
            Add(p + "self_attn.q_proj.weight", geo.QueryHeads * d, hidden);
            if (biases) Add(p + "self_attn.q_proj.bias", geo.QueryHeads * d);
            Add(p + "self_attn.v_proj.weight", geo.KvHeads * dv, hidden);
            if (biases) Add(p + "self_attn.v_proj.bias", geo.KvHeads * dv);
        }
        Add("model.norm.weight", hidden);
        Add("lm_head.weight", vocab, hidden);
        if (attention is not null)
            for (int i = 0; i < tensors.Count; i++)
                if (TryLayer(tensors[i].Name, out int layer) && attention(layer, tensors[i].Name) is { } replaced)
                    tensors[i] = tensors[i] with { Values = replaced };
        for (int i = 0; i < tensors.Count; i++) tensors[i] = tensors[i] with { Values = Round(tensors[i].Values, dtype) };

        var config = new JsonObject
        {
            ["architectures"] = new JsonArray("LlamaForCausalLM"),
            ["model_type"] = "llama",
            ["hidden_size"] = hidden,
            ["intermediate_size"] = ffn,
            ["num_hidden_layers"] = geo.Layers,
            ["num_attention_heads"] = geo.QueryHeads,
            ["num_key_value_heads"] = geo.KvHeads,
            ["head_dim"] = d,
            ["rope_theta"] = 10000.0,
            ["torch_dtype"] = dtype == SafetensorsDType.BF16 ? "bfloat16" : dtype == SafetensorsDType.F16 ? "float16" : "float32",
            ["vocab_size"] = vocab,
        };
        File.WriteAllText(Path.Combine(directory, "config.json"), config.ToJsonString());
        File.WriteAllText(Path.Combine(directory, "tokenizer.json"), "{\"version\": \"1.0\"}");
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        if (!sharded)
        {
            WriteFile(Path.Combine(directory, "model.safetensors"), tensors, metadata);
        }
        else
        {
            int half = tensors.Count / 2 + 3; // splits a layer across the two shards
            var shards = new[] { tensors.Take(half).ToList(), tensors.Skip(half).ToList() };
            var map = new JsonObject();
            for (int s = 0; s < 2; s++)
            {
                string name = $"model-0000{s + 1}-of-00002.safetensors";
                WriteFile(Path.Combine(directory, name), shards[s], metadata);
                foreach (var t in shards[s]) map[t.Name] = name;
            }
            var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = 0 }, ["weight_map"] = map };
            File.WriteAllText(Path.Combine(directory, Checkpoint.IndexFileName), index.ToJsonString());
        }
        return tensors.ToDictionary(t => t.Name);
    }

    private static bool TryLayer(string name, out int layer)
    {
        layer = -1;
        const string prefix = "model.layers.";
        if (!name.StartsWith(prefix, StringComparison.Ordinal)) return false;
        int dot = name.IndexOf('.', prefix.Length);
        return int.TryParse(name.AsSpan(prefix.Length, dot - prefix.Length), out layer);
    }

    /// <summary>Every tensor of a directory (all shards) or file, as fp32 values.</summary>
    public static Dictionary<string, (SafetensorsTensor Tensor, float[] Values, byte[] Bytes)> ReadAll(string path)
    {
        using var checkpoint = Checkpoint.Open(path);
        var result = new Dictionary<string, (SafetensorsTensor, float[], byte[])>(StringComparer.Ordinal);
        foreach (var name in checkpoint.TensorNames)
        {
            var (file, tensor) = checkpoint.Get(name);
            result[name] = (tensor, tensor.DType.IsFloat() ? file.ReadSingles(tensor) : [], file.GetBytes(tensor).ToArray());
        }
        return result;
    }
}
