using KvKernels.Compilation;

namespace KvKernels.Cuda;

/// <summary>Which execution backend a <see cref="CudaDevice"/> runs on.</summary>
public enum DeviceKind
{
    /// <summary>A real NVIDIA GPU through the CUDA driver.</summary>
    Cuda,

    /// <summary>The CUDA execution model emulated on the CPU (same kernel sources, compiled by the system C++ compiler).</summary>
    Emulated,
}

/// <summary>What a device reports about itself; read once when it is opened.</summary>
/// <param name="Name">Marketing name, for example "NVIDIA H100 80GB HBM3".</param>
/// <param name="ComputeCapabilityMajor">Major compute capability (9 on Hopper).</param>
/// <param name="ComputeCapabilityMinor">Minor compute capability.</param>
/// <param name="MultiprocessorCount">Streaming multiprocessors.</param>
/// <param name="MaxThreadsPerBlock">Largest block.</param>
/// <param name="MaxThreadsPerMultiprocessor">Resident threads per SM.</param>
/// <param name="MaxGridDimY">Largest gridDim.y (gridDim.x is 2^31 − 1 on every supported arch).</param>
/// <param name="SharedMemoryPerBlock">Shared memory a block gets without opting in.</param>
/// <param name="SharedMemoryPerBlockOptin">Shared memory a block can opt in to.</param>
/// <param name="SharedMemoryPerMultiprocessor">Shared memory per SM.</param>
/// <param name="L2CacheBytes">L2 size.</param>
/// <param name="TotalMemoryBytes">Device memory.</param>
/// <param name="MemoryClockKHz">Peak memory clock (0 when the driver does not say).</param>
/// <param name="MemoryBusWidthBits">Memory bus width (0 when the driver does not say).</param>
public sealed record DeviceInfo(
    string Name,
    int ComputeCapabilityMajor,
    int ComputeCapabilityMinor,
    int MultiprocessorCount,
    int MaxThreadsPerBlock,
    int MaxThreadsPerMultiprocessor,
    int MaxGridDimY,
    int SharedMemoryPerBlock,
    int SharedMemoryPerBlockOptin,
    int SharedMemoryPerMultiprocessor,
    long L2CacheBytes,
    long TotalMemoryBytes,
    int MemoryClockKHz,
    int MemoryBusWidthBits)
{
    /// <summary>The NVRTC target for this device, for example <c>sm_90</c>.</summary>
    public string Arch => $"sm_{ComputeCapabilityMajor}{ComputeCapabilityMinor}";

    /// <summary>Theoretical peak DRAM bandwidth in GB/s from clock and bus width (DDR), or 0 when unknown.</summary>
    public double TheoreticalBandwidthGBs => MemoryClockKHz * 1e3 * 2 * (MemoryBusWidthBits / 8.0) / 1e9;
}

/// <summary>
/// The seam between the public device API and an execution backend (the CUDA driver, or the CPU emulator).
/// Memory, streams, events, modules and launches all go through it, so ops are written once.
/// Handles are opaque: device pointers are 64-bit addresses, streams/events/modules/functions are <c>nint</c>.
/// </summary>
internal abstract unsafe class DeviceBackend
{
    private int _references = 1;

    public abstract DeviceKind Kind { get; }
    public abstract DeviceInfo Info { get; }

    /// <summary>Makes the backend's context current on the calling thread (cheap; called by every entry point).</summary>
    public abstract void MakeCurrent();

    public abstract ulong Allocate(long bytes);

    /// <summary>Frees an allocation; never throws (called from SafeHandle release).</summary>
    public abstract void Free(ulong pointer);

    public abstract void Memset(ulong pointer, byte value, long bytes, nint stream);
    public abstract void CopyHostToDevice(ulong destination, void* source, long bytes, nint stream, bool async);
    public abstract void CopyDeviceToHost(void* destination, ulong source, long bytes, nint stream, bool async);
    public abstract void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream, bool async);

    public abstract nint CreateStream();
    public abstract void DestroyStream(nint stream);
    public abstract void SynchronizeStream(nint stream);
    public abstract void StreamWaitEvent(nint stream, nint evt);

    public abstract nint CreateEvent(bool timing);
    public abstract void DestroyEvent(nint evt);
    public abstract void RecordEvent(nint evt, nint stream);
    public abstract void SynchronizeEvent(nint evt);
    public abstract float ElapsedMilliseconds(nint start, nint end);

    public abstract void Synchronize();
    public abstract (long Free, long Total) MemoryInfo();

    /// <summary>Compiles (through the backend's compiler and cache) and loads one kernel specialization.</summary>
    public abstract nint LoadModule(KernelSpecialization specialization);
    public abstract void UnloadModule(nint module);
    public abstract nint GetFunction(nint module, string name);
    public abstract KernelAttributes GetAttributes(nint function);
    public abstract void SetMaxDynamicSharedMemory(nint function, int bytes);
    public abstract void Launch(nint function, Dim3 grid, Dim3 block, int sharedBytes, nint stream, void** arguments);

    /// <summary>Releases the backend's native state (context); called when the last reference goes.</summary>
    protected abstract void ReleaseNative();

    public void AddReference() => Interlocked.Increment(ref _references);

    public void Release()
    {
        if (Interlocked.Decrement(ref _references) == 0) ReleaseNative();
    }
}

/// <summary>Per-function facts a loaded kernel reports (from the loaded binary, not the compile log).</summary>
/// <param name="Registers">Registers per thread.</param>
/// <param name="StaticSharedBytes">Static shared memory per block.</param>
/// <param name="LocalBytes">Local memory (stack, spills) per thread.</param>
/// <param name="MaxThreadsPerBlock">Largest block this function can be launched with.</param>
public readonly record struct KernelAttributes(int Registers, int StaticSharedBytes, int LocalBytes, int MaxThreadsPerBlock);
