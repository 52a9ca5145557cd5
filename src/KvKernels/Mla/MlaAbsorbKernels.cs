using System.Collections.Concurrent;
using KvKernels.Attention;
using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Cuda.Interop;

namespace KvKernels.Mla;

/// <summary>Who runs the MLA absorption GEMMs.</summary>
public enum MlaGemmBackend
{
    /// <summary>cuBLAS on a CUDA device when it is installed, else the library's own kernels.</summary>
    Auto,

    /// <summary>cuBLAS strided-batched GEMMs (fp32 accumulation); fails on a host without cuBLAS or on the emulator.</summary>
    Cublas,

    /// <summary>The library's own CUDA-core kernels (<c>cuda/mla/absorb.cu</c>): only the driver and NVRTC needed.</summary>
    OwnKernel,
}

/// <summary>
/// The absorption GEMMs of MLA decode on the GPU: <see cref="AbsorbQuery{T}"/> (q_nope · W_UK packed with q_pe into the
/// query latent attention takes) and <see cref="Unabsorb{TIn, TOut}"/> (o_lat · W_UVᵀ), the functions of
/// <see cref="MlaCpu.AbsorbQuery{T}"/> and <see cref="MlaCpu.Unabsorb{TIn, TOut}"/> (fp32 accumulation, one rounding;
/// the summation order differs, so results may differ from the CPU in the last bit). Stream-ordered, no allocation once
/// loaded. Owns a cuBLAS handle when it uses cuBLAS.
/// </summary>
public sealed class MlaAbsorbKernels : IDisposable
{
    /// <summary>The kernel source, under <c>cuda/</c>.</summary>
    public const string Source = "mla/absorb.cu";

    /// <summary>The entry points every specialization contains.</summary>
    public static IReadOnlyList<string> EntryPoints { get; } = ["mla_absorb_query", "mla_unabsorb", "mla_pack_rope"];

    /// <summary>Shipped specializations: DeepSeek's dims (512/64/128/128) with fp16 and bf16 inputs, output of the input
    /// type, and bf16 with an fp32 output. Other shapes compile on first use.</summary>
    public static IReadOnlyList<KernelSpecialization> Specializations { get; } =
    [
        Specialize(new AbsorbKey(MlaShape.DeepSeek(), AttentionElement.Float16, AttentionElement.Float16)),
        Specialize(new AbsorbKey(MlaShape.DeepSeek(), AttentionElement.BFloat16, AttentionElement.BFloat16)),
        Specialize(new AbsorbKey(MlaShape.DeepSeek(), AttentionElement.BFloat16, AttentionElement.Float32)),
    ];

    private const int Rows = 16;            // token rows per CTA (the kernels' kRows)
    private const int AbsorbColumns = 256;  // latent columns per absorb CTA
    private const int UnabsorbColumns = 8;  // output columns per un-absorb CTA

    private readonly CudaDevice _device;
    private readonly CublasHandle? _cublas;
    private readonly ConcurrentDictionary<AbsorbKey, (CudaKernel Absorb, CudaKernel Unabsorb, CudaKernel PackRope)> _modules = new();

    /// <summary>Binds the GEMMs to <paramref name="device"/>.</summary>
    /// <param name="device">A CUDA or emulated device.</param>
    /// <param name="backend">Who runs the GEMMs; <see cref="MlaGemmBackend.Cublas"/> needs cuBLAS and a CUDA device.</param>
    /// <exception cref="ArgumentException"><see cref="MlaGemmBackend.Cublas"/> on the emulator.</exception>
    /// <exception cref="CudaUnavailableException"><see cref="MlaGemmBackend.Cublas"/> without cuBLAS.</exception>
    public MlaAbsorbKernels(CudaDevice device, MlaGemmBackend backend = MlaGemmBackend.Auto)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (!Enum.IsDefined(backend)) throw new ArgumentException($"backend is {backend}; expected Auto, Cublas or OwnKernel.", nameof(backend));
        _device = device;
        bool cuda = device.Kind == DeviceKind.Cuda;
        if (backend == MlaGemmBackend.Cublas && !cuda) throw new ArgumentException("cuBLAS needs a CUDA device; this one is emulated.", nameof(backend));
        if (backend == MlaGemmBackend.Cublas || (backend == MlaGemmBackend.Auto && cuda && Cublas.IsAvailable)) _cublas = new CublasHandle(device);
        Backend = _cublas is null ? MlaGemmBackend.OwnKernel : MlaGemmBackend.Cublas;
    }

    /// <summary>The backend in use: <see cref="MlaGemmBackend.Cublas"/> or <see cref="MlaGemmBackend.OwnKernel"/>.</summary>
    public MlaGemmBackend Backend { get; }

    /// <summary>
    /// <c>query[m, h] = [round(q_nope[m, h] · W_UK[h]) ; q_pe[m, h]]</c>, the packed query <c>[B, q_len, H, RowDim]</c> of
    /// latent attention, in the input type.
    /// </summary>
    /// <param name="spec">Shapes and types (M = B · q_len).</param>
    /// <param name="queryNope">q_nope <c>[B, q_len, H, NopeDim]</c>.</param>
    /// <param name="queryRope">q_pe <c>[B, q_len, H, RopeDim]</c>.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="query">Packed query, written.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, element type, buffer length or device; nothing is launched.</exception>
    public void AbsorbQuery<T>(in MlaAttentionSpec spec, DeviceSpan<T> queryNope, DeviceSpan<T> queryRope, DeviceSpan<T> weights,
        DeviceSpan<T> query, CudaStream? stream = null) where T : unmanaged
    {
        ValidateAbsorb(spec, queryNope, queryRope, weights, query);
        if (spec.TokenRows == 0) return;
        var shape = spec.Shape;
        var kernels = Module(new AbsorbKey(shape, spec.InputType, spec.InputType));
        int m = (int)spec.TokenRows;
        if (_cublas is not null)
        {
            Gemm(AbsorbGemm(shape, m), weights, queryNope, query, spec.InputType, stream);
            var pack = new KernelArguments();
            pack.Add(queryRope);
            pack.Add(query);
            pack.Add(m * shape.NumHeads);
            long pairs = (long)m * shape.NumHeads * (shape.RopeDim / 2);
            kernels.PackRope.Launch(new Dim3((uint)((pairs + 255) / 256)), 256, 0, stream, ref pack);
            return;
        }
        var args = new KernelArguments();
        args.Add(queryNope);
        args.Add(queryRope);
        args.Add(weights);
        args.Add(query);
        args.Add(m);
        args.Add(shape.NumHeads);
        var grid = new Dim3((uint)((shape.LatentDim + AbsorbColumns - 1) / AbsorbColumns), (uint)shape.NumHeads, (uint)((m + Rows - 1) / Rows));
        kernels.Absorb.Launch(grid, AbsorbColumns / 2, 0, stream, ref args);
    }

    /// <summary><c>output[m, h] = o_lat[m, h] · W_UV[h]ᵀ</c>, <c>[B, q_len, H, ValueDim]</c> in the output type.</summary>
    /// <param name="spec">Shapes and types.</param>
    /// <param name="latentOutput">o_lat <c>[B, q_len, H, LatentDim]</c> in the input type.</param>
    /// <param name="weights">wkv_b <c>[H, NopeDim + ValueDim, LatentDim]</c>.</param>
    /// <param name="output">Output, written.</param>
    /// <param name="stream">Stream (the default stream when null).</param>
    /// <exception cref="ArgumentException">A bad spec, element type, buffer length or device; nothing is launched.</exception>
    public void Unabsorb<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> latentOutput, DeviceSpan<TIn> weights, DeviceSpan<TOut> output,
        CudaStream? stream = null) where TIn : unmanaged where TOut : unmanaged
    {
        ValidateUnabsorb(spec, latentOutput, weights, output);
        if (spec.TokenRows == 0) return;
        var shape = spec.Shape;
        int m = (int)spec.TokenRows;
        if (_cublas is not null)
        {
            Gemm(UnabsorbGemm(shape, m), weights, latentOutput, output, spec.OutputType, stream);
            return;
        }
        var kernels = Module(new AbsorbKey(shape, spec.InputType, spec.OutputType));
        var args = new KernelArguments();
        args.Add(latentOutput);
        args.Add(weights);
        args.Add(output);
        args.Add(m);
        args.Add(shape.NumHeads);
        var grid = new Dim3((uint)((shape.ValueDim + UnabsorbColumns - 1) / UnabsorbColumns), (uint)shape.NumHeads, (uint)((m + Rows - 1) / Rows));
        kernels.Unabsorb.Launch(grid, UnabsorbColumns * 32, 0, stream, ref args);
    }

    /// <summary>
    /// The absorption as one column-major strided-batched GEMM over the heads (offsets and strides in elements). Row-major
    /// <c>C_h [M, Dc]</c> (row stride H·RowDim, inside the packed query) = <c>A_h [M, Dn]</c> (row stride H·Dn) ·
    /// <c>W_UK[h] [Dn, Dc]</c> is column-major <c>C_hᵀ = W_UK[h]ᵀ · A_hᵀ</c>: m = Dc, n = M, k = Dn; the first operand is
    /// W_UK[h] read column-major (Dc × Dn, ld Dc, head stride (Dn + Dv)·Dc), the second the queries (Dn × M, ld H·Dn,
    /// head stride Dn), C with ld H·RowDim and head stride RowDim (the q_pe tail is left alone).
    /// </summary>
    internal static StridedGemm AbsorbGemm(in MlaShape shape, int tokenRows) =>
        new(false, false, shape.LatentDim, tokenRows, shape.NopeDim,
            0, shape.LatentDim, (long)(shape.NopeDim + shape.ValueDim) * shape.LatentDim,
            0, shape.NumHeads * shape.NopeDim, shape.NopeDim,
            0, shape.NumHeads * shape.RowDim, shape.RowDim, shape.NumHeads);

    /// <summary>
    /// The un-absorption as one GEMM: row-major <c>out_h [M, Dv] = O_h [M, Dc] · W_UV[h]ᵀ</c> is column-major
    /// <c>out_hᵀ = W_UV[h] · O_hᵀ</c>; W_UV[h], stored row-major [Dv, Dc], is the column-major Dc × Dv matrix W_UVᵀ, so the
    /// first operand is transposed: m = Dv, n = M, k = Dc, A at W_UV's offset Dn·Dc (ld Dc), B = O (ld H·Dc, head stride
    /// Dc), C ld H·Dv, head stride Dv.
    /// </summary>
    internal static StridedGemm UnabsorbGemm(in MlaShape shape, int tokenRows) =>
        new(true, false, shape.ValueDim, tokenRows, shape.LatentDim,
            (long)shape.NopeDim * shape.LatentDim, shape.LatentDim, (long)(shape.NopeDim + shape.ValueDim) * shape.LatentDim,
            0, shape.NumHeads * shape.LatentDim, shape.LatentDim,
            0, shape.NumHeads * shape.ValueDim, shape.ValueDim, shape.NumHeads);

    private void Gemm<TIn, TOut>(in StridedGemm g, DeviceSpan<TIn> a, DeviceSpan<TIn> b, DeviceSpan<TOut> c, AttentionElement outputType, CudaStream? stream)
        where TIn : unmanaged where TOut : unmanaged
    {
        var inType = DataType(DecodeAttentionSpec.ElementOf<TIn>()!.Value);
        _cublas!.GemmStridedBatched(g.TransA ? cublasOperation_t.CUBLAS_OP_T : cublasOperation_t.CUBLAS_OP_N,
            g.TransB ? cublasOperation_t.CUBLAS_OP_T : cublasOperation_t.CUBLAS_OP_N, g.M, g.N, g.K, 1f,
            a.Slice(g.AOffset).Pointer, inType, g.Lda, g.StrideA, b.Slice(g.BOffset).Pointer, inType, g.Ldb, g.StrideB,
            0f, c.Slice(g.COffset).Pointer, DataType(outputType), g.Ldc, g.StrideC, g.Batch, stream);
    }

    /// <summary>Every check <see cref="AbsorbQuery{T}"/> makes, without launching.</summary>
    internal void ValidateAbsorb<T>(in MlaAttentionSpec spec, DeviceSpan<T> queryNope, DeviceSpan<T> queryRope, DeviceSpan<T> weights,
        DeviceSpan<T> query) where T : unmanaged
    {
        spec.ValidateAbsorbBuffers<T>(queryNope.Length, queryRope.Length, weights.Length, query.Length);
        CheckBuffer(queryNope, nameof(queryNope));
        CheckBuffer(queryRope, nameof(queryRope));
        CheckBuffer(weights, nameof(weights));
        CheckBuffer(query, nameof(query));
        CheckRows(spec);
    }

    /// <summary>Every check <see cref="Unabsorb{TIn, TOut}"/> makes, without launching.</summary>
    internal void ValidateUnabsorb<TIn, TOut>(in MlaAttentionSpec spec, DeviceSpan<TIn> latentOutput, DeviceSpan<TIn> weights, DeviceSpan<TOut> output)
        where TIn : unmanaged where TOut : unmanaged
    {
        spec.ValidateUnabsorbBuffers<TIn, TOut>(latentOutput.Length, weights.Length, output.Length);
        CheckBuffer(latentOutput, nameof(latentOutput));
        CheckBuffer(weights, nameof(weights));
        CheckBuffer(output, nameof(output));
        CheckRows(spec);
    }

    private static void CheckRows(in MlaAttentionSpec spec)
    {
        // Grid z counts chunks of token rows (at most 65535) and cuBLAS takes int dims.
        if (spec.TokenRows > 65535L * Rows)
            throw new ArgumentException($"The call has {spec.TokenRows} token rows (B · q_len); at most {65535L * Rows} are supported.", nameof(spec));
    }

    /// <summary>A non-empty buffer must live on this device and be 4-byte aligned (the kernels move element pairs).</summary>
    private void CheckBuffer<T>(DeviceSpan<T> span, string name) where T : unmanaged
    {
        if (span.IsEmpty) return;
        _device.EnsureSame(span.Device, name);
        if (span.Pointer % 4 != 0) throw new ArgumentException($"{name} is at 0x{span.Pointer:x}; the absorption kernels need 4-byte aligned buffers.", name);
    }

    private static cudaDataType_t DataType(AttentionElement type) => type switch
    {
        AttentionElement.Float16 => cudaDataType_t.CUDA_R_16F,
        AttentionElement.BFloat16 => cudaDataType_t.CUDA_R_16BF,
        _ => cudaDataType_t.CUDA_R_32F,
    };

    private (CudaKernel Absorb, CudaKernel Unabsorb, CudaKernel PackRope) Module(in AbsorbKey key)
    {
        if (_modules.TryGetValue(key, out var module)) return module;
        return _modules.GetOrAdd(key, k =>
        {
            var loaded = _device.LoadModule(Specialize(k));
            return (loaded.GetKernel(EntryPoints[0]), loaded.GetKernel(EntryPoints[1]), loaded.GetKernel(EntryPoints[2]));
        });
    }

    private static KernelSpecialization Specialize(in AbsorbKey key) =>
        KernelSpecialization.Create(Source,
            ("LATENT_DIM", key.Shape.LatentDim),
            ("ROPE_DIM", key.Shape.RopeDim),
            ("NOPE_DIM", key.Shape.NopeDim),
            ("VALUE_DIM", key.Shape.ValueDim),
            ("INPUT_BF16", key.Input == AttentionElement.BFloat16 ? 1 : 0),
            ("OUT_TYPE", key.Output switch { AttentionElement.Float16 => 0, AttentionElement.BFloat16 => 1, _ => 2 }));

    /// <summary>Destroys the cuBLAS handle, if any.</summary>
    public void Dispose() => _cublas?.Dispose();

    /// <summary>A module is specialized on the dims (not the head count) and the element types.</summary>
    private readonly record struct AbsorbKey(int LatentDim, int RopeDim, int NopeDim, int ValueDim, AttentionElement Input, AttentionElement Output)
    {
        public AbsorbKey(in MlaShape shape, AttentionElement input, AttentionElement output)
            : this(shape.LatentDim, shape.RopeDim, shape.NopeDim, shape.ValueDim, input, output) { }

        public MlaShape Shape => new(1, LatentDim, RopeDim, NopeDim, ValueDim);
    }
}

/// <summary>One column-major strided-batched GEMM <c>C[p] = op(A[p]) · op(B[p])</c> (cuBLAS's convention), offsets and
/// strides in elements.</summary>
internal readonly record struct StridedGemm(bool TransA, bool TransB, int M, int N, int K, long AOffset, int Lda, long StrideA,
    long BOffset, int Ldb, long StrideB, long COffset, int Ldc, long StrideC, int Batch);
