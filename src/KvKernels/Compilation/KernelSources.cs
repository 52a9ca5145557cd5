using System.Collections.Frozen;
using System.Text;

namespace KvKernels.Compilation;

/// <summary>
/// The kernel sources embedded in the library (every file under <c>cuda/</c>), by path relative to <c>cuda/</c>.
/// Headers (<c>*.cuh</c>) are handed to NVRTC in memory under the same names, so kernels include
/// <c>"common/…"</c> and need nothing of the CUDA toolkit.
/// </summary>
public static class KernelSources
{
    private const string Prefix = "cuda/";

    private static readonly Lazy<FrozenDictionary<string, string>> All = new(Load);

    private static FrozenDictionary<string, string> Load()
    {
        var assembly = typeof(KernelSources).Assembly;
        var files = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var name in assembly.GetManifestResourceNames())
        {
            if (!name.StartsWith(Prefix, StringComparison.Ordinal)) continue;
            using var stream = assembly.GetManifestResourceStream(name)!;
            using var reader = new StreamReader(stream, Encoding.UTF8);
            files[name[Prefix.Length..].Replace('\\', '/')] = reader.ReadToEnd();
        }
        return files.ToFrozenDictionary(StringComparer.Ordinal);
    }

    /// <summary>Every embedded path, sorted.</summary>
    public static IReadOnlyList<string> Paths => All.Value.Keys.Order(StringComparer.Ordinal).ToArray();

    /// <summary>True when <paramref name="path"/> is embedded.</summary>
    public static bool Contains(string path) => All.Value.ContainsKey(path);

    /// <summary>The text of an embedded file.</summary>
    /// <exception cref="ArgumentException">No such file.</exception>
    public static string Get(string path) =>
        All.Value.TryGetValue(path, out var text) ? text : throw new ArgumentException($"No kernel source '{path}' is embedded.", nameof(path));

    /// <summary>The headers (<c>*.cuh</c>) that kernels may include, sorted by name.</summary>
    public static IReadOnlyList<KeyValuePair<string, string>> Headers =>
        All.Value.Where(kv => kv.Key.EndsWith(".cuh", StringComparison.Ordinal)).OrderBy(kv => kv.Key, StringComparer.Ordinal).ToArray();
}
