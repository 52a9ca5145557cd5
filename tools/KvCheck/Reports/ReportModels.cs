using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.Json.Serialization.Metadata;

namespace KvCheck.Reports;

/// <summary><c>compile --json</c>: one row per entry point × arch.</summary>
internal sealed record CompileReport(string Nvrtc, IReadOnlyList<CompileRow> Kernels);

/// <summary>One entry point compiled for one arch. Resource fields are null when the compile failed.</summary>
internal sealed record CompileRow(
    string Name, string Family, string Source, string Defines, string Arch,
    int? Registers, int? SpillStores, int? SpillLoads, int? SharedBytes, int? StackFrame,
    double CompileMs, bool Ok, string? Error);

/// <summary><c>verify --json</c>.</summary>
internal sealed record VerifyReport(string Device, string? Driver, string? Nvrtc, int Seed, bool Passed, IReadOnlyList<VerifyRow> Ops);

/// <summary>
/// One op on one shape on one backend. <c>maxRelError</c>: for fp16 and bf16 elements, max |a − b| / max(|b|, 1e-30)
/// over elements read as numbers (a NaN that differs in bits counts as +∞, written "Infinity"); for other element
/// types 0 when every byte matches and 1 when any differs. <c>mismatches</c> counts elements whose bytes differ;
/// the paging ops are pure copies, so <c>passed</c> needs 0 mismatches (and any op-specific check, in <c>detail</c>).
/// </summary>
internal sealed record VerifyRow(string Name, string Family, string Backend, string Shape, double MaxRelError, long Mismatches,
    long Elements, bool Passed, string? Detail);

/// <summary><c>bench --report DIR</c>: <c>results.json</c>. Peers (bench/peers/*.py) write the same row format.</summary>
internal sealed record BenchReport(string Commit, string Date, string Device, string? Driver, string? Nvrtc, double BandwidthGBs,
    string BandwidthKind, double? CpuBandwidthGBs, bool Quick, IReadOnlyList<BenchRow> Rows);

/// <summary>
/// One timed op. <c>us</c>: median µs per call; <c>gbps</c>: bytes the op must read and write / median time (GB = 1e9 B);
/// <c>pctOfBandwidth</c>: of the copy bandwidth measured in the same run on the same backend (<c>bandwidthGBs</c>);
/// <c>goal</c>: "met" or "missed" against <c>goalPercent</c> % of the copy bandwidth, for GPU rows that have a goal
/// (paging: rows moving ≥ 256 MiB, 90 %; decode attention: 85 % or 75 % by shape, as the issue sets).
/// </summary>
internal sealed record BenchRow(string Op, string Shape, string Backend, double Us, double Gbps, double PctOfBandwidth,
    long Bytes, int Samples, int OpsPerSample, int BufferSets, double BandwidthGBs, string? Goal, string? Note, double? GoalPercent = null,
    double? Tflops = null);

[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals)]
[JsonSerializable(typeof(CompileReport))]
[JsonSerializable(typeof(VerifyReport))]
[JsonSerializable(typeof(BenchReport))]
internal sealed partial class ReportJsonContext : JsonSerializerContext;

internal static class ReportFiles
{
    /// <summary>Writes <paramref name="value"/> as JSON (creating the folder), through a temporary file and a rename.</summary>
    public static void WriteJson<T>(string path, T value, JsonTypeInfo<T> typeInfo)
    {
        WriteText(path, JsonSerializer.Serialize(value, typeInfo) + Environment.NewLine);
    }

    public static void WriteText(string path, string text)
    {
        string full = Path.GetFullPath(path);
        if (Path.GetDirectoryName(full) is { Length: > 0 } dir) Directory.CreateDirectory(dir);
        string temp = full + ".tmp";
        File.WriteAllText(temp, text);
        File.Move(temp, full, overwrite: true);
    }
}
