using System.Runtime.CompilerServices;
using KvKernels.Paging;

namespace KvKernels.Attention;

/// <summary>Element type of an attention tensor.</summary>
public enum AttentionElement
{
    /// <summary>IEEE binary16 (<see cref="Half"/>).</summary>
    Float16,

    /// <summary>bfloat16 (<see cref="KvKernels.BFloat16"/>).</summary>
    BFloat16,

    /// <summary>IEEE binary32 (<see cref="float"/>); outputs only.</summary>
    Float32,
}

/// <summary>Where the keys and values live.</summary>
public enum KvStorage
{
    /// <summary>One dense buffer per tensor: <c>[rows, MaxTokens, Hkv, D]</c> (NHD) or <c>[rows, Hkv, MaxTokens, D]</c> (HND).</summary>
    Contiguous,

    /// <summary>Paged pools as the paging kernels write them, addressed through a block table.</summary>
    Paged,
}

/// <summary>How rotary position embedding pairs the dimensions of a key.</summary>
public enum RopeStyle
{
    /// <summary>Keys are stored already rotated (or the model has no RoPE).</summary>
    None,

    /// <summary>GPT-NeoX / Llama (Hugging Face): dimension i pairs with i + RotaryDim/2.</summary>
    RotateHalf,

    /// <summary>GPT-J / Meta reference / DeepSeek: dimension 2i pairs with 2i + 1.</summary>
    Interleaved,
}

/// <summary>
/// Rotary embedding applied to the keys inside the kernel, for caches that store keys before RoPE. The query is
/// <b>not</b> rotated: pass it already rotated at its own position, as engines do. For pair i of
/// <see cref="RotaryDim"/> the angle is <c>(float)position · invFreq[i]</c> in fp32, with
/// <c>invFreq[i] = (float)Math.Pow(Theta, −2i / RotaryDim)</c> (computed in double, rounded once to float), and
/// <c>(x, y) → (x·cos − y·sin, x·sin + y·cos)</c>. Dimensions at or past <see cref="RotaryDim"/> are not rotated
/// (partial rotary, GPT-NeoX style).
/// </summary>
/// <param name="Style">Pairing convention; <see cref="RopeStyle.None"/> disables on-the-fly RoPE.</param>
/// <param name="Theta">Frequency base θ (10000 for Llama-2, 500000 for Llama-3); finite and &gt; 1.</param>
/// <param name="RotaryDim">Rotated dimensions: 0 means the whole key head dim; else even and ≤ HeadDim.</param>
/// <param name="ExplicitPositions">Read each cached token's position from a positions array
/// <c>[rows, MaxTokens]</c> int32 (indexed by the token's logical index in its sequence) instead of using that index
/// itself (for ring buffers and caches compacted after eviction).</param>
public readonly record struct RopeOptions(RopeStyle Style, float Theta = 10000f, int RotaryDim = 0, bool ExplicitPositions = false)
{
    /// <summary>Whether keys are rotated in the kernel.</summary>
    public bool Enabled => Style != RopeStyle.None;
}

/// <summary>
/// The KV storage of a decode-attention call. Contiguous buffers are <c>[rows, MaxTokens, PoolKvHeads, D]</c> (NHD)
/// or <c>[rows, PoolKvHeads, MaxTokens, D]</c> (HND); paged pools are the paging kernels' pools
/// (<see cref="PagedKvLayout"/>) with a block table of <see cref="MaxPagesPerSequence"/> columns per row.
/// </summary>
/// <param name="Storage">Contiguous or paged.</param>
/// <param name="Layout">NHD or HND (for contiguous buffers too).</param>
/// <param name="MaxTokens">Token capacity per row: N_max for contiguous; <c>MaxPagesPerSequence · PageSize</c> for paged.</param>
/// <param name="NumPages">Pages in the pool (paged; 0 for contiguous).</param>
/// <param name="PageSize">Token slots per page, 1–256 (paged; 0 for contiguous).</param>
/// <param name="MaxPagesPerSequence">Block-table columns (paged; 0 for contiguous).</param>
/// <param name="PoolKvHeads">KV heads per token slot of the storage: 0 means the spec's <c>NumKvHeads</c>. In ragged
/// mode it may be 1: each (sequence, KV head) row then owns whole single-head pages (per-head eviction frees memory).</param>
public readonly record struct KvCacheShape(KvStorage Storage, KvLayout Layout, int MaxTokens, int NumPages, int PageSize,
    int MaxPagesPerSequence, int PoolKvHeads = 0)
{
    /// <summary>Dense buffers of <paramref name="maxTokens"/> tokens per row.</summary>
    public static KvCacheShape Contiguous(int maxTokens, KvLayout layout = KvLayout.Nhd, int poolKvHeads = 0) =>
        new(KvStorage.Contiguous, layout, maxTokens, 0, 0, 0, poolKvHeads);

    /// <summary>Paged pools of <paramref name="numPages"/> pages of <paramref name="pageSize"/> slots, block tables
    /// of <paramref name="maxPagesPerSequence"/> columns.</summary>
    public static KvCacheShape Paged(int numPages, int pageSize, int maxPagesPerSequence, KvLayout layout = KvLayout.Nhd, int poolKvHeads = 0) =>
        new(KvStorage.Paged, layout, checked(maxPagesPerSequence * pageSize), numPages, pageSize, maxPagesPerSequence, poolKvHeads);

    /// <summary>Whether the storage is paged.</summary>
    public bool IsPaged => Storage == KvStorage.Paged;
}

/// <summary>
/// One decode-attention call: shapes, element types, storage and options. The CPU twin (<see cref="DecodeAttentionCpu"/>)
/// and the GPU wrapper validate it the same way, through <see cref="Validate"/> and <see cref="ValidateBuffers"/>.
/// <para>
/// The op: for sequence b, query token i (of <see cref="QueryLength"/>) and query head h, with L the length of the
/// row the head reads and <c>qi = L − QueryLength + i</c> the query's logical index, keys n = 0 … qi are visible
/// (minus those outside the window), <c>s_n = Scale · q·k_n</c>, then the soft-cap <c>s ← c·tanh(s/c)</c>, then
/// ALiBi <c>s ← s − slope[h]·(qi − n)</c>; <c>o = Σ softmax(s)_n · v_n</c> and <c>lse = ln Σ exp(s_n)</c>. A query
/// that sees no key outputs zeros and <c>lse = −∞</c>.
/// </para>
/// <para>
/// Tensors (row-major): query <c>[B, QueryLength, Hq, HeadDim]</c>; keys and values in <see cref="Cache"/>'s
/// storage, values with <see cref="ValueDim"/>; output <c>[B, QueryLength, Hq, OutputDim]</c>; optional LSE
/// <c>[B, QueryLength, Hq]</c> fp32 (natural log). A row is a sequence, or in <see cref="Ragged"/> mode a
/// (sequence, KV head) pair <c>r = b · Hkv + kvh</c>; lengths are <c>[rows]</c> int32, the block table
/// <c>[rows, MaxPagesPerSequence]</c> int32. Query head h reads KV head <c>h / (Hq / Hkv)</c>.
/// </para>
/// </summary>
/// <param name="BatchSize">Sequences B (≥ 0).</param>
/// <param name="QueryLength">Query tokens per sequence, 1–16 (speculative decoding, observation windows).</param>
/// <param name="NumQueryHeads">Hq: a multiple of <paramref name="NumKvHeads"/>, ratio 1–128.</param>
/// <param name="NumKvHeads">Hkv, 1–1024.</param>
/// <param name="HeadDim">Dk of queries and keys: a multiple of 8 in 8–576.</param>
/// <param name="Cache">KV storage.</param>
public readonly record struct DecodeAttentionSpec(int BatchSize, int QueryLength, int NumQueryHeads, int NumKvHeads, int HeadDim,
    KvCacheShape Cache)
{
    /// <summary>Largest query length.</summary>
    public const int MaxQueryLength = 16;

    /// <summary>Largest Hq / Hkv.</summary>
    public const int MaxGroupSize = 128;

    /// <summary>Largest head dim (keys or values).</summary>
    public const int MaxHeadDim = 576;

    /// <summary>Dv of the values: 0 means <see cref="HeadDim"/>. With <see cref="KeyReuse"/> at most HeadDim: the values
    /// are then the first Dv columns of each key row (MLA: the 512 latent columns of a 576-wide row).</summary>
    public int ValueHeadDim { get; init; }

    /// <summary>Type of query, keys and values: fp16 or bf16.</summary>
    public AttentionElement InputType { get; init; }

    /// <summary>Type of the output: fp16, bf16 or fp32.</summary>
    public AttentionElement OutputType { get; init; }

    /// <summary>Logit scale; 0 means <c>1/√HeadDim</c>. Must be finite.</summary>
    public float Scale { get; init; }

    /// <summary>Logit soft-cap c (Gemma-2, Grok): <c>s ← c·tanh(s/c)</c> on the scaled logits; 0 disables.</summary>
    public float SoftCap { get; init; }

    /// <summary>Sliding window: a query at index qi sees keys qi − Window + 1 … qi (plus the sinks); 0 disables.</summary>
    public int Window { get; init; }

    /// <summary>Sink tokens 0 … Sinks − 1 stay visible outside the window (StreamingLLM); needs <see cref="Window"/> &gt; 0.</summary>
    public int Sinks { get; init; }

    /// <summary>Add ALiBi biases <c>−slope[h]·(qi − n)</c>; slopes are <c>[Hq]</c> fp32.</summary>
    public bool Alibi { get; init; }

    /// <summary>Every (sequence, KV head) is its own row with its own length (and block table): per-head eviction,
    /// FastGen, DMC.</summary>
    public bool Ragged { get; init; }

    /// <summary>Key reuse: no values are read, the first <see cref="ValueDim"/> columns of each key row serve as its
    /// value (of the un-rotated key when RoPE is on the fly). MFA-KR (V := K, the engine applies its value map after)
    /// and MLA (one latent row is both K and, in its first 512 columns, V).</summary>
    public bool KeyReuse { get; init; }

    /// <summary>On-the-fly RoPE of the keys.</summary>
    public RopeOptions Rope { get; init; }

    /// <summary>GPU split-KV chunks per row: 0 chooses from the SM count and the longest row; ≥ 1 forces (clamped to
    /// what the workspace holds). The result does not depend on it beyond fp32 rounding.</summary>
    public int Splits { get; init; }

    /// <summary>Dv of the values as read (HeadDim when 0).</summary>
    public int ValueDim => ValueHeadDim == 0 ? HeadDim : ValueHeadDim;

    /// <summary>Columns of the output: <see cref="ValueDim"/>.</summary>
    public int OutputDim => ValueDim;

    /// <summary>Hq / Hkv.</summary>
    public int GroupSize => NumQueryHeads / NumKvHeads;

    /// <summary>The scale actually applied.</summary>
    public float EffectiveScale => Scale == 0 ? 1f / MathF.Sqrt(HeadDim) : Scale;

    /// <summary>Rows of the KV storage and of lengths / block table: B, or B · Hkv in ragged mode.</summary>
    public int Rows => Ragged ? BatchSize * NumKvHeads : BatchSize;

    /// <summary>KV heads per token slot of the storage.</summary>
    public int PoolKvHeads => Cache.PoolKvHeads == 0 ? NumKvHeads : Cache.PoolKvHeads;

    /// <summary>Rotated dimensions (0 without RoPE).</summary>
    public int RotaryDim => !Rope.Enabled ? 0 : Rope.RotaryDim == 0 ? HeadDim : Rope.RotaryDim;

    /// <summary>Elements of the query (and of the LSE × HeadDim): <c>B · QueryLength · Hq · HeadDim</c>.</summary>
    public long QueryElements => (long)BatchSize * QueryLength * NumQueryHeads * HeadDim;

    /// <summary>Elements of the output.</summary>
    public long OutputElements => (long)BatchSize * QueryLength * NumQueryHeads * OutputDim;

    /// <summary>Elements of the LSE output when requested.</summary>
    public long LseElements => (long)BatchSize * QueryLength * NumQueryHeads;

    /// <summary>Elements of the key storage.</summary>
    public long KeyElements => StorageTokens * PoolKvHeads * HeadDim;

    /// <summary>Elements of the value storage (0 with key reuse).</summary>
    public long ValueElements => KeyReuse ? 0 : StorageTokens * PoolKvHeads * ValueDim;

    /// <summary>Entries of the block table (0 for contiguous storage).</summary>
    public long BlockTableElements => Cache.IsPaged ? (long)Rows * Cache.MaxPagesPerSequence : 0;

    /// <summary>Entries of the positions array (0 unless <see cref="RopeOptions.ExplicitPositions"/>).</summary>
    public long PositionElements => Rope.Enabled && Rope.ExplicitPositions ? (long)Rows * Cache.MaxTokens : 0;

    /// <summary>Token slots of the storage: pages · page size, or rows · MaxTokens.</summary>
    public long StorageTokens => Cache.IsPaged ? (long)Cache.NumPages * Cache.PageSize : (long)Rows * Cache.MaxTokens;

    /// <summary>The pool shape of the keys (paged storage), for block tables validated by <see cref="DeviceBlockTable"/>.</summary>
    public PagedKvLayout KeyPool => new(Math.Max(Cache.NumPages, 1), Math.Max(Cache.PageSize, 1), PoolKvHeads, HeadDim, Cache.Layout);

    /// <summary>Element offset of the row of (storage row or page table row <paramref name="row"/>, logical token
    /// <paramref name="token"/>, storage head <paramref name="head"/>) for a tensor of head dim <paramref name="dim"/>,
    /// given the physical <paramref name="page"/> of the token (paged) or ignored (contiguous).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public long StorageOffset(int row, int token, int page, int head, int dim)
    {
        int heads = PoolKvHeads;
        if (Cache.IsPaged)
        {
            int offset = token % Cache.PageSize;
            return Cache.Layout == KvLayout.Nhd
                ? (((long)page * Cache.PageSize + offset) * heads + head) * dim
                : (((long)page * heads + head) * Cache.PageSize + offset) * dim;
        }
        return Cache.Layout == KvLayout.Nhd
            ? (((long)row * Cache.MaxTokens + token) * heads + head) * dim
            : (((long)row * heads + head) * Cache.MaxTokens + token) * dim;
    }

    /// <summary>Checks shapes, types and options.</summary>
    /// <exception cref="ArgumentException">A field is out of range; the message names it and what was expected.</exception>
    public void Validate()
    {
        const string p = "spec";
        if (BatchSize < 0) throw new ArgumentException($"BatchSize is {BatchSize}; expected ≥ 0.", p);
        if (QueryLength is < 1 or > MaxQueryLength) throw new ArgumentException($"QueryLength is {QueryLength}; expected 1..{MaxQueryLength}.", p);
        if (NumKvHeads is < 1 or > PagedKvLayout.MaxKvHeads) throw new ArgumentException($"NumKvHeads is {NumKvHeads}; expected 1..{PagedKvLayout.MaxKvHeads}.", p);
        if (NumQueryHeads < NumKvHeads || NumQueryHeads % NumKvHeads != 0 || NumQueryHeads / NumKvHeads > MaxGroupSize)
            throw new ArgumentException($"NumQueryHeads is {NumQueryHeads} with NumKvHeads {NumKvHeads}; expected a multiple of NumKvHeads with ratio 1..{MaxGroupSize}.", p);
        CheckDim(HeadDim, "HeadDim");
        if (ValueHeadDim != 0) CheckDim(ValueHeadDim, "ValueHeadDim");
        if (KeyReuse && ValueHeadDim > HeadDim)
            throw new ArgumentException($"ValueHeadDim is {ValueHeadDim} with KeyReuse; expected 0 or at most HeadDim = {HeadDim} (values are the first columns of the keys).", p);
        if (InputType is not (AttentionElement.Float16 or AttentionElement.BFloat16))
            throw new ArgumentException($"InputType is {InputType}; expected Float16 or BFloat16.", p);
        if (!Enum.IsDefined(OutputType)) throw new ArgumentException($"OutputType is {OutputType}; expected Float16, BFloat16 or Float32.", p);
        if (!float.IsFinite(Scale)) throw new ArgumentException($"Scale is {Scale}; expected a finite value (0 for 1/√HeadDim).", p);
        if (!float.IsFinite(SoftCap) || SoftCap < 0) throw new ArgumentException($"SoftCap is {SoftCap}; expected 0 (off) or a finite value > 0.", p);
        if (Window < 0) throw new ArgumentException($"Window is {Window}; expected 0 (off) or ≥ 1.", p);
        if (Sinks < 0) throw new ArgumentException($"Sinks is {Sinks}; expected ≥ 0.", p);
        if (Sinks > 0 && Window == 0) throw new ArgumentException($"Sinks is {Sinks} without a window; sinks only apply with Window > 0.", p);
        if (Splits < 0) throw new ArgumentException($"Splits is {Splits}; expected 0 (heuristic) or ≥ 1.", p);
        if (Rope.Style is not (RopeStyle.None or RopeStyle.RotateHalf or RopeStyle.Interleaved))
            throw new ArgumentException($"Rope.Style is {Rope.Style}; expected None, RotateHalf or Interleaved.", p);
        if (Rope.Enabled)
        {
            if (!float.IsFinite(Rope.Theta) || Rope.Theta <= 1) throw new ArgumentException($"Rope.Theta is {Rope.Theta}; expected a finite value > 1.", p);
            if (Rope.RotaryDim < 0 || Rope.RotaryDim % 2 != 0 || Rope.RotaryDim > HeadDim)
                throw new ArgumentException($"Rope.RotaryDim is {Rope.RotaryDim}; expected 0 (all of HeadDim) or an even value ≤ HeadDim = {HeadDim}.", p);
        }
        else if (Rope.ExplicitPositions || Rope.RotaryDim != 0)
        {
            throw new ArgumentException("Rope.ExplicitPositions or Rope.RotaryDim is set but Rope.Style is None.", p);
        }

        var c = Cache;
        if (c.Layout is not (KvLayout.Nhd or KvLayout.Hnd)) throw new ArgumentException($"Cache.Layout is {c.Layout}; expected Nhd or Hnd.", p);
        if (c.PoolKvHeads != 0 && c.PoolKvHeads != NumKvHeads && !(Ragged && c.PoolKvHeads == 1))
            throw new ArgumentException($"Cache.PoolKvHeads is {c.PoolKvHeads}; expected 0 or NumKvHeads = {NumKvHeads} (or 1 in ragged mode).", p);
        if (c.Storage == KvStorage.Contiguous)
        {
            if (c.MaxTokens < 0) throw new ArgumentException($"Cache.MaxTokens is {c.MaxTokens}; expected ≥ 0.", p);
            if (c.NumPages != 0 || c.PageSize != 0 || c.MaxPagesPerSequence != 0)
                throw new ArgumentException("Contiguous storage has no pages; expected NumPages, PageSize and MaxPagesPerSequence 0.", p);
        }
        else if (c.Storage == KvStorage.Paged)
        {
            if (c.NumPages < 1) throw new ArgumentException($"Cache.NumPages is {c.NumPages}; expected ≥ 1.", p);
            if (c.PageSize is < 1 or > PagedKvLayout.MaxPageSize) throw new ArgumentException($"Cache.PageSize is {c.PageSize}; expected 1..{PagedKvLayout.MaxPageSize}.", p);
            if (c.MaxPagesPerSequence < 1) throw new ArgumentException($"Cache.MaxPagesPerSequence is {c.MaxPagesPerSequence}; expected ≥ 1.", p);
            if (c.MaxTokens != (long)c.MaxPagesPerSequence * c.PageSize)
                throw new ArgumentException($"Cache.MaxTokens is {c.MaxTokens}; expected MaxPagesPerSequence · PageSize = {(long)c.MaxPagesPerSequence * c.PageSize}.", p);
            if ((long)c.NumPages * c.PageSize > int.MaxValue) throw new ArgumentException("The pool has more than 2^31 − 1 slots.", p);
        }
        else
        {
            throw new ArgumentException($"Cache.Storage is {c.Storage}; expected Contiguous or Paged.", p);
        }

        static void CheckDim(int dim, string name)
        {
            if (dim is < 8 or > MaxHeadDim || dim % 8 != 0)
                throw new ArgumentException($"{name} is {dim}; expected a multiple of 8 in 8..{MaxHeadDim}.", p);
        }
    }

    /// <summary>
    /// Checks <see cref="Validate"/>, that <typeparamref name="TIn"/> and <typeparamref name="TOut"/> match
    /// <see cref="InputType"/> and <see cref="OutputType"/>, and every buffer length (in elements). Optional buffers
    /// are empty when not used: values with key reuse, LSE when not wanted, block table for contiguous storage,
    /// positions without explicit positions, slopes without ALiBi.
    /// </summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void ValidateBuffers<TIn, TOut>(long query, long keys, long values, long lengths, long blockTable, long output, long lse,
        long positions, long alibiSlopes) where TIn : unmanaged where TOut : unmanaged
    {
        Validate();
        CheckType<TIn>(InputType, "query");
        CheckType<TOut>(OutputType, "output");
        Exactly(query, QueryElements, nameof(query));
        Exactly(keys, KeyElements, nameof(keys));
        if (KeyReuse)
        {
            if (values != 0) throw new ArgumentException($"values has {values} elements; expected none with KeyReuse (keys serve as values).", nameof(values));
        }
        else
        {
            Exactly(values, ValueElements, nameof(values));
        }
        Exactly(lengths, Rows, nameof(lengths));
        Exactly(blockTable, BlockTableElements, nameof(blockTable));
        Exactly(output, OutputElements, nameof(output));
        if (lse != 0) Exactly(lse, LseElements, nameof(lse));
        Exactly(positions, PositionElements, nameof(positions));
        Exactly(alibiSlopes, Alibi ? NumQueryHeads : 0, nameof(alibiSlopes));
    }

    /// <summary>
    /// Checks the index metadata on the host: every length in [0, MaxTokens] and, for paged storage, every page a row
    /// uses in [0, NumPages). Entries past a row's last page are not read. Returns the longest row.
    /// </summary>
    /// <exception cref="ArgumentException">Names the offending parameter and entry.</exception>
    public int ValidateIndices(ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable)
    {
        // Lengths first, under this method's parameter name (the paging check below would call them sequenceLengths).
        int longest = 0;
        for (int r = 0; r < lengths.Length; r++)
        {
            if ((uint)lengths[r] > (uint)Cache.MaxTokens)
                throw new ArgumentException($"lengths[{r}] is {lengths[r]}; expected 0..MaxTokens = {Cache.MaxTokens}.", nameof(lengths));
            longest = Math.Max(longest, lengths[r]);
        }
        if (Cache.IsPaged)
            return new PagedBatchSpec(KeyPool, Rows, Cache.MaxPagesPerSequence, Cache.MaxTokens).ValidateBatch(blockTable, lengths, pagesWritten: false);
        return longest;
    }

    /// <summary>The <see cref="AttentionElement"/> of <typeparamref name="T"/>, or null for an unsupported type.</summary>
    public static AttentionElement? ElementOf<T>() where T : unmanaged =>
        typeof(T) == typeof(Half) ? AttentionElement.Float16
        : typeof(T) == typeof(BFloat16) ? AttentionElement.BFloat16
        : typeof(T) == typeof(float) ? AttentionElement.Float32
        : null;

    private static void CheckType<T>(AttentionElement expected, string paramName) where T : unmanaged
    {
        if (ElementOf<T>() != expected)
            throw new ArgumentException($"{paramName} has element type {typeof(T).Name}; the spec says {expected}.", paramName);
    }

    private static void Exactly(long actual, long expected, string paramName)
    {
        if (actual != expected) throw new ArgumentException($"{paramName} has {actual} elements; expected {expected}.", paramName);
    }
}
