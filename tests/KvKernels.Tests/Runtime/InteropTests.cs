using System.Runtime.CompilerServices;
using KvKernels.Cuda;
using KvKernels.Cuda.Interop;

namespace KvKernels.Tests.Runtime;

public sealed class InteropTests
{
    [Fact]
    public void BlittableTypes_HaveTheNativeSizes()
    {
        Assert.Equal(12, Unsafe.SizeOf<Dim3>());          // three unsigned ints, as CUDA's dim3
        Assert.Equal(4, Unsafe.SizeOf<CUresult>());       // C enums are int-sized
        Assert.Equal(4, Unsafe.SizeOf<nvrtcResult>());
        Assert.Equal(4, Unsafe.SizeOf<cublasStatus_t>());
        Assert.Equal(4, Unsafe.SizeOf<CUdevice_attribute>());
    }

    [Fact]
    public unsafe void KernelArguments_PutEachValueInItsOwnSlotWithItsCBytes()
    {
        var args = new KernelArguments();
        args.Add(-5);
        args.Add(3.5f);
        args.Add(1L << 40);
        args.AddPointer(0xDEAD_BEEF_0000UL);
        args.Add(7u);
        void** pointers = stackalloc void*[args.Count];
        args.Fill(pointers);
        Assert.Equal(5, args.Count);
        Assert.Equal(-5, *(int*)pointers[0]);
        Assert.Equal(3.5f, *(float*)pointers[1]);
        Assert.Equal(1L << 40, *(long*)pointers[2]);
        Assert.Equal(0xDEAD_BEEF_0000UL, *(ulong*)pointers[3]);
        Assert.Equal(7u, *(uint*)pointers[4]);
        Assert.Equal(0u, *((uint*)pointers[0] + 1)); // an int's slot is zero above its 4 bytes
        for (int i = 1; i < args.Count; i++) Assert.Equal(8, (int)((byte*)pointers[i] - (byte*)pointers[i - 1]));
    }

    [Fact]
    public void KernelArguments_RefuseMoreThanTheLimit()
    {
        Assert.Throws<InvalidOperationException>(() =>
        {
            var args = new KernelArguments();
            for (int i = 0; i <= KernelArguments.MaxCount; i++) args.Add(i);
        });
    }

    [Fact]
    public void CudaException_CarriesTheNativeNameAndTheCall()
    {
        var e = new CudaException(CUresult.CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc_v2(&p, n)");
        Assert.Equal(CUresult.CUDA_ERROR_OUT_OF_MEMORY, e.Result);
        Assert.Equal("CUDA_ERROR_OUT_OF_MEMORY", e.NativeName);
        Assert.Contains("cuMemAlloc_v2(&p, n)", e.Message);
        Assert.Contains("CUDA_ERROR_OUT_OF_MEMORY", e.Message);
    }

    [Fact]
    public void CudaException_Check_ThrowsOnlyOnFailure()
    {
        CudaException.Check(CUresult.CUDA_SUCCESS);
        var e = Assert.Throws<CudaException>(() => CudaException.Check(CUresult.CUDA_ERROR_INVALID_VALUE));
        Assert.Contains("CUresult.CUDA_ERROR_INVALID_VALUE", e.Call);
    }

    [Fact]
    public void NvrtcAndCublasExceptions_CarryNativeNames()
    {
        var n = new NvrtcException(nvrtcResult.NVRTC_ERROR_COMPILATION, "compile x.cu", "x.cu(3): error: identifier \"y\" is undefined");
        Assert.Equal("NVRTC_ERROR_COMPILATION", n.NativeName);
        Assert.Contains("identifier \"y\" is undefined", n.Message);
        var c = new CublasException(cublasStatus_t.CUBLAS_STATUS_INVALID_VALUE, "cublasGemmStridedBatchedEx");
        Assert.Equal("CUBLAS_STATUS_INVALID_VALUE", c.NativeName);
        Assert.Contains("cublasGemmStridedBatchedEx", c.Message);
    }

    [Fact]
    public void Resolver_ListsEveryAttemptWhenNothingIsFound()
    {
        var result = NativeLibraries.Probe("test", ["/nonexistent/libnothing.so.1", "libkvkernels-does-not-exist.so.7"]);
        Assert.False(result.Loaded);
        Assert.Equal(2, result.Trace.Count);
        Assert.Contains("/nonexistent/libnothing.so.1 (no such file)", result.Trace[0]);
        Assert.StartsWith("libkvkernels-does-not-exist.so.7 (", result.Trace[1]);
        var text = result.Describe();
        Assert.Contains("not found in 2 places:", text);
        Assert.Contains("libkvkernels-does-not-exist.so.7", text);
    }

    [Fact]
    public void DriverProbe_NeverThrows_AndExplainsAbsence()
    {
        if (CudaDriver.IsAvailable)
        {
            Assert.Null(CudaDriver.UnavailableReason);
            Assert.True(CudaDriver.DeviceCount > 0);
            Assert.True(CudaDriver.Version > 0);
            return;
        }
        Assert.False(string.IsNullOrWhiteSpace(CudaDriver.UnavailableReason));
        Assert.Equal(0, CudaDriver.DeviceCount);
        var e = Assert.Throws<CudaUnavailableException>(() => CudaDevice.Open());
        Assert.Equal(CudaDriver.UnavailableReason, e.Message);
    }

    [Fact]
    public void CublasProbe_ReportsWhereItLookedOrWhatItLoaded()
    {
        var result = NativeLibraries.Load(NativeLibraries.Cublas);
        if (result.Loaded)
        {
            Assert.NotNull(result.LoadedFrom);
            Assert.True(Cublas.IsAvailable, Cublas.UnavailableReason);
            Assert.True(Cublas.Version!.Major >= 11);
            return;
        }
        Assert.False(Cublas.IsAvailable);
        Assert.Contains("libcublas", Cublas.UnavailableReason);
        Assert.Contains(result.Trace, t => t.Contains("cublas", StringComparison.OrdinalIgnoreCase));
    }
}
