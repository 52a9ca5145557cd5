using System.Globalization;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace KvKernels.Bench;

/// <summary>Marks a suite that needs a CUDA GPU; Program.cs includes it only when one is present.</summary>
[AttributeUsage(AttributeTargets.Class)]
public sealed class GpuSuiteAttribute : Attribute;

/// <summary>A benchmark parameter that knows how many bytes each benchmark method must read and write per call.</summary>
public interface IBytesMoved
{
    /// <summary>Bytes read + bytes written by one call of <paramref name="benchmarkMethod"/>.</summary>
    long BytesMoved(string benchmarkMethod);
}

/// <summary>The config: the GB/s and % of probe columns, declared order, wide parameter column.</summary>
public static class BenchConfig
{
    /// <remarks>
    /// No job is added here: a default job in the config would make BenchmarkDotNet ignore <c>--job</c> on the command line
    /// (ConfigParser takes the config's default job as the base job). Program.cs adds <c>--inProcess</c> to the arguments
    /// instead, which puts the in-process toolchain on whatever job the command line asks for.
    /// </remarks>
    public static IConfig Create() => ManualConfig.Create(DefaultConfig.Instance)
        .AddColumn(new BandwidthColumn(), new PercentOfProbeColumn())
        .WithSummaryStyle(SummaryStyle.Default.WithMaxParameterColumnWidth(64))
        .WithOrderer(new BenchmarkDotNet.Order.DefaultOrderer(BenchmarkDotNet.Order.SummaryOrderPolicy.Declared));

    internal static long? Bytes(BenchmarkCase benchmarkCase) =>
        benchmarkCase.Parameters.Items.Select(p => p.Value).OfType<IBytesMoved>().FirstOrDefault()
            ?.BytesMoved(benchmarkCase.Descriptor.WorkloadMethod.Name);

    /// <summary>GB/s of a case: bytes moved / mean time per operation (1 GB = 1e9 B), or null when it did not run.</summary>
    internal static double? GBs(Summary summary, BenchmarkCase benchmarkCase)
    {
        var mean = summary[benchmarkCase]?.ResultStatistics?.Mean; // ns per operation
        var bytes = Bytes(benchmarkCase);
        return mean is > 0 && bytes is > 0 ? bytes.Value / mean.Value : null; // bytes per ns = GB/s
    }
}

/// <summary>GB/s = bytes the op must read and write per call / mean time.</summary>
public sealed class BandwidthColumn : IColumn
{
    public string Id => nameof(BandwidthColumn);
    public string ColumnName => "GB/s";
    public bool AlwaysShow => true;
    public ColumnCategory Category => ColumnCategory.Custom;
    public int PriorityInCategory => 0;
    public bool IsNumeric => true;
    public UnitType UnitType => UnitType.Dimensionless;
    public string Legend => "Bytes the op must read and write per call / mean time (1 GB = 1e9 B)";
    public bool IsAvailable(Summary summary) => true;
    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style) =>
        BenchConfig.GBs(summary, benchmarkCase)?.ToString("F1", CultureInfo.InvariantCulture) ?? "-";
}

/// <summary>% of the memory-copy probe (the suite's baseline, same parameters, same job) in GB/s terms.</summary>
public sealed class PercentOfProbeColumn : IColumn
{
    public string Id => nameof(PercentOfProbeColumn);
    public string ColumnName => "% of copy";
    public bool AlwaysShow => true;
    public ColumnCategory Category => ColumnCategory.Custom;
    public int PriorityInCategory => 1;
    public bool IsNumeric => true;
    public UnitType UnitType => UnitType.Dimensionless;
    public string Legend => "GB/s as a percentage of the copy probe's GB/s measured in the same run (truncated, never rounded up)";
    public bool IsAvailable(Summary summary) => true;
    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style)
    {
        var probe = summary.BenchmarksCases.FirstOrDefault(c =>
            c.Descriptor.Baseline && c.Descriptor.Type == benchmarkCase.Descriptor.Type &&
            SameParameters(c, benchmarkCase) && c.Job.DisplayInfo == benchmarkCase.Job.DisplayInfo);
        if (probe is null || BenchConfig.GBs(summary, probe) is not { } probeGBs || BenchConfig.GBs(summary, benchmarkCase) is not { } gbs)
            return "-";
        return (Math.Floor(1000 * gbs / probeGBs + 1e-9) / 10).ToString("F1", CultureInfo.InvariantCulture);
    }

    // Compare parameter values, not their (truncated) display text.
    private static bool SameParameters(BenchmarkCase a, BenchmarkCase b) =>
        a.Parameters.Items.Select(p => (p.Name, p.Value)).SequenceEqual(b.Parameters.Items.Select(p => (p.Name, p.Value)));
}
