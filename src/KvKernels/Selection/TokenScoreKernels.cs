using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using KvKernels.Attention;
using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Selection;

/// <summary>
/// The GPU token-scoring ops (<c>cuda/selection/scores.cu</c>) on one device: per-token norms (<see cref="AppendNorms{T}"/>,
/// <see cref="CacheNorms{T}(in CacheNormSpec, DeviceSpan{T}, DeviceSpan{T}, DeviceBlockTable, DeviceSpan{float}, DeviceSpan{float}, CudaStream?)"/>),
/// pooling along tokens (<see cref="Pool"/>) and observation-window scores
/// (<see cref="WindowScores{T}(in WindowScoreSpec, DeviceSpan{T}, DeviceSpan{T}, DeviceBlockTable, DeviceSpan{float}, WindowScoreWorkspace, CudaStream?)"/>).
/// The same functions and validation as <see cref="TokenScoresCpu"/>: norms and pooling give its bits exactly, window
/// scores agree within a few ulp. Calls are stream-ordered, never synchronise and allocate nothing once the kernels are
/// loaded; index metadata comes as validated device buffers.
/// </summary>
public sealed class TokenScoreKernels
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "selection/scores.cu";

    /// <summary>The entry points every specialization contains.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } =
    [
        "selection_norms_append", "selection_norms_cache", "selection_pool",
        "selection_window_partials", "selection_window_lse", "selection_window_scores",
    ];

    /// <summary>Most key splits of the window scorer's first pass.</summary>
    public const int MaxSplits = 64;

    /// <summary>
    /// The specializations the library ships (compile-gated): head dims 64, 128 and 256 × fp16/bf16. The norm and
    /// pooling kernels do not depend on the head dim and run from the head-dim-128 module of their element type; window
    /// scoring at another head dim compiles on first use.
    /// </summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        .. from dim in new[] { 64, 128, 256 }
           from bf16 in new[] { false, true }
           select Specialize(dim, bf16),
    ];

    private const int NormThreads = 256, PoolThreads = 256, WindowThreads = 128, LseThreads = 256;
    private const int RowsPerStep = 64, KeysPerTile = 64;

    private readonly CudaDevice _device;
    private readonly ConcurrentDictionary<(int HeadDim, bool Bf16), CudaKernel[]> _modules = new();

    /// <summary>Binds the ops to <paramref name="device"/>; kernels are compiled and loaded on first use.</summary>
    public TokenScoreKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    private static KernelSpecialization Specialize(int headDim, bool bf16) =>
        KernelSpecialization.Create(Source, ("HEAD_DIM", headDim), ("INPUT_BF16", bf16 ? 1 : 0));

    /// <summary>
    /// Norms of appended tokens into slot-indexed side buffers (see <see cref="AppendNormSpec"/>); launch it right after
    /// <see cref="PagedKvKernels.Append{T}"/> with the same spec and slot mapping.
    /// </summary>
    /// <param name="spec">The append's shape and the norms wanted.</param>
    /// <param name="keys">Source keys (16-byte aligned, token stride a multiple of 8 elements), or default.</param>
    /// <param name="values">Source values, or default.</param>
    /// <param name="slots">The append's validated slot mapping.</param>
    /// <param name="keyNorms">fp32 <c>[NumPages · PageSize, Hkv]</c>, written at the slots; default with the keys.</param>
    /// <param name="valueNorms">The same for the values.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, alignment or slot mapping; nothing is launched.</exception>
    public void AppendNorms<T>(in AppendNormSpec spec, DeviceSpan<T> keys, DeviceSpan<T> values, DeviceSlotMapping slots,
        DeviceSpan<float> keyNorms, DeviceSpan<float> valueNorms, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(slots);
        spec.Validate<T>(keys.Length, values.Length, slots.Count, keyNorms.Length, valueNorms.Length);
        var pool = spec.Append.Pool;
        if (!ReferenceEquals(slots.Device, _device)) throw new ArgumentException("The slot mapping belongs to another device.", nameof(slots));
        if (slots.Pool.NumPages != pool.NumPages || slots.Pool.PageSize != pool.PageSize)
            throw new ArgumentException($"The slots were validated for {slots.Pool.NumPages} pages of {slots.Pool.PageSize}; the pool has {pool.NumPages} of {pool.PageSize}.", nameof(slots));
        bool withKeys = !keys.IsEmpty || !keyNorms.IsEmpty, withValues = !values.IsEmpty || !valueNorms.IsEmpty;
        if (withKeys) CheckRows(keys, spec.Append.KeyStride, nameof(keys));
        if (withValues) CheckRows(values, spec.Append.ValueStride, nameof(values));
        CheckBuffer(keyNorms, nameof(keyNorms));
        CheckBuffer(valueNorms, nameof(valueNorms));
        if (spec.Append.NumTokens == 0) return;

        long items = (long)spec.Append.NumTokens * pool.NumKvHeads;
        var args = new KernelArguments();
        args.AddPointer(withKeys ? keys.Pointer : 0);
        args.AddPointer(withValues ? values.Pointer : 0);
        args.Add(slots.Slots);
        args.AddPointer(withKeys ? keyNorms.Pointer : 0);
        args.AddPointer(withValues ? valueNorms.Pointer : 0);
        args.Add(spec.Append.NumTokens);
        args.Add(pool.NumKvHeads);
        args.Add(pool.HeadDim);
        args.Add(spec.Append.KeyStride);
        args.Add(spec.Append.ValueStride);
        args.Add(NormCode(spec.KeyNorm));
        args.Add(NormCode(spec.ValueNorm));
        Kernels(128, typeof(T) == typeof(BFloat16))[0].Launch(new Dim3(NormBlocks(items)), NormThreads, 0, stream, ref args);
    }

    /// <summary>Norms of every token of a paged cache into <c>[Rows, Hkv, MaxTokens]</c> (see <see cref="CacheNormSpec"/>).</summary>
    /// <param name="spec">Storage shape (paged) and the norms wanted.</param>
    /// <param name="keys">Key pool (16-byte aligned), or default.</param>
    /// <param name="values">Value pool, or default.</param>
    /// <param name="table">Block table and lengths of <see cref="CacheNormSpec.Rows"/> rows, validated for this pool.</param>
    /// <param name="keyNorms">fp32 <c>[Rows, Hkv, MaxTokens]</c>, written; default with the keys.</param>
    /// <param name="valueNorms">The same for the values.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, alignment or block table; nothing is launched.</exception>
    public void CacheNorms<T>(in CacheNormSpec spec, DeviceSpan<T> keys, DeviceSpan<T> values, DeviceBlockTable table,
        DeviceSpan<float> keyNorms, DeviceSpan<float> valueNorms, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        if (!spec.Cache.IsPaged)
            throw new ArgumentException("spec.Cache is contiguous storage; pass the lengths as DeviceSequenceLengths (the other overload).", nameof(spec));
        spec.ValidateBuffers<T>(keys.Length, values.Length, spec.Rows, spec.BlockTableElements, keyNorms.Length, valueNorms.Length);
        CheckTable(table, spec.Cache, spec.Rows);
        LaunchCacheNorms(spec, keys, values, table.Lengths, table.Table, keyNorms, valueNorms, stream);
    }

    /// <summary>Norms of every token of a contiguous cache into <c>[Rows, Hkv, MaxTokens]</c> (see <see cref="CacheNormSpec"/>).</summary>
    /// <param name="spec">Storage shape (contiguous) and the norms wanted.</param>
    /// <param name="keys">Keys <c>[Rows, MaxTokens, Hkv, D]</c> (NHD) or <c>[Rows, Hkv, MaxTokens, D]</c> (HND), or default.</param>
    /// <param name="values">Values of the same shape, or default.</param>
    /// <param name="lengths">Lengths of <see cref="CacheNormSpec.Rows"/> rows, validated against MaxTokens.</param>
    /// <param name="keyNorms">fp32 <c>[Rows, Hkv, MaxTokens]</c>, written; default with the keys.</param>
    /// <param name="valueNorms">The same for the values.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, alignment or lengths; nothing is launched.</exception>
    public void CacheNorms<T>(in CacheNormSpec spec, DeviceSpan<T> keys, DeviceSpan<T> values, DeviceSequenceLengths lengths,
        DeviceSpan<float> keyNorms, DeviceSpan<float> valueNorms, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(lengths);
        if (spec.Cache.IsPaged)
            throw new ArgumentException("spec.Cache is paged storage; pass a DeviceBlockTable (the other overload).", nameof(spec));
        spec.ValidateBuffers<T>(keys.Length, values.Length, spec.Rows, 0, keyNorms.Length, valueNorms.Length);
        CheckLengths(lengths, spec.Rows, spec.Cache.MaxTokens);
        LaunchCacheNorms(spec, keys, values, lengths.Lengths, default, keyNorms, valueNorms, stream);
    }

    private void LaunchCacheNorms<T>(in CacheNormSpec spec, DeviceSpan<T> keys, DeviceSpan<T> values, DeviceSpan<int> lengths,
        DeviceSpan<int> blockTable, DeviceSpan<float> keyNorms, DeviceSpan<float> valueNorms, CudaStream? stream) where T : unmanaged
    {
        bool withKeys = !keyNorms.IsEmpty, withValues = !valueNorms.IsEmpty;
        if (withKeys) CheckRows(keys, 0, nameof(keys));
        if (withValues) CheckRows(values, 0, nameof(values));
        CheckBuffer(keyNorms, nameof(keyNorms));
        CheckBuffer(valueNorms, nameof(valueNorms));
        if (spec.OutputElements == 0) return;

        var args = new KernelArguments();
        args.AddPointer(withKeys ? keys.Pointer : 0);
        args.AddPointer(withValues ? values.Pointer : 0);
        args.Add(lengths);
        args.AddPointer(spec.Cache.IsPaged ? blockTable.Pointer : 0);
        args.AddPointer(withKeys ? keyNorms.Pointer : 0);
        args.AddPointer(withValues ? valueNorms.Pointer : 0);
        args.Add(spec.Rows);
        args.Add(spec.NumKvHeads);
        args.Add(spec.HeadDim);
        args.Add(spec.Cache.MaxTokens);
        args.Add(spec.Cache.IsPaged ? spec.Cache.PageSize : 0);
        args.Add(spec.Cache.MaxPagesPerSequence);
        args.Add(spec.Cache.Layout == KvLayout.Hnd ? 1 : 0);
        args.Add(NormCode(spec.KeyNorm));
        args.Add(NormCode(spec.ValueNorm));
        Kernels(128, typeof(T) == typeof(BFloat16))[1].Launch(new Dim3(NormBlocks(spec.OutputElements)), NormThreads, 0, stream, ref args);
    }

    /// <summary>1-D pooling along tokens (see <see cref="PoolingSpec"/>), bit-identical to <see cref="TokenScoresCpu.Pool"/>.</summary>
    /// <param name="spec">Rows, length, kernel size, kind.</param>
    /// <param name="input">fp32 <c>[Rows, Length]</c>.</param>
    /// <param name="lengths">Row lengths <c>[Rows / RowsPerLength]</c> validated against <see cref="PoolingSpec.Length"/>, or
    /// null when every row is full.</param>
    /// <param name="output">fp32 <c>[Rows, Length]</c>, written; must not overlap <paramref name="input"/>.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer or lengths, or overlapping buffers; nothing is launched.</exception>
    public void Pool(in PoolingSpec spec, DeviceSpan<float> input, DeviceSequenceLengths? lengths, DeviceSpan<float> output, CudaStream? stream = null)
    {
        spec.Validate(input.Length, output.Length, lengths is null ? 0 : lengths.Count);
        if (lengths is not null) CheckLengths(lengths, spec.LengthCount, spec.Length);
        CheckBuffer(input, nameof(input));
        CheckBuffer(output, nameof(output));
        if (spec.Elements == 0) return;
        ulong bytes = (ulong)spec.Elements * 4;
        if (input.Pointer < output.Pointer + bytes && output.Pointer < input.Pointer + bytes)
            throw new ArgumentException("output overlaps input; pooling reads neighbours, so it cannot run in place.", nameof(output));

        var args = new KernelArguments();
        args.Add(input);
        args.Add(output);
        args.AddPointer(lengths is null ? 0 : lengths.Lengths.Pointer);
        args.Add(spec.Rows);
        args.Add(spec.Length);
        args.Add(spec.EffectiveRowsPerLength);
        args.Add(spec.KernelSize);
        args.Add(spec.Kind == PoolingKind.Max ? 1 : 0);
        long blocks = Math.Clamp((spec.Elements + PoolThreads - 1) / PoolThreads, 1, Math.Max(1, _device.Info.MultiprocessorCount * 16L));
        Kernels(128, false)[2].Launch(new Dim3((uint)blocks), PoolThreads, 0, stream, ref args);
    }

    /// <summary>
    /// Observation-window scores over a paged cache (see <see cref="WindowScoreSpec"/>): three launches (split partials,
    /// LSE merge, probabilities reduced per key).
    /// </summary>
    /// <param name="spec">Shapes, storage (paged), scale, mask and reductions.</param>
    /// <param name="query">Window queries <c>[B, W, Hq, D]</c> (16-byte aligned).</param>
    /// <param name="keys">Key pool (16-byte aligned).</param>
    /// <param name="table">Block table and lengths of the B sequences, validated for this pool.</param>
    /// <param name="scores">fp32 <c>[B, OutputHeads, MaxTokens]</c>, written.</param>
    /// <param name="workspace">Scratch holding at least B · W · Hq rows.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, alignment, block table or workspace; nothing is launched.</exception>
    public void WindowScores<T>(in WindowScoreSpec spec, DeviceSpan<T> query, DeviceSpan<T> keys, DeviceBlockTable table,
        DeviceSpan<float> scores, WindowScoreWorkspace workspace, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        if (!spec.Cache.IsPaged)
            throw new ArgumentException("spec.Cache is contiguous storage; pass the lengths as DeviceSequenceLengths (the other overload).", nameof(spec));
        spec.ValidateBuffers<T>(query.Length, keys.Length, spec.BatchSize, spec.BlockTableElements, scores.Length);
        CheckTable(table, spec.Cache, spec.BatchSize);
        LaunchWindow(spec, query, keys, table.Lengths, table.Table, table.LongestSequence, scores, workspace, stream);
    }

    /// <summary>Observation-window scores over a contiguous cache (see <see cref="WindowScoreSpec"/>).</summary>
    /// <param name="spec">Shapes, storage (contiguous), scale, mask and reductions.</param>
    /// <param name="query">Window queries <c>[B, W, Hq, D]</c> (16-byte aligned).</param>
    /// <param name="keys">Keys <c>[B, MaxTokens, Hkv, D]</c> (NHD) or <c>[B, Hkv, MaxTokens, D]</c> (HND), 16-byte aligned.</param>
    /// <param name="lengths">Lengths of the B sequences, validated against MaxTokens.</param>
    /// <param name="scores">fp32 <c>[B, OutputHeads, MaxTokens]</c>, written.</param>
    /// <param name="workspace">Scratch holding at least B · W · Hq rows.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, alignment, lengths or workspace; nothing is launched.</exception>
    public void WindowScores<T>(in WindowScoreSpec spec, DeviceSpan<T> query, DeviceSpan<T> keys, DeviceSequenceLengths lengths,
        DeviceSpan<float> scores, WindowScoreWorkspace workspace, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(lengths);
        if (spec.Cache.IsPaged)
            throw new ArgumentException("spec.Cache is paged storage; pass a DeviceBlockTable (the other overload).", nameof(spec));
        spec.ValidateBuffers<T>(query.Length, keys.Length, spec.BatchSize, 0, scores.Length);
        CheckLengths(lengths, spec.BatchSize, spec.Cache.MaxTokens);
        LaunchWindow(spec, query, keys, lengths.Lengths, default, lengths.LongestSequence, scores, workspace, stream);
    }

    /// <summary>
    /// The key splits of the first pass for <paramref name="spec"/> with rows up to <paramref name="longestRow"/> keys,
    /// before clamping to a workspace: <see cref="WindowScoreSpec.Splits"/> when set; else enough (row tile × split) CTAs for about two waves of the device, with chunks of at
    /// least 512 keys, at most <see cref="MaxSplits"/>. The scores depend on it only through fp32 rounding of the LSE merge.
    /// </summary>
    /// <exception cref="ArgumentException">The spec is invalid or <paramref name="longestRow"/> is negative.</exception>
    public int PlanSplits(in WindowScoreSpec spec, int longestRow)
    {
        spec.Validate();
        ArgumentOutOfRangeException.ThrowIfNegative(longestRow);
        if (spec.Splits > 0) return spec.Splits;
        long ctas = (long)spec.BatchSize * spec.NumKvHeads * RowTiles(spec);
        if (ctas == 0 || longestRow == 0) return 1;
        long target = 2L * Math.Max(1, _device.Info.MultiprocessorCount) * 4;   // 4 CTAs of 4 warps per SM
        long fill = (target + ctas - 1) / ctas;
        long byChunk = Math.Max(1, longestRow / 512);
        return (int)Math.Clamp(Math.Min(fill, byChunk), 1, MaxSplits);
    }

    private static int RowTiles(in WindowScoreSpec spec) => (spec.GroupSize * spec.WindowSize + RowsPerStep - 1) / RowsPerStep;

    /// <summary>Dynamic shared memory of the partials (scores: + the probability tile) kernel; the kernel's kPartialsShared /
    /// kScoresShared (it traps on a mismatch).</summary>
    internal static int WindowSharedBytes(int headDim, bool scores)
    {
        int stride = (headDim + 15) / 16 * 16 + 8;
        int stage = RowsPerStep * stride * 2;
        return 2 * stage + (scores ? RowsPerStep * (KeysPerTile + 1) * 4 : 0);
    }

    private void LaunchWindow<T>(in WindowScoreSpec spec, DeviceSpan<T> query, DeviceSpan<T> keys, DeviceSpan<int> lengths,
        DeviceSpan<int> blockTable, int longestRow, DeviceSpan<float> scores, WindowScoreWorkspace workspace, CudaStream? stream) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(workspace);
        if (!ReferenceEquals(workspace.Device, _device)) throw new ArgumentException("The workspace belongs to another device.", nameof(workspace));
        workspace.Check(spec, nameof(workspace));
        CheckRows(query, 0, nameof(query));
        CheckRows(keys, 0, nameof(keys));
        CheckBuffer(scores, nameof(scores));
        if (spec.OutputElements == 0) return;

        int rowsTotal = spec.GroupSize * spec.WindowSize;
        int rowTiles = RowTiles(spec);
        int groups = spec.BatchSize * spec.NumKvHeads;
        int splits = Math.Min(PlanSplits(spec, longestRow), workspace.MaxSplits);
        int keyTiles = (spec.Cache.MaxTokens + KeysPerTile - 1) / KeysPerTile;
        if ((long)rowTiles * groups > int.MaxValue || (long)keyTiles * groups > int.MaxValue)
            throw new ArgumentException("The call needs more than 2^31 − 1 CTAs.", nameof(spec));
        var kernels = Kernels(spec.HeadDim, typeof(T) == typeof(BFloat16));
        float scaleLog2 = spec.EffectiveScale * 1.44269504088896341f;
        int pageSize = spec.Cache.IsPaged ? spec.Cache.PageSize : 0;
        int hnd = spec.Cache.Layout == KvLayout.Hnd ? 1 : 0;

        if (longestRow > 0)
        {
            int shared = WindowSharedBytes(spec.HeadDim, scores: false);
            var a = new KernelArguments();
            a.Add(query);
            a.Add(keys);
            a.Add(lengths);
            a.AddPointer(spec.Cache.IsPaged ? blockTable.Pointer : 0);
            a.Add(workspace.Partials);
            a.Add(spec.BatchSize);
            a.Add(spec.WindowSize);
            a.Add(spec.NumQueryHeads);
            a.Add(spec.NumKvHeads);
            a.Add(spec.Cache.MaxTokens);
            a.Add(pageSize);
            a.Add(spec.Cache.MaxPagesPerSequence);
            a.Add(hnd);
            a.Add(spec.Causal ? 1 : 0);
            a.Add(scaleLog2);
            a.Add(splits);
            a.Add(rowTiles);
            a.Add(shared);
            kernels[3].Launch(new Dim3((uint)(rowTiles * groups), (uint)splits), WindowThreads, shared, stream, ref a);

            long rows = (long)groups * rowsTotal;
            var m = new KernelArguments();
            m.Add(workspace.Partials);
            m.Add(workspace.Lse);
            m.Add(groups);
            m.Add(rowsTotal);
            m.Add(splits);
            long lseBlocks = Math.Clamp((rows + LseThreads - 1) / LseThreads, 1, Math.Max(1, _device.Info.MultiprocessorCount * 16L));
            kernels[4].Launch(new Dim3((uint)lseBlocks), LseThreads, 0, stream, ref m);
        }

        int scoresShared = WindowSharedBytes(spec.HeadDim, scores: true);
        var c = new KernelArguments();
        c.Add(query);
        c.Add(keys);
        c.Add(lengths);
        c.AddPointer(spec.Cache.IsPaged ? blockTable.Pointer : 0);
        c.Add(workspace.Lse);
        c.Add(scores);
        c.Add(spec.BatchSize);
        c.Add(spec.WindowSize);
        c.Add(spec.NumQueryHeads);
        c.Add(spec.NumKvHeads);
        c.Add(spec.Cache.MaxTokens);
        c.Add(pageSize);
        c.Add(spec.Cache.MaxPagesPerSequence);
        c.Add(hnd);
        c.Add(spec.Causal ? 1 : 0);
        c.Add(scaleLog2);
        c.Add(ReduceCode(spec.WindowReduction));
        c.Add(ReduceCode(spec.GroupReduction));
        c.Add(keyTiles);
        c.Add(scoresShared);
        kernels[5].Launch(new Dim3((uint)(keyTiles * groups)), WindowThreads, scoresShared, stream, ref c);
    }

    private static int NormCode(VectorNorm norm) => norm == VectorNorm.L2 ? 2 : 1;

    private static int ReduceCode(ScoreReduction reduction) => reduction switch
    {
        ScoreReduction.Sum => 0,
        ScoreReduction.Mean => 1,
        ScoreReduction.Max => 2,
        _ => 3,
    };

    /// <summary>Blocks for a norm kernel: 4 (token, head) rows per warp per step, a few waves of the device at most.</summary>
    private uint NormBlocks(long rows)
    {
        long warps = (rows + 3) / 4;
        long needed = (warps + NormThreads / 32 - 1) / (NormThreads / 32);
        return (uint)Math.Clamp(needed, 1, Math.Max(1, _device.Info.MultiprocessorCount * 16L));
    }

    private CudaKernel[] Kernels(int headDim, bool bf16)
    {
        if (_modules.TryGetValue((headDim, bf16), out var kernels)) return kernels;
        return _modules.GetOrAdd((headDim, bf16), key =>
        {
            var module = _device.LoadModule(Specialize(key.HeadDim, key.Bf16));
            return [.. EntryPoints.Select(module.GetKernel)];
        });
    }

    /// <summary>A source of 16-bit rows read as 16-byte vectors: on this device, 16-byte aligned, token stride (elements)
    /// a multiple of 8.</summary>
    private void CheckRows<T>(DeviceSpan<T> span, long strideElements, string name) where T : unmanaged
    {
        if (span.IsEmpty) return;
        _device.EnsureSame(span.Device, name);
        if (span.Pointer % 16 != 0)
            throw new ArgumentException($"{name} is at 0x{span.Pointer:x}; the scoring kernels read 16-byte vectors and need 16-byte aligned buffers.", name);
        if (strideElements * Unsafe.SizeOf<T>() % 16 != 0)
            throw new ArgumentException($"{name} has a token stride of {strideElements} elements; the scoring kernels need a multiple of 8 (16 bytes).", name);
    }

    private void CheckBuffer<T>(DeviceSpan<T> span, string name) where T : unmanaged
    {
        if (span.IsEmpty) return;
        _device.EnsureSame(span.Device, name);
        if (span.Pointer % (ulong)Unsafe.SizeOf<T>() != 0) throw new ArgumentException($"{name} is at 0x{span.Pointer:x}; expected natural alignment.", name);
    }

    private void CheckTable(DeviceBlockTable table, in KvCacheShape cache, int rows)
    {
        if (!ReferenceEquals(table.Device, _device)) throw new ArgumentException("The block table belongs to another device.", nameof(table));
        if (table.Pool.NumPages != cache.NumPages || table.Pool.PageSize != cache.PageSize)
            throw new ArgumentException($"The block table was validated for {table.Pool.NumPages} pages of {table.Pool.PageSize}; spec.Cache has {cache.NumPages} of {cache.PageSize}.", nameof(table));
        if (table.MaxPagesPerSequence != cache.MaxPagesPerSequence)
            throw new ArgumentException($"The block table has {table.MaxPagesPerSequence} columns; spec.Cache.MaxPagesPerSequence is {cache.MaxPagesPerSequence}.", nameof(table));
        if (table.BatchSize != rows)
            throw new ArgumentException($"The block table holds {table.BatchSize} rows; the spec has {rows}.", nameof(table));
    }

    private void CheckLengths(DeviceSequenceLengths lengths, int rows, int maxTokens)
    {
        if (!ReferenceEquals(lengths.Device, _device)) throw new ArgumentException("The lengths belong to another device.", nameof(lengths));
        if (lengths.Count != rows)
            throw new ArgumentException($"The lengths hold {lengths.Count} rows; the spec has {rows}.", nameof(lengths));
        if (lengths.LongestSequence > maxTokens)
            throw new ArgumentException($"The lengths reach {lengths.LongestSequence}; the spec allows at most {maxTokens}.", nameof(lengths));
    }
}
