using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Emulation;

/// <summary>
/// The CUDA execution model on the CPU: device memory is host memory that ends at a guard page, kernels are the
/// <c>.cu</c> sources built by the C++ compiler (<see cref="EmulatorCompiler"/>), blocks run in parallel on host
/// threads and each CUDA thread is a fiber. Streams are synchronous: every call has finished when it returns.
/// </summary>
internal sealed unsafe class EmulatedBackend : DeviceBackend
{
    private const int ErrorCapacity = 4096;

    private readonly nint _runtime;
    private readonly delegate* unmanaged<nuint, void*> _alloc;
    private readonly delegate* unmanaged<void*, void> _free;
    private readonly delegate* unmanaged<byte*, int, int> _lastError;
    private readonly delegate* unmanaged<nint, void**, byte*, uint, uint, uint, uint, uint, uint, uint, uint, int, byte*, int, int> _launch;
    private readonly List<(nint Library, string Source)> _modules = [];
    private readonly List<(nint Entry, string Name, byte[] Utf8Name)> _functions = [];
    private readonly Dictionary<nint, long> _eventTimes = [];
    private readonly object _gate = new();
    private readonly int _hostThreads;

    public override DeviceKind Kind => DeviceKind.Emulated;
    public override DeviceInfo Info { get; }

    public EmulatedBackend(int hostThreads)
    {
        if (!EmulatorCompiler.IsAvailable) throw new CudaUnavailableException("The emulator is unavailable: " + EmulatorCompiler.UnavailableReason);
        string path = EmulatorCompiler.RuntimeLibrary();
        _runtime = NativeLibrary.Load(path);
        _alloc = (delegate* unmanaged<nuint, void*>)NativeLibrary.GetExport(_runtime, "kvk_emu_alloc");
        _free = (delegate* unmanaged<void*, void>)NativeLibrary.GetExport(_runtime, "kvk_emu_free");
        _lastError = (delegate* unmanaged<byte*, int, int>)NativeLibrary.GetExport(_runtime, "kvk_emu_last_error");
        _launch = (delegate* unmanaged<nint, void**, byte*, uint, uint, uint, uint, uint, uint, uint, uint, int, byte*, int, int>)
            NativeLibrary.GetExport(_runtime, "kvk_emu_launch");
        _hostThreads = hostThreads > 0 ? hostThreads : Environment.ProcessorCount;
        // Shaped like the GPU the kernels are tuned for (sm_90 limits), with one "SM" per host thread so grid
        // heuristics pick small grids that the CPU runs quickly.
        Info = new DeviceInfo($"KvKernels emulator ({_hostThreads} host threads, {EmulatorCompiler.CompilerVersion})", 9, 0,
            MultiprocessorCount: _hostThreads, MaxThreadsPerBlock: 1024, MaxThreadsPerMultiprocessor: 2048, MaxGridDimY: 65535,
            SharedMemoryPerBlock: 48 * 1024, SharedMemoryPerBlockOptin: 227 * 1024, SharedMemoryPerMultiprocessor: 228 * 1024,
            L2CacheBytes: 0, TotalMemoryBytes: GC.GetGCMemoryInfo().TotalAvailableMemoryBytes, MemoryClockKHz: 0, MemoryBusWidthBits: 0);
    }

    public override void MakeCurrent() { }

    public override ulong Allocate(long bytes)
    {
        void* p = _alloc((nuint)bytes);
        if (p == null) throw new OutOfMemoryException($"The emulator could not map {bytes} bytes.");
        return (ulong)p;
    }

    public override void Free(ulong pointer) => _free((void*)pointer);

    public override void Memset(ulong pointer, byte value, long bytes, nint stream) =>
        NativeMemory.Fill((void*)pointer, (nuint)bytes, value);

    public override void CopyHostToDevice(ulong destination, void* source, long bytes, nint stream, bool async) =>
        Buffer.MemoryCopy(source, (void*)destination, bytes, bytes);

    public override void CopyDeviceToHost(void* destination, ulong source, long bytes, nint stream, bool async) =>
        Buffer.MemoryCopy((void*)source, destination, bytes, bytes);

    public override void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream, bool async) =>
        Buffer.MemoryCopy((void*)source, (void*)destination, bytes, bytes);

    // Streams and events: the emulator finishes each call before returning, so there is nothing to order.
    public override nint CreateStream() => 1;
    public override void DestroyStream(nint stream) { }
    public override void SynchronizeStream(nint stream) => ThrowRecordedError();
    public override void StreamWaitEvent(nint stream, nint evt) { }

    public override nint CreateEvent(bool timing)
    {
        lock (_gate)
        {
            nint handle = _eventTimes.Count + 1;
            while (_eventTimes.ContainsKey(handle)) handle++;
            _eventTimes[handle] = 0;
            return handle;
        }
    }

    public override void DestroyEvent(nint evt)
    {
        lock (_gate) _eventTimes.Remove(evt);
    }

    public override void RecordEvent(nint evt, nint stream)
    {
        lock (_gate) _eventTimes[evt] = Stopwatch.GetTimestamp();
    }

    public override void SynchronizeEvent(nint evt) { }

    public override float ElapsedMilliseconds(nint start, nint end)
    {
        lock (_gate) return (float)Stopwatch.GetElapsedTime(_eventTimes[start], _eventTimes[end]).TotalMilliseconds;
    }

    public override void Synchronize() => ThrowRecordedError();

    /// <summary>
    /// Errors found outside a launch (a damaged canary or a bad pointer at free, which must not throw) are recorded
    /// by the runtime; a synchronisation point reports them, as a GPU reports an earlier asynchronous fault.
    /// </summary>
    private void ThrowRecordedError()
    {
        byte* error = stackalloc byte[ErrorCapacity];
        error[0] = 0;
        if (_lastError(error, ErrorCapacity) != 0)
            throw new EmulatorException(null, Marshal.PtrToStringUTF8((nint)error) ?? "The emulator recorded an error.");
    }

    public override (long Free, long Total) MemoryInfo() => (Info.TotalMemoryBytes, Info.TotalMemoryBytes);

    public override nint LoadModule(KernelSpecialization specialization)
    {
        string path = EmulatorCompiler.KernelLibrary(specialization);
        return AddModule(NativeLibrary.Load(path), specialization.Source);
    }

    private nint AddModule(nint library, string source)
    {
        lock (_gate)
        {
            _modules.Add((library, source));
            return _modules.Count;
        }
    }

    // Libraries stay loaded for the life of the process: unloading code another thread may still reference buys nothing.
    public override void UnloadModule(nint module) { }

    public override nint GetFunction(nint module, string name)
    {
        nint library;
        lock (_gate) library = _modules[(int)module - 1].Library;
        if (!NativeLibrary.TryGetExport(library, "kvk_emu_entry_" + name, out nint entry))
            throw new EmulatorException(name, $"The emulated module has no entry point {name}.");
        byte[] utf8 = Encoding.UTF8.GetBytes(name + "\0");
        lock (_gate)
        {
            _functions.Add((entry, name, utf8));
            return _functions.Count;
        }
    }

    public override KernelAttributes GetAttributes(nint function) => new(0, 0, 0, Info.MaxThreadsPerBlock);

    public override void SetMaxDynamicSharedMemory(nint function, int bytes) { }

    public override void Launch(nint function, Dim3 grid, Dim3 block, int sharedBytes, nint stream, void** arguments)
    {
        (nint entry, string name, byte[] utf8) = _functions[(int)function - 1];
        byte* error = stackalloc byte[ErrorCapacity];
        error[0] = 0;
        int code;
        fixed (byte* kernelName = utf8)
        {
            code = _launch(entry, arguments, kernelName, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z,
                (uint)sharedBytes, (uint)Info.SharedMemoryPerBlockOptin, _hostThreads, error, ErrorCapacity);
        }
        if (code != 0)
        {
            string message = Marshal.PtrToStringUTF8((nint)error) ?? "";
            throw new EmulatorException(name, message.Length > 0 ? message : $"Emulated launch of {name} failed with code {code}.");
        }
    }

    protected override void ReleaseNative() { }
}
