using System.Runtime.InteropServices;

namespace KvKernels.Cuda.Interop;

// Enum members keep their native names and values from the CUDA headers; the names are their documentation.
#pragma warning disable CS1591

/// <summary>NVRTC result codes (<c>nvrtc.h</c>).</summary>
public enum nvrtcResult
{
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_BUILTIN_OPERATION_FAILURE = 7,
    NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION = 8,
    NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION = 9,
    NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID = 10,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
}

/// <summary>The NVRTC functions the library uses, with their native names.</summary>
internal static unsafe partial class NvrtcApi
{
    private const string Lib = NativeLibraries.Nvrtc;

    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcVersion(int* major, int* minor);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetNumSupportedArchs(int* numArchs);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetSupportedArchs(int* supportedArchs);
    [LibraryImport(Lib)] public static partial byte* nvrtcGetErrorString(nvrtcResult result);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcCreateProgram(nint* prog, byte* src, byte* name,
        int numHeaders, byte** headers, byte** includeNames);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcDestroyProgram(nint* prog);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcCompileProgram(nint prog, int numOptions, byte** options);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetProgramLogSize(nint prog, nuint* logSizeRet);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetProgramLog(nint prog, byte* log);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetCUBINSize(nint prog, nuint* cubinSizeRet);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetCUBIN(nint prog, byte* cubin);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetPTXSize(nint prog, nuint* ptxSizeRet);
    [LibraryImport(Lib)] public static partial nvrtcResult nvrtcGetPTX(nint prog, byte* ptx);

    public static string ErrorString(nvrtcResult result)
    {
        try
        {
            byte* p = nvrtcGetErrorString(result);
            if (p != null) return Marshal.PtrToStringUTF8((nint)p) ?? result.ToString();
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { }
        return result.ToString();
    }
}
