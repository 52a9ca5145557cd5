using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Quantization;

/// <summary>
/// The engine's per-tensor or per-KV-head scales of an fp8 / int8 tensor on the device, validated (finite, &gt; 0) on
/// upload or computed on the device by <see cref="KvQuantKernels.CalibrateScales{T}"/> (which only writes valid
/// scales). Owns its device memory.
/// </summary>
public sealed class DeviceKvScales : IDisposable
{
    private readonly DeviceMemory<float> _scales;
    private readonly DeviceMemory<uint> _amax;

    /// <summary>Room for up to <paramref name="capacity"/> scales (1 per tensor, or one per KV head).</summary>
    public DeviceKvScales(CudaDevice device, int capacity)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        Device = device;
        Capacity = capacity;
        _scales = device.Allocate<float>(capacity);
        _amax = device.Allocate<uint>(capacity);
    }

    /// <summary>The device.</summary>
    public CudaDevice Device { get; }

    /// <summary>Most scales held.</summary>
    public int Capacity { get; }

    /// <summary>Scales currently held (0 until the first update).</summary>
    public int Count { get; private set; }

    internal DeviceSpan<float> Scales => _scales.Span.Slice(0, Math.Max(Count, 1));

    internal DeviceSpan<uint> AmaxScratch(int count) => _amax.Span.Slice(0, count);

    internal void SetCount(int count) => Count = count;

    /// <summary>Validates (finite, &gt; 0) and uploads <paramref name="scales"/>.</summary>
    /// <exception cref="ArgumentException">Too many scales, or one that is not finite and positive; nothing changes.</exception>
    public void Update(ReadOnlySpan<float> scales, CudaStream? stream = null)
    {
        if (scales.Length is 0 || scales.Length > Capacity)
            throw new ArgumentException($"scales has {scales.Length} entries; expected 1..{Capacity}.", nameof(scales));
        QuantChecks.GivenScales(scales, nameof(scales));
        var target = _scales.Span.Slice(0, scales.Length);
        if (stream is null) target.CopyFrom(scales);
        else target.CopyFrom(scales, stream);
        Count = scales.Length;
    }

    /// <summary>Frees the device memory.</summary>
    public void Dispose()
    {
        _scales.Dispose();
        _amax.Dispose();
    }
}

/// <summary>
/// The GPU quantization ops (<c>cuda/quant/quant.cu</c>) on one device: quantize on append, dequantize a batch, calibrate
/// scales. Same functions, validation and bits as <see cref="KvQuantCpu"/>. Stream-ordered; nothing is allocated per
/// call once the kernels are loaded.
/// </summary>
public sealed class KvQuantKernels
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "quant/quant.cu";

    /// <summary>The entry points of every specialization.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } = ["quant_quantize", "quant_dequantize", "quant_amax", "quant_amax_scales"];

    private static readonly (KvCodec Codec, int Bits)[] Codes =
        [(KvCodec.Fp8E4M3, 8), (KvCodec.Fp8E5M2, 8), (KvCodec.Int8, 8), (KvCodec.Asymmetric, 8), (KvCodec.Asymmetric, 4), (KvCodec.Asymmetric, 2)];

    /// <summary>Every specialization the library ships: fp16/bf16 × (fp8 e4m3, fp8 e5m2, int8, asymmetric 8/4/2).</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        .. from bf16 in new[] { false, true }
           from code in Codes
           select Specialize(code.Codec, code.Bits, bf16),
    ];

    private const int Threads = 256;
    private readonly CudaDevice _device;
    private readonly CudaKernel?[] _kernels = new CudaKernel?[Specializations.Count * 4];

    /// <summary>Binds the ops to <paramref name="device"/>; kernels compile on first use.</summary>
    public KvQuantKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    private static KernelSpecialization Specialize(KvCodec codec, int bits, bool bf16) => KernelSpecialization.Create(Source,
        ("INPUT_BF16", bf16 ? 1 : 0), ("QUANT_CODEC", codec switch { KvCodec.Fp8E4M3 => 0, KvCodec.Fp8E5M2 => 1, KvCodec.Int8 => 2, _ => 3 }),
        ("QUANT_BITS", bits));

    /// <summary>Quantizes source tokens into the pool; see <see cref="KvQuantCpu.Quantize{T}"/>.</summary>
    /// <param name="spec">Pool, token count and source stride.</param>
    /// <param name="source">Source rows (fp16 or bf16).</param>
    /// <param name="slots">Slots validated for this spec's pool (<see cref="DeviceSlotMapping.UpdateGroups"/> for token
    /// groups, with the format's group size).</param>
    /// <param name="givenScales">The engine's scales (per tensor or KV head fp8/int8); else null.</param>
    /// <param name="codes">Codes of the pool, written.</param>
    /// <param name="tokenScales">Per-token scales, written (fp8/int8 per token); else default.</param>
    /// <param name="groupParams">(scale, minimum) pairs, written (asymmetric); else default.</param>
    /// <param name="stream">Stream (default stream when null).</param>
    public void Quantize<T>(in KvQuantizeSpec spec, DeviceSpan<T> source, DeviceSlotMapping slots, DeviceKvScales? givenScales,
        DeviceSpan<byte> codes, DeviceSpan<float> tokenScales, DeviceSpan<T> groupParams, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(slots);
        var pool = spec.Pool;
        spec.ValidateBuffers<T>(source.Length, slots.Count, givenScales?.Count ?? 0, codes.Length, tokenScales.Length, groupParams.Length);
        if (!ReferenceEquals(slots.Device, _device)) throw new ArgumentException("The slot mapping belongs to another device.", nameof(slots));
        if (slots.Pool.NumPages != pool.Pages.NumPages || slots.Pool.PageSize != pool.Pages.PageSize)
            throw new ArgumentException($"The slots were validated for {slots.Pool.NumPages} pages of {slots.Pool.PageSize}; the pool has {pool.Pages.NumPages} of {pool.Pages.PageSize}.", nameof(slots));
        int group = pool.TokenGroups ? pool.Group : 1;
        if (slots.GroupSize != group)
            throw new ArgumentException($"The slots were validated for groups of {slots.GroupSize} tokens; {pool.Format} needs {group}.", nameof(slots));
        CheckGivenScales(givenScales, pool);
        CheckDevice(source, nameof(source));
        CheckDevice(codes, nameof(codes));
        Aligned(codes, 4, nameof(codes));
        Aligned(source, 2, nameof(source));
        if (pool.Format.HasTokenScales) CheckDevice(tokenScales, nameof(tokenScales));
        if (pool.Format.HasGroupParams) CheckDevice(groupParams, nameof(groupParams));
        if (spec.NumTokens == 0) return;

        long work = (long)spec.SlotCount * pool.Pages.NumKvHeads * (pool.TokenGroups ? pool.Pages.HeadDim
            : pool.Format.HasGroupParams ? pool.Pages.HeadDim / pool.Group : 1);
        var args = new KernelArguments();
        args.Add(source);
        args.Add(slots.Slots);
        args.AddPointer(givenScales?.Scales.Pointer ?? 0);
        args.Add(codes);
        args.AddPointer(tokenScales.Pointer);
        args.AddPointer(groupParams.Pointer);
        args.Add(spec.SlotCount);
        args.Add(spec.Stride);
        AddPool(ref args, pool);
        args.Add(pool.Format.Convention == Fp8ScaleConvention.MultiplyReciprocal ? 1 : 0);
        Kernel<T>(pool.Format, 0).Launch(new Dim3(Blocks(work)), Threads, 0, stream, ref args);
    }

    /// <summary>Dequantizes a batch into <c>[B, MaxTokens, Hkv, D]</c>; see <see cref="KvQuantCpu.Dequantize{T}"/>.</summary>
    /// <param name="spec">Pool and batch shape.</param>
    /// <param name="codes">Codes of the pool.</param>
    /// <param name="tokenScales">Per-token scales (fp8/int8 per token); else default.</param>
    /// <param name="givenScales">The engine's scales (fp8/int8 per tensor or KV head); else null.</param>
    /// <param name="groupParams">(scale, minimum) pairs (asymmetric); else default.</param>
    /// <param name="table">Block table and lengths validated for the pool's pages.</param>
    /// <param name="destination">Dequantized tensor, written.</param>
    /// <param name="stream">Stream (default stream when null).</param>
    public void Dequantize<T>(in KvDequantizeSpec spec, DeviceSpan<byte> codes, DeviceSpan<float> tokenScales, DeviceKvScales? givenScales,
        DeviceSpan<T> groupParams, DeviceBlockTable table, DeviceSpan<T> destination, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(table);
        var pool = spec.Pool;
        long scales = pool.Format.HasTokenScales ? tokenScales.Length : givenScales?.Count ?? 0;
        spec.ValidateBuffers<T>(scales, codes.Length, groupParams.Length, destination.Length);
        CheckGivenScales(givenScales, pool);
        if (!ReferenceEquals(table.Device, _device)) throw new ArgumentException("The block table belongs to another device.", nameof(table));
        if (table.BatchSize != spec.BatchSize)
            throw new ArgumentException($"The block table holds {table.BatchSize} sequences; spec.BatchSize is {spec.BatchSize}.", nameof(table));
        if (table.MaxPagesPerSequence != spec.MaxPagesPerSequence)
            throw new ArgumentException($"The block table has {table.MaxPagesPerSequence} columns; spec.MaxPagesPerSequence is {spec.MaxPagesPerSequence}.", nameof(table));
        if (table.Pool.NumPages != pool.Pages.NumPages || table.Pool.PageSize != pool.Pages.PageSize)
            throw new ArgumentException($"The block table was validated for {table.Pool.NumPages} pages of {table.Pool.PageSize}; the pool has {pool.Pages.NumPages} of {pool.Pages.PageSize}.", nameof(table));
        if (table.LongestSequence > spec.MaxTokens)
            throw new ArgumentException($"A sequence has {table.LongestSequence} tokens; the destination holds MaxTokens = {spec.MaxTokens}.", nameof(table));
        CheckDevice(codes, nameof(codes));
        CheckDevice(destination, nameof(destination));
        Aligned(codes, 4, nameof(codes));
        Aligned(destination, 16, nameof(destination));
        if (spec.DestinationElements == 0) return;

        var args = new KernelArguments();
        args.Add(codes);
        args.AddPointer(pool.Format.HasTokenScales ? tokenScales.Pointer : givenScales?.Scales.Pointer ?? 0);
        args.AddPointer(groupParams.Pointer);
        args.Add(table.Table);
        args.Add(table.Lengths);
        args.Add(destination);
        args.Add(spec.BatchSize);
        args.Add(spec.MaxPagesPerSequence);
        args.Add(spec.MaxTokens);
        AddPool(ref args, pool);
        Kernel<T>(pool.Format, 1).Launch(new Dim3(Blocks(spec.DestinationElements / 8)), Threads, 0, stream, ref args);
    }

    /// <summary>On-the-fly scales on the device; see <see cref="KvQuantCpu.CalibrateScales{T}"/>. Writes
    /// <paramref name="scales"/> (1 per tensor when <paramref name="perKvHead"/> is false, else Hkv).</summary>
    /// <param name="source">Packed rows <c>[numTokens, numKvHeads, headDim]</c>.</param>
    /// <param name="numTokens">Tokens (≥ 1).</param>
    /// <param name="numKvHeads">KV heads.</param>
    /// <param name="headDim">Head dim.</param>
    /// <param name="divisor">amax divisor (vLLM: 200 keys, 100 values).</param>
    /// <param name="perKvHead">One scale per KV head instead of one for the tensor.</param>
    /// <param name="scales">Scales, written.</param>
    /// <param name="stream">Stream (default stream when null).</param>
    public void CalibrateScales<T>(DeviceSpan<T> source, int numTokens, int numKvHeads, int headDim, float divisor, bool perKvHead,
        DeviceKvScales scales, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(scales);
        int count = perKvHead ? numKvHeads : 1;
        if (count > scales.Capacity)
            throw new ArgumentException($"The scales hold {scales.Capacity} entries; {count} are needed.", nameof(scales));
        QuantChecks.Calibration<T>(source.Length, numTokens, numKvHeads, headDim, divisor, count);
        if (!ReferenceEquals(scales.Device, _device)) throw new ArgumentException("The scales belong to another device.", nameof(scales));
        CheckDevice(source, nameof(source));
        var amax = scales.AmaxScratch(count);
        amax.FillBytes(0, stream);

        var args = new KernelArguments();
        args.Add(source);
        args.Add((long)numTokens);
        args.Add(numKvHeads);
        args.Add(headDim);
        args.Add(perKvHead ? 1 : 0);
        args.Add(amax);
        var format = new KvFormat(KvCodec.Fp8E4M3, 8);
        Kernel<T>(format, 2).Launch(new Dim3(Blocks((long)numTokens * numKvHeads)), Threads, 0, stream, ref args);

        scales.SetCount(count);
        var finish = new KernelArguments();
        finish.Add(amax);
        finish.Add(count);
        finish.Add(divisor);
        finish.Add(scales.Scales);
        Kernel<T>(format, 3).Launch(new Dim3((uint)((count + Threads - 1) / Threads)), Threads, 0, stream, ref finish);
    }

    /// <summary>The pool arguments both kernels take in this order: Hkv, D, page size, HND, token axis, group, granularity.</summary>
    private static void AddPool(ref KernelArguments args, in QuantizedKvPool pool)
    {
        args.Add(pool.Pages.NumKvHeads);
        args.Add(pool.Pages.HeadDim);
        args.Add(pool.Pages.PageSize);
        args.Add(pool.Pages.Layout == KvLayout.Hnd ? 1 : 0);
        args.Add(pool.TokenGroups ? 1 : 0);
        args.Add(pool.Format.HasGroupParams ? pool.Group : 0);
        args.Add((int)pool.Format.Granularity);
    }

    private CudaKernel Kernel<T>(in KvFormat format, int entry)
    {
        int code = Array.IndexOf(Codes, (format.Codec, format.Bits));
        int index = (typeof(T) == typeof(BFloat16) ? Codes.Length : 0) + code;
        return _kernels[index * 4 + entry] ??= _device.LoadModule(Specializations[index]).GetKernel(EntryPoints[entry]);
    }

    private uint Blocks(long work)
    {
        long needed = (work + Threads - 1) / Threads;
        return (uint)Math.Clamp(Math.Min(needed, _device.Info.MultiprocessorCount * 16L), 1, int.MaxValue);
    }

    private void CheckGivenScales(DeviceKvScales? scales, in QuantizedKvPool pool)
    {
        if (!pool.Format.HasGivenScales) return;
        if (scales is null) throw new ArgumentException($"{pool.Format} needs the engine's scales.", "givenScales");
        if (!ReferenceEquals(scales.Device, _device)) throw new ArgumentException("The scales belong to another device.", "givenScales");
    }

    private void CheckDevice<T>(DeviceSpan<T> span, string name) where T : unmanaged => _device.EnsureSame(span.Device, name);

    private static void Aligned<T>(DeviceSpan<T> span, int bytes, string name) where T : unmanaged
    {
        if (span.Pointer % (ulong)bytes != 0)
            throw new ArgumentException($"{name} is at 0x{span.Pointer:x}; expected {bytes}-byte alignment.", name);
    }
}
