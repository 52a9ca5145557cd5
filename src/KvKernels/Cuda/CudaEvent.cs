namespace KvKernels.Cuda;

/// <summary>A marker in a stream: record it, wait for it, or time the work between two of them.</summary>
public sealed class CudaEvent : IDisposable
{
    private readonly BackendHandle _handle;

    internal CudaEvent(CudaDevice device, BackendHandle handle)
    {
        Device = device;
        _handle = handle;
    }

    /// <summary>The device this event belongs to.</summary>
    public CudaDevice Device { get; }

    internal nint Handle
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return _handle.Value;
        }
    }

    /// <summary>Records the event on <paramref name="stream"/> (the default stream when null).</summary>
    public void Record(CudaStream? stream = null) => Device.Backend.RecordEvent(Handle, stream?.Handle ?? 0);

    /// <summary>Waits until the work recorded before this event has finished.</summary>
    public void Synchronize() => Device.Backend.SynchronizeEvent(Handle);

    /// <summary>Milliseconds between two recorded, completed events (resolution about 0.5 µs).</summary>
    public static float ElapsedMilliseconds(CudaEvent start, CudaEvent end)
    {
        ArgumentNullException.ThrowIfNull(start);
        ArgumentNullException.ThrowIfNull(end);
        return start.Device.Backend.ElapsedMilliseconds(start.Handle, end.Handle);
    }

    /// <summary>Destroys the event.</summary>
    public void Dispose() => _handle.Dispose();
}
