using System.CommandLine;
using KvCheck.Benchmarks;
using KvCheck.Cli;
using KvCheck.Probes;
using KvCheck.Reports;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvCheck.Commands;

/// <summary>
/// <c>KvCheck bench</c>: measures the copy bandwidth, then times every op and shape (GPU with CUDA events, CPU with a
/// stopwatch), and reports µs, GB/s and % of the copy bandwidth of the same run.
/// </summary>
internal static class BenchCommand
{
    private const string Cpu = "cpu", Cuda = "cuda";

    public static Command Create()
    {
        var quick = new Option<bool>("--quick") { Description = "Fewer samples (a smoke run; the CPU part finishes in well under a minute)." };
        var report = new Option<DirectoryInfo?>("--report") { Description = "Write results.json, results.md and chart.svg into this folder.", HelpName = "DIR" };
        var backend = new Option<string[]>("--backend")
        {
            Description = "Backends to time: cuda (when a GPU and NVRTC are present), cpu. Default: both where available.",
            AllowMultipleArgumentsPerToken = true,
            HelpName = "cpu|cuda",
        };
        backend.AcceptOnlyFromAmong(Cpu, Cuda);
        var filter = new Option<string?>("--op") { Description = "Only ops whose name starts with this (e.g. paging.gather).", HelpName = "PREFIX" };
        var list = new Option<bool>("--list") { Description = "Print every row (backend, op, shape, bytes moved) without running anything." };
        var command = new Command("bench",
            "Time every op on realistic shapes: µs (median), GB/s of the bytes it must move, and % of the copy bandwidth measured " +
            "in the same run (device-to-device copy on the GPU, host memory copy on the CPU). GPU rows are held to their op's goal " +
            "(paging rows moving ≥ 256 MiB: 90 %; decode attention: 85 % or 75 % of copy bandwidth by shape).");
        command.Options.Add(quick);
        command.Options.Add(report);
        command.Options.Add(backend);
        command.Options.Add(filter);
        command.Options.Add(list);
        command.SetAction(parse => Program.Guard(() => parse.GetValue(list)
            ? List(parse.GetValue(quick))
            : Run(parse.GetValue(quick), parse.GetValue(report), parse.GetValue(backend) ?? [], parse.GetValue(filter))));
        return command;
    }

    /// <summary>The rows as "backend\top\tshape\tbytes" lines (for diffing against the peers' shape lists).</summary>
    private static int List(bool quick)
    {
        foreach (var c in GpuCases(quick)) Ui.Line($"{Cuda}\t{c.Op}\t{c.Shape}\t{c.BytesMoved}");
        foreach (var c in CpuCases()) Ui.Line($"{Cpu}\t{c.Op}\t{c.Shape}\t{c.BytesMoved}");
        return ExitCodes.Success;
    }

    private static int Run(bool quick, DirectoryInfo? reportDir, string[] backends, string? filter)
    {
        bool wantCuda = backends.Length == 0 || backends.Contains(Cuda);
        bool wantCpu = backends.Length == 0 || backends.Contains(Cpu);
        string? gpuUnavailable = !CudaDevice.IsAvailable ? CudaDevice.UnavailableReason ?? "CUDA is unavailable."
            : !Nvrtc.IsAvailable ? "NVRTC is unavailable: " + Nvrtc.UnavailableReason : null;
        if (wantCuda && gpuUnavailable is not null)
        {
            if (backends.Contains(Cuda))
            {
                Ui.Error("--backend cuda: " + gpuUnavailable);
                return ExitCodes.Unavailable;
            }
            Ui.Note("cuda rows skipped: " + gpuUnavailable);
            wantCuda = false;
        }
        bool Selected(BenchCase c) => filter is null || c.Op.StartsWith(filter, StringComparison.Ordinal);

        string commit = HostInfo.GitCommit();
        var rows = new List<BenchRow>();
        int errors = 0;
        double? gpuBandwidth = null, cpuBandwidth = null;
        string device = HostInfo.CpuDevice, bandwidthKind = "";

        if (wantCuda)
        {
            using var gpu = CudaDevice.Open();
            using var stream = gpu.CreateStream();
            device = $"{gpu.Name} ({gpu.Arch}, {gpu.Info.MultiprocessorCount} SMs, L2 {Ui.Bytes(gpu.Info.L2CacheBytes)})";
            Ui.Line($"bench: {device}, driver {CudaDriver.VersionText}, NVRTC {Nvrtc.Version}, commit {commit}");
            var copy = Ui.WithStatus("Measuring device-to-device copy bandwidth …",
                _ => BandwidthProbe.MeasureDeviceCopy(gpu, stream, quick ? 10 : 20));
            gpuBandwidth = copy.GBs;
            bandwidthKind = $"{copy.Kind}, {Ui.Bytes(copy.BufferBytes)} buffers, median of {copy.Runs}";
            Ui.Line($"copy bandwidth: {copy}");
            using var timer = new GpuTimer(gpu, stream, copy.GBs);
            double? dense = null;
            if (GpuCases(quick).Where(Selected).Any(c => c.Flops > 0))
            {
                dense = Ui.WithStatus("Measuring the dense bf16 rate (cuBLAS) …", _ => BandwidthProbe.MeasureDenseBf16(gpu, stream));
                Ui.Line(dense is { } d ? $"dense bf16: {Ui.F(d, 1)} TFLOP/s (cuBLAS 8192³ GEMM, median of 10)" : "dense bf16 rate: not measured (no cuBLAS)");
            }
            int seed = 1;
            foreach (var c in GpuCases(quick).Where(Selected))
            {
                using (c)
                {
                    var row = Ui.WithStatus($"cuda {c.Op} {c.Shape} …", _ => TimeGpu(gpu, stream, timer, c, copy.GBs, quick, seed++), plainProgress: false);
                    if (row.Tflops is { } tf && dense is { } rate)
                        row = row with { Note = Join(row.Note, $"{Ui.Floor(100 * tf / rate, 1)} % of dense bf16 ({Ui.F(rate, 1)} TFLOP/s, same run)") };
                    rows.Add(row);
                    if (row.Note?.StartsWith("error", StringComparison.Ordinal) == true) errors++;
                    Progress(row);
                }
            }
        }

        if (wantCpu)
        {
            var (best, single, _) = Ui.WithStatus("Measuring host memory bandwidth …", _ => BandwidthProbe.MeasureHostCopy(quick ? 3 : 7));
            cpuBandwidth = best.GBs;
            if (gpuBandwidth is null)
            {
                Ui.Line($"bench: {device}, commit {commit}");
                bandwidthKind = $"{best.Kind}, {Ui.Bytes(best.BufferBytes)} buffers, median of {best.Runs}";
            }
            Ui.Line($"host copy bandwidth: {best} (1 thread: {Ui.F(single.GBs, 1)} GB/s)");
            long llc = HostInfo.LastLevelCacheBytes ?? 32L << 20;
            int seed = 1000;
            foreach (var c in CpuCases().Where(Selected))
            {
                using (c)
                {
                    var row = Ui.WithStatus($"cpu {c.Op} {c.Shape} …", _ => TimeCpu(c, llc, best.GBs, quick, seed++));
                    rows.Add(row);
                    if (row.Note?.StartsWith("error", StringComparison.Ordinal) == true) errors++;
                    Progress(row);
                }
            }
        }

        var table = new TextTable(null, ("Op", false), ("Backend", false), ("Shape", false), ("µs", true), ("GB/s", true),
            ("% of copy", true), ("TFLOP/s", true), ("MiB moved", true), ("Goal", false), ("Note", false));
        foreach (var r in rows)
            table.AddRow(r.Goal == "missed" || r.Note?.StartsWith("error", StringComparison.Ordinal) == true,
                r.Op, r.Backend, r.Shape, Ui.F(r.Us, 1), Ui.F(r.Gbps, 1), Ui.Floor(r.PctOfBandwidth, 1),
                r.Tflops is { } tf ? Ui.F(tf, 2) : "", Ui.F(r.Bytes / 1048576.0, 1), BenchReportWriter.GoalText(r), r.Note ?? "");
        Ui.Line();
        table.Write();
        Ui.Line("GB/s: bytes the op must read + write per call / median time (1 GB = 1e9 B); % of copy: of the same backend's copy bandwidth " +
            "measured in this run; goal: each GPU row's own (percentages truncated, never rounded up).");

        if (reportDir is not null)
        {
            var report = new BenchReport(commit, DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm 'UTC'", Ui.Invariant), device,
                CudaDriver.VersionText, Nvrtc.Version?.ToString(), Math.Round(gpuBandwidth ?? cpuBandwidth ?? 0, 2), bandwidthKind,
                cpuBandwidth is { } cb ? Math.Round(cb, 2) : null, quick, rows);
            foreach (var file in BenchReportWriter.Write(reportDir.FullName, report)) Ui.Line($"Wrote {file}");
        }
        return errors == 0 ? ExitCodes.Success : ExitCodes.Error;
    }

    /// <summary>Every GPU row, family by family (a new op family appends its cases here).</summary>
    private static IEnumerable<GpuBenchCase> GpuCases(bool quick) => PagingBenchCases.Gpu().Concat(AttentionBenchCases.Gpu(quick)).Concat(MergeStatesBench.Gpu())
        .Concat(MlaBenchCases.Gpu(quick)).Concat(QuantBenchCases.Gpu(quick)).Concat(ScoreBenchCases.Gpu(quick)).Concat(SelectionBenchCases.Gpu());

    /// <summary>Every CPU row, family by family.</summary>
    private static IEnumerable<CpuBenchCase> CpuCases() => PagingBenchCases.Cpu().Concat(AttentionBenchCases.Cpu()).Concat(MergeStatesBench.Cpu())
        .Concat(MlaBenchCases.Cpu()).Concat(ScoreBenchCases.Cpu()).Concat(SelectionBenchCases.Cpu());

    private static void Progress(BenchRow row)
    {
        if (Ui.Plain)
            Ui.Line($"  {row.Backend} {row.Op} {row.Shape}: {Ui.F(row.Us, 1)} µs, {Ui.F(row.Gbps, 1)} GB/s, {Ui.Floor(row.PctOfBandwidth, 1)} %" +
                (row.Note is null ? "" : " — " + row.Note));
    }

    /// <summary>Rotating buffer sets: one when a set is ≥ 256 MiB and ≥ 2× the cache, else enough for ≥ 4× the cache.</summary>
    private static int Sets(long setBytes, long cacheBytes) =>
        setBytes >= Math.Max(256L << 20, 2 * cacheBytes) ? 1 : (int)Math.Clamp(Math.Ceiling(4.0 * cacheBytes / Math.Max(setBytes, 1)), 2, 64);

    private static BenchRow TimeGpu(CudaDevice device, CudaStream stream, GpuTimer timer, GpuBenchCase c, double copyGBs, bool quick, int seed)
    {
        int sets = Sets(c.BytesMoved, device.Info.L2CacheBytes);
        var (free, _) = device.MemoryInfo();
        long budget = (long)(free * 0.8);
        string? note = null;
        while (sets > 1 && c.SharedAllocationBytes + sets * c.SetAllocationBytes > budget) sets--;
        if (c.SharedAllocationBytes + sets * c.SetAllocationBytes > budget)
            return Failed(c, Cuda, copyGBs, $"error: skipped, needs {Ui.Bytes(c.SharedAllocationBytes + c.SetAllocationBytes)} of {Ui.Bytes(free)} free");
        if (sets * c.BytesMoved < 2 * device.Info.L2CacheBytes) note = $"working set {Ui.Bytes(sets * c.BytesMoved)} < 2× L2";
        try
        {
            c.Prepare(device, stream, sets, seed);
            stream.Synchronize();
            var timing = timer.Measure(c, sets, quick ? 10 : 30);
            return MakeRow(c, Cuda, timing, sets, copyGBs, Join(note, timing.Note));
        }
        catch (Exception e) when (e is CudaException or NvrtcException or ArgumentException or InvalidOperationException)
        {
            return Failed(c, Cuda, copyGBs, "error: " + e.GetType().Name + ": " + e.Message.Split('\n')[0].Trim());
        }
    }

    private static BenchRow TimeCpu(CpuBenchCase c, long cacheBytes, double copyGBs, bool quick, int seed)
    {
        int sets = Sets(c.BytesMoved, cacheBytes);
        while (sets > 1 && c.SharedAllocationBytes + sets * c.SetAllocationBytes > 2L << 30) sets--;
        try
        {
            c.Prepare(sets, seed);
            var timing = CpuTimer.Measure(c, sets, quick ? 5 : 15);
            return MakeRow(c, Cpu, timing, sets, copyGBs, sets * c.BytesMoved < 2 * cacheBytes ? "working set < 2× LLC" : null);
        }
        catch (Exception e) when (e is ArgumentException or InvalidOperationException)
        {
            return Failed(c, Cpu, copyGBs, "error: " + e.GetType().Name + ": " + e.Message.Split('\n')[0].Trim());
        }
    }

    private static string? Join(string? a, string? b) => a is null ? b : b is null ? a : a + "; " + b;

    private static BenchRow MakeRow(BenchCase c, string backend, Timing t, int sets, double copyGBs, string? note)
    {
        double gbps = c.BytesMoved / t.MedianSeconds / 1e9;
        double pct = 100 * gbps / copyGBs;
        string? goal = backend == Cuda && c.GoalPercent is { } wanted ? (pct >= wanted ? "met" : "missed") : null;
        double? tflops = c.Flops > 0 ? Math.Round(c.Flops / t.MedianSeconds / 1e12, 3) : null;
        return new BenchRow(c.Op, c.Shape, backend, Math.Round(t.MedianSeconds * 1e6, 2), Math.Round(gbps, 2), Math.Floor(pct * 100) / 100,
            c.BytesMoved, t.Samples, t.OpsPerSample, sets, Math.Round(copyGBs, 2), goal, note, backend == Cuda ? c.GoalPercent : null, tflops);
    }

    private static BenchRow Failed(BenchCase c, string backend, double copyGBs, string note) =>
        new(c.Op, c.Shape, backend, double.NaN, double.NaN, double.NaN, c.BytesMoved, 0, 0, 0, Math.Round(copyGBs, 2), null, note);
}
