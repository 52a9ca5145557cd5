using KvKernels.Attention;
using KvKernels.Paging;

namespace KvKernels.Mla;

/// <summary>
/// The dimensions of a model's multi-head latent attention (DeepSeek-V2/V3: 128 heads, latent 512, RoPE 64, nope 128,
/// value 128). A cached token is one row of <see cref="RowDim"/> = LatentDim + RopeDim elements: the normalised
/// latent c_KV followed by the rotated RoPE key k_pe, shared by all heads.
/// </summary>
/// <param name="NumHeads">Query heads H on this device (the tensor-parallel share of the model's heads), 1–128.</param>
/// <param name="LatentDim">d_c, the KV LoRA rank: a multiple of 32 in 32–512.</param>
/// <param name="RopeDim">d_R, the decoupled RoPE key dim: a multiple of 16 in 16–64.</param>
/// <param name="NopeDim">Query/key dims without RoPE per head: a multiple of 8 in 8–256.</param>
/// <param name="ValueDim">Value dims per head: a multiple of 8 in 8–256.</param>
public readonly record struct MlaShape(int NumHeads, int LatentDim = 512, int RopeDim = 64, int NopeDim = 128, int ValueDim = 128)
{
    /// <summary>Most query heads per call.</summary>
    public const int MaxHeads = 128;

    /// <summary>DeepSeek-V2/V3's MLA with <paramref name="heads"/> query heads (128 without tensor parallelism).</summary>
    public static MlaShape DeepSeek(int heads = 128) => new(heads);

    /// <summary>Elements of a cached row: LatentDim + RopeDim (576 for DeepSeek).</summary>
    public int RowDim => LatentDim + RopeDim;

    /// <summary>Query head dim of the model before absorption: NopeDim + RopeDim (192 for DeepSeek).</summary>
    public int QueryHeadDim => NopeDim + RopeDim;

    /// <summary>The default softmax scale, <c>1/√(NopeDim + RopeDim)</c> (before any YaRN factor).</summary>
    public float DefaultScale => 1f / MathF.Sqrt(QueryHeadDim);

    /// <summary>Elements of the up-projection <c>wkv_b</c> as <c>[H, NopeDim + ValueDim, LatentDim]</c>: per head, W_UK
    /// (rows 0 … NopeDim − 1) then W_UV (the next ValueDim rows), each row LatentDim wide — DeepSeek's layout.</summary>
    public long WeightElements => (long)NumHeads * (NopeDim + ValueDim) * LatentDim;

    /// <summary>Checks the dimensions.</summary>
    /// <exception cref="ArgumentException">A dimension is out of range; the message names it.</exception>
    public void Validate(string paramName)
    {
        if (NumHeads is < 1 or > MaxHeads) throw new ArgumentException($"NumHeads is {NumHeads}; expected 1..{MaxHeads}.", paramName);
        if (LatentDim is < 32 or > 512 || LatentDim % 32 != 0)
            throw new ArgumentException($"LatentDim is {LatentDim}; expected a multiple of 32 in 32..512.", paramName);
        if (RopeDim is < 16 or > 64 || RopeDim % 16 != 0)
            throw new ArgumentException($"RopeDim is {RopeDim}; expected a multiple of 16 in 16..64.", paramName);
        if (NopeDim is < 8 or > 256 || NopeDim % 8 != 0)
            throw new ArgumentException($"NopeDim is {NopeDim}; expected a multiple of 8 in 8..256.", paramName);
        if (ValueDim is < 8 or > 256 || ValueDim % 8 != 0)
            throw new ArgumentException($"ValueDim is {ValueDim}; expected a multiple of 8 in 8..256.", paramName);
    }
}

/// <summary>
/// YaRN context extension as DeepSeek-V2/V3 apply it (<c>precompute_freqs_cis</c> in their <c>model.py</c>): inverse
/// frequencies whose wavelength exceeds the original context are divided by <see cref="Factor"/>, with a linear ramp
/// between the correction dims of <see cref="BetaFast"/> and <see cref="BetaSlow"/> rotations; the softmax scale is
/// multiplied by <see cref="AttentionFactor"/>.
/// </summary>
/// <param name="Factor">Context extension factor s (40 for DeepSeek-V3), ≥ 1.</param>
/// <param name="OriginalMaxPositions">The pre-training context (4096 for DeepSeek-V3), ≥ 1.</param>
/// <param name="BetaFast">Rotations where the ramp starts (32).</param>
/// <param name="BetaSlow">Rotations where it ends (1).</param>
/// <param name="MScale">The <c>mscale</c> of the config (1): attention factor <c>(0.1·MScale·ln s + 1)²</c>.</param>
public readonly record struct YarnScaling(float Factor, int OriginalMaxPositions, float BetaFast = 32f, float BetaSlow = 1f, float MScale = 1f)
{
    /// <summary>DeepSeek-V3's YaRN (factor 40 over 4096 positions).</summary>
    public static YarnScaling DeepSeekV3 => new(40f, 4096);

    /// <summary>The factor on the softmax scale, <c>mscale²</c> with <c>mscale = 0.1·MScale·ln(Factor) + 1</c> (1 when
    /// Factor ≤ 1). DeepSeek applies it when the serving context exceeds the original one.</summary>
    public float AttentionFactor
    {
        get
        {
            double m = Factor <= 1 ? 1 : 0.1 * MScale * Math.Log(Factor) + 1;
            return (float)(m * m);
        }
    }
}

/// <summary>
/// RoPE of the cached key part k_pe at each token's position: pairs by <see cref="Style"/> (DeepSeek's reference
/// pairs 2i with 2i + 1; Hugging Face ports rotate halves), fp32 angle <c>(float)position · invFreq[i]</c> and
/// <c>(x, y) → (x·cos − y·sin, x·sin + y·cos)</c> in fp32, rounded once to the cache type.
/// </summary>
/// <param name="Style">Interleaved (DeepSeek) or rotate-half; None stores k_pe as given (already rotated).</param>
/// <param name="Theta">Frequency base θ (10000 for DeepSeek).</param>
/// <param name="Yarn">YaRN scaling of the frequencies, or null.</param>
public readonly record struct MlaRope(RopeStyle Style = RopeStyle.Interleaved, float Theta = 10000f, YarnScaling? Yarn = null)
{
    /// <summary>Checks the options.</summary>
    /// <exception cref="ArgumentException">Names the option.</exception>
    public void Validate(string paramName)
    {
        if (Style is not (RopeStyle.None or RopeStyle.RotateHalf or RopeStyle.Interleaved))
            throw new ArgumentException($"Rope.Style is {Style}; expected None, RotateHalf or Interleaved.", paramName);
        if (!float.IsFinite(Theta) || Theta <= 1) throw new ArgumentException($"Rope.Theta is {Theta}; expected a finite value > 1.", paramName);
        if (Yarn is { } y)
        {
            if (!float.IsFinite(y.Factor) || y.Factor < 1) throw new ArgumentException($"Rope.Yarn.Factor is {y.Factor}; expected a finite value ≥ 1.", paramName);
            if (y.OriginalMaxPositions < 1) throw new ArgumentException($"Rope.Yarn.OriginalMaxPositions is {y.OriginalMaxPositions}; expected ≥ 1.", paramName);
            if (!float.IsFinite(y.BetaFast) || !float.IsFinite(y.BetaSlow) || y.BetaFast <= 0 || y.BetaSlow <= 0)
                throw new ArgumentException($"Rope.Yarn betas are {y.BetaFast}, {y.BetaSlow}; expected finite values > 0.", paramName);
            if (!float.IsFinite(y.MScale)) throw new ArgumentException($"Rope.Yarn.MScale is {y.MScale}; expected a finite value.", paramName);
        }
    }

    /// <summary>
    /// The fp32 inverse frequencies of the <paramref name="ropeDim"/> / 2 pairs, computed in double and rounded once:
    /// <c>θ^(−2i/d)</c>, and with YaRN <c>f/s·(1 − smooth) + f·smooth</c> where <c>smooth = 1 − clamp((i − low) / (high −
    /// low), 0, 1)</c> and low/high are DeepSeek's <c>find_correction_range(BetaFast, BetaSlow, d, θ, original)</c>.
    /// </summary>
    public float[] InverseFrequencies(int ropeDim)
    {
        int pairs = ropeDim / 2;
        var result = new float[pairs];
        double low = 0, high = 0;
        if (Yarn is { } y)
        {
            low = Math.Max(Math.Floor(CorrectionDim(y.BetaFast, ropeDim, Theta, y.OriginalMaxPositions)), 0);
            high = Math.Min(Math.Ceiling(CorrectionDim(y.BetaSlow, ropeDim, Theta, y.OriginalMaxPositions)), ropeDim - 1);
            if (low == high) high += 0.001;
        }
        for (int i = 0; i < pairs; i++)
        {
            double f = Math.Pow(Theta, -2.0 * i / ropeDim);
            if (Yarn is { } yarn)
            {
                double smooth = 1 - Math.Clamp((i - low) / (high - low), 0, 1);
                f = f / yarn.Factor * (1 - smooth) + f * smooth;
            }
            result[i] = (float)f;
        }
        return result;

        static double CorrectionDim(double rotations, int dim, double theta, int maxPositions) =>
            dim * Math.Log(maxPositions / (rotations * 2 * Math.PI)) / (2 * Math.Log(theta));
    }
}

/// <summary>
/// The latent cache write: for token t of <see cref="NumTokens"/>, <c>row = [RMSNorm(c_kv[t]) ; RoPE(k_pe[t], positions[t])]</c>
/// is stored at slot <c>slots[t]</c> of a paged pool of one head of <see cref="MlaShape.RowDim"/> elements (slot −1
/// skips the token). RMSNorm (when <see cref="Normalize"/>): <c>y_i = x_i · w_i / √(mean(x²) + Epsilon)</c> in fp32,
/// rounded once. Inputs <c>latent [T, LatentDim]</c> and <c>ropeKey [T, RopeDim]</c> in <see cref="ElementType"/>
/// with row strides <see cref="LatentStride"/> and <see cref="RopeStride"/> (so both may be column slices of one
/// fused <c>[T, LatentDim + RopeDim]</c> projection output); positions <c>[T]</c> int32 (read only with RoPE); the
/// norm weight <c>[LatentDim]</c> in the element type.
/// </summary>
/// <param name="NumTokens">Tokens T (≥ 0).</param>
/// <param name="Shape">MLA dims (NumHeads is not used).</param>
/// <param name="Pool">The latent pool: 1 KV head of <see cref="MlaShape.RowDim"/> elements, any page size 1–256.</param>
public readonly record struct MlaCacheWriteSpec(int NumTokens, MlaShape Shape, PagedKvLayout Pool)
{
    /// <summary>Type of the inputs, the weight and the pool: fp16 or bf16.</summary>
    public AttentionElement ElementType { get; init; }

    /// <summary>RoPE of k_pe (DeepSeek's interleaved pairs, θ = 10000, by default).</summary>
    public MlaRope Rope { get; init; } = new(RopeStyle.Interleaved);

    /// <summary>Apply RMSNorm with a weight to the latent (DeepSeek's kv_norm); false stores it as given.</summary>
    public bool Normalize { get; init; } = true;

    /// <summary>RMSNorm ε (1e-6 for DeepSeek).</summary>
    public float Epsilon { get; init; } = 1e-6f;

    /// <summary>Elements between consecutive tokens' latents; 0 means LatentDim (dense).</summary>
    public int LatentStride { get; init; }

    /// <summary>Elements between consecutive tokens' RoPE keys; 0 means RopeDim (dense).</summary>
    public int RopeStride { get; init; }

    /// <summary>The latent row stride actually used.</summary>
    public int EffectiveLatentStride => LatentStride == 0 ? Shape.LatentDim : LatentStride;

    /// <summary>The RoPE key row stride actually used.</summary>
    public int EffectiveRopeStride => RopeStride == 0 ? Shape.RopeDim : RopeStride;

    /// <summary>Elements the latent input must hold: <c>(T − 1) · stride + LatentDim</c> (0 for no tokens).</summary>
    public long LatentElements => NumTokens == 0 ? 0 : (long)(NumTokens - 1) * EffectiveLatentStride + Shape.LatentDim;

    /// <summary>Elements the RoPE key input must hold.</summary>
    public long RopeElements => NumTokens == 0 ? 0 : (long)(NumTokens - 1) * EffectiveRopeStride + Shape.RopeDim;

    /// <summary>The pool a latent cache of <paramref name="numPages"/> pages of <paramref name="pageSize"/> tokens has
    /// for <paramref name="shape"/> (page 64 is FlashMLA's).</summary>
    public static PagedKvLayout LatentPool(MlaShape shape, int numPages, int pageSize = 64) => new(numPages, pageSize, 1, shape.RowDim, KvLayout.Nhd);

    /// <summary>Checks shapes and options.</summary>
    /// <exception cref="ArgumentException">Names the field and what was expected.</exception>
    public void Validate()
    {
        const string p = "spec";
        if (NumTokens < 0) throw new ArgumentException($"NumTokens is {NumTokens}; expected ≥ 0.", p);
        Shape.Validate(p);
        Rope.Validate(p);
        if (ElementType is not (AttentionElement.Float16 or AttentionElement.BFloat16))
            throw new ArgumentException($"ElementType is {ElementType}; expected Float16 or BFloat16.", p);
        if (Normalize && (!float.IsFinite(Epsilon) || Epsilon <= 0)) throw new ArgumentException($"Epsilon is {Epsilon}; expected a finite value > 0.", p);
        if (LatentStride != 0 && LatentStride < Shape.LatentDim)
            throw new ArgumentException($"LatentStride is {LatentStride}; expected 0 or ≥ LatentDim = {Shape.LatentDim}.", p);
        if (RopeStride != 0 && RopeStride < Shape.RopeDim)
            throw new ArgumentException($"RopeStride is {RopeStride}; expected 0 or ≥ RopeDim = {Shape.RopeDim}.", p);
        Pool.Validate<Half>(p);
        if (Pool.NumKvHeads != 1 || Pool.HeadDim != Shape.RowDim)
            throw new ArgumentException($"Pool has {Pool.NumKvHeads} heads of {Pool.HeadDim}; a latent pool has 1 head of RowDim = LatentDim + RopeDim = {Shape.RowDim}.", p);
    }

    /// <summary>Checks <see cref="Validate"/>, the element type and every buffer length (in elements). The weight is
    /// empty without <see cref="Normalize"/>; positions are empty when <see cref="MlaRope.Style"/> is None.</summary>
    /// <exception cref="ArgumentException">Names the offending parameter and what was expected.</exception>
    public void ValidateBuffers<T>(long latent, long ropeKey, long positions, long slots, long normWeight, long cache) where T : unmanaged
    {
        Validate();
        if (DecodeAttentionSpec.ElementOf<T>() != ElementType)
            throw new ArgumentException($"The buffers have element type {typeof(T).Name}; the spec says {ElementType}.", nameof(latent));
        AtLeast(latent, LatentElements, nameof(latent));
        AtLeast(ropeKey, RopeElements, nameof(ropeKey));
        Exactly(positions, Rope.Style == RopeStyle.None ? 0 : NumTokens, nameof(positions));
        Exactly(slots, NumTokens, nameof(slots));
        Exactly(normWeight, Normalize ? Shape.LatentDim : 0, nameof(normWeight));
        Exactly(cache, Pool.PoolElements, nameof(cache));
    }

    internal static void Exactly(long actual, long expected, string paramName)
    {
        if (actual != expected) throw new ArgumentException($"{paramName} has {actual} elements; expected {expected}.", paramName);
    }

    internal static void AtLeast(long actual, long expected, string paramName)
    {
        if (actual < expected) throw new ArgumentException($"{paramName} has {actual} elements; expected at least {expected}.", paramName);
    }
}

/// <summary>
/// Latent decode attention and the whole MLA decode step. Latent attention (<see cref="ToDecodeAttention"/>): per
/// query head h, <c>q = [q_latent ; q_pe]</c> (RowDim), keys the cached rows, values their first LatentDim columns,
/// one KV head shared by all H heads: decode attention with Hkv = 1, Dk = RowDim, Dv = LatentDim and key reuse, so
/// every option of <see cref="DecodeAttentionSpec"/> (causality over q_len, split-KV, LSE) has its meaning there.
/// The whole step (<c>Decode</c>): <c>q_latent[h] = q_nope[h] · W_UK[h]</c> rounded to the input type, latent
/// attention with its output o_lat in the input type, then <c>out[h] = o_lat[h] · W_UV[h]ᵀ</c> in the output type.
/// <para>Tensors (row-major): q_nope <c>[B, q_len, H, NopeDim]</c>; q_pe <c>[B, q_len, H, RopeDim]</c> already rotated at
/// the query's position; weights <c>[H, NopeDim + ValueDim, LatentDim]</c> (<see cref="MlaShape.WeightElements"/>);
/// packed query <c>[B, q_len, H, RowDim]</c>; latent output <c>[B, q_len, H, LatentDim]</c>; output <c>[B, q_len, H,
/// ValueDim]</c>; LSE <c>[B, q_len, H]</c> fp32 natural log; cache as <see cref="Cache"/> with one head of RowDim
/// (paged: <see cref="MlaCacheWriteSpec.LatentPool"/>; contiguous: <c>[B, MaxTokens, 1, RowDim]</c>).</para>
/// </summary>
/// <param name="BatchSize">Sequences B (≥ 0).</param>
/// <param name="QueryLength">Query tokens per sequence, 1–16 (1–4 in DeepSeek's speculative decoding).</param>
/// <param name="Shape">MLA dims.</param>
/// <param name="Cache">Latent storage: one KV head (PoolKvHeads 0 or 1) of RowDim per token.</param>
public readonly record struct MlaAttentionSpec(int BatchSize, int QueryLength, MlaShape Shape, KvCacheShape Cache)
{
    /// <summary>Type of queries, cache, weights and the latent intermediates: fp16 or bf16.</summary>
    public AttentionElement InputType { get; init; }

    /// <summary>Type of the output: the latent output of latent attention, the <c>[.., ValueDim]</c> output of the
    /// whole step; fp16, bf16 or fp32.</summary>
    public AttentionElement OutputType { get; init; }

    /// <summary>Softmax scale; 0 means <c>1/√(NopeDim + RopeDim)</c>. With YaRN multiply by
    /// <see cref="YarnScaling.AttentionFactor"/>.</summary>
    public float Scale { get; init; }

    /// <summary>GPU split-KV chunks per sequence: 0 chooses; ≥ 1 forces (see <see cref="DecodeAttentionSpec.Splits"/>).</summary>
    public int Splits { get; init; }

    /// <summary>The scale applied.</summary>
    public float EffectiveScale => Scale == 0 ? Shape.DefaultScale : Scale;

    /// <summary>Query rows M = B · q_len of the absorption GEMMs.</summary>
    public long TokenRows => (long)BatchSize * QueryLength;

    /// <summary>Elements of q_nope.</summary>
    public long NopeQueryElements => TokenRows * Shape.NumHeads * Shape.NopeDim;

    /// <summary>Elements of q_pe.</summary>
    public long RopeQueryElements => TokenRows * Shape.NumHeads * Shape.RopeDim;

    /// <summary>Elements of the packed query <c>[B, q_len, H, RowDim]</c>.</summary>
    public long QueryElements => TokenRows * Shape.NumHeads * Shape.RowDim;

    /// <summary>Elements of the latent output <c>[B, q_len, H, LatentDim]</c>.</summary>
    public long LatentOutputElements => TokenRows * Shape.NumHeads * Shape.LatentDim;

    /// <summary>Elements of the whole step's output <c>[B, q_len, H, ValueDim]</c>.</summary>
    public long OutputElements => TokenRows * Shape.NumHeads * Shape.ValueDim;

    /// <summary>The latent attention as a decode-attention call: Hq = H, Hkv = 1, Dk = RowDim, Dv = LatentDim, key reuse.
    /// <paramref name="outputType"/> overrides <see cref="OutputType"/> (the whole step's latent output is InputType).</summary>
    public DecodeAttentionSpec ToDecodeAttention(AttentionElement? outputType = null) =>
        new(BatchSize, QueryLength, Shape.NumHeads, 1, Shape.RowDim, Cache)
        {
            ValueHeadDim = Shape.LatentDim,
            KeyReuse = true,
            InputType = InputType,
            OutputType = outputType ?? OutputType,
            Scale = EffectiveScale,
            Splits = Splits,
        };

    /// <summary>Checks shapes, types and the storage.</summary>
    /// <exception cref="ArgumentException">Names the field and what was expected.</exception>
    public void Validate()
    {
        const string p = "spec";
        Shape.Validate(p);
        if (Cache.PoolKvHeads is not (0 or 1))
            throw new ArgumentException($"Cache.PoolKvHeads is {Cache.PoolKvHeads}; a latent cache has one head (0 or 1).", p);
        ToDecodeAttention().Validate();
    }

    /// <summary>Checks the buffers of latent attention (<see cref="ToDecodeAttention"/>'s buffers: packed query, cache,
    /// lengths, block table, latent output, LSE).</summary>
    public void ValidateAttentionBuffers<TIn, TOut>(long query, long cache, long lengths, long blockTable, long output, long lse)
        where TIn : unmanaged where TOut : unmanaged
    {
        Validate();
        ToDecodeAttention().ValidateBuffers<TIn, TOut>(query, cache, 0, lengths, blockTable, output, lse, 0, 0);
    }

    /// <summary>Checks the buffers of the whole step: q_nope, q_pe, weights, cache, lengths, block table, output, LSE.</summary>
    public void ValidateDecodeBuffers<TIn, TOut>(long queryNope, long queryRope, long weights, long cache, long lengths, long blockTable,
        long output, long lse) where TIn : unmanaged where TOut : unmanaged
    {
        Validate();
        var attention = ToDecodeAttention(InputType);
        if (DecodeAttentionSpec.ElementOf<TIn>() != InputType)
            throw new ArgumentException($"queryNope has element type {typeof(TIn).Name}; the spec says {InputType}.", nameof(queryNope));
        if (DecodeAttentionSpec.ElementOf<TOut>() != OutputType)
            throw new ArgumentException($"output has element type {typeof(TOut).Name}; the spec says {OutputType}.", nameof(output));
        MlaCacheWriteSpec.Exactly(queryNope, NopeQueryElements, nameof(queryNope));
        MlaCacheWriteSpec.Exactly(queryRope, RopeQueryElements, nameof(queryRope));
        MlaCacheWriteSpec.Exactly(weights, Shape.WeightElements, nameof(weights));
        MlaCacheWriteSpec.Exactly(cache, attention.KeyElements, nameof(cache));
        MlaCacheWriteSpec.Exactly(lengths, attention.Rows, nameof(lengths));
        MlaCacheWriteSpec.Exactly(blockTable, attention.BlockTableElements, nameof(blockTable));
        MlaCacheWriteSpec.Exactly(output, OutputElements, nameof(output));
        if (lse != 0) MlaCacheWriteSpec.Exactly(lse, attention.LseElements, nameof(lse));
    }

    /// <summary>Checks the buffers of the query absorption: q_nope, q_pe, weights, packed query (all InputType).</summary>
    public void ValidateAbsorbBuffers<T>(long queryNope, long queryRope, long weights, long query) where T : unmanaged
    {
        Validate();
        if (DecodeAttentionSpec.ElementOf<T>() != InputType)
            throw new ArgumentException($"The buffers have element type {typeof(T).Name}; the spec says {InputType}.", nameof(queryNope));
        MlaCacheWriteSpec.Exactly(queryNope, NopeQueryElements, nameof(queryNope));
        MlaCacheWriteSpec.Exactly(queryRope, RopeQueryElements, nameof(queryRope));
        MlaCacheWriteSpec.Exactly(weights, Shape.WeightElements, nameof(weights));
        MlaCacheWriteSpec.Exactly(query, QueryElements, nameof(query));
    }

    /// <summary>Checks the buffers of the output un-absorption: latent output and weights (InputType), output (OutputType).</summary>
    public void ValidateUnabsorbBuffers<TIn, TOut>(long latentOutput, long weights, long output) where TIn : unmanaged where TOut : unmanaged
    {
        Validate();
        if (DecodeAttentionSpec.ElementOf<TIn>() != InputType)
            throw new ArgumentException($"latentOutput has element type {typeof(TIn).Name}; the spec says {InputType}.", nameof(latentOutput));
        if (DecodeAttentionSpec.ElementOf<TOut>() != OutputType)
            throw new ArgumentException($"output has element type {typeof(TOut).Name}; the spec says {OutputType}.", nameof(output));
        MlaCacheWriteSpec.Exactly(latentOutput, LatentOutputElements, nameof(latentOutput));
        MlaCacheWriteSpec.Exactly(weights, Shape.WeightElements, nameof(weights));
        MlaCacheWriteSpec.Exactly(output, OutputElements, nameof(output));
    }
}
