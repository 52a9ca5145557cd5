using System.Buffers;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Quantization;

/// <summary>
/// Requantize whole pages from one quantized pool into another (SAQ's step down a stair: a segment dequantized at its
/// width and quantized one stair lower with fresh group statistics). Page <c>sourcePages[i]</c> of <see cref="Source"/>
/// is dequantized exactly as <see cref="KvQuantCpu.Dequantize{T}"/> does (rounded to the element type), then quantized
/// into page <c>destinationPages[i]</c> of <see cref="Destination"/> as <see cref="KvQuantCpu.Quantize{T}"/> does. The two
/// pools share page size, KV heads and head dim; formats and layouts may differ. A segment of S tokens is S / page_size
/// pages (S a multiple of the page size, and of the token-group size for token-group formats).
/// </summary>
/// <param name="Source">The pool read.</param>
/// <param name="Destination">The pool written.</param>
/// <param name="NumPages">Page pairs (≥ 0).</param>
public readonly record struct KvRequantizeSpec(QuantizedKvPool Source, QuantizedKvPool Destination, int NumPages)
{
    /// <summary>Tokens moved: <c>NumPages · page_size</c>.</summary>
    public int Tokens => NumPages * Source.Pages.PageSize;

    /// <summary>Checks the pools and the page pairs.</summary>
    public void Validate(ReadOnlySpan<int> sourcePages, ReadOnlySpan<int> destinationPages)
    {
        Source.Validate("spec");
        Destination.Validate("spec");
        var s = Source.Pages;
        var d = Destination.Pages;
        if (s.PageSize != d.PageSize || s.NumKvHeads != d.NumKvHeads || s.HeadDim != d.HeadDim)
            throw new ArgumentException($"The pools differ in geometry: pages of {s.PageSize}×{s.NumKvHeads}×{s.HeadDim} and {d.PageSize}×{d.NumKvHeads}×{d.HeadDim}.", "spec");
        if (NumPages < 0) throw new ArgumentException($"NumPages is {NumPages}; expected ≥ 0.", "spec");
        if (sourcePages.Length != NumPages) throw new ArgumentException($"sourcePages has {sourcePages.Length} entries; expected NumPages = {NumPages}.", nameof(sourcePages));
        if (destinationPages.Length != NumPages) throw new ArgumentException($"destinationPages has {destinationPages.Length} entries; expected NumPages = {NumPages}.", nameof(destinationPages));
        for (int i = 0; i < NumPages; i++)
        {
            if ((uint)sourcePages[i] >= (uint)s.NumPages)
                throw new ArgumentException($"sourcePages[{i}] is {sourcePages[i]}; expected a page in [0, {s.NumPages}).", nameof(sourcePages));
            if ((uint)destinationPages[i] >= (uint)d.NumPages)
                throw new ArgumentException($"destinationPages[{i}] is {destinationPages[i]}; expected a page in [0, {d.NumPages}).", nameof(destinationPages));
        }
        var sorted = ArrayPool<int>.Shared.Rent(Math.Max(1, NumPages));
        try
        {
            destinationPages.CopyTo(sorted);
            Array.Sort(sorted, 0, NumPages);
            for (int i = 1; i < NumPages; i++)
                if (sorted[i] == sorted[i - 1])
                    throw new ArgumentException($"Destination page {sorted[i]} appears twice.", nameof(destinationPages));
        }
        finally
        {
            ArrayPool<int>.Shared.Return(sorted);
        }
    }

    /// <summary>The destination's slots for the quantize step: per token, or per token group (first slot of each).</summary>
    internal void DestinationSlots(ReadOnlySpan<int> destinationPages, Span<int> slots)
    {
        int pageSize = Destination.Pages.PageSize, unit = Destination.TokenGroups ? Destination.Group : 1, perPage = pageSize / unit;
        for (int i = 0; i < NumPages; i++)
            for (int j = 0; j < perPage; j++) slots[i * perPage + j] = destinationPages[i] * pageSize + j * unit;
    }

    /// <summary>Destination slot entries: <c>Tokens</c>, or <c>Tokens / G</c> for token groups.</summary>
    internal int DestinationSlotCount => Destination.TokenGroups ? Tokens / Destination.Group : Tokens;
}

/// <summary>
/// GPU requantization of page pairs (<see cref="KvRequantizeSpec"/>): the dequantize and quantize kernels of
/// <see cref="KvQuantKernels"/> through a scratch tensor this object owns, so the result equals
/// <see cref="KvQuantCpu.Requantize{T}"/> bit for bit. Capacity (pages per call) is fixed at construction.
/// </summary>
/// <typeparam name="T">The caches' element type (fp16 or bf16).</typeparam>
public sealed class KvRequantizer<T> : IDisposable where T : unmanaged
{
    private readonly KvQuantKernels _kernels;
    private readonly DeviceBlockTable _table;
    private readonly DeviceSlotMapping _slots;
    private readonly DeviceMemory<T> _scratch;
    private readonly int[] _hostSlots;
    private readonly int[] _hostLengths;

    /// <summary>Room for <paramref name="maxPages"/> page pairs of <paramref name="pages"/>' geometry.</summary>
    public KvRequantizer(KvQuantKernels kernels, CudaDevice device, in PagedKvLayout pages, int maxPages)
    {
        ArgumentNullException.ThrowIfNull(kernels);
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxPages, 1);
        QuantChecks.ElementType<T>(nameof(T));
        _kernels = kernels;
        Device = device;
        MaxPages = maxPages;
        Geometry = pages;
        _table = new DeviceBlockTable(device, maxPages, 1);
        _slots = new DeviceSlotMapping(device, maxPages * pages.PageSize);
        _scratch = device.Allocate<T>((long)maxPages * pages.PageElements);
        _hostSlots = new int[maxPages * pages.PageSize];
        _hostLengths = new int[maxPages];
        Array.Fill(_hostLengths, pages.PageSize);
    }

    /// <summary>The device.</summary>
    public CudaDevice Device { get; }

    /// <summary>Most page pairs per call.</summary>
    public int MaxPages { get; }

    /// <summary>The page geometry served.</summary>
    public PagedKvLayout Geometry { get; }

    /// <summary>Requantizes the page pairs; see <see cref="KvQuantCpu.Requantize{T}"/>. The host spans may be reused on
    /// return (they are validated and uploaded on <paramref name="stream"/>).</summary>
    /// <param name="spec">Pools and page count.</param>
    /// <param name="sourcePages">Pages read.</param>
    /// <param name="destinationPages">Pages written (distinct).</param>
    /// <param name="source">The source tensor.</param>
    /// <param name="destination">The destination tensor (its codes, scales and parameters are written; given scales read).</param>
    /// <param name="stream">Stream (default stream when null).</param>
    public void Requantize(in KvRequantizeSpec spec, ReadOnlySpan<int> sourcePages, ReadOnlySpan<int> destinationPages,
        DeviceQuantizedTensor<T> source, DeviceQuantizedTensor<T> destination, CudaStream? stream = null)
    {
        spec.Validate(sourcePages, destinationPages);
        var g = spec.Source.Pages;
        if (g.PageSize != Geometry.PageSize || g.NumKvHeads != Geometry.NumKvHeads || g.HeadDim != Geometry.HeadDim)
            throw new ArgumentException($"This requantizer serves pages of {Geometry.PageSize}×{Geometry.NumKvHeads}×{Geometry.HeadDim}.", nameof(spec));
        if (spec.NumPages > MaxPages) throw new ArgumentException($"NumPages is {spec.NumPages}; this requantizer holds {MaxPages}.", nameof(spec));
        if (spec.NumPages == 0) return;

        _table.Update(sourcePages, _hostLengths.AsSpan(0, spec.NumPages), spec.Source.Pages, stream);
        var scratch = _scratch.Span.Slice(0, (long)spec.Tokens * g.TokenElements);
        _kernels.Dequantize(new KvDequantizeSpec(spec.Source, spec.NumPages, 1, g.PageSize), source.Codes, source.TokenScales, source.GivenScales,
            source.GroupParams, _table, scratch, stream);
        var slots = _hostSlots.AsSpan(0, spec.DestinationSlotCount);
        spec.DestinationSlots(destinationPages, slots);
        if (spec.Destination.TokenGroups) _slots.UpdateGroups(slots, spec.Destination.Pages, spec.Destination.Group, stream);
        else _slots.Update(slots, spec.Destination.Pages, stream);
        _kernels.Quantize(new KvQuantizeSpec(spec.Destination, spec.Tokens), scratch, _slots, destination.GivenScales, destination.Codes,
            destination.TokenScales, destination.GroupParams, stream);
    }

    /// <summary>Frees the scratch and index buffers.</summary>
    public void Dispose()
    {
        _table.Dispose();
        _slots.Dispose();
        _scratch.Dispose();
    }
}
