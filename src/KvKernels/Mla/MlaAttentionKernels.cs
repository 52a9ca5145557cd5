using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Mla;

/// <summary>
/// Latent decode attention on the GPU: the op of <see cref="MlaAttentionSpec"/> (decode attention with one KV head of
/// RowDim, values the first LatentDim columns of each cached row, read from the same load). Same validation and
/// function as <see cref="MlaCpu.Attend{TIn, TOut}"/>; split-KV with a <see cref="DecodeAttentionWorkspace"/>.
/// It runs on decode attention's wide tensor-core kernel (<c>attention_decode_mma_wide</c>: warp pairs split the 512
/// output columns, up to 64 query heads share every cache byte a CTA loads) when q_len × H ≥ 8 and the device's
/// opt-in shared memory holds the tiles (about 160 KiB for 64 heads: A100, H100; not sm_89), else on its CUDA-core kernel.
/// Calls are stream-ordered, never synchronise and allocate nothing once the kernels are loaded.
/// </summary>
public sealed class MlaAttentionKernels
{
    private readonly DecodeAttentionKernels _decode;

    /// <summary>Binds the op to <paramref name="device"/>; kernels are compiled and loaded on first use.</summary>
    public MlaAttentionKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _decode = new DecodeAttentionKernels(device);
    }

    /// <summary>Which decode kernel calls use; tests force either (the default picks the wide tensor-core kernel when the
    /// rows and the device's shared memory allow, see <see cref="DecodeAttentionKernels.UsesTensorCores"/>).</summary>
    internal DecodeKernelChoice KernelChoice
    {
        get => _decode.KernelChoice;
        set => _decode.KernelChoice = value;
    }

    /// <summary>The decode kernel a call with <paramref name="spec"/> runs on this device.</summary>
    internal DecodeKernel KernelFor(in MlaAttentionSpec spec) => _decode.Choose(spec.ToDecodeAttention());

    /// <summary>Latent attention over a paged latent pool.</summary>
    /// <param name="spec">Shapes, types, storage (paged).</param>
    /// <param name="query">Packed query <c>[B, q_len, H, RowDim]</c> (q_latent then q_pe).</param>
    /// <param name="cache">The latent pool (one head of RowDim per slot).</param>
    /// <param name="table">Block table and lengths of the B sequences, validated for the pool.</param>
    /// <param name="latentOutput"><c>[B, q_len, H, LatentDim]</c> in the output type, written.</param>
    /// <param name="lse"><c>[B, q_len, H]</c> natural-log LSE, written; default when not wanted.</param>
    /// <param name="workspace">Scratch for split-KV; null runs one split per sequence.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, table or workspace; nothing is launched.</exception>
    public void Run<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> cache, DeviceBlockTable table,
        DeviceSpan<TOut> latentOutput, DeviceSpan<float> lse = default, DecodeAttentionWorkspace? workspace = null, CudaStream? stream = null)
        where TIn : unmanaged where TOut : unmanaged
    {
        spec.Validate();
        _decode.Run(spec.ToDecodeAttention(), query, cache, default, table, latentOutput, lse, workspace, stream: stream);
    }

    /// <summary>Latent attention over contiguous latent rows <c>[B, MaxTokens, 1, RowDim]</c>.</summary>
    /// <param name="spec">Shapes, types, storage (contiguous).</param>
    /// <param name="query">Packed query <c>[B, q_len, H, RowDim]</c>.</param>
    /// <param name="cache">The latent rows.</param>
    /// <param name="lengths">Lengths of the B sequences.</param>
    /// <param name="latentOutput"><c>[B, q_len, H, LatentDim]</c>, written.</param>
    /// <param name="lse"><c>[B, q_len, H]</c>, written; default when not wanted.</param>
    /// <param name="workspace">Scratch for split-KV; null runs one split per sequence.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, lengths or workspace; nothing is launched.</exception>
    public void Run<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> cache, DeviceSequenceLengths lengths,
        DeviceSpan<TOut> latentOutput, DeviceSpan<float> lse = default, DecodeAttentionWorkspace? workspace = null, CudaStream? stream = null)
        where TIn : unmanaged where TOut : unmanaged
    {
        spec.Validate();
        _decode.Run(spec.ToDecodeAttention(), query, cache, default, lengths, latentOutput, lse, workspace, stream: stream);
    }

    /// <summary>Every check the paged <c>Run</c> makes, without launching.</summary>
    internal void Validate<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> cache, DeviceBlockTable table,
        DeviceSpan<TOut> latentOutput, DeviceSpan<float> lse, DecodeAttentionWorkspace? workspace) where TIn : unmanaged where TOut : unmanaged
    {
        spec.Validate();
        ArgumentNullException.ThrowIfNull(table);
        _decode.Validate(spec.ToDecodeAttention(), query, cache, default, table, latentOutput, lse, workspace, default, default);
    }

    /// <summary>Every check the contiguous <c>Run</c> makes, without launching.</summary>
    internal void Validate<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> query, DeviceSpan<TIn> cache, DeviceSequenceLengths lengths,
        DeviceSpan<TOut> latentOutput, DeviceSpan<float> lse, DecodeAttentionWorkspace? workspace) where TIn : unmanaged where TOut : unmanaged
    {
        spec.Validate();
        ArgumentNullException.ThrowIfNull(lengths);
        _decode.Validate(spec.ToDecodeAttention(), query, cache, default, lengths, latentOutput, lse, workspace, default, default);
    }
}
