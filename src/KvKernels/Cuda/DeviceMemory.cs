using System.Runtime.CompilerServices;

namespace KvKernels.Cuda;

/// <summary>
/// Owns a device allocation of <see cref="Length"/> elements of <typeparamref name="T"/>. Pass <see cref="Span"/>
/// (or the implicit conversion) to ops; dispose to free. Contents are undefined after allocation.
/// </summary>
public sealed class DeviceMemory<T> : IDisposable where T : unmanaged
{
    private readonly BackendHandle _handle;

    internal DeviceMemory(CudaDevice device, long length)
    {
        Device = device;
        Length = length;
        long bytes = checked(length * Unsafe.SizeOf<T>());
        _handle = new BackendHandle(device.Backend, BackendHandle.Kind.Allocation, (nint)device.Backend.Allocate(bytes));
    }

    /// <summary>The device that owns the allocation.</summary>
    public CudaDevice Device { get; }

    /// <summary>Number of elements.</summary>
    public long Length { get; }

    /// <summary>Size in bytes.</summary>
    public long ByteLength => Length * Unsafe.SizeOf<T>();

    /// <summary>The device address of element 0.</summary>
    public ulong Pointer
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return (ulong)_handle.Value;
        }
    }

    /// <summary>A view of the whole allocation.</summary>
    public DeviceSpan<T> Span => new(Device, Pointer, Length);

    /// <summary>A view of the whole allocation.</summary>
    public static implicit operator DeviceSpan<T>(DeviceMemory<T> memory) => memory.Span;

    /// <summary>Copies <paramref name="source"/> into the start of this allocation and waits for the copy.</summary>
    public void CopyFrom(ReadOnlySpan<T> source) => Span.CopyFrom(source);

    /// <summary>Copies the start of this allocation into <paramref name="destination"/> and waits for the copy.</summary>
    public void CopyTo(Span<T> destination) => Span.CopyTo(destination);

    /// <summary>Copies the whole allocation to a new array (convenience for tests and tools).</summary>
    public T[] ToArray() => Span.ToArray();

    /// <summary>Frees the allocation (stream-ordered work that uses it must have finished).</summary>
    public void Dispose() => _handle.Dispose();
}
