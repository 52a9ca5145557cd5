using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using KvCheck.Cli;
using KvKernels.Attention;
using KvKernels.Conversion;
using Spectre.Console;

namespace KvCheck.Commands;

/// <summary>
/// <c>KvCheck convert gqa|svd|mla-fold</c>: offline KV-head reduction of a checkpoint (a Hugging Face model directory or a
/// single safetensors file) through <see cref="CheckpointConverter"/>, with a progress bar per layer and a summary of the
/// KV-cache bytes per token before and after.
/// </summary>
internal static class ConvertCommand
{
    public static Command Create()
    {
        var command = new Command("convert",
            "Reduce the KV heads of a checkpoint offline (Hugging Face model directory or .safetensors file; streamed layer by " +
            "layer, written under a temporary name and moved into place only when complete): gqa (mean or weighted pooling), " +
            "svd (calibrated principal directions, RoPE-compatible), mla-fold (absorbed MLA weights).");
        command.Subcommands.Add(Gqa());
        command.Subcommands.Add(Svd());
        command.Subcommands.Add(MlaFold());
        command.Subcommands.Add(Bench());
        return command;
    }

    private sealed record Common(Option<string> In, Option<string> Out, Option<FileInfo?> Names, Option<FileInfo?> Config, Option<bool> Force);

    private static Common AddCommon(Command command, bool attention)
    {
        var input = new Option<string>("--in") { Description = "The checkpoint: a model directory (config.json + *.safetensors, sharded or not) or one .safetensors file.", Required = true, HelpName = "PATH" };
        var output = new Option<string>("--out") { Description = "Where to write: a directory for a directory input, a file for a file input.", Required = true, HelpName = "PATH" };
        var names = new Option<FileInfo?>("--names")
        {
            Description = attention
                ? "JSON overriding tensor-name patterns ({i} = layer): query, key, value, output, queryBias, keyBias, valueBias. Default: Hugging Face Llama (model.layers.{i}.self_attn.q_proj.weight …)."
                : "JSON overriding tensor-name patterns ({i} = layer): queryUp, queryDirect, kvUp, output, absorbedQuery, absorbedOutput. Default: DeepSeek-V2/V3 Hugging Face names.",
            HelpName = "FILE",
        };
        var config = new Option<FileInfo?>("--config") { Description = "config.json to use instead of the one beside the input (needed for a lone .safetensors file).", HelpName = "FILE" };
        var force = new Option<bool>("--force") { Description = "Replace an existing output (only once the new one is complete)." };
        foreach (var option in new Option[] { input, output, names, config, force }) command.Options.Add(option);
        return new Common(input, output, names, config, force);
    }

    private static Option<int> GroupsOption() => new("--groups")
    {
        Description = "KV heads after conversion (GQA-G; 1 = MQA); must divide the model's KV heads.",
        Required = true,
        HelpName = "G",
    };

    private static Command Gqa()
    {
        var command = new Command("gqa", "MHA → GQA/MQA: mean-pool the K and V projection heads of each group (GQA), or weight them (WGQA, --weights); Q and O unchanged.");
        var common = AddCommon(command, attention: true);
        var groups = GroupsOption();
        var weights = new Option<FileInfo?>("--weights")
        {
            Description = "WGQA weights: a safetensors file with model.layers.{i}.self_attn.k_head_weights and .v_head_weights, [Hkv] or [Hkv, D] each (a layer without them is mean-pooled).",
            HelpName = "FILE",
        };
        command.Options.Add(groups);
        command.Options.Add(weights);
        command.SetAction(parse => Program.Guard(() => Convert(parse, common, (input, output, progress) =>
        {
            var geometry = Geometry(parse.GetValue(common.Config));
            var options = new GqaConversionOptions(parse.GetValue(groups))
            {
                Names = ReadNames(parse.GetValue(common.Names), AttentionTensorNames.FromJson) ?? new AttentionTensorNames(),
                Geometry = geometry,
                Overwrite = parse.GetValue(common.Force),
            };
            if (parse.GetValue(weights) is { } file)
            {
                int layers = geometry?.Layers ?? LayersOf(input);
                options = options.WithHeadWeightsFrom(file.FullName, layers);
            }
            return CheckpointConverter.ConvertToGqa(input, output, options, progress);
        })));
        return command;
    }

    private static Command Svd()
    {
        var command = new Command("svd",
            "SVD-based compression: per layer, K/V moments over calibration activations, top principal directions per group (for RoPE " +
            "keys one complex direction per frequency plane, which commutes with RoPE), folded into W_Q, W_K, W_V, W_O.");
        var common = AddCommon(command, attention: true);
        var groups = GroupsOption();
        var calibration = new Option<FileInfo>("--calibration")
        {
            Description = "Safetensors file of calibration activations: per layer the input of the Q/K/V projections (after the input norm), [tokens, hidden] (any leading dims), any float type.",
            Required = true,
            HelpName = "FILE",
        };
        var pattern = new Option<string>("--calibration-tensor")
        {
            Description = "Name pattern of the calibration tensors ({i} = layer).",
            DefaultValueFactory = _ => "model.layers.{i}.self_attn.input",
            HelpName = "PATTERN",
        };
        var maxTokens = new Option<long>("--max-tokens") { Description = "Use at most this many calibration tokens per layer (0: all).", HelpName = "N" };
        var rope = new Option<string>("--rope")
        {
            Description = "How the keys are rotated: rotate-half (Hugging Face Llama-family checkpoints), interleaved (Meta/DeepSeek layout), none (no RoPE).",
            DefaultValueFactory = _ => "rotate-half",
        };
        rope.AcceptOnlyFromAmong("rotate-half", "interleaved", "none");
        var rank = new Option<int>("--rank") { Description = "Key and value dims per compressed head (default: the head dim). Only models without RoPE may change it; head_dim is then updated and W_Q rescaled to keep the logits.", HelpName = "R" };
        foreach (var option in new Option[] { groups, calibration, pattern, maxTokens, rope, rank }) command.Options.Add(option);
        command.Validators.Add(result =>
        {
            if (result.GetValue(maxTokens) < 0) result.AddError("--max-tokens must be ≥ 0.");
            if (result.GetValue(rank) < 0) result.AddError("--rank must be ≥ 1.");
        });
        command.SetAction(parse => Program.Guard(() => Convert(parse, common, (input, output, progress) =>
        {
            var style = parse.GetValue(rope) switch { "none" => RopeStyle.None, "interleaved" => RopeStyle.Interleaved, _ => RopeStyle.RotateHalf };
            var options = new SvdConversionOptions(new KvCompressionOptions(parse.GetValue(groups)) { KeyRank = parse.GetValue(rank), ValueRank = parse.GetValue(rank) })
            {
                Names = ReadNames(parse.GetValue(common.Names), AttentionTensorNames.FromJson) ?? new AttentionTensorNames(),
                Geometry = Geometry(parse.GetValue(common.Config)),
                Rope = style,
                Overwrite = parse.GetValue(common.Force),
            };
            using var source = new SafetensorsCalibration(parse.GetValue(calibration)!.FullName, parse.GetValue(pattern)!, parse.GetValue(maxTokens));
            return CheckpointConverter.CompressWithSvd(input, output, options, source, progress);
        })));
        return command;
    }

    private static Command MlaFold()
    {
        var command = new Command("mla-fold",
            "MLA (DeepSeek-V2/V3): write absorbed weights, W_UKᵀ·W_UQ per head as the query projection over the latent and W_O·W_UV as the output projection, in place of q_b_proj/kv_b_proj/o_proj.");
        var common = AddCommon(command, attention: false);
        var keep = new Option<bool>("--keep-unabsorbed") { Description = "Keep the original projections beside the absorbed ones (for engines that prefill unabsorbed)." };
        command.Options.Add(keep);
        command.SetAction(parse => Program.Guard(() => Convert(parse, common, (input, output, progress) =>
        {
            var options = new MlaFoldOptions
            {
                Names = ReadNames(parse.GetValue(common.Names), MlaTensorNames.FromJson) ?? new MlaTensorNames(),
                Geometry = parse.GetValue(common.Config) is { } config ? ModelConfig.Load(config.FullName).ToMlaGeometry() : null,
                KeepUnabsorbed = parse.GetValue(keep),
                Overwrite = parse.GetValue(common.Force),
            };
            return CheckpointConverter.FoldMla(input, output, options, progress);
        })));
        return command;
    }

    private static AttentionGeometry? Geometry(FileInfo? config) => config is null ? null : ModelConfig.Load(config.FullName).ToAttentionGeometry();

    private static int LayersOf(string input)
    {
        using var checkpoint = Checkpoint.Open(input);
        return checkpoint.Config?.ToAttentionGeometry().Layers
            ?? throw new ArgumentException($"'{input}' has no config.json; pass --config.", "--config");
    }

    private static T? ReadNames<T>(FileInfo? file, Func<JsonObject, T> parse) where T : class
    {
        if (file is null) return null;
        JsonNode? node;
        try
        {
            node = JsonNode.Parse(File.ReadAllText(file.FullName));
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"--names {file.FullName} is not valid JSON: {e.Message}", "--names", e);
        }
        return node is JsonObject o ? parse(o) : throw new ArgumentException($"--names {file.FullName} is not a JSON object.", "--names");
    }

    /// <summary>Runs one conversion under a progress bar (terminal) or one line per layer (redirected), then prints the summary.
    /// Bad options exit 64; a checkpoint that cannot be converted (missing or misshapen tensors, I/O) exits 1.</summary>
    private static int Convert(ParseResult parse, Common common, Func<string, string, IProgress<ConversionProgress>, ConversionReport> run)
    {
        string input = parse.GetValue(common.In)!, output = parse.GetValue(common.Out)!;
        if (!parse.GetValue(common.Force) && (File.Exists(output) || Directory.Exists(output)))
        {
            Ui.Error($"'{Path.GetFullPath(output)}' exists; pass --force to replace it (the old one stays until the new one is complete).");
            return ExitCodes.CheckFailed;
        }
        ConversionReport report;
        try
        {
            report = WithProgress(progress => run(input, output, progress));
        }
        catch (ArgumentException e)
        {
            Ui.Error("Bad options: " + e.Message);
            return ExitCodes.Usage;
        }
        catch (Exception e) when (e is CheckpointException or InvalidDataException or IOException or UnauthorizedAccessException)
        {
            Ui.Error("Conversion failed (nothing was written): " + e.Message);
            return ExitCodes.CheckFailed;
        }
        WriteSummary(report);
        return ExitCodes.Success;
    }

    private static ConversionReport WithProgress(Func<IProgress<ConversionProgress>, ConversionReport> run)
    {
        if (Ui.Plain)
        {
            int last = -1;
            return run(new Reporter(p =>
            {
                if (p.LayersDone == last || p.Layers == 0) return;
                last = p.LayersDone;
                Ui.Line($"[{p.LayersDone}/{p.Layers}] layers written, {Ui.Bytes(p.BytesWritten)} of {Ui.Bytes(p.BytesTotal)}");
            }));
        }
        ConversionReport? report = null;
        AnsiConsole.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                ProgressTask? task = null;
                report = run(new Reporter(p =>
                {
                    task ??= ctx.AddTask("layers", maxValue: Math.Max(p.Layers, 1));
                    task.Value = p.LayersDone;
                    task.Description = Markup.Escape($"{p.Stage} ({p.LayersDone}/{p.Layers}, {Ui.Bytes(p.BytesWritten)} of {Ui.Bytes(p.BytesTotal)})");
                }));
                if (task is not null) task.Value = task.MaxValue;
            });
        return report!;
    }

    private static void WriteSummary(ConversionReport r)
    {
        Ui.Line();
        Ui.Heading(r.Description);
        double ratio = r.CacheBytesPerTokenAfter > 0 ? (double)r.CacheBytesPerTokenBefore / r.CacheBytesPerTokenAfter : double.NaN;
        var table = new TextTable(null, ("", false), ("", false));
        table.AddRow(false, "KV cache per token", $"{r.CacheBytesPerTokenBefore:N0} B → {r.CacheBytesPerTokenAfter:N0} B ({Ui.F(ratio, 2)}× smaller)");
        table.AddRow(false, "cache layout", r.CacheDescription);
        table.AddRow(false, "layers", r.Layers.ToString(Ui.Invariant));
        table.AddRow(false, "read / written", $"{Ui.Bytes(r.BytesRead)} / {Ui.Bytes(r.BytesWritten)}");
        table.AddRow(false, "time", $"{Ui.F(r.Elapsed.TotalSeconds, 2)} s ({Ui.F(r.MegabytesPerSecond, 0)} MB/s read + written)");
        table.AddRow(false, "output", r.Output);
        table.Write();
        if (r.Energy.Count > 0)
        {
            Ui.Line();
            var energy = new TextTable("Retained energy per layer (share of the K/V second moments kept)",
                ("Layer", true), ("Keys %", true), ("Values %", true), ("Calibration tokens", true));
            foreach (var e in r.Energy)
                energy.AddRow(false, e.Layer.ToString(Ui.Invariant), Ui.F(100 * e.KeyEnergy, 2), Ui.F(100 * e.ValueEnergy, 2), e.CalibrationTokens.ToString("N0", Ui.Invariant));
            energy.Write();
        }
    }

    private static Command Bench()
    {
        var command = new Command("bench",
            "Generate a Llama-2-7B-shaped fp16 checkpoint (two shards + index, never kept) and time, in the same run, a plain copy " +
            "of its files and `convert gqa --groups 8`, alternating, then `convert svd --groups 8` on a few layers against its own " +
            "copy: seconds, MB/s (bytes read + written) and % of the copy's MB/s.");
        var layers = new Option<int>("--layers") { Description = "Decoder layers of the generated checkpoint (32 = 7B: 13.5 GB).", DefaultValueFactory = _ => 32, HelpName = "N" };
        var svdLayers = new Option<int>("--svd-layers") { Description = "Layers of the checkpoint the SVD conversion runs on (compute-bound on the CPU; 0 skips it).", DefaultValueFactory = _ => 2, HelpName = "N" };
        var runs = new Option<int>("--runs") { Description = "Copy/convert pairs to time (the median is reported).", DefaultValueFactory = _ => 3, HelpName = "N" };
        var directory = new Option<DirectoryInfo?>("--dir") { Description = "Where to generate (default: the temp folder); needs about 2.1× the checkpoint free.", HelpName = "DIR" };
        foreach (var option in new Option[] { layers, svdLayers, runs, directory }) command.Options.Add(option);
        command.SetAction(parse =>
        {
            // Checked here rather than in a command validator, which does not see the options' default values.
            int n = parse.GetValue(layers), svd = parse.GetValue(svdLayers), count = parse.GetValue(runs);
            if (n < 1 || svd < 0 || count < 1)
            {
                Ui.Error("--layers and --runs must be ≥ 1, --svd-layers ≥ 0.");
                return ExitCodes.Usage;
            }
            return Program.Guard(() => RunBench(n, svd, count, parse.GetValue(directory)?.FullName ?? Path.GetTempPath()));
        });
        return command;
    }

    private sealed record BenchRow(string Case, long BytesRead, long BytesWritten, List<double> Seconds)
    {
        public double Median => Seconds.Order().ElementAt(Seconds.Count / 2);

        public double MegabytesPerSecond => (BytesRead + BytesWritten) / 1e6 / Median;
    }

    private static int RunBench(int layers, int svdLayers, int runs, string root)
    {
        var rows = new List<(BenchRow Row, BenchRow Copy)>();
        using (var model = SyntheticCheckpoint.Create(root, layers))
        {
            Ui.Line($"Generated {model} in {Ui.F(model.GenerateSeconds, 1)} s ({Ui.F(model.InputBytes / 1e6 / model.GenerateSeconds, 0)} MB/s written).");
            var copy = new BenchRow("plain copy", model.InputBytes, model.InputBytes, []);
            var gqa = new BenchRow("gqa --groups 8 (mean)", model.InputBytes, 0, []);
            for (int run = 0; run < runs; run++)
            {
                // Alternate the order, so neither side always finds the other's reads in the page cache.
                foreach (bool copyFirst in run % 2 == 0 ? new[] { true, false } : [false, true])
                {
                    if (copyFirst) copy.Seconds.Add(model.Time(model.PlainCopy));
                    else
                    {
                        long written = 0;
                        gqa.Seconds.Add(model.Time(() => written = CheckpointConverter.ConvertToGqa(model.Input, model.Output, new GqaConversionOptions(8)).BytesWritten));
                        gqa = gqa with { BytesWritten = written };
                    }
                    Ui.Line($"run {run + 1}/{runs}: {(copyFirst ? "copy" : "gqa")} {Ui.F((copyFirst ? copy : gqa).Seconds[^1], 2)} s");
                }
            }
            rows.Add((copy, copy));
            rows.Add((gqa, copy));
        }
        if (svdLayers > 0)
        {
            using var model = SyntheticCheckpoint.Create(root, svdLayers);
            var copy = new BenchRow($"plain copy ({svdLayers} layers)", model.InputBytes, model.InputBytes, [model.Time(model.PlainCopy)]);
            long written = 0;
            var svd = new BenchRow($"svd --groups 8, 256 calibration tokens ({svdLayers} layers)", model.InputBytes, 0, [model.Time(() =>
                written = CheckpointConverter.CompressWithSvd(model.Input, model.Output, new SvdConversionOptions(new KvCompressionOptions(8)),
                    CalibrationSource.Gaussian(256)).BytesWritten)]);
            rows.Add((copy, copy));
            rows.Add((svd with { BytesWritten = written }, copy));
        }

        Ui.Line();
        var table = new TextTable($"Checkpoint conversion vs a plain copy of the same files, same run ({Environment.ProcessorCount} cores; page cache not dropped)",
            ("Case", false), ("Read", true), ("Written", true), ("Median s", true), ("Runs", true), ("MB/s (read + written)", true), ("% of copy", true));
        foreach (var (row, copy) in rows)
            table.AddRow(false, row.Case, Ui.Bytes(row.BytesRead), Ui.Bytes(row.BytesWritten), Ui.F(row.Median, 2), row.Seconds.Count.ToString(Ui.Invariant),
                Ui.F(row.MegabytesPerSecond, 0), Ui.Floor(100 * row.MegabytesPerSecond / copy.MegabytesPerSecond, 1));
        table.Write();
        return ExitCodes.Success;
    }

    /// <summary>
    /// A synthetic Llama-2-7B-shaped fp16 checkpoint: hidden 4096, 32 heads of 128 (MHA), FFN 11008, vocab 32000, split in
    /// two shards at ~70 % of the bytes with an index, as the Hub's 7B checkpoints are. Values are small random fp16
    /// numbers (a 8 MiB block, read at shifting offsets). Deleted on dispose.
    /// </summary>
    private sealed class SyntheticCheckpoint : IDisposable
    {
        private const int Hidden = 4096, Heads = 32, Ffn = 11008, Vocab = 32000;

        private SyntheticCheckpoint(string directory, int layers)
        {
            Directory = directory;
            Layers = layers;
        }

        public string Directory { get; }

        public int Layers { get; }

        public long InputBytes { get; private set; }

        public double GenerateSeconds { get; private set; }

        public string Input => Path.Combine(Directory, "in");

        public string Output => Path.Combine(Directory, "out");

        public override string ToString() => $"a Llama-7B-shaped fp16 checkpoint of {Layers} layers ({Ui.Bytes(InputBytes)})";

        public static SyntheticCheckpoint Create(string root, int layers)
        {
            var tensors = Declarations(layers);
            long bytes = tensors.Sum(t => t.ByteLength);
            System.IO.Directory.CreateDirectory(root);
            long free = new DriveInfo(Path.GetFullPath(root)).AvailableFreeSpace;
            if (free < bytes * 21 / 10)
                throw new IOException($"{root} has {Ui.Bytes(free)} free; the benchmark needs about {Ui.Bytes(bytes * 21 / 10)} (input + output). Use --layers or --dir.");
            var model = new SyntheticCheckpoint(Path.Combine(root, "kvcheck-convert-bench-" + Guid.NewGuid().ToString("N")[..8]), layers);
            try
            {
                var clock = Stopwatch.StartNew();
                model.Generate(tensors);
                model.GenerateSeconds = clock.Elapsed.TotalSeconds;
                return model;
            }
            catch
            {
                model.Dispose();
                throw;
            }
        }

        private static List<TensorDeclaration> Declarations(int layers)
        {
            var tensors = new List<TensorDeclaration> { new("model.embed_tokens.weight", SafetensorsDType.F16, [Vocab, Hidden]) };
            for (int i = 0; i < layers; i++)
            {
                string p = $"model.layers.{i}.";
                tensors.Add(new(p + "input_layernorm.weight", SafetensorsDType.F16, [Hidden]));
                tensors.Add(new(p + "mlp.down_proj.weight", SafetensorsDType.F16, [Hidden, Ffn]));
                tensors.Add(new(p + "mlp.gate_proj.weight", SafetensorsDType.F16, [Ffn, Hidden]));
                tensors.Add(new(p + "mlp.up_proj.weight", SafetensorsDType.F16, [Ffn, Hidden]));
                tensors.Add(new(p + "post_attention_layernorm.weight", SafetensorsDType.F16, [Hidden]));
                foreach (string m in new[] { "k", "o", "q", "v" }) tensors.Add(new(p + $"self_attn.{m}_proj.weight", SafetensorsDType.F16, [Hidden, Hidden]));
            }
            tensors.Add(new("model.norm.weight", SafetensorsDType.F16, [Hidden]));
            tensors.Add(new("lm_head.weight", SafetensorsDType.F16, [Vocab, Hidden]));
            return tensors;
        }

        private void Generate(List<TensorDeclaration> tensors)
        {
            System.IO.Directory.CreateDirectory(Input);
            long total = tensors.Sum(t => t.ByteLength), running = 0;
            int split = Math.Max(1, tensors.FindIndex(t => (running += t.ByteLength) > total * 7 / 10));
            var shards = new[] { tensors.Take(split).ToList(), tensors.Skip(split).ToList() };
            var block = new byte[8 << 20];
            var halves = MemoryMarshal.Cast<byte, Half>(block.AsSpan());
            var random = new Random(1);
            for (int i = 0; i < halves.Length; i++) halves[i] = (Half)(0.02 * (random.NextDouble() * 2 - 1));
            var map = new JsonObject();
            long shift = 0;
            for (int s = 0; s < shards.Length; s++)
            {
                string name = $"model-{s + 1:D5}-of-{shards.Length:D5}.safetensors";
                using var writer = SafetensorsWriter.Create(Path.Combine(Input, name), shards[s], new Dictionary<string, string> { ["format"] = "pt" });
                foreach (var t in shards[s])
                {
                    map[t.Name] = name;
                    for (long done = 0; done < t.ByteLength;)
                    {
                        int offset = (int)((shift += 4098) % (block.Length / 2)); // even: whole fp16 values
                        int n = (int)Math.Min(block.Length - offset, t.ByteLength - done);
                        writer.Write(t.Name, block.AsSpan(offset, n));
                        done += n;
                    }
                }
                writer.Complete();
            }
            var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = total }, ["weight_map"] = map };
            File.WriteAllText(Path.Combine(Input, Checkpoint.IndexFileName), index.ToJsonString());
            var config = new JsonObject
            {
                ["architectures"] = new JsonArray("LlamaForCausalLM"), ["model_type"] = "llama", ["hidden_size"] = Hidden,
                ["intermediate_size"] = Ffn, ["num_hidden_layers"] = Layers, ["num_attention_heads"] = Heads, ["num_key_value_heads"] = Heads,
                ["rope_theta"] = 10000.0, ["torch_dtype"] = "float16", ["vocab_size"] = Vocab,
            };
            File.WriteAllText(Path.Combine(Input, Checkpoint.ConfigFileName), config.ToJsonString());
            InputBytes = System.IO.Directory.EnumerateFiles(Input, "*.safetensors").Sum(f => new FileInfo(f).Length);
        }

        /// <summary>Seconds <paramref name="action"/> takes; the output directory is removed before and after.</summary>
        public double Time(Action action)
        {
            DeleteOutput();
            var clock = Stopwatch.StartNew();
            action();
            double seconds = clock.Elapsed.TotalSeconds;
            DeleteOutput();
            return seconds;
        }

        /// <summary>
        /// The probe: copy the safetensors files through 1 MiB FileStream buffers and flush them to disk, as the converter
        /// flushes its output before moving it into place.
        /// </summary>
        public void PlainCopy()
        {
            System.IO.Directory.CreateDirectory(Output);
            var buffer = new byte[1 << 20];
            foreach (string file in System.IO.Directory.EnumerateFiles(Input, "*.safetensors"))
            {
                using var source = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan);
                using var target = new FileStream(Path.Combine(Output, Path.GetFileName(file)), FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20);
                int n;
                while ((n = source.Read(buffer)) > 0) target.Write(buffer, 0, n);
                target.Flush(flushToDisk: true);
            }
        }

        private void DeleteOutput()
        {
            if (System.IO.Directory.Exists(Output)) System.IO.Directory.Delete(Output, recursive: true);
        }

        public void Dispose()
        {
            if (System.IO.Directory.Exists(Directory)) System.IO.Directory.Delete(Directory, recursive: true);
        }
    }

    private sealed class Reporter(Action<ConversionProgress> report) : IProgress<ConversionProgress>
    {
        public void Report(ConversionProgress value) => report(value);
    }
}
