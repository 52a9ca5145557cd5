using System.Reflection;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Running;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Bench;

/// <summary>
/// BenchmarkDotNet suites of KvKernels. Usage: <c>dotnet run -c Release --project bench/KvKernels.Bench -- --filter '*Paging*'</c>
/// (any BenchmarkDotNet option works: <c>--job short</c>, <c>--list flat</c> …). Suites run in-process (no rebuilds);
/// pass <c>--outOfProcess</c> to let BenchmarkDotNet build and spawn a separate process instead. GPU suites
/// (<see cref="GpuSuiteAttribute"/>) are included only when a CUDA device and NVRTC are present.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        bool gpu = CudaDevice.IsAvailable && Nvrtc.IsAvailable;
        var suites = typeof(Program).Assembly.GetTypes()
            .Where(t => t.IsClass && !t.IsAbstract && t.GetMethods().Any(m => m.GetCustomAttribute<BenchmarkAttribute>() is not null))
            .ToList();
        var gpuSuites = suites.Where(t => t.GetCustomAttribute<GpuSuiteAttribute>() is not null).ToList();
        if (!gpu && gpuSuites.Count > 0)
        {
            string reason = !CudaDevice.IsAvailable ? CudaDevice.UnavailableReason ?? "no CUDA device" : "NVRTC: " + Nvrtc.UnavailableReason;
            Console.WriteLine($"GPU suites skipped ({string.Join(", ", gpuSuites.Select(t => t.Name))}): {reason.Split('\n')[0].Trim()}");
            suites.RemoveAll(gpuSuites.Contains);
        }

        var list = args.ToList();
        if (!list.Remove("--outOfProcess") && !list.Contains("--inProcess") && !list.Contains("-i"))
            list.Add("--inProcess"); // jobs given on the command line (--job short) also run in-process
        var summaries = BenchmarkSwitcher.FromTypes([.. suites]).Run([.. list], BenchConfig.Create());
        return summaries.Any(s => s.HasCriticalValidationErrors || s.Reports.Any(r => !r.Success)) ? 1 : 0;
    }
}
