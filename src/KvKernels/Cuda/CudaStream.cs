namespace KvKernels.Cuda;

/// <summary>
/// An ordered queue of device work. Ops and async copies take a stream; <see cref="Synchronize"/> waits for it.
/// The device's <see cref="CudaDevice.DefaultStream"/> is the legacy default stream and is not disposable.
/// </summary>
public sealed class CudaStream : IDisposable
{
    private readonly BackendHandle? _handle;

    internal CudaStream(CudaDevice device, BackendHandle? handle)
    {
        Device = device;
        _handle = handle;
    }

    /// <summary>The device this stream belongs to.</summary>
    public CudaDevice Device { get; }

    /// <summary>The native handle (0 for the legacy default stream).</summary>
    public nint Handle
    {
        get
        {
            if (_handle is null) return 0;
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return _handle.Value;
        }
    }

    /// <summary>Waits until all work queued on this stream has finished.</summary>
    public void Synchronize() => Device.Backend.SynchronizeStream(Handle);

    /// <summary>Makes later work on this stream wait for <paramref name="evt"/>.</summary>
    public void Wait(CudaEvent evt)
    {
        ArgumentNullException.ThrowIfNull(evt);
        Device.Backend.StreamWaitEvent(Handle, evt.Handle);
    }

    /// <summary>Destroys the stream (the default stream is left alone).</summary>
    public void Dispose() => _handle?.Dispose();
}
