using KvKernels.Attention;
using KvKernels.Compilation;
using KvKernels.Mla;
using KvKernels.Paging;
using KvKernels.Quantization;
using KvKernels.Selection;

namespace KvKernels;

/// <summary>One op family's shipped kernel specialization and the entry points it must contain.</summary>
/// <param name="Family">Op family (<c>paging</c>, <c>attention</c> …).</param>
/// <param name="Specialization">Source and macros.</param>
/// <param name="EntryPoints">The <c>extern "C" __global__</c> functions the library launches from it.</param>
public sealed record CatalogEntry(string Family, KernelSpecialization Specialization, IReadOnlyList<string> EntryPoints);

/// <summary>
/// Every kernel specialization the library ships by default: what <c>KvCheck compile</c> and the compile gate build
/// for sm_80, sm_89 and sm_90, and what a deployment can pre-compile into the cache.
/// </summary>
public static class KernelCatalog
{
    /// <summary>The architectures every shipped specialization must compile for without spills.</summary>
    public static IReadOnlyList<string> GateArchs { get; } = ["sm_80", "sm_89", "sm_90"];

    /// <summary>The architectures <c>KvCheck compile</c> builds by default.</summary>
    public static IReadOnlyList<string> DefaultArchs { get; } = ["sm_80", "sm_89", "sm_90", "sm_90a"];

    /// <summary>All shipped specializations, family by family.</summary>
    public static IReadOnlyList<CatalogEntry> Entries { get; } =
    [
        .. PagedKvKernels.Specializations.Select(s => new CatalogEntry("paging", s, PagedKvKernels.EntryPoints)),
        .. DecodeAttentionKernels.Specializations.Select(s => new CatalogEntry("attention", s, DecodeAttentionKernels.EntryPoints)),
        .. MlaAbsorbKernels.Specializations.Select(s => new CatalogEntry("mla", s, MlaAbsorbKernels.EntryPoints)),
        .. MlaCacheKernels.Specializations.Select(s => new CatalogEntry("mla", s, MlaCacheKernels.EntryPoints)),
        .. KvQuantKernels.Specializations.Select(s => new CatalogEntry("quant", s, KvQuantKernels.EntryPoints)),
        .. QuantizedAttentionKernels.Specializations.Select(s => new CatalogEntry("quant", s, QuantizedAttentionKernels.EntryPoints)),
        .. CompactionKernels.Specializations.Select(s => new CatalogEntry("selection", s, CompactionKernels.EntryPoints)),
        .. TokenScoreKernels.Specializations.Select(s => new CatalogEntry("selection", s, TokenScoreKernels.EntryPoints)),
        .. SelectionKernels.Specializations.Select(s => new CatalogEntry("selection", s, SelectionKernels.EntryPoints)),
    ];
}
