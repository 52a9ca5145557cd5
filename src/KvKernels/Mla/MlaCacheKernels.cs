using System.Collections.Concurrent;
using KvKernels.Attention;
using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Mla;

/// <summary>
/// The MLA latent cache write on the GPU (<c>cuda/mla/cache.cu</c>), the function of
/// <see cref="MlaCpu.WriteCache{T}"/>: RMSNorm of c_kv (bit-identical to the CPU), RoPE of k_pe (within one unit of
/// the cache type: sin/cos differ by an ulp), one row per token at its slot. Owns the RoPE frequency tables it uploads
/// (once per distinct <see cref="MlaRope"/>), hence <see cref="IDisposable"/>; no allocation per call after that.
/// </summary>
public sealed class MlaCacheKernels : IDisposable
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "mla/cache.cu";

    /// <summary>The entry points every specialization contains.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } = ["mla_cache_write"];

    /// <summary>Shipped specializations: DeepSeek's 512 + 64 with RMSNorm, interleaved RoPE, fp16 and bf16; bf16 with
    /// rotate-half (Hugging Face ports). Others compile on first use.</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        Specialize(new CacheKey(512, 64, AttentionElement.Float16, RopeStyle.Interleaved, true)),
        Specialize(new CacheKey(512, 64, AttentionElement.BFloat16, RopeStyle.Interleaved, true)),
        Specialize(new CacheKey(512, 64, AttentionElement.BFloat16, RopeStyle.RotateHalf, true)),
    ];

    private const int TokensPerCta = 8;

    private readonly CudaDevice _device;
    private readonly ConcurrentDictionary<CacheKey, CudaKernel> _kernels = new();
    private readonly ConcurrentDictionary<(MlaRope Rope, int RopeDim), DeviceMemory<float>> _frequencies = new();

    /// <summary>Binds the op to <paramref name="device"/>; kernels are compiled and loaded on first use.</summary>
    public MlaCacheKernels(CudaDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
    }

    /// <summary>
    /// Writes <see cref="MlaCacheWriteSpec.NumTokens"/> tokens' latent rows into the pool at their slots; see
    /// <see cref="MlaCacheWriteSpec"/>.
    /// </summary>
    /// <param name="spec">Shapes, pool, RoPE, norm options.</param>
    /// <param name="latent">c_kv <c>[T, LatentDim]</c> (row stride <see cref="MlaCacheWriteSpec.LatentStride"/>; even, 4-byte aligned).</param>
    /// <param name="ropeKey">k_pe <c>[T, RopeDim]</c> before RoPE (row stride <see cref="MlaCacheWriteSpec.RopeStride"/>).</param>
    /// <param name="positions"><c>[T]</c> positions; default without RoPE.</param>
    /// <param name="slots">The tokens' slots, validated for <see cref="MlaCacheWriteSpec.Pool"/>.</param>
    /// <param name="normWeight">RMSNorm weight <c>[LatentDim]</c>; default without the norm.</param>
    /// <param name="cache">The latent pool.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, buffer, slot mapping or alignment; nothing is launched.</exception>
    public void Write<T>(in MlaCacheWriteSpec spec, DeviceSpan<T> latent, DeviceSpan<T> ropeKey, DeviceSpan<int> positions,
        DeviceSlotMapping slots, DeviceSpan<T> normWeight, DeviceSpan<T> cache, CudaStream? stream = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(slots);
        spec.ValidateBuffers<T>(latent.Length, ropeKey.Length, positions.Length, slots.Count, normWeight.Length, cache.Length);
        if (!ReferenceEquals(slots.Device, _device)) throw new ArgumentException("The slot mapping belongs to another device.", nameof(slots));
        if (slots.Pool != spec.Pool) throw new ArgumentException($"The slots were validated for {slots.Pool}; the spec's pool is {spec.Pool}.", nameof(slots));
        if (spec.EffectiveLatentStride % 2 != 0 || spec.EffectiveRopeStride % 2 != 0)
            throw new ArgumentException($"LatentStride {spec.EffectiveLatentStride} and RopeStride {spec.EffectiveRopeStride} must be even (the kernel reads element pairs).", nameof(spec));
        CheckBuffer(latent, nameof(latent));
        CheckBuffer(ropeKey, nameof(ropeKey));
        CheckBuffer(positions, nameof(positions));
        CheckBuffer(normWeight, nameof(normWeight));
        CheckBuffer(cache, nameof(cache));
        if (spec.NumTokens == 0) return;

        var kernel = Kernel(new CacheKey(spec.Shape.LatentDim, spec.Shape.RopeDim, spec.ElementType, spec.Rope.Style, spec.Normalize));
        var args = new KernelArguments();
        args.Add(latent);
        args.Add(ropeKey);
        args.AddPointer(spec.Rope.Style == RopeStyle.None ? 0 : positions.Pointer);
        args.Add(slots.Slots);
        args.AddPointer(spec.Normalize ? normWeight.Pointer : 0);
        args.AddPointer(spec.Rope.Style == RopeStyle.None ? 0 : Frequencies(spec.Rope, spec.Shape.RopeDim).Pointer);
        args.Add(cache);
        args.Add(spec.NumTokens);
        args.Add((long)spec.EffectiveLatentStride);
        args.Add((long)spec.EffectiveRopeStride);
        args.Add(spec.Epsilon);
        kernel.Launch(new Dim3((uint)((spec.NumTokens + TokensPerCta - 1) / TokensPerCta)), TokensPerCta * 32, 0, stream, ref args);
    }

    /// <summary>Frees the uploaded frequency tables.</summary>
    public void Dispose()
    {
        foreach (var table in _frequencies.Values) table.Dispose();
        _frequencies.Clear();
    }

    /// <summary>The table of <paramref name="rope"/>'s inverse frequencies on the device, uploaded on first use.</summary>
    private DeviceMemory<float> Frequencies(in MlaRope rope, int ropeDim)
    {
        if (_frequencies.TryGetValue((rope, ropeDim), out var table)) return table;
        var r = rope;
        return _frequencies.GetOrAdd((rope, ropeDim), _ => _device.Allocate<float>(r.InverseFrequencies(ropeDim)));
    }

    /// <summary>A non-empty buffer must live on this device and be 4-byte aligned (element pairs).</summary>
    private void CheckBuffer<T>(DeviceSpan<T> span, string name) where T : unmanaged
    {
        if (span.IsEmpty) return;
        _device.EnsureSame(span.Device, name);
        if (span.Pointer % 4 != 0) throw new ArgumentException($"{name} is at 0x{span.Pointer:x}; the cache write reads element pairs and needs 4-byte alignment.", name);
    }

    private CudaKernel Kernel(in CacheKey key)
    {
        if (_kernels.TryGetValue(key, out var kernel)) return kernel;
        return _kernels.GetOrAdd(key, k => _device.LoadModule(Specialize(k)).GetKernel(EntryPoints[0]));
    }

    private static KernelSpecialization Specialize(in CacheKey key) =>
        KernelSpecialization.Create(Source,
            ("LATENT_DIM", key.LatentDim),
            ("ROPE_DIM", key.RopeDim),
            ("INPUT_BF16", key.Type == AttentionElement.BFloat16 ? 1 : 0),
            ("ROPE_STYLE", (int)key.Rope),
            ("NORMALIZE", key.Normalize ? 1 : 0));

    private readonly record struct CacheKey(int LatentDim, int RopeDim, AttentionElement Type, RopeStyle Rope, bool Normalize);
}
