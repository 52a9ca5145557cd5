using System.Text.Json;
using System.Text.Json.Nodes;

namespace KvKernels.Conversion;

/// <summary>
/// A model checkpoint opened for reading: a Hugging Face model directory (<c>config.json</c> plus
/// <c>model.safetensors</c>, or shards listed by <c>model.safetensors.index.json</c>), or a single <c>.safetensors</c>
/// file (with a <c>config.json</c> beside it when there is one). Every shard is memory-mapped; nothing is loaded whole.
/// </summary>
public sealed class Checkpoint : IDisposable
{
    /// <summary>The index file name of sharded Hugging Face checkpoints.</summary>
    public const string IndexFileName = "model.safetensors.index.json";

    /// <summary>The config file name.</summary>
    public const string ConfigFileName = "config.json";

    private readonly Dictionary<string, (SafetensorsFile File, SafetensorsTensor Tensor)> _tensors = new(StringComparer.Ordinal);
    private readonly List<SafetensorsFile> _files = [];

    private Checkpoint(string path, bool isDirectory)
    {
        Path = path;
        IsDirectory = isDirectory;
    }

    /// <summary>The directory or file opened.</summary>
    public string Path { get; }

    /// <summary>Whether <see cref="Path"/> is a model directory.</summary>
    public bool IsDirectory { get; }

    /// <summary>The shards, in index order (or by name).</summary>
    public IReadOnlyList<SafetensorsFile> Files => _files;

    /// <summary>The config, when the directory (or the file's directory) has one.</summary>
    public ModelConfig? Config { get; private set; }

    /// <summary>Whether the directory has a shard index.</summary>
    public bool HasIndex { get; private set; }

    /// <summary>The index's <c>metadata</c> object (other than total_size), when there is an index.</summary>
    public JsonObject? IndexMetadata { get; private set; }

    /// <summary>Files of the directory other than weights, index and config (tokenizer, generation config …), which a
    /// conversion copies unchanged.</summary>
    public IReadOnlyList<string> OtherFiles { get; private set; } = [];

    /// <summary>Every tensor name.</summary>
    public IEnumerable<string> TensorNames => _tensors.Keys;

    /// <summary>Total bytes of the safetensors files.</summary>
    public long TotalFileBytes => _files.Sum(f => f.FileLength);

    /// <summary>Opens a model directory or a single safetensors file.</summary>
    /// <exception cref="FileNotFoundException">Nothing at <paramref name="path"/>, or a directory without safetensors files.</exception>
    /// <exception cref="InvalidDataException">A malformed file, or the same tensor in two shards.</exception>
    public static Checkpoint Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        path = System.IO.Path.GetFullPath(path);
        bool isDirectory = Directory.Exists(path);
        if (!isDirectory && !File.Exists(path)) throw new FileNotFoundException($"No checkpoint at '{path}'.", path);
        var checkpoint = new Checkpoint(path, isDirectory);
        try
        {
            checkpoint.Load();
            return checkpoint;
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    private void Load()
    {
        string directory = IsDirectory ? Path : System.IO.Path.GetDirectoryName(Path)!;
        string configPath = System.IO.Path.Combine(directory, ConfigFileName);
        if (File.Exists(configPath)) Config = ModelConfig.Load(configPath);

        IEnumerable<string> shardNames;
        if (!IsDirectory)
        {
            shardNames = [System.IO.Path.GetFileName(Path)];
        }
        else if (File.Exists(System.IO.Path.Combine(Path, IndexFileName)))
        {
            HasIndex = true;
            shardNames = ReadIndex(System.IO.Path.Combine(Path, IndexFileName));
        }
        else
        {
            shardNames = Directory.EnumerateFiles(Path, "*.safetensors").Select(System.IO.Path.GetFileName).Order(StringComparer.Ordinal).ToList()!;
            if (!shardNames.Any()) throw new FileNotFoundException($"'{Path}' has no *.safetensors file.", Path);
        }

        foreach (string name in shardNames)
        {
            var file = SafetensorsFile.Open(System.IO.Path.Combine(directory, name));
            _files.Add(file);
            foreach (var tensor in file.Tensors)
                if (!_tensors.TryAdd(tensor.Name, (file, tensor)))
                    throw new CheckpointException(tensor.Name, $"tensor '{tensor.Name}' is in both {System.IO.Path.GetFileName(_tensors[tensor.Name].File.Path)} and {name}.");
        }
        if (_index is not null)
            foreach (var (tensor, shard) in _index)
                if (!_tensors.TryGetValue(tensor, out var found) || System.IO.Path.GetFileName(found.File.Path) != shard)
                    throw new CheckpointException(tensor, $"{IndexFileName} maps '{tensor}' to {shard}, which does not hold it.");

        if (IsDirectory)
        {
            var weights = new HashSet<string>(_files.Select(f => System.IO.Path.GetFileName(f.Path)), StringComparer.Ordinal) { IndexFileName, ConfigFileName };
            OtherFiles = Directory.EnumerateFiles(Path).Select(p => System.IO.Path.GetFileName(p)!)
                .Where(n => !weights.Contains(n) && !n.EndsWith(".safetensors", StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToList();
        }
    }

    private Dictionary<string, string>? _index;

    private List<string> ReadIndex(string indexPath)
    {
        JsonObject? root;
        try
        {
            root = JsonNode.Parse(File.ReadAllBytes(indexPath)) as JsonObject;
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"{indexPath} is not valid JSON ({e.Message}).", e);
        }
        if (root?["weight_map"] is not JsonObject map) throw new CheckpointException($"{indexPath} has no weight_map object.");
        _index = new Dictionary<string, string>(StringComparer.Ordinal);
        var shards = new List<string>();
        foreach (var (tensor, node) in map)
        {
            if (node is not JsonValue v || !v.TryGetValue(out string? shard) || shard.Contains('/') || shard.Contains('\\') || shard is "." or "..")
                throw new CheckpointException(tensor, $"{IndexFileName}: weight_map['{tensor}'] is not a file name in the directory.");
            _index[tensor] = shard;
            if (!shards.Contains(shard)) shards.Add(shard);
        }
        if (root["metadata"] is JsonObject metadata)
        {
            IndexMetadata = (JsonObject)metadata.DeepClone();
            IndexMetadata.Remove("total_size");
        }
        return shards;
    }

    /// <summary>Whether the checkpoint has a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _tensors.ContainsKey(name);

    /// <summary>The tensor and its shard.</summary>
    /// <exception cref="CheckpointException">No such tensor (the message names it).</exception>
    public (SafetensorsFile File, SafetensorsTensor Tensor) Get(string name) =>
        _tensors.TryGetValue(name, out var found) ? found
            : throw new CheckpointException(name, $"tensor '{name}' is missing from {System.IO.Path.GetFileName(Path)}" +
                (_tensors.Count > 0 ? $" (it has {_tensors.Count} tensors, e.g. '{_tensors.Keys.First()}')." : "."));

    /// <summary>The tensor, checked to be a float tensor of shape <paramref name="shape"/>.</summary>
    /// <exception cref="CheckpointException">Missing, not a float type, or another shape (the message names the tensor
    /// and both shapes).</exception>
    public (SafetensorsFile File, SafetensorsTensor Tensor) GetFloat(string name, params long[] shape)
    {
        var found = Get(name);
        var t = found.Tensor;
        if (!t.DType.IsFloat())
            throw new CheckpointException(name, $"tensor '{name}' is {t.DType.Name()}; expected F16, BF16, F32 or F64.");
        if (!t.HasShape(shape))
            throw new CheckpointException(name, $"tensor '{name}' has shape {t.ShapeText}; expected {SafetensorsHeader.ShapeText(shape)}.");
        return found;
    }

    /// <summary>Reads a whole float tensor of shape <paramref name="shape"/> as fp32.</summary>
    public float[] ReadSingles(string name, params long[] shape)
    {
        var (file, tensor) = GetFloat(name, shape);
        return file.ReadSingles(tensor);
    }

    /// <summary>Unmaps every shard.</summary>
    public void Dispose()
    {
        foreach (var file in _files) file.Dispose();
        _files.Clear();
    }
}
