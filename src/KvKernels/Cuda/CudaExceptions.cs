using System.Runtime.CompilerServices;
using KvKernels.Cuda.Interop;

namespace KvKernels.Cuda;

/// <summary>A CUDA driver call failed. Carries the result code, its native name and the call that failed.</summary>
public sealed class CudaException : Exception
{
    /// <summary>The driver's result code.</summary>
    public CUresult Result { get; }

    /// <summary>The native error name, from <c>cuGetErrorName</c> (for example <c>CUDA_ERROR_OUT_OF_MEMORY</c>).</summary>
    public string NativeName { get; }

    /// <summary>The failing call as written in the source.</summary>
    public string Call { get; }

    /// <summary>Creates the exception for a failed call.</summary>
    public CudaException(CUresult result, string call)
        : base($"{call} failed: {CudaDriverApi.ErrorName(result)} ({(int)result}): {CudaDriverApi.ErrorString(result)}")
    {
        Result = result;
        NativeName = CudaDriverApi.ErrorName(result);
        Call = call;
    }

    /// <summary>Throws a <see cref="CudaException"/> when <paramref name="result"/> is not success.</summary>
    internal static void Check(CUresult result, [CallerArgumentExpression(nameof(result))] string call = "")
    {
        if (result != CUresult.CUDA_SUCCESS) throw new CudaException(result, call);
    }
}

/// <summary>NVRTC could not compile a kernel, or an NVRTC call failed. <see cref="Log"/> holds the compiler's log.</summary>
public sealed class NvrtcException : Exception
{
    /// <summary>NVRTC's result code.</summary>
    public nvrtcResult Result { get; }

    /// <summary>The native name of the result (for example <c>NVRTC_ERROR_COMPILATION</c>).</summary>
    public string NativeName { get; }

    /// <summary>The compile log (empty when the failure was not a compilation).</summary>
    public string Log { get; }

    /// <summary>Creates the exception; the message includes the log.</summary>
    public NvrtcException(nvrtcResult result, string what, string log)
        : base($"{what}: {NvrtcApi.ErrorString(result)} ({result})" + (log.Length > 0 ? Environment.NewLine + log : ""))
    {
        Result = result;
        NativeName = result.ToString();
        Log = log;
    }
}

/// <summary>A cuBLAS call failed.</summary>
public sealed class CublasException : Exception
{
    /// <summary>cuBLAS's status code.</summary>
    public cublasStatus_t Status { get; }

    /// <summary>The native status name (for example <c>CUBLAS_STATUS_INVALID_VALUE</c>).</summary>
    public string NativeName { get; }

    /// <summary>Creates the exception for a failed call.</summary>
    public CublasException(cublasStatus_t status, string call)
        : base($"{call} failed: {CublasApi.StatusName(status)} ({(int)status})")
    {
        Status = status;
        NativeName = CublasApi.StatusName(status);
    }

    internal static void Check(cublasStatus_t status, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status != cublasStatus_t.CUBLAS_STATUS_SUCCESS) throw new CublasException(status, call);
    }
}

/// <summary>
/// A native library (driver, NVRTC, cuBLAS) or a CUDA device is not usable on this machine.
/// The message lists every place that was probed and why each failed.
/// </summary>
public sealed class CudaUnavailableException : Exception
{
    /// <summary>Creates the exception with the probe report as message.</summary>
    public CudaUnavailableException(string message) : base(message) { }
}
