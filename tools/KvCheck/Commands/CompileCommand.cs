using System.CommandLine;
using System.Diagnostics;
using System.Text.RegularExpressions;
using KvCheck.Cli;
using KvCheck.Reports;
using KvKernels;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvCheck.Commands;

/// <summary>
/// <c>KvCheck compile</c>: compiles every shipped kernel specialization (<see cref="KernelCatalog.Entries"/>) for each
/// arch with a fresh, cache-less compiler, and reports the ptxas resources of every entry point.
/// </summary>
internal static partial class CompileCommand
{
    [GeneratedRegex(@"^sm_\d{2,3}[af]?$")]
    private static partial Regex ArchPattern();

    public static Command Create()
    {
        var arch = new Option<string[]>("--arch")
        {
            Description = "Targets, comma-separated or repeated (default: " + string.Join(',', KernelCatalog.DefaultArchs) + ").",
            AllowMultipleArgumentsPerToken = true,
            HelpName = "sm_80,sm_89,sm_90,sm_90a",
        };
        var json = new Option<FileInfo?>("--json") { Description = "Also write the results as JSON to this file.", HelpName = "FILE" };
        var command = new Command("compile",
            "Compile every kernel specialization of the catalog with NVRTC (no cache) and report registers, spills, shared " +
            "memory, stack and compile time per entry point. Fails on a compile error, any spill, or a missing entry point.");
        command.Options.Add(arch);
        command.Options.Add(json);
        command.Validators.Add(result =>
        {
            foreach (var a in SplitArchs(result.GetValue(arch)))
                if (!ArchPattern().IsMatch(a)) result.AddError($"'{a}' is not an arch of the form sm_XY (e.g. sm_90, sm_90a).");
        });
        command.SetAction(parse => Program.Guard(() => Run(SplitArchs(parse.GetValue(arch)), parse.GetValue(json))));
        return command;
    }

    private static IReadOnlyList<string> SplitArchs(string[]? values)
    {
        var archs = (values ?? [])
            .SelectMany(v => v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            .Distinct(StringComparer.Ordinal).ToArray();
        return archs.Length > 0 ? archs : KernelCatalog.DefaultArchs;
    }

    private static int Run(IReadOnlyList<string> archs, FileInfo? jsonFile)
    {
        if (!Nvrtc.IsAvailable)
        {
            Ui.Error("NVRTC is unavailable: " + Nvrtc.UnavailableReason);
            return ExitCodes.Unavailable;
        }

        var rows = new List<CompileRow>();
        var failures = new List<string>();
        var entries = KernelCatalog.Entries;
        var total = Stopwatch.StartNew();
        Ui.WithStatus("Compiling …", status =>
        {
            int done = 0, count = entries.Count * archs.Count;
            foreach (var entry in entries)
                foreach (var arch in archs)
                {
                    status($"[{++done}/{count}] {entry.Specialization} for {arch}");
                    rows.AddRange(CompileOne(entry, arch, failures));
                }
            return 0;
        });

        var table = new TextTable($"NVRTC {Nvrtc.Version} — {entries.Count} specialization(s) × {archs.Count} arch(es), no cache",
            ("Kernel", false), ("Arch", false), ("Family", false), ("Source + defines", false), ("Regs", true),
            ("Spill st", true), ("Spill ld", true), ("Shared B", true), ("Stack B", true), ("Compile ms", true), ("Status", false));
        foreach (var r in rows)
        {
            string status = r.Ok ? "ok" : "FAIL: " + r.Error;
            table.AddRow(!r.Ok, r.Name, r.Arch, r.Family, $"{r.Source} [{r.Defines}]",
                N(r.Registers), N(r.SpillStores), N(r.SpillLoads), N(r.SharedBytes), N(r.StackFrame), Ui.F(r.CompileMs, 0), status);
        }
        table.Write();
        foreach (var failure in failures)
        {
            Ui.Line();
            Ui.Error(failure);
        }

        int failed = rows.Count(r => !r.Ok);
        Ui.Line();
        Ui.Line($"{rows.Count} entry point × arch result(s), {failed} failed; {Ui.F(total.Elapsed.TotalSeconds, 1)} s in all.");
        if (jsonFile is not null)
        {
            var report = new CompileReport(Nvrtc.Version?.ToString() ?? "unknown", rows);
            ReportFiles.WriteJson(jsonFile.FullName, report, ReportJsonContext.Default.CompileReport);
            Ui.Line($"Wrote {jsonFile.FullName}");
        }
        return failed == 0 && rows.Count > 0 ? ExitCodes.Success : ExitCodes.CheckFailed;
    }

    private static string N(int? value) => value?.ToString(Ui.Invariant) ?? "—";

    private static IEnumerable<CompileRow> CompileOne(CatalogEntry entry, string arch, List<string> failures)
    {
        var spec = entry.Specialization;
        var compiler = new KernelCompiler(cacheDirectory: null); // fresh: the time is a real NVRTC compile
        CompiledKernel compiled;
        try
        {
            compiled = compiler.Compile(spec, arch);
        }
        catch (Exception e) when (e is NvrtcException or ArgumentException)
        {
            string reason = e is NvrtcException n ? $"{n.NativeName}" : e.Message;
            failures.Add($"{spec} for {arch}: {e.Message}");
            return entry.EntryPoints.Select(ep => Row(entry, arch, ep, null, 0, "compile error: " + reason));
        }

        var rows = new List<CompileRow>();
        foreach (var entryPoint in entry.EntryPoints)
        {
            var resources = compiled.Resources.FirstOrDefault(r => r.Kernel == entryPoint);
            string? error = resources switch
            {
                null when !compiled.IsCubin => $"no SASS for {arch} (NVRTC emitted PTX for {compiled.Arch}); no ptxas report",
                null => "entry point missing from the ptxas report",
                { Spills: true } => $"spills ({resources.SpillStoreBytes} B stores, {resources.SpillLoadBytes} B loads)",
                _ => null,
            };
            rows.Add(Row(entry, arch, entryPoint, resources, compiled.CompileMilliseconds, error));
        }
        // Entry points the source has beyond the catalog's list are shown too (they are compiled and shipped).
        foreach (var extra in compiled.Resources.Where(r => !entry.EntryPoints.Contains(r.Kernel)))
            rows.Add(Row(entry, arch, extra.Kernel, extra, compiled.CompileMilliseconds,
                extra.Spills ? $"spills ({extra.SpillStoreBytes} B stores, {extra.SpillLoadBytes} B loads)" : null));
        if (rows.Any(r => !r.Ok)) failures.Add($"{spec} for {arch} — NVRTC log:{Environment.NewLine}{compiled.Log}");
        return rows;
    }

    private static CompileRow Row(CatalogEntry entry, string arch, string entryPoint, KernelResources? r, double ms, string? error) =>
        new(entryPoint, entry.Family, entry.Specialization.Source, entry.Specialization.Defines, arch,
            r?.Registers, r?.SpillStoreBytes, r?.SpillLoadBytes, r?.SharedBytes, r?.StackFrameBytes, Math.Round(ms, 1), error is null, error);
}
