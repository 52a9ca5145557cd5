using System.CommandLine;
using System.Diagnostics;
using KvCheck.Cli;
using KvCheck.Probes;
using KvCheck.Reports;
using KvCheck.Verification;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvCheck.Commands;

/// <summary>
/// <c>KvCheck verify</c>: every op of <see cref="VerificationRegistry"/> at every shape, on the CPU backend (library CPU
/// implementation against the scalar oracle), the emulated backend (the GPU kernels run on the CPU emulator, against
/// the CPU implementation) and, when a GPU is present, the cuda backend (GPU op against the CPU implementation);
/// device outputs are poisoned first.
/// </summary>
internal static class VerifyCommand
{
    private const string Cpu = "cpu", Emulated = "emulated", Cuda = "cuda";

    /// <summary>A backend that runs the kernels: how to open it, and why it cannot be opened here (null when it can).</summary>
    private sealed record DeviceBackend(string Name, Func<CudaDevice> Open, string? Unavailable);

    private static DeviceBackend[] DeviceBackends() =>
    [
        new(Emulated, () => CudaDevice.OpenEmulated(),
            CudaDevice.IsEmulatorAvailable ? null : "the emulator is unavailable: " + CudaDevice.EmulatorUnavailableReason),
        new(Cuda, () => CudaDevice.Open(),
            !CudaDevice.IsAvailable ? CudaDevice.UnavailableReason ?? "CUDA is unavailable."
            : !Nvrtc.IsAvailable ? "NVRTC is unavailable: " + Nvrtc.UnavailableReason : null),
    ];

    public static Command Create()
    {
        var cpuOnly = new Option<bool>("--cpu-only") { Description = "Run only the CPU backend, even when the emulator or a GPU is present." };
        var backend = new Option<string[]>("--backend")
        {
            Description = "Backends to run: cpu (CPU implementation vs oracle), emulated (the GPU kernels on the CPU emulator vs the " +
                "CPU implementation), cuda (GPU vs CPU implementation). Default: every backend available here.",
            AllowMultipleArgumentsPerToken = true,
            HelpName = "cpu|emulated|cuda",
        };
        backend.AcceptOnlyFromAmong(Cpu, Emulated, Cuda);
        var json = new Option<FileInfo?>("--json") { Description = "Also write the results as JSON to this file.", HelpName = "FILE" };
        var seed = new Option<int?>("--seed") { Description = "Seed of the random inputs (default: drawn and printed, so a failure can be replayed).", HelpName = "N" };
        var filter = new Option<string?>("--op") { Description = "Only ops whose name starts with this (e.g. paging.gather, or paging).", HelpName = "PREFIX" };
        var command = new Command("verify",
            "Check every op on fresh random inputs at odd and edge-case shapes: the CPU implementation against the scalar oracle, " +
            "and the GPU ops against the CPU implementation byte for byte. Fails when any check fails.");
        command.Options.Add(cpuOnly);
        command.Options.Add(backend);
        command.Options.Add(json);
        command.Options.Add(seed);
        command.Options.Add(filter);
        command.Validators.Add(result =>
        {
            if (result.GetValue(cpuOnly) && (result.GetValue(backend) ?? []).Any(b => b != Cpu))
                result.AddError("--cpu-only and --backend emulated|cuda contradict each other.");
        });
        command.SetAction(parse => Program.Guard(() => Run(
            parse.GetValue(cpuOnly), parse.GetValue(backend) ?? [], parse.GetValue(json), parse.GetValue(seed), parse.GetValue(filter))));
        return command;
    }

    private sealed record Case(IVerification Verification, VerificationShape Shape, string Backend, int Seed);

    private static int Run(bool cpuOnly, string[] backends, FileInfo? json, int? seedOption, string? filter)
    {
        int seed = seedOption ?? Random.Shared.Next(1, int.MaxValue);
        bool runCpu = backends.Length == 0 || backends.Contains(Cpu);
        var devices = new List<DeviceBackend>();
        foreach (var candidate in DeviceBackends())
        {
            bool asked = backends.Contains(candidate.Name);
            if (cpuOnly || (!asked && backends.Length > 0)) continue;
            if (candidate.Unavailable is not null)
            {
                if (asked)
                {
                    Ui.Error($"--backend {candidate.Name}: {candidate.Unavailable}");
                    return ExitCodes.Unavailable;
                }
                Ui.Note($"{candidate.Name} backend skipped: {candidate.Unavailable}");
                continue;
            }
            devices.Add(candidate);
        }

        var verifications = VerificationRegistry.All
            .Where(v => filter is null || v.Name.StartsWith(filter, StringComparison.Ordinal)).ToArray();
        if (verifications.Length == 0)
        {
            Ui.Error($"No op matches '{filter}'. Ops: {string.Join(", ", VerificationRegistry.All.Select(v => v.Name))}");
            return ExitCodes.Usage;
        }

        var cases = new List<Case>();
        int shapeIndex = 0;
        foreach (var v in verifications)
            foreach (var shape in v.Shapes)
            {
                int caseSeed = CaseSeed(seed, v.Name, shapeIndex++);
                if (runCpu) cases.Add(new Case(v, shape, Cpu, caseSeed));
                foreach (var d in devices) cases.Add(new Case(v, shape, d.Name, caseSeed));
            }

        var contexts = new Dictionary<string, GpuContext>();
        foreach (var d in devices)
        {
            var opened = d.Open();
            contexts[d.Name] = new GpuContext(opened);
        }
        string deviceName = contexts.TryGetValue(Cuda, out var cuda) ? $"{cuda.Device.Name} ({cuda.Device.Arch})" : HostInfo.CpuDevice;
        string backendList = string.Join(", ", (runCpu ? new[] { Cpu } : []).Concat(devices.Select(d => d.Name)));
        Ui.Line($"verify: {cases.Count} checks, seed {seed}, backends {backendList} — {deviceName}");

        var rows = new List<VerifyRow>();
        var total = Stopwatch.StartNew();
        try
        {
            Ui.WithStatus("Verifying …", status =>
            {
                for (int i = 0; i < cases.Count; i++)
                {
                    var c = cases[i];
                    status($"[{i + 1}/{cases.Count}] {c.Verification.Name} {c.Backend} {c.Shape.Description}");
                    rows.Add(RunOne(c, c.Backend == Cpu ? null : contexts[c.Backend]));
                }
                return 0;
            });
        }
        finally
        {
            foreach (var context in contexts.Values)
            {
                var device = context.Device;
                context.Dispose();
                device.Dispose();
            }
        }

        var table = new TextTable(null, ("Op", false), ("Backend", false), ("Shape", false), ("Max rel err", true),
            ("Mismatches", true), ("Elements", true), ("Result", false));
        foreach (var r in rows)
            table.AddRow(!r.Passed, r.Name, r.Backend, r.Shape, RelError(r.MaxRelError), r.Mismatches.ToString(Ui.Invariant),
                r.Elements.ToString(Ui.Invariant), r.Passed ? "pass" : "FAIL");
        table.Write();

        var failed = rows.Where(r => !r.Passed).ToArray();
        foreach (var f in failed) Ui.Error($"FAIL {f.Name} {f.Backend} {f.Shape}: {f.Detail}");
        Ui.Line($"{rows.Count - failed.Length} of {rows.Count} checks passed in {Ui.F(total.Elapsed.TotalSeconds, 1)} s (seed {seed}).");
        Ui.Line("Max rel err: fp16/bf16 outputs read as numbers, max |a-b|/max(|b|,1e-30) (inf: a NaN where bytes differ); " +
            "u8: 0 when identical, 1 when any byte differs. A check passes with 0 mismatched elements.");

        if (json is not null)
        {
            var report = new VerifyReport(deviceName, CudaDriver.VersionText, Nvrtc.Version?.ToString(), seed, failed.Length == 0, rows);
            ReportFiles.WriteJson(json.FullName, report, ReportJsonContext.Default.VerifyReport);
            Ui.Line($"Wrote {json.FullName}");
        }
        return failed.Length == 0 ? ExitCodes.Success : ExitCodes.CheckFailed;
    }

    private static VerifyRow RunOne(Case c, GpuContext? gpu)
    {
        VerificationOutcome outcome;
        try
        {
            outcome = c.Backend == Cpu ? c.Verification.RunCpu(c.Shape, c.Seed) : c.Verification.RunGpu(gpu!, c.Shape, c.Seed);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // A throwing op is a failed check with the reason, not a crash: the other checks still run.
            string first = e.Message.Split('\n')[0].Trim();
            outcome = new VerificationOutcome(0, 0, double.NaN, $"{e.GetType().Name}: {first}", ExtraFailure: true);
        }
        return new VerifyRow(c.Verification.Name, c.Verification.Family, c.Backend, c.Shape.Description,
            double.IsNaN(outcome.MaxRelError) ? double.PositiveInfinity : outcome.MaxRelError,
            outcome.Mismatches, outcome.Elements, outcome.Passed, outcome.Detail);
    }

    private static string RelError(double value) =>
        value == 0 ? "0" : double.IsPositiveInfinity(value) ? "inf" : value.ToString("0.###E+0", Ui.Invariant);

    /// <summary>A per-(op, shape) seed derived from the run's seed, identical for both backends.</summary>
    private static int CaseSeed(int seed, string name, int index)
    {
        uint h = (uint)seed * 2654435761u;
        foreach (char ch in name) h = (h ^ ch) * 16777619u;
        h ^= (uint)index * 40503u;
        return (int)(h & 0x7FFFFFFF);
    }
}
