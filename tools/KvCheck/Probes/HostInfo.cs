using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;

namespace KvCheck.Probes;

/// <summary>Facts about the host machine and the checkout, read without throwing.</summary>
internal static class HostInfo
{
    /// <summary>The CPU model name (Linux <c>/proc/cpuinfo</c>), else the architecture.</summary>
    public static string CpuName
    {
        get
        {
            try
            {
                if (File.Exists("/proc/cpuinfo"))
                    foreach (var line in File.ReadLines("/proc/cpuinfo"))
                        if (line.StartsWith("model name", StringComparison.Ordinal) && line.IndexOf(':') is var colon and > 0)
                            return line[(colon + 1)..].Trim();
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
            return RuntimeInformation.ProcessArchitecture.ToString();
        }
    }

    /// <summary>"cpu: &lt;model&gt; (N logical cores)", the device name used for CPU-only runs.</summary>
    public static string CpuDevice => $"cpu: {CpuName} ({Environment.ProcessorCount} logical cores)";

    /// <summary>The last-level cache size (Linux sysfs), or null when the system does not say.</summary>
    public static long? LastLevelCacheBytes
    {
        get
        {
            try
            {
                const string root = "/sys/devices/system/cpu/cpu0/cache";
                if (!Directory.Exists(root)) return null;
                long best = 0;
                foreach (var dir in Directory.EnumerateDirectories(root, "index*"))
                {
                    string sizeFile = Path.Combine(dir, "size");
                    if (!File.Exists(sizeFile)) continue;
                    string text = File.ReadAllText(sizeFile).Trim();
                    long multiplier = 1;
                    if (text.EndsWith('K')) { multiplier = 1L << 10; text = text[..^1]; }
                    else if (text.EndsWith('M')) { multiplier = 1L << 20; text = text[..^1]; }
                    if (long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out long value))
                        best = Math.Max(best, value * multiplier);
                }
                return best > 0 ? best : null;
            }
            catch (IOException) { return null; }
            catch (UnauthorizedAccessException) { return null; }
        }
    }

    /// <summary><c>git rev-parse --short HEAD</c> in the current directory, or "unknown".</summary>
    public static string GitCommit()
    {
        try
        {
            var info = new ProcessStartInfo("git", ["rev-parse", "--short", "HEAD"])
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            };
            using var process = Process.Start(info);
            if (process is null) return "unknown";
            string output = process.StandardOutput.ReadToEnd().Trim();
            process.StandardError.ReadToEnd();
            if (!process.WaitForExit(5000))
            {
                process.Kill();
                return "unknown";
            }
            return process.ExitCode == 0 && output.Length > 0 ? output : "unknown";
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException or IOException)
        {
            return "unknown";
        }
    }
}
