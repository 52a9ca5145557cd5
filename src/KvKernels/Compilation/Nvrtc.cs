using System.Runtime.InteropServices;
using System.Text;
using KvKernels.Cuda;
using KvKernels.Cuda.Interop;
using static KvKernels.Cuda.Interop.NvrtcApi;

namespace KvKernels.Compilation;

/// <summary>NVRTC: whether it is loadable, its version and targets, and one compile call. Never throws on probe.</summary>
public static unsafe class Nvrtc
{
    private static readonly Lazy<(bool Ok, string? Reason, Version? Version, int[] Archs)> State = new(Probe);

    /// <summary>True when libnvrtc was found and answers.</summary>
    public static bool IsAvailable => State.Value.Ok;

    /// <summary>Why <see cref="IsAvailable"/> is false.</summary>
    public static string? UnavailableReason => State.Value.Reason;

    /// <summary>NVRTC's version (12.4, 13.0 …), or null.</summary>
    public static Version? Version => State.Value.Version;

    /// <summary>Compute capabilities NVRTC can target as SASS (80, 89, 90 …).</summary>
    public static IReadOnlyList<int> SupportedArchs => State.Value.Archs;

    /// <summary>Where libnvrtc was loaded from.</summary>
    public static string? LibraryPath => NativeLibraries.Load(NativeLibraries.Nvrtc).LoadedFrom;

    private static (bool, string?, Version?, int[]) Probe()
    {
        var lib = NativeLibraries.Load(NativeLibraries.Nvrtc);
        if (!lib.Loaded)
            return (false, "libnvrtc was not found (run tools/fetch-nvrtc.sh, install the CUDA toolkit's NVRTC, or set KVKERNELS_NVRTC). " + lib.Describe(), null, []);
        try
        {
            int major, minor;
            var r = nvrtcVersion(&major, &minor);
            if (r != nvrtcResult.NVRTC_SUCCESS) return (false, $"nvrtcVersion failed: {r}", null, []);
            int count;
            int[] archs = [];
            if (nvrtcGetNumSupportedArchs(&count) == nvrtcResult.NVRTC_SUCCESS && count > 0)
            {
                archs = new int[count];
                fixed (int* p = archs) nvrtcGetSupportedArchs(p);
            }
            return (true, null, new Version(major, minor), archs);
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException)
        {
            return (false, $"libnvrtc at {lib.LoadedFrom} is unusable: {e.Message}", null, []);
        }
    }

    /// <summary>Throws <see cref="CudaUnavailableException"/> when NVRTC cannot be used.</summary>
    public static void EnsureAvailable()
    {
        if (!IsAvailable) throw new CudaUnavailableException(UnavailableReason ?? "NVRTC is unavailable.");
    }

    /// <summary>What one NVRTC compile produced.</summary>
    internal sealed record Output(byte[] Binary, bool IsCubin, string Log);

    /// <summary>Compiles <paramref name="source"/> with in-memory <paramref name="headers"/>; throws <see cref="NvrtcException"/> with the log on failure.</summary>
    internal static Output Compile(string name, string source, IReadOnlyList<KeyValuePair<string, string>> headers, IReadOnlyList<string> options, bool cubin)
    {
        EnsureAvailable();
        var strings = new List<nint>();
        nint Utf8(string s)
        {
            nint p = Marshal.StringToCoTaskMemUTF8(s);
            strings.Add(p);
            return p;
        }
        nint program = 0;
        try
        {
            byte** headerTexts = stackalloc byte*[Math.Max(headers.Count, 1)];
            byte** headerNames = stackalloc byte*[Math.Max(headers.Count, 1)];
            for (int i = 0; i < headers.Count; i++)
            {
                headerTexts[i] = (byte*)Utf8(headers[i].Value);
                headerNames[i] = (byte*)Utf8(headers[i].Key);
            }
            Check(nvrtcCreateProgram(&program, (byte*)Utf8(source), (byte*)Utf8(name), headers.Count, headerTexts, headerNames), "nvrtcCreateProgram", "");
            byte** optionTexts = stackalloc byte*[Math.Max(options.Count, 1)];
            for (int i = 0; i < options.Count; i++) optionTexts[i] = (byte*)Utf8(options[i]);
            var result = nvrtcCompileProgram(program, options.Count, optionTexts);
            string log = ReadLog(program);
            if (result != nvrtcResult.NVRTC_SUCCESS)
                throw new NvrtcException(result, $"NVRTC could not compile {name} ({string.Join(' ', options)})", log);
            nuint size;
            byte[] binary;
            if (cubin)
            {
                Check(nvrtcGetCUBINSize(program, &size), "nvrtcGetCUBINSize", log);
                binary = new byte[(int)size];
                fixed (byte* p = binary) Check(nvrtcGetCUBIN(program, p), "nvrtcGetCUBIN", log);
            }
            else
            {
                Check(nvrtcGetPTXSize(program, &size), "nvrtcGetPTXSize", log);
                binary = new byte[(int)size]; // includes the terminating NUL the driver expects
                fixed (byte* p = binary) Check(nvrtcGetPTX(program, p), "nvrtcGetPTX", log);
            }
            return new Output(binary, cubin, log);
        }
        finally
        {
            if (program != 0) nvrtcDestroyProgram(&program);
            foreach (var p in strings) Marshal.FreeCoTaskMem(p);
        }
    }

    private static string ReadLog(nint program)
    {
        nuint size;
        if (nvrtcGetProgramLogSize(program, &size) != nvrtcResult.NVRTC_SUCCESS || size <= 1) return "";
        var buffer = new byte[(int)size];
        fixed (byte* p = buffer) nvrtcGetProgramLog(program, p);
        return Encoding.UTF8.GetString(buffer, 0, buffer.Length - 1).TrimEnd();
    }

    private static void Check(nvrtcResult result, string call, string log)
    {
        if (result != nvrtcResult.NVRTC_SUCCESS) throw new NvrtcException(result, call, log);
    }
}
