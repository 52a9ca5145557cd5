using System.Runtime.InteropServices;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Tests;

/// <summary>
/// A test double of the device backend: memory is host memory, copies are memcpy, and launches are recorded (with
/// their argument values) instead of run. It lets the tests check, without a GPU, that invalid calls never reach a
/// device and that each op launches the kernel it should with the arguments the kernel's signature expects.
/// </summary>
internal sealed unsafe class FakeBackend : DeviceBackend
{
    public sealed record LaunchRecord(string Kernel, string Defines, Dim3 Grid, Dim3 Block, int SharedBytes, ulong[] Arguments);

    private readonly List<(KernelSpecialization Spec, List<string> Functions)> _modules = [];
    private readonly List<string> _functions = [];

    public List<LaunchRecord> Launches { get; } = [];

    /// <summary>Counts every call that would touch a device after setup (copies, memsets, launches).</summary>
    public int DeviceCalls { get; private set; }

    /// <summary>How many arguments each launch passes (the kernel's parameter count), by entry point.</summary>
    public Dictionary<string, int> ArgumentCounts { get; } = new();

    public override DeviceKind Kind => DeviceKind.Emulated;

    public override DeviceInfo Info { get; } = new("Fake device", 9, 0, 132, 1024, 2048, 65535, 48 * 1024, 227 * 1024, 228 * 1024,
        50L << 20, 80L << 30, 2_619_000, 5120);

    public static CudaDevice CreateDevice(out FakeBackend backend)
    {
        backend = new FakeBackend();
        return new CudaDevice(backend);
    }

    public override void MakeCurrent() { }

    public override ulong Allocate(long bytes) => (ulong)NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 1), 256);

    public override void Free(ulong pointer) => NativeMemory.AlignedFree((void*)pointer);

    public override void Memset(ulong pointer, byte value, long bytes, nint stream)
    {
        DeviceCalls++;
        new Span<byte>((void*)pointer, checked((int)bytes)).Fill(value);
    }

    public override void CopyHostToDevice(ulong destination, void* source, long bytes, nint stream, bool async)
    {
        DeviceCalls++;
        Buffer.MemoryCopy(source, (void*)destination, bytes, bytes);
    }

    public override void CopyDeviceToHost(void* destination, ulong source, long bytes, nint stream, bool async)
    {
        DeviceCalls++;
        Buffer.MemoryCopy((void*)source, destination, bytes, bytes);
    }

    public override void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream, bool async)
    {
        DeviceCalls++;
        Buffer.MemoryCopy((void*)source, (void*)destination, bytes, bytes);
    }

    public override nint CreateStream() => 1;
    public override void DestroyStream(nint stream) { }
    public override void SynchronizeStream(nint stream) { }
    public override void StreamWaitEvent(nint stream, nint evt) { }
    public override nint CreateEvent(bool timing) => 1;
    public override void DestroyEvent(nint evt) { }
    public override void RecordEvent(nint evt, nint stream) { }
    public override void SynchronizeEvent(nint evt) { }
    public override float ElapsedMilliseconds(nint start, nint end) => 0;
    public override void Synchronize() { }
    public override (long Free, long Total) MemoryInfo() => (Info.TotalMemoryBytes, Info.TotalMemoryBytes);

    public override nint LoadModule(KernelSpecialization specialization)
    {
        _modules.Add((specialization, []));
        return _modules.Count;
    }

    public override void UnloadModule(nint module) { }

    public override nint GetFunction(nint module, string name)
    {
        _functions.Add(_modules[(int)module - 1].Spec.Defines + "|" + name);
        return _functions.Count;
    }

    public override KernelAttributes GetAttributes(nint function) => new(32, 0, 0, 1024);

    public override void SetMaxDynamicSharedMemory(nint function, int bytes) { }

    public override void Launch(nint function, Dim3 grid, Dim3 block, int sharedBytes, nint stream, void** arguments)
    {
        DeviceCalls++;
        var parts = _functions[(int)function - 1].Split('|');
        int count = ArgumentCounts.TryGetValue(parts[1], out int n) ? n : 0;
        var values = new ulong[count];
        for (int i = 0; i < count; i++) values[i] = *(ulong*)arguments[i];
        Launches.Add(new LaunchRecord(parts[1], parts[0], grid, block, sharedBytes, values));
    }

    protected override void ReleaseNative() { }
}
