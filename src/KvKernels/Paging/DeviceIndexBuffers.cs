using KvKernels.Cuda;

namespace KvKernels.Paging;

/// <summary>
/// Index metadata validated on the host and then uploaded to the device, so that a kernel never sees an index that
/// was not checked. Capacity is fixed at construction; <c>Update</c> methods reuse the device buffer (no allocation).
/// </summary>
public abstract class DeviceIndexBuffer : IDisposable
{
    private readonly DeviceMemory<int> _memory;

    private protected DeviceIndexBuffer(CudaDevice device, long capacity)
    {
        ArgumentNullException.ThrowIfNull(device);
        Device = device;
        _memory = device.Allocate<int>(Math.Max(capacity, 1));
    }

    /// <summary>The device the indices live on.</summary>
    public CudaDevice Device { get; }

    private protected DeviceSpan<int> Memory => _memory.Span;

    private protected void Upload(ReadOnlySpan<int> data, long offset, CudaStream? stream)
    {
        if (data.IsEmpty) return;
        var target = _memory.Span.Slice(offset, data.Length);
        if (stream is null) target.CopyFrom(data);
        else target.CopyFrom(data, stream);
    }

    /// <summary>Frees the device buffer.</summary>
    public void Dispose()
    {
        _memory.Dispose();
        GC.SuppressFinalize(this);
    }
}

/// <summary>Per-token destination slots for <see cref="PagedKvKernels.Append{T}"/>, validated against one pool shape.</summary>
public sealed class DeviceSlotMapping : DeviceIndexBuffer
{
    /// <summary>Creates room for up to <paramref name="capacity"/> tokens.</summary>
    public DeviceSlotMapping(CudaDevice device, int capacity) : base(device, capacity) => Capacity = capacity;

    /// <summary>Most tokens one update can hold.</summary>
    public int Capacity { get; }

    /// <summary>Tokens in the current mapping.</summary>
    public int Count { get; private set; }

    /// <summary>The pool shape the slots were validated for.</summary>
    public PagedKvLayout Pool { get; private set; }

    internal DeviceSpan<int> Slots => Memory;

    /// <summary>Validates <paramref name="slots"/> for <paramref name="pool"/> (−1 or a slot in range, no duplicates)
    /// and uploads them (ordered on <paramref name="stream"/> when given; the host span may be reused on return).</summary>
    /// <exception cref="ArgumentException">More slots than the capacity, or an invalid slot; the mapping is unchanged.</exception>
    public void Update(ReadOnlySpan<int> slots, in PagedKvLayout pool, CudaStream? stream = null)
    {
        if (slots.Length > Capacity)
            throw new ArgumentException($"slots has {slots.Length} entries; this mapping holds at most {Capacity}.", nameof(slots));
        new PagedAppendSpec(pool, slots.Length).ValidateSlots(slots);
        Upload(slots, 0, stream);
        Count = slots.Length;
        Pool = pool;
        GroupSize = 1;
    }

    /// <summary>Tokens per slot entry: 1, or the group size of <see cref="UpdateGroups"/>.</summary>
    public int GroupSize { get; private set; } = 1;

    /// <summary>Validates and uploads one slot per group of <paramref name="groupSize"/> tokens (token-group quantized
    /// formats, <see cref="Quantization.KvQuantizeSpec"/>): each the first slot of its group, a multiple of the group size,
    /// or −1; distinct; the group size must divide the page size.</summary>
    /// <exception cref="ArgumentException">A bad group size or slot; the mapping is unchanged.</exception>
    public void UpdateGroups(ReadOnlySpan<int> groupSlots, in PagedKvLayout pool, int groupSize, CudaStream? stream = null)
    {
        if (groupSize < 1 || pool.PageSize % groupSize != 0)
            throw new ArgumentException($"groupSize is {groupSize}; expected a divisor of the page size {pool.PageSize}.", nameof(groupSize));
        if (groupSlots.Length > Capacity)
            throw new ArgumentException($"groupSlots has {groupSlots.Length} entries; this mapping holds at most {Capacity}.", nameof(groupSlots));
        for (int i = 0; i < groupSlots.Length; i++)
            if (groupSlots[i] != -1 && groupSlots[i] % groupSize != 0)
                throw new ArgumentException($"groupSlots[{i}] is {groupSlots[i]}; a token group starts at a multiple of {groupSize} (or −1 skips it).", nameof(groupSlots));
        new PagedAppendSpec(pool, groupSlots.Length).ValidateSlots(groupSlots);
        Upload(groupSlots, 0, stream);
        Count = groupSlots.Length;
        Pool = pool;
        GroupSize = groupSize;
    }
}

/// <summary>
/// A batch's block table <c>[B, MaxPagesPerSequence]</c> and sequence lengths <c>[B]</c> on the device, validated
/// against one pool shape. An engine updates it once per step and reuses it for every layer.
/// </summary>
public sealed class DeviceBlockTable : DeviceIndexBuffer
{
    /// <summary>Creates room for <paramref name="maxBatchSize"/> sequences of up to <paramref name="maxPagesPerSequence"/> pages.</summary>
    public DeviceBlockTable(CudaDevice device, int maxBatchSize, int maxPagesPerSequence)
        : base(device, checked((long)maxBatchSize * (maxPagesPerSequence + 1)))
    {
        ArgumentOutOfRangeException.ThrowIfNegative(maxBatchSize);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxPagesPerSequence, 1);
        MaxBatchSize = maxBatchSize;
        MaxPagesPerSequence = maxPagesPerSequence;
    }

    /// <summary>Most sequences an update can hold.</summary>
    public int MaxBatchSize { get; }

    /// <summary>Columns of the block table.</summary>
    public int MaxPagesPerSequence { get; }

    /// <summary>Sequences in the current batch.</summary>
    public int BatchSize { get; private set; }

    /// <summary>The longest sequence of the current batch.</summary>
    public int LongestSequence { get; private set; }

    /// <summary>The pool shape the table was validated for.</summary>
    public PagedKvLayout Pool { get; private set; }

    /// <summary>Whether the table was also validated for writing (no page used twice): required by scatter.</summary>
    public bool PagesDistinct { get; private set; }

    internal DeviceSpan<int> Table => Memory.Slice(0, (long)MaxBatchSize * MaxPagesPerSequence);

    internal DeviceSpan<int> Lengths => Memory.Slice((long)MaxBatchSize * MaxPagesPerSequence, MaxBatchSize);

    /// <summary>
    /// Validates and uploads a batch: lengths in [0, MaxPagesPerSequence · PageSize], every page a sequence uses in
    /// [0, NumPages), and (for scatter) no page used twice. Entries past a sequence's last page are not read.
    /// </summary>
    /// <exception cref="ArgumentException">A length or page index is invalid; the table is unchanged.</exception>
    public void Update(ReadOnlySpan<int> blockTable, ReadOnlySpan<int> sequenceLengths, in PagedKvLayout pool, CudaStream? stream = null)
    {
        int batch = sequenceLengths.Length;
        if (batch > MaxBatchSize)
            throw new ArgumentException($"sequenceLengths has {batch} entries; this table holds at most {MaxBatchSize} sequences.", nameof(sequenceLengths));
        var spec = new PagedBatchSpec(pool, batch, MaxPagesPerSequence, int.MaxValue);
        pool.Validate<byte>(nameof(pool));
        if (blockTable.Length != (long)batch * MaxPagesPerSequence)
            throw new ArgumentException($"blockTable has {blockTable.Length} entries; expected {batch} · {MaxPagesPerSequence}.", nameof(blockTable));
        int longest = spec.ValidateBatch(blockTable, sequenceLengths, PagedBatchSpec.PageUse.Track, out bool distinct);
        Upload(blockTable, 0, stream);
        Upload(sequenceLengths, (long)MaxBatchSize * MaxPagesPerSequence, stream);
        BatchSize = batch;
        LongestSequence = longest;
        Pool = pool;
        PagesDistinct = distinct;
    }
}

/// <summary>(source page, destination page) pairs for <see cref="PagedKvKernels.CopyPages{T}"/>, validated on the host.</summary>
public sealed class DevicePageCopies : DeviceIndexBuffer
{
    /// <summary>Creates room for up to <paramref name="capacity"/> pairs.</summary>
    public DevicePageCopies(CudaDevice device, int capacity) : base(device, checked(2L * capacity)) => Capacity = capacity;

    /// <summary>Most pairs one update can hold.</summary>
    public int Capacity { get; }

    /// <summary>Pairs in the current list.</summary>
    public int Count { get; private set; }

    /// <summary>The pool shape the pairs were validated for.</summary>
    public PagedKvLayout Pool { get; private set; }

    internal DeviceSpan<int> Pairs => Memory;

    /// <summary>Validates <paramref name="pairs"/> (<c>[n, 2]</c>) for <paramref name="pool"/> and uploads them.</summary>
    /// <exception cref="ArgumentException">Odd length, more pairs than the capacity, an index out of range, a repeated
    /// destination, or a page both source and destination; the list is unchanged.</exception>
    public void Update(ReadOnlySpan<int> pairs, in PagedKvLayout pool, CudaStream? stream = null)
    {
        PageCopyValidation.Validate<byte>(pool, pool.PoolElements, 0, pairs);
        if (pairs.Length / 2 > Capacity)
            throw new ArgumentException($"pairs has {pairs.Length / 2} pairs; this list holds at most {Capacity}.", nameof(pairs));
        Upload(pairs, 0, stream);
        Count = pairs.Length / 2;
        Pool = pool;
    }
}
