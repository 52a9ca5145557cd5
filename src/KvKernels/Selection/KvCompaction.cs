using System.Buffers;
using System.Runtime.CompilerServices;
using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Selection;

/// <summary>
/// Compaction after eviction (P8): each row r = b · Hkv + h (a sequence's KV head) keeps the tokens
/// <c>kept[r, 0 .. counts[r])</c> (strictly ascending indices into the row's source sequence), copied in order into
/// fresh single-head pages <c>destinationTable[r, *]</c> — decode attention's ragged layout (<c>PoolKvHeads = 1</c>,
/// <c>Ragged = true</c>, lengths = counts), where every head owns whole pages, so per-head budgets free memory instead of
/// masking it. The source is a pool of Hkv heads addressed by the sequence's table row (the first eviction) or a
/// single-head pool addressed by row r (later ones). K, V, quantization codes and fp32 side buffers (scores, norms,
/// per-token scales) move with the same plan, one call each, as rows of <c>rowElements</c> elements.
/// </summary>
/// <param name="BatchSize">Sequences B.</param>
/// <param name="NumKvHeads">Hkv (rows = B · Hkv).</param>
/// <param name="SourceHeads">Heads per slot of the source pool: Hkv (table rows per sequence) or 1 (per row).</param>
/// <param name="SourceNumPages">Pages of the source pool.</param>
/// <param name="SourcePageSize">Slots per source page.</param>
/// <param name="SourceMaxPages">Source block-table columns.</param>
/// <param name="SourceLayout">NHD or HND (irrelevant with one head).</param>
/// <param name="DestinationNumPages">Pages of the destination (single-head) pool.</param>
/// <param name="DestinationPageSize">Slots per destination page.</param>
/// <param name="DestinationMaxPages">Destination block-table columns.</param>
/// <param name="MaxKept">Columns of the kept-index table (the selection's k).</param>
public readonly record struct KvCompactionSpec(int BatchSize, int NumKvHeads, int SourceHeads, int SourceNumPages, int SourcePageSize,
    int SourceMaxPages, KvLayout SourceLayout, int DestinationNumPages, int DestinationPageSize, int DestinationMaxPages, int MaxKept)
{
    /// <summary>Rows B · Hkv.</summary>
    public int Rows => BatchSize * NumKvHeads;

    /// <summary>Rows of the source block table: B (multi-head source) or B · Hkv.</summary>
    public int SourceTableRows => SourceHeads == 1 ? Rows : BatchSize;

    /// <summary>Elements of a source pool whose (slot, head) rows hold <paramref name="rowElements"/> elements.</summary>
    public long SourceElements(int rowElements) => (long)SourceNumPages * SourcePageSize * SourceHeads * rowElements;

    /// <summary>Elements of the destination pool.</summary>
    public long DestinationElements(int rowElements) => (long)DestinationNumPages * DestinationPageSize * rowElements;

    /// <summary>Checks the shape.</summary>
    public void Validate()
    {
        if (BatchSize < 0) throw new ArgumentException($"BatchSize is {BatchSize}; expected ≥ 0.", "spec");
        if (NumKvHeads < 1) throw new ArgumentException($"NumKvHeads is {NumKvHeads}; expected ≥ 1.", "spec");
        if (SourceHeads != NumKvHeads && SourceHeads != 1)
            throw new ArgumentException($"SourceHeads is {SourceHeads}; expected NumKvHeads = {NumKvHeads} or 1.", "spec");
        if (SourceNumPages < 1 || DestinationNumPages < 1) throw new ArgumentException("Both pools need at least one page.", "spec");
        if (SourcePageSize is < 1 or > PagedKvLayout.MaxPageSize || DestinationPageSize is < 1 or > PagedKvLayout.MaxPageSize)
            throw new ArgumentException($"Page sizes are {SourcePageSize} and {DestinationPageSize}; expected 1..{PagedKvLayout.MaxPageSize}.", "spec");
        if (SourceMaxPages < 1 || DestinationMaxPages < 1) throw new ArgumentException("Both block tables need at least one column.", "spec");
        if (MaxKept < 0) throw new ArgumentException($"MaxKept is {MaxKept}; expected ≥ 0.", "spec");
        if (SourceLayout is not (KvLayout.Nhd or KvLayout.Hnd)) throw new ArgumentException($"SourceLayout {SourceLayout} is not NHD or HND.", "spec");
        if ((long)DestinationMaxPages * DestinationPageSize < MaxKept)
            throw new ArgumentException($"The destination table holds {(long)DestinationMaxPages * DestinationPageSize} tokens per row; MaxKept is {MaxKept}.", "spec");
    }

    /// <summary>
    /// Checks the indices: source lengths within the table, source pages in range, counts in [0, min(MaxKept, length)],
    /// kept indices strictly ascending below the length, destination pages in range, distinct over the whole call, and
    /// (with <paramref name="samePool"/>) not among the source pages in use.
    /// </summary>
    public void ValidateIndices(ReadOnlySpan<int> sourceTable, ReadOnlySpan<int> sourceLengths, ReadOnlySpan<int> kept, ReadOnlySpan<int> counts,
        ReadOnlySpan<int> destinationTable, bool samePool = false)
    {
        Validate();
        if (sourceTable.Length != (long)SourceTableRows * SourceMaxPages)
            throw new ArgumentException($"sourceTable has {sourceTable.Length} entries; expected {SourceTableRows} · {SourceMaxPages}.", nameof(sourceTable));
        if (sourceLengths.Length != SourceTableRows)
            throw new ArgumentException($"sourceLengths has {sourceLengths.Length} entries; expected {SourceTableRows}.", nameof(sourceLengths));
        if (kept.Length != (long)Rows * MaxKept) throw new ArgumentException($"kept has {kept.Length} entries; expected rows · MaxKept = {(long)Rows * MaxKept}.", nameof(kept));
        if (counts.Length != Rows) throw new ArgumentException($"counts has {counts.Length} entries; expected rows = {Rows}.", nameof(counts));
        if (destinationTable.Length != (long)Rows * DestinationMaxPages)
            throw new ArgumentException($"destinationTable has {destinationTable.Length} entries; expected {Rows} · {DestinationMaxPages}.", nameof(destinationTable));

        bool[] sourceUsed = ArrayPool<bool>.Shared.Rent(SourceNumPages), destinationUsed = ArrayPool<bool>.Shared.Rent(DestinationNumPages);
        try
        {
            sourceUsed.AsSpan(0, SourceNumPages).Clear();
            destinationUsed.AsSpan(0, DestinationNumPages).Clear();
            for (int t = 0; t < SourceTableRows; t++)
            {
                int length = sourceLengths[t];
                if (length < 0 || length > (long)SourceMaxPages * SourcePageSize)
                    throw new ArgumentException($"sourceLengths[{t}] is {length}; expected 0..{(long)SourceMaxPages * SourcePageSize}.", nameof(sourceLengths));
                for (int p = 0; p < (length + SourcePageSize - 1) / SourcePageSize; p++)
                {
                    int page = sourceTable[t * SourceMaxPages + p];
                    if ((uint)page >= (uint)SourceNumPages)
                        throw new ArgumentException($"sourceTable[{t}, {p}] is {page}; expected a page in [0, {SourceNumPages}).", nameof(sourceTable));
                    sourceUsed[page] = true;
                }
            }
            for (int r = 0; r < Rows; r++)
            {
                int length = sourceLengths[SourceHeads == 1 ? r : r / NumKvHeads], count = counts[r];
                if (count < 0 || count > Math.Min(MaxKept, length))
                    throw new ArgumentException($"counts[{r}] is {count}; expected 0..min(MaxKept = {MaxKept}, length {length}).", nameof(counts));
                int previous = -1;
                for (int j = 0; j < count; j++)
                {
                    int token = kept[r * MaxKept + j];
                    if (token <= previous || token >= length)
                        throw new ArgumentException($"kept[{r}, {j}] is {token}; kept indices must ascend strictly and stay below the row's length {length}.", nameof(kept));
                    previous = token;
                }
                for (int p = 0; p < (count + DestinationPageSize - 1) / DestinationPageSize; p++)
                {
                    int page = destinationTable[r * DestinationMaxPages + p];
                    if ((uint)page >= (uint)DestinationNumPages)
                        throw new ArgumentException($"destinationTable[{r}, {p}] is {page}; expected a page in [0, {DestinationNumPages}).", nameof(destinationTable));
                    if (destinationUsed[page])
                        throw new ArgumentException($"Destination page {page} is used twice (destinationTable[{r}, {p}]).", nameof(destinationTable));
                    if (samePool && page < SourceNumPages && sourceUsed[page])
                        throw new ArgumentException($"Destination page {page} is also a source page in use; compaction writes fresh pages.", nameof(destinationTable));
                    destinationUsed[page] = true;
                }
            }
        }
        finally
        {
            ArrayPool<bool>.Shared.Return(sourceUsed);
            ArrayPool<bool>.Shared.Return(destinationUsed);
        }
    }
}

/// <summary>CPU twin of <see cref="CompactionKernels"/> and the host bookkeeping around compaction.</summary>
public static class KvCompaction
{
    /// <summary>Copies every row's kept tokens into its destination pages (see <see cref="KvCompactionSpec"/>). Elements of
    /// the destination other than the kept rows are untouched.</summary>
    /// <param name="spec">Shapes.</param>
    /// <param name="rowElements">Elements per (slot, head): D for K or V, 1 for an fp32 side buffer, code bytes for quantized rows.</param>
    /// <param name="source">Source pool.</param>
    /// <param name="sourceTable">Source block table.</param>
    /// <param name="sourceLengths">Source lengths.</param>
    /// <param name="kept">Kept indices <c>[rows, MaxKept]</c>.</param>
    /// <param name="counts">Kept counts <c>[rows]</c>.</param>
    /// <param name="destinationTable">Destination block table <c>[rows, DestinationMaxPages]</c>.</param>
    /// <param name="destination">Destination pool, written.</param>
    /// <exception cref="ArgumentException">A bad shape, length or index; nothing is written.</exception>
    public static void Compact<T>(in KvCompactionSpec spec, int rowElements, ReadOnlySpan<T> source, ReadOnlySpan<int> sourceTable,
        ReadOnlySpan<int> sourceLengths, ReadOnlySpan<int> kept, ReadOnlySpan<int> counts, ReadOnlySpan<int> destinationTable, Span<T> destination)
        where T : unmanaged
    {
        spec.ValidateIndices(sourceTable, sourceLengths, kept, counts, destinationTable);
        CheckBuffers(spec, rowElements, source.Length, destination.Length);
        bool hnd = spec.SourceLayout == KvLayout.Hnd;
        for (int r = 0; r < spec.Rows; r++)
        {
            int b = r / spec.NumKvHeads, h = r % spec.NumKvHeads;
            bool perRow = spec.SourceHeads == 1;
            for (int j = 0; j < counts[r]; j++)
            {
                int token = kept[r * spec.MaxKept + j];
                long page = sourceTable[(perRow ? r : b) * spec.SourceMaxPages + token / spec.SourcePageSize];
                int offset = token % spec.SourcePageSize, head = perRow ? 0 : h;
                long from = (hnd ? (page * spec.SourceHeads + head) * spec.SourcePageSize + offset : (page * spec.SourcePageSize + offset) * spec.SourceHeads + head) * rowElements;
                long to = ((long)destinationTable[r * spec.DestinationMaxPages + j / spec.DestinationPageSize] * spec.DestinationPageSize
                    + j % spec.DestinationPageSize) * rowElements;
                source.Slice((int)from, rowElements).CopyTo(destination.Slice((int)to, rowElements));
            }
        }
    }

    internal static void CheckBuffers(in KvCompactionSpec spec, int rowElements, long source, long destination)
    {
        if (rowElements < 1) throw new ArgumentException($"rowElements is {rowElements}; expected ≥ 1.", nameof(rowElements));
        if (source < spec.SourceElements(rowElements))
            throw new ArgumentException($"source has {source} elements; the source pool needs {spec.SourceElements(rowElements)}.", nameof(source));
        if (destination < spec.DestinationElements(rowElements))
            throw new ArgumentException($"destination has {destination} elements; the destination pool needs {spec.DestinationElements(rowElements)}.", nameof(destination));
    }

    /// <summary>Destination pages each row needs: <c>ceil(counts[r] / pageSize)</c>, written to <paramref name="pages"/>;
    /// returns their sum.</summary>
    public static int PagesNeeded(ReadOnlySpan<int> counts, int pageSize, Span<int> pages)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(pageSize, 1);
        if (pages.Length < counts.Length) throw new ArgumentException($"pages has {pages.Length} entries; expected {counts.Length}.", nameof(pages));
        int total = 0;
        for (int r = 0; r < counts.Length; r++) total += pages[r] = (counts[r] + pageSize - 1) / pageSize;
        return total;
    }
}

/// <summary>A host free list of page indices: the pages compaction allocates from and returns its source pages to.</summary>
public sealed class PageAllocator
{
    private readonly Stack<int> _free;
    private readonly bool[] _isFree;

    /// <summary>All <paramref name="numPages"/> pages free, handed out lowest first.</summary>
    public PageAllocator(int numPages)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(numPages, 1);
        NumPages = numPages;
        _free = new Stack<int>(Enumerable.Range(0, numPages).Reverse());
        _isFree = Enumerable.Repeat(true, numPages).ToArray();
    }

    /// <summary>Pages managed.</summary>
    public int NumPages { get; }

    /// <summary>Pages free now.</summary>
    public int FreeCount => _free.Count;

    /// <summary>Takes <c>pages.Length</c> free pages.</summary>
    /// <exception cref="InvalidOperationException">Not enough free pages; nothing is taken.</exception>
    public void Allocate(Span<int> pages)
    {
        if (pages.Length > _free.Count) throw new InvalidOperationException($"{pages.Length} pages asked, {_free.Count} free.");
        for (int i = 0; i < pages.Length; i++)
        {
            pages[i] = _free.Pop();
            _isFree[pages[i]] = false;
        }
    }

    /// <summary>Returns pages (each must be allocated now; a page freed twice is an error).</summary>
    /// <exception cref="ArgumentException">A page out of range or already free; nothing is returned.</exception>
    public void Free(ReadOnlySpan<int> pages)
    {
        var seen = new HashSet<int>();
        foreach (int p in pages)
        {
            if ((uint)p >= (uint)NumPages || _isFree[p]) throw new ArgumentException($"Page {p} is not an allocated page.", nameof(pages));
            if (!seen.Add(p)) throw new ArgumentException($"Page {p} appears twice.", nameof(pages));
        }
        foreach (int p in pages)
        {
            _isFree[p] = true;
            _free.Push(p);
        }
    }

    /// <summary>Builds a destination block table <c>[rows, maxPages]</c> for kept counts (unused columns −1), allocating
    /// <c>ceil(counts[r] / pageSize)</c> pages per row.</summary>
    public void AllocateTable(ReadOnlySpan<int> counts, int pageSize, int maxPages, Span<int> table)
    {
        if (table.Length != (long)counts.Length * maxPages)
            throw new ArgumentException($"table has {table.Length} entries; expected {counts.Length} · {maxPages}.", nameof(table));
        int total = 0;
        for (int r = 0; r < counts.Length; r++)
        {
            int need = (counts[r] + pageSize - 1) / pageSize;
            if (need > maxPages) throw new ArgumentException($"counts[{r}] = {counts[r]} needs {need} pages; the table has {maxPages} columns.", nameof(counts));
            total += need;
        }
        if (total > _free.Count) throw new InvalidOperationException($"{total} pages needed, {_free.Count} free.");
        table.Fill(-1);
        for (int r = 0; r < counts.Length; r++) Allocate(table.Slice(r * maxPages, (counts[r] + pageSize - 1) / pageSize));
    }
}

/// <summary>The indices of one compaction on the device, validated on the host (<see cref="KvCompactionSpec.ValidateIndices"/>)
/// and uploaded; reused for K, V and every side buffer.</summary>
public sealed class DeviceCompactionPlan : IDisposable
{
    private readonly DeviceMemory<int> _memory;
    private readonly long _sourceTable, _kept, _counts, _destinationTable;

    /// <summary>Room for one compaction of <paramref name="spec"/>'s shape.</summary>
    public DeviceCompactionPlan(CudaDevice device, in KvCompactionSpec spec)
    {
        ArgumentNullException.ThrowIfNull(device);
        spec.Validate();
        Device = device;
        Spec = spec;
        _sourceTable = (long)spec.SourceTableRows * spec.SourceMaxPages;
        _kept = (long)spec.Rows * spec.MaxKept;
        _counts = spec.Rows;
        _destinationTable = (long)spec.Rows * spec.DestinationMaxPages;
        _memory = device.Allocate<int>(Math.Max(1, _sourceTable + _kept + _counts + _destinationTable));
    }

    /// <summary>The device.</summary>
    public CudaDevice Device { get; }

    /// <summary>The shape.</summary>
    public KvCompactionSpec Spec { get; }

    /// <summary>Whether <see cref="Update"/> has run.</summary>
    public bool Ready { get; private set; }

    internal DeviceSpan<int> SourceTable => _memory.Span.Slice(0, Math.Max(1, _sourceTable));
    internal DeviceSpan<int> Kept => _memory.Span.Slice(_sourceTable, Math.Max(1, Math.Min(_kept, _memory.Length - _sourceTable)));
    internal DeviceSpan<int> Counts => _memory.Span.Slice(_sourceTable + _kept, Math.Max(1, Math.Min(_counts, _memory.Length - _sourceTable - _kept)));
    internal DeviceSpan<int> DestinationTable => _memory.Span.Slice(_sourceTable + _kept + _counts, Math.Max(0, _destinationTable));

    /// <summary>Validates and uploads the indices (see <see cref="KvCompactionSpec.ValidateIndices"/>).</summary>
    public void Update(ReadOnlySpan<int> sourceTable, ReadOnlySpan<int> sourceLengths, ReadOnlySpan<int> kept, ReadOnlySpan<int> counts,
        ReadOnlySpan<int> destinationTable, bool samePool = false, CudaStream? stream = null)
    {
        Spec.ValidateIndices(sourceTable, sourceLengths, kept, counts, destinationTable, samePool);
        Upload(sourceTable, 0, stream);
        Upload(kept, _sourceTable, stream);
        Upload(counts, _sourceTable + _kept, stream);
        Upload(destinationTable, _sourceTable + _kept + _counts, stream);
        Ready = true;
    }

    private void Upload(ReadOnlySpan<int> data, long offset, CudaStream? stream)
    {
        if (data.IsEmpty) return;
        var target = _memory.Span.Slice(offset, data.Length);
        if (stream is null) target.CopyFrom(data);
        else target.CopyFrom(data, stream);
    }

    /// <summary>Frees the device memory.</summary>
    public void Dispose() => _memory.Dispose();
}

/// <summary>The GPU compaction (<c>cuda/selection/compact.cu</c>); same function as <see cref="KvCompaction.Compact{T}"/>.</summary>
public sealed class CompactionKernels
{
    /// <summary>The kernel source under <c>cuda/</c>.</summary>
    public const string Source = "selection/compact.cu";

    /// <summary>Entry points.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } = ["selection_compact"];

    /// <summary>The one specialization (the kernel is byte-typed; everything else is a run-time argument).</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } = [KernelSpecialization.Create(Source)];

    private const int Threads = 256;
    private readonly CudaDevice _device;
    private CudaKernel? _kernel;

    /// <summary>Binds the op to <paramref name="device"/>.</summary>
    public CompactionKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    /// <summary>Copies every row's kept tokens of <paramref name="source"/> into <paramref name="destination"/> as the plan says.</summary>
    /// <param name="plan">Validated indices.</param>
    /// <param name="rowElements">Elements per (slot, head) (D for K/V, 1 for an fp32 side buffer); rows must be a multiple of 4 bytes.</param>
    /// <param name="source">Source pool.</param>
    /// <param name="destination">Destination pool, written.</param>
    /// <param name="stream">Stream (default stream when null).</param>
    public void Compact<T>(DeviceCompactionPlan plan, int rowElements, DeviceSpan<T> source, DeviceSpan<T> destination, CudaStream? stream = null)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(plan);
        if (!ReferenceEquals(plan.Device, _device)) throw new ArgumentException("The plan belongs to another device.", nameof(plan));
        if (!plan.Ready) throw new ArgumentException("The plan has no indices yet (call Update).", nameof(plan));
        var spec = plan.Spec;
        KvCompaction.CheckBuffers(spec, rowElements, source.Length, destination.Length);
        _device.EnsureSame(source.Device, nameof(source));
        _device.EnsureSame(destination.Device, nameof(destination));
        int rowBytes = rowElements * Unsafe.SizeOf<T>();
        if (rowBytes % 4 != 0) throw new ArgumentException($"A row is {rowBytes} bytes; compaction copies rows of a multiple of 4 bytes.", nameof(rowElements));
        if (source.Pointer % 4 != 0 || destination.Pointer % 4 != 0) throw new ArgumentException("source and destination must be 4-byte aligned.", nameof(source));
        if (spec.Rows == 0 || spec.MaxKept == 0) return;
        int wordBytes = rowBytes % 16 == 0 && source.Pointer % 16 == 0 && destination.Pointer % 16 == 0 ? 16 : 4;
        long work = (long)spec.Rows * spec.MaxKept * (rowBytes / wordBytes);

        var args = new KernelArguments();
        args.Add(source);
        args.Add(destination);
        args.Add(plan.SourceTable);
        args.Add(plan.Kept);
        args.Add(plan.Counts);
        args.Add(plan.DestinationTable);
        args.Add(spec.Rows);
        args.Add(spec.NumKvHeads);
        args.Add(spec.SourceHeads);
        args.Add(spec.SourcePageSize);
        args.Add(spec.SourceMaxPages);
        args.Add(spec.SourceLayout == KvLayout.Hnd ? 1 : 0);
        args.Add(spec.DestinationPageSize);
        args.Add(spec.DestinationMaxPages);
        args.Add(rowBytes);
        args.Add(spec.MaxKept);
        args.Add(wordBytes);
        _kernel ??= _device.LoadModule(Specializations[0]).GetKernel(EntryPoints[0]);
        _kernel.Launch(new Dim3((uint)Math.Clamp((work + Threads - 1) / Threads, 1, _device.Info.MultiprocessorCount * 16L)), Threads, 0, stream, ref args);
    }
}
