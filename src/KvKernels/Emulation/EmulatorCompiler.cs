using System.Collections.Concurrent;
using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;
using KvKernels.Compilation;

namespace KvKernels.Emulation;

/// <summary>
/// Builds kernel specializations for the emulated device: the same <c>.cu</c> source and macros as NVRTC gets,
/// compiled by the system C++ compiler against <c>cuda/emulation/kvk_emulation.h</c> into a shared library that
/// exports one launch trampoline per entry point. Libraries are cached on disk like cubins (content-addressed,
/// written atomically), one build per key per process.
/// </summary>
public static partial class EmulatorCompiler
{
    private const string RuntimeSource = "emulation/kvk_emu_runtime.cpp";
    private const string ShimHeader = "emulation/kvk_emulation.h";

    private static readonly Lazy<(string? Compiler, string? Version, string? Reason)> Toolchain = new(FindCompiler);
    private static readonly ConcurrentDictionary<string, Lazy<string>> Builds = new(StringComparer.Ordinal);

    /// <summary>True when a C++ compiler was found and the emulator sources are embedded.</summary>
    public static bool IsAvailable => Toolchain.Value.Compiler is not null && KernelSources.Contains(RuntimeSource);

    /// <summary>Why <see cref="IsAvailable"/> is false.</summary>
    public static string? UnavailableReason =>
        Toolchain.Value.Reason ?? (KernelSources.Contains(RuntimeSource) ? null : $"{RuntimeSource} is not embedded in the library.");

    /// <summary>The compiler's first version line (for reports).</summary>
    public static string? CompilerVersion => Toolchain.Value.Version;

    /// <summary>Where emulator builds are cached: <c>&lt;kernel cache&gt;/emulation</c>.</summary>
    public static string CacheDirectory => Path.Combine(KernelCompiler.DefaultCacheDirectory, "emulation");

    private static (string?, string?, string?) FindCompiler()
    {
        if (!OperatingSystem.IsLinux()) return (null, null, "The emulator runs on Linux only (it uses ucontext fibers and mprotect guard pages).");
        var candidates = new List<string>();
        if (Environment.GetEnvironmentVariable("KVKERNELS_CXX") is { Length: > 0 } explicitCompiler) candidates.Add(explicitCompiler);
        candidates.AddRange(["g++", "c++", "clang++"]);
        foreach (var candidate in candidates)
        {
            try
            {
                var (code, output) = Run(candidate, ["--version"], Environment.CurrentDirectory, TimeSpan.FromSeconds(20));
                if (code == 0) return (candidate, output.Split('\n')[0].Trim(), null);
            }
            catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException) { }
        }
        return (null, null, $"No C++ compiler found (tried {string.Join(", ", candidates)}; set KVKERNELS_CXX).");
    }

    /// <summary>The shared library holding the emulator runtime (fibers, barriers, guarded memory), built once.</summary>
    public static string RuntimeLibrary()
    {
        var (root, hash) = SourceTree();
        string output = Path.Combine(CacheDirectory, "build-" + hash, "libkvk_emu.so");
        // The soname lets kernel libraries bind to the copy already loaded by path; nodelete keeps it resident
        // (it owns signal handlers and worker threads).
        return Build(output, target => ["-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-pthread",
            "-Wl,-soname,libkvk_emu.so", "-Wl,-z,nodelete", Path.Combine(root, "emulation", "kvk_emu_runtime.cpp"), "-o", target]);
    }

    /// <summary>Builds (or finds in the cache) the library of one specialization; returns its path.</summary>
    public static string KernelLibrary(KernelSpecialization specialization)
    {
        ArgumentNullException.ThrowIfNull(specialization);
        string name = specialization.Source, source = specialization.SourceText;
        var defines = specialization.DefineOptions().ToArray();
        string runtime = RuntimeLibrary();
        var (root, treeHash) = SourceTree();
        var wrapper = new StringBuilder();
        wrapper.Append("#include \"").Append(ShimHeader).Append("\"\n");
        wrapper.Append("#line 1 \"").Append(name).Append("\"\n").Append(source).Append('\n');
        foreach (var entry in EntryPoints(source)) wrapper.Append("KVK_EMU_EXPORT(").Append(entry).Append(")\n");
        string key = Hash(treeHash, Toolchain.Value.Version ?? "", string.Join(' ', defines), wrapper.ToString());
        string directory = Path.Combine(CacheDirectory, "build-" + treeHash);
        string output = Path.Combine(directory, "k-" + key[..32] + ".so");
        string runtimeDirectory = Path.GetDirectoryName(runtime)!;
        return Build(output, target =>
        {
            string wrapperPath = target + ".cpp";
            File.WriteAllText(wrapperPath, wrapper.ToString());
            // Stack-clash protection makes a frame larger than a page probe it, so fiber stack overflows always fault.
            return ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-fstack-clash-protection", "-I" + root, .. defines, wrapperPath,
                "-L" + runtimeDirectory, "-lkvk_emu", "-Wl,-rpath," + runtimeDirectory, "-o", target];
        });
    }

    [GeneratedRegex(@"extern\s+""C""\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)\s*\(")]
    private static partial Regex EntryPointPattern();

    /// <summary>The <c>extern "C" __global__</c> functions of a source.</summary>
    public static IReadOnlyList<string> EntryPoints(string source)
    {
        string code = Regex.Replace(Regex.Replace(source, @"/\*.*?\*/", " ", RegexOptions.Singleline), @"//[^\n]*", "");
        return EntryPointPattern().Matches(code).Select(m => m.Groups[1].Value).Distinct().ToArray();
    }

    /// <summary>Runs the compiler unless <paramref name="output"/> exists; the result appears atomically.</summary>
    private static string Build(string output, Func<string, IReadOnlyList<string>> arguments)
    {
        if (File.Exists(output)) return output;
        return Builds.GetOrAdd(output, path => new Lazy<string>(() =>
        {
            if (File.Exists(path)) return path;
            string compiler = Toolchain.Value.Compiler ?? throw new EmulatorException(null, UnavailableReason ?? "No C++ compiler.");
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            string temporary = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
            try
            {
                var args = arguments(temporary);
                var (code, log) = Run(compiler, args, Path.GetDirectoryName(path)!, TimeSpan.FromMinutes(5));
                if (code != 0 || !File.Exists(temporary))
                    throw new EmulatorException(null, $"{compiler} failed (exit {code}) building {Path.GetFileName(path)}:{Environment.NewLine}{log}");
                File.Move(temporary, path, overwrite: true);
                return path;
            }
            finally
            {
                foreach (var leftover in new[] { temporary, temporary + ".cpp" })
                    try { File.Delete(leftover); } catch (IOException) { }
            }
        })).Value;
    }

    /// <summary>Writes the embedded <c>cuda/</c> tree to disk once per content hash (the compiler needs files).</summary>
    private static (string Root, string Hash) SourceTree()
    {
        var hashInput = new List<string>();
        foreach (var path in KernelSources.Paths)
        {
            hashInput.Add(path);
            hashInput.Add(KernelSources.Get(path));
        }
        string hash = Hash([.. hashInput])[..24];
        string root = Path.Combine(CacheDirectory, "src-" + hash);
        if (Directory.Exists(root)) return (root, hash);
        string temporary = root + "." + Guid.NewGuid().ToString("N") + ".tmp";
        foreach (var path in KernelSources.Paths)
        {
            string file = Path.Combine(temporary, path);
            Directory.CreateDirectory(Path.GetDirectoryName(file)!);
            File.WriteAllText(file, KernelSources.Get(path));
        }
        try
        {
            Directory.Move(temporary, root);
        }
        catch (IOException) when (Directory.Exists(root))
        {
            Directory.Delete(temporary, recursive: true); // another process won the race with identical content
        }
        return (root, hash);
    }

    private static string Hash(params string[] parts)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var part in parts)
        {
            hash.AppendData(Encoding.UTF8.GetBytes(part));
            hash.AppendData([0]);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    private static (int ExitCode, string Output) Run(string file, IReadOnlyList<string> arguments, string directory, TimeSpan timeout)
    {
        var info = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = directory,
        };
        foreach (var a in arguments) info.ArgumentList.Add(a);
        using var process = Process.Start(info) ?? throw new InvalidOperationException($"Could not start {file}.");
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(timeout))
        {
            process.Kill(entireProcessTree: true);
            return (-1, $"{file} timed out after {timeout}.");
        }
        return (process.ExitCode, (stdout.Result + stderr.Result).Trim());
    }
}
