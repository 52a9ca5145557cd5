namespace KvKernels.Conversion;

/// <summary>
/// Calibration activations for SVD compression: per layer, batches of the input of the Q/K/V projections (the hidden
/// states after the layer's input norm), each a row-major <c>[tokens, hidden]</c> array.
/// </summary>
public abstract class CalibrationSource
{
    /// <summary>The batches of layer <paramref name="layer"/>; each array's length is a multiple of
    /// <paramref name="hiddenSize"/>.</summary>
    public abstract IEnumerable<float[]> Batches(int layer, int hiddenSize);

    /// <summary>What supplies layer <paramref name="layer"/>'s activations (a tensor name, for messages).</summary>
    public virtual string Describe(int layer) => $"calibration stream, layer {layer}";

    /// <summary>A generated stream: <paramref name="batches"/> is called per layer.</summary>
    public static CalibrationSource FromBatches(Func<int, int, IEnumerable<float[]>> batches) => new DelegateCalibration(batches);

    /// <summary>
    /// A generated stream of <paramref name="tokens"/> tokens per layer of independent standard normal activations
    /// (fixed seed per layer). Real conversions want real activations; this exercises the pipeline (the fitted bases
    /// are then those of the weights' own row spaces).
    /// </summary>
    public static CalibrationSource Gaussian(int tokens, int seed = 1, int batchTokens = 256)
    {
        if (tokens < 1) throw new ArgumentException($"tokens is {tokens}; expected ≥ 1.", nameof(tokens));
        if (batchTokens < 1) throw new ArgumentException($"batchTokens is {batchTokens}; expected ≥ 1.", nameof(batchTokens));
        return new DelegateCalibration((layer, hidden) => GaussianBatches(tokens, hidden, batchTokens, seed * 7919 + layer));
    }

    private static IEnumerable<float[]> GaussianBatches(int tokens, int hidden, int batchTokens, int seed)
    {
        var random = new Random(seed);
        for (int done = 0; done < tokens; done += batchTokens)
        {
            var batch = new float[(long)Math.Min(batchTokens, tokens - done) * hidden];
            for (int i = 0; i < batch.Length; i++)
            {
                // Box–Muller: the test and benchmark streams need no better generator.
                double u = 1 - random.NextDouble(), v = random.NextDouble();
                batch[i] = (float)(Math.Sqrt(-2 * Math.Log(u)) * Math.Cos(2 * Math.PI * v));
            }
            yield return batch;
        }
    }

    private sealed class DelegateCalibration(Func<int, int, IEnumerable<float[]>> batches) : CalibrationSource
    {
        public override IEnumerable<float[]> Batches(int layer, int hiddenSize) => batches(layer, hiddenSize);
    }
}

/// <summary>
/// Calibration activations from a safetensors file: one tensor per layer (name pattern
/// <c>model.layers.{i}.self_attn.input</c> by default: the input of the layer's Q/K/V projections) of shape
/// <c>[…, hidden]</c>, any float type, read through the memory map in batches.
/// </summary>
public sealed class SafetensorsCalibration : CalibrationSource, IDisposable
{
    private readonly SafetensorsFile _file;

    /// <summary>Opens <paramref name="path"/>.</summary>
    /// <param name="path">The calibration file.</param>
    /// <param name="pattern">Tensor-name pattern with <c>{i}</c> for the layer.</param>
    /// <param name="maxTokens">Use at most this many tokens per layer (0: all).</param>
    /// <param name="batchTokens">Tokens per batch.</param>
    public SafetensorsCalibration(string path, string pattern = "model.layers.{i}.self_attn.input", long maxTokens = 0, int batchTokens = 512)
    {
        ArgumentException.ThrowIfNullOrEmpty(pattern);
        if (maxTokens < 0) throw new ArgumentException($"maxTokens is {maxTokens}; expected ≥ 0 (0: all).", nameof(maxTokens));
        if (batchTokens < 1) throw new ArgumentException($"batchTokens is {batchTokens}; expected ≥ 1.", nameof(batchTokens));
        _file = SafetensorsFile.Open(path);
        Pattern = pattern;
        MaxTokens = maxTokens;
        BatchTokens = batchTokens;
    }

    /// <summary>The tensor-name pattern.</summary>
    public string Pattern { get; }

    /// <summary>Token limit per layer (0: all).</summary>
    public long MaxTokens { get; }

    /// <summary>Tokens per batch.</summary>
    public int BatchTokens { get; }

    /// <summary>The file.</summary>
    public SafetensorsFile File => _file;

    /// <inheritdoc/>
    public override string Describe(int layer) => TensorNamePatterns.For(Pattern, layer);

    /// <inheritdoc/>
    /// <exception cref="CheckpointException">The layer's tensor is missing, not float, or its last dim is not the hidden size.</exception>
    public override IEnumerable<float[]> Batches(int layer, int hiddenSize)
    {
        string name = TensorNamePatterns.For(Pattern, layer);
        var tensor = _file.Find(name) ?? throw new CheckpointException(name,
            $"calibration tensor '{name}' is missing from {Path.GetFileName(_file.Path)} (expected [tokens, {hiddenSize}] activations per layer).");
        if (tensor.Shape.Count < 1 || tensor.Shape[^1] != hiddenSize || !tensor.DType.IsFloat())
            throw new CheckpointException(name, $"calibration tensor '{name}' is {tensor.DType.Name()} {tensor.ShapeText}; expected a float tensor [tokens, {hiddenSize}].");
        return Read(tensor, hiddenSize);
    }

    private IEnumerable<float[]> Read(SafetensorsTensor tensor, int hiddenSize)
    {
        long tokens = tensor.ElementCount / hiddenSize;
        if (MaxTokens > 0) tokens = Math.Min(tokens, MaxTokens);
        for (long done = 0; done < tokens; done += BatchTokens)
        {
            var batch = new float[Math.Min(BatchTokens, tokens - done) * hiddenSize];
            _file.ReadSingles(tensor, done * hiddenSize, batch);
            yield return batch;
        }
    }

    /// <summary>Unmaps the file.</summary>
    public void Dispose() => _file.Dispose();
}
