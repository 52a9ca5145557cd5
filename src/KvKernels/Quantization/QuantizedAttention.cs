using KvKernels.Attention;
using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Quantization;

/// <summary>
/// Decode attention over a quantized paged cache (one segment of it). For sequence b, query token i (of
/// <see cref="QueryLength"/>) and query head h (KV head <c>h / (Hq / Hkv)</c>), the keys n of the segment's
/// <c>L = lengths[b]</c> tokens with <c>n ≤ L + TrailingTokens − QueryLength + i</c> are visible; <c>s_n = Scale · q·k̂_n</c>,
/// <c>o = Σ softmax(s)_n v̂_n</c>, <c>lse = ln Σ e^{s_n}</c> (−∞ and zeros when nothing is visible). k̂ and v̂ are the
/// dequantized keys and values exactly as <see cref="KvQuantCpu.Dequantize{T}"/> writes them (rounded to the input
/// type), so the op is attention over the dequantized tensors. <see cref="TrailingTokens"/> is the number of tokens of
/// the same sequence stored after this segment (KIVI's full-precision residual, SAQ's younger stairs): the segments
/// are attended separately and merged with <see cref="DecodeAttentionKernels.MergeStates{T}"/> (or the CPU's
/// <see cref="DecodeAttentionCpu"/> merge), using the LSE outputs.
/// <para>Tensors: query <c>[B, QueryLength, Hq, D]</c> (fp16/bf16), K and V as <see cref="QuantizedKvPool"/>s of the same
/// page geometry, block table <c>[B, MaxPagesPerSequence]</c>, lengths <c>[B]</c>, output <c>[B, QueryLength, Hq, D]</c>,
/// optional LSE <c>[B, QueryLength, Hq]</c>.</para>
/// </summary>
/// <param name="BatchSize">Sequences (≥ 0).</param>
/// <param name="QueryLength">Query tokens per sequence, 1–16.</param>
/// <param name="NumQueryHeads">Hq, a multiple of Hkv (ratio ≤ 128).</param>
/// <param name="NumKvHeads">Hkv.</param>
/// <param name="HeadDim">D of queries, keys and values: a multiple of 32 in 32–256.</param>
/// <param name="Pages">Page geometry of both pools (its HeadDim and NumKvHeads must match).</param>
/// <param name="MaxPagesPerSequence">Block-table columns.</param>
/// <param name="KeyFormat">The keys' format (quantized).</param>
/// <param name="ValueFormat">The values' format (quantized).</param>
public readonly record struct QuantizedAttentionSpec(int BatchSize, int QueryLength, int NumQueryHeads, int NumKvHeads, int HeadDim,
    PagedKvLayout Pages, int MaxPagesPerSequence, KvFormat KeyFormat, KvFormat ValueFormat)
{
    /// <summary>Query, parameter and output element type (fp16 or bf16; fp32 for the output too).</summary>
    public AttentionElement InputType { get; init; }

    /// <summary>Output element type.</summary>
    public AttentionElement OutputType { get; init; }

    /// <summary>Logit scale; 0 means <c>1/√HeadDim</c>.</summary>
    public float Scale { get; init; }

    /// <summary>Tokens of the sequence stored after this segment (≥ 0).</summary>
    public int TrailingTokens { get; init; }

    /// <summary>GPU split-KV chunks: 0 chooses; ≥ 1 forces (clamped to the workspace).</summary>
    public int Splits { get; init; }

    /// <summary>The keys' pool.</summary>
    public QuantizedKvPool KeyPool => new(Pages, KeyFormat);

    /// <summary>The values' pool.</summary>
    public QuantizedKvPool ValuePool => new(Pages, ValueFormat);

    /// <summary>The scale applied.</summary>
    public float EffectiveScale => Scale == 0 ? 1f / MathF.Sqrt(HeadDim) : Scale;

    /// <summary>Query rows <c>B · QueryLength · Hq</c> (= LSE elements).</summary>
    public long Rows => (long)BatchSize * QueryLength * NumQueryHeads;

    /// <summary>Query (= output) elements.</summary>
    public long Elements => Rows * HeadDim;

    /// <summary>The batch geometry of the block table.</summary>
    internal PagedBatchSpec Batch => new(Pages, BatchSize, MaxPagesPerSequence, int.MaxValue);

    /// <summary>Checks the shape and formats.</summary>
    public void Validate()
    {
        if (BatchSize < 0) throw new ArgumentException($"BatchSize is {BatchSize}; expected ≥ 0.", "spec");
        if (QueryLength is < 1 or > DecodeAttentionSpec.MaxQueryLength)
            throw new ArgumentException($"QueryLength is {QueryLength}; expected 1..{DecodeAttentionSpec.MaxQueryLength}.", "spec");
        if (NumKvHeads < 1 || NumQueryHeads < NumKvHeads || NumQueryHeads % NumKvHeads != 0 || NumQueryHeads / NumKvHeads > DecodeAttentionSpec.MaxGroupSize)
            throw new ArgumentException($"NumQueryHeads {NumQueryHeads} / NumKvHeads {NumKvHeads}: expected a whole ratio of 1..{DecodeAttentionSpec.MaxGroupSize}.", "spec");
        if (HeadDim is < 32 or > 256 || HeadDim % 32 != 0)
            throw new ArgumentException($"HeadDim is {HeadDim}; quantized attention takes a multiple of 32 in 32..256.", "spec");
        if (Pages.HeadDim != HeadDim || Pages.NumKvHeads != NumKvHeads)
            throw new ArgumentException($"Pages has {Pages.NumKvHeads} heads of {Pages.HeadDim}; the call has {NumKvHeads} of {HeadDim}.", "spec");
        if (MaxPagesPerSequence < 1) throw new ArgumentException($"MaxPagesPerSequence is {MaxPagesPerSequence}; expected ≥ 1.", "spec");
        KeyPool.Validate("spec");
        ValuePool.Validate("spec");
        if (InputType is not (AttentionElement.Float16 or AttentionElement.BFloat16))
            throw new ArgumentException($"InputType is {InputType}; expected Float16 or BFloat16.", "spec");
        if (!Enum.IsDefined(OutputType)) throw new ArgumentException($"OutputType {OutputType} is not defined.", "spec");
        if (!float.IsFinite(Scale)) throw new ArgumentException($"Scale is {Scale}; expected finite.", "spec");
        if (TrailingTokens < 0) throw new ArgumentException($"TrailingTokens is {TrailingTokens}; expected ≥ 0.", "spec");
        if (Splits < 0) throw new ArgumentException($"Splits is {Splits}; expected ≥ 0.", "spec");
    }

    internal void ValidateBuffers<TIn, TOut>(long query, long output, long lse) where TIn : unmanaged where TOut : unmanaged
    {
        Validate();
        if (DecodeAttentionSpec.ElementOf<TIn>() != InputType) throw new ArgumentException($"The query is {typeof(TIn).Name}; spec.InputType is {InputType}.", "query");
        if (DecodeAttentionSpec.ElementOf<TOut>() != OutputType) throw new ArgumentException($"The output is {typeof(TOut).Name}; spec.OutputType is {OutputType}.", "output");
        if (query < Elements) throw new ArgumentException($"query has {query} elements; [B, q_len, Hq, D] needs {Elements}.", "query");
        if (output < Elements) throw new ArgumentException($"output has {output} elements; [B, q_len, Hq, D] needs {Elements}.", "output");
        if (lse != 0 && lse < Rows) throw new ArgumentException($"lse has {lse} elements; [B, q_len, Hq] needs {Rows} (or pass none).", "lse");
    }
}

/// <summary>The buffers of one quantized tensor on the host: codes, scales (per-token, or the engine's per-tensor /
/// per-head scales) and group parameters (asymmetric formats), as <see cref="KvQuantCpu.Quantize{T}"/> writes them.</summary>
public readonly ref struct QuantizedTensor<T> where T : unmanaged
{
    /// <summary>Wraps the buffers.</summary>
    public QuantizedTensor(ReadOnlySpan<byte> codes, ReadOnlySpan<float> scales, ReadOnlySpan<T> groupParams)
    {
        Codes = codes;
        Scales = scales;
        GroupParams = groupParams;
    }

    /// <summary>Codes.</summary>
    public ReadOnlySpan<byte> Codes { get; }

    /// <summary>Per-token scales, or the engine's scales; empty for asymmetric formats.</summary>
    public ReadOnlySpan<float> Scales { get; }

    /// <summary>(scale, minimum) pairs; empty for fp8 and int8.</summary>
    public ReadOnlySpan<T> GroupParams { get; }
}

/// <summary>CPU twin of <see cref="QuantizedAttentionKernels"/>: dequantizes the visible rows (as
/// <see cref="KvQuantCpu"/> does) and runs fp32 attention. Allocates scratch per call (a reference, not a hot path).</summary>
public static class QuantizedAttentionCpu
{
    /// <summary>Attention over the quantized segment; see <see cref="QuantizedAttentionSpec"/>.</summary>
    /// <exception cref="ArgumentException">A bad shape, format, buffer, length or page index; nothing is written.</exception>
    public static void Decode<TIn, TOut>(in QuantizedAttentionSpec spec, ReadOnlySpan<TIn> query, QuantizedTensor<TIn> keys, QuantizedTensor<TIn> values,
        ReadOnlySpan<int> blockTable, ReadOnlySpan<int> lengths, Span<TOut> output, Span<float> lse) where TIn : unmanaged where TOut : unmanaged
    {
        spec.ValidateBuffers<TIn, TOut>(query.Length, output.Length, lse.Length);
        CheckTensor(spec.KeyPool, keys, "keys");
        CheckTensor(spec.ValuePool, values, "values");
        if (blockTable.Length != (long)spec.BatchSize * spec.MaxPagesPerSequence)
            throw new ArgumentException($"blockTable has {blockTable.Length} entries; expected BatchSize · MaxPagesPerSequence = {(long)spec.BatchSize * spec.MaxPagesPerSequence}.", nameof(blockTable));
        if (lengths.Length != spec.BatchSize) throw new ArgumentException($"lengths has {lengths.Length} entries; expected BatchSize = {spec.BatchSize}.", nameof(lengths));
        spec.Batch.ValidateBatch(blockTable, lengths, pagesWritten: false);

        int d = spec.HeadDim, hkv = spec.NumKvHeads, group = spec.NumQueryHeads / hkv, pageSize = spec.Pages.PageSize;
        float scale = spec.EffectiveScale;
        var q = new float[d];
        for (int b = 0; b < spec.BatchSize; b++)
        {
            int length = lengths[b];
            var k = new float[(long)length * d];
            var v = new float[(long)length * d];
            for (int kvh = 0; kvh < hkv; kvh++)
            {
                for (int n = 0; n < length; n++)
                {
                    long slot = (long)blockTable[b * spec.MaxPagesPerSequence + n / pageSize] * pageSize + n % pageSize;
                    for (int c = 0; c < d; c++)
                    {
                        k[n * d + c] = Rounded<TIn>(KvQuantCpu.DequantizeElement(spec.KeyPool, keys.Codes, keys.Scales, keys.GroupParams, slot, kvh, c));
                        v[n * d + c] = Rounded<TIn>(KvQuantCpu.DequantizeElement(spec.ValuePool, values.Codes, values.Scales, values.GroupParams, slot, kvh, c));
                    }
                }
                for (int i = 0; i < spec.QueryLength; i++)
                    for (int hg = 0; hg < group; hg++)
                    {
                        long row = ((long)b * spec.QueryLength + i) * spec.NumQueryHeads + kvh * group + hg;
                        for (int c = 0; c < d; c++) q[c] = DecodeAttentionCpuMath.ToSingle(query[(int)(row * d + c)]);
                        int visible = Math.Clamp(length + spec.TrailingTokens - spec.QueryLength + i + 1, 0, length);
                        Attend(q, k, v, visible, d, scale, output.Slice((int)(row * d), d), out float rowLse);
                        if (!lse.IsEmpty) lse[(int)row] = rowLse;
                    }
            }
        }
    }

    private static void Attend<TOut>(float[] q, float[] k, float[] v, int visible, int d, float scale, Span<TOut> output, out float lse) where TOut : unmanaged
    {
        var s = new float[visible];
        float max = float.NegativeInfinity;
        for (int n = 0; n < visible; n++)
        {
            float acc = 0;
            for (int c = 0; c < d; c++) acc = MathF.FusedMultiplyAdd(q[c], k[n * d + c], acc);
            s[n] = acc * scale;
            max = MathF.Max(max, s[n]);
        }
        float sum = 0;
        for (int n = 0; n < visible; n++) sum += s[n] = MathF.Exp(s[n] - max);
        lse = visible == 0 ? float.NegativeInfinity : max + MathF.Log(sum);
        for (int c = 0; c < d; c++)
        {
            float acc = 0;
            for (int n = 0; n < visible; n++) acc = MathF.FusedMultiplyAdd(s[n], v[n * d + c], acc);
            output[c] = DecodeAttentionCpuMath.FromSingle<TOut>(visible == 0 ? 0 : acc / sum);
        }
    }

    private static float Rounded<T>(float x) where T : unmanaged => DecodeAttentionCpuMath.ToSingle(DecodeAttentionCpuMath.FromSingle<T>(x));

    internal static void CheckTensor<T>(in QuantizedKvPool pool, QuantizedTensor<T> t, string name) where T : unmanaged
    {
        if (t.Codes.Length < pool.CodeBytes) throw new ArgumentException($"{name}.Codes has {t.Codes.Length} bytes; the pool needs {pool.CodeBytes}.", name);
        long scales = pool.Format.HasTokenScales ? pool.TokenScaleCount : pool.GivenScaleCount;
        if (t.Scales.Length < scales) throw new ArgumentException($"{name}.Scales has {t.Scales.Length} entries; {pool.Format} needs {scales}.", name);
        if (pool.Format.HasGivenScales) QuantChecks.GivenScales(t.Scales[..(int)scales], name);
        if (t.GroupParams.Length < pool.GroupParamCount)
            throw new ArgumentException($"{name}.GroupParams has {t.GroupParams.Length} elements; {pool.Format} needs {pool.GroupParamCount}.", name);
    }
}

/// <summary>One quantized tensor on the device (codes, per-token scales or the engine's scales, group parameters).</summary>
/// <param name="Codes">Codes.</param>
/// <param name="TokenScales">Per-token scales (fp8/int8 per token); else default.</param>
/// <param name="GivenScales">The engine's scales (fp8/int8 per tensor or KV head); else null.</param>
/// <param name="GroupParams">(scale, minimum) pairs in the input type (asymmetric); else default.</param>
/// <typeparam name="T">The cache's element type (fp16 or bf16).</typeparam>
public readonly record struct DeviceQuantizedTensor<T>(DeviceSpan<byte> Codes, DeviceSpan<float> TokenScales, DeviceKvScales? GivenScales, DeviceSpan<T> GroupParams)
    where T : unmanaged;

/// <summary>
/// The GPU quantized decode attention (<c>cuda/quant/attention.cu</c>): codes are read and dequantized in registers —
/// never a dequantized copy in device memory. Same op and validation as <see cref="QuantizedAttentionCpu"/>.
/// </summary>
public sealed class QuantizedAttentionKernels
{
    /// <summary>The kernel source under <c>cuda/</c>.</summary>
    public const string Source = "quant/attention.cu";

    /// <summary>Entry points of every specialization.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } = ["quant_decode_attention", "quant_merge_splits"];

    /// <summary>The shipped specializations: D = 128, bf16 and fp16, 4 and 8 query rows (GQA groups of 4 and 8), K/V in
    /// fp8 e4m3, int8, KIVI-4 and KIVI-2.</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        .. from type in new[] { AttentionElement.BFloat16, AttentionElement.Float16 }
           from rows in new[] { 4, 8 }
           from pair in new[]
           {
               (KvFormat.Fp8E4M3(), KvFormat.Fp8E4M3()), (KvFormat.Int8(), KvFormat.Int8()),
               (KvFormat.KiviKeys(4), KvFormat.KiviValues(4)), (KvFormat.KiviKeys(2), KvFormat.KiviValues(2)),
           }
           select Specialize(128, rows, type, type, pair.Item1, pair.Item2),
    ];

    private const int Threads = 128;
    private readonly CudaDevice _device;
    private readonly Dictionary<(int, int, AttentionElement, AttentionElement, KvFormat, KvFormat), (CudaKernel Decode, CudaKernel Merge)> _modules = [];

    /// <summary>Binds the op to <paramref name="device"/>; kernels compile on first use of each specialization.</summary>
    public QuantizedAttentionKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    /// <summary>Query rows one CTA holds (the kernel's QUERY_ROWS): the fewest of 4, 8, 16 that cover the q_len × group
    /// rows of a KV head, at most 8 above D = 128 (registers hold rows × D/32 accumulators per lane).</summary>
    internal static int RowsPerCta(int headDim, int packedRows) =>
        Math.Min(headDim <= 128 ? 16 : 8, packedRows <= 4 ? 4 : packedRows <= 8 ? 8 : 16);

    internal static KernelSpecialization Specialize(int headDim, int rows, AttentionElement input, AttentionElement output, KvFormat k, KvFormat v) =>
        KernelSpecialization.Create(Source, ("HEAD_DIM", headDim), ("QUERY_ROWS", rows), ("INPUT_BF16", input == AttentionElement.BFloat16 ? 1 : 0),
            ("OUT_TYPE", (int)output), ("K_CODEC", CodecId(k)), ("K_BITS", k.Bits), ("K_TOKENS", k.Codec == KvCodec.Asymmetric && k.Axis == KvGroupAxis.Tokens ? 1 : 0),
            ("V_CODEC", CodecId(v)), ("V_BITS", v.Bits), ("V_TOKENS", v.Codec == KvCodec.Asymmetric && v.Axis == KvGroupAxis.Tokens ? 1 : 0));

    private static int CodecId(in KvFormat f) => f.Codec switch
    {
        KvCodec.Fp8E4M3 => 0,
        KvCodec.Fp8E5M2 => 1,
        KvCodec.Int8 => 2,
        _ => 3,
    };

    /// <summary>Attention over the quantized segment; see <see cref="QuantizedAttentionSpec"/>.</summary>
    /// <param name="spec">Shapes, formats, options.</param>
    /// <param name="query">Queries.</param>
    /// <param name="keys">Quantized keys.</param>
    /// <param name="values">Quantized values.</param>
    /// <param name="table">Block table and lengths validated for <c>spec.Pages</c>.</param>
    /// <param name="output">Output, written.</param>
    /// <param name="lse">LSE output, or default.</param>
    /// <param name="workspace">Split-KV scratch; null runs one split per (sequence, KV head).</param>
    /// <param name="stream">Stream (default stream when null).</param>
    public void Decode<TIn, TOut>(in QuantizedAttentionSpec spec, DeviceSpan<TIn> query, DeviceQuantizedTensor<TIn> keys, DeviceQuantizedTensor<TIn> values,
        DeviceBlockTable table, DeviceSpan<TOut> output, DeviceSpan<float> lse, DecodeAttentionWorkspace? workspace = null, CudaStream? stream = null)
        where TIn : unmanaged where TOut : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        spec.ValidateBuffers<TIn, TOut>(query.Length, output.Length, lse.Length);
        CheckTensor(spec.KeyPool, keys, "keys");
        CheckTensor(spec.ValuePool, values, "values");
        if (!ReferenceEquals(table.Device, _device)) throw new ArgumentException("The block table belongs to another device.", nameof(table));
        if (table.BatchSize != spec.BatchSize || table.MaxPagesPerSequence != spec.MaxPagesPerSequence)
            throw new ArgumentException($"The block table is {table.BatchSize} × {table.MaxPagesPerSequence}; the spec needs {spec.BatchSize} × {spec.MaxPagesPerSequence}.", nameof(table));
        if (table.Pool.NumPages != spec.Pages.NumPages || table.Pool.PageSize != spec.Pages.PageSize)
            throw new ArgumentException($"The block table was validated for {table.Pool.NumPages} pages of {table.Pool.PageSize}; the pools have {spec.Pages.NumPages} of {spec.Pages.PageSize}.", nameof(table));
        _device.EnsureSame(query.Device, nameof(query));
        _device.EnsureSame(output.Device, nameof(output));
        if (workspace is not null && !ReferenceEquals(workspace.Device, _device)) throw new ArgumentException("The workspace belongs to another device.", nameof(workspace));
        if (spec.BatchSize == 0) return;

        int packedRows = spec.QueryLength * (spec.NumQueryHeads / spec.NumKvHeads), rows = RowsPerCta(spec.HeadDim, packedRows);
        int rowTiles = (packedRows + rows - 1) / rows;
        long ctas = (long)spec.BatchSize * spec.NumKvHeads * rowTiles;
        int splits = 1;
        if (workspace is not null && workspace.MaxQueryRows >= spec.Rows && workspace.MaxOutputDim >= spec.HeadDim)
        {
            int wanted = spec.Splits > 0 ? spec.Splits
                : (int)Math.Clamp(2L * _device.Info.MultiprocessorCount / Math.Max(1, ctas), 1, Math.Max(1, table.LongestSequence / 256));
            splits = Math.Clamp(wanted, 1, workspace.MaxSplits);
        }
        var (decode, merge) = Module((spec.HeadDim, rows, spec.InputType, spec.OutputType, spec.KeyFormat, spec.ValueFormat));

        var args = new KernelArguments();
        args.Add(query);
        AddTensor(ref args, spec.KeyPool, keys);
        AddTensor(ref args, spec.ValuePool, values);
        args.Add(table.Lengths);
        args.Add(table.Table);
        args.Add(output);
        args.AddPointer(lse.IsEmpty ? 0 : lse.Pointer);
        args.AddPointer(splits > 1 ? workspace!.PartialOutput.Pointer : 0);
        args.AddPointer(splits > 1 ? workspace!.PartialLse.Pointer : 0);
        args.Add(spec.BatchSize);
        args.Add(spec.QueryLength);
        args.Add(spec.NumQueryHeads);
        args.Add(spec.NumKvHeads);
        args.Add(spec.Pages.PageSize);
        args.Add(spec.MaxPagesPerSequence);
        args.Add(spec.Pages.Layout == KvLayout.Hnd ? 1 : 0);
        args.Add(spec.KeyPool.Format.HasGroupParams ? spec.KeyPool.Group : 0);
        args.Add((int)spec.KeyFormat.Granularity);
        args.Add(spec.ValuePool.Format.HasGroupParams ? spec.ValuePool.Group : 0);
        args.Add((int)spec.ValueFormat.Granularity);
        args.Add(spec.EffectiveScale);
        args.Add(spec.TrailingTokens);
        args.Add(splits);
        args.Add(rowTiles);
        decode.Launch(new Dim3((uint)(ctas * splits)), Threads, 0, stream, ref args);
        if (splits == 1) return;

        var m = new KernelArguments();
        m.Add(workspace!.PartialOutput);
        m.Add(workspace.PartialLse);
        m.Add(output);
        m.AddPointer(lse.IsEmpty ? 0 : lse.Pointer);
        m.Add((int)spec.Rows);
        m.Add(spec.HeadDim);
        m.Add(splits);
        merge.Launch(new Dim3((uint)Math.Clamp((spec.Rows + 7) / 8, 1, _device.Info.MultiprocessorCount * 16L)), 256, 0, stream, ref m);
    }

    private static void AddTensor<T>(ref KernelArguments args, in QuantizedKvPool pool, DeviceQuantizedTensor<T> t) where T : unmanaged
    {
        args.Add(t.Codes);
        args.AddPointer(pool.Format.HasTokenScales ? t.TokenScales.Pointer : pool.Format.HasGivenScales ? t.GivenScales!.Scales.Pointer : 0);
        args.AddPointer(pool.Format.HasGroupParams ? t.GroupParams.Pointer : 0);
    }

    private void CheckTensor<T>(in QuantizedKvPool pool, DeviceQuantizedTensor<T> t, string name) where T : unmanaged
    {
        if (t.Codes.Length < pool.CodeBytes) throw new ArgumentException($"{name}.Codes has {t.Codes.Length} bytes; the pool needs {pool.CodeBytes}.", name);
        _device.EnsureSame(t.Codes.Device, name);
        if (t.Codes.Pointer % 4 != 0) throw new ArgumentException($"{name}.Codes must be 4-byte aligned.", name);
        if (pool.Format.HasTokenScales && t.TokenScales.Length < pool.TokenScaleCount)
            throw new ArgumentException($"{name}.TokenScales has {t.TokenScales.Length} entries; {pool.Format} needs {pool.TokenScaleCount}.", name);
        if (pool.Format.HasGivenScales && (t.GivenScales is null || t.GivenScales.Count < pool.GivenScaleCount || !ReferenceEquals(t.GivenScales.Device, _device)))
            throw new ArgumentException($"{name}.GivenScales must hold {pool.GivenScaleCount} scales on this device for {pool.Format}.", name);
        if (pool.Format.HasGroupParams && t.GroupParams.Length < pool.GroupParamCount)
            throw new ArgumentException($"{name}.GroupParams has {t.GroupParams.Length} elements; {pool.Format} needs {pool.GroupParamCount}.", name);
    }

    private (CudaKernel Decode, CudaKernel Merge) Module((int D, int Rows, AttentionElement In, AttentionElement Out, KvFormat K, KvFormat V) key)
    {
        lock (_modules)
        {
            if (_modules.TryGetValue(key, out var module)) return module;
            var loaded = _device.LoadModule(Specialize(key.D, key.Rows, key.In, key.Out, key.K, key.V));
            module = (loaded.GetKernel(EntryPoints[0]), loaded.GetKernel(EntryPoints[1]));
            _modules[key] = module;
            return module;
        }
    }
}
