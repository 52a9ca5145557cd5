using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using KvKernels.Cuda;

namespace KvKernels.Compilation;

/// <summary>A kernel specialization compiled for one target.</summary>
/// <param name="Specialization">What was compiled.</param>
/// <param name="Arch">The target (<c>sm_90</c>), or <c>compute_XX</c> when NVRTC could only emit PTX for it.</param>
/// <param name="Binary">CUBIN, or NUL-terminated PTX when <paramref name="IsCubin"/> is false.</param>
/// <param name="IsCubin">True for CUBIN.</param>
/// <param name="Log">The compile log (ptxas resource lines included).</param>
/// <param name="Resources">Per entry point registers, spills, shared memory.</param>
/// <param name="CompileMilliseconds">Time NVRTC took (0 when served from the cache).</param>
/// <param name="FromCache">True when read from the on-disk cache.</param>
public sealed record CompiledKernel(KernelSpecialization Specialization, string Arch, byte[] Binary, bool IsCubin, string Log,
    IReadOnlyList<KernelResources> Resources, double CompileMilliseconds, bool FromCache)
{
    /// <summary>The CUBIN or PTX image to hand to the driver.</summary>
    public byte[] Cubin => Binary;
}

/// <summary>
/// NVRTC compilation with a content-addressed on-disk cache. The key hashes the source, every header, the options,
/// the target and NVRTC's version; entries are written atomically (temporary file, then rename), verified by a
/// SHA-256 checksum on read and rebuilt when corrupt. Concurrent requests for one key compile once per process.
/// </summary>
public sealed class KernelCompiler
{
    private const uint Magic = 0x434B564B; // "KVKC"
    private const int FormatVersion = 1;

    private readonly ConcurrentDictionary<string, Lazy<CompiledKernel>> _inFlight = new(StringComparer.Ordinal);
    private int _nvrtcCompilations;

    /// <summary>The compiler every device uses; its cache folder is <see cref="DefaultCacheDirectory"/>.</summary>
    public static KernelCompiler Shared { get; } = new(DefaultCacheDirectory);

    /// <summary>Creates a compiler caching into <paramref name="cacheDirectory"/> (null: no disk cache).</summary>
    public KernelCompiler(string? cacheDirectory) => CacheDirectory = cacheDirectory;

    /// <summary>Where entries are stored (null when disk caching is off).</summary>
    public string? CacheDirectory { get; }

    /// <summary>How many times this instance actually ran NVRTC (cache hits do not count).</summary>
    public int NvrtcCompilations => Volatile.Read(ref _nvrtcCompilations);

    /// <summary><c>KVKERNELS_CACHE</c>, else <c>$XDG_CACHE_HOME/kvkernels</c>, else <c>~/.cache/kvkernels</c>.</summary>
    public static string DefaultCacheDirectory
    {
        get
        {
            if (Environment.GetEnvironmentVariable("KVKERNELS_CACHE") is { Length: > 0 } explicitDir) return explicitDir;
            if (Environment.GetEnvironmentVariable("XDG_CACHE_HOME") is { Length: > 0 } xdg) return Path.Combine(xdg, "kvkernels");
            return Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "kvkernels");
        }
    }

    /// <summary>The NVRTC options used for <paramref name="specialization"/> on <paramref name="arch"/>.</summary>
    public static IReadOnlyList<string> Options(KernelSpecialization specialization, string arch) =>
        [$"--gpu-architecture={arch}", "-std=c++17", "-Xptxas=-v", "-DKVK_NVRTC=1", .. specialization.DefineOptions()];

    /// <summary>
    /// Compiles <paramref name="specialization"/> for <paramref name="arch"/> (<c>sm_80</c> …), or returns the cached result.
    /// When NVRTC cannot emit SASS for the arch (a newer GPU than the NVRTC), PTX for NVRTC's newest target is returned
    /// for the driver to finish.
    /// </summary>
    /// <exception cref="NvrtcException">Compilation failed; the exception carries the log.</exception>
    /// <exception cref="CudaUnavailableException">NVRTC cannot be loaded.</exception>
    public CompiledKernel Compile(KernelSpecialization specialization, string arch)
    {
        ArgumentNullException.ThrowIfNull(specialization);
        Nvrtc.EnsureAvailable();
        string target = ResolveTarget(arch);
        string key = Key(specialization, target);
        var lazy = _inFlight.GetOrAdd(key, k => new Lazy<CompiledKernel>(() => CompileUncached(specialization, target, k)));
        try
        {
            return lazy.Value;
        }
        catch
        {
            _inFlight.TryRemove(new KeyValuePair<string, Lazy<CompiledKernel>>(key, lazy));
            throw;
        }
    }

    private static string ResolveTarget(string arch)
    {
        if (!arch.StartsWith("sm_", StringComparison.Ordinal) || arch.Length < 5)
            throw new ArgumentException($"'{arch}' is not an arch of the form sm_XY.", nameof(arch));
        var supported = Nvrtc.SupportedArchs;
        string digits = arch[3..].TrimEnd('a', 'f');
        if (supported.Count == 0 || !int.TryParse(digits, out int cc) || supported.Contains(cc)) return arch;
        int best = supported.Where(a => a <= cc).DefaultIfEmpty(0).Max();
        if (best == 0) throw new ArgumentException($"NVRTC {Nvrtc.Version} supports no target at or below {arch}.", nameof(arch));
        return $"compute_{best}";
    }

    private CompiledKernel CompileUncached(KernelSpecialization specialization, string target, string key)
    {
        string? path = CacheDirectory is null ? null : Path.Combine(CacheDirectory, key + ".bin");
        if (path is not null && TryRead(path, specialization, target) is { } cached) return cached;

        var options = Options(specialization, target);
        var stopwatch = Stopwatch.StartNew();
        Interlocked.Increment(ref _nvrtcCompilations);
        var output = Nvrtc.Compile(specialization.Source, specialization.SourceText, KernelSources.Headers, options,
            cubin: target.StartsWith("sm_", StringComparison.Ordinal));
        double ms = stopwatch.Elapsed.TotalMilliseconds;
        var compiled = new CompiledKernel(specialization, target, output.Binary, output.IsCubin, output.Log,
            ResourceReport.Parse(output.Log), ms, FromCache: false);
        if (path is not null) TryWrite(path, compiled);
        return compiled;
    }

    private static string Key(KernelSpecialization specialization, string target)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        void Add(string s)
        {
            hash.AppendData(Encoding.UTF8.GetBytes(s));
            hash.AppendData([0]);
        }
        Add($"kvkernels-cache-v{FormatVersion}");
        Add(Nvrtc.Version?.ToString() ?? "");
        Add(target);
        foreach (var option in Options(specialization, target)) Add(option);
        Add(specialization.Source);
        Add(specialization.SourceText);
        foreach (var (name, text) in KernelSources.Headers)
        {
            Add(name);
            Add(text);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    // Entry layout: magic u32 | version i32 | SHA-256 of payload (32 bytes) | payload.
    // Payload: isCubin u8 | log length i32 | log UTF-8 | binary length i32 | binary.
    private static CompiledKernel? TryRead(string path, KernelSpecialization specialization, string target)
    {
        byte[] bytes;
        try
        {
            if (!File.Exists(path)) return null;
            bytes = File.ReadAllBytes(path);
        }
        catch (IOException) { return null; }
        catch (UnauthorizedAccessException) { return null; }

        if (Parse(bytes) is { } entry)
        {
            return new CompiledKernel(specialization, target, entry.Binary, entry.IsCubin, entry.Log,
                ResourceReport.Parse(entry.Log), 0, FromCache: true);
        }
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        return null;
    }

    private static (bool IsCubin, string Log, byte[] Binary)? Parse(byte[] bytes)
    {
        const int header = 4 + 4 + 32;
        if (bytes.Length < header + 1 + 4 + 4) return null;
        var span = bytes.AsSpan();
        if (BinaryPrimitives.ReadUInt32LittleEndian(span) != Magic || BinaryPrimitives.ReadInt32LittleEndian(span[4..]) != FormatVersion)
            return null;
        var payload = span[header..];
        if (!SHA256.HashData(payload).AsSpan().SequenceEqual(span[8..header])) return null;
        bool isCubin = payload[0] != 0;
        int logLength = BinaryPrimitives.ReadInt32LittleEndian(payload[1..]);
        if (logLength < 0 || 5 + logLength + 4 > payload.Length) return null;
        string log = Encoding.UTF8.GetString(payload.Slice(5, logLength));
        int binaryLength = BinaryPrimitives.ReadInt32LittleEndian(payload[(5 + logLength)..]);
        if (binaryLength <= 0 || 9 + logLength + binaryLength != payload.Length) return null;
        return (isCubin, log, payload[(9 + logLength)..].ToArray());
    }

    private static void TryWrite(string path, CompiledKernel compiled)
    {
        try
        {
            byte[] log = Encoding.UTF8.GetBytes(compiled.Log);
            var payload = new byte[1 + 4 + log.Length + 4 + compiled.Binary.Length];
            payload[0] = compiled.IsCubin ? (byte)1 : (byte)0;
            BinaryPrimitives.WriteInt32LittleEndian(payload.AsSpan(1), log.Length);
            log.CopyTo(payload, 5);
            BinaryPrimitives.WriteInt32LittleEndian(payload.AsSpan(5 + log.Length), compiled.Binary.Length);
            compiled.Binary.CopyTo(payload, 9 + log.Length);

            var entry = new byte[40 + payload.Length];
            BinaryPrimitives.WriteUInt32LittleEndian(entry, Magic);
            BinaryPrimitives.WriteInt32LittleEndian(entry.AsSpan(4), FormatVersion);
            SHA256.HashData(payload).CopyTo(entry, 8);
            payload.CopyTo(entry, 40);

            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            string temporary = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
            try
            {
                File.WriteAllBytes(temporary, entry);
                File.Move(temporary, path, overwrite: true);
            }
            finally
            {
                if (File.Exists(temporary)) File.Delete(temporary);
            }
        }
        catch (IOException) { /* a cache that cannot be written only costs a recompile */ }
        catch (UnauthorizedAccessException) { }
    }
}
