using System.Runtime.CompilerServices;
using KvKernels.Attention;

namespace KvKernels.Quantization;

/// <summary>
/// CPU twin of the quantization kernels (<c>cuda/quant/quant.cu</c>): quantize on append, dequantize a batch, and the
/// on-the-fly calibration of per-tensor / per-head scales. Same specs, same validation, and the same bits: codes, scales
/// and group parameters equal the GPU's exactly (the math is elementwise fp32 with min/max reductions, whose order does
/// not matter). Parallel over tokens (or token groups).
/// </summary>
public static class KvQuantCpu
{
    /// <summary>Quantizes <c>spec.NumTokens</c> source tokens into the pool. See <see cref="KvQuantizeSpec"/> and
    /// <see cref="KvFormat"/> for the math.</summary>
    /// <param name="spec">Pool, token count and source stride.</param>
    /// <param name="source">Rows <c>[NumTokens, Hkv, D]</c> (token stride <c>spec.Stride</c>), fp16 or bf16.</param>
    /// <param name="slots">One slot per token (channel groups, fp8, int8) or per group of G tokens (token groups); −1 skips.</param>
    /// <param name="givenScales">The engine's scales for per-tensor / per-head fp8 and int8 (finite, &gt; 0); else empty.</param>
    /// <param name="codes">The pool's codes, written at the slots.</param>
    /// <param name="tokenScales">Per-token fp32 scales (fp8/int8 per token), written at the slots; else empty.</param>
    /// <param name="groupParams">(scale, minimum) pairs of asymmetric formats, written; else empty.</param>
    /// <exception cref="ArgumentException">A bad shape, buffer length, slot or scale; nothing is written.</exception>
    public static void Quantize<T>(in KvQuantizeSpec spec, ReadOnlySpan<T> source, ReadOnlySpan<int> slots, ReadOnlySpan<float> givenScales,
        Span<byte> codes, Span<float> tokenScales, Span<T> groupParams) where T : unmanaged
    {
        spec.ValidateBuffers<T>(source.Length, slots.Length, givenScales.Length, codes.Length, tokenScales.Length, groupParams.Length);
        spec.ValidateSlots(slots);
        if (spec.Pool.Format.HasGivenScales) QuantChecks.GivenScales(givenScales[..spec.Pool.GivenScaleCount], nameof(givenScales));
        if (spec.NumTokens == 0) return;

        var s = spec;
        var pool = spec.Pool;
        unsafe
        {
            fixed (T* src = source)
            fixed (int* slotPtr = slots)
            fixed (float* given = givenScales, scales = tokenScales)
            fixed (byte* codePtr = codes)
            fixed (T* paramPtr = groupParams)
            {
                var job = new QuantizeJob<T>(s, src, slotPtr, given, codePtr, scales, paramPtr);
                Parallel.For(0, spec.SlotCount, job.Run);
            }
        }
    }

    /// <summary>Dequantizes each sequence's first <c>lengths[b]</c> tokens into <c>[B, MaxTokens, Hkv, D]</c>; later tokens
    /// are zeros.</summary>
    /// <param name="spec">Pool and batch shape.</param>
    /// <param name="codes">The pool's codes.</param>
    /// <param name="scales">Per-token scales, or the engine's per-tensor / per-head scales (fp8, int8); else empty.</param>
    /// <param name="groupParams">(scale, minimum) pairs of asymmetric formats; else empty.</param>
    /// <param name="blockTable">Block table <c>[B, MaxPagesPerSequence]</c>.</param>
    /// <param name="lengths">Tokens per sequence <c>[B]</c>.</param>
    /// <param name="destination">Dequantized tensor, written.</param>
    /// <exception cref="ArgumentException">A bad shape, buffer length, length or page index; nothing is written.</exception>
    public static void Dequantize<T>(in KvDequantizeSpec spec, ReadOnlySpan<byte> codes, ReadOnlySpan<float> scales, ReadOnlySpan<T> groupParams,
        ReadOnlySpan<int> blockTable, ReadOnlySpan<int> lengths, Span<T> destination) where T : unmanaged
    {
        spec.ValidateBuffers<T>(scales.Length, codes.Length, groupParams.Length, destination.Length);
        var batch = spec.Batch;
        if (blockTable.Length != (long)spec.BatchSize * spec.MaxPagesPerSequence)
            throw new ArgumentException($"blockTable has {blockTable.Length} entries; expected BatchSize · MaxPagesPerSequence = {(long)spec.BatchSize * spec.MaxPagesPerSequence}.", nameof(blockTable));
        if (lengths.Length != spec.BatchSize)
            throw new ArgumentException($"lengths has {lengths.Length} entries; expected BatchSize = {spec.BatchSize}.", nameof(lengths));
        batch.ValidateBatch(blockTable, lengths, pagesWritten: false);

        var pool = spec.Pool;
        int tokenElements = pool.Pages.TokenElements;
        for (int b = 0; b < spec.BatchSize; b++)
            for (int n = 0; n < spec.MaxTokens; n++)
            {
                var row = destination.Slice((int)(((long)b * spec.MaxTokens + n) * tokenElements), tokenElements);
                if (n >= lengths[b])
                {
                    row.Clear();
                    continue;
                }
                long slot = (long)blockTable[b * spec.MaxPagesPerSequence + n / pool.Pages.PageSize] * pool.Pages.PageSize + n % pool.Pages.PageSize;
                for (int h = 0; h < pool.Pages.NumKvHeads; h++)
                    for (int d = 0; d < pool.Pages.HeadDim; d++)
                        row[h * pool.Pages.HeadDim + d] = DecodeAttentionCpuMath.FromSingle<T>(DequantizeElement(pool, codes, scales, groupParams, slot, h, d));
            }
    }

    /// <summary>The dequantized value of element <paramref name="d"/> of (<paramref name="slot"/>, <paramref name="head"/>),
    /// in fp32 (before the final rounding to the element type). Indices are not checked: for spot checks and tests.</summary>
    /// <param name="pool">The pool.</param>
    /// <param name="codes">Its codes.</param>
    /// <param name="scales">Per-token scales, or the engine's scales (fp8/int8); else empty.</param>
    /// <param name="groupParams">(scale, minimum) pairs (asymmetric); else empty.</param>
    /// <param name="slot">Slot.</param>
    /// <param name="head">KV head.</param>
    /// <param name="d">Channel.</param>
    public static float DequantizeElement<T>(in QuantizedKvPool pool, ReadOnlySpan<byte> codes, ReadOnlySpan<float> scales, ReadOnlySpan<T> groupParams,
        long slot, int head, int d) where T : unmanaged
    {
        var format = pool.Format;
        int bits = format.Bits;
        if (format.Codec == KvCodec.Asymmetric)
        {
            long run, param;
            int index;
            if (pool.TokenGroups)
            {
                long block = pool.BlockIndex(slot, head);
                run = (block * pool.Pages.HeadDim + d) * pool.CodeRunBytes;
                index = (int)(slot % pool.Group);
                param = (block * pool.Pages.HeadDim + d) * 2;
            }
            else
            {
                long row = pool.RowIndex(slot, head);
                run = row * pool.CodeRunBytes;
                index = d;
                param = (row * (pool.Pages.HeadDim / pool.Group) + d / pool.Group) * 2;
            }
            int q = Unpack(codes, run, index, bits);
            float s = DecodeAttentionCpuMath.ToSingle(groupParams[(int)param]), mn = DecodeAttentionCpuMath.ToSingle(groupParams[(int)param + 1]);
            return MathF.FusedMultiplyAdd(q, s, mn);
        }

        long r = pool.RowIndex(slot, head);
        byte code = codes[(int)(r * pool.CodeRunBytes + d)];
        float scale = format.Granularity switch
        {
            KvScaleGranularity.PerTensor => scales[0],
            KvScaleGranularity.PerKvHead => scales[head],
            _ => scales[(int)r],
        };
        float value = format.Codec switch
        {
            KvCodec.Fp8E4M3 => Fp8.FromE4M3(code),
            KvCodec.Fp8E5M2 => Fp8.FromE5M2(code),
            _ => (sbyte)code,
        };
        return value * scale;
    }

    /// <summary>Requantizes page pairs from one pool into another (SAQ's step down a stair); see
    /// <see cref="KvRequantizeSpec"/>. Allocates a scratch tensor of the pages (a reference, not a hot path).</summary>
    /// <param name="spec">Pools and page count.</param>
    /// <param name="sourcePages">Pages read.</param>
    /// <param name="destinationPages">Pages written (distinct).</param>
    /// <param name="source">The source tensor's buffers.</param>
    /// <param name="destinationGivenScales">The destination's given scales (per-tensor / per-head fp8, int8); else empty.</param>
    /// <param name="codes">Destination codes, written at the destination pages.</param>
    /// <param name="tokenScales">Destination per-token scales, written; else empty.</param>
    /// <param name="groupParams">Destination (scale, minimum) pairs, written; else empty.</param>
    /// <exception cref="ArgumentException">A bad pool, page pair or buffer; nothing is written.</exception>
    public static void Requantize<T>(in KvRequantizeSpec spec, ReadOnlySpan<int> sourcePages, ReadOnlySpan<int> destinationPages,
        QuantizedTensor<T> source, ReadOnlySpan<float> destinationGivenScales, Span<byte> codes, Span<float> tokenScales, Span<T> groupParams)
        where T : unmanaged
    {
        spec.Validate(sourcePages, destinationPages);
        QuantizedAttentionCpu.CheckTensor(spec.Source, source, nameof(source));
        var quantize = new KvQuantizeSpec(spec.Destination, spec.Tokens);
        int[] slots = new int[spec.DestinationSlotCount];
        spec.DestinationSlots(destinationPages, slots);
        quantize.ValidateBuffers<T>((long)spec.Tokens * spec.Source.Pages.TokenElements, slots.Length, destinationGivenScales.Length, codes.Length,
            tokenScales.Length, groupParams.Length);

        var g = spec.Source.Pages;
        var scratch = new T[(long)spec.Tokens * g.TokenElements];
        for (int i = 0; i < spec.NumPages; i++)
            for (int j = 0; j < g.PageSize; j++)
            {
                long slot = (long)sourcePages[i] * g.PageSize + j;
                for (int h = 0; h < g.NumKvHeads; h++)
                    for (int d = 0; d < g.HeadDim; d++)
                        scratch[((long)(i * g.PageSize + j) * g.NumKvHeads + h) * g.HeadDim + d] = DecodeAttentionCpuMath.FromSingle<T>(
                            DequantizeElement(spec.Source, source.Codes, source.Scales, source.GroupParams, slot, h, d));
            }
        Quantize<T>(quantize, scratch, slots, destinationGivenScales, codes, tokenScales, groupParams);
    }

    /// <summary>
    /// On-the-fly scales (vLLM's <c>calculate_kv_scales</c>): <c>s = amax / divisor</c> over the whole tensor
    /// (<paramref name="scales"/> of length 1) or per KV head (length Hkv), with amax the largest |x| of
    /// <paramref name="source"/> <c>[numTokens, Hkv, D]</c>; a tensor or head of zeros gets 1.
    /// </summary>
    /// <param name="source">Packed rows <c>[numTokens, numKvHeads, headDim]</c>.</param>
    /// <param name="numTokens">Tokens (≥ 1).</param>
    /// <param name="numKvHeads">KV heads.</param>
    /// <param name="headDim">Head dim.</param>
    /// <param name="divisor">vLLM: 200 for keys, 100 for values; 448 gives the amax / fp8-max convention.</param>
    /// <param name="scales">Scales, written: 1 entry (per tensor) or Hkv entries (per KV head).</param>
    /// <exception cref="ArgumentException">A bad shape, divisor or length.</exception>
    public static void CalibrateScales<T>(ReadOnlySpan<T> source, int numTokens, int numKvHeads, int headDim, float divisor, Span<float> scales)
        where T : unmanaged
    {
        QuantChecks.Calibration<T>(source.Length, numTokens, numKvHeads, headDim, divisor, scales.Length);
        bool perHead = scales.Length == numKvHeads && numKvHeads > 1;
        for (int i = 0; i < scales.Length; i++) scales[i] = 0f;
        for (int t = 0; t < numTokens; t++)
            for (int h = 0; h < numKvHeads; h++)
            {
                var row = source.Slice((t * numKvHeads + h) * headDim, headDim);
                ref float target = ref scales[perHead ? h : 0];
                foreach (var x in row) target = MathF.Max(target, MathF.Abs(DecodeAttentionCpuMath.ToSingle(x)));
            }
        for (int i = 0; i < scales.Length; i++) scales[i] = scales[i] > 0 ? scales[i] / divisor : 1f;
    }

    internal static int Unpack(ReadOnlySpan<byte> codes, long run, int index, int bits)
    {
        int bit = index * bits;
        return (codes[(int)(run + bit / 8)] >> (bit % 8)) & ((1 << bits) - 1);
    }

    private readonly unsafe struct QuantizeJob<T>(KvQuantizeSpec spec, T* source, int* slots, float* given, byte* codes, float* tokenScales, T* groupParams)
        where T : unmanaged
    {
        public void Run(int i)
        {
            var pool = spec.Pool;
            var format = pool.Format;
            int slot = slots[i], hkv = pool.Pages.NumKvHeads, dim = pool.Pages.HeadDim;
            if (slot < 0) return;
            if (pool.TokenGroups)
            {
                int g = pool.Group;
                Span<float> x = stackalloc float[g];
                for (int h = 0; h < hkv; h++)
                {
                    long block = pool.BlockIndex(slot, h);
                    for (int c = 0; c < dim; c++)
                    {
                        for (int j = 0; j < g; j++) x[j] = DecodeAttentionCpuMath.ToSingle(source[((long)i * g + j) * spec.Stride + h * dim + c]);
                        long run = block * dim + c;
                        QuantizeAsymmetric(x, format.Bits, codes + run * pool.CodeRunBytes, groupParams + run * 2);
                    }
                }
                return;
            }

            Span<float> row = stackalloc float[dim];
            for (int h = 0; h < hkv; h++)
            {
                for (int c = 0; c < dim; c++) row[c] = DecodeAttentionCpuMath.ToSingle(source[(long)i * spec.Stride + h * dim + c]);
                long r = pool.RowIndex(slot, h);
                byte* dst = codes + r * pool.CodeRunBytes;
                if (format.Codec == KvCodec.Asymmetric)
                {
                    int g = pool.Group, groups = dim / g;
                    for (int k = 0; k < groups; k++)
                        QuantizeAsymmetric(row.Slice(k * g, g), format.Bits, dst + k * g * format.Bits / 8, groupParams + (r * groups + k) * 2);
                    continue;
                }
                float scale;
                if (format.Granularity == KvScaleGranularity.PerToken)
                {
                    float amax = 0;
                    foreach (float v in row) amax = MathF.Max(amax, MathF.Abs(v));
                    scale = amax / format.CodeMax;
                    tokenScales[r] = scale;
                }
                else
                {
                    scale = given[format.Granularity == KvScaleGranularity.PerTensor ? 0 : h];
                }
                for (int c = 0; c < dim; c++) dst[c] = KvQuantMath.Code(format, row[c], scale);
            }
        }

        private static void QuantizeAsymmetric(ReadOnlySpan<float> x, int bits, byte* dst, T* param)
        {
            float mn = x[0], mx = x[0];
            foreach (float v in x)
            {
                mn = MathF.Min(mn, v);
                mx = MathF.Max(mx, v);
            }
            T sStored = DecodeAttentionCpuMath.FromSingle<T>((mx - mn) / ((1 << bits) - 1));
            T mnStored = DecodeAttentionCpuMath.FromSingle<T>(mn);
            param[0] = sStored;
            param[1] = mnStored;
            float s = DecodeAttentionCpuMath.ToSingle(sStored), m = DecodeAttentionCpuMath.ToSingle(mnStored);
            new Span<byte>(dst, x.Length * bits / 8).Clear();
            for (int j = 0; j < x.Length; j++)
            {
                int q = KvQuantMath.AsymmetricCode(x[j], s, m, bits);
                int bit = j * bits;
                dst[bit / 8] |= (byte)(q << (bit % 8));
            }
        }
    }
}

/// <summary>The per-element code functions, written once for the CPU twin (the kernel has the same lines).</summary>
internal static class KvQuantMath
{
    /// <summary>fp8 or int8 code of x with scale s (s = 0 → code 0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static byte Code(in KvFormat format, float x, float s)
    {
        if (s == 0) return 0;
        if (format.Codec == KvCodec.Int8) return (byte)(sbyte)Math.Clamp(MathF.Round(x / s), -127f, 127f);
        float y = format.Convention == Fp8ScaleConvention.Divide ? x / s : x * (1f / s);
        return format.Codec == KvCodec.Fp8E4M3 ? Fp8.ToE4M3(y) : Fp8.ToE5M2(y);
    }

    /// <summary>Asymmetric code of x with the stored scale and minimum.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int AsymmetricCode(float x, float s, float mn, int bits) =>
        s == 0 ? 0 : (int)Math.Clamp(MathF.Round((x - mn) / s), 0f, (1 << bits) - 1);
}
