using KvKernels.Paging;

namespace KvKernels.Quantization;

/// <summary>
/// The paged storage of one quantized K or V tensor: the page geometry of <see cref="Pages"/> (pages, page size, KV heads,
/// head dim, NHD/HND) and its <see cref="Format"/>. Up to three buffers hold it:
/// <list type="bullet">
/// <item><b>codes</b> (bytes, <see cref="CodeBytes"/>). Channel-axis formats (fp8, int8, asymmetric per token): a row of
/// <c>D · Bits / 8</c> bytes per (slot, KV head), placed like the elements of a <see cref="PagedKvLayout"/> pool (NHD
/// <c>[pages, page_size, Hkv, row]</c>, HND <c>[pages, Hkv, page_size, row]</c>), so the paging kernels (byte-typed) can
/// gather and copy them. Token-axis formats (KIVI keys): per page, blocks of G tokens, NHD
/// <c>[pages, page_size/G, Hkv, D, G·Bits/8]</c> or HND <c>[pages, Hkv, page_size/G, D, G·Bits/8]</c>: the G codes of one
/// channel are one packed run.</item>
/// <item><b>scales</b> (fp32): per (slot, KV head) for <see cref="KvScaleGranularity.PerToken"/> (<see cref="TokenScaleCount"/>,
/// slot-major like the rows), or the engine's <c>[1]</c> / <c>[Hkv]</c> (<see cref="GivenScaleCount"/>).</item>
/// <item><b>group parameters</b> (the cache's element type; asymmetric formats): a (scale, minimum) pair per group
/// (<see cref="GroupParamCount"/> elements), NHD <c>[pages, page_size, Hkv, D/G, 2]</c> for channel groups and
/// <c>[pages, page_size/G, Hkv, D, 2]</c> for token groups (HND: heads before slots / blocks).</item>
/// </list>
/// </summary>
/// <param name="Pages">Page geometry; its element type is irrelevant here.</param>
/// <param name="Format">The tensor's format (quantized).</param>
public readonly record struct QuantizedKvPool(PagedKvLayout Pages, KvFormat Format)
{
    /// <summary>Bytes of one code row (channel-axis formats) or of one channel's token-group run (token axis).</summary>
    public int CodeRunBytes => Format.Axis == KvGroupAxis.Tokens && Format.Codec == KvCodec.Asymmetric
        ? Format.GroupSize * Format.Bits / 8
        : Pages.HeadDim * Format.Bits / 8;

    /// <summary>Whether the groups run along tokens (KIVI keys).</summary>
    public bool TokenGroups => Format.Codec == KvCodec.Asymmetric && Format.Axis == KvGroupAxis.Tokens;

    /// <summary>Elements per asymmetric group.</summary>
    public int Group => Format.Group(Pages.HeadDim);

    /// <summary>Size of the codes buffer in bytes.</summary>
    public long CodeBytes => Pages.Slots * Pages.NumKvHeads * (long)Pages.HeadDim * Format.Bits / 8;

    /// <summary>fp32 scales stored per (slot, KV head), or 0.</summary>
    public long TokenScaleCount => Format.HasTokenScales ? Pages.Slots * Pages.NumKvHeads : 0;

    /// <summary>fp32 scales the engine supplies: 1 (per tensor), Hkv (per KV head), or 0.</summary>
    public int GivenScaleCount => !Format.HasGivenScales ? 0 : Format.Granularity == KvScaleGranularity.PerTensor ? 1 : Pages.NumKvHeads;

    /// <summary>Elements (of the cache's element type) of the (scale, minimum) pairs, or 0.</summary>
    public long GroupParamCount => !Format.HasGroupParams ? 0
        : TokenGroups ? Pages.Slots / Group * Pages.NumKvHeads * Pages.HeadDim * 2L
        : Pages.Slots * Pages.NumKvHeads * (Pages.HeadDim / Group) * 2L;

    /// <summary>Checks the geometry and the format.</summary>
    /// <exception cref="ArgumentException">A bad page geometry or an unsupported format.</exception>
    public void Validate(string paramName)
    {
        Pages.Validate<short>(paramName);
        if (!Format.IsQuantized) throw new ArgumentException("A quantized pool needs a quantized format; use the paging kernels for fp16/bf16.", paramName);
        Format.Validate(Pages.HeadDim, Pages.PageSize, paramName);
    }

    /// <summary>Index of (slot, head) among the slot-major rows: the code row, the per-token scale, and (times D/G) the
    /// channel groups.</summary>
    public long RowIndex(long slot, int head)
    {
        long page = slot / Pages.PageSize, offset = slot % Pages.PageSize;
        return Pages.Layout == KvLayout.Hnd
            ? (page * Pages.NumKvHeads + head) * Pages.PageSize + offset
            : slot * Pages.NumKvHeads + head;
    }

    /// <summary>Index of the token-group block holding (slot, head): its runs start at <c>block · D</c> runs.</summary>
    public long BlockIndex(long slot, int head)
    {
        int blocksPerPage = Pages.PageSize / Group;
        long page = slot / Pages.PageSize, block = slot % Pages.PageSize / Group;
        return Pages.Layout == KvLayout.Hnd
            ? (page * Pages.NumKvHeads + head) * blocksPerPage + block
            : (page * blocksPerPage + block) * Pages.NumKvHeads + head;
    }
}
