using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Mla;
using KvKernels.Tests.Oracles;

namespace KvKernels.Tests.Mla;

/// <summary>
/// The GPU absorption GEMMs against the CPU twin on every backend, with each GEMM backend the device has (the own
/// kernels everywhere, cuBLAS on a CUDA device with cuBLAS). Summation orders differ, so an element may land on the
/// neighbouring value of its type: the comparison allows one unit in the last place of the type per element
/// (relative 2^-10 fp16, 2^-7 bf16, 1e-6 fp32), and outputs are poisoned first.
/// </summary>
public sealed class MlaAbsorbKernelsTests(Backends backends)
{
    public static TheoryData<string, string, int, int, int, int> Cases
    {
        get
        {
            var data = new TheoryData<string, string, int, int, int, int>();
            foreach (var backend in Backends.All)
                foreach (var gemm in new[] { "own", "cublas" })
                {
                    // backend, gemm, tokens (M), heads, latent, output type (0 fp16, 1 bf16, 2 fp32)
                    data.Add(backend, gemm, 1, 16, 512, 1);
                    data.Add(backend, gemm, 7, 4, 96, 0);
                    data.Add(backend, gemm, 19, 3, 288, 2);
                    data.Add(backend, gemm, 33, 2, 64, 1);
                }
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void AbsorbAndUnabsorb_MatchTheCpuTwin(string backend, string gemm, int tokens, int heads, int latent, int outputType)
    {
        var device = backends.Get(backend);
        if (gemm == "cublas" && (device.Kind != DeviceKind.Cuda || !Cublas.IsAvailable))
            Assert.Skip(device.Kind != DeviceKind.Cuda ? "cuBLAS runs on a CUDA device only." : "cuBLAS is not installed: " + Cublas.UnavailableReason);
        var shape = latent == 512 ? MlaShape.DeepSeek(heads) : new MlaShape(heads, latent, 32, 40, 24);
        var input = outputType == 0 ? AttentionElement.Float16 : AttentionElement.BFloat16;
        var spec = new MlaAttentionSpec(tokens, 1, shape, KvCacheShape.Contiguous(1)) { InputType = input, OutputType = (AttentionElement)outputType };
        using var ops = new MlaAbsorbKernels(device, gemm == "cublas" ? MlaGemmBackend.Cublas : MlaGemmBackend.OwnKernel);
        switch (outputType)
        {
            case 0: Check<Half, Half>(device, ops, spec, 2e-3); break;
            case 1: Check<BFloat16, BFloat16>(device, ops, spec, 1e-2); break;
            default: Check<BFloat16, float>(device, ops, spec, 1e-6); break;
        }
    }

    /// <summary>
    /// The cuBLAS path's GEMM parameters, run through a host model of cuBLAS's column-major strided-batched GEMM, give
    /// the oracle's absorption and un-absorption — the mapping is checked without a GPU (cuBLAS itself only on cuda).
    /// </summary>
    [Theory]
    [InlineData(1, 16, 512, 64, 128, 128)]
    [InlineData(5, 3, 96, 32, 40, 24)]
    public void CublasGemmMapping_ComputesTheAbsorption(int tokens, int heads, int latent, int rope, int nope, int value)
    {
        var shape = new MlaShape(heads, latent, rope, nope, value);
        var rng = new Random(tokens + heads);
        double[] Rand(long n) => Enumerable.Range(0, (int)n).Select(_ => rng.NextDouble() * 2 - 1).ToArray();
        var weights = Rand(shape.WeightElements);
        var nopeQuery = Rand((long)tokens * heads * nope);
        var latentOut = Rand((long)tokens * heads * latent);

        var query = new double[(long)tokens * heads * shape.RowDim];
        Array.Fill(query, double.NaN);   // the GEMM must write every q_latent column and no q_pe column
        ColumnMajor(MlaAbsorbKernels.AbsorbGemm(shape, tokens), weights, nopeQuery, query);
        var expected = MlaOracle.Absorb(shape, tokens, nopeQuery, weights);
        for (long r = 0; r < (long)tokens * heads; r++)
        {
            for (int c = 0; c < latent; c++) Assert.Equal(expected[r * latent + c], query[r * shape.RowDim + c], 1e-12);
            for (int c = latent; c < shape.RowDim; c++) Assert.True(double.IsNaN(query[r * shape.RowDim + c]), "the GEMM wrote into the q_pe tail");
        }

        var output = new double[(long)tokens * heads * value];
        ColumnMajor(MlaAbsorbKernels.UnabsorbGemm(shape, tokens), weights, latentOut, output);
        var expectedOut = MlaOracle.Unabsorb(shape, tokens, latentOut, weights);
        for (int i = 0; i < output.Length; i++) Assert.Equal(expectedOut[i], output[i], 1e-12);
    }

    /// <summary>cuBLAS's <c>GemmStridedBatched</c> (column-major, alpha 1, beta 0) on host arrays.</summary>
    private static void ColumnMajor(StridedGemm g, double[] a, double[] b, double[] c)
    {
        for (int p = 0; p < g.Batch; p++)
            for (int j = 0; j < g.N; j++)
                for (int i = 0; i < g.M; i++)
                {
                    double sum = 0;
                    for (int k = 0; k < g.K; k++)
                    {
                        double x = a[g.AOffset + p * g.StrideA + (g.TransA ? k + (long)i * g.Lda : i + (long)k * g.Lda)];
                        double y = b[g.BOffset + p * g.StrideB + (g.TransB ? j + (long)k * g.Ldb : k + (long)j * g.Ldb)];
                        sum += x * y;
                    }
                    c[g.COffset + p * g.StrideC + i + (long)j * g.Ldc] = sum;
                }
    }

    [Fact]
    public void CublasGemm_MatchesAHostProduct()
    {
        var device = backends.Get("cuda");
        if (!Cublas.IsAvailable) Assert.Skip("cuBLAS is not installed: " + Cublas.UnavailableReason);
        const int m = 37, n = 19, k = 64;
        var rng = new Random(3);
        var a = Values<BFloat16>(rng, m * k, 1f);
        var b = Values<BFloat16>(rng, k * n, 1f);
        using var dA = device.Allocate<BFloat16>(a);
        using var dB = device.Allocate<BFloat16>(b);
        using var dC = device.Allocate<float>(AttentionElements.Poisoned<float>(m * n));
        using var cublas = new CublasHandle(device);
        cublas.Gemm(m, n, k, dA.Span, dB.Span, dC.Span);
        var c = dC.ToArray();
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++)
            {
                double expected = 0;
                for (int p = 0; p < k; p++) expected += (double)(float)a[p * m + i] * (float)b[j * k + p];   // column-major
                Assert.True(Math.Abs(c[j * m + i] - expected) <= 1e-4 * (1 + Math.Abs(expected)), $"C[{i}, {j}] = {c[j * m + i]}, expected {expected}");
            }
        Assert.Throws<ArgumentException>(() => cublas.Gemm(m, n, k, dA.Span.Slice(1), dB.Span, dC.Span));
    }

    private static void Check<TIn, TOut>(CudaDevice device, MlaAbsorbKernels ops, MlaAttentionSpec spec, double outputUlp)
        where TIn : unmanaged where TOut : unmanaged
    {
        var rng = new Random((int)spec.TokenRows * 131 + spec.Shape.NumHeads);
        var qNope = Values<TIn>(rng, spec.NopeQueryElements, 1f);
        var qPe = Values<TIn>(rng, spec.RopeQueryElements, 1f);
        var weights = Values<TIn>(rng, spec.Shape.WeightElements, 1 / MathF.Sqrt(spec.Shape.LatentDim));
        var latent = Values<TIn>(rng, spec.LatentOutputElements, 1f);

        var query = new TIn[spec.QueryElements];
        var output = new TOut[spec.OutputElements];
        MlaCpu.AbsorbQuery<TIn>(spec, qNope, qPe, weights, query);
        MlaCpu.Unabsorb<TIn, TOut>(spec, latent, weights, output);

        using var dNope = device.Allocate<TIn>(qNope);
        using var dPe = device.Allocate<TIn>(qPe);
        using var dWeights = device.Allocate<TIn>(weights);
        using var dLatent = device.Allocate<TIn>(latent);
        using var dQuery = device.Allocate<TIn>(AttentionElements.Poisoned<TIn>(spec.QueryElements));
        using var dOutput = device.Allocate<TOut>(AttentionElements.Poisoned<TOut>(spec.OutputElements));
        ops.AbsorbQuery(spec, dNope.Span, dPe.Span, dWeights.Span, dQuery.Span);
        ops.Unabsorb(spec, dLatent.Span, dWeights.Span, dOutput.Span);
        device.DefaultStream.Synchronize();

        double inputUlp = typeof(TIn) == typeof(Half) ? 1.0 / 1024 : 1.0 / 128;
        AssertWithinUlps(dQuery.ToArray(), query, inputUlp, "query");
        AssertWithinUlps(dOutput.ToArray(), output, outputUlp, "output");
    }

    private static void AssertWithinUlps<T>(T[] actual, T[] expected, double relative, string name) where T : unmanaged
    {
        for (int i = 0; i < expected.Length; i++)
        {
            double a = AttentionElements.ToDouble(actual[i]), e = AttentionElements.ToDouble(expected[i]);
            Assert.False(double.IsNaN(a), $"{name}[{i}] is NaN (not written)");
            Assert.True(Math.Abs(a - e) <= relative * Math.Abs(e) + 1e-6, $"{name}[{i}] = {a}, CPU {e}");
        }
    }

    private static T[] Values<T>(Random rng, long count, float scale) where T : unmanaged
    {
        var values = new T[count];
        for (long i = 0; i < count; i++) values[i] = AttentionElements.FromFloat<T>((float)(rng.NextDouble() * 2 - 1) * scale);
        return values;
    }
}
