using KvKernels;
using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Quantization;

namespace KvCheck.Benchmarks;

/// <summary>
/// The quantized-KV benchmark rows (issue 5): <c>quant.attention</c> — decode attention over a quantized paged cache at
/// Llama-3-8B's shape (Hq 32, Hkv 8, D 128), bf16 queries and output, one query token, page 32, every sequence N tokens,
/// B = 8, N ∈ {8k, 32k} (quick: 32k), for fp8 e4m3 (per-token scales), int8, KIVI-4 and KIVI-2 (keys per channel over 32
/// tokens, values per token over 32 channels), and the same shape unquantized (<c>fp16/bf16</c>, the existing decode
/// kernel) for the speed-up. Bytes: the codes, scales and group parameters read, plus q and o. Goal (issue): ≥ 80 % of the
/// copy bandwidth; speed-ups over the unquantized row of 1.8× (fp8, int8), 3× (int4), 4.5× (int2).
/// Shape strings (identical in bench/peers/quant_torch.py): <c>B=8 N=32768 Hq=32 Hkv=8 D=128 page=32 kv=fp8e4m3/token bf16</c>.
/// </summary>
internal static class QuantBenchCases
{
    public const int PageSize = 32;
    public const int Batch = 8, QueryHeads = 32, KvHeads = 8, HeadDim = 128;

    /// <summary>The formats benchmarked, by (name, key format, value format).</summary>
    public static IReadOnlyList<(string Name, KvFormat Key, KvFormat Value)> Formats { get; } =
    [
        ("fp8e4m3/token", KvFormat.Fp8E4M3(), KvFormat.Fp8E4M3()),
        ("int8/token", KvFormat.Int8(), KvFormat.Int8()),
        ("kivi4/g32", KvFormat.KiviKeys(4), KvFormat.KiviValues(4)),
        ("kivi2/g32", KvFormat.KiviKeys(2), KvFormat.KiviValues(2)),
    ];

    public static IEnumerable<GpuBenchCase> Gpu(bool quick)
    {
        int[] lengths = quick ? [32768] : [8192, 32768];
        foreach (int n in lengths)
        {
            yield return new GpuUnquantizedAttention(n);
            foreach (var f in Formats) yield return new GpuQuantAttention(f.Name, f.Key, f.Value, n);
        }
    }

    public static string Shape(int tokens, string kv) => $"B={Batch} N={tokens} Hq={QueryHeads} Hkv={KvHeads} D={HeadDim} page={PageSize} kv={kv} bf16";

    public static QuantizedAttentionSpec Spec(int tokens, KvFormat key, KvFormat value) =>
        new(Batch, 1, QueryHeads, KvHeads, HeadDim, new PagedKvLayout(Batch * tokens / PageSize, PageSize, KvHeads, HeadDim), tokens / PageSize, key, value)
        {
            InputType = AttentionElement.BFloat16,
            OutputType = AttentionElement.BFloat16,
        };

    /// <summary>Bytes a pool of this format holds per the whole cache (codes + per-token scales + group parameters).</summary>
    public static long PoolBytes(in QuantizedKvPool pool) => pool.CodeBytes + pool.TokenScaleCount * 4 + pool.GroupParamCount * 2;
}

/// <summary><c>quant.attention</c> over one K/V format pair.</summary>
internal sealed class GpuQuantAttention(string name, KvFormat key, KvFormat value, int tokens) : GpuBenchCase
{
    private readonly QuantizedAttentionSpec _spec = QuantBenchCases.Spec(tokens, key, value);
    private readonly List<(DeviceMemory<byte> K, DeviceMemory<byte> V)> _sets = [];
    private DeviceMemory<BFloat16>? _query, _output, _kParams, _vParams;
    private DeviceMemory<float>? _kScales, _vScales;
    private DeviceBlockTable? _table;
    private DecodeAttentionWorkspace? _workspace;
    private QuantizedAttentionKernels? _kernels;

    public override string Op => "quant.attention";
    public override string Shape => QuantBenchCases.Shape(tokens, name);
    public override long BytesMoved => QuantBenchCases.PoolBytes(_spec.KeyPool) + QuantBenchCases.PoolBytes(_spec.ValuePool) + 2 * _spec.Elements * 2;
    public override double? GoalPercent => 80;
    public override long SharedAllocationBytes => _spec.KeyPool.TokenScaleCount * 4 * 2 + _spec.KeyPool.GroupParamCount * 2 * 2 + 2 * _spec.Elements * 2;
    public override long SetAllocationBytes => _spec.KeyPool.CodeBytes + _spec.ValuePool.CodeBytes;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _kernels = new QuantizedAttentionKernels(device);
        _query = AttentionBenchCases.Filled(device, _spec.Elements, block);
        _output = device.Allocate<BFloat16>(_spec.Elements);
        // Scales and parameters: small positive values (a scale of 0 would be legal too; the timing does not depend on them).
        _kScales = Scales(device, _spec.KeyPool.TokenScaleCount);
        _vScales = Scales(device, _spec.ValuePool.TokenScaleCount);
        _kParams = AttentionBenchCases.Filled(device, Math.Max(1, _spec.KeyPool.GroupParamCount), block);
        _vParams = AttentionBenchCases.Filled(device, Math.Max(1, _spec.ValuePool.GroupParamCount), block);
        var pages = Enumerable.Range(0, _spec.Pages.NumPages).ToArray();
        rng.Shuffle(pages);
        _table = new DeviceBlockTable(device, Batch, _spec.MaxPagesPerSequence);
        _table.Update(pages, Enumerable.Repeat(tokens, Batch).ToArray(), _spec.Pages);
        _workspace = new DecodeAttentionWorkspace(device, _spec.Rows, HeadDim, 64);
        var codes = new byte[1 << 20];
        rng.NextBytes(codes);
        for (int i = 0; i < codes.Length; i++) if ((codes[i] & 0x7F) == 0x7F) codes[i] = 0x11;   // no fp8 NaN codes
        for (int s = 0; s < sets; s++) _sets.Add((Codes(device, _spec.KeyPool.CodeBytes, codes), Codes(device, _spec.ValuePool.CodeBytes, codes)));
    }

    private const int Batch = QuantBenchCases.Batch, HeadDim = QuantBenchCases.HeadDim;

    private static DeviceMemory<float> Scales(CudaDevice device, long count)
    {
        var memory = device.Allocate<float>(Math.Max(1, count));
        var host = Enumerable.Repeat(0.01f, (int)Math.Min(Math.Max(1, count), 1 << 20)).ToArray();
        for (long at = 0; at < memory.Length; at += host.Length)
            memory.Span.Slice(at, Math.Min(host.Length, memory.Length - at)).CopyFrom(host.AsSpan(0, (int)Math.Min(host.Length, memory.Length - at)));
        return memory;
    }

    private static DeviceMemory<byte> Codes(CudaDevice device, long count, byte[] block)
    {
        var memory = device.Allocate<byte>(count);
        for (long at = 0; at < count; at += block.Length)
            memory.Span.Slice(at, Math.Min(block.Length, count - at)).CopyFrom(block.AsSpan(0, (int)Math.Min(block.Length, count - at)));
        return memory;
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (k, v) = _sets[set];
        _kernels!.Decode(_spec, _query!.Span, new DeviceQuantizedTensor<BFloat16>(k.Span, _kScales!.Span, null, _kParams!.Span),
            new DeviceQuantizedTensor<BFloat16>(v.Span, _vScales!.Span, null, _vParams!.Span), _table!, _output!.Span, default, _workspace, stream);
    }

    public override void Dispose()
    {
        foreach (var (k, v) in _sets)
        {
            k.Dispose();
            v.Dispose();
        }
        _sets.Clear();
        _query?.Dispose();
        _output?.Dispose();
        _kParams?.Dispose();
        _vParams?.Dispose();
        _kScales?.Dispose();
        _vScales?.Dispose();
        _table?.Dispose();
        _workspace?.Dispose();
    }
}

/// <summary>The same shape, unquantized bf16 K/V, through the decode-attention kernels (the speed-up's baseline).</summary>
internal sealed class GpuUnquantizedAttention(int tokens) : GpuBenchCase
{
    private readonly DecodeAttentionSpec _spec = new(QuantBenchCases.Batch, 1, QuantBenchCases.QueryHeads, QuantBenchCases.KvHeads, QuantBenchCases.HeadDim,
        KvCacheShape.Paged(QuantBenchCases.Batch * tokens / QuantBenchCases.PageSize, QuantBenchCases.PageSize, tokens / QuantBenchCases.PageSize))
    {
        InputType = AttentionElement.BFloat16,
        OutputType = AttentionElement.BFloat16,
    };
    private readonly List<(DeviceMemory<BFloat16> K, DeviceMemory<BFloat16> V)> _sets = [];
    private DeviceMemory<BFloat16>? _query, _output;
    private DeviceBlockTable? _table;
    private DecodeAttentionWorkspace? _workspace;
    private DecodeAttentionKernels? _kernels;

    public override string Op => "quant.attention";
    public override string Shape => QuantBenchCases.Shape(tokens, "bf16");
    public override long BytesMoved => 2 * _spec.KeyElements * 2 + (_spec.QueryElements + _spec.OutputElements) * 2;
    public override double? GoalPercent => null;
    public override long SharedAllocationBytes => (_spec.QueryElements + _spec.OutputElements) * 2;
    public override long SetAllocationBytes => 2 * _spec.KeyElements * 2;

    public override void Prepare(CudaDevice device, CudaStream stream, int sets, int seed)
    {
        var rng = new Random(seed);
        var block = AttentionBenchCases.HostValues(1 << 20, seed);
        _kernels = new DecodeAttentionKernels(device);
        _query = AttentionBenchCases.Filled(device, _spec.QueryElements, block);
        _output = device.Allocate<BFloat16>(_spec.OutputElements);
        var pages = Enumerable.Range(0, _spec.Cache.NumPages).ToArray();
        rng.Shuffle(pages);
        _table = new DeviceBlockTable(device, _spec.BatchSize, _spec.Cache.MaxPagesPerSequence);
        _table.Update(pages, Enumerable.Repeat(tokens, _spec.BatchSize).ToArray(), _spec.KeyPool);
        _workspace = new DecodeAttentionWorkspace(device, _spec.LseElements, _spec.OutputDim, 64);
        for (int s = 0; s < sets; s++) _sets.Add((AttentionBenchCases.Filled(device, _spec.KeyElements, block), AttentionBenchCases.Filled(device, _spec.KeyElements, block)));
    }

    public override void Enqueue(CudaStream stream, int set)
    {
        var (k, v) = _sets[set];
        _kernels!.Run(_spec, _query!.Span, k.Span, v.Span, _table!, _output!.Span, default, _workspace, stream: stream);
    }

    public override void Dispose()
    {
        foreach (var (k, v) in _sets)
        {
            k.Dispose();
            v.Dispose();
        }
        _sets.Clear();
        _query?.Dispose();
        _output?.Dispose();
        _table?.Dispose();
        _workspace?.Dispose();
    }
}
