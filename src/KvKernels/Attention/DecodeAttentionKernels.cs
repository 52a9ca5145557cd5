using System.Collections.Concurrent;
using System.Numerics;
using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Attention;

/// <summary>
/// The GPU decode-attention ops (<c>cuda/attention/decode.cu</c>) on one device: fused decode attention over paged or
/// contiguous KV storage (the op of <see cref="DecodeAttentionSpec"/>, same validation as <see cref="DecodeAttentionCpu"/>),
/// split-KV with an optional <see cref="DecodeAttentionWorkspace"/>, and <see cref="MergeStates{T}"/>. Kernels are
/// compiled and loaded on first use of each specialization; calls are stream-ordered, never synchronise and allocate
/// nothing once the kernels are loaded.
/// </summary>
/// <remarks>
/// Three decode kernels compute the same function: <c>attention_decode</c> (CUDA cores), <c>attention_decode_mma</c>
/// (tensor cores, query rows packed into the MMA's M dimension; Dk, Dv ≤ 256) and <c>attention_decode_mma_wide</c>
/// (tensor cores for key reuse with wider heads, MLA's 576/512: warp pairs split the output columns). A call uses a
/// tensor-core kernel when <see cref="UsesTensorCores"/> says so: no on-the-fly RoPE, a head shape one of them takes,
/// and at least <see cref="TensorCoreMinRows"/> query rows per KV head (q_len × group), where the CUDA-core kernel runs
/// out of issue slots (research/kernel_techniques.md §1.1, §1.5).
/// </remarks>
public sealed class DecodeAttentionKernels
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "attention/decode.cu";

    /// <summary>The entry points every specialization contains.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } =
        ["attention_decode", "attention_merge_splits", "attention_merge_states", "attention_decode_mma", "attention_decode_mma_wide"];

    /// <summary>
    /// Fewest query rows per KV head (q_len × group) for which a call uses the tensor-core kernel: from 8 rows a
    /// 16-row MMA tile is at least half used. A first guess, to be measured on a GPU.
    /// </summary>
    public const int TensorCoreMinRows = 8;

    /// <summary>
    /// The specializations the library ships (compile-gated): head dims 64, 128, 256 × fp16/bf16 (output of the same
    /// type) × paged/contiguous, NHD, no RoPE, no key reuse; head dim 512 bf16 paged; head dim 128 fp16 paged with an
    /// fp32 output; MLA's latent rows (Dk 576, Dv 512, key reuse, paged) in bf16 → bf16, bf16 → fp32 and fp16 → fp16.
    /// Their <c>attention_merge_states</c> serves <see cref="MergeStates{T}"/> for fp16, bf16 and fp32. Every
    /// specialization holds all three decode kernels (a tensor-core kernel is a stub that traps where it does not apply,
    /// e.g. <c>attention_decode_mma</c> at head dim 512). Every other shape compiles on demand.
    /// </summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        .. from dim in new[] { 64, 128, 256 }
           from type in new[] { AttentionElement.Float16, AttentionElement.BFloat16 }
           from paged in new[] { true, false }
           select Specialize(new DecodeKey(dim, dim, type, type, paged, KvLayout.Nhd, RopeStyle.None, false)),
        Specialize(new DecodeKey(512, 512, AttentionElement.BFloat16, AttentionElement.BFloat16, true, KvLayout.Nhd, RopeStyle.None, false)),
        .. from output in new[] { AttentionElement.BFloat16, AttentionElement.Float32 }
           select Specialize(new DecodeKey(576, 512, AttentionElement.BFloat16, output, true, KvLayout.Nhd, RopeStyle.None, true)),
        Specialize(new DecodeKey(576, 512, AttentionElement.Float16, AttentionElement.Float16, true, KvLayout.Nhd, RopeStyle.None, true)),
        Specialize(MergeKey(AttentionElement.Float32)),
    ];

    /// <summary>Threads of a decode CTA (the kernel's <c>kThreads</c>).</summary>
    private const int DecodeThreads = 128;

    /// <summary>Most decode CTAs per SM the kernel's <c>__launch_bounds__(128, 3)</c> plans registers for.</summary>
    private const int DecodeCtasPerSm = 3;

    /// <summary>The same for the tensor-core kernel's <c>__launch_bounds__(128, 2)</c>.</summary>
    private const int DecodeMmaCtasPerSm = 2;

    private const int MergeThreads = 256;

    /// <summary>The heuristic never plans more splits than this (spec.Splits may force more).</summary>
    public const int MaxPlannedSplits = 64;

    /// <summary>The heuristic's smallest chunk of a row per split, in tokens (FlashInfer's floor is 128–256).</summary>
    public const int MinSplitTokens = 256;

    private readonly CudaDevice _device;
    private readonly ConcurrentDictionary<DecodeKey, DecodeModule> _modules = new();
    private readonly CudaKernel?[] _mergeStates = new CudaKernel?[3];

    /// <summary>Which decode kernel calls use; tests force either one (the default follows <see cref="UsesTensorCores"/>).</summary>
    internal DecodeKernelChoice KernelChoice { get; set; } = DecodeKernelChoice.Auto;

    /// <summary>Binds the ops to <paramref name="device"/>; kernels are compiled and loaded on first use.</summary>
    public DecodeAttentionKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    /// <summary>
    /// Decode attention over paged KV pools (<see cref="KvStorage.Paged"/>): see <see cref="DecodeAttentionSpec"/> for
    /// the math and the tensors. The table holds the block table and lengths of the spec's rows.
    /// </summary>
    /// <param name="spec">Shapes, types, storage and options (paged storage).</param>
    /// <param name="query">Query <c>[B, q_len, Hq, HeadDim]</c>, already rotated when RoPE is used.</param>
    /// <param name="keys">Key pool.</param>
    /// <param name="values">Value pool; default with key reuse.</param>
    /// <param name="table">Block table and lengths of <see cref="DecodeAttentionSpec.Rows"/> rows, validated for this pool.</param>
    /// <param name="output">Output <c>[B, q_len, Hq, OutputDim]</c>, written.</param>
    /// <param name="lse">Natural-log LSE <c>[B, q_len, Hq]</c>, written; default when not wanted.</param>
    /// <param name="workspace">Scratch for split-KV; null runs one split per row.</param>
    /// <param name="positions">RoPE positions <c>[rows, MaxTokens]</c> with explicit positions, else default.</param>
    /// <param name="alibiSlopes">ALiBi slopes <c>[Hq]</c> with ALiBi, else default.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, index buffer or workspace; nothing is launched.</exception>
    public void Run<TIn, TOut>(in DecodeAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> keys, DeviceSpan<TIn> values,
        DeviceBlockTable table, DeviceSpan<TOut> output, DeviceSpan<float> lse = default, DecodeAttentionWorkspace? workspace = null,
        DeviceSpan<int> positions = default, DeviceSpan<float> alibiSlopes = default, CudaStream? stream = null)
        where TIn : unmanaged where TOut : unmanaged
    {
        Validate(spec, query, keys, values, table, output, lse, workspace, positions, alibiSlopes);
        Launch(spec, query, keys, values, table.Lengths, table.Table, table.LongestSequence, output, lse, workspace, positions, alibiSlopes, stream);
    }

    /// <summary>Every check the paged <c>Run</c> makes, without launching (for composite ops that must validate all their
    /// steps before the first launch).</summary>
    internal void Validate<TIn, TOut>(in DecodeAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> keys, DeviceSpan<TIn> values,
        DeviceBlockTable table, DeviceSpan<TOut> output, DeviceSpan<float> lse, DecodeAttentionWorkspace? workspace,
        DeviceSpan<int> positions, DeviceSpan<float> alibiSlopes) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        if (!spec.Cache.IsPaged)
            throw new ArgumentException("spec.Cache is contiguous storage; pass the lengths as DeviceSequenceLengths (the other Run overload).", nameof(spec));
        spec.ValidateBuffers<TIn, TOut>(query.Length, keys.Length, values.Length, spec.Rows, spec.BlockTableElements, output.Length, lse.Length,
            positions.Length, alibiSlopes.Length);
        if (!ReferenceEquals(table.Device, _device)) throw new ArgumentException("The block table belongs to another device.", nameof(table));
        if (table.Pool.NumPages != spec.Cache.NumPages || table.Pool.PageSize != spec.Cache.PageSize)
            throw new ArgumentException($"The block table was validated for {table.Pool.NumPages} pages of {table.Pool.PageSize}; spec.Cache has {spec.Cache.NumPages} of {spec.Cache.PageSize}.", nameof(table));
        if (table.MaxPagesPerSequence != spec.Cache.MaxPagesPerSequence)
            throw new ArgumentException($"The block table has {table.MaxPagesPerSequence} columns; spec.Cache.MaxPagesPerSequence is {spec.Cache.MaxPagesPerSequence}.", nameof(table));
        if (table.BatchSize != spec.Rows)
            throw new ArgumentException($"The block table holds {table.BatchSize} rows; the spec has {spec.Rows}.", nameof(table));
        CheckLaunch(spec, query, keys, values, output, lse, workspace, positions, alibiSlopes);
    }

    /// <summary>
    /// Decode attention over contiguous KV buffers (<see cref="KvStorage.Contiguous"/>): see <see cref="DecodeAttentionSpec"/>.
    /// </summary>
    /// <param name="spec">Shapes, types, storage and options (contiguous storage).</param>
    /// <param name="query">Query <c>[B, q_len, Hq, HeadDim]</c>, already rotated when RoPE is used.</param>
    /// <param name="keys">Keys <c>[rows, MaxTokens, PoolKvHeads, HeadDim]</c> (NHD) or <c>[rows, PoolKvHeads, MaxTokens, HeadDim]</c> (HND).</param>
    /// <param name="values">Values, shaped like the keys with ValueDim; default with key reuse.</param>
    /// <param name="lengths">Lengths of <see cref="DecodeAttentionSpec.Rows"/> rows, each at most MaxTokens.</param>
    /// <param name="output">Output <c>[B, q_len, Hq, OutputDim]</c>, written.</param>
    /// <param name="lse">Natural-log LSE <c>[B, q_len, Hq]</c>, written; default when not wanted.</param>
    /// <param name="workspace">Scratch for split-KV; null runs one split per row.</param>
    /// <param name="positions">RoPE positions <c>[rows, MaxTokens]</c> with explicit positions, else default.</param>
    /// <param name="alibiSlopes">ALiBi slopes <c>[Hq]</c> with ALiBi, else default.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, index buffer or workspace; nothing is launched.</exception>
    public void Run<TIn, TOut>(in DecodeAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> keys, DeviceSpan<TIn> values,
        DeviceSequenceLengths lengths, DeviceSpan<TOut> output, DeviceSpan<float> lse = default, DecodeAttentionWorkspace? workspace = null,
        DeviceSpan<int> positions = default, DeviceSpan<float> alibiSlopes = default, CudaStream? stream = null)
        where TIn : unmanaged where TOut : unmanaged
    {
        Validate(spec, query, keys, values, lengths, output, lse, workspace, positions, alibiSlopes);
        Launch(spec, query, keys, values, lengths.Lengths, default, lengths.LongestSequence, output, lse, workspace, positions, alibiSlopes, stream);
    }

    /// <summary>Every check the contiguous <c>Run</c> makes, without launching.</summary>
    internal void Validate<TIn, TOut>(in DecodeAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> keys, DeviceSpan<TIn> values,
        DeviceSequenceLengths lengths, DeviceSpan<TOut> output, DeviceSpan<float> lse, DecodeAttentionWorkspace? workspace,
        DeviceSpan<int> positions, DeviceSpan<float> alibiSlopes) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(lengths);
        if (spec.Cache.IsPaged)
            throw new ArgumentException("spec.Cache is paged storage; pass a DeviceBlockTable (the other Run overload).", nameof(spec));
        spec.ValidateBuffers<TIn, TOut>(query.Length, keys.Length, values.Length, spec.Rows, 0, output.Length, lse.Length,
            positions.Length, alibiSlopes.Length);
        if (!ReferenceEquals(lengths.Device, _device)) throw new ArgumentException("The lengths belong to another device.", nameof(lengths));
        if (lengths.Count != spec.Rows)
            throw new ArgumentException($"The lengths hold {lengths.Count} rows; the spec has {spec.Rows}.", nameof(lengths));
        if (lengths.LongestSequence > spec.Cache.MaxTokens)
            throw new ArgumentException($"The lengths were validated for MaxTokens = {lengths.MaxTokens} and reach {lengths.LongestSequence}; spec.Cache.MaxTokens is {spec.Cache.MaxTokens}.", nameof(lengths));
        CheckLaunch(spec, query, keys, values, output, lse, workspace, positions, alibiSlopes);
    }

    /// <summary>
    /// The split-KV count a call would use with an unbounded workspace: <see cref="DecodeAttentionSpec.Splits"/> when it
    /// is set; else 1 when the B · Hkv · (query-row tiles) CTAs already fill about 80 % of the GPU's CTA slots (SMs ×
    /// CTAs per SM), and otherwise enough splits to fill it, with chunks of at least <see cref="MinSplitTokens"/> of the
    /// tokens a row can see, at most <see cref="MaxPlannedSplits"/>. Run clamps it to the workspace (1 without one).
    /// </summary>
    /// <param name="spec">The call.</param>
    /// <param name="longestRow">The longest row's length (for example <see cref="DeviceBlockTable.LongestSequence"/>).</param>
    /// <exception cref="ArgumentException">The spec is invalid or <paramref name="longestRow"/> is negative.</exception>
    public int PlanSplits(in DecodeAttentionSpec spec, int longestRow)
    {
        spec.Validate();
        ArgumentOutOfRangeException.ThrowIfNegative(longestRow);
        return Plan(spec, longestRow);
    }

    /// <summary><see cref="PlanSplits(in DecodeAttentionSpec, int)"/> for a spec and length already validated (the
    /// launch path, which validates once).</summary>
    private int Plan(in DecodeAttentionSpec spec, int longestRow)
    {
        if (spec.Splits > 0) return spec.Splits;
        if (spec.BatchSize == 0 || longestRow == 0) return 1;
        var shape = LaunchShapeOf(spec);
        long ctas = (long)spec.BatchSize * spec.NumKvHeads * shape.RowTiles;
        var info = _device.Info;
        int perSm = Math.Min(shape.MaxCtasPerSm, Math.Min(info.MaxThreadsPerMultiprocessor / shape.Threads,
            info.SharedMemoryPerMultiprocessor / (shape.SharedBytes + 1024)));
        long slots = (long)Math.Max(1, info.MultiprocessorCount) * Math.Max(1, perSm);
        if (ctas * 5 >= slots * 4) return 1;
        long visible = spec.Window > 0 ? Math.Min(longestRow, (long)spec.Sinks + spec.Window + spec.QueryLength - 1) : longestRow;
        long byChunk = Math.Max(1, visible / MinSplitTokens);
        long fill = (slots + ctas - 1) / ctas;
        return (int)Math.Clamp(Math.Min(fill, byChunk), 1, MaxPlannedSplits);
    }

    /// <summary>The split count <see cref="Run{TIn, TOut}(in DecodeAttentionSpec, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceBlockTable, DeviceSpan{TOut}, DeviceSpan{float}, DecodeAttentionWorkspace?, DeviceSpan{int}, DeviceSpan{float}, CudaStream?)"/>
    /// uses with <paramref name="workspace"/>: <see cref="PlanSplits(in DecodeAttentionSpec, int)"/> clamped to
    /// <see cref="DecodeAttentionWorkspace.MaxSplits"/>, or 1 without a workspace.</summary>
    /// <param name="spec">The call.</param>
    /// <param name="longestRow">The longest row's length.</param>
    /// <param name="workspace">The workspace the call will get, or null.</param>
    /// <exception cref="ArgumentException">The spec is invalid or <paramref name="longestRow"/> is negative.</exception>
    public int PlanSplits(in DecodeAttentionSpec spec, int longestRow, DecodeAttentionWorkspace? workspace)
    {
        int planned = PlanSplits(spec, longestRow);
        return workspace is null ? 1 : Math.Min(planned, workspace.MaxSplits);
    }

    /// <summary>
    /// Whether a tensor-core kernel can compute <paramref name="spec"/> and it has enough rows to pay (q_len × group ≥
    /// <see cref="TensorCoreMinRows"/>), without on-the-fly RoPE: <c>attention_decode_mma</c> for Dk and Dv multiples of
    /// 16 up to 256; <c>attention_decode_mma_wide</c> for key reuse with a wider head (MLA: Dk ≤ 576 a multiple of 16,
    /// Dv ≤ 512 a multiple of 32) when the device's shared memory holds its tiles (not on 99 KiB parts such as sm_89).
    /// </summary>
    /// <param name="spec">The call (not validated here).</param>
    public static bool UsesTensorCores(in DecodeAttentionSpec spec) =>
        (TensorCoresSupport(spec) || WideSupport(spec)) && (long)spec.QueryLength * spec.GroupSize >= TensorCoreMinRows;

    /// <summary>The tensor-core kernel computes this call (its specialization is not a stub).</summary>
    internal static bool TensorCoresSupport(in DecodeAttentionSpec spec)
    {
        int dv = spec.ValueDim;
        return !spec.Rope.Enabled && spec.HeadDim % 16 == 0 && spec.HeadDim <= 256 && dv % 16 == 0 && dv <= 256;
    }

    /// <summary>The wide tensor-core kernel computes this call (the same condition as <c>KVK_DECODE_WIDE</c>).</summary>
    internal static bool WideSupport(in DecodeAttentionSpec spec) =>
        !spec.Rope.Enabled && spec.KeyReuse && spec.HeadDim % 16 == 0 && spec.ValueDim % 32 == 0 && spec.ValueDim <= 512
        && (spec.HeadDim > 256 || spec.ValueDim > 256);

    /// <summary>The kernel this instance runs <paramref name="spec"/> with.</summary>
    internal DecodeKernel Choose(in DecodeAttentionSpec spec)
    {
        var tensorCores = TensorCoresSupport(spec) ? DecodeKernel.TensorCores
            : WideSupport(spec) && WideFits(spec) ? DecodeKernel.Wide
            : DecodeKernel.CudaCores;
        return KernelChoice switch
        {
            DecodeKernelChoice.CudaCores => DecodeKernel.CudaCores,
            DecodeKernelChoice.TensorCores => tensorCores,
            _ => (long)spec.QueryLength * spec.GroupSize >= TensorCoreMinRows ? tensorCores : DecodeKernel.CudaCores,
        };
    }

    /// <summary>Whether the wide kernel's largest CTA fits the device's opt-in shared memory.</summary>
    private bool WideFits(in DecodeAttentionSpec spec)
    {
        var layout = new DecodeWideLayout(spec.HeadDim, spec.InputType, spec.OutputType);
        int rowGroups = layout.RowPlan(spec.QueryLength * spec.GroupSize).RowGroups;
        return layout.SharedBytes(rowGroups) <= _device.Info.SharedMemoryPerBlockOptin;
    }

    /// <summary>How a call launches: kernel, token streams or row groups, row tiles, shared memory, threads, and the
    /// most CTAs per SM its launch bounds plan registers for.</summary>
    private readonly record struct LaunchShape(DecodeKernel Kernel, int Streams, int RowTiles, int SharedBytes, int Threads, int MaxCtasPerSm);

    private LaunchShape LaunchShapeOf(in DecodeAttentionSpec spec)
    {
        int packedRows = spec.QueryLength * spec.GroupSize;
        switch (Choose(spec))
        {
            case DecodeKernel.TensorCores:
            {
                var layout = new DecodeMmaLayout(spec.HeadDim, spec.ValueDim, spec.KeyReuse);
                var (streams, rowTiles) = layout.RowPlan(packedRows);
                return new(DecodeKernel.TensorCores, streams, rowTiles, layout.SharedBytes, DecodeThreads, DecodeMmaCtasPerSm);
            }
            case DecodeKernel.Wide:
            {
                var layout = new DecodeWideLayout(spec.HeadDim, spec.InputType, spec.OutputType);
                var (rowGroups, rowTiles) = layout.RowPlan(packedRows);
                // __launch_bounds__(256, 1) lets it take ~244 registers: 65536 / (64 · rowGroups · 244) CTAs fit an SM.
                return new(DecodeKernel.Wide, rowGroups, rowTiles, layout.SharedBytes(rowGroups), 64 * rowGroups, 4 / rowGroups);
            }
            default:
            {
                var layout = new DecodeLayout(spec.HeadDim, spec.ValueDim, spec.Rope.Enabled, spec.KeyReuse);
                var (streams, rowTiles) = layout.RowPlan(packedRows);
                return new(DecodeKernel.CudaCores, streams, rowTiles, layout.SharedBytes, DecodeThreads, DecodeCtasPerSm);
            }
        }
    }

    /// <summary>Merges two attention states (cascade attention, split-KV, several cache formats); see <see cref="MergeStatesSpec"/>.</summary>
    /// <param name="spec">Rows and head dim.</param>
    /// <param name="outputA">First state's output <c>[Rows, HeadDim]</c>.</param>
    /// <param name="lseA">First state's natural-log LSE <c>[Rows]</c> (−∞: empty).</param>
    /// <param name="outputB">Second state's output.</param>
    /// <param name="lseB">Second state's LSE.</param>
    /// <param name="output">Merged output, written (may be one of the inputs).</param>
    /// <param name="lse">Merged LSE, written (may be one of the inputs).</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, element type or buffer; nothing is launched.</exception>
    public void MergeStates<T>(in MergeStatesSpec spec, DeviceSpan<T> outputA, DeviceSpan<float> lseA, DeviceSpan<T> outputB,
        DeviceSpan<float> lseB, DeviceSpan<T> output, DeviceSpan<float> lse, CudaStream? stream = null) where T : unmanaged
    {
        spec.Validate<T>(outputA.Length, lseA.Length, outputB.Length, lseB.Length, output.Length, lse.Length);
        if (spec.Rows == 0) return;
        CheckDevice(outputA, nameof(outputA));
        CheckDevice(lseA, nameof(lseA));
        CheckDevice(outputB, nameof(outputB));
        CheckDevice(lseB, nameof(lseB));
        CheckDevice(output, nameof(output));
        CheckDevice(lse, nameof(lse));
        var type = DecodeAttentionSpec.ElementOf<T>()!.Value;
        var kernel = _mergeStates[(int)type] ??= Module(MergeKey(type)).MergeStates;

        var args = new KernelArguments();
        args.Add(outputA);
        args.Add(lseA);
        args.Add(outputB);
        args.Add(lseB);
        args.Add(output);
        args.Add(lse);
        args.Add(spec.Rows);
        args.Add(spec.HeadDim);
        kernel.Launch(new Dim3(MergeBlocks(spec.Rows)), MergeThreads, 0, stream, ref args);
    }

    private void Launch<TIn, TOut>(in DecodeAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> keys, DeviceSpan<TIn> values,
        DeviceSpan<int> lengths, DeviceSpan<int> blockTable, int longestRow, DeviceSpan<TOut> output, DeviceSpan<float> lse,
        DecodeAttentionWorkspace? workspace, DeviceSpan<int> positions, DeviceSpan<float> alibiSlopes, CudaStream? stream)
        where TIn : unmanaged where TOut : unmanaged
    {
        if (spec.OutputElements == 0) return;   // B = 0: nothing to write

        var module = Module(KeyOf(spec));
        var shape = LaunchShapeOf(spec);
        int splits = workspace is null ? 1 : Math.Min(Plan(spec, longestRow), workspace.MaxSplits);
        long grid = (long)spec.BatchSize * spec.NumKvHeads * splits * shape.RowTiles;
        if (grid > int.MaxValue) throw new ArgumentException($"The call needs {grid} CTAs; at most 2^31 − 1 are supported.", nameof(spec));

        var args = new KernelArguments();
        args.Add(query);
        args.Add(keys);
        // Optional inputs are passed by what the spec says, not by the span: an empty span can still carry the
        // address of a zero-length allocation, and the kernel takes a non-null pointer as "present".
        args.AddPointer(spec.KeyReuse ? 0 : values.Pointer);
        args.Add(lengths);
        args.AddPointer(spec.Cache.IsPaged ? blockTable.Pointer : 0);
        args.AddPointer(spec.PositionElements > 0 ? positions.Pointer : 0);
        args.AddPointer(spec.Alibi ? alibiSlopes.Pointer : 0);
        args.Add(output);
        args.AddPointer(lse.IsEmpty ? 0 : lse.Pointer);
        args.AddPointer(splits > 1 ? workspace!.PartialOutput.Pointer : 0);
        args.AddPointer(splits > 1 ? workspace!.PartialLse.Pointer : 0);
        args.Add(spec.BatchSize);
        args.Add(spec.QueryLength);
        args.Add(spec.NumQueryHeads);
        args.Add(spec.NumKvHeads);
        args.Add(spec.Ragged ? 1 : 0);
        args.Add(spec.PoolKvHeads);
        args.Add(spec.Cache.MaxTokens);
        args.Add(spec.Cache.PageSize);
        args.Add(spec.Cache.MaxPagesPerSequence);
        args.Add(spec.EffectiveScale);
        args.Add(spec.SoftCap);
        args.Add(spec.Window);
        args.Add(spec.Sinks);
        args.Add(spec.RotaryDim);
        args.Add(spec.Rope.Theta);
        args.Add(splits);
        args.Add(shape.Streams);
        args.Add(shape.RowTiles);
        args.Add(shape.SharedBytes);
        var kernel = shape.Kernel switch
        {
            DecodeKernel.TensorCores => module.DecodeMma,
            DecodeKernel.Wide => module.DecodeWide,
            _ => module.Decode,
        };
        kernel.Launch(new Dim3((uint)grid), (uint)shape.Threads, shape.SharedBytes, stream, ref args);
        if (splits == 1) return;

        int rows = (int)spec.LseElements;
        var merge = new KernelArguments();
        merge.Add(workspace!.PartialOutput);
        merge.Add(workspace.PartialLse);
        merge.Add(output);
        merge.AddPointer(lse.IsEmpty ? 0 : lse.Pointer);
        merge.Add(rows);
        merge.Add(spec.OutputDim);
        merge.Add(splits);
        module.MergeSplits.Launch(new Dim3(MergeBlocks(rows)), MergeThreads, 0, stream, ref merge);
    }

    /// <summary>One warp per row, a few waves of the device at most (the kernels loop over rows).</summary>
    private uint MergeBlocks(int rows)
    {
        long needed = ((long)rows + MergeThreads / 32 - 1) / (MergeThreads / 32);
        return (uint)Math.Clamp(needed, 1, Math.Max(1, _device.Info.MultiprocessorCount * 16L));
    }

    private DecodeModule Module(in DecodeKey key)
    {
        if (_modules.TryGetValue(key, out var module)) return module;
        return _modules.GetOrAdd(key, k =>
        {
            var loaded = _device.LoadModule(Specialize(k));
            return new DecodeModule(loaded.GetKernel(EntryPoints[0]), loaded.GetKernel(EntryPoints[1]), loaded.GetKernel(EntryPoints[2]),
                loaded.GetKernel(EntryPoints[3]), loaded.GetKernel(EntryPoints[4]));
        });
    }

    private static DecodeKey KeyOf(in DecodeAttentionSpec spec) =>
        new(spec.HeadDim, spec.ValueDim, spec.InputType, spec.OutputType, spec.Cache.IsPaged, spec.Cache.Layout,
            spec.Rope.Style, spec.KeyReuse);

    /// <summary>MergeStates of <paramref name="type"/> runs from a shipped decode specialization of that output type.</summary>
    private static DecodeKey MergeKey(AttentionElement type) =>
        new(128, 128, type == AttentionElement.BFloat16 ? AttentionElement.BFloat16 : AttentionElement.Float16, type, true, KvLayout.Nhd,
            RopeStyle.None, false);

    private static KernelSpecialization Specialize(in DecodeKey key) =>
        KernelSpecialization.Create(Source,
            ("HEAD_DIM", key.HeadDim),
            ("VALUE_DIM", key.ValueDim),
            ("INPUT_BF16", key.Input == AttentionElement.BFloat16 ? 1 : 0),
            ("OUT_TYPE", key.Output switch { AttentionElement.Float16 => 0, AttentionElement.BFloat16 => 1, _ => 2 }),
            ("PAGED", key.Paged ? 1 : 0),
            ("KV_LAYOUT_HND", key.Layout == KvLayout.Hnd ? 1 : 0),
            ("ROPE_STYLE", (int)key.Rope),
            ("KEY_REUSE", key.KeyReuse ? 1 : 0));

    private void CheckDevice<T>(DeviceSpan<T> span, string name) where T : unmanaged => _device.EnsureSame(span.Device, name);

    /// <summary>The checks common to both storages: workspace, device ownership and alignment of every buffer, row count.</summary>
    private void CheckLaunch<TIn, TOut>(in DecodeAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> keys, DeviceSpan<TIn> values,
        DeviceSpan<TOut> output, DeviceSpan<float> lse, DecodeAttentionWorkspace? workspace, DeviceSpan<int> positions, DeviceSpan<float> alibiSlopes)
        where TIn : unmanaged where TOut : unmanaged
    {
        if (workspace is not null)
        {
            if (!ReferenceEquals(workspace.Device, _device)) throw new ArgumentException("The workspace belongs to another device.", nameof(workspace));
            workspace.Check(spec, nameof(workspace));
        }
        CheckBuffer(query, nameof(query), aligned: true);
        CheckBuffer(keys, nameof(keys), aligned: true);
        CheckBuffer(values, nameof(values), aligned: true);
        CheckBuffer(output, nameof(output), aligned: true);
        CheckBuffer(lse, nameof(lse), aligned: false);
        CheckBuffer(positions, nameof(positions), aligned: false);
        CheckBuffer(alibiSlopes, nameof(alibiSlopes), aligned: false);
        if (spec.LseElements > int.MaxValue) throw new ArgumentException($"The call has {spec.LseElements} query rows; at most 2^31 − 1 are supported.", nameof(spec));
    }

    /// <summary>A non-empty buffer must live on this device and, for the 16-byte vector loads and stores, be 16-byte aligned.</summary>
    private void CheckBuffer<T>(DeviceSpan<T> span, string name, bool aligned) where T : unmanaged
    {
        if (span.IsEmpty) return;
        _device.EnsureSame(span.Device, name);
        if (aligned && span.Pointer % 16 != 0)
            throw new ArgumentException($"{name} is at 0x{span.Pointer:x}; the decode kernel reads and writes 16-byte vectors and needs 16-byte aligned buffers.", name);
    }

    private readonly record struct DecodeKey(int HeadDim, int ValueDim, AttentionElement Input, AttentionElement Output, bool Paged,
        KvLayout Layout, RopeStyle Rope, bool KeyReuse);

    private sealed record DecodeModule(CudaKernel Decode, CudaKernel MergeSplits, CudaKernel MergeStates, CudaKernel DecodeMma, CudaKernel DecodeWide);
}

/// <summary>The decode kernels.</summary>
internal enum DecodeKernel
{
    /// <summary><c>attention_decode</c>.</summary>
    CudaCores,
    /// <summary><c>attention_decode_mma</c>.</summary>
    TensorCores,
    /// <summary><c>attention_decode_mma_wide</c>.</summary>
    Wide,
}

/// <summary>
/// The wide tensor-core kernel's shared memory for one specialization and row-group count: the same formulas as the
/// <c>w*</c> enum and <c>wide_shared_bytes</c> in <c>cuda/attention/decode.cu</c> (the kernel traps on a mismatch).
/// </summary>
internal readonly record struct DecodeWideLayout(int HeadDim, AttentionElement Input, AttentionElement Output)
{
    private int Stride => HeadDim / 8 + 1;

    /// <summary>P terms (the mma kernel's mPTerms): fp32 output 2 (fp16) or 3 (bf16); else 1 (fp16) or 2 (bf16).</summary>
    private int Terms => Output == AttentionElement.Float32 ? (Input == AttentionElement.BFloat16 ? 3 : 2) : (Input == AttentionElement.BFloat16 ? 2 : 1);

    public int SharedBytes(int rowGroups) =>
        rowGroups * 16 * Stride * 16 + 2 * 32 * 8 + 2 * 32 * Stride * 16 + rowGroups * (2 * 16 * 4 + 2 * Terms * 32 * 16);

    /// <summary>Warp pairs per CTA (1, 2 or 4: the power of two covering the rows' 16-row tiles, at most 4) and row tiles.</summary>
    public (int RowGroups, int RowTiles) RowPlan(int packedRows)
    {
        int warpTiles = (packedRows + 15) / 16;
        int rowGroups = warpTiles <= 1 ? 1 : warpTiles == 2 ? 2 : 4;
        return (rowGroups, Math.Max(1, (packedRows + 16 * rowGroups - 1) / (16 * rowGroups)));
    }
}

/// <summary>Which decode kernel <see cref="DecodeAttentionKernels"/> runs.</summary>
internal enum DecodeKernelChoice
{
    /// <summary><see cref="DecodeAttentionKernels.UsesTensorCores"/> decides.</summary>
    Auto,
    /// <summary>Always the CUDA-core kernel.</summary>
    CudaCores,
    /// <summary>A tensor-core kernel (the wide one for wide key-reuse heads) whenever one supports the call, whatever the row count.</summary>
    TensorCores,
}

/// <summary>
/// The tensor-core decode kernel's tiling and shared-memory size for one specialization: the same formulas as the
/// <c>m*</c> enum in <c>cuda/attention/decode.cu</c> (the kernel traps when the host's shared size differs).
/// </summary>
internal readonly record struct DecodeMmaLayout
{
    private const int Warps = 4;

    public DecodeMmaLayout(int headDim, int valueDim, bool keyReuse)
    {
        int dk = headDim, dv = valueDim;
        int tokenBytes = 2 * (dk + (keyReuse ? 0 : dv));
        int per = 16384 / (16 * tokenBytes);
        SubTiles = Math.Clamp(per < 1 ? 1 : 1 << BitOperations.Log2((uint)per), 1, 4);   // pow2 floor
        int tile = 16 * SubTiles;
        int kStride = dk / 8 + 1;
        int vStride = keyReuse ? kStride : dv / 8 + 1;
        int q = Warps * 16 * kStride * 16;
        int idx = 2 * tile * 8;
        int pipe = 2 * tile * kStride * 16 + (keyReuse ? 0 : 2 * tile * vStride * 16);
        int scratch = 2 * 16 * (dv + 2) * 4;
        SharedBytes = q + idx + Math.Max(pipe, scratch);
    }

    /// <summary>16-token sub-tiles per pipeline stage (mSub).</summary>
    public int SubTiles { get; }

    /// <summary>Dynamic shared memory of a CTA (mSharedBytes).</summary>
    public int SharedBytes { get; }

    /// <summary>
    /// How a KV head's <paramref name="packedRows"/> query rows spread over CTAs: 16-row warp tiles; with one or two
    /// tiles the warps split each stage's sub-tiles between token streams (at most one stream per sub-tile); from three
    /// tiles on, 4 warp tiles (64 rows) per CTA and as many row tiles as needed.
    /// </summary>
    public (int TokenStreams, int RowTiles) RowPlan(int packedRows)
    {
        int warpTiles = (packedRows + 15) / 16;
        int streams = Math.Min(SubTiles, warpTiles <= 1 ? 4 : warpTiles == 2 ? 2 : 1);
        int ctaRows = Warps / streams * 16;
        return (streams, Math.Max(1, (packedRows + ctaRows - 1) / ctaRows));
    }
}

/// <summary>
/// The decode kernel's compile-time tiling and shared-memory size for one specialization: the same formulas as the
/// <c>enum</c> in <c>cuda/attention/decode.cu</c> (the kernel traps when the host's shared size differs from its own).
/// </summary>
internal readonly record struct DecodeLayout
{
    private const int Warps = 4;

    public DecodeLayout(int headDim, int valueDim, bool rope, bool keyReuse)
    {
        int dk = headDim, dv = valueDim;
        int tokenBytes = 2 * (dk + (keyReuse ? 0 : dv));
        int perWarp = 4096 / tokenBytes;
        int kt = Math.Clamp(perWarp < 1 ? 1 : 1 << BitOperations.Log2((uint)perWarp), 2, 32);   // pow2 floor
        int tile = Warps * kt;
        int kUnits = dk / (rope ? 4 : 8);
        int kStride = PaddedStride(kUnits, kt);
        int kStageStride = rope ? dk / 8 : kStride;
        int vUnits = dv / 8;
        RowsPerWarp = dk > 256 || dv > 256 ? 2 : 4;
        TileTokens = tile;
        int maxCtaRows = Warps * RowsPerWarp;
        int q = maxCtaRows * dk * 4;
        int idx = 2 * tile * 8;
        int pos = rope ? Round16(2 * tile * 4) : 0;
        int freq = rope ? Round16(dk / 2 * 4) : 0;
        int kStage = tile * kStageStride * 16;
        int vStage = keyReuse ? 0 : tile * vUnits * 16;
        int rot = rope ? tile * kStride * 16 : 0;
        int pipe = 2 * kStage + 2 * vStage + rot;
        int scratch = Round16(maxCtaRows * (dv + 2) * 4);
        SharedBytes = q + idx + pos + freq + Math.Max(pipe, scratch);
    }

    /// <summary>Query rows per warp (kRows).</summary>
    public int RowsPerWarp { get; }

    /// <summary>Tokens per pipeline stage (kTile).</summary>
    public int TileTokens { get; }

    /// <summary>Dynamic shared memory of a decode CTA (kSharedBytes).</summary>
    public int SharedBytes { get; }

    /// <summary>
    /// How a KV head's <paramref name="packedRows"/> query rows (q_len × group) spread over CTAs: with few rows the
    /// 4 warps split the tokens instead (token streams 4 or 2); beyond 4 × RowsPerWarp rows, row tiles of that size.
    /// </summary>
    public (int TokenStreams, int RowTiles) RowPlan(int packedRows)
    {
        if (packedRows <= RowsPerWarp) return (4, 1);
        if (packedRows <= 2 * RowsPerWarp) return (2, 1);
        int perCta = Warps * RowsPerWarp;
        return (1, (packedRows + perCta - 1) / perCta);
    }

    private static int Round16(int bytes) => (bytes + 15) / 16 * 16;

    private static int PaddedStride(int units, int kt)
    {
        int q = kt >= 8 ? 1 : 8 / kt;
        int s = units;
        while (s % (2 * q) != q) s++;
        return s;
    }
}
