using System.Runtime.CompilerServices;

namespace KvKernels.Cuda;

/// <summary>Grid or block dimensions.</summary>
/// <param name="X">Extent in x.</param>
/// <param name="Y">Extent in y.</param>
/// <param name="Z">Extent in z.</param>
public readonly record struct Dim3(uint X, uint Y = 1, uint Z = 1)
{
    /// <summary>Total count (X · Y · Z).</summary>
    public long Count => (long)X * Y * Z;

    /// <summary>A one-dimensional extent.</summary>
    public static implicit operator Dim3(uint x) => new(x);
}

/// <summary>
/// The arguments of one launch, built on the stack in declaration order of the kernel's parameters. Each argument
/// occupies one 8-byte slot holding exactly the bytes of its C type (<c>int</c> → 4 bytes, pointers and
/// <c>long long</c> → 8), so the typed <c>Add</c> overloads are the contract with the kernel signature.
/// Allocates nothing.
/// </summary>
public ref struct KernelArguments
{
    /// <summary>The most arguments one launch may take.</summary>
    public const int MaxCount = 32;

    [InlineArray(MaxCount)]
    private struct Slots
    {
        private ulong _element0;
    }

    private Slots _slots;
    private int _count;

    /// <summary>Number of arguments added.</summary>
    public readonly int Count => _count;

    [System.Diagnostics.CodeAnalysis.UnscopedRef]
    private ref ulong Next()
    {
        if (_count == MaxCount) throw new InvalidOperationException($"A launch takes at most {MaxCount} arguments.");
        _slots[_count] = 0;
        return ref _slots[_count++];
    }

    /// <summary>Adds a C <c>int</c>.</summary>
    public void Add(int value) => Unsafe.As<ulong, int>(ref Next()) = value;

    /// <summary>Adds a C <c>unsigned int</c>.</summary>
    public void Add(uint value) => Unsafe.As<ulong, uint>(ref Next()) = value;

    /// <summary>Adds a C <c>long long</c>.</summary>
    public void Add(long value) => Unsafe.As<ulong, long>(ref Next()) = value;

    /// <summary>Adds a C <c>float</c>.</summary>
    public void Add(float value) => Unsafe.As<ulong, float>(ref Next()) = value;

    /// <summary>Adds a device pointer (<c>T*</c>): the address of the span's first element.</summary>
    public void Add<T>(DeviceSpan<T> span) where T : unmanaged => Next() = span.Pointer;

    /// <summary>Adds a raw device pointer; 0 is the null pointer.</summary>
    public void AddPointer(ulong address) => Next() = address;

    internal unsafe void Fill(void** parameters)
    {
        for (int i = 0; i < _count; i++) parameters[i] = Unsafe.AsPointer(ref _slots[i]);
    }
}

/// <summary>One entry point of a loaded module, launched with typed, allocation-free arguments.</summary>
public sealed class CudaKernel
{
    private readonly nint _function;
    private int _dynamicSharedLimit;

    internal CudaKernel(CudaModule module, string name, nint function)
    {
        Module = module;
        Name = name;
        _function = function;
        Attributes = module.Device.Backend.GetAttributes(function);
    }

    /// <summary>The module the kernel lives in.</summary>
    public CudaModule Module { get; }

    /// <summary>The entry point's name.</summary>
    public string Name { get; }

    /// <summary>Registers, static shared memory, local memory and block limit of the loaded binary.</summary>
    public KernelAttributes Attributes { get; }

    /// <summary>
    /// Enqueues the kernel on <paramref name="stream"/> (the device's default stream when null).
    /// Raises the function's dynamic shared memory limit first when <paramref name="sharedBytes"/> exceeds 48 KiB.
    /// </summary>
    /// <exception cref="ArgumentException">Empty grid or block, a block over the kernel's limit, or more shared
    /// memory than the device allows.</exception>
    public unsafe void Launch(Dim3 grid, Dim3 block, int sharedBytes, CudaStream? stream, scoped ref KernelArguments arguments)
    {
        var device = Module.Device;
        var info = device.Info;
        if (grid.Count == 0) throw new ArgumentException("The grid is empty.", nameof(grid));
        if (grid.Y > (uint)info.MaxGridDimY || grid.Z > 65535 || grid.X > int.MaxValue)
            throw new ArgumentException($"Grid {grid} exceeds the device limits.", nameof(grid));
        if (block.Count == 0 || block.Count > Attributes.MaxThreadsPerBlock)
            throw new ArgumentException($"Block {block} has {block.Count} threads; {Name} allows 1..{Attributes.MaxThreadsPerBlock}.", nameof(block));
        if (sharedBytes < 0 || sharedBytes + Attributes.StaticSharedBytes > info.SharedMemoryPerBlockOptin)
            throw new ArgumentException($"{sharedBytes} bytes of dynamic shared memory (+{Attributes.StaticSharedBytes} static) exceed the device's {info.SharedMemoryPerBlockOptin}.", nameof(sharedBytes));
        if (stream is not null && !ReferenceEquals(stream.Device, device))
            throw new ArgumentException("The stream belongs to another device.", nameof(stream));
        if (sharedBytes > 48 * 1024 && sharedBytes > _dynamicSharedLimit)
        {
            device.Backend.SetMaxDynamicSharedMemory(_function, sharedBytes);
            _dynamicSharedLimit = sharedBytes;
        }
        void** parameters = stackalloc void*[Math.Max(arguments.Count, 1)];
        arguments.Fill(parameters);
        device.Backend.Launch(_function, grid, block, sharedBytes, stream?.Handle ?? 0, parameters);
    }
}
