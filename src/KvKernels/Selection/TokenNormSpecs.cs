using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Selection;

/// <summary>The norm of one (token, KV head) row, computed in fp32 from the fp16/bf16 elements.</summary>
public enum VectorNorm
{
    /// <summary>‖x‖₂ = √(Σ x²): KNorm ranks keys by it (research/kv_algorithms.md §2.5).</summary>
    L2,

    /// <summary>‖x‖₁ = Σ |x|: VATP weights attention by the values' (§2.3).</summary>
    L1,
}

/// <summary>
/// Norms of the tokens being appended to a paged cache (primitive P1), addressed exactly like
/// <see cref="PagedKvKernels.Append{T}"/>: token <c>t</c>'s rows <c>[Hkv, D]</c> are read from the source at
/// <c>t · stride</c>, and the norm of head <c>h</c> goes to <c>norms[slots[t] · Hkv + h]</c> of an fp32 side buffer
/// <c>[NumPages · PageSize, Hkv]</c> (one entry per pool row); slot −1 skips the token, other entries are untouched.
/// Keys and values are each optional (an empty source with an empty side buffer): KNorm needs ‖k‖₂ only, VATP ‖v‖₁ only.
/// <para>
/// The sum over a row has one fixed order, shared by the GPU kernel and the CPU twin, so both give the same bits: the row
/// is split into 8-element vectors; vector v goes to lane <c>v mod 8</c> of 8, which keeps 8 accumulators (one per element
/// position; L2: a fused multiply-add of x·x, L1: + |x|) over its vectors in ascending order; each lane folds its
/// accumulators as <c>((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))</c>, and the 8 lanes are combined in the same pattern
/// (a xor butterfly); L2 then takes the IEEE square root.
/// </para>
/// <para>Fused into the append kernel this would save one read of the new rows; it is a separate kernel for now, so
/// <c>cuda/paging/paging.cu</c> stays a pure byte copy.</para>
/// </summary>
/// <param name="Append">The append this call follows: pool shape, token count and source strides.</param>
public readonly record struct AppendNormSpec(PagedAppendSpec Append)
{
    /// <summary>The norm of the keys (default ‖k‖₂).</summary>
    public VectorNorm KeyNorm { get; init; } = VectorNorm.L2;

    /// <summary>The norm of the values (default ‖v‖₁).</summary>
    public VectorNorm ValueNorm { get; init; } = VectorNorm.L1;

    /// <summary>Entries of one side buffer: <c>NumPages · PageSize · Hkv</c>.</summary>
    public long NormElements => Append.Pool.Slots * Append.Pool.NumKvHeads;

    /// <summary>Elements a source with token stride <paramref name="stride"/> must hold.</summary>
    private long SourceElements(long stride) => Append.NumTokens == 0 ? 0 : (Append.NumTokens - 1) * stride + Append.Pool.TokenElements;

    /// <summary>
    /// Checks the spec, the element type (fp16 or bf16) and every buffer length. A tensor counts as given when it or its
    /// side buffer is non-empty, and then both must have their full lengths; at least one of keys and values is given.
    /// </summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void Validate<T>(long keys, long values, int slots, long keyNorms, long valueNorms) where T : unmanaged
    {
        ScoreChecks.Element<T>(keys > 0 ? "keys" : "values");
        var pool = Append.Pool;
        pool.Validate<T>("spec");
        if (Append.NumTokens < 0) throw new ArgumentException($"Append.NumTokens is {Append.NumTokens}; expected ≥ 0.", "spec");
        if (Append.KeyTokenStride != 0 && Append.KeyTokenStride < pool.TokenElements)
            throw new ArgumentException($"Append.KeyTokenStride is {Append.KeyTokenStride}; expected 0 or ≥ Hkv·D = {pool.TokenElements}.", "spec");
        if (Append.ValueTokenStride != 0 && Append.ValueTokenStride < pool.TokenElements)
            throw new ArgumentException($"Append.ValueTokenStride is {Append.ValueTokenStride}; expected 0 or ≥ Hkv·D = {pool.TokenElements}.", "spec");
        ScoreChecks.Norm(KeyNorm, nameof(KeyNorm));
        ScoreChecks.Norm(ValueNorm, nameof(ValueNorm));
        if (NormElements > int.MaxValue)
            throw new ArgumentException($"The side buffers would have {NormElements} entries; at most 2^31 − 1 are supported.", "spec");
        bool withKeys = keys != 0 || keyNorms != 0, withValues = values != 0 || valueNorms != 0;
        if (!withKeys && !withValues) throw new ArgumentException("Neither keys nor values were given; pass at least one tensor and its side buffer.", "keys");
        if (withKeys)
        {
            ScoreChecks.AtLeast(keys, SourceElements(Append.KeyStride), "keys");
            ScoreChecks.Exactly(keyNorms, NormElements, "keyNorms");
        }
        if (withValues)
        {
            ScoreChecks.AtLeast(values, SourceElements(Append.ValueStride), "values");
            ScoreChecks.Exactly(valueNorms, NormElements, "valueNorms");
        }
        if (slots != Append.NumTokens) throw new ArgumentException($"slots has {slots} entries; expected NumTokens = {Append.NumTokens}.", nameof(slots));
        if ((long)Append.NumTokens * pool.NumKvHeads > int.MaxValue)
            throw new ArgumentException($"NumTokens · Hkv = {(long)Append.NumTokens * pool.NumKvHeads}; at most 2^31 − 1 rows are supported.", "spec");
    }
}

/// <summary>
/// Norms of every cached token (primitive P1) of a contiguous or paged cache, written to fp32 <c>[Rows, Hkv, MaxTokens]</c>
/// (the layout the selection kernels read). Entries at positions at or past a row's length are written 0. Storage as in
/// <see cref="DecodeAttentionSpec"/>: contiguous <c>[Rows, MaxTokens, Hkv, D]</c> (NHD) or <c>[Rows, Hkv, MaxTokens, D]</c>
/// (HND); paged pools <c>[NumPages, PageSize, Hkv, D]</c> / <c>[NumPages, Hkv, PageSize, D]</c> through a block table
/// <c>[Rows, MaxPagesPerSequence]</c>. The summation order is the one of <see cref="AppendNormSpec"/> (bit-identical CPU/GPU).
/// </summary>
/// <param name="Rows">Sequences (≥ 0).</param>
/// <param name="NumKvHeads">Hkv, 1–1024 (the storage's heads per token; ragged single-head pools are not supported).</param>
/// <param name="HeadDim">Elements per row: a multiple of 8 in 8–576.</param>
/// <param name="Cache">The storage.</param>
public readonly record struct CacheNormSpec(int Rows, int NumKvHeads, int HeadDim, KvCacheShape Cache)
{
    /// <summary>The norm of the keys (default ‖k‖₂).</summary>
    public VectorNorm KeyNorm { get; init; } = VectorNorm.L2;

    /// <summary>The norm of the values (default ‖v‖₁).</summary>
    public VectorNorm ValueNorm { get; init; } = VectorNorm.L1;

    /// <summary>Entries of one output: <c>Rows · Hkv · MaxTokens</c>.</summary>
    public long OutputElements => (long)Rows * NumKvHeads * Cache.MaxTokens;

    /// <summary>Elements of the key (or value) storage.</summary>
    public long StorageElements => Storage.KeyElements;

    /// <summary>Entries of the block table (0 for contiguous storage).</summary>
    public long BlockTableElements => Storage.BlockTableElements;

    /// <summary>The pool shape of paged storage, for block tables validated by <see cref="DeviceBlockTable"/>.</summary>
    public PagedKvLayout KeyPool => Storage.KeyPool;

    /// <summary>The storage described as a one-query decode spec (for its addressing and index checks).</summary>
    internal DecodeAttentionSpec Storage => new(Rows, 1, NumKvHeads, NumKvHeads, HeadDim, Cache);

    /// <summary>Checks shapes and options.</summary>
    /// <exception cref="ArgumentException">A field is out of range; the message names it.</exception>
    public void Validate()
    {
        const string p = "spec";
        if (Rows < 0) throw new ArgumentException($"Rows is {Rows}; expected ≥ 0.", p);
        if (NumKvHeads is < 1 or > PagedKvLayout.MaxKvHeads) throw new ArgumentException($"NumKvHeads is {NumKvHeads}; expected 1..{PagedKvLayout.MaxKvHeads}.", p);
        if (HeadDim is < 8 or > PagedKvLayout.MaxHeadDim || HeadDim % 8 != 0)
            throw new ArgumentException($"HeadDim is {HeadDim}; expected a multiple of 8 in 8..{PagedKvLayout.MaxHeadDim}.", p);
        if (Cache.PoolKvHeads != 0 && Cache.PoolKvHeads != NumKvHeads)
            throw new ArgumentException($"Cache.PoolKvHeads is {Cache.PoolKvHeads}; expected 0 or NumKvHeads = {NumKvHeads}.", p);
        ScoreChecks.Norm(KeyNorm, nameof(KeyNorm));
        ScoreChecks.Norm(ValueNorm, nameof(ValueNorm));
        Storage.Validate();
        if (OutputElements > int.MaxValue)
            throw new ArgumentException($"The output would have Rows · Hkv · MaxTokens = {OutputElements} entries; at most 2^31 − 1 are supported.", p);
    }

    /// <summary>
    /// Checks <see cref="Validate"/>, the element type (fp16 or bf16) and every buffer length. A tensor counts as given
    /// when it or its output is non-empty, and then both must have their full lengths; at least one of keys and values is
    /// given (unless the problem is empty). The block table is empty for contiguous storage.
    /// </summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void ValidateBuffers<T>(long keys, long values, int lengths, long blockTable, long keyNorms, long valueNorms) where T : unmanaged
    {
        Validate();
        ScoreChecks.Element<T>(keys > 0 ? "keys" : "values");
        bool withKeys = keys != 0 || keyNorms != 0, withValues = values != 0 || valueNorms != 0;
        if (!withKeys && !withValues && (StorageElements > 0 || OutputElements > 0))
            throw new ArgumentException("Neither keys nor values were given; pass at least one tensor and its output.", "keys");
        if (withKeys)
        {
            ScoreChecks.Exactly(keys, StorageElements, "keys");
            ScoreChecks.Exactly(keyNorms, OutputElements, "keyNorms");
        }
        if (withValues)
        {
            ScoreChecks.Exactly(values, StorageElements, "values");
            ScoreChecks.Exactly(valueNorms, OutputElements, "valueNorms");
        }
        ScoreChecks.Exactly(lengths, Rows, "lengths");
        ScoreChecks.Exactly(blockTable, BlockTableElements, "blockTable");
    }

    /// <summary>Checks every length in [0, MaxTokens] and, for paged storage, every page a row uses. Returns the longest row.</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and entry.</exception>
    public int ValidateIndices(ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable) => Storage.ValidateIndices(lengths, blockTable);
}

/// <summary>Argument checks shared by the scoring specs.</summary>
internal static class ScoreChecks
{
    public static void Element<T>(string paramName) where T : unmanaged
    {
        if (typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16))
            throw new ArgumentException($"Element type {typeof(T).Name} is not supported; expected Half (fp16) or BFloat16.", paramName);
    }

    public static void Norm(VectorNorm norm, string name)
    {
        if (norm is not (VectorNorm.L1 or VectorNorm.L2)) throw new ArgumentException($"{name} is {norm}; expected L1 or L2.", "spec");
    }

    public static void Exactly(long actual, long expected, string paramName)
    {
        if (actual != expected) throw new ArgumentException($"{paramName} has {actual} elements; expected {expected}.", paramName);
    }

    public static void AtLeast(long actual, long expected, string paramName)
    {
        if (actual < expected) throw new ArgumentException($"{paramName} has {actual} elements; expected at least {expected}.", paramName);
    }
}
