using System.Runtime.InteropServices;
using KvKernels.Cuda.Interop;

namespace KvKernels.Cuda;

/// <summary>
/// Whether the CUDA driver is present and usable, decided once: <c>libcuda</c> found, <c>cuInit</c> succeeds,
/// at least one device. Never throws; <see cref="UnavailableReason"/> says why not.
/// </summary>
public static unsafe class CudaDriver
{
    private static readonly Lazy<(bool Ok, string? Reason, int Version, int Count)> State = new(Probe);

    /// <summary>True when a CUDA device can be opened.</summary>
    public static bool IsAvailable => State.Value.Ok;

    /// <summary>Why <see cref="IsAvailable"/> is false (null when it is true).</summary>
    public static string? UnavailableReason => State.Value.Reason;

    /// <summary>Driver version as the driver encodes it (1000 × major + 10 × minor), or 0.</summary>
    public static int Version => State.Value.Version;

    /// <summary>"13.0"-style driver version, or null when no driver is loaded.</summary>
    public static string? VersionText => Version == 0 ? null : $"{Version / 1000}.{Version % 1000 / 10}";

    /// <summary>Number of CUDA devices (0 when unavailable).</summary>
    public static int DeviceCount => State.Value.Count;

    /// <summary>The path the driver library was loaded from, or null.</summary>
    public static string? LibraryPath => NativeLibraries.Load(NativeLibraries.Cuda).LoadedFrom;

    private static (bool, string?, int, int) Probe()
    {
        var lib = NativeLibraries.Load(NativeLibraries.Cuda);
        if (!lib.Loaded) return (false, "The CUDA driver library (libcuda.so.1) was not found: no NVIDIA driver here. " + lib.Describe(), 0, 0);
        try
        {
            int version = 0;
            CudaDriverApi.cuDriverGetVersion(&version);
            var init = CudaDriverApi.cuInit(0);
            if (init != CUresult.CUDA_SUCCESS)
                return (false, $"cuInit failed: {CudaDriverApi.ErrorName(init)} ({CudaDriverApi.ErrorString(init)}); driver loaded from {lib.LoadedFrom}", version, 0);
            int count = 0;
            var r = CudaDriverApi.cuDeviceGetCount(&count);
            if (r != CUresult.CUDA_SUCCESS || count == 0)
                return (false, r != CUresult.CUDA_SUCCESS ? $"cuDeviceGetCount failed: {CudaDriverApi.ErrorName(r)}" : "The CUDA driver reports no devices.", version, 0);
            return (true, null, version, count);
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException or MarshalDirectiveException)
        {
            return (false, $"The CUDA driver at {lib.LoadedFrom} is unusable: {e.Message}", 0, 0);
        }
    }

    internal static void EnsureAvailable()
    {
        if (!IsAvailable) throw new CudaUnavailableException(UnavailableReason ?? "CUDA is unavailable.");
    }
}
