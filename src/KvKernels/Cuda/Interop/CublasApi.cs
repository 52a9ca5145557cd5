using System.Runtime.InteropServices;

namespace KvKernels.Cuda.Interop;

// Enum members keep their native names and values from the CUDA headers; the names are their documentation.
#pragma warning disable CS1591

/// <summary>cuBLAS status codes (<c>cublas_api.h</c>).</summary>
public enum cublasStatus_t
{
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
}

/// <summary><c>cublasOperation_t</c>.</summary>
internal enum cublasOperation_t
{
    CUBLAS_OP_N = 0,
    CUBLAS_OP_T = 1,
}

/// <summary>The <c>cudaDataType_t</c> values used with the <c>Ex</c> GEMMs.</summary>
internal enum cudaDataType_t
{
    CUDA_R_32F = 0,
    CUDA_R_16F = 2,
    CUDA_R_16BF = 14,
}

/// <summary><c>cublasComputeType_t</c> values used by the library.</summary>
internal enum cublasComputeType_t
{
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
}

/// <summary>The cuBLAS functions the library uses, with their native names (MLA absorption uses the batched GEMM).</summary>
internal static unsafe partial class CublasApi
{
    private const string Lib = NativeLibraries.Cublas;

    public const int CUBLAS_GEMM_DEFAULT = -1;

    [LibraryImport(Lib)] public static partial cublasStatus_t cublasGetProperty(int type, int* value);
    [LibraryImport(Lib)] public static partial cublasStatus_t cublasCreate_v2(nint* handle);
    [LibraryImport(Lib)] public static partial cublasStatus_t cublasDestroy_v2(nint handle);
    [LibraryImport(Lib)] public static partial cublasStatus_t cublasGetVersion_v2(nint handle, int* version);
    [LibraryImport(Lib)] public static partial cublasStatus_t cublasSetStream_v2(nint handle, nint streamId);
    [LibraryImport(Lib)] public static partial byte* cublasGetStatusName(cublasStatus_t status);
    [LibraryImport(Lib)] public static partial byte* cublasGetStatusString(cublasStatus_t status);

    [LibraryImport(Lib)]
    public static partial cublasStatus_t cublasGemmStridedBatchedEx(nint handle,
        cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
        void* alpha, ulong A, cudaDataType_t Atype, int lda, long strideA,
        ulong B, cudaDataType_t Btype, int ldb, long strideB,
        void* beta, ulong C, cudaDataType_t Ctype, int ldc, long strideC,
        int batchCount, cublasComputeType_t computeType, int algo);

    public static string StatusName(cublasStatus_t status)
    {
        try
        {
            byte* p = cublasGetStatusName(status);
            if (p != null) return Marshal.PtrToStringUTF8((nint)p) ?? status.ToString();
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { }
        return Enum.IsDefined(status) ? status.ToString() : $"cublasStatus_t({(int)status})";
    }
}
