using System.Text;
using KvKernels.Compilation;
using KvKernels.Cuda.Interop;
using static KvKernels.Cuda.Interop.CudaDriverApi;

namespace KvKernels.Cuda;

/// <summary>The real device: the CUDA driver API on the device's primary context.</summary>
internal sealed unsafe class CudaDriverBackend : DeviceBackend
{
    private readonly int _device;
    private readonly nint _context;

    public override DeviceKind Kind => DeviceKind.Cuda;
    public override DeviceInfo Info { get; }

    public CudaDriverBackend(int ordinal)
    {
        CudaDriver.EnsureAvailable();
        if ((uint)ordinal >= (uint)CudaDriver.DeviceCount)
            throw new ArgumentOutOfRangeException(nameof(ordinal), ordinal, $"Expected a device ordinal in [0, {CudaDriver.DeviceCount}).");
        int device;
        CudaException.Check(cuDeviceGet(&device, ordinal));
        _device = device;
        nint context;
        CudaException.Check(cuDevicePrimaryCtxRetain(&context, device));
        _context = context;
        MakeCurrent();
        Info = ReadInfo(device);
    }

    private static DeviceInfo ReadInfo(int device)
    {
        byte* name = stackalloc byte[256];
        CudaException.Check(cuDeviceGetName(name, 256, device));
        nuint total;
        CudaException.Check(cuDeviceTotalMem_v2(&total, device));
        int Attr(CUdevice_attribute a)
        {
            int v;
            return cuDeviceGetAttribute(&v, a, device) == CUresult.CUDA_SUCCESS ? v : 0;
        }
        return new DeviceInfo(
            Name: System.Runtime.InteropServices.Marshal.PtrToStringUTF8((nint)name) ?? "",
            ComputeCapabilityMajor: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            ComputeCapabilityMinor: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            MultiprocessorCount: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            MaxThreadsPerBlock: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            MaxThreadsPerMultiprocessor: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR),
            MaxGridDimY: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y),
            SharedMemoryPerBlock: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK),
            SharedMemoryPerBlockOptin: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            SharedMemoryPerMultiprocessor: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
            L2CacheBytes: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
            TotalMemoryBytes: (long)total,
            MemoryClockKHz: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
            MemoryBusWidthBits: Attr(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH));
    }

    public override void MakeCurrent() => CudaException.Check(cuCtxSetCurrent(_context));

    public override ulong Allocate(long bytes)
    {
        MakeCurrent();
        ulong pointer;
        // A zero-byte request still gets a distinct (1-byte) allocation so that empty buffers are valid handles.
        CudaException.Check(cuMemAlloc_v2(&pointer, (nuint)Math.Max(bytes, 1)));
        return pointer;
    }

    public override void Free(ulong pointer)
    {
        if (cuCtxSetCurrent(_context) == CUresult.CUDA_SUCCESS) cuMemFree_v2(pointer);
    }

    public override void Memset(ulong pointer, byte value, long bytes, nint stream)
    {
        MakeCurrent();
        CudaException.Check(cuMemsetD8Async(pointer, value, (nuint)bytes, stream));
    }

    public override void CopyHostToDevice(ulong destination, void* source, long bytes, nint stream, bool async)
    {
        MakeCurrent();
        if (async) CudaException.Check(cuMemcpyHtoDAsync_v2(destination, source, (nuint)bytes, stream));
        else CudaException.Check(cuMemcpyHtoD_v2(destination, source, (nuint)bytes));
    }

    public override void CopyDeviceToHost(void* destination, ulong source, long bytes, nint stream, bool async)
    {
        MakeCurrent();
        if (async) CudaException.Check(cuMemcpyDtoHAsync_v2(destination, source, (nuint)bytes, stream));
        else CudaException.Check(cuMemcpyDtoH_v2(destination, source, (nuint)bytes));
    }

    public override void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream, bool async)
    {
        MakeCurrent();
        if (async) CudaException.Check(cuMemcpyDtoDAsync_v2(destination, source, (nuint)bytes, stream));
        else CudaException.Check(cuMemcpyDtoD_v2(destination, source, (nuint)bytes));
    }

    public override nint CreateStream()
    {
        MakeCurrent();
        nint stream;
        // Blocking streams (flag 0) synchronise with the legacy default stream, so a plain synchronous copy
        // after a launch on any stream sees its results.
        CudaException.Check(cuStreamCreate(&stream, 0));
        return stream;
    }

    public override void DestroyStream(nint stream)
    {
        if (cuCtxSetCurrent(_context) == CUresult.CUDA_SUCCESS) cuStreamDestroy_v2(stream);
    }

    public override void SynchronizeStream(nint stream)
    {
        MakeCurrent();
        CudaException.Check(cuStreamSynchronize(stream));
    }

    public override void StreamWaitEvent(nint stream, nint evt)
    {
        MakeCurrent();
        CudaException.Check(cuStreamWaitEvent(stream, evt, 0));
    }

    public override nint CreateEvent(bool timing)
    {
        MakeCurrent();
        nint evt;
        CudaException.Check(cuEventCreate(&evt, timing ? CU_EVENT_DEFAULT : CU_EVENT_DISABLE_TIMING));
        return evt;
    }

    public override void DestroyEvent(nint evt)
    {
        if (cuCtxSetCurrent(_context) == CUresult.CUDA_SUCCESS) cuEventDestroy_v2(evt);
    }

    public override void RecordEvent(nint evt, nint stream)
    {
        MakeCurrent();
        CudaException.Check(cuEventRecord(evt, stream));
    }

    public override void SynchronizeEvent(nint evt)
    {
        MakeCurrent();
        CudaException.Check(cuEventSynchronize(evt));
    }

    public override float ElapsedMilliseconds(nint start, nint end)
    {
        MakeCurrent();
        float ms;
        CudaException.Check(cuEventElapsedTime(&ms, start, end));
        return ms;
    }

    public override void Synchronize()
    {
        MakeCurrent();
        CudaException.Check(cuCtxSynchronize());
    }

    public override (long Free, long Total) MemoryInfo()
    {
        MakeCurrent();
        nuint free, total;
        CudaException.Check(cuMemGetInfo_v2(&free, &total));
        return ((long)free, (long)total);
    }

    public override nint LoadModule(KernelSpecialization specialization)
    {
        var compiled = KernelCompiler.Shared.Compile(specialization, Info.Arch);
        MakeCurrent();
        nint module;
        fixed (byte* image = compiled.Cubin)
            CudaException.Check(cuModuleLoadData(&module, image));
        return module;
    }

    public override void UnloadModule(nint module)
    {
        if (cuCtxSetCurrent(_context) == CUresult.CUDA_SUCCESS) cuModuleUnload(module);
    }

    public override nint GetFunction(nint module, string name)
    {
        MakeCurrent();
        nint function;
        int length = Encoding.UTF8.GetByteCount(name);
        Span<byte> utf8 = stackalloc byte[length + 1];
        Encoding.UTF8.GetBytes(name, utf8);
        utf8[length] = 0;
        fixed (byte* p = utf8)
        {
            var r = cuModuleGetFunction(&function, module, p);
            if (r != CUresult.CUDA_SUCCESS) throw new CudaException(r, $"cuModuleGetFunction(\"{name}\")");
        }
        return function;
    }

    public override KernelAttributes GetAttributes(nint function)
    {
        MakeCurrent();
        int Attr(CUfunction_attribute a)
        {
            int v;
            CudaException.Check(cuFuncGetAttribute(&v, a, function));
            return v;
        }
        return new KernelAttributes(
            Registers: Attr(CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS),
            StaticSharedBytes: Attr(CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
            LocalBytes: Attr(CUfunction_attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
            MaxThreadsPerBlock: Attr(CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK));
    }

    public override void SetMaxDynamicSharedMemory(nint function, int bytes)
    {
        MakeCurrent();
        CudaException.Check(cuFuncSetAttribute(function, CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes));
    }

    public override void Launch(nint function, Dim3 grid, Dim3 block, int sharedBytes, nint stream, void** arguments)
    {
        MakeCurrent();
        CudaException.Check(cuLaunchKernel(function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z,
            (uint)sharedBytes, stream, arguments, null));
    }

    protected override void ReleaseNative() => cuDevicePrimaryCtxRelease_v2(_device);
}
