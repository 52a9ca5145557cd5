using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Mla;

/// <summary>
/// The GPU MLA ops on one device: the latent cache write (<see cref="Cache"/>), the absorption GEMMs
/// (<see cref="Absorption"/>), latent decode attention (<see cref="Attention"/>) and the whole decode step
/// (<see cref="Decode{TIn, TOut}(in MlaAttentionSpec, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceBlockTable, DeviceSpan{TOut}, MlaWorkspace, DeviceSpan{float}, CudaStream?)"/>:
/// absorb → attend → un-absorb, stream-ordered, no synchronisation, no allocation once kernels are loaded).
/// The same functions as <see cref="MlaCpu"/>, validated by the same specs.
/// </summary>
public sealed class MlaKernels : IDisposable
{
    /// <summary>Binds the ops to <paramref name="device"/>.</summary>
    /// <param name="device">A CUDA or emulated device.</param>
    /// <param name="gemm">Who runs the absorption GEMMs (cuBLAS when present by default).</param>
    public MlaKernels(CudaDevice device, MlaGemmBackend gemm = MlaGemmBackend.Auto)
    {
        ArgumentNullException.ThrowIfNull(device);
        Device = device;
        Cache = new MlaCacheKernels(device);
        Absorption = new MlaAbsorbKernels(device, gemm);
        Attention = new MlaAttentionKernels(device);
    }

    /// <summary>The device the ops run on.</summary>
    public CudaDevice Device { get; }

    /// <summary>The latent cache write.</summary>
    public MlaCacheKernels Cache { get; }

    /// <summary>Query absorption and output un-absorption.</summary>
    public MlaAbsorbKernels Absorption { get; }

    /// <summary>Latent decode attention.</summary>
    public MlaAttentionKernels Attention { get; }

    /// <summary>
    /// The whole MLA decode step over a paged latent pool: q_latent = q_nope · W_UK (rounded to the input type) packed
    /// with q_pe, latent attention with the latent output in the input type, output = o_lat · W_UVᵀ. See
    /// <see cref="MlaAttentionSpec"/> for the tensors; the intermediates live in <paramref name="workspace"/>.
    /// </summary>
    /// <param name="spec">Shapes, types, storage (paged).</param>
    /// <param name="queryNope">q_nope <c>[B, q_len, H, NopeDim]</c>.</param>
    /// <param name="queryRope">q_pe <c>[B, q_len, H, RopeDim]</c>, already rotated.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="cache">The latent pool.</param>
    /// <param name="table">Block table and lengths of the B sequences, validated for the pool.</param>
    /// <param name="output"><c>[B, q_len, H, ValueDim]</c>, written.</param>
    /// <param name="workspace">Scratch for the packed query, the latent output and split-KV.</param>
    /// <param name="lse"><c>[B, q_len, H]</c> natural-log LSE, written; default when not wanted.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, table or workspace; nothing is launched.</exception>
    public void Decode<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> queryNope, DeviceSpan<TIn> queryRope, DeviceSpan<TIn> weights,
        DeviceSpan<TIn> cache, DeviceBlockTable table, DeviceSpan<TOut> output, MlaWorkspace workspace, DeviceSpan<float> lse = default,
        CudaStream? stream = null) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        var (query, latent) = Prepare<TIn, TOut>(spec, queryNope, queryRope, weights, cache, table.BatchSize, output, workspace, lse);
        var latentSpec = spec with { OutputType = spec.InputType };
        // Every step is checked before the first launch, so bad input leaves nothing half-done.
        Attention.Validate<TIn, TIn>(latentSpec, query, cache, table, latent, lse, workspace.Attention);
        Absorption.AbsorbQuery(spec, queryNope, queryRope, weights, query, stream);
        Attention.Run(latentSpec, query, cache, table, latent, lse, workspace.Attention, stream);
        Absorption.Unabsorb(spec, latent, weights, output, stream);
    }

    /// <summary>The whole MLA decode step over contiguous latent storage <c>[B, MaxTokens, 1, RowDim]</c>; see the paged overload.</summary>
    /// <param name="spec">Shapes, types, storage (contiguous).</param>
    /// <param name="queryNope">q_nope <c>[B, q_len, H, NopeDim]</c>.</param>
    /// <param name="queryRope">q_pe <c>[B, q_len, H, RopeDim]</c>, already rotated.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="cache">The latent rows.</param>
    /// <param name="lengths">Lengths of the B sequences.</param>
    /// <param name="output"><c>[B, q_len, H, ValueDim]</c>, written.</param>
    /// <param name="workspace">Scratch for the packed query, the latent output and split-KV.</param>
    /// <param name="lse"><c>[B, q_len, H]</c> natural-log LSE, written; default when not wanted.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, lengths or workspace; nothing is launched.</exception>
    public void Decode<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> queryNope, DeviceSpan<TIn> queryRope, DeviceSpan<TIn> weights,
        DeviceSpan<TIn> cache, DeviceSequenceLengths lengths, DeviceSpan<TOut> output, MlaWorkspace workspace, DeviceSpan<float> lse = default,
        CudaStream? stream = null) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(lengths);
        var (query, latent) = Prepare<TIn, TOut>(spec, queryNope, queryRope, weights, cache, lengths.Count, output, workspace, lse);
        var latentSpec = spec with { OutputType = spec.InputType };
        Attention.Validate<TIn, TIn>(latentSpec, query, cache, lengths, latent, lse, workspace.Attention);
        Absorption.AbsorbQuery(spec, queryNope, queryRope, weights, query, stream);
        Attention.Run(latentSpec, query, cache, lengths, latent, lse, workspace.Attention, stream);
        Absorption.Unabsorb(spec, latent, weights, output, stream);
    }

    /// <summary>Validates the step's buffers and the workspace; returns the workspace's packed-query and latent-output views.</summary>
    private (DeviceSpan<TIn> Query, DeviceSpan<TIn> Latent) Prepare<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> queryNope,
        DeviceSpan<TIn> queryRope, DeviceSpan<TIn> weights, DeviceSpan<TIn> cache, int rows, DeviceSpan<TOut> output, MlaWorkspace workspace,
        DeviceSpan<float> lse) where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(workspace);
        var attention = spec.ToDecodeAttention(spec.InputType);
        spec.ValidateDecodeBuffers<TIn, TOut>(queryNope.Length, queryRope.Length, weights.Length, cache.Length, rows,
            attention.BlockTableElements, output.Length, lse.Length);
        if (!ReferenceEquals(workspace.Device, Device)) throw new ArgumentException("The workspace belongs to another device.", nameof(workspace));
        if (spec.TokenRows * spec.Shape.NumHeads > workspace.MaxQueryRows || spec.Shape.RowDim > workspace.MaxRowDim)
            throw new ArgumentException($"The workspace holds {workspace.MaxQueryRows} query rows of up to {workspace.MaxRowDim} elements; " +
                $"the spec needs {spec.TokenRows * spec.Shape.NumHeads} rows of {spec.Shape.RowDim}.", nameof(workspace));
        var query = workspace.Scratch(0, spec.QueryElements).Cast<TIn>();
        var latent = workspace.Scratch(1, spec.LatentOutputElements).Cast<TIn>();
        Absorption.ValidateAbsorb(spec, queryNope, queryRope, weights, query);
        Absorption.ValidateUnabsorb(spec, latent, weights, output);
        return (query, latent);
    }

    /// <summary>Releases the ops' device resources (cuBLAS handle, RoPE tables).</summary>
    public void Dispose()
    {
        Cache.Dispose();
        Absorption.Dispose();
    }
}

/// <summary>
/// Scratch for <see cref="MlaKernels.Decode{TIn, TOut}(in MlaAttentionSpec, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceSpan{TIn}, DeviceBlockTable, DeviceSpan{TOut}, MlaWorkspace, DeviceSpan{float}, CudaStream?)"/>:
/// the packed query <c>[rows, RowDim]</c> and the latent output <c>[rows, RowDim]</c> (16-bit), and the split-KV
/// workspace of latent attention. Allocate once for the largest batch; calls reuse it (one call at a time per stream).
/// </summary>
public sealed class MlaWorkspace : IDisposable
{
    private readonly DeviceMemory<ushort> _query, _latent;

    /// <summary>Allocates room for <paramref name="maxQueryRows"/> query rows (B · q_len · H) of up to
    /// <paramref name="maxRowDim"/> elements, and <paramref name="maxSplits"/> splits.</summary>
    /// <param name="device">The device.</param>
    /// <param name="maxQueryRows">Most B · q_len · H per call (≥ 1).</param>
    /// <param name="maxRowDim">Largest LatentDim + RopeDim (576 for DeepSeek).</param>
    /// <param name="maxSplits">Most split-KV chunks (≥ 1).</param>
    public MlaWorkspace(CudaDevice device, long maxQueryRows, int maxRowDim = 576, int maxSplits = DecodeAttentionKernels.MaxPlannedSplits)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (maxQueryRows < 1) throw new ArgumentException($"maxQueryRows is {maxQueryRows}; expected ≥ 1.", nameof(maxQueryRows));
        if (maxRowDim is < 1 or > DecodeAttentionSpec.MaxHeadDim)
            throw new ArgumentException($"maxRowDim is {maxRowDim}; expected 1..{DecodeAttentionSpec.MaxHeadDim}.", nameof(maxRowDim));
        Device = device;
        MaxQueryRows = maxQueryRows;
        MaxRowDim = maxRowDim;
        Attention = new DecodeAttentionWorkspace(device, maxQueryRows, maxRowDim, maxSplits);
        try
        {
            _query = device.Allocate<ushort>(checked(maxQueryRows * maxRowDim));
            _latent = device.Allocate<ushort>(checked(maxQueryRows * maxRowDim));
        }
        catch
        {
            _query?.Dispose();
            Attention.Dispose();
            throw;
        }
    }

    /// <summary>The device.</summary>
    public CudaDevice Device { get; }

    /// <summary>Most query rows (B · q_len · H).</summary>
    public long MaxQueryRows { get; }

    /// <summary>Largest row (LatentDim + RopeDim).</summary>
    public int MaxRowDim { get; }

    /// <summary>The split-KV workspace of latent attention.</summary>
    public DecodeAttentionWorkspace Attention { get; }

    internal DeviceSpan<ushort> Scratch(int which, long elements) => (which == 0 ? _query : _latent).Span.Slice(0, elements);

    /// <summary>Frees the device memory.</summary>
    public void Dispose()
    {
        _query.Dispose();
        _latent.Dispose();
        Attention.Dispose();
    }
}
