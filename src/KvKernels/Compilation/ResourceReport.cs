using System.Globalization;
using System.Text.RegularExpressions;

namespace KvKernels.Compilation;

/// <summary>What ptxas reported for one entry point (<c>-Xptxas=-v</c>): registers, spills, shared memory, stack.</summary>
/// <param name="Kernel">Entry point name.</param>
/// <param name="Arch">Target, for example <c>sm_90</c>.</param>
/// <param name="Registers">Registers per thread.</param>
/// <param name="SpillStoreBytes">Bytes of spill stores.</param>
/// <param name="SpillLoadBytes">Bytes of spill loads.</param>
/// <param name="StackFrameBytes">Stack frame per thread.</param>
/// <param name="SharedBytes">Static shared memory per block.</param>
public sealed record KernelResources(string Kernel, string Arch, int Registers, int SpillStoreBytes, int SpillLoadBytes, int StackFrameBytes, int SharedBytes)
{
    /// <summary>True when ptxas spilled registers to local memory.</summary>
    public bool Spills => SpillStoreBytes > 0 || SpillLoadBytes > 0;
}

/// <summary>Parses the ptxas lines of an NVRTC log.</summary>
public static partial class ResourceReport
{
    [GeneratedRegex(@"Compiling entry function '([^']+)' for '([^']+)'")]
    private static partial Regex EntryLine();

    [GeneratedRegex(@"Function properties for (\S+)")]
    private static partial Regex PropertiesLine();

    [GeneratedRegex(@"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")]
    private static partial Regex StackLine();

    [GeneratedRegex(@"Used (\d+) registers(?:.*?(\d+) bytes smem)?")]
    private static partial Regex UsedLine();

    /// <summary>One record per entry point found in <paramref name="log"/>, in order of appearance.</summary>
    public static IReadOnlyList<KernelResources> Parse(string log)
    {
        var entries = new List<KernelResources>();
        string? entry = null, arch = null, properties = null;
        int stack = 0, spillStores = 0, spillLoads = 0;
        foreach (var raw in log.Split('\n'))
        {
            string line = raw.Trim();
            if (EntryLine().Match(line) is { Success: true } e)
            {
                entry = e.Groups[1].Value;
                arch = e.Groups[2].Value;
                stack = spillStores = spillLoads = 0;
            }
            else if (PropertiesLine().Match(line) is { Success: true } p)
            {
                properties = p.Groups[1].Value;
            }
            else if (StackLine().Match(line) is { Success: true } s && properties == entry)
            {
                stack = Int(s.Groups[1]);
                spillStores = Int(s.Groups[2]);
                spillLoads = Int(s.Groups[3]);
            }
            else if (UsedLine().Match(line) is { Success: true } u && entry is not null)
            {
                entries.Add(new KernelResources(entry, arch ?? "", Int(u.Groups[1]), spillStores, spillLoads, stack,
                    u.Groups[2].Success ? Int(u.Groups[2]) : 0));
                entry = null;
            }
        }
        return entries;
    }

    private static int Int(Group g) => int.Parse(g.Value, CultureInfo.InvariantCulture);
}
