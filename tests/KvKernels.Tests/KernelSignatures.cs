using System.Text.RegularExpressions;
using KvKernels.Compilation;

namespace KvKernels.Tests;

/// <summary>Reads the parameter lists of <c>extern "C" __global__</c> entry points from the embedded kernel sources,
/// so tests can hold the C# launch code to the kernels' real signatures.</summary>
public static partial class KernelSignatures
{
    [GeneratedRegex(@"extern\s+""C""\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)\s*\(([^)]*)\)", RegexOptions.Singleline)]
    private static partial Regex EntryPoint();

    /// <summary>Parameter types of <paramref name="kernel"/> in <paramref name="source"/> (e.g. <c>const kvk_u8*</c>, <c>kvk_i32</c>).</summary>
    public static IReadOnlyList<string> Parameters(string source, string kernel)
    {
        foreach (Match m in EntryPoint().Matches(StripComments(KernelSources.Get(source))))
        {
            if (m.Groups[1].Value != kernel) continue;
            return m.Groups[2].Value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
                .Select(p => Regex.Replace(p, @"\s*\b\w+\s*$", "").Replace("__restrict__", "").Trim())
                .ToArray();
        }
        throw new InvalidOperationException($"No entry point {kernel} in {source}.");
    }

    private static string StripComments(string text) =>
        Regex.Replace(Regex.Replace(text, @"/\*.*?\*/", " ", RegexOptions.Singleline), @"//[^\n]*", "");
}
