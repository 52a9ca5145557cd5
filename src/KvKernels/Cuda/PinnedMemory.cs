using System.Runtime.CompilerServices;
using KvKernels.Cuda.Interop;

namespace KvKernels.Cuda;

/// <summary>
/// Page-locked host memory (<c>cuMemHostAlloc</c>): the source or destination of truly asynchronous copies.
/// Read and write it through <see cref="AsSpan"/>; dispose to free.
/// </summary>
public sealed unsafe class PinnedMemory<T> : IDisposable where T : unmanaged
{
    private readonly CudaDevice _device;
    private void* _pointer;

    /// <summary>Allocates <paramref name="length"/> pinned elements for use with <paramref name="device"/>.</summary>
    public PinnedMemory(CudaDevice device, int length)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (device.Kind != DeviceKind.Cuda)
            throw new ArgumentException("Pinned host memory needs a CUDA device.", nameof(device));
        _device = device;
        Length = length;
        device.Backend.MakeCurrent();
        void* p;
        CudaException.Check(CudaDriverApi.cuMemHostAlloc(&p, (nuint)Math.Max((long)length * sizeof(T), 1), CudaDriverApi.CU_MEMHOSTALLOC_PORTABLE));
        _pointer = p;
        device.Backend.AddReference();
    }

    /// <summary>Number of elements.</summary>
    public int Length { get; }

    internal void* Pointer
    {
        get
        {
            ObjectDisposedException.ThrowIf(_pointer == null, this);
            return _pointer;
        }
    }

    /// <summary>The memory as a span (do not touch it while an async copy that uses it is in flight).</summary>
    public Span<T> AsSpan() => new(Pointer, Length);

    /// <summary>Frees the memory.</summary>
    public void Dispose()
    {
        void* p = _pointer;
        if (p == null) return;
        _pointer = null;
        _device.Backend.MakeCurrent();
        CudaDriverApi.cuMemFreeHost(p);
        _device.Backend.Release();
        GC.SuppressFinalize(this);
    }

    /// <summary>Frees the memory if the owner forgot to.</summary>
    ~PinnedMemory()
    {
        if (_pointer == null) return;
        try { CudaDriverApi.cuMemFreeHost(_pointer); } catch { /* never throw from a finalizer */ }
        _device.Backend.Release();
    }

    internal long ByteLength => (long)Length * Unsafe.SizeOf<T>();
}
