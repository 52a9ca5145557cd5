using System.Runtime.CompilerServices;

namespace KvKernels.Paging;

/// <summary>How a paged pool orders a page's tokens and heads.</summary>
public enum KvLayout
{
    /// <summary><c>[num_pages, page_size, Hkv, D]</c>: a token's heads are adjacent (vLLM, FlashAttention).</summary>
    Nhd,

    /// <summary><c>[num_pages, Hkv, page_size, D]</c>: a head's tokens within a page are adjacent (FlashInfer option).</summary>
    Hnd,
}

/// <summary>
/// The shape of one paged K (or V) pool: <see cref="NumPages"/> pages of <see cref="PageSize"/> token slots, each slot
/// holding <see cref="NumKvHeads"/> rows of <see cref="HeadDim"/> elements, ordered as <see cref="Layout"/> says.
/// A slot is <c>page · PageSize + offset</c>. The element type is the caller's <c>T</c> (fp16, bf16, or any 1–4 byte
/// type: the paging kernels move bytes).
/// </summary>
/// <param name="NumPages">Pages in the pool (≥ 1).</param>
/// <param name="PageSize">Token slots per page, 1 to 256.</param>
/// <param name="NumKvHeads">KV heads, 1 to 1024.</param>
/// <param name="HeadDim">Elements per row: a multiple of 8 from 8 to 576.</param>
/// <param name="Layout">NHD or HND.</param>
public readonly record struct PagedKvLayout(int NumPages, int PageSize, int NumKvHeads, int HeadDim, KvLayout Layout = KvLayout.Nhd)
{
    /// <summary>Largest page size the kernels support.</summary>
    public const int MaxPageSize = 256;

    /// <summary>Largest head dimension the kernels support.</summary>
    public const int MaxHeadDim = 576;

    /// <summary>Largest number of KV heads.</summary>
    public const int MaxKvHeads = 1024;

    /// <summary>Elements in one page (all of its slots and heads).</summary>
    public long PageElements => (long)PageSize * NumKvHeads * HeadDim;

    /// <summary>Elements in the whole pool.</summary>
    public long PoolElements => NumPages * PageElements;

    /// <summary>Token slots in the pool.</summary>
    public long Slots => (long)NumPages * PageSize;

    /// <summary>Elements of one token (all heads).</summary>
    public int TokenElements => NumKvHeads * HeadDim;

    /// <summary>Element offset of the row of (<paramref name="slot"/>, <paramref name="head"/>) in the pool.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public long RowOffset(long slot, int head)
    {
        long page = slot / PageSize, offset = slot - page * PageSize;
        return Layout == KvLayout.Nhd
            ? ((page * PageSize + offset) * NumKvHeads + head) * HeadDim
            : ((page * NumKvHeads + head) * PageSize + offset) * HeadDim;
    }

    /// <summary>Checks the shape for element type <typeparamref name="T"/>.</summary>
    /// <exception cref="ArgumentException">A field is out of range; the message names it and the expected range.</exception>
    public void Validate<T>(string paramName) where T : unmanaged
    {
        int size = Unsafe.SizeOf<T>();
        if (size is not (1 or 2 or 4))
            throw new ArgumentException($"Element type {typeof(T).Name} is {size} bytes; expected a 1, 2 or 4 byte type.", paramName);
        if (NumPages < 1) throw new ArgumentException($"NumPages is {NumPages}; expected ≥ 1.", paramName);
        if (PageSize is < 1 or > MaxPageSize) throw new ArgumentException($"PageSize is {PageSize}; expected 1..{MaxPageSize}.", paramName);
        if (NumKvHeads is < 1 or > MaxKvHeads) throw new ArgumentException($"NumKvHeads is {NumKvHeads}; expected 1..{MaxKvHeads}.", paramName);
        if (HeadDim is < 8 or > MaxHeadDim || HeadDim % 8 != 0)
            throw new ArgumentException($"HeadDim is {HeadDim}; expected a multiple of 8 in 8..{MaxHeadDim}.", paramName);
        if (Layout is not (KvLayout.Nhd or KvLayout.Hnd)) throw new ArgumentException($"Layout {Layout} is not NHD or HND.", paramName);
        if ((long)NumPages * PageSize > int.MaxValue)
            throw new ArgumentException($"The pool has {(long)NumPages * PageSize} slots; slot indices are int32, expected ≤ {int.MaxValue}.", paramName);
    }
}
