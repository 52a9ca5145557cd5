using System.Globalization;
using KvKernels.Attention;

namespace KvKernels.Conversion;

/// <summary>Options of MHA → GQA/MQA conversion by pooling.</summary>
/// <param name="Groups">KV heads after conversion (GQA-G; 1 = MQA): a divisor of the model's KV heads.</param>
public sealed record GqaConversionOptions(int Groups)
{
    /// <summary>Tensor names (Hugging Face Llama by default).</summary>
    public AttentionTensorNames Names { get; init; } = new();

    /// <summary>The geometry, when the checkpoint has no <c>config.json</c> (otherwise read from it and checked).</summary>
    public AttentionGeometry? Geometry { get; init; }

    /// <summary>
    /// WGQA weights per layer for the key heads: null (or a null entry) pools by the mean; an entry is <c>[Hkv]</c> (one
    /// weight per head) or <c>[Hkv·Dk]</c> (one per head and channel). See <see cref="HeadPooling.Pool"/>.
    /// </summary>
    public IReadOnlyList<float[]?>? KeyHeadWeights { get; init; }

    /// <summary>WGQA weights per layer for the value heads (<c>[Hkv]</c> or <c>[Hkv·Dv]</c>).</summary>
    public IReadOnlyList<float[]?>? ValueHeadWeights { get; init; }

    /// <summary>Replace an existing output.</summary>
    public bool Overwrite { get; init; }

    /// <summary>
    /// Reads WGQA weights from a safetensors file holding, per layer, <c>model.layers.{i}.self_attn.k_head_weights</c>
    /// and <c>….v_head_weights</c> of shape <c>[Hkv]</c> or <c>[Hkv, D]</c> (a layer without them is mean-pooled).
    /// </summary>
    public GqaConversionOptions WithHeadWeightsFrom(string path, int layers)
    {
        using var file = SafetensorsFile.Open(path);
        var keys = new float[]?[layers];
        var values = new float[]?[layers];
        for (int i = 0; i < layers; i++)
        {
            keys[i] = Read(file, TensorNamePatterns.For("model.layers.{i}.self_attn.k_head_weights", i));
            values[i] = Read(file, TensorNamePatterns.For("model.layers.{i}.self_attn.v_head_weights", i));
        }
        return this with { KeyHeadWeights = keys, ValueHeadWeights = values };

        static float[]? Read(SafetensorsFile file, string name) => file.Find(name) is { } t ? file.ReadSingles(t) : null;
    }
}

/// <summary>Options of SVD-based KV-head compression of a checkpoint.</summary>
/// <param name="Compression">Groups and ranks.</param>
public sealed record SvdConversionOptions(KvCompressionOptions Compression)
{
    /// <summary>Tensor names (Hugging Face Llama by default).</summary>
    public AttentionTensorNames Names { get; init; } = new();

    /// <summary>The geometry, when the checkpoint has no <c>config.json</c> (otherwise read from it).</summary>
    public AttentionGeometry? Geometry { get; init; }

    /// <summary>Override the RoPE pairing read from the config (rotate-half for Hugging Face checkpoints); None for a
    /// model without rotary keys.</summary>
    public RopeStyle? Rope { get; init; }

    /// <summary>Replace an existing output.</summary>
    public bool Overwrite { get; init; }
}

/// <summary>Options of MLA weight absorption of a checkpoint.</summary>
public sealed record MlaFoldOptions
{
    /// <summary>Tensor names (DeepSeek-V2/V3 Hugging Face names by default).</summary>
    public MlaTensorNames Names { get; init; } = new();

    /// <summary>The geometry, when the checkpoint has no <c>config.json</c>.</summary>
    public MlaGeometry? Geometry { get; init; }

    /// <summary>Keep the original q/kv_b/o projections beside the absorbed ones (engines that prefill unabsorbed).</summary>
    public bool KeepUnabsorbed { get; init; }

    /// <summary>Replace an existing output.</summary>
    public bool Overwrite { get; init; }
}

/// <summary>
/// Offline KV-head reduction of whole checkpoints (Hugging Face model directories or single safetensors files), streamed
/// layer by layer: <see cref="ConvertToGqa"/> (mean or weighted pooling), <see cref="CompressWithSvd"/> (calibrated
/// principal directions folded into the projections, RoPE-compatible), <see cref="FoldMla"/> (absorbed MLA weights).
/// Missing or misshapen tensors are reported before anything is written; the output appears only when complete.
/// A directory converts to a directory (same shards, updated index and config, other files copied); a single file to a
/// single file, whose <c>__metadata__</c> then carries the updated config under <c>kvkernels.config</c> when the input
/// had a <c>config.json</c> beside it.
/// </summary>
public static class CheckpointConverter
{
    /// <summary>
    /// MHA → GQA/MQA: each layer's K and V projections (and biases) pooled within groups of g = Hkv / Groups
    /// consecutive heads; Q and O copied unchanged; <c>num_key_value_heads</c> set to Groups.
    /// </summary>
    /// <exception cref="ArgumentException">Groups does not divide the KV heads, or bad weights (named).</exception>
    /// <exception cref="CheckpointException">A tensor is missing or misshapen (named).</exception>
    public static ConversionReport ConvertToGqa(string input, string output, GqaConversionOptions options,
        IProgress<ConversionProgress>? progress = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        using var checkpoint = Checkpoint.Open(input);
        var geo = ResolveGeometry(checkpoint, options.Geometry);
        HeadPooling.CheckGroups(geo.KvHeads, options.Groups);
        CheckWeights(options.KeyHeadWeights, geo, geo.HeadDim, nameof(options.KeyHeadWeights));
        CheckWeights(options.ValueHeadWeights, geo, geo.ValueDim, nameof(options.ValueHeadWeights));
        var names = options.Names;
        int groups = options.Groups, hidden = geo.HiddenSize, d = geo.HeadDim, dv = geo.ValueDim;

        var rewrites = new List<LayerRewrite>();
        int elementBytes = 0;
        for (int layer = 0; layer < geo.Layers; layer++)
        {
            var n = LayerNames(names, layer);
            CheckShape(checkpoint, n.Query, geo.QueryHeads * d, hidden);
            CheckShape(checkpoint, n.Output, hidden, geo.QueryHeads * dv);
            var key = checkpoint.GetFloat(n.Key, geo.KvHeads * d, hidden).Tensor;
            var value = checkpoint.GetFloat(n.Value, geo.KvHeads * dv, hidden).Tensor;
            elementBytes = key.DType.Size();
            var keyBias = checkpoint.Contains(n.KeyBias) ? checkpoint.GetFloat(n.KeyBias, geo.KvHeads * d).Tensor : null;
            var valueBias = checkpoint.Contains(n.ValueBias) ? checkpoint.GetFloat(n.ValueBias, geo.KvHeads * dv).Tensor : null;

            var consumes = new List<string> { n.Key, n.Value };
            var produces = new List<(string, TensorDeclaration)>
            {
                (n.Key, new TensorDeclaration(n.Key, key.DType, [groups * d, hidden])),
                (n.Value, new TensorDeclaration(n.Value, value.DType, [groups * dv, hidden])),
            };
            if (keyBias is not null)
            {
                consumes.Add(n.KeyBias);
                produces.Add((n.KeyBias, new TensorDeclaration(n.KeyBias, keyBias.DType, [groups * d])));
            }
            if (valueBias is not null)
            {
                consumes.Add(n.ValueBias);
                produces.Add((n.ValueBias, new TensorDeclaration(n.ValueBias, valueBias.DType, [groups * dv])));
            }
            float[] kw = options.KeyHeadWeights?[layer] ?? [], vw = options.ValueHeadWeights?[layer] ?? [];
            int l = layer;
            rewrites.Add(new LayerRewrite(l, consumes, produces, () =>
            {
                var results = new Dictionary<string, float[]>(StringComparer.Ordinal)
                {
                    [n.Key] = Pool(checkpoint.ReadSingles(n.Key, geo.KvHeads * d, hidden), geo.KvHeads, d, groups, kw),
                    [n.Value] = Pool(checkpoint.ReadSingles(n.Value, geo.KvHeads * dv, hidden), geo.KvHeads, dv, groups, vw),
                };
                if (keyBias is not null) results[n.KeyBias] = Pool(checkpoint.ReadSingles(n.KeyBias, geo.KvHeads * d), geo.KvHeads, d, groups, kw);
                if (valueBias is not null) results[n.ValueBias] = Pool(checkpoint.ReadSingles(n.ValueBias, geo.KvHeads * dv), geo.KvHeads, dv, groups, vw);
                return results;
            }));
        }

        var config = checkpoint.Config?.Clone();
        config?.Set("num_key_value_heads", groups);
        bool weighted = options.KeyHeadWeights is not null || options.ValueHeadWeights is not null;
        string description = $"gqa {(weighted ? "weighted" : "mean")} pooling, KV heads {geo.KvHeads} → {groups}";
        return Rewrite(checkpoint, output, options.Overwrite, rewrites, config, description, progress, cancellation, geo,
            geo with { KvHeads = groups }, elementBytes,
            $"K and V: {geo.Layers} layers × {geo.KvHeads} → {groups} heads × ({d} + {dv}) × {elementBytes} B");

        static float[] Pool(float[] weight, int heads, int rows, int groups, float[] headWeights)
        {
            var result = GC.AllocateUninitializedArray<float>((int)(weight.LongLength / heads * groups)); // Pool writes every element
            HeadPooling.Pool(weight, heads, rows, groups, headWeights, result);
            return result;
        }
    }

    /// <summary>
    /// SVD-based KV-head compression: per layer, the K/V moments are accumulated over the calibration activations, the
    /// bases fitted per group (<see cref="KvHeadBases"/>; RoPE-compatible for rotary keys) and folded into W_Q, W_K,
    /// W_V, W_O (<see cref="KvHeadCompression.Fold"/>); the config gets <c>num_key_value_heads</c> = Groups (and
    /// <c>head_dim</c> when the key rank differs). The retained energy per layer is in the report.
    /// </summary>
    /// <exception cref="ArgumentException">Bad options (a group count that does not divide the heads, a rank out of
    /// range, a RoPE model with a key rank other than the head dim).</exception>
    /// <exception cref="CheckpointException">A tensor is missing or misshapen, or a layer has no calibration tokens.</exception>
    public static ConversionReport CompressWithSvd(string input, string output, SvdConversionOptions options, CalibrationSource calibration,
        IProgress<ConversionProgress>? progress = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(calibration);
        using var checkpoint = Checkpoint.Open(input);
        var geo = ResolveGeometry(checkpoint, options.Geometry);
        if (options.Rope is { } rope) geo = geo with { Rope = rope, RotaryDim = rope == RopeStyle.None ? 0 : geo.RotaryDim };
        var compression = options.Compression;
        compression.Validate(geo);
        int groups = compression.Groups, hidden = geo.HiddenSize, d = geo.HeadDim, dv = geo.ValueDim;
        int r = compression.KeyRankFor(geo), rv = compression.ValueRankFor(geo);
        if (geo.Rope != RopeStyle.None && r != d)
            throw new ArgumentException($"KeyRank is {r}; a RoPE model keeps the head dim {d} (one complex direction per frequency plane), " +
                "since standard RoPE cannot rotate a wider head with the original frequencies.", nameof(options));
        if (rv != r)
            throw new ArgumentException($"ValueRank {rv} differs from KeyRank {r}; Hugging Face configs have one head_dim for keys and values.", nameof(options));
        var names = options.Names;

        var energy = new LayerEnergy[geo.Layers];
        var rewrites = new List<LayerRewrite>();
        int elementBytes = 0;
        for (int layer = 0; layer < geo.Layers; layer++)
        {
            var n = LayerNames(names, layer);
            var q = checkpoint.GetFloat(n.Query, geo.QueryHeads * d, hidden).Tensor;
            var k = checkpoint.GetFloat(n.Key, geo.KvHeads * d, hidden).Tensor;
            var v = checkpoint.GetFloat(n.Value, geo.KvHeads * dv, hidden).Tensor;
            var o = checkpoint.GetFloat(n.Output, hidden, geo.QueryHeads * dv).Tensor;
            elementBytes = k.DType.Size();
            var qb = checkpoint.Contains(n.QueryBias) ? checkpoint.GetFloat(n.QueryBias, geo.QueryHeads * d).Tensor : null;
            var kb = checkpoint.Contains(n.KeyBias) ? checkpoint.GetFloat(n.KeyBias, geo.KvHeads * d).Tensor : null;
            var vb = checkpoint.Contains(n.ValueBias) ? checkpoint.GetFloat(n.ValueBias, geo.KvHeads * dv).Tensor : null;

            var consumes = new List<string> { n.Query, n.Key, n.Value, n.Output };
            var produces = new List<(string, TensorDeclaration)>
            {
                (n.Query, new TensorDeclaration(n.Query, q.DType, [geo.QueryHeads * r, hidden])),
                (n.Key, new TensorDeclaration(n.Key, k.DType, [groups * r, hidden])),
                (n.Value, new TensorDeclaration(n.Value, v.DType, [groups * rv, hidden])),
                (n.Output, new TensorDeclaration(n.Output, o.DType, [hidden, geo.QueryHeads * rv])),
            };
            if (qb is not null) { consumes.Add(n.QueryBias); produces.Add((n.QueryBias, new TensorDeclaration(n.QueryBias, qb.DType, [geo.QueryHeads * r]))); }
            if (kb is not null) { consumes.Add(n.KeyBias); produces.Add((n.KeyBias, new TensorDeclaration(n.KeyBias, kb.DType, [groups * r]))); }
            if (vb is not null) { consumes.Add(n.ValueBias); produces.Add((n.ValueBias, new TensorDeclaration(n.ValueBias, vb.DType, [groups * rv]))); }

            int l = layer;
            rewrites.Add(new LayerRewrite(l, consumes, produces, () =>
            {
                var weights = new AttentionWeights(checkpoint.ReadSingles(n.Query, geo.QueryHeads * d, hidden), checkpoint.ReadSingles(n.Key, geo.KvHeads * d, hidden),
                    checkpoint.ReadSingles(n.Value, geo.KvHeads * dv, hidden), checkpoint.ReadSingles(n.Output, hidden, geo.QueryHeads * dv))
                {
                    QueryBias = qb is null ? null : checkpoint.ReadSingles(n.QueryBias, geo.QueryHeads * d),
                    KeyBias = kb is null ? null : checkpoint.ReadSingles(n.KeyBias, geo.KvHeads * d),
                    ValueBias = vb is null ? null : checkpoint.ReadSingles(n.ValueBias, geo.KvHeads * dv),
                };
                var moments = new KvCovariance(geo, groups);
                foreach (var batch in calibration.Batches(l, hidden))
                {
                    cancellation.ThrowIfCancellationRequested();
                    if (batch.Length % hidden != 0)
                        throw new CheckpointException(calibration.Describe(l),
                            $"a calibration batch of layer {l} has {batch.Length} values, not a multiple of hidden_size {hidden}.");
                    moments.AddActivations(batch, batch.Length / hidden, weights);
                }
                if (moments.Tokens == 0)
                    throw new CheckpointException(calibration.Describe(l), $"layer {l} has no calibration tokens ({calibration.Describe(l)}).");
                var bases = KvHeadBases.Fit(moments, compression);
                energy[l] = new LayerEnergy(l, bases.KeyEnergy, bases.ValueEnergy, moments.Tokens);
                var folded = KvHeadCompression.Fold(bases, weights);
                var results = new Dictionary<string, float[]>(StringComparer.Ordinal)
                {
                    [n.Query] = folded.Query, [n.Key] = folded.Key, [n.Value] = folded.Value, [n.Output] = folded.Output,
                };
                if (folded.QueryBias is not null) results[n.QueryBias] = folded.QueryBias;
                if (folded.KeyBias is not null) results[n.KeyBias] = folded.KeyBias;
                if (folded.ValueBias is not null) results[n.ValueBias] = folded.ValueBias;
                return results;
            }));
        }

        var config = checkpoint.Config?.Clone();
        config?.Set("num_key_value_heads", groups);
        if (r != d) config?.Set("head_dim", r);
        string ropeText = geo.Rope == RopeStyle.None ? "no RoPE (real principal directions)" : $"RoPE {geo.Rope} (complex per-plane directions)";
        string description = $"svd compression, KV heads {geo.KvHeads} → {groups}, key rank {r}, value rank {rv}, {ropeText}";
        return Rewrite(checkpoint, output, options.Overwrite, rewrites, config, description, progress, cancellation, geo,
            geo with { KvHeads = groups, HeadDim = r, ValueHeadDim = rv == r ? 0 : rv }, elementBytes,
            $"K and V: {geo.Layers} layers × {geo.KvHeads} → {groups} heads × ({d} + {dv} → {r} + {rv}) × {elementBytes} B") with { Energy = energy };
    }

    /// <summary>
    /// MLA absorption: per layer writes the absorbed query (<see cref="MlaTensorNames.AbsorbedQuery"/>) and output
    /// (<see cref="MlaTensorNames.AbsorbedOutput"/>) projections (<see cref="MlaAbsorption"/>) in place of the query
    /// up-projection, <c>kv_b_proj</c> and <c>o_proj</c> (kept too with <see cref="MlaFoldOptions.KeepUnabsorbed"/>);
    /// the config gets <c>"kvkernels_mla_absorbed": true</c>. The cache (the latent rows) is unchanged.
    /// </summary>
    /// <exception cref="CheckpointException">A tensor is missing or misshapen (named).</exception>
    public static ConversionReport FoldMla(string input, string output, MlaFoldOptions options,
        IProgress<ConversionProgress>? progress = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        using var checkpoint = Checkpoint.Open(input);
        var geo = options.Geometry ?? checkpoint.Config?.ToMlaGeometry()
            ?? throw new ArgumentException($"'{checkpoint.Path}' has no config.json; pass the MLA geometry.", nameof(options));
        geo.Validate();
        var names = options.Names;
        int heads = geo.Heads, lora = geo.KvLoraRank, kvRows = geo.NopeHeadDim + geo.ValueHeadDim;
        var rewrites = new List<LayerRewrite>();
        int elementBytes = 0;
        for (int layer = 0; layer < geo.Layers; layer++)
        {
            string queryName = TensorNamePatterns.For(geo.QLoraRank > 0 ? names.QueryUp : names.QueryDirect, layer);
            string kvName = TensorNamePatterns.For(names.KvUp, layer), outName = TensorNamePatterns.For(names.Output, layer);
            string absorbedQuery = TensorNamePatterns.For(names.AbsorbedQuery, layer), absorbedOutput = TensorNamePatterns.For(names.AbsorbedOutput, layer);
            var q = checkpoint.GetFloat(queryName, heads * geo.QueryHeadDim, geo.QueryInput).Tensor;
            var kv = checkpoint.GetFloat(kvName, heads * kvRows, lora).Tensor;
            var o = checkpoint.GetFloat(outName, geo.HiddenSize, heads * geo.ValueHeadDim).Tensor;
            elementBytes = kv.DType.Size();
            var produces = new List<(string, TensorDeclaration)>
            {
                (queryName, new TensorDeclaration(absorbedQuery, q.DType, [heads * geo.AbsorbedHeadDim, geo.QueryInput])),
                (outName, new TensorDeclaration(absorbedOutput, o.DType, [geo.HiddenSize, heads * lora])),
            };
            IReadOnlyList<string> consumes = options.KeepUnabsorbed ? [] : [queryName, kvName, outName];
            rewrites.Add(new LayerRewrite(layer, consumes, produces, () =>
            {
                var kvUp = checkpoint.ReadSingles(kvName, heads * kvRows, lora);
                return new Dictionary<string, float[]>(StringComparer.Ordinal)
                {
                    [absorbedQuery] = MlaAbsorption.AbsorbQuery(geo, checkpoint.ReadSingles(queryName, heads * geo.QueryHeadDim, geo.QueryInput), kvUp),
                    [absorbedOutput] = MlaAbsorption.AbsorbOutput(geo, checkpoint.ReadSingles(outName, geo.HiddenSize, heads * geo.ValueHeadDim), kvUp),
                };
            }));
        }

        var config = checkpoint.Config?.Clone();
        config?.Set("kvkernels_mla_absorbed", true);
        string description = $"mla-fold, {heads} heads absorbed into {geo.AbsorbedHeadDim}-wide queries over the latent" + (options.KeepUnabsorbed ? " (originals kept)" : "");
        var (bytes, elapsed) = CheckpointRewriter.Run(checkpoint, output, options.Overwrite, rewrites, config, description, progress, cancellation);
        long latent = geo.LatentCacheBytesPerToken(elementBytes);
        return new ConversionReport
        {
            Description = description,
            Input = checkpoint.Path,
            Output = Path.GetFullPath(output),
            Layers = geo.Layers,
            CacheBytesPerTokenBefore = latent,
            CacheBytesPerTokenAfter = latent,
            CacheDescription = $"latent c_KV + k_pe: {geo.Layers} layers × ({lora} + {geo.RopeHeadDim}) × {elementBytes} B, unchanged by folding " +
                $"(expanded per-head K and V would be {geo.ExpandedCacheBytesPerToken(elementBytes).ToString("N0", CultureInfo.InvariantCulture)} B)",
            BytesRead = checkpoint.TotalFileBytes,
            BytesWritten = bytes,
            Elapsed = elapsed,
            Config = config,
        };
    }

    private static AttentionGeometry ResolveGeometry(Checkpoint checkpoint, AttentionGeometry? given)
    {
        var fromConfig = checkpoint.Config?.ToAttentionGeometry();
        var geo = given ?? fromConfig ?? throw new ArgumentException(
            $"'{checkpoint.Path}' has no config.json beside it; pass the geometry in the options.", "options");
        geo.Validate();
        return geo;
    }

    private static void CheckWeights(IReadOnlyList<float[]?>? weights, AttentionGeometry geo, int rowsPerHead, string name)
    {
        if (weights is null) return;
        if (weights.Count != geo.Layers)
            throw new ArgumentException($"{name} has {weights.Count} layers; expected {geo.Layers}.", name);
        for (int i = 0; i < weights.Count; i++)
            if (weights[i] is { } w && w.Length != geo.KvHeads && w.Length != geo.KvHeads * rowsPerHead)
                throw new ArgumentException($"{name}[{i}] has {w.Length} weights; expected {geo.KvHeads} (per head) or {geo.KvHeads * rowsPerHead} (per head and channel).", name);
    }

    /// <summary>Writes the rewritten checkpoint and reports the KV-cache change from <paramref name="before"/> to
    /// <paramref name="after"/> (the GQA and SVD conversions share it).</summary>
    private static ConversionReport Rewrite(Checkpoint checkpoint, string output, bool overwrite, IReadOnlyList<LayerRewrite> rewrites,
        ModelConfig? config, string description, IProgress<ConversionProgress>? progress, CancellationToken cancellation,
        AttentionGeometry before, AttentionGeometry after, int elementBytes, string cacheDescription)
    {
        var (bytes, elapsed) = CheckpointRewriter.Run(checkpoint, output, overwrite, rewrites, config, description, progress, cancellation);
        return new ConversionReport
        {
            Description = description,
            Input = checkpoint.Path,
            Output = Path.GetFullPath(output),
            Layers = before.Layers,
            CacheBytesPerTokenBefore = before.CacheBytesPerToken(elementBytes),
            CacheBytesPerTokenAfter = after.CacheBytesPerToken(elementBytes),
            CacheDescription = cacheDescription,
            BytesRead = checkpoint.TotalFileBytes,
            BytesWritten = bytes,
            Elapsed = elapsed,
            Config = config,
        };
    }

    private static void CheckShape(Checkpoint checkpoint, string name, params long[] shape) => checkpoint.GetFloat(name, shape);

    private readonly record struct Names(string Query, string Key, string Value, string Output, string QueryBias, string KeyBias, string ValueBias);

    private static Names LayerNames(AttentionTensorNames n, int layer) => new(
        TensorNamePatterns.For(n.Query, layer), TensorNamePatterns.For(n.Key, layer), TensorNamePatterns.For(n.Value, layer),
        TensorNamePatterns.For(n.Output, layer), TensorNamePatterns.For(n.QueryBias, layer), TensorNamePatterns.For(n.KeyBias, layer),
        TensorNamePatterns.For(n.ValueBias, layer));
}
