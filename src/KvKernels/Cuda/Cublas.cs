using KvKernels.Cuda.Interop;

namespace KvKernels.Cuda;

/// <summary>Whether cuBLAS is loadable, and its version; never throws on probe. MLA's absorption GEMMs use it when present.</summary>
public static unsafe class Cublas
{
    private static readonly Lazy<(Version? Version, string? Reason)> State = new(Probe);

    /// <summary>True when libcublas was found and answers.</summary>
    public static bool IsAvailable => State.Value.Version is not null;

    /// <summary>Why <see cref="IsAvailable"/> is false.</summary>
    public static string? UnavailableReason => State.Value.Reason;

    /// <summary>cuBLAS's version (major.minor.patch), or null.</summary>
    public static Version? Version => State.Value.Version;

    /// <summary>Where libcublas was loaded from.</summary>
    public static string? LibraryPath => NativeLibraries.Load(NativeLibraries.Cublas).LoadedFrom;

    private static (Version?, string?) Probe()
    {
        var lib = NativeLibraries.Load(NativeLibraries.Cublas);
        if (!lib.Loaded) return (null, "libcublas was not found. " + lib.Describe());
        try
        {
            int major, minor, patch; // libraryPropertyType: MAJOR_VERSION 0, MINOR_VERSION 1, PATCH_LEVEL 2
            if (CublasApi.cublasGetProperty(0, &major) != cublasStatus_t.CUBLAS_STATUS_SUCCESS ||
                CublasApi.cublasGetProperty(1, &minor) != cublasStatus_t.CUBLAS_STATUS_SUCCESS ||
                CublasApi.cublasGetProperty(2, &patch) != cublasStatus_t.CUBLAS_STATUS_SUCCESS)
                return (null, $"cublasGetProperty failed for {lib.LoadedFrom}.");
            return (new Version(major, minor, patch), null);
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException)
        {
            return (null, $"libcublas at {lib.LoadedFrom} is unusable: {e.Message}");
        }
    }
}

/// <summary>
/// A cuBLAS handle bound to one CUDA device's primary context. Thin: the library calls it for batched GEMMs
/// (MLA absorption); engines rarely need it directly.
/// </summary>
public sealed unsafe class CublasHandle : IDisposable
{
    private nint _handle;

    /// <summary>Creates a handle on <paramref name="device"/> (a real CUDA device).</summary>
    /// <exception cref="CudaUnavailableException">cuBLAS is not installed.</exception>
    public CublasHandle(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (device.Kind != DeviceKind.Cuda) throw new ArgumentException("cuBLAS needs a CUDA device.", nameof(device));
        if (!Cublas.IsAvailable) throw new CudaUnavailableException(Cublas.UnavailableReason ?? "cuBLAS is unavailable.");
        Device = device;
        device.Backend.MakeCurrent();
        nint handle;
        CublasException.Check(CublasApi.cublasCreate_v2(&handle));
        _handle = handle;
        device.Backend.AddReference();
    }

    /// <summary>The device the handle works on.</summary>
    public CudaDevice Device { get; }

    private nint Handle
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle == 0, this);
            return _handle;
        }
    }

    /// <summary>
    /// Strided-batched GEMM on column-major operands with fp32 accumulation:
    /// <c>C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]</c> for i in [0, batch), where A, B and C hold
    /// elements of the given types (fp16 or bf16 inputs; the same type or fp32 output). Used by MLA absorption.
    /// </summary>
    internal void GemmStridedBatched(cublasOperation_t transA, cublasOperation_t transB, int m, int n, int k, float alpha,
        ulong a, cudaDataType_t aType, int lda, long strideA, ulong b, cudaDataType_t bType, int ldb, long strideB,
        float beta, ulong c, cudaDataType_t cType, int ldc, long strideC, int batch, CudaStream? stream)
    {
        Device.Backend.MakeCurrent();
        CublasException.Check(CublasApi.cublasSetStream_v2(Handle, stream?.Handle ?? 0));
        CublasException.Check(CublasApi.cublasGemmStridedBatchedEx(Handle, transA, transB, m, n, k, &alpha,
            a, aType, lda, strideA, b, bType, ldb, strideB, &beta, c, cType, ldc, strideC, batch,
            cublasComputeType_t.CUBLAS_COMPUTE_32F, CublasApi.CUBLAS_GEMM_DEFAULT));
    }

    /// <summary>
    /// Dense column-major GEMM <c>C (m × n) = A (m × k) · B (k × n)</c> with fp32 accumulation, leading dimensions m, k
    /// and m: fp16 or bf16 inputs (<typeparamref name="TIn"/>), output of the input type or fp32. KvCheck times it as the
    /// device's dense rate next to the MLA rows; engines have their own GEMMs.
    /// </summary>
    /// <exception cref="ArgumentException">A dimension below 1, an unsupported element type, a span too short or on
    /// another device.</exception>
    public void Gemm<TIn, TOut>(int m, int n, int k, DeviceSpan<TIn> a, DeviceSpan<TIn> b, DeviceSpan<TOut> c, CudaStream? stream = null)
        where TIn : unmanaged where TOut : unmanaged
    {
        if (m < 1 || n < 1 || k < 1) throw new ArgumentException($"The dimensions are {m} × {n} × {k}; expected each ≥ 1.", nameof(m));
        var inType = TypeOf<TIn>(nameof(a), allowFloat: false);
        var outType = TypeOf<TOut>(nameof(c), allowFloat: true);
        if (outType != cudaDataType_t.CUDA_R_32F && outType != inType)
            throw new ArgumentException($"c has element type {typeof(TOut).Name}; expected {typeof(TIn).Name} or float.", nameof(c));
        Check(a, (long)m * k, nameof(a));
        Check(b, (long)k * n, nameof(b));
        Check(c, (long)m * n, nameof(c));
        GemmStridedBatched(cublasOperation_t.CUBLAS_OP_N, cublasOperation_t.CUBLAS_OP_N, m, n, k, 1f, a.Pointer, inType, m, 0,
            b.Pointer, inType, k, 0, 0f, c.Pointer, outType, m, 0, 1, stream);

        void Check<T>(DeviceSpan<T> span, long needed, string name) where T : unmanaged
        {
            Device.EnsureSame(span.Device, name);
            if (span.Length < needed) throw new ArgumentException($"{name} has {span.Length} elements; expected at least {needed}.", name);
        }
    }

    private static cudaDataType_t TypeOf<T>(string name, bool allowFloat) where T : unmanaged =>
        typeof(T) == typeof(Half) ? cudaDataType_t.CUDA_R_16F
        : typeof(T) == typeof(BFloat16) ? cudaDataType_t.CUDA_R_16BF
        : allowFloat && typeof(T) == typeof(float) ? cudaDataType_t.CUDA_R_32F
        : throw new ArgumentException($"{name} has element type {typeof(T).Name}; expected Half or BFloat16{(allowFloat ? " (or float)" : "")}.", name);

    /// <summary>Destroys the handle.</summary>
    public void Dispose()
    {
        nint handle = _handle;
        if (handle == 0) return;
        _handle = 0;
        Device.Backend.MakeCurrent();
        CublasApi.cublasDestroy_v2(handle);
        Device.Backend.Release();
    }
}
