using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace KvKernels.Conversion;

/// <summary>Where a conversion stands: reported once when it starts and after each layer is written.</summary>
/// <param name="Stage">What is being done (<c>"layer 3"</c>, <c>"copying other files"</c> …).</param>
/// <param name="LayersDone">Layers converted and written.</param>
/// <param name="Layers">Layers in all.</param>
/// <param name="BytesWritten">Bytes of tensor data written so far.</param>
/// <param name="BytesTotal">Bytes the output will have.</param>
public sealed record ConversionProgress(string Stage, int LayersDone, int Layers, long BytesWritten, long BytesTotal);

/// <summary>Retained energy of one layer's compression (share of the key and value moments' trace kept).</summary>
/// <param name="Layer">Layer index.</param>
/// <param name="KeyEnergy">Keys, 0..1.</param>
/// <param name="ValueEnergy">Values, 0..1.</param>
/// <param name="CalibrationTokens">Calibration tokens the moments were accumulated over.</param>
public sealed record LayerEnergy(int Layer, double KeyEnergy, double ValueEnergy, long CalibrationTokens);

/// <summary>What a conversion did.</summary>
public sealed record ConversionReport
{
    /// <summary>The conversion (<c>gqa</c>, <c>svd</c>, <c>mla-fold</c>) and its parameters, in words.</summary>
    public required string Description { get; init; }

    /// <summary>Input path.</summary>
    public required string Input { get; init; }

    /// <summary>Output path (moved into place).</summary>
    public required string Output { get; init; }

    /// <summary>Layers converted.</summary>
    public required int Layers { get; init; }

    /// <summary>KV-cache bytes per token (all layers, the checkpoint's element type) before.</summary>
    public required long CacheBytesPerTokenBefore { get; init; }

    /// <summary>KV-cache bytes per token after.</summary>
    public required long CacheBytesPerTokenAfter { get; init; }

    /// <summary>What the cache holds before and after, in words.</summary>
    public required string CacheDescription { get; init; }

    /// <summary>Per-layer retained energy (SVD compression only).</summary>
    public IReadOnlyList<LayerEnergy> Energy { get; init; } = [];

    /// <summary>Bytes of the input's safetensors files.</summary>
    public required long BytesRead { get; init; }

    /// <summary>Bytes of the output's safetensors files.</summary>
    public required long BytesWritten { get; init; }

    /// <summary>Wall time, start to commit.</summary>
    public required TimeSpan Elapsed { get; init; }

    /// <summary>The output's config (null when the input had none).</summary>
    public ModelConfig? Config { get; init; }

    /// <summary>(Bytes read + written) / wall time, in MB/s (10⁶ B).</summary>
    public double MegabytesPerSecond => Elapsed.TotalSeconds > 0 ? (BytesRead + BytesWritten) / 1e6 / Elapsed.TotalSeconds : 0;
}

/// <summary>
/// One layer's rewrite: the source tensors it replaces, the tensors it writes (each placed where its anchor tensor
/// stood in the source file order), and the computation, run when the first of them is due and released after the last.
/// </summary>
internal sealed class LayerRewrite(int layer, IReadOnlyList<string> consumes, IReadOnlyList<(string Anchor, TensorDeclaration Output)> produces,
    Func<IReadOnlyDictionary<string, float[]>> compute)
{
    public int Layer { get; } = layer;
    public IReadOnlyList<string> Consumes { get; } = consumes;
    public IReadOnlyList<(string Anchor, TensorDeclaration Output)> Produces { get; } = produces;
    public Func<IReadOnlyDictionary<string, float[]>> Compute { get; } = compute;
}

/// <summary>
/// Streams a checkpoint to its converted copy: shard by shard, tensor by tensor in the source order; untouched tensors
/// are copied byte for byte from the memory map, rewritten ones computed per layer on demand. The output (a directory
/// mirroring the input's shards, index, config and other files, or a single file) is staged under a temporary name and
/// moved into place only when complete.
/// </summary>
internal static class CheckpointRewriter
{
    private enum EntryKind { Copy, Produce }

    private sealed record Entry(EntryKind Kind, TensorDeclaration Declaration, SafetensorsFile? Source, SafetensorsTensor? Tensor, LayerRewrite? Rewrite);

    public static (long BytesWritten, TimeSpan Elapsed) Run(Checkpoint input, string output, bool overwrite, IReadOnlyList<LayerRewrite> rewrites,
        ModelConfig? config, string description, IProgress<ConversionProgress>? progress, CancellationToken cancellation)
    {
        var clock = Stopwatch.StartNew();
        var consumedBy = new Dictionary<string, LayerRewrite>(StringComparer.Ordinal);
        var anchors = new Dictionary<string, List<(LayerRewrite, TensorDeclaration)>>(StringComparer.Ordinal);
        foreach (var rewrite in rewrites)
        {
            foreach (string name in rewrite.Consumes)
            {
                input.Get(name);
                if (!consumedBy.TryAdd(name, rewrite)) throw new InvalidOperationException($"tensor '{name}' is rewritten twice.");
            }
            foreach (var (anchor, declaration) in rewrite.Produces)
            {
                input.Get(anchor);
                if (!anchors.TryGetValue(anchor, out var list)) anchors[anchor] = list = [];
                list.Add((rewrite, declaration));
            }
        }

        // The plan: every output file's tensors in order.
        var plan = new List<(string FileName, SafetensorsFile Source, List<Entry> Entries)>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var file in input.Files)
        {
            var entries = new List<Entry>();
            foreach (var tensor in file.Tensors)
            {
                if (!consumedBy.ContainsKey(tensor.Name)) entries.Add(new Entry(EntryKind.Copy, tensor.Declaration, file, tensor, null));
                if (anchors.TryGetValue(tensor.Name, out var produced))
                    foreach (var (rewrite, declaration) in produced) entries.Add(new Entry(EntryKind.Produce, declaration, null, null, rewrite));
            }
            foreach (var e in entries)
                if (!names.Add(e.Declaration.Name)) throw new CheckpointException(e.Declaration.Name, $"the output would hold tensor '{e.Declaration.Name}' twice.");
            plan.Add((Path.GetFileName(file.Path), file, entries));
        }
        long totalBytes = plan.Sum(p => p.Entries.Sum(e => e.Declaration.ByteLength));
        var remaining = rewrites.ToDictionary(r => r, r => r.Produces.Count);
        var computed = new Dictionary<LayerRewrite, IReadOnlyDictionary<string, float[]>>();
        int layersDone = 0;
        long written = 0, fileBytes = 0;
        progress?.Report(new ConversionProgress("starting", 0, rewrites.Count, 0, totalBytes));

        // Layers are computed one ahead on a worker while this thread writes, so computation hides behind I/O. At most
        // one computation runs at a time (calibration sources are read in layer order, never concurrently).
        var order = plan.SelectMany(p => p.Entries).Where(e => e.Kind == EntryKind.Produce).Select(e => e.Rewrite!).Distinct().ToList();
        var pending = new Dictionary<LayerRewrite, Task<IReadOnlyDictionary<string, float[]>>>();
        int next = 0;
        void StartNext()
        {
            if (next < order.Count && !cancellation.IsCancellationRequested)
            {
                var rewrite = order[next++];
                pending[rewrite] = Task.Run(rewrite.Compute, cancellation);
            }
        }

        IReadOnlyDictionary<string, float[]> Results(LayerRewrite rewrite)
        {
            if (computed.TryGetValue(rewrite, out var results)) return results;
            progress?.Report(new ConversionProgress($"layer {rewrite.Layer}", layersDone, rewrites.Count, written, totalBytes));
            while (!pending.ContainsKey(rewrite) && next < order.Count) StartNext();
            results = pending[rewrite].GetAwaiter().GetResult();
            pending.Remove(rewrite);
            computed[rewrite] = results;
            if (pending.Count == 0) StartNext();
            return results;
        }

        void WriteFile(string path, SafetensorsFile source, List<Entry> entries)
        {
            var metadata = new Dictionary<string, string>(source.Metadata, StringComparer.Ordinal) { ["kvkernels.conversion"] = description };
            // A single-file output has no directory for its config: the updated config travels in the metadata.
            if (!input.IsDirectory && config is not null) metadata["kvkernels.config"] = config.Json.ToJsonString();
            using var writer = SafetensorsWriter.Create(path, entries.Select(e => e.Declaration).ToList(), metadata, overwrite);
            foreach (var entry in entries)
            {
                cancellation.ThrowIfCancellationRequested();
                if (entry.Kind == EntryKind.Copy)
                {
                    entry.Source!.CopyTo(entry.Tensor!, writer);
                }
                else
                {
                    var rewrite = entry.Rewrite!;
                    var values = Results(rewrite).TryGetValue(entry.Declaration.Name, out var v) ? v
                        : throw new InvalidOperationException($"layer {rewrite.Layer} computed no '{entry.Declaration.Name}'.");
                    if (values.LongLength != entry.Declaration.ElementCount)
                        throw new InvalidOperationException($"layer {rewrite.Layer} computed {values.LongLength} elements for '{entry.Declaration.Name}'; {entry.Declaration.ElementCount} declared.");
                    writer.WriteTensor(entry.Declaration.Name, values);
                    if (--remaining[rewrite] == 0)
                    {
                        computed.Remove(rewrite); // the layer is complete: release its weights
                        progress?.Report(new ConversionProgress($"layer {rewrite.Layer}", ++layersDone, rewrites.Count, written + entry.Declaration.ByteLength, totalBytes));
                    }
                }
                written += entry.Declaration.ByteLength;
            }
            writer.Complete();
            fileBytes += writer.TotalBytes;
        }

        try
        {
            WriteAll();
        }
        finally
        {
            // A computation still running reads the input's memory maps: it must end before the caller unmaps them.
            foreach (var task in pending.Values)
                try
                {
                    task.Wait(CancellationToken.None);
                }
                catch (Exception)
                {
                    // Its failure is not this call's: the conversion already failed (or finished) for another reason.
                }
        }
        progress?.Report(new ConversionProgress("done", layersDone, rewrites.Count, written, totalBytes));
        return (fileBytes, clock.Elapsed);

        void WriteAll()
        {
            if (!input.IsDirectory)
            {
                if (plan.Count != 1) throw new InvalidOperationException("a single-file checkpoint has one file.");
                WriteFile(output, plan[0].Source, plan[0].Entries);
            }
            else
            {
                using var staged = StagedDirectory.Create(output, overwrite);
                foreach (var (fileName, source, entries) in plan) WriteFile(staged.PathOf(fileName), source, entries);
                progress?.Report(new ConversionProgress("config, index and other files", layersDone, rewrites.Count, written, totalBytes));
                if (config is not null) File.WriteAllText(staged.PathOf(Checkpoint.ConfigFileName), config.ToJsonString() + "\n");
                if (input.HasIndex) WriteIndex(staged.PathOf(Checkpoint.IndexFileName), input, plan.Select(p => (p.FileName, p.Entries.Select(e => e.Declaration))));
                foreach (string other in input.OtherFiles) File.Copy(Path.Combine(input.Path, other), staged.PathOf(other));
                staged.Commit();
            }
        }
    }

    private static void WriteIndex(string path, Checkpoint input, IEnumerable<(string FileName, IEnumerable<TensorDeclaration> Tensors)> files)
    {
        var map = new JsonObject();
        long total = 0;
        foreach (var (fileName, tensors) in files)
            foreach (var t in tensors)
            {
                map[t.Name] = fileName;
                total += t.ByteLength;
            }
        var metadata = (JsonObject?)input.IndexMetadata?.DeepClone() ?? [];
        metadata["total_size"] = total;
        var root = new JsonObject { ["metadata"] = metadata, ["weight_map"] = map };
        File.WriteAllText(path, root.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }
}
