using System.Runtime.InteropServices;

namespace KvKernels.Cuda.Interop;

// Enum members keep their native names and values from the CUDA headers; the names are their documentation.
#pragma warning disable CS1591

/// <summary>CUDA driver API result codes (values from <c>cuda.h</c>; only the ones we name, others pass through).</summary>
public enum CUresult
{
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_STUB_LIBRARY = 34,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_TIMEOUT = 702,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_UNKNOWN = 999,
}

/// <summary>The <c>CUdevice_attribute</c> values the library reads.</summary>
internal enum CUdevice_attribute
{
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X = 5,
    CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y = 6,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    CU_DEVICE_ATTRIBUTE_WARP_SIZE = 10,
    CU_DEVICE_ATTRIBUTE_CLOCK_RATE = 13,
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE = 36,
    CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH = 37,
    CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38,
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR = 39,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
}

/// <summary>The <c>CUfunction_attribute</c> values the library reads or sets.</summary>
internal enum CUfunction_attribute
{
    CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0,
    CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1,
    CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES = 2,
    CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3,
    CU_FUNC_ATTRIBUTE_NUM_REGS = 4,
    CU_FUNC_ATTRIBUTE_PTX_VERSION = 5,
    CU_FUNC_ATTRIBUTE_BINARY_VERSION = 6,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
}

/// <summary>
/// The driver API functions the library uses, bound with their native (versioned) names.
/// All signatures are blittable; strings go out as UTF-8 <c>byte*</c>.
/// </summary>
internal static unsafe partial class CudaDriverApi
{
    private const string Lib = NativeLibraries.Cuda;

    [LibraryImport(Lib)] public static partial CUresult cuInit(uint flags);
    [LibraryImport(Lib)] public static partial CUresult cuDriverGetVersion(int* driverVersion);
    [LibraryImport(Lib)] public static partial CUresult cuGetErrorName(CUresult error, byte** pStr);
    [LibraryImport(Lib)] public static partial CUresult cuGetErrorString(CUresult error, byte** pStr);

    [LibraryImport(Lib)] public static partial CUresult cuDeviceGetCount(int* count);
    [LibraryImport(Lib)] public static partial CUresult cuDeviceGet(int* device, int ordinal);
    [LibraryImport(Lib)] public static partial CUresult cuDeviceGetName(byte* name, int len, int dev);
    [LibraryImport(Lib)] public static partial CUresult cuDeviceGetAttribute(int* pi, CUdevice_attribute attrib, int dev);
    [LibraryImport(Lib)] public static partial CUresult cuDeviceTotalMem_v2(nuint* bytes, int dev);

    [LibraryImport(Lib)] public static partial CUresult cuDevicePrimaryCtxRetain(nint* pctx, int dev);
    [LibraryImport(Lib)] public static partial CUresult cuDevicePrimaryCtxRelease_v2(int dev);
    [LibraryImport(Lib)] public static partial CUresult cuCtxSetCurrent(nint ctx);
    [LibraryImport(Lib)] public static partial CUresult cuCtxGetCurrent(nint* pctx);
    [LibraryImport(Lib)] public static partial CUresult cuCtxSynchronize();

    [LibraryImport(Lib)] public static partial CUresult cuMemGetInfo_v2(nuint* free, nuint* total);
    [LibraryImport(Lib)] public static partial CUresult cuMemAlloc_v2(ulong* dptr, nuint bytesize);
    [LibraryImport(Lib)] public static partial CUresult cuMemFree_v2(ulong dptr);
    [LibraryImport(Lib)] public static partial CUresult cuMemsetD8_v2(ulong dstDevice, byte uc, nuint n);
    [LibraryImport(Lib)] public static partial CUresult cuMemsetD8Async(ulong dstDevice, byte uc, nuint n, nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuMemcpyHtoD_v2(ulong dstDevice, void* srcHost, nuint byteCount);
    [LibraryImport(Lib)] public static partial CUresult cuMemcpyDtoH_v2(void* dstHost, ulong srcDevice, nuint byteCount);
    [LibraryImport(Lib)] public static partial CUresult cuMemcpyDtoD_v2(ulong dstDevice, ulong srcDevice, nuint byteCount);
    [LibraryImport(Lib)] public static partial CUresult cuMemcpyHtoDAsync_v2(ulong dstDevice, void* srcHost, nuint byteCount, nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuMemcpyDtoHAsync_v2(void* dstHost, ulong srcDevice, nuint byteCount, nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuMemcpyDtoDAsync_v2(ulong dstDevice, ulong srcDevice, nuint byteCount, nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuMemHostAlloc(void** pp, nuint bytesize, uint flags);
    [LibraryImport(Lib)] public static partial CUresult cuMemFreeHost(void* p);
    [LibraryImport(Lib)] public static partial CUresult cuMemHostRegister_v2(void* p, nuint bytesize, uint flags);
    [LibraryImport(Lib)] public static partial CUresult cuMemHostUnregister(void* p);

    [LibraryImport(Lib)] public static partial CUresult cuStreamCreate(nint* phStream, uint flags);
    [LibraryImport(Lib)] public static partial CUresult cuStreamDestroy_v2(nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuStreamSynchronize(nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuStreamQuery(nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuStreamWaitEvent(nint hStream, nint hEvent, uint flags);

    [LibraryImport(Lib)] public static partial CUresult cuEventCreate(nint* phEvent, uint flags);
    [LibraryImport(Lib)] public static partial CUresult cuEventDestroy_v2(nint hEvent);
    [LibraryImport(Lib)] public static partial CUresult cuEventRecord(nint hEvent, nint hStream);
    [LibraryImport(Lib)] public static partial CUresult cuEventSynchronize(nint hEvent);
    [LibraryImport(Lib)] public static partial CUresult cuEventQuery(nint hEvent);
    [LibraryImport(Lib)] public static partial CUresult cuEventElapsedTime(float* pMilliseconds, nint hStart, nint hEnd);

    [LibraryImport(Lib)] public static partial CUresult cuModuleLoadData(nint* module, void* image);
    [LibraryImport(Lib)] public static partial CUresult cuModuleUnload(nint hmod);
    [LibraryImport(Lib)] public static partial CUresult cuModuleGetFunction(nint* hfunc, nint hmod, byte* name);
    [LibraryImport(Lib)] public static partial CUresult cuFuncGetAttribute(int* pi, CUfunction_attribute attrib, nint hfunc);
    [LibraryImport(Lib)] public static partial CUresult cuFuncSetAttribute(nint hfunc, CUfunction_attribute attrib, int value);
    [LibraryImport(Lib)] public static partial CUresult cuLaunchKernel(nint f,
        uint gridDimX, uint gridDimY, uint gridDimZ, uint blockDimX, uint blockDimY, uint blockDimZ,
        uint sharedMemBytes, nint hStream, void** kernelParams, void** extra);

    public const uint CU_STREAM_NON_BLOCKING = 0x1;
    public const uint CU_EVENT_DEFAULT = 0x0;
    public const uint CU_EVENT_DISABLE_TIMING = 0x2;
    public const uint CU_MEMHOSTALLOC_PORTABLE = 0x1;

    /// <summary>Native name of a result code, via <c>cuGetErrorName</c> when the driver is loaded.</summary>
    public static string ErrorName(CUresult result)
    {
        try
        {
            byte* p;
            if (cuGetErrorName(result, &p) == CUresult.CUDA_SUCCESS && p != null)
                return Marshal.PtrToStringUTF8((nint)p) ?? result.ToString();
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { }
        return Enum.IsDefined(result) ? result.ToString() : $"CUresult({(int)result})";
    }

    /// <summary>Description of a result code, via <c>cuGetErrorString</c> when the driver is loaded.</summary>
    public static string ErrorString(CUresult result)
    {
        try
        {
            byte* p;
            if (cuGetErrorString(result, &p) == CUresult.CUDA_SUCCESS && p != null)
                return Marshal.PtrToStringUTF8((nint)p) ?? "";
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { }
        return "";
    }
}
