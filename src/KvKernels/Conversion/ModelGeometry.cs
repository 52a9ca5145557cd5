using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using KvKernels.Attention;

namespace KvKernels.Conversion;

/// <summary>
/// The attention shape of a decoder-only model, as a Hugging Face <c>config.json</c> states it. Weights are
/// <c>nn.Linear</c> matrices <c>[out, in]</c>, row-major: W_Q <c>[QueryHeads·HeadDim, HiddenSize]</c>, W_K
/// <c>[KvHeads·HeadDim, HiddenSize]</c>, W_V <c>[KvHeads·ValueDim, HiddenSize]</c>, W_O <c>[HiddenSize, QueryHeads·ValueDim]</c>;
/// query head h reads KV head <c>h / (QueryHeads / KvHeads)</c>.
/// </summary>
/// <param name="Layers">Decoder layers (<c>num_hidden_layers</c>).</param>
/// <param name="HiddenSize">Model width (<c>hidden_size</c>): the input width of W_Q, W_K, W_V.</param>
/// <param name="QueryHeads">Query heads (<c>num_attention_heads</c>).</param>
/// <param name="KvHeads">Key/value heads (<c>num_key_value_heads</c>, = QueryHeads for MHA).</param>
/// <param name="HeadDim">Query/key head dim (<c>head_dim</c>, else hidden_size / num_attention_heads).</param>
public sealed record AttentionGeometry(int Layers, int HiddenSize, int QueryHeads, int KvHeads, int HeadDim)
{
    /// <summary>Value head dim; 0 means <see cref="HeadDim"/>.</summary>
    public int ValueHeadDim { get; init; }

    /// <summary>How RoPE pairs the key dims: Hugging Face Llama-family checkpoints use <see cref="RopeStyle.RotateHalf"/>
    /// (their Q/K weights are permuted for it); <see cref="RopeStyle.None"/> for a model without rotary keys.</summary>
    public RopeStyle Rope { get; init; } = RopeStyle.RotateHalf;

    /// <summary>Rotated dims of each key head, from the start of the head: 0 means all of <see cref="HeadDim"/>
    /// (<c>partial_rotary_factor</c> × head_dim otherwise).</summary>
    public int RotaryDim { get; init; }

    /// <summary>Value head dim as used.</summary>
    public int ValueDim => ValueHeadDim == 0 ? HeadDim : ValueHeadDim;

    /// <summary>Rotated dims as used (0 without RoPE).</summary>
    public int EffectiveRotaryDim => Rope == RopeStyle.None ? 0 : RotaryDim == 0 ? HeadDim : RotaryDim;

    /// <summary>Query heads per KV head.</summary>
    public int GroupSize => QueryHeads / KvHeads;

    /// <summary>KV-cache bytes per token over all layers: <c>Layers · KvHeads · (HeadDim + ValueDim) · elementBytes</c>.</summary>
    public long CacheBytesPerToken(int elementBytes) => (long)Layers * KvHeads * (HeadDim + ValueDim) * elementBytes;

    /// <summary>Checks that the numbers describe a model.</summary>
    /// <exception cref="ArgumentException">A field is out of range (named, with what was expected).</exception>
    public void Validate()
    {
        const string p = "geometry";
        if (Layers < 1) throw new ArgumentException($"Layers is {Layers}; expected ≥ 1.", p);
        if (HiddenSize < 1) throw new ArgumentException($"HiddenSize is {HiddenSize}; expected ≥ 1.", p);
        if (KvHeads < 1) throw new ArgumentException($"KvHeads is {KvHeads}; expected ≥ 1.", p);
        if (QueryHeads < KvHeads || QueryHeads % KvHeads != 0)
            throw new ArgumentException($"QueryHeads is {QueryHeads} with KvHeads {KvHeads}; expected a multiple of KvHeads.", p);
        if (HeadDim < 1) throw new ArgumentException($"HeadDim is {HeadDim}; expected ≥ 1.", p);
        if (ValueHeadDim < 0) throw new ArgumentException($"ValueHeadDim is {ValueHeadDim}; expected 0 (= HeadDim) or ≥ 1.", p);
        if (!Enum.IsDefined(Rope)) throw new ArgumentException($"Rope is {Rope}; expected None, RotateHalf or Interleaved.", p);
        if (Rope != RopeStyle.None && (RotaryDim < 0 || RotaryDim % 2 != 0 || RotaryDim > HeadDim))
            throw new ArgumentException($"RotaryDim is {RotaryDim}; expected 0 (all of HeadDim) or an even value ≤ HeadDim = {HeadDim}.", p);
    }

    /// <summary>The head-local dims (a, b) of rotary pair <paramref name="pair"/> (of <see cref="EffectiveRotaryDim"/> / 2).</summary>
    public (int A, int B) RotaryPair(int pair) =>
        Rope == RopeStyle.Interleaved ? (2 * pair, 2 * pair + 1) : (pair, pair + EffectiveRotaryDim / 2);
}

/// <summary>
/// The shape of DeepSeek-V2/V3 multi-head latent attention (Hugging Face names): per token the cache holds the latent
/// <c>c_KV</c> (<see cref="KvLoraRank"/>) and the shared rotary key (<see cref="RopeHeadDim"/>).
/// </summary>
/// <param name="Layers"><c>num_hidden_layers</c>.</param>
/// <param name="HiddenSize"><c>hidden_size</c>.</param>
/// <param name="Heads"><c>num_attention_heads</c>.</param>
/// <param name="QLoraRank"><c>q_lora_rank</c>; 0 when the model has a direct <c>q_proj</c> (V2-Lite).</param>
/// <param name="KvLoraRank"><c>kv_lora_rank</c> (512 for V2/V3).</param>
/// <param name="NopeHeadDim"><c>qk_nope_head_dim</c> (128).</param>
/// <param name="RopeHeadDim"><c>qk_rope_head_dim</c> (64).</param>
/// <param name="ValueHeadDim"><c>v_head_dim</c> (128).</param>
public sealed record MlaGeometry(int Layers, int HiddenSize, int Heads, int QLoraRank, int KvLoraRank, int NopeHeadDim, int RopeHeadDim, int ValueHeadDim)
{
    /// <summary>Input width of the query up-projection: <see cref="QLoraRank"/>, or <see cref="HiddenSize"/> without one.</summary>
    public int QueryInput => QLoraRank > 0 ? QLoraRank : HiddenSize;

    /// <summary>Per-head query width before absorption: nope + rope.</summary>
    public int QueryHeadDim => NopeHeadDim + RopeHeadDim;

    /// <summary>Per-head query width after absorption: kv_lora + rope (576 for V3), the width of a cached latent row.</summary>
    public int AbsorbedHeadDim => KvLoraRank + RopeHeadDim;

    /// <summary>Latent cache bytes per token over all layers.</summary>
    public long LatentCacheBytesPerToken(int elementBytes) => (long)Layers * (KvLoraRank + RopeHeadDim) * elementBytes;

    /// <summary>Bytes per token of the per-head K and V an engine without the latent cache would keep.</summary>
    public long ExpandedCacheBytesPerToken(int elementBytes) => (long)Layers * Heads * (QueryHeadDim + ValueHeadDim) * elementBytes;

    /// <summary>Checks every field is positive (<see cref="QLoraRank"/> may be 0).</summary>
    /// <exception cref="ArgumentException">A field is out of range.</exception>
    public void Validate()
    {
        const string p = "geometry";
        if (Layers < 1 || HiddenSize < 1 || Heads < 1 || QLoraRank < 0 || KvLoraRank < 1 || NopeHeadDim < 1 || RopeHeadDim < 0 || ValueHeadDim < 1)
            throw new ArgumentException($"{this} has a field out of range; expected positive sizes (QLoraRank and RopeHeadDim may be 0).", p);
    }
}

/// <summary>A Hugging Face <c>config.json</c>, kept as JSON so that a rewrite changes only the fields it means to.</summary>
public sealed class ModelConfig
{
    private ModelConfig(JsonObject json, string source)
    {
        Json = json;
        Source = source;
    }

    /// <summary>The whole config.</summary>
    public JsonObject Json { get; }

    /// <summary>Where it was read from (for messages).</summary>
    public string Source { get; }

    /// <summary>Reads <paramref name="path"/>.</summary>
    /// <exception cref="CheckpointException">Not a JSON object.</exception>
    public static ModelConfig Load(string path)
    {
        JsonNode? node;
        try
        {
            node = JsonNode.Parse(File.ReadAllBytes(path));
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"{path} is not valid JSON ({e.Message}).", e);
        }
        return node is JsonObject o ? new ModelConfig(o, path) : throw new CheckpointException($"{path} is not a JSON object.");
    }

    /// <summary>Wraps an object (copied).</summary>
    public static ModelConfig FromJson(JsonObject json, string source = "config") => new((JsonObject)json.DeepClone(), source);

    /// <summary>A copy, for a rewrite.</summary>
    public ModelConfig Clone() => new((JsonObject)Json.DeepClone(), Source);

    /// <summary>An integer field, or <paramref name="fallback"/> when absent or null.</summary>
    /// <exception cref="CheckpointException">Present but not an integer (and no fallback) or missing without one.</exception>
    public int GetInt(string key, int? fallback = null)
    {
        var node = Json[key];
        if (node is null) return fallback ?? throw new CheckpointException(key, $"{Source} has no '{key}'.");
        if (node is JsonValue v && v.TryGetValue(out int i)) return i;
        if (node is JsonValue d && d.TryGetValue(out double x) && x == Math.Floor(x) && Math.Abs(x) <= int.MaxValue) return (int)x;
        throw new CheckpointException(key, $"{Source}: '{key}' is {node.ToJsonString()}; expected an integer.");
    }

    /// <summary>A number field, or <paramref name="fallback"/> when absent or null.</summary>
    public double GetDouble(string key, double fallback)
    {
        var node = Json[key];
        if (node is null) return fallback;
        if (node is JsonValue v && v.TryGetValue(out double x)) return x;
        throw new CheckpointException(key, $"{Source}: '{key}' is {node.ToJsonString()}; expected a number.");
    }

    /// <summary>Sets a field.</summary>
    public void Set(string key, JsonNode? value) => Json[key] = value;

    /// <summary>The attention geometry: <c>num_hidden_layers</c>, <c>hidden_size</c>, <c>num_attention_heads</c>,
    /// <c>num_key_value_heads</c> (default: the query heads), <c>head_dim</c> (default hidden / heads),
    /// <c>partial_rotary_factor</c> (default 1); RoPE rotate-half as Hugging Face Llama-family checkpoints use it.</summary>
    public AttentionGeometry ToAttentionGeometry()
    {
        int layers = GetInt("num_hidden_layers"), hidden = GetInt("hidden_size"), heads = GetInt("num_attention_heads");
        int kvHeads = GetInt("num_key_value_heads", heads);
        if (heads < 1) throw new CheckpointException("num_attention_heads", $"{Source}: num_attention_heads is {heads}; expected ≥ 1.");
        int headDim = GetInt("head_dim", hidden / heads);
        double factor = GetDouble("partial_rotary_factor", 1.0);
        int rotary = factor >= 1 ? 0 : (int)(headDim * factor) / 2 * 2;
        var geometry = new AttentionGeometry(layers, hidden, heads, kvHeads, headDim) { RotaryDim = rotary };
        try
        {
            geometry.Validate();
        }
        catch (ArgumentException e)
        {
            throw new CheckpointException($"{Source} does not describe an attention model: {e.Message}", e);
        }
        return geometry;
    }

    /// <summary>The MLA geometry (DeepSeek-V2/V3 field names).</summary>
    public MlaGeometry ToMlaGeometry()
    {
        var g = new MlaGeometry(GetInt("num_hidden_layers"), GetInt("hidden_size"), GetInt("num_attention_heads"), GetInt("q_lora_rank", 0),
            GetInt("kv_lora_rank"), GetInt("qk_nope_head_dim"), GetInt("qk_rope_head_dim"), GetInt("v_head_dim"));
        try
        {
            g.Validate();
        }
        catch (ArgumentException e)
        {
            throw new CheckpointException($"{Source} does not describe an MLA model: {e.Message}", e);
        }
        return g;
    }

    /// <summary>The config as indented JSON.</summary>
    public string ToJsonString() => Json.ToJsonString(new JsonSerializerOptions { WriteIndented = true });

    /// <inheritdoc/>
    public override string ToString() => Source;

    internal static string Invariant(int value) => value.ToString(CultureInfo.InvariantCulture);
}
