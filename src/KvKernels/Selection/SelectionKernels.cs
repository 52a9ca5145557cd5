using KvKernels.Attention;
using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Selection;

/// <summary>
/// The GPU selection ops (<c>cuda/selection/topk.cu</c>) on one device: per-row top-k / bottom-k with protected ranges
/// (<see cref="TopKSpec"/>) and the global top-k across heads with a per-head floor (<see cref="GlobalTopKSpec"/>).
/// Same functions and validation as <see cref="SelectionCpu"/>, and the same indices bit for bit. Lengths come as a
/// validated <see cref="DeviceSequenceLengths"/>; scratch is a caller-owned workspace of
/// <see cref="WorkspaceElements(in TopKSpec)"/> 32-bit words. Calls are stream-ordered, never synchronise and allocate
/// nothing once the kernel is loaded.
/// </summary>
/// <remarks>
/// <see cref="TopK"/>: one CTA of 512 threads per row (grid-stride when there are more rows than two per SM): a sampled guess of the threshold, one streaming pass over the row that builds the exact 4096-bin
/// histogram and collects the candidates into the workspace, then the rest of the radix select and the output
/// compaction on the candidates alone. The kernel's header comment has the details and the fallbacks.
/// <para><see cref="GlobalTopK"/> reads the scores about three times (forced sets, histograms, candidates), each pass
/// one CTA per row, and writes the indices one CTA per row; only the small per-sequence steps run one CTA per sequence. With heavy ties (a sequence's
/// candidates overflow its buffer) that sequence falls back to one CTA streaming all its rows.</para>
/// </remarks>
public sealed class SelectionKernels
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "selection/topk.cu";

    /// <summary>The entry points of the specialization.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } =
        ["selection_topk", "selection_global_histogram", "selection_global_plan", "selection_global_collect", "selection_global_topk",
         "selection_global_output"];

    /// <summary>Threads per CTA (the kernel's <c>TOPK_THREADS</c>).</summary>
    public const int Threads = 512;

    /// <summary>The one specialization the library ships: 512 threads per CTA (the kernels take every shape at run time).</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } = [KernelSpecialization.Create(Source, ("TOPK_THREADS", Threads))];

    /// <summary>Candidate-buffer slack over twice the need: room for the guess's margin and a level-0 bin's spill.</summary>
    private const int CapacitySlack = 16384;

    private readonly CudaDevice _device;
    private readonly CudaKernel?[] _kernels = new CudaKernel?[6];

    /// <summary>Binds the ops to <paramref name="device"/>; the kernel is compiled and loaded on first use.</summary>
    public SelectionKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    /// <summary>Test hook: a candidate-buffer capacity (entries per CTA) instead of the default, to drive the kernels'
    /// fallback paths (too small a buffer forces the slow path that re-reads the rows). Rounded up to a multiple of 4.</summary>
    internal int? CapacityOverride { get; set; }

    /// <summary>The most CTAs a call launches: two per SM (the kernel's occupancy); more rows are taken grid-stride.</summary>
    private int MaxCtas => Math.Max(1, 2 * _device.Info.MultiprocessorCount);

    /// <summary>32-bit words of workspace <see cref="TopK"/> needs for <paramref name="spec"/> (enough for any spec with
    /// at most as many rows, the same Columns and at most the same K): per CTA a candidate buffer of keys and
    /// positions.</summary>
    /// <exception cref="ArgumentException">The spec is invalid.</exception>
    public long WorkspaceElements(in TopKSpec spec)
    {
        spec.Validate();
        return TopKPlan(spec).Elements;
    }

    /// <summary>32-bit words of workspace <see cref="GlobalTopK"/> needs for <paramref name="spec"/>: per row its
    /// forced-set rule, a 4096-bin histogram and a candidate offset; per sequence its plan, a candidate buffer and its
    /// kept list (the forced-set pass reuses that memory for its per-CTA buffers).</summary>
    /// <exception cref="ArgumentException">The spec is invalid.</exception>
    public long WorkspaceElements(in GlobalTopKSpec spec)
    {
        spec.Validate();
        return GlobalPlan(spec).Elements;
    }

    /// <summary>
    /// Per-row top-k / bottom-k with protected ranges; see <see cref="TopKSpec"/> for the rule and
    /// <see cref="SelectionCpu.TopK"/> for the CPU twin.
    /// </summary>
    /// <param name="spec">Shape, budget, protected ranges and order.</param>
    /// <param name="scores"><c>[Rows, Columns]</c> fp32 scores.</param>
    /// <param name="lengths">The rows' lengths (Count = Rows, every length ≤ Columns).</param>
    /// <param name="indices"><c>[Rows, K]</c>, written: kept indices ascending, then −1.</param>
    /// <param name="counts"><c>[Rows]</c>, written.</param>
    /// <param name="workspace">Scratch of at least <see cref="WorkspaceElements(in TopKSpec)"/> words, 16-byte aligned;
    /// its contents are undefined afterwards. Calls that share it must be ordered (one stream, or events).</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, length set or workspace, or a budget below the
    /// protected ranges; nothing is launched.</exception>
    public void TopK(in TopKSpec spec, DeviceSpan<float> scores, DeviceSequenceLengths lengths, DeviceSpan<int> indices, DeviceSpan<int> counts,
        DeviceSpan<uint> workspace, CudaStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(lengths);
        spec.ValidateBuffers(scores.Length, lengths.Count, indices.Length, counts.Length);
        CheckLengths(lengths, spec.Columns);
        spec.ValidateProtected(lengths.LongestSequence);
        var plan = TopKPlan(spec);
        CheckBuffers(scores, indices, counts, workspace, plan.Elements);
        if (spec.Rows == 0) return;

        var args = new KernelArguments();
        args.Add(scores);
        args.Add(lengths.Lengths);
        args.Add(indices);
        args.Add(counts);
        args.AddPointer(0);
        args.Add(workspace);
        args.Add(spec.Rows);
        args.Add(spec.Columns);
        args.Add(spec.K);
        args.Add(spec.Sinks);
        args.Add(spec.Recent);
        args.Add(spec.Order == SelectionOrder.Smallest ? 1 : 0);
        args.Add(plan.Capacity);
        Kernel(0).Launch(new Dim3((uint)plan.Ctas), Threads, 0, stream, ref args);
    }

    /// <summary>
    /// Global top-k across the heads of each sequence with a per-head floor (AdaKV); see <see cref="GlobalTopKSpec"/>
    /// for the rule and <see cref="SelectionCpu.GlobalTopK"/> for the CPU twin. Six launches: the rows' forced sets,
    /// the rows' histograms of their global keys, a per-sequence plan (the level-0 bin and each row's candidate slots),
    /// the rows' candidates, per sequence the rest of the select (a sequence whose candidates do not fit its buffer
    /// streams its rows there instead), and the rows' outputs.
    /// </summary>
    /// <param name="spec">Shape, budget, floor fraction, protected ranges and order.</param>
    /// <param name="scores"><c>[Sequences · Heads, Columns]</c> fp32 scores.</param>
    /// <param name="lengths">The rows' lengths (Count = Sequences · Heads, every length ≤ Columns).</param>
    /// <param name="indices"><c>[Sequences · Heads, Width]</c>, written: each row's kept indices ascending, then −1.</param>
    /// <param name="counts"><c>[Sequences · Heads]</c>, written.</param>
    /// <param name="workspace">Scratch of at least <see cref="WorkspaceElements(in GlobalTopKSpec)"/> words, 16-byte
    /// aligned; its contents are undefined afterwards.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, length set or workspace, or a budget below the forced
    /// sets; nothing is launched.</exception>
    public void GlobalTopK(in GlobalTopKSpec spec, DeviceSpan<float> scores, DeviceSequenceLengths lengths, DeviceSpan<int> indices,
        DeviceSpan<int> counts, DeviceSpan<uint> workspace, CudaStream? stream = null)
    {
        ArgumentNullException.ThrowIfNull(lengths);
        spec.ValidateBuffers(scores.Length, lengths.Count, indices.Length, counts.Length);
        CheckLengths(lengths, spec.Columns);
        spec.ValidateProtected(lengths.LongestSequence);
        var plan = GlobalPlan(spec);
        CheckBuffers(scores, indices, counts, workspace, plan.Elements);
        if (spec.Rows == 0) return;
        var rules = workspace.Slice(0, 2L * spec.Rows);
        var histograms = workspace.Slice(plan.HistogramsOffset, (long)spec.Rows * HistogramBins);
        var planned = workspace.Slice(plan.PlanOffset, 4L * spec.Sequences);
        var offsets = workspace.Slice(plan.OffsetsOffset, spec.Rows);
        var buffers = workspace.Slice(plan.BuffersOffset);
        int smallest = spec.Order == SelectionOrder.Smallest ? 1 : 0;
        var rowGrid = new Dim3((uint)plan.RowCtas);
        var sequenceGrid = new Dim3((uint)plan.Ctas);

        // 1. Each row's forced-set rule (selection_topk in threshold mode).
        var forced = new KernelArguments();
        forced.Add(scores);
        forced.Add(lengths.Lengths);
        forced.AddPointer(0);
        forced.AddPointer(0);
        forced.Add(rules);
        forced.Add(buffers);
        forced.Add(spec.Rows);
        forced.Add(spec.Columns);
        forced.Add(spec.ForcedPerRow);
        forced.Add(spec.Sinks);
        forced.Add(spec.Recent);
        forced.Add(smallest);
        forced.Add(plan.RowCapacity);
        Kernel(0).Launch(rowGrid, Threads, 0, stream, ref forced);

        // 2. Each row's histogram of its global keys.
        var histogram = new KernelArguments();
        histogram.Add(scores);
        histogram.Add(lengths.Lengths);
        histogram.Add(rules);
        histogram.Add(histograms);
        histogram.Add(spec.Rows);
        histogram.Add(spec.Columns);
        histogram.Add(spec.Sinks);
        histogram.Add(spec.Recent);
        histogram.Add(smallest);
        Kernel(1).Launch(rowGrid, Threads, 0, stream, ref histogram);

        // 3. Per sequence: the level-0 bin and each row's slots in the candidate buffer.
        var planning = new KernelArguments();
        planning.Add(lengths.Lengths);
        planning.Add(histograms);
        planning.Add(planned);
        planning.Add(offsets);
        planning.Add(spec.Sequences);
        planning.Add(spec.Heads);
        planning.Add(spec.Columns);
        planning.Add(spec.Budget);
        planning.Add(plan.Capacity);
        Kernel(2).Launch(sequenceGrid, Threads, 0, stream, ref planning);

        // 4. Each row's candidates into its sequence's buffer.
        var collect = new KernelArguments();
        collect.Add(scores);
        collect.Add(lengths.Lengths);
        collect.Add(rules);
        collect.Add(planned);
        collect.Add(offsets);
        collect.Add(buffers);
        collect.Add(spec.Rows);
        collect.Add(spec.Heads);
        collect.Add(spec.Columns);
        collect.Add(spec.Sinks);
        collect.Add(spec.Recent);
        collect.Add(smallest);
        collect.Add(plan.Capacity);
        collect.Add(spec.Budget);
        Kernel(3).Launch(rowGrid, Threads, 0, stream, ref collect);

        // 5. Per sequence: the rest of the select on the candidates (or the whole select over its rows): the kept list
        //    and each row's run of it.
        var args = new KernelArguments();
        args.Add(scores);
        args.Add(lengths.Lengths);
        args.Add(rules);
        args.Add(planned);
        args.Add(buffers);
        args.Add(spec.Sequences);
        args.Add(spec.Heads);
        args.Add(spec.Columns);
        args.Add(spec.Budget);
        args.Add(spec.Sinks);
        args.Add(spec.Recent);
        args.Add(smallest);
        args.Add(plan.Capacity);
        Kernel(4).Launch(sequenceGrid, Threads, 0, stream, ref args);

        // 6. Each row's indices and count.
        var output = new KernelArguments();
        output.Add(lengths.Lengths);
        output.Add(rules);
        output.Add(planned);
        output.Add(buffers);
        output.Add(indices);
        output.Add(counts);
        output.Add(spec.Rows);
        output.Add(spec.Heads);
        output.Add(spec.Columns);
        output.Add(spec.Budget);
        output.Add(spec.Width);
        output.Add(plan.Capacity);
        Kernel(5).Launch(rowGrid, Threads, 0, stream, ref output);
    }

    /// <summary>Level-0 histogram bins (the kernel's <c>kBins</c>).</summary>
    private const int HistogramBins = 4096;

    /// <summary>Grid sizes, candidate capacities and the workspace layout of a call (global: rules, histograms, plan,
    /// offsets, then the buffers, each part a multiple of 4 words so that the buffers stay 16-byte aligned).</summary>
    private readonly record struct Plan(int Ctas, int Capacity, long Elements, int RowCtas = 0, int RowCapacity = 0,
        long HistogramsOffset = 0, long PlanOffset = 0, long OffsetsOffset = 0, long BuffersOffset = 0);

    private static long RoundUp4(long value) => (value + 3) & ~3L;

    /// <summary>Candidate-buffer entries for selecting <paramref name="need"/> of up to <paramref name="total"/>
    /// elements: everything when it fits, else twice the need plus slack (the guess aims at 1.5× the need).</summary>
    private int Capacity(long total, long need)
    {
        if (CapacityOverride is { } forced) return (int)RoundUp4(Math.Max(0, forced));
        return (int)RoundUp4(Math.Min(Math.Min(total, 2 * need + CapacitySlack), 1 << 30));
    }

    private Plan TopKPlan(in TopKSpec spec)
    {
        int ctas = Math.Max(1, Math.Min(spec.Rows, MaxCtas));
        int capacity = Capacity(spec.Columns, spec.K);
        return new Plan(ctas, capacity, Math.Max(1, 2L * ctas * capacity));
    }

    private Plan GlobalPlan(in GlobalTopKSpec spec)
    {
        long rules = RoundUp4(2L * spec.Rows);
        long histograms = (long)spec.Rows * HistogramBins;
        long planned = RoundUp4(4L * spec.Sequences);
        long offsets = RoundUp4(spec.Rows);
        int rowCtas = Math.Max(1, Math.Min(spec.Rows, MaxCtas));
        int rowCapacity = Capacity(spec.Columns, spec.ForcedPerRow);
        int ctas = Math.Max(1, Math.Min(spec.Sequences, MaxCtas));
        int capacity = Capacity((long)spec.Heads * spec.Columns, spec.Budget);
        // The forced-set pass uses per-CTA buffers; the later passes one buffer per sequence (same memory, in turn).
        long perSequence = 2L * capacity + RoundUp4(spec.Budget);
        long buffers = Math.Max(2L * rowCtas * rowCapacity, (long)spec.Sequences * perSequence);
        long buffersOffset = rules + histograms + planned + offsets;
        return new Plan(ctas, capacity, Math.Max(1, buffersOffset + buffers), rowCtas, rowCapacity,
            rules, rules + histograms, rules + histograms + planned, buffersOffset);
    }

    private CudaKernel Kernel(int entry) =>
        _kernels[entry] ??= _device.LoadModule(Specializations[0]).GetKernel(EntryPoints[entry]);

    private void CheckLengths(DeviceSequenceLengths lengths, int columns)
    {
        if (!ReferenceEquals(lengths.Device, _device)) throw new ArgumentException("The lengths belong to another device.", nameof(lengths));
        if (lengths.LongestSequence > columns)
            throw new ArgumentException($"A row has {lengths.LongestSequence} tokens; the scores hold Columns = {columns}.", nameof(lengths));
    }

    private void CheckBuffers(DeviceSpan<float> scores, DeviceSpan<int> indices, DeviceSpan<int> counts, DeviceSpan<uint> workspace, long workspaceElements)
    {
        if (!scores.IsEmpty) _device.EnsureSame(scores.Device, nameof(scores));
        if (!indices.IsEmpty) _device.EnsureSame(indices.Device, nameof(indices));
        if (!counts.IsEmpty) _device.EnsureSame(counts.Device, nameof(counts));
        _device.EnsureSame(workspace.Device, nameof(workspace));
        SelectionChecks.AtLeast(workspace.Length, workspaceElements, nameof(workspace));
        if (workspace.Pointer % 16 != 0)
            throw new ArgumentException($"workspace is at 0x{workspace.Pointer:x}; the selection kernels need 16-byte alignment.", nameof(workspace));
    }
}
