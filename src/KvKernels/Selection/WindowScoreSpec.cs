using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Selection;

/// <summary>How <see cref="WindowScoreSpec"/> reduces probabilities over the window's queries or over a group's heads.</summary>
public enum ScoreReduction
{
    /// <summary>Sum (SnapKV's vote over the window).</summary>
    Sum,

    /// <summary>Sum in order, then divided by the count (kvpress: <c>mean</c> over the window, then over the group).</summary>
    Mean,

    /// <summary>Maximum (KVzip-style).</summary>
    Max,

    /// <summary>Group reduction only: no reduction, one output row per query head (SnapKV's original per-head selection).</summary>
    None,
}

/// <summary>
/// Observation-window scoring (primitive P2, SnapKV/PyramidKV/kvpress, research/kv_algorithms.md §2.4): the last
/// <see cref="WindowSize"/> queries of a prompt are attended against all the sequence's keys, and each key's softmax
/// probabilities are reduced over the window's queries and over the query heads of its KV head's group.
/// <para>
/// Tensors: the window queries <c>[B, W, Hq, D]</c> (already rotated, fp16 or bf16); keys in <see cref="Cache"/>'s storage
/// (as <see cref="DecodeAttentionSpec"/>: contiguous or paged, NHD or HND; lengths <c>[B]</c>, block table
/// <c>[B, MaxPagesPerSequence]</c>); the output fp32 <c>[B, Hkv, MaxTokens]</c>, or <c>[B, Hq, MaxTokens]</c> when
/// <see cref="GroupReduction"/> is <see cref="ScoreReduction.None"/>.
/// </para>
/// <para>
/// The op, for sequence b of length L, query head h = kvh·g + j (g = Hq / Hkv) and window query i: the query sits at
/// position <c>L − W + i</c>; when that is negative (a row shorter than the window) the query is absent and adds nothing.
/// A present query sees keys <c>0 … L − W + i</c> (<see cref="Causal"/>, the default) or all L keys, with
/// <c>p_n = softmax_n(Scale · q·k_n)</c> over the keys it sees (fp32, max-subtracted; masked keys get 0). Then per key n:
/// the window reduction over i (sum, mean = sum ÷ W, or max), then the group reduction over j in head order (sum, mean =
/// sum ÷ g, max, or none). Positions n ≥ L are written 0; a row of length 0 is all zeros.
/// </para>
/// <para>
/// The exponentials make GPU and CPU results differ by a few ulp (research/kv_algorithms.md §7 note 2): compare with a
/// relative tolerance. The GPU's result is deterministic (fixed reduction order, no atomics) for a given device and split
/// count (<see cref="TokenScoreKernels.PlanSplits"/>).
/// </para>
/// </summary>
/// <param name="BatchSize">Sequences B (≥ 0).</param>
/// <param name="WindowSize">Window queries W per sequence: 1 … MaxTokens (up to the whole prompt).</param>
/// <param name="NumQueryHeads">Hq: a multiple of <paramref name="NumKvHeads"/>, ratio 1–128.</param>
/// <param name="NumKvHeads">Hkv, 1–1024.</param>
/// <param name="HeadDim">D of queries and keys: a multiple of 8 in 8–256.</param>
/// <param name="Cache">The key storage (values are not read).</param>
public readonly record struct WindowScoreSpec(int BatchSize, int WindowSize, int NumQueryHeads, int NumKvHeads, int HeadDim, KvCacheShape Cache)
{
    /// <summary>Largest head dim.</summary>
    public const int MaxHeadDim = 256;

    /// <summary>Largest Hq / Hkv.</summary>
    public const int MaxGroupSize = DecodeAttentionSpec.MaxGroupSize;

    /// <summary>Logit scale; 0 means <c>1/√HeadDim</c>. Must be finite.</summary>
    public float Scale { get; init; }

    /// <summary>Causal mask inside the window (default true): window query i sees keys up to its own position.</summary>
    public bool Causal { get; init; } = true;

    /// <summary>Reduction over the W window queries (default <see cref="ScoreReduction.Sum"/>; not None).</summary>
    public ScoreReduction WindowReduction { get; init; }

    /// <summary>Reduction over the g query heads of a KV head (default <see cref="ScoreReduction.Sum"/>).</summary>
    public ScoreReduction GroupReduction { get; init; }

    /// <summary>GPU key splits of the first (LSE) pass: 0 chooses from the SM count and the longest row; ≥ 1 forces (up to
    /// <see cref="TokenScoreKernels.MaxSplits"/>, clamped to what the workspace holds). The result does not depend on it beyond
    /// fp32 rounding.</summary>
    public int Splits { get; init; }

    /// <summary>Hq / Hkv.</summary>
    public int GroupSize => NumQueryHeads / NumKvHeads;

    /// <summary>The scale actually applied.</summary>
    public float EffectiveScale => Scale == 0 ? 1f / MathF.Sqrt(HeadDim) : Scale;

    /// <summary>Heads of the output: Hkv, or Hq without a group reduction.</summary>
    public int OutputHeads => GroupReduction == ScoreReduction.None ? NumQueryHeads : NumKvHeads;

    /// <summary>Elements of the window queries: <c>B · W · Hq · D</c>.</summary>
    public long QueryElements => QueryRows * HeadDim;

    /// <summary>Window query rows <c>B · W · Hq</c> (what <see cref="WindowScoreWorkspace"/> is sized by).</summary>
    public long QueryRows => (long)BatchSize * WindowSize * NumQueryHeads;

    /// <summary>Elements of the output: <c>B · OutputHeads · MaxTokens</c>.</summary>
    public long OutputElements => (long)BatchSize * OutputHeads * Cache.MaxTokens;

    /// <summary>Elements of the key storage.</summary>
    public long KeyElements => Storage.KeyElements;

    /// <summary>Entries of the block table (0 for contiguous storage).</summary>
    public long BlockTableElements => Storage.BlockTableElements;

    /// <summary>The pool shape of paged storage, for block tables validated by <see cref="DeviceBlockTable"/>.</summary>
    public PagedKvLayout KeyPool => Storage.KeyPool;

    /// <summary>The storage described as a one-query decode spec (for its addressing and index checks).</summary>
    internal DecodeAttentionSpec Storage => new(BatchSize, 1, NumQueryHeads, NumKvHeads, HeadDim, Cache);

    /// <summary>Checks shapes and options.</summary>
    /// <exception cref="ArgumentException">A field is out of range; the message names it.</exception>
    public void Validate()
    {
        const string p = "spec";
        if (BatchSize < 0) throw new ArgumentException($"BatchSize is {BatchSize}; expected ≥ 0.", p);
        if (NumKvHeads is < 1 or > PagedKvLayout.MaxKvHeads) throw new ArgumentException($"NumKvHeads is {NumKvHeads}; expected 1..{PagedKvLayout.MaxKvHeads}.", p);
        if (NumQueryHeads < NumKvHeads || NumQueryHeads % NumKvHeads != 0 || NumQueryHeads / NumKvHeads > MaxGroupSize)
            throw new ArgumentException($"NumQueryHeads is {NumQueryHeads} with NumKvHeads {NumKvHeads}; expected an integral multiple of NumKvHeads with ratio 1..{MaxGroupSize}.", p);
        if (HeadDim is < 8 or > MaxHeadDim || HeadDim % 8 != 0)
            throw new ArgumentException($"HeadDim is {HeadDim}; expected a multiple of 8 in 8..{MaxHeadDim}.", p);
        if (Cache.PoolKvHeads != 0 && Cache.PoolKvHeads != NumKvHeads)
            throw new ArgumentException($"Cache.PoolKvHeads is {Cache.PoolKvHeads}; expected 0 or NumKvHeads = {NumKvHeads}.", p);
        if (!float.IsFinite(Scale)) throw new ArgumentException($"Scale is {Scale}; expected a finite value (0 for 1/√HeadDim).", p);
        if (WindowReduction is not (ScoreReduction.Sum or ScoreReduction.Mean or ScoreReduction.Max))
            throw new ArgumentException($"WindowReduction is {WindowReduction}; expected Sum, Mean or Max.", p);
        if (Splits < 0 || Splits > TokenScoreKernels.MaxSplits)
            throw new ArgumentException($"Splits is {Splits}; expected 0 (heuristic) or 1..{TokenScoreKernels.MaxSplits}.", p);
        if (!Enum.IsDefined(GroupReduction)) throw new ArgumentException($"GroupReduction is {GroupReduction}; expected Sum, Mean, Max or None.", p);
        Storage.Validate();
        if (WindowSize < 1 || WindowSize > Cache.MaxTokens)
            throw new ArgumentException($"WindowSize is {WindowSize}; expected 1..MaxTokens = {Cache.MaxTokens} (the window is the last W tokens of the prompt).", p);
        if ((long)GroupSize * WindowSize > int.MaxValue / 2)
            throw new ArgumentException($"Hq/Hkv · W = {(long)GroupSize * WindowSize} query rows per KV head; at most 2^30 are supported.", p);
        if (OutputElements > int.MaxValue || QueryRows > int.MaxValue)
            throw new ArgumentException($"The call has {QueryRows} query rows and {OutputElements} outputs; at most 2^31 − 1 of each are supported.", p);
    }

    /// <summary>
    /// Checks <see cref="Validate"/>, the element type (fp16 or bf16) and every buffer length (the block table is empty
    /// for contiguous storage).
    /// </summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void ValidateBuffers<T>(long query, long keys, int lengths, long blockTable, long scores) where T : unmanaged
    {
        Validate();
        ScoreChecks.Element<T>(nameof(query));
        ScoreChecks.Exactly(query, QueryElements, nameof(query));
        ScoreChecks.Exactly(keys, KeyElements, nameof(keys));
        ScoreChecks.Exactly(lengths, BatchSize, nameof(lengths));
        ScoreChecks.Exactly(blockTable, BlockTableElements, nameof(blockTable));
        ScoreChecks.AtLeast(scores, OutputElements, nameof(scores));
        if (scores != OutputElements)
            throw new ArgumentException($"scores has {scores} elements; expected B · {(GroupReduction == ScoreReduction.None ? "Hq" : "Hkv")} · MaxTokens = {OutputElements}.", nameof(scores));
    }

    /// <summary>Checks every length in [0, MaxTokens] and, for paged storage, every page a row uses. Returns the longest row.</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and entry.</exception>
    public int ValidateIndices(ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable) => Storage.ValidateIndices(lengths, blockTable);
}
