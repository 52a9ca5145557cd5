using System.Collections.Concurrent;
using KvKernels.Compilation;

namespace KvKernels.Cuda;

/// <summary>
/// One device and its context: the owner of memory, streams, events and loaded kernels. Open a GPU with
/// <see cref="Open"/>. Every object created from a device keeps its context alive until that object is disposed,
/// so disposing the device first is safe.
/// </summary>
/// <example>
/// <code>
/// using var device = CudaDevice.Open();
/// using var buffer = device.Allocate&lt;float&gt;(1024);
/// buffer.CopyFrom(hostData);
/// </code>
/// </example>
public sealed class CudaDevice : IDisposable
{
    private readonly ConcurrentDictionary<KernelSpecialization, Lazy<CudaModule>> _modules = new();
    private int _disposed;

    internal DeviceBackend Backend { get; }

    internal CudaDevice(DeviceBackend backend)
    {
        Backend = backend;
        DefaultStream = new CudaStream(this, null);
    }

    /// <summary>True when a CUDA GPU can be opened on this machine (driver found, initialised, ≥ 1 device).</summary>
    public static bool IsAvailable => CudaDriver.IsAvailable;

    /// <summary>Why <see cref="IsAvailable"/> is false; null when it is true.</summary>
    public static string? UnavailableReason => CudaDriver.UnavailableReason;

    /// <summary>Opens GPU <paramref name="ordinal"/> on its primary context (shared with cuBLAS and other libraries).</summary>
    /// <exception cref="CudaUnavailableException">No usable driver or device; the message says what was probed.</exception>
    /// <exception cref="ArgumentOutOfRangeException">No device with that ordinal.</exception>
    public static CudaDevice Open(int ordinal = 0) => new(new CudaDriverBackend(ordinal));

    /// <summary>True when the CPU emulator can run kernels here (Linux with a C++ compiler).</summary>
    public static bool IsEmulatorAvailable => Emulation.EmulatorCompiler.IsAvailable;

    /// <summary>Why <see cref="IsEmulatorAvailable"/> is false; null when it is true.</summary>
    public static string? EmulatorUnavailableReason => Emulation.EmulatorCompiler.UnavailableReason;

    /// <summary>
    /// Opens the emulated device: the same kernels, launches and memory API, executed on the CPU (each CUDA thread a
    /// fiber, blocks spread over <paramref name="hostThreads"/> threads; 0 = one per core). It proves indexing,
    /// masking, reductions and boundary handling; it says nothing about speed or memory-model races.
    /// </summary>
    /// <exception cref="CudaUnavailableException">No C++ compiler, or not Linux.</exception>
    public static CudaDevice OpenEmulated(int hostThreads = 0) => new(new Emulation.EmulatedBackend(hostThreads));

    /// <summary>The backend this device runs on.</summary>
    public DeviceKind Kind => Backend.Kind;

    /// <summary>What the device reports about itself.</summary>
    public DeviceInfo Info => Backend.Info;

    /// <summary>Device name.</summary>
    public string Name => Backend.Info.Name;

    /// <summary>NVRTC target, for example <c>sm_90</c>.</summary>
    public string Arch => Backend.Info.Arch;

    /// <summary>The legacy default stream (handle 0) of this device.</summary>
    public CudaStream DefaultStream { get; }

    /// <summary>Allocates <paramref name="length"/> elements of device memory (contents undefined).</summary>
    public DeviceMemory<T> Allocate<T>(long length) where T : unmanaged
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ThrowIfDisposed();
        return new DeviceMemory<T>(this, length);
    }

    /// <summary>Allocates device memory and copies <paramref name="source"/> into it.</summary>
    public DeviceMemory<T> Allocate<T>(ReadOnlySpan<T> source) where T : unmanaged
    {
        var memory = Allocate<T>(source.Length);
        memory.CopyFrom(source);
        return memory;
    }

    /// <summary>Creates a stream (it synchronises with the legacy default stream, so synchronous copies see its work).</summary>
    public CudaStream CreateStream()
    {
        ThrowIfDisposed();
        return new CudaStream(this, new BackendHandle(Backend, BackendHandle.Kind.Stream, Backend.CreateStream()));
    }

    /// <summary>Creates an event; <paramref name="enableTiming"/> allows <see cref="CudaEvent.ElapsedMilliseconds"/>.</summary>
    public CudaEvent CreateEvent(bool enableTiming = true)
    {
        ThrowIfDisposed();
        return new CudaEvent(this, new BackendHandle(Backend, BackendHandle.Kind.Event, Backend.CreateEvent(enableTiming)));
    }

    /// <summary>Waits until all work on the device has finished.</summary>
    public void Synchronize() => Backend.Synchronize();

    /// <summary>Free and total device memory in bytes.</summary>
    public (long Free, long Total) MemoryInfo() => Backend.MemoryInfo();

    /// <summary>
    /// The module for a kernel specialization, compiled for this device (through the on-disk cache) and loaded once;
    /// later calls return the same module.
    /// </summary>
    public CudaModule LoadModule(KernelSpecialization specialization)
    {
        ThrowIfDisposed();
        return _modules.GetOrAdd(specialization,
            s => new Lazy<CudaModule>(() => new CudaModule(this, s,
                new BackendHandle(Backend, BackendHandle.Kind.Module, Backend.LoadModule(s))))).Value;
    }

    internal void EnsureSame(CudaDevice? other, string paramName)
    {
        if (other is null) throw new ArgumentException("The buffer is default (not allocated).", paramName);
        if (!ReferenceEquals(other, this)) throw new ArgumentException("The buffer belongs to another device.", paramName);
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed != 0, this);

    /// <summary>Releases this device's reference on its context and unloads its modules (memory, streams and
    /// events created from it keep the context alive until they are disposed).</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        foreach (var lazy in _modules.Values)
            if (lazy.IsValueCreated) lazy.Value.Dispose();
        _modules.Clear();
        Backend.Release();
    }

    /// <inheritdoc />
    public override string ToString() => $"{Name} ({Arch}, {Kind})";
}
