using System.CommandLine;
using System.Runtime.InteropServices;
using KvCheck.Cli;
using KvCheck.Probes;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvCheck.Commands;

/// <summary><c>KvCheck info</c>: driver, NVRTC, cuBLAS, the KV formats' costs, every GPU and a measured copy bandwidth.</summary>
internal static class InfoCommand
{
    public static Command Create()
    {
        var noMeasure = new Option<bool>("--no-measure") { Description = "Skip the bandwidth measurement." };
        var command = new Command("info", "Show the CUDA driver, NVRTC, cuBLAS, each GPU, and a measured memory-copy bandwidth " +
            "(device-to-device copy on a GPU; host memory copy when there is no GPU).");
        command.Options.Add(noMeasure);
        command.SetAction(parse => Program.Guard(() => Run(!parse.GetValue(noMeasure))));
        return command;
    }

    private static int Run(bool measure)
    {
        Ui.Heading($"KvCheck {typeof(InfoCommand).Assembly.GetName().Version} — KvKernels {typeof(CudaDevice).Assembly.GetName().Version}");
        Ui.Line($"Runtime:  .NET {Environment.Version}, {RuntimeInformation.RuntimeIdentifier}, {Environment.ProcessorCount} logical cores");
        Ui.Line($"CPU:      {HostInfo.CpuName}; last-level cache {(HostInfo.LastLevelCacheBytes is { } l3 ? Ui.Bytes(l3) : "unknown")}");

        if (CudaDriver.IsAvailable)
            Ui.Line($"Driver:   CUDA {CudaDriver.VersionText} ({CudaDriver.Version}), {CudaDriver.DeviceCount} device(s), loaded from {CudaDriver.LibraryPath}");
        else
            Ui.Line($"Driver:   unavailable — {CudaDriver.UnavailableReason}");

        if (Nvrtc.IsAvailable)
        {
            string archs = Nvrtc.SupportedArchs.Count == 0 ? "unknown" : string.Join(' ', Nvrtc.SupportedArchs.Select(a => "sm_" + a));
            Ui.Line($"NVRTC:    {Nvrtc.Version} from {Nvrtc.LibraryPath}; SASS targets: {archs}");
        }
        else
        {
            Ui.Line($"NVRTC:    unavailable — {Nvrtc.UnavailableReason}");
        }

        if (Cublas.IsAvailable)
            Ui.Line($"cuBLAS:   {Cublas.Version} from {Cublas.LibraryPath}");
        else
            Ui.Line($"cuBLAS:   unavailable — {Cublas.UnavailableReason}");
        Ui.Line($"Kernel cache: {KernelCompiler.DefaultCacheDirectory}");
        Ui.Line();
        WriteKvFormats();

        if (!CudaDriver.IsAvailable)
        {
            if (measure)
            {
                Ui.Note("No GPU (see Driver above): measuring host memory bandwidth instead.");
                var (best, single, all) = Ui.WithStatus("Measuring host memory bandwidth …", _ => BandwidthProbe.MeasureHostCopy());
                Ui.Line($"Host memory bandwidth: {best.GBs:F1} GB/s");
                Ui.Line($"  {single}");
                if (!ReferenceEquals(single, all)) Ui.Line($"  {all}");
            }
            return ExitCodes.Success;
        }

        for (int ordinal = 0; ordinal < CudaDriver.DeviceCount; ordinal++)
        {
            using var device = CudaDevice.Open(ordinal);
            var info = device.Info;
            var (free, total) = device.MemoryInfo();
            var table = new TextTable($"GPU {ordinal}", ("Property", false), ("Value", false));
            table.AddRow(false, "Name", info.Name);
            table.AddRow(false, "Compute capability", $"{info.ComputeCapabilityMajor}.{info.ComputeCapabilityMinor} ({info.Arch})");
            table.AddRow(false, "SMs", info.MultiprocessorCount.ToString(Ui.Invariant));
            table.AddRow(false, "Memory", $"{Ui.Bytes(info.TotalMemoryBytes)} ({Ui.Bytes(free)} free of {Ui.Bytes(total)})");
            table.AddRow(false, "L2 cache", Ui.Bytes(info.L2CacheBytes));
            table.AddRow(false, "Shared memory", $"{info.SharedMemoryPerBlock} B/block, {info.SharedMemoryPerBlockOptin} B opt-in, {info.SharedMemoryPerMultiprocessor} B/SM");
            table.AddRow(false, "Memory clock / bus", $"{info.MemoryClockKHz / 1000} MHz, {info.MemoryBusWidthBits} bit");
            table.AddRow(false, "Theoretical bandwidth", info.TheoreticalBandwidthGBs > 0 ? $"{Ui.F(info.TheoreticalBandwidthGBs, 0)} GB/s" : "unknown");
            if (measure)
            {
                using var stream = device.CreateStream();
                var copy = Ui.WithStatus($"Measuring device-to-device copy bandwidth on GPU {ordinal} …",
                    _ => BandwidthProbe.MeasureDeviceCopy(device, stream));
                string ofPeak = info.TheoreticalBandwidthGBs > 0 ? $", {Ui.F(100 * copy.GBs / info.TheoreticalBandwidthGBs, 1)} % of theoretical" : "";
                table.AddRow(false, "Measured bandwidth", copy + ofPeak);
            }
            table.Write();
        }
        return ExitCodes.Success;
    }

    /// <summary>Bytes per token per layer of each KV format and its attention error against fp16 (QuantFormatsProbe).</summary>
    private static void WriteKvFormats()
    {
        var rows = Ui.WithStatus("Measuring the KV formats' attention error (CPU) …", _ => QuantFormatsProbe.Measure());
        var table = new TextTable($"KV formats: bytes per token per layer (K+V, {QuantFormatsProbe.KvHeads} KV heads of {QuantFormatsProbe.HeadDim}) " +
            $"and decode-attention error vs fp16 ({QuantFormatsProbe.Tokens} tokens, keys with 10× outlier channels)",
            ("Format", false), ("Bytes/token", true), ("vs fp16", true), ("Rel. error vs fp16", true));
        foreach (var row in rows)
            table.AddRow(false, row.Name, Ui.F(row.BytesPerToken, 0), Ui.F(row.RatioToFp16, 2) + "×", row.RelativeError == 0 ? "—" : row.RelativeError.ToString("0.0000", Ui.Invariant));
        table.Write();
        Ui.Line("SAQ staircases and KIVI residuals mix these rows: a residual of R fp16 tokens adds R × 4096 B per layer; a stair of " +
            "S tokens at B bits costs S × the B-bit row.");
        Ui.Line();
    }
}
