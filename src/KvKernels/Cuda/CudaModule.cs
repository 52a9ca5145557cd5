using System.Collections.Concurrent;
using KvKernels.Compilation;

namespace KvKernels.Cuda;

/// <summary>A kernel specialization compiled for and loaded on one device. Obtain it with <see cref="CudaDevice.LoadModule"/>.</summary>
public sealed class CudaModule : IDisposable
{
    private readonly BackendHandle _handle;
    private readonly ConcurrentDictionary<string, CudaKernel> _kernels = new(StringComparer.Ordinal);

    internal CudaModule(CudaDevice device, KernelSpecialization specialization, BackendHandle handle)
    {
        Device = device;
        Specialization = specialization;
        _handle = handle;
    }

    /// <summary>The device the module is loaded on.</summary>
    public CudaDevice Device { get; }

    /// <summary>What was compiled.</summary>
    public KernelSpecialization Specialization { get; }

    /// <summary>The entry point <paramref name="name"/> (an <c>extern "C" __global__</c> function), looked up once.</summary>
    public CudaKernel GetKernel(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _kernels.GetOrAdd(name, n =>
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return new CudaKernel(this, n, Device.Backend.GetFunction(_handle.Value, n));
        });
    }

    /// <summary>Unloads the module; kernels obtained from it become unusable.</summary>
    public void Dispose() => _handle.Dispose();
}
