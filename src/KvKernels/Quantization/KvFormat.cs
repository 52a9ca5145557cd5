namespace KvKernels.Quantization;

/// <summary>How the elements of a K or V tensor are coded.</summary>
public enum KvCodec
{
    /// <summary>Not quantized: the cache's fp16/bf16 elements.</summary>
    None,

    /// <summary>fp8 e4m3 (max 448, no infinities) times a scale.</summary>
    Fp8E4M3,

    /// <summary>fp8 e5m2 (max 57344) times a scale.</summary>
    Fp8E5M2,

    /// <summary>Symmetric int8: <c>q = clamp(rint(x / s), −127, 127)</c>, <c>x̂ = q · s</c>.</summary>
    Int8,

    /// <summary>Asymmetric unsigned codes of <see cref="KvFormat.Bits"/> (8, 4 or 2) with a scale and a minimum per group
    /// (KIVI): <c>q = clamp(rint((x − mn) / s), 0, 2^B − 1)</c>, <c>x̂ = fma(q, s, mn)</c>.</summary>
    Asymmetric,
}

/// <summary>Which elements share the scale of an fp8 or symmetric int8 tensor.</summary>
public enum KvScaleGranularity
{
    /// <summary>One scale for the whole tensor (vLLM's default, TensorRT-LLM's per-layer scale), given by the engine.</summary>
    PerTensor,

    /// <summary>One scale per KV head (vLLM with FlashAttention and llm-compressor calibration), given by the engine.</summary>
    PerKvHead,

    /// <summary>One fp32 scale per (token, KV head), computed on append from the row's absolute maximum and stored beside
    /// the codes: <c>s = amax / qmax</c> (qmax 448, 57344 or 127).</summary>
    PerToken,
}

/// <summary>How an fp8 code is computed from x and the scale s. Both dequantize as <c>x̂ = fp8 · s</c>; they are not
/// bit-identical, and engines differ.</summary>
public enum Fp8ScaleConvention
{
    /// <summary>vLLM: <c>q = fp8(x / s)</c> (an IEEE division per element).</summary>
    Divide,

    /// <summary>TensorRT-LLM: <c>q = fp8(x · r)</c> with <c>r = 1 / s</c> computed once in fp32.</summary>
    MultiplyReciprocal,
}

/// <summary>Along which axis an asymmetric group runs.</summary>
public enum KvGroupAxis
{
    /// <summary>Groups of G consecutive channels of one token ("per-token": KIVI's values).</summary>
    Channels,

    /// <summary>Groups of G consecutive tokens of one channel ("per-channel": KIVI's keys). Tokens are quantized a whole
    /// group at a time (KIVI's flush of the residual), and a page holds whole groups.</summary>
    Tokens,
}

/// <summary>
/// The storage format of one K or V tensor of a cache. Formats are exact functions (fp32 math, round-half-to-even,
/// fp8 satfinite), shared by the GPU kernels and their CPU twins:
/// <list type="bullet">
/// <item><b>fp8</b> (<see cref="KvCodec.Fp8E4M3"/>, <see cref="KvCodec.Fp8E5M2"/>): <c>q = fp8_rn_satfinite(x / s)</c> or
/// <c>fp8(x · (1/s))</c> (<see cref="Convention"/>); <c>x̂ = float(q) · s</c>. A per-token scale is <c>amax / max_fp8</c>.</item>
/// <item><b>int8</b> (<see cref="KvCodec.Int8"/>): <c>q = clamp(rint(x / s), −127, 127)</c>, <c>x̂ = q · s</c>; a per-token scale
/// is <c>amax / 127</c>.</item>
/// <item><b>asymmetric</b> (<see cref="KvCodec.Asymmetric"/>, KIVI): per group of <see cref="GroupSize"/> elements along
/// <see cref="Axis"/>, <c>mn, mx</c> = min and max (fp32), <c>s = (mx − mn) / (2^B − 1)</c>; <c>s</c> and <c>mn</c> are stored
/// in the cache's element type (fp16/bf16, as KIVI stores them) and the codes use the stored values:
/// <c>q = clamp(rint((x − mn′) / s′), 0, 2^B − 1)</c> (q = 0 when s′ = 0), <c>x̂ = fma(q, s′, mn′)</c>.
/// Codes are packed low bits first into little-endian 32-bit words: along the channels of a token row
/// (<see cref="KvGroupAxis.Channels"/>) or along the G tokens of a channel (<see cref="KvGroupAxis.Tokens"/>).</item>
/// </list>
/// A scale of 0 (an all-zero row, a constant group) codes every element as 0 and decodes to 0 (symmetric) or to the
/// group's minimum exactly (asymmetric). Dequantized values are rounded once to the cache's element type.
/// </summary>
/// <param name="Codec">The code.</param>
/// <param name="Bits">Bits per code: 16 for <see cref="KvCodec.None"/>, 8 for fp8 and int8, 8, 4 or 2 for asymmetric.</param>
/// <param name="Granularity">fp8 and int8: which elements share a scale.</param>
/// <param name="Axis">Asymmetric: the axis of the groups.</param>
/// <param name="GroupSize">Asymmetric: elements per group, 16–256 and a power of two (KIVI: 32). With
/// <see cref="KvGroupAxis.Channels"/> it must divide the head dim (0 means the whole head dim); with
/// <see cref="KvGroupAxis.Tokens"/> it must divide the page size.</param>
/// <param name="Convention">fp8: how the code is computed from the scale.</param>
public readonly record struct KvFormat(KvCodec Codec, int Bits, KvScaleGranularity Granularity = KvScaleGranularity.PerToken,
    KvGroupAxis Axis = KvGroupAxis.Channels, int GroupSize = 0, Fp8ScaleConvention Convention = Fp8ScaleConvention.Divide)
{
    /// <summary>KIVI's group size.</summary>
    public const int KiviGroupSize = 32;

    /// <summary>The cache's own fp16/bf16 elements.</summary>
    public static KvFormat Unquantized => new(KvCodec.None, 16);

    /// <summary>fp8 e4m3 with the given scale granularity and convention.</summary>
    public static KvFormat Fp8E4M3(KvScaleGranularity granularity = KvScaleGranularity.PerToken,
        Fp8ScaleConvention convention = Fp8ScaleConvention.Divide) => new(KvCodec.Fp8E4M3, 8, granularity, Convention: convention);

    /// <summary>fp8 e5m2 with the given scale granularity and convention.</summary>
    public static KvFormat Fp8E5M2(KvScaleGranularity granularity = KvScaleGranularity.PerToken,
        Fp8ScaleConvention convention = Fp8ScaleConvention.Divide) => new(KvCodec.Fp8E5M2, 8, granularity, Convention: convention);

    /// <summary>Symmetric int8 with a scale per (token, KV head) by default.</summary>
    public static KvFormat Int8(KvScaleGranularity granularity = KvScaleGranularity.PerToken) => new(KvCodec.Int8, 8, granularity);

    /// <summary>Asymmetric int8 with one scale and minimum per (token, KV head) (<paramref name="groupSize"/> 0) or per
    /// group of channels.</summary>
    public static KvFormat Int8Asymmetric(int groupSize = 0) => new(KvCodec.Asymmetric, 8, Axis: KvGroupAxis.Channels, GroupSize: groupSize);

    /// <summary>KIVI keys: <paramref name="bits"/> (4 or 2) per channel over groups of <paramref name="groupSize"/> tokens.</summary>
    public static KvFormat KiviKeys(int bits, int groupSize = KiviGroupSize) => new(KvCodec.Asymmetric, bits, Axis: KvGroupAxis.Tokens, GroupSize: groupSize);

    /// <summary>KIVI values: <paramref name="bits"/> (4 or 2) per token over groups of <paramref name="groupSize"/> channels.</summary>
    public static KvFormat KiviValues(int bits, int groupSize = KiviGroupSize) => new(KvCodec.Asymmetric, bits, Axis: KvGroupAxis.Channels, GroupSize: groupSize);

    /// <summary>Whether the tensor is quantized.</summary>
    public bool IsQuantized => Codec != KvCodec.None;

    /// <summary>Whether the codes are fp8.</summary>
    public bool IsFp8 => Codec is KvCodec.Fp8E4M3 or KvCodec.Fp8E5M2;

    /// <summary>Whether one fp32 scale per (token, KV head) is stored beside the codes (fp8 and int8 per token).</summary>
    public bool HasTokenScales => Codec is KvCodec.Fp8E4M3 or KvCodec.Fp8E5M2 or KvCodec.Int8 && Granularity == KvScaleGranularity.PerToken;

    /// <summary>Whether the engine supplies the scales (fp8 and int8 per tensor or per KV head).</summary>
    public bool HasGivenScales => Codec is KvCodec.Fp8E4M3 or KvCodec.Fp8E5M2 or KvCodec.Int8 && Granularity != KvScaleGranularity.PerToken;

    /// <summary>Whether (scale, minimum) pairs in the element type are stored beside the codes (asymmetric).</summary>
    public bool HasGroupParams => Codec == KvCodec.Asymmetric;

    /// <summary>Largest code magnitude: 448, 57344, 127, or 2^B − 1 for asymmetric codes.</summary>
    public float CodeMax => Codec switch
    {
        KvCodec.Fp8E4M3 => 448f,
        KvCodec.Fp8E5M2 => 57344f,
        KvCodec.Int8 => 127f,
        KvCodec.Asymmetric => (1 << Bits) - 1,
        _ => float.PositiveInfinity,
    };

    /// <summary>Elements per asymmetric group at head dim <paramref name="headDim"/> (GroupSize, or the head dim when 0 on
    /// the channel axis).</summary>
    public int Group(int headDim) => GroupSize == 0 && Axis == KvGroupAxis.Channels ? headDim : GroupSize;

    /// <summary>Short name for tables and reports (e.g. <c>fp8e4m3/token</c>, <c>kivi4-keys/g32</c>).</summary>
    public override string ToString() => Codec switch
    {
        KvCodec.None => "fp16/bf16",
        KvCodec.Fp8E4M3 or KvCodec.Fp8E5M2 => $"{(Codec == KvCodec.Fp8E4M3 ? "fp8e4m3" : "fp8e5m2")}/{GranularityName}"
            + (Convention == Fp8ScaleConvention.MultiplyReciprocal ? "/recip" : ""),
        KvCodec.Int8 => $"int8/{GranularityName}",
        _ => $"asym{Bits}/{(Axis == KvGroupAxis.Tokens ? "tokens" : "channels")}/{(GroupSize == 0 ? "row" : "g" + GroupSize)}",
    };

    private string GranularityName => Granularity switch
    {
        KvScaleGranularity.PerTensor => "tensor",
        KvScaleGranularity.PerKvHead => "head",
        _ => "token",
    };

    /// <summary>Checks the format for tensors of <paramref name="headDim"/> columns in pages of <paramref name="pageSize"/>
    /// tokens.</summary>
    /// <exception cref="ArgumentException">An unsupported combination, naming <paramref name="paramName"/>.</exception>
    public void Validate(int headDim, int pageSize, string paramName)
    {
        switch (Codec)
        {
            case KvCodec.None:
                if (Bits != 16) throw new ArgumentException($"An unquantized format has 16 bits; Bits is {Bits}.", paramName);
                return;
            case KvCodec.Fp8E4M3 or KvCodec.Fp8E5M2 or KvCodec.Int8:
                if (Bits != 8) throw new ArgumentException($"{Codec} codes are 8 bits; Bits is {Bits}.", paramName);
                if (!Enum.IsDefined(Granularity)) throw new ArgumentException($"Unknown scale granularity {Granularity}.", paramName);
                if (!Enum.IsDefined(Convention)) throw new ArgumentException($"Unknown fp8 convention {Convention}.", paramName);
                if (headDim % 16 != 0)
                    throw new ArgumentException($"8-bit codes need a head dim that is a multiple of 16 (16-byte rows); it is {headDim}.", paramName);
                return;
            case KvCodec.Asymmetric:
                if (Bits is not (8 or 4 or 2))
                    throw new ArgumentException($"Asymmetric codes have 8, 4 or 2 bits; Bits is {Bits}.", paramName);
                if (!Enum.IsDefined(Axis)) throw new ArgumentException($"Unknown group axis {Axis}.", paramName);
                int g = Group(headDim);
                if (Axis == KvGroupAxis.Channels)
                {
                    if (GroupSize != 0 && !ValidGroup(GroupSize))
                        throw new ArgumentException($"GroupSize must be 0 (the head dim) or a power of two in 16–256; it is {GroupSize}.", paramName);
                    if (headDim % g != 0)
                        throw new ArgumentException($"GroupSize {g} does not divide the head dim {headDim}.", paramName);
                    if (headDim * Bits % 128 != 0)
                        throw new ArgumentException($"A row of {headDim} {Bits}-bit codes is not a whole number of 16-byte units; the head dim must be a multiple of {128 / Bits}.", paramName);
                }
                else
                {
                    if (!ValidGroup(GroupSize))
                        throw new ArgumentException($"GroupSize must be a power of two in 16–256 for token groups; it is {GroupSize}.", paramName);
                    if (pageSize % GroupSize != 0)
                        throw new ArgumentException($"GroupSize {GroupSize} does not divide the page size {pageSize}: a page holds whole token groups.", paramName);
                    if (headDim % 8 != 0) throw new ArgumentException($"The head dim must be a multiple of 8; it is {headDim}.", paramName);
                }
                return;
            default:
                throw new ArgumentException($"Unknown codec {Codec}.", paramName);
        }
    }

    private static bool ValidGroup(int g) => g is >= 16 and <= 256 && (g & (g - 1)) == 0;

    /// <summary>Bytes one (token, KV head) row of <paramref name="headDim"/> elements costs in this format, codes plus
    /// stored scales and minima (per-tensor and per-head scales are not counted: they do not grow with the context).
    /// <paramref name="elementBytes"/> is the size of the cache's element type (2 for fp16/bf16).</summary>
    public double BytesPerRow(int headDim, int elementBytes = 2) => Codec switch
    {
        KvCodec.None => headDim * elementBytes,
        KvCodec.Fp8E4M3 or KvCodec.Fp8E5M2 or KvCodec.Int8 => headDim + (Granularity == KvScaleGranularity.PerToken ? 4 : 0),
        KvCodec.Asymmetric => headDim * Bits / 8.0 + (Axis == KvGroupAxis.Channels
            ? headDim / Group(headDim) * 2.0 * elementBytes
            : headDim * 2.0 * elementBytes / GroupSize),
        _ => throw new InvalidOperationException($"Unknown codec {Codec}."),
    };
}
