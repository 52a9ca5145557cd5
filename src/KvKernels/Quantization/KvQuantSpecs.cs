using System.Buffers;
using System.Runtime.CompilerServices;
using KvKernels.Paging;

namespace KvKernels.Quantization;

/// <summary>
/// Quantize on append: rows <c>[Hkv, D]</c> of <see cref="NumTokens"/> tokens (fp16/bf16, <see cref="TokenStride"/> elements
/// apart) are coded into <see cref="Pool"/>. Channel-axis formats take one slot per token (−1 skips it), as
/// <see cref="PagedKvCache.Append{T}"/>. Token-axis formats (KIVI keys) quantize whole groups of G tokens: the source
/// holds <c>NumTokens = m · G</c> tokens and the slots are one per group, the slot of its first token — a multiple of G
/// (the group's G tokens go to that slot and the next G − 1, inside one page), or −1 to skip the group.
/// </summary>
/// <param name="Pool">The quantized pool.</param>
/// <param name="NumTokens">Tokens to quantize (≥ 0; a multiple of G for token groups).</param>
/// <param name="TokenStride">Elements between consecutive source tokens; 0 means packed (<c>Hkv · D</c>).</param>
public readonly record struct KvQuantizeSpec(QuantizedKvPool Pool, int NumTokens, long TokenStride = 0)
{
    /// <summary>The source token stride with 0 resolved.</summary>
    public long Stride => TokenStride == 0 ? Pool.Pages.TokenElements : TokenStride;

    /// <summary>Slot entries expected: one per token, or one per group of G tokens.</summary>
    public int SlotCount => Pool.TokenGroups ? NumTokens / Pool.Group : NumTokens;

    /// <summary>Checks the shape (not the buffers).</summary>
    public void Validate()
    {
        Pool.Validate("spec");
        if (NumTokens < 0) throw new ArgumentException($"NumTokens is {NumTokens}; expected ≥ 0.", "spec");
        if (Pool.TokenGroups && NumTokens % Pool.Group != 0)
            throw new ArgumentException($"NumTokens is {NumTokens}; token-group formats quantize whole groups of {Pool.Group}.", "spec");
        if (TokenStride != 0 && TokenStride < Pool.Pages.TokenElements)
            throw new ArgumentException($"TokenStride is {TokenStride}; expected 0 or ≥ Hkv · D = {Pool.Pages.TokenElements}.", "spec");
    }

    /// <summary>Checks the shape and every buffer length for element type <typeparamref name="T"/>.</summary>
    internal void ValidateBuffers<T>(long source, int slots, long givenScales, long codes, long tokenScales, long groupParams) where T : unmanaged
    {
        Validate();
        QuantChecks.ElementType<T>("source");
        long needed = NumTokens == 0 ? 0 : (NumTokens - 1) * Stride + Pool.Pages.TokenElements;
        if (source < needed) throw new ArgumentException($"source has {source} elements; {NumTokens} tokens need {needed}.", "source");
        if (slots != SlotCount)
            throw new ArgumentException($"slots has {slots} entries; expected {SlotCount} ({(Pool.TokenGroups ? "one per group of " + Pool.Group + " tokens" : "one per token")}).", "slots");
        QuantChecks.Buffers(Pool, givenScales, codes, tokenScales, groupParams, scalesName: "givenScales");
    }

    /// <summary>Checks host slots: per token as the paging append does, per group also aligned to G.</summary>
    public void ValidateSlots(ReadOnlySpan<int> slots)
    {
        if (slots.Length != SlotCount) throw new ArgumentException($"slots has {slots.Length} entries; expected {SlotCount}.", nameof(slots));
        if (!Pool.TokenGroups)
        {
            new PagedAppendSpec(Pool.Pages, slots.Length).ValidateSlots(slots);
            return;
        }
        int g = Pool.Group;
        for (int i = 0; i < slots.Length; i++)
            if (slots[i] != -1 && slots[i] % g != 0)
                throw new ArgumentException($"slots[{i}] is {slots[i]}; a token group starts at a multiple of {g} (or −1 skips it).", nameof(slots));
        new PagedAppendSpec(Pool.Pages, slots.Length).ValidateSlots(slots);
    }
}

/// <summary>
/// Dequantize the sequences of a batch from a quantized pool into contiguous <c>[B, MaxTokens, Hkv, D]</c> fp16/bf16,
/// through a block table <c>[B, MaxPagesPerSequence]</c> and lengths <c>[B]</c> (as <see cref="PagedKvCache.Gather{T}"/>);
/// tokens past a sequence's length are zeros. For engines that need the whole tensor, and for tests.
/// </summary>
/// <param name="Pool">The quantized pool.</param>
/// <param name="BatchSize">Sequences (≥ 0).</param>
/// <param name="MaxPagesPerSequence">Block-table columns (≥ 1).</param>
/// <param name="MaxTokens">Tokens per sequence of the destination (≥ 0).</param>
public readonly record struct KvDequantizeSpec(QuantizedKvPool Pool, int BatchSize, int MaxPagesPerSequence, int MaxTokens)
{
    /// <summary>The equivalent gather of the page geometry (for the block-table checks).</summary>
    public PagedBatchSpec Batch => new(Pool.Pages, BatchSize, MaxPagesPerSequence, MaxTokens);

    /// <summary>Elements of the destination.</summary>
    public long DestinationElements => (long)BatchSize * MaxTokens * Pool.Pages.TokenElements;

    /// <summary>Checks the shape (not the buffers).</summary>
    public void Validate()
    {
        Pool.Validate("spec");
        if (BatchSize < 0) throw new ArgumentException($"BatchSize is {BatchSize}; expected ≥ 0.", "spec");
        if (MaxPagesPerSequence < 1) throw new ArgumentException($"MaxPagesPerSequence is {MaxPagesPerSequence}; expected ≥ 1.", "spec");
        if (MaxTokens < 0) throw new ArgumentException($"MaxTokens is {MaxTokens}; expected ≥ 0.", "spec");
    }

    internal void ValidateBuffers<T>(long scales, long codes, long groupParams, long destination) where T : unmanaged
    {
        Validate();
        QuantChecks.ElementType<T>("destination");
        QuantChecks.Buffers(Pool, scales, codes, Pool.Format.HasTokenScales ? scales : 0, groupParams, scalesAreInput: true);
        if (destination < DestinationElements)
            throw new ArgumentException($"destination has {destination} elements; [B, MaxTokens, Hkv, D] needs {DestinationElements}.", nameof(destination));
    }
}

internal static class QuantChecks
{
    public static void ElementType<T>(string name) where T : unmanaged
    {
        if (typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16))
            throw new ArgumentException($"The element type is {typeof(T).Name}; quantized caches hold fp16 (Half) or bf16 (BFloat16) data.", name);
    }

    /// <summary>Checks the pool buffers. <paramref name="scales"/> is the given scales when the format has them (input);
    /// with <paramref name="scalesAreInput"/> it may instead be the per-token scales.</summary>
    public static void Buffers(in QuantizedKvPool pool, long scales, long codes, long tokenScales, long groupParams, bool scalesAreInput = false,
        string scalesName = "scales")
    {
        if (codes < pool.CodeBytes) throw new ArgumentException($"codes has {codes} bytes; the pool needs {pool.CodeBytes}.", nameof(codes));
        if (pool.Format.HasGivenScales && scales < pool.GivenScaleCount)
            throw new ArgumentException($"{scalesName} has {scales} entries; {pool.Format} needs {pool.GivenScaleCount} (given by the engine).", scalesName);
        if (pool.TokenScaleCount > 0 && tokenScales < pool.TokenScaleCount)
            throw new ArgumentException($"{(scalesAreInput ? "scales" : "tokenScales")} has {tokenScales} entries; per-token scales need {pool.TokenScaleCount} (one per slot and KV head).",
                scalesAreInput ? nameof(scales) : nameof(tokenScales));
        if (pool.GroupParamCount > 0 && groupParams < pool.GroupParamCount)
            throw new ArgumentException($"groupParams has {groupParams} elements; {pool.Format} needs {pool.GroupParamCount} (scale, minimum) values.", nameof(groupParams));
    }

    public static void Calibration<T>(long source, int numTokens, int numKvHeads, int headDim, float divisor, int scales) where T : unmanaged
    {
        ElementType<T>(nameof(source));
        if (numTokens < 1) throw new ArgumentException($"numTokens is {numTokens}; expected ≥ 1.", nameof(numTokens));
        if (numKvHeads < 1) throw new ArgumentException($"numKvHeads is {numKvHeads}; expected ≥ 1.", nameof(numKvHeads));
        if (headDim < 1) throw new ArgumentException($"headDim is {headDim}; expected ≥ 1.", nameof(headDim));
        if (!float.IsFinite(divisor) || divisor <= 0) throw new ArgumentException($"divisor is {divisor}; expected finite and > 0.", nameof(divisor));
        long needed = (long)numTokens * numKvHeads * headDim;
        if (source < needed) throw new ArgumentException($"source has {source} elements; [numTokens, Hkv, D] needs {needed}.", nameof(source));
        if (scales != 1 && scales != numKvHeads)
            throw new ArgumentException($"scales has {scales} entries; expected 1 (per tensor) or numKvHeads = {numKvHeads} (per KV head).", nameof(scales));
    }

    /// <summary>Given scales must be finite and positive.</summary>
    public static void GivenScales(ReadOnlySpan<float> scales, string name)
    {
        for (int i = 0; i < scales.Length; i++)
            if (!float.IsFinite(scales[i]) || scales[i] <= 0)
                throw new ArgumentException($"{name}[{i}] is {scales[i]}; scales must be finite and > 0.", name);
    }
}
