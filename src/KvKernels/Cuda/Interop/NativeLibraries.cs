using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;

namespace KvKernels.Cuda.Interop;

/// <summary>
/// The one <see cref="NativeLibrary.SetDllImportResolver"/> of this assembly. Imports name a logical library
/// (<c>cuda</c>, <c>nvrtc</c>, <c>cublas</c>); the resolver maps it to a probe list of sonames and folders
/// and records every attempt, so that a failure can say exactly what was tried.
/// </summary>
internal static class NativeLibraries
{
    // Logical names: distinct from any real file name, so the resolver alone decides what they load.
    public const string Cuda = "kvk-libcuda";
    public const string Nvrtc = "kvk-libnvrtc";
    public const string Cublas = "kvk-libcublas";

    private static readonly object Gate = new();
    private static readonly Dictionary<string, LoadResult> Results = new();

    /// <summary>What happened when one logical library was resolved.</summary>
    public sealed record LoadResult(string Logical, nint Handle, string? LoadedFrom, IReadOnlyList<string> Trace)
    {
        public bool Loaded => Handle != 0;

        public string Describe() =>
            Loaded ? $"{Logical}: loaded {LoadedFrom}" :
            $"{Logical}: not found in {Trace.Count} places:{Environment.NewLine}  " + string.Join(Environment.NewLine + "  ", Trace);
    }

#pragma warning disable CA2255 // a module initializer is the documented way to install a resolver before any import runs
    [System.Runtime.CompilerServices.ModuleInitializer]
#pragma warning restore CA2255
    internal static void Register() =>
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);

    private static nint Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath) =>
        libraryName is Cuda or Nvrtc or Cublas ? Load(libraryName).Handle : 0;

    /// <summary>Loads (once) the library behind a logical name; never throws.</summary>
    public static LoadResult Load(string logical)
    {
        lock (Gate)
        {
            if (Results.TryGetValue(logical, out var cached)) return cached;
            var result = Probe(logical, Candidates(logical));
            Results[logical] = result;
            return result;
        }
    }

    /// <summary>Tries each candidate in order (full paths and bare sonames) and records why each one failed.</summary>
    internal static LoadResult Probe(string logical, IEnumerable<string> candidates)
    {
        var trace = new List<string>();
        foreach (var candidate in candidates)
        {
            if (Path.IsPathRooted(candidate) && !File.Exists(candidate))
            {
                trace.Add($"{candidate} (no such file)");
                continue;
            }
            try
            {
                nint handle = NativeLibrary.Load(candidate);
                if (logical == Nvrtc) PreloadNvrtcBuiltins(candidate, trace);
                trace.Add($"{candidate} (loaded)");
                return new LoadResult(logical, handle, candidate, trace);
            }
            catch (Exception e) when (e is DllNotFoundException or BadImageFormatException)
            {
                trace.Add($"{candidate} ({LoaderReason(e.Message)})");
            }
        }
        return new LoadResult(logical, 0, null, trace);
    }

    /// <summary>
    /// NVRTC opens <c>libnvrtc-builtins.so.*</c> by name at compile time; when we found libnvrtc by full path
    /// the builtins sit beside it but not on the loader's path. Loading them first by full path makes the
    /// later by-name open succeed without LD_LIBRARY_PATH.
    /// </summary>
    private static void PreloadNvrtcBuiltins(string nvrtcPath, List<string> trace)
    {
        if (!Path.IsPathRooted(nvrtcPath) || !OperatingSystem.IsLinux()) return;
        string? dir = Path.GetDirectoryName(nvrtcPath);
        if (dir is null) return;
        foreach (var builtins in Directory.EnumerateFiles(dir, "libnvrtc-builtins.so.*").Order(StringComparer.Ordinal))
        {
            if (NativeLibrary.TryLoad(builtins, out _))
            {
                trace.Add($"{builtins} (builtins preloaded)");
                return;
            }
        }
    }

    private static IEnumerable<string> Candidates(string logical)
    {
        // An explicit override is the user's choice: it is the only candidate, so a wrong path fails loudly
        // instead of quietly loading something else.
        string? variable = logical switch { Cuda => "KVKERNELS_CUDA", Nvrtc => "KVKERNELS_NVRTC", Cublas => "KVKERNELS_CUBLAS", _ => null };
        if (variable is not null && Environment.GetEnvironmentVariable(variable) is { Length: > 0 } overridePath)
        {
            yield return overridePath;
            yield break;
        }
        bool windows = OperatingSystem.IsWindows();
        switch (logical)
        {
            case Cuda:
                yield return windows ? "nvcuda.dll" : "libcuda.so.1";
                if (!windows)
                {
                    yield return "/usr/lib/x86_64-linux-gnu/libcuda.so.1";
                    yield return "/usr/lib64/libcuda.so.1";
                    yield return "/usr/lib/wsl/lib/libcuda.so.1";
                }
                break;
            case Nvrtc:
                string[] nvrtcNames = windows
                    ? ["nvrtc64_130_0.dll", "nvrtc64_120_0.dll"]
                    : ["libnvrtc.so.13", "libnvrtc.so.12"];
                foreach (var n in nvrtcNames) yield return n;
                foreach (var dir in ToolkitFolders())
                    foreach (var n in nvrtcNames) yield return Path.Combine(dir, n);
                foreach (var dir in RepositoryNvrtcCaches()) yield return Path.Combine(dir, "libnvrtc.so.12");
                break;
            case Cublas:
                string[] cublasNames = windows
                    ? ["cublas64_13.dll", "cublas64_12.dll"]
                    : ["libcublas.so.13", "libcublas.so.12"];
                foreach (var n in cublasNames) yield return n;
                foreach (var dir in ToolkitFolders())
                    foreach (var n in cublasNames) yield return Path.Combine(dir, n);
                break;
        }
    }

    private static IEnumerable<string> ToolkitFolders()
    {
        foreach (var variable in new[] { "CUDA_PATH", "CUDA_HOME" })
        {
            if (Environment.GetEnvironmentVariable(variable) is { Length: > 0 } root)
            {
                yield return Path.Combine(root, OperatingSystem.IsWindows() ? "bin" : "lib64");
                if (OperatingSystem.IsWindows()) yield return Path.Combine(root, "bin", "x64");
            }
        }
        if (!OperatingSystem.IsWindows())
        {
            yield return "/usr/local/cuda/lib64";
            yield return "/usr/local/cuda/targets/x86_64-linux/lib";
        }
    }

    /// <summary>The <c>.cache/nvrtc/lib</c> folder that <c>tools/fetch-nvrtc.sh</c> fills, found by walking up from this assembly.</summary>
    private static IEnumerable<string> RepositoryNvrtcCaches()
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var start in new[] { AppContext.BaseDirectory, Environment.CurrentDirectory })
        {
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                string candidate = Path.Combine(dir.FullName, ".cache", "nvrtc", "lib");
                if (Directory.Exists(candidate) && seen.Add(candidate)) yield return candidate;
            }
        }
    }

    /// <summary>The loader's own words (dlerror's line) out of .NET's long DllNotFoundException message.</summary>
    private static string LoaderReason(string message)
    {
        var lines = message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        string last = lines.Length == 0 ? message : lines[^1];
        return last.StartsWith("Unable to load shared library", StringComparison.Ordinal) ? "not found by the loader" : last;
    }

    /// <summary>A human-readable account of every library resolved so far.</summary>
    public static string Report()
    {
        var sb = new StringBuilder();
        lock (Gate)
            foreach (var r in Results.Values) sb.AppendLine(r.Describe());
        return sb.ToString();
    }
}
