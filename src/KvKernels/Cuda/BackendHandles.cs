using System.Runtime.InteropServices;

namespace KvKernels.Cuda;

/// <summary>
/// A native object owned through a backend (allocation, stream, event, module). Each handle holds a reference on
/// its backend, so the context outlives every child; release never throws (it may run on the finalizer thread).
/// </summary>
internal sealed class BackendHandle : SafeHandle
{
    public enum Kind { Allocation, Stream, Event, Module }

    private readonly DeviceBackend _backend;
    private readonly Kind _kind;

    public BackendHandle(DeviceBackend backend, Kind kind, nint value) : base(0, ownsHandle: true)
    {
        _backend = backend;
        _kind = kind;
        backend.AddReference();
        SetHandle(value);
    }

    public override bool IsInvalid => handle == 0;

    public nint Value => handle;

    protected override bool ReleaseHandle()
    {
        try
        {
            switch (_kind)
            {
                case Kind.Allocation: _backend.Free((ulong)handle); break;
                case Kind.Stream: _backend.DestroyStream(handle); break;
                case Kind.Event: _backend.DestroyEvent(handle); break;
                case Kind.Module: _backend.UnloadModule(handle); break;
            }
        }
        catch
        {
            // Release must not throw: at process exit the driver may already be deinitialised.
        }
        _backend.Release();
        return true;
    }
}
