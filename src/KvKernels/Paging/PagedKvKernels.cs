using System.Runtime.CompilerServices;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Paging;

/// <summary>
/// The GPU paged-KV-cache ops (<c>cuda/paging/paging.cu</c>) on one device: append, gather, scatter, page copy.
/// Same functions and validation as <see cref="PagedKvCache"/>; index metadata comes as validated device buffers
/// (<see cref="DeviceSlotMapping"/>, <see cref="DeviceBlockTable"/>, <see cref="DevicePageCopies"/>). Calls are
/// stream-ordered, never synchronise and allocate nothing once the kernels are loaded.
/// </summary>
public sealed class PagedKvKernels
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "paging/paging.cu";

    /// <summary>The entry points every paging specialization contains.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } = ["paging_append", "paging_gather", "paging_scatter", "paging_copy_pages"];

    /// <summary>Every specialization the library ships: vector width {8, 16} bytes × layout {NHD, HND}.</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        .. from vec in new[] { 8, 16 }
           from layout in new[] { KvLayout.Nhd, KvLayout.Hnd }
           select Specialize(vec, layout),
    ];

    private const int Threads = 256;
    private const int VectorsPerThread = 4;

    private readonly CudaDevice _device;
    private readonly CudaKernel?[] _kernels = new CudaKernel?[Specializations.Count * 4];

    /// <summary>Binds the ops to <paramref name="device"/>; kernels are compiled and loaded on first use.</summary>
    public PagedKvKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    private static KernelSpecialization Specialize(int vectorBytes, KvLayout layout) =>
        KernelSpecialization.Create(Source, ("VEC_BYTES", vectorBytes), ("KV_LAYOUT_HND", layout == KvLayout.Hnd ? 1 : 0));

    /// <summary>Writes each token's K and V rows into its slot; slot −1 skips the token. See <see cref="PagedKvCache.Append{T}"/>.</summary>
    /// <param name="spec">Pool shape, token count, source strides.</param>
    /// <param name="keys">Source keys.</param>
    /// <param name="values">Source values, or default for a keys-only cache.</param>
    /// <param name="slots">Validated slots for <paramref name="spec"/>'s pool; <c>slots.Count</c> must equal NumTokens.</param>
    /// <param name="keyPool">Key pool, written.</param>
    /// <param name="valuePool">Value pool, written; default when <paramref name="values"/> is.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    public void Append<T>(in PagedAppendSpec spec, DeviceSpan<T> keys, DeviceSpan<T> values, DeviceSlotMapping slots,
        DeviceSpan<T> keyPool, DeviceSpan<T> valuePool, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(slots);
        spec.Validate<T>(keys.Length, values.Length, slots.Count, keyPool.Length, valuePool.Length);
        CheckSlots(slots, spec.Pool);
        CheckDevice(keys, nameof(keys));
        CheckDevice(keyPool, nameof(keyPool));
        CheckDeviceIfPresent(values, nameof(values));
        CheckDeviceIfPresent(valuePool, nameof(valuePool));
        if (spec.NumTokens == 0) return;

        int size = Unsafe.SizeOf<T>();
        int rowBytes = spec.Pool.HeadDim * size;
        int vec = VectorWidth(rowBytes,
            (keys.Pointer, nameof(keys)), (values.Pointer, nameof(values)), (keyPool.Pointer, nameof(keyPool)), (valuePool.Pointer, nameof(valuePool)),
            ((ulong)(spec.KeyStride * size), "spec.KeyTokenStride"), ((ulong)(spec.ValueStride * size), "spec.ValueTokenStride"));
        long vectors = (long)spec.NumTokens * spec.Pool.NumKvHeads * (rowBytes / vec);

        var args = new KernelArguments();
        args.Add(keys);
        args.AddPointer(values.Pointer);
        args.Add(slots.Slots);
        args.Add(keyPool);
        args.AddPointer(valuePool.Pointer);
        args.Add(spec.NumTokens);
        args.Add(spec.Pool.NumKvHeads);
        args.Add(spec.Pool.PageSize);
        args.Add(rowBytes);
        args.Add(spec.KeyStride * size);
        args.Add(spec.ValueStride * size);
        Kernel(vec, spec.Pool.Layout, 0).Launch(new Dim3(Blocks(vectors, 1)), Threads, 0, stream, ref args);
    }

    /// <summary>Copies each sequence's tokens from the pools into contiguous <c>[B, MaxTokens, Hkv, D]</c> buffers.
    /// See <see cref="PagedKvCache.Gather{T}"/>.</summary>
    /// <param name="spec">Pool shape, batch shape, padding behaviour.</param>
    /// <param name="keyPool">Key pool.</param>
    /// <param name="valuePool">Value pool, or default for keys only.</param>
    /// <param name="table">Validated block table and lengths of this batch.</param>
    /// <param name="keys">Contiguous keys, written.</param>
    /// <param name="values">Contiguous values, written; default when <paramref name="valuePool"/> is.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    public void Gather<T>(in PagedBatchSpec spec, DeviceSpan<T> keyPool, DeviceSpan<T> valuePool, DeviceBlockTable table,
        DeviceSpan<T> keys, DeviceSpan<T> values, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        CheckTable(table, spec, write: false);
        spec.Validate<T>(keyPool.Length, valuePool.Length, table.BatchSize * spec.MaxPagesPerSequence, table.BatchSize, keys.Length, values.Length);
        Transfer(spec, keyPool, valuePool, table, keys, values, stream, scatter: false);
    }

    /// <summary>Copies each sequence's first <c>lengths[b]</c> tokens from contiguous buffers into the pools (the
    /// reverse of <see cref="Gather{T}"/>). The table must use no page twice.</summary>
    /// <param name="spec">Pool shape and batch shape.</param>
    /// <param name="keys">Contiguous keys.</param>
    /// <param name="values">Contiguous values, or default for keys only.</param>
    /// <param name="table">Validated block table and lengths of this batch.</param>
    /// <param name="keyPool">Key pool, written.</param>
    /// <param name="valuePool">Value pool, written; default when <paramref name="values"/> is.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    public void Scatter<T>(in PagedBatchSpec spec, DeviceSpan<T> keys, DeviceSpan<T> values, DeviceBlockTable table,
        DeviceSpan<T> keyPool, DeviceSpan<T> valuePool, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        CheckTable(table, spec, write: true);
        spec.Validate<T>(keyPool.Length, valuePool.Length, table.BatchSize * spec.MaxPagesPerSequence, table.BatchSize, keys.Length, values.Length);
        Transfer(spec, keyPool, valuePool, table, keys, values, stream, scatter: true);
    }

    private void Transfer<T>(in PagedBatchSpec spec, DeviceSpan<T> keyPool, DeviceSpan<T> valuePool, DeviceBlockTable table,
        DeviceSpan<T> keys, DeviceSpan<T> values, CudaStream? stream, bool scatter) where T : unmanaged
    {
        CheckDevice(keyPool, nameof(keyPool));
        CheckDevice(keys, nameof(keys));
        CheckDeviceIfPresent(valuePool, nameof(valuePool));
        CheckDeviceIfPresent(values, nameof(values));
        if (spec.BatchSize == 0 || spec.MaxTokens == 0) return;
        int rowBytes = spec.Pool.HeadDim * Unsafe.SizeOf<T>();
        int vec = VectorWidth(rowBytes, (keyPool.Pointer, nameof(keyPool)), (valuePool.Pointer, nameof(valuePool)),
            (keys.Pointer, nameof(keys)), (values.Pointer, nameof(values)));
        int tokens = scatter || !spec.ZeroFillPadding ? table.LongestSequence : spec.MaxTokens;
        if (tokens == 0) return;
        long vectorsPerSequence = (long)tokens * spec.Pool.NumKvHeads * (rowBytes / vec);
        uint gridY = (uint)Math.Min(spec.BatchSize, _device.Info.MaxGridDimY);

        var args = new KernelArguments();
        if (scatter)
        {
            args.Add(keys);
            args.AddPointer(values.Pointer);
        }
        else
        {
            args.Add(keyPool);
            args.AddPointer(valuePool.Pointer);
        }
        args.Add(table.Table);
        args.Add(table.Lengths);
        if (scatter)
        {
            args.Add(keyPool);
            args.AddPointer(valuePool.Pointer);
        }
        else
        {
            args.Add(keys);
            args.AddPointer(values.Pointer);
        }
        args.Add(spec.BatchSize);
        args.Add(spec.MaxPagesPerSequence);
        args.Add(spec.MaxTokens);
        args.Add(spec.Pool.NumKvHeads);
        args.Add(spec.Pool.PageSize);
        args.Add(rowBytes);
        if (!scatter) args.Add(spec.ZeroFillPadding ? 1 : 0);
        Kernel(vec, spec.Pool.Layout, scatter ? 2 : 1).Launch(new Dim3(Blocks(vectorsPerSequence, gridY), gridY), Threads, 0, stream, ref args);
    }

    /// <summary>Copies whole pages for each validated (source, destination) pair, in the key pool and (when given)
    /// the value pool. See <see cref="PagedKvCache.CopyPages{T}"/>.</summary>
    /// <param name="pool">The pools' shape.</param>
    /// <param name="copies">Validated pairs for <paramref name="pool"/>.</param>
    /// <param name="keyPool">Key pool, read and written.</param>
    /// <param name="valuePool">Value pool, or default.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    public void CopyPages<T>(in PagedKvLayout pool, DevicePageCopies copies, DeviceSpan<T> keyPool, DeviceSpan<T> valuePool,
        CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(copies);
        pool.Validate<T>(nameof(pool));
        PagingChecks.Length(keyPool.Length, pool.PoolElements, nameof(keyPool));
        if (!valuePool.IsEmpty) PagingChecks.Length(valuePool.Length, pool.PoolElements, nameof(valuePool));
        if (!ReferenceEquals(copies.Device, _device)) throw new ArgumentException("The page copies belong to another device.", nameof(copies));
        if (copies.Pool.NumPages != pool.NumPages)
            throw new ArgumentException($"The page copies were validated for {copies.Pool.NumPages} pages; the pool has {pool.NumPages}.", nameof(copies));
        CheckDevice(keyPool, nameof(keyPool));
        CheckDeviceIfPresent(valuePool, nameof(valuePool));
        if (copies.Count == 0) return;
        long pageBytes = pool.PageElements * Unsafe.SizeOf<T>();
        int vec = VectorWidth(pageBytes % 16 == 0 ? 16 : 8, (keyPool.Pointer, nameof(keyPool)), (valuePool.Pointer, nameof(valuePool)));
        uint gridY = (uint)Math.Min(copies.Count, _device.Info.MaxGridDimY);

        var args = new KernelArguments();
        args.Add(keyPool);
        args.AddPointer(valuePool.Pointer);
        args.Add(copies.Pairs);
        args.Add(copies.Count);
        args.Add(pageBytes);
        Kernel(vec, pool.Layout, 3).Launch(new Dim3(Blocks(pageBytes / vec, gridY), gridY), Threads, 0, stream, ref args);
    }

    private CudaKernel Kernel(int vectorBytes, KvLayout layout, int entry)
    {
        int specialization = (vectorBytes == 16 ? 2 : 0) + (layout == KvLayout.Hnd ? 1 : 0);
        int index = specialization * 4 + entry;
        return _kernels[index] ??= _device.LoadModule(Specializations[specialization]).GetKernel(EntryPoints[entry]);
    }

    /// <summary>Blocks along x so that the whole grid holds a few waves of the device, and no block idles.</summary>
    private uint Blocks(long vectors, uint gridY)
    {
        long needed = (vectors + Threads * VectorsPerThread - 1) / (Threads * VectorsPerThread);
        long wave = Math.Max(1, _device.Info.MultiprocessorCount * 8L / gridY);
        return (uint)Math.Clamp(Math.Min(needed, wave), 1, int.MaxValue);
    }

    /// <summary>16-byte vectors when the row and every address allow them, else 8-byte; every address must be 8-byte aligned.</summary>
    private static int VectorWidth(int rowBytes, params ReadOnlySpan<(ulong Address, string Name)> addresses)
    {
        bool sixteen = rowBytes % 16 == 0;
        foreach (var (address, name) in addresses)
        {
            if (address % 8 != 0)
                throw new ArgumentException($"{name} is at 0x{address:x}; the paging kernels need 8-byte aligned addresses and strides.", name);
            if (address % 16 != 0) sixteen = false;
        }
        return sixteen ? 16 : 8;
    }

    private void CheckDevice<T>(DeviceSpan<T> span, string name) where T : unmanaged => _device.EnsureSame(span.Device, name);

    private void CheckDeviceIfPresent<T>(DeviceSpan<T> span, string name) where T : unmanaged
    {
        if (span.Device is not null) _device.EnsureSame(span.Device, name);
    }

    private void CheckSlots(DeviceSlotMapping slots, in PagedKvLayout pool)
    {
        if (!ReferenceEquals(slots.Device, _device)) throw new ArgumentException("The slot mapping belongs to another device.", nameof(slots));
        if (slots.Pool.NumPages != pool.NumPages || slots.Pool.PageSize != pool.PageSize)
            throw new ArgumentException($"The slots were validated for {slots.Pool.NumPages} pages of {slots.Pool.PageSize}; the pool has {pool.NumPages} of {pool.PageSize}.", nameof(slots));
    }

    private void CheckTable(DeviceBlockTable table, in PagedBatchSpec spec, bool write)
    {
        if (!ReferenceEquals(table.Device, _device)) throw new ArgumentException("The block table belongs to another device.", nameof(table));
        if (table.BatchSize != spec.BatchSize)
            throw new ArgumentException($"The block table holds {table.BatchSize} sequences; spec.BatchSize is {spec.BatchSize}.", nameof(table));
        if (table.MaxPagesPerSequence != spec.MaxPagesPerSequence)
            throw new ArgumentException($"The block table has {table.MaxPagesPerSequence} columns; spec.MaxPagesPerSequence is {spec.MaxPagesPerSequence}.", nameof(table));
        if (table.Pool.NumPages != spec.Pool.NumPages || table.Pool.PageSize != spec.Pool.PageSize)
            throw new ArgumentException($"The block table was validated for {table.Pool.NumPages} pages of {table.Pool.PageSize}; the pool has {spec.Pool.NumPages} of {spec.Pool.PageSize}.", nameof(table));
        if (table.LongestSequence > spec.MaxTokens)
            throw new ArgumentException($"A sequence has {table.LongestSequence} tokens; the contiguous buffer holds MaxTokens = {spec.MaxTokens}.", nameof(table));
        if (write && !table.PagesDistinct)
            throw new ArgumentException("The block table uses a page twice; scatter writes each page once.", nameof(table));
    }
}
