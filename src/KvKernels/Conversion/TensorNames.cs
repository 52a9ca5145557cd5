using System.Globalization;
using System.Text.Json.Nodes;

namespace KvKernels.Conversion;

/// <summary>
/// Tensor-name patterns of the attention weights, <c>{i}</c> standing for the layer index. The defaults are Hugging
/// Face Llama's (<c>model.layers.{i}.self_attn.{q,k,v,o}_proj.weight</c>, biases <c>….bias</c> when the model has them,
/// as Qwen2 does). Override any of them for other naming schemes.
/// </summary>
public sealed record AttentionTensorNames
{
    /// <summary>W_Q.</summary>
    public string Query { get; init; } = "model.layers.{i}.self_attn.q_proj.weight";

    /// <summary>W_K.</summary>
    public string Key { get; init; } = "model.layers.{i}.self_attn.k_proj.weight";

    /// <summary>W_V.</summary>
    public string Value { get; init; } = "model.layers.{i}.self_attn.v_proj.weight";

    /// <summary>W_O.</summary>
    public string Output { get; init; } = "model.layers.{i}.self_attn.o_proj.weight";

    /// <summary>Query bias (used when present).</summary>
    public string QueryBias { get; init; } = "model.layers.{i}.self_attn.q_proj.bias";

    /// <summary>Key bias (used when present).</summary>
    public string KeyBias { get; init; } = "model.layers.{i}.self_attn.k_proj.bias";

    /// <summary>Value bias (used when present).</summary>
    public string ValueBias { get; init; } = "model.layers.{i}.self_attn.v_proj.bias";

    /// <summary>Reads overrides from a JSON object whose keys are the property names in camelCase
    /// (<c>{"query": "transformer.h.{i}.attn.q.weight", …}</c>); absent keys keep their defaults.</summary>
    /// <exception cref="ArgumentException">An unknown key, a value that is not a string, or a pattern without <c>{i}</c>.</exception>
    public static AttentionTensorNames FromJson(JsonObject json)
    {
        ArgumentNullException.ThrowIfNull(json);
        var names = new AttentionTensorNames();
        foreach (var (key, node) in json)
        {
            string value = TensorNamePatterns.Pattern(key, node, nameof(json));
            names = key switch
            {
                "query" => names with { Query = value },
                "key" => names with { Key = value },
                "value" => names with { Value = value },
                "output" => names with { Output = value },
                "queryBias" => names with { QueryBias = value },
                "keyBias" => names with { KeyBias = value },
                "valueBias" => names with { ValueBias = value },
                _ => throw new ArgumentException($"unknown tensor-name key '{key}'; expected query, key, value, output, queryBias, keyBias, valueBias.", nameof(json)),
            };
        }
        return names;
    }
}

/// <summary>
/// Tensor-name patterns of DeepSeek-V2/V3 MLA weights (Hugging Face names) and of the absorbed weights the fold writes.
/// </summary>
public sealed record MlaTensorNames
{
    /// <summary>Query up-projection W_UQ <c>[Heads·(nope+rope), q_lora_rank]</c>.</summary>
    public string QueryUp { get; init; } = "model.layers.{i}.self_attn.q_b_proj.weight";

    /// <summary>Direct query projection <c>[Heads·(nope+rope), hidden]</c>, for models without a query LoRA (V2-Lite).</summary>
    public string QueryDirect { get; init; } = "model.layers.{i}.self_attn.q_proj.weight";

    /// <summary>KV up-projection <c>[Heads·(nope+v), kv_lora_rank]</c>: per head W_UK (nope rows) then W_UV (v rows).</summary>
    public string KvUp { get; init; } = "model.layers.{i}.self_attn.kv_b_proj.weight";

    /// <summary>W_O <c>[hidden, Heads·v]</c>.</summary>
    public string Output { get; init; } = "model.layers.{i}.self_attn.o_proj.weight";

    /// <summary>Written: absorbed query <c>[Heads·(kv_lora+rope), q_in]</c>: per head W_UKᵀ·W_UQ(nope) then the rope rows.</summary>
    public string AbsorbedQuery { get; init; } = "model.layers.{i}.self_attn.q_absorbed.weight";

    /// <summary>Written: absorbed output <c>[hidden, Heads·kv_lora]</c>: per head W_O·W_UV.</summary>
    public string AbsorbedOutput { get; init; } = "model.layers.{i}.self_attn.o_absorbed.weight";

    /// <summary>Reads overrides from a JSON object (keys: queryUp, queryDirect, kvUp, output, absorbedQuery, absorbedOutput).</summary>
    /// <exception cref="ArgumentException">An unknown key, a value that is not a string, or a pattern without <c>{i}</c>.</exception>
    public static MlaTensorNames FromJson(JsonObject json)
    {
        ArgumentNullException.ThrowIfNull(json);
        var names = new MlaTensorNames();
        foreach (var (key, node) in json)
        {
            string value = TensorNamePatterns.Pattern(key, node, nameof(json));
            names = key switch
            {
                "queryUp" => names with { QueryUp = value },
                "queryDirect" => names with { QueryDirect = value },
                "kvUp" => names with { KvUp = value },
                "output" => names with { Output = value },
                "absorbedQuery" => names with { AbsorbedQuery = value },
                "absorbedOutput" => names with { AbsorbedOutput = value },
                _ => throw new ArgumentException($"unknown tensor-name key '{key}'; expected queryUp, queryDirect, kvUp, output, absorbedQuery, absorbedOutput.", nameof(json)),
            };
        }
        return names;
    }
}

/// <summary>Expanding <c>{i}</c> patterns.</summary>
public static class TensorNamePatterns
{
    /// <summary>The name of layer <paramref name="layer"/>.</summary>
    public static string For(string pattern, int layer)
    {
        ArgumentNullException.ThrowIfNull(pattern);
        return pattern.Replace("{i}", layer.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal);
    }

    internal static string Pattern(string key, JsonNode? node, string paramName)
    {
        if (node is not JsonValue v || !v.TryGetValue(out string? s) || string.IsNullOrEmpty(s))
            throw new ArgumentException($"tensor-name key '{key}' must be a non-empty string.", paramName);
        if (!s.Contains("{i}", StringComparison.Ordinal))
            throw new ArgumentException($"tensor-name key '{key}' is '{s}'; expected a pattern containing {{i}} for the layer index.", paramName);
        return s;
    }
}
