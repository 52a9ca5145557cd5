using System.Runtime.CompilerServices;

namespace KvKernels.Cuda;

/// <summary>
/// A view of device memory: device, address and length, like <see cref="Span{T}"/> for the GPU. Cheap to copy
/// and slice; it does not own the memory. Copies without a stream wait for completion; copies with a stream are
/// ordered on that stream (a pageable host source is staged before the call returns; a host destination must stay
/// alive and unread until the stream reaches the copy, which <see cref="PinnedMemory{T}"/> makes easy).
/// </summary>
public readonly unsafe struct DeviceSpan<T> where T : unmanaged
{
    internal DeviceSpan(CudaDevice device, ulong pointer, long length)
    {
        Device = device;
        Pointer = pointer;
        Length = length;
    }

    /// <summary>The device that owns the memory (null for a default span).</summary>
    public CudaDevice? Device { get; }

    /// <summary>Device address of element 0.</summary>
    public ulong Pointer { get; }

    /// <summary>Number of elements.</summary>
    public long Length { get; }

    /// <summary>Size in bytes.</summary>
    public long ByteLength => Length * Unsafe.SizeOf<T>();

    /// <summary>True when the span has no elements.</summary>
    public bool IsEmpty => Length == 0;

    /// <summary>The elements [<paramref name="start"/>, end).</summary>
    public DeviceSpan<T> Slice(long start) => Slice(start, Length - start);

    /// <summary>The elements [<paramref name="start"/>, <paramref name="start"/> + <paramref name="length"/>).</summary>
    public DeviceSpan<T> Slice(long start, long length)
    {
        if ((ulong)start > (ulong)Length || (ulong)length > (ulong)(Length - start))
            throw new ArgumentOutOfRangeException(nameof(start), $"Slice [{start}, {start}+{length}) is outside a span of {Length} elements.");
        return new DeviceSpan<T>(Device!, Pointer + (ulong)(start * Unsafe.SizeOf<T>()), length);
    }

    /// <summary>Reinterprets the memory as elements of <typeparamref name="TTo"/> (the byte length must divide evenly).</summary>
    public DeviceSpan<TTo> Cast<TTo>() where TTo : unmanaged
    {
        long bytes = ByteLength;
        if (bytes % Unsafe.SizeOf<TTo>() != 0)
            throw new ArgumentException($"{bytes} bytes is not a whole number of {typeof(TTo).Name} elements.");
        return new DeviceSpan<TTo>(Device!, Pointer, bytes / Unsafe.SizeOf<TTo>());
    }

    /// <summary>The same memory as bytes.</summary>
    public DeviceSpan<byte> AsBytes() => new(Device!, Pointer, ByteLength);

    private DeviceBackend Backend => (Device ?? throw new InvalidOperationException("The span is default (no memory).")).Backend;

    /// <summary>Copies <paramref name="source"/> to the start of this span and waits for the copy.</summary>
    public void CopyFrom(ReadOnlySpan<T> source)
    {
        CheckFits(source.Length, nameof(source));
        if (source.IsEmpty) return;
        fixed (T* p = source) Backend.CopyHostToDevice(Pointer, p, (long)source.Length * sizeof(T), 0, async: false);
    }

    /// <summary>Enqueues a copy of <paramref name="source"/> to the start of this span on <paramref name="stream"/>.</summary>
    public void CopyFrom(ReadOnlySpan<T> source, CudaStream stream)
    {
        CheckFits(source.Length, nameof(source));
        CheckStream(stream);
        if (source.IsEmpty) return;
        fixed (T* p = source) Backend.CopyHostToDevice(Pointer, p, (long)source.Length * sizeof(T), stream.Handle, async: true);
    }

    /// <summary>Copies the first <c>destination.Length</c> elements into <paramref name="destination"/> and waits for the copy.</summary>
    public void CopyTo(Span<T> destination)
    {
        CheckFits(destination.Length, nameof(destination));
        if (destination.IsEmpty) return;
        fixed (T* p = destination) Backend.CopyDeviceToHost(p, Pointer, (long)destination.Length * sizeof(T), 0, async: false);
    }

    /// <summary>Enqueues a copy into pinned host memory on <paramref name="stream"/>.</summary>
    public void CopyTo(PinnedMemory<T> destination, CudaStream stream)
    {
        ArgumentNullException.ThrowIfNull(destination);
        CheckFits(destination.Length, nameof(destination));
        CheckStream(stream);
        if (destination.Length == 0) return;
        Backend.CopyDeviceToHost(destination.Pointer, Pointer, (long)destination.Length * sizeof(T), stream.Handle, async: true);
    }

    /// <summary>Enqueues a copy from pinned host memory on <paramref name="stream"/>.</summary>
    public void CopyFrom(PinnedMemory<T> source, CudaStream stream)
    {
        ArgumentNullException.ThrowIfNull(source);
        CheckFits(source.Length, nameof(source));
        CheckStream(stream);
        if (source.Length == 0) return;
        Backend.CopyHostToDevice(Pointer, source.Pointer, (long)source.Length * sizeof(T), stream.Handle, async: true);
    }

    /// <summary>Copies this span into the start of <paramref name="destination"/> (device to device); stream-ordered
    /// when <paramref name="stream"/> is given, otherwise it waits.</summary>
    public void CopyTo(DeviceSpan<T> destination, CudaStream? stream = null)
    {
        if (destination.Length < Length)
            throw new ArgumentException($"Destination has {destination.Length} elements; expected at least {Length}.", nameof(destination));
        if (stream is not null) CheckStream(stream);
        if (IsEmpty) return;
        Backend.CopyDeviceToDevice(destination.Pointer, Pointer, ByteLength, stream?.Handle ?? 0, async: stream is not null);
    }

    /// <summary>Sets every byte of the span to <paramref name="value"/> (stream-ordered; waits when no stream is given).</summary>
    public void FillBytes(byte value, CudaStream? stream = null)
    {
        if (stream is not null) CheckStream(stream);
        if (IsEmpty) return;
        Backend.Memset(Pointer, value, ByteLength, stream?.Handle ?? 0);
        if (stream is null) Backend.SynchronizeStream(0);
    }

    /// <summary>Copies the whole span to a new array.</summary>
    public T[] ToArray()
    {
        var array = new T[checked((int)Length)];
        CopyTo(array);
        return array;
    }

    private void CheckFits(int hostLength, string paramName)
    {
        if (hostLength > Length)
            throw new ArgumentException($"{paramName} has {hostLength} elements; the device span has only {Length}.", paramName);
    }

    private void CheckStream(CudaStream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (!ReferenceEquals(stream.Device, Device))
            throw new ArgumentException("The stream belongs to another device.", nameof(stream));
    }

    /// <inheritdoc />
    public override string ToString() => $"DeviceSpan<{typeof(T).Name}>[{Length}] @0x{Pointer:x}";
}
