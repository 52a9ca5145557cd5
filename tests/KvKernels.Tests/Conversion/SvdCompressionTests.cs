using KvKernels.Attention;
using KvKernels.Conversion;

namespace KvKernels.Tests.Conversion;

/// <summary>
/// SVD-based KV-head compression: at full rank the compressed layer's attention output equals the original's (float64
/// oracle and the CPU decode attention), at reduced rank the error falls as the rank grows, and the RoPE-compatible
/// key construction commutes with every rotation (while a plain real basis does not).
/// </summary>
public sealed class SvdCompressionTests
{
    private sealed record Layer(AttentionGeometry Geometry, AttentionWeights Weights, float[] Mixing);

    private static Layer MakeLayer(AttentionGeometry geo, int seed, bool biases)
    {
        var random = new Random(seed);
        int hidden = geo.HiddenSize, d = geo.HeadDim, dv = geo.ValueDim;
        float scale = 1f / MathF.Sqrt(hidden);
        var weights = new AttentionWeights(
            ConversionFixtures.RandomArray(random, (long)geo.QueryHeads * d * hidden, scale),
            ConversionFixtures.RandomArray(random, (long)geo.KvHeads * d * hidden, scale),
            ConversionFixtures.RandomArray(random, (long)geo.KvHeads * dv * hidden, scale),
            ConversionFixtures.RandomArray(random, (long)hidden * geo.QueryHeads * dv, scale))
        {
            QueryBias = biases ? ConversionFixtures.RandomArray(random, geo.QueryHeads * d, 0.1f) : null,
            KeyBias = biases ? ConversionFixtures.RandomArray(random, geo.KvHeads * d, 0.1f) : null,
            ValueBias = biases ? ConversionFixtures.RandomArray(random, geo.KvHeads * dv, 0.1f) : null,
        };
        return new Layer(geo, weights, ConversionFixtures.RandomArray(random, (long)hidden * hidden, 1f));
    }

    private static KvHeadBases Fit(Layer layer, KvCompressionOptions options, int tokens, double decay, int seed = 11)
    {
        var moments = new KvCovariance(layer.Geometry, options.Groups);
        var x = LayerAttention.CorrelatedActivations(new Random(seed), layer.Mixing, layer.Geometry.HiddenSize, tokens, decay);
        for (int start = 0; start < tokens; start += 100)
        {
            int n = Math.Min(100, tokens - start);
            moments.AddActivations(x.AsSpan(start * layer.Geometry.HiddenSize, n * layer.Geometry.HiddenSize), n, layer.Weights);
        }
        Assert.Equal(tokens, moments.Tokens);
        return KvHeadBases.Fit(moments, options);
    }

    private static LayerRope RopeFor(AttentionGeometry geo, bool inKernel = false) =>
        geo.Rope == RopeStyle.None ? LayerRope.None : new LayerRope(geo.Rope, geo.HeadDim, geo.EffectiveRotaryDim, inKernel);

    /// <summary>Mean relative error of the compressed layer's output over several fresh contexts.</summary>
    private static double OutputError(Layer original, KvHeadBases bases, AttentionWeights folded, bool decodeCpu, int contexts = 6, double decay = 0.85)
    {
        var random = new Random(99);
        var compressedGeo = bases.CompressedGeometry;
        double sum = 0;
        for (int c = 0; c < contexts; c++)
        {
            int n = 5 + 7 * c;
            var x = LayerAttention.CorrelatedActivations(random, original.Mixing, original.Geometry.HiddenSize, n, decay);
            var rope = RopeFor(original.Geometry); // a compressed head of ρ·Dk dims is rotated block by block, as the original heads were
            var expected = LayerAttention.Oracle(original.Geometry, original.Weights, x, n, rope);
            var actual = decodeCpu
                ? LayerAttention.DecodeCpu(compressedGeo, folded, x, n, rope)
                : LayerAttention.Oracle(compressedGeo, folded, x, n, rope);
            sum += LayerAttention.RelativeError(actual, expected);
        }
        return sum / contexts;
    }

    public static TheoryData<string, RopeStyle, int> RopeCases => new()
    {
        { "no RoPE", RopeStyle.None, 0 },
        { "rotate-half", RopeStyle.RotateHalf, 0 },
        { "interleaved", RopeStyle.Interleaved, 0 },
        { "rotate-half, partial rotary 4 of 8", RopeStyle.RotateHalf, 4 },
    };

    /// <summary>
    /// GQA 8 query heads on 4 KV heads (biases on), 4 → 2 KV heads keeping all g·Dk = 16 directions: every logit and
    /// output is the original's, so the layer output matches the float64 reference of the original layer to fp32 accuracy.
    /// </summary>
    [Theory]
    [MemberData(nameof(RopeCases))]
    public void Full_rank_compression_reproduces_the_attention_output(string name, RopeStyle rope, int rotaryDim)
    {
        var geo = new AttentionGeometry(Layers: 1, HiddenSize: 32, QueryHeads: 8, KvHeads: 4, HeadDim: 8) { Rope = rope, RotaryDim = rotaryDim };
        var layer = MakeLayer(geo, seed: 1, biases: true);
        var bases = Fit(layer, new KvCompressionOptions(2) { KeyRank = 16, ValueRank = 16 }, tokens: 300, decay: 0.9);
        var folded = KvHeadCompression.Fold(bases, layer.Weights);

        Assert.Equal(1.0, bases.KeyEnergy, 10);
        Assert.Equal(1.0, bases.ValueEnergy, 10);
        Assert.Equal(new[] { 8 * 16 * 32, 2 * 16 * 32, 2 * 16 * 32, 32 * 8 * 16 }, new[] { folded.Query.Length, folded.Key.Length, folded.Value.Length, folded.Output.Length });
        double error = OutputError(layer, bases, folded, decodeCpu: false);
        Assert.True(error < 1e-5, $"{name}: relative error {error:E2} at full rank");
    }

    /// <summary>The same full-rank layers through <see cref="DecodeAttentionCpu"/> on both sides: fp16 queries, keys and
    /// values bound the agreement (each side rounds its own projections), fp32 accumulation inside.</summary>
    [Theory]
    [MemberData(nameof(RopeCases))]
    public void Full_rank_compression_reproduces_the_attention_output_through_the_cpu_decode_attention(string name, RopeStyle rope, int rotaryDim)
    {
        var geo = new AttentionGeometry(Layers: 1, HiddenSize: 32, QueryHeads: 8, KvHeads: 4, HeadDim: 8) { Rope = rope, RotaryDim = rotaryDim };
        var layer = MakeLayer(geo, seed: 2, biases: true);
        var bases = Fit(layer, new KvCompressionOptions(2) { KeyRank = 16, ValueRank = 16 }, tokens: 300, decay: 0.9);
        var folded = KvHeadCompression.Fold(bases, layer.Weights);
        var random = new Random(5);
        for (int c = 0; c < 3; c++)
        {
            int n = 9 + 11 * c;
            var x = LayerAttention.CorrelatedActivations(random, layer.Mixing, 32, n, 0.85);
            var lr = RopeFor(geo);
            var original = LayerAttention.DecodeCpu(geo, layer.Weights, x, n, lr);
            var compressed = LayerAttention.DecodeCpu(bases.CompressedGeometry, folded, x, n, lr);
            var reference = LayerAttention.Oracle(geo, layer.Weights, x, n, lr);
            double baseline = LayerAttention.RelativeError(original, reference);
            Assert.True(baseline < 4e-3, $"{name}: original layer vs oracle: {baseline:E2}");
            double error = LayerAttention.RelativeError(compressed, original);
            Assert.True(error < 4e-3, $"{name}: compressed vs original through DecodeAttentionCpu: {error:E2}");
        }
    }

    /// <summary>
    /// MQA from 4 KV heads (g·Dk = 32 directions per group) at key/value ranks 8, 16, 24, 32 on activations with a
    /// decaying spectrum: the retained energy grows, the output error falls strictly and vanishes at full rank.
    /// </summary>
    [Theory]
    [MemberData(nameof(RopeCases))]
    public void The_error_falls_as_the_rank_grows(string name, RopeStyle rope, int rotaryDim)
    {
        var geo = new AttentionGeometry(Layers: 1, HiddenSize: 48, QueryHeads: 4, KvHeads: 4, HeadDim: 8) { Rope = rope, RotaryDim = rotaryDim };
        var layer = MakeLayer(geo, seed: 3, biases: false);
        var errors = new List<double>();
        var energies = new List<double>();
        foreach (int rank in new[] { 8, 16, 24, 32 })
        {
            var bases = Fit(layer, new KvCompressionOptions(1) { KeyRank = rank, ValueRank = rank }, tokens: 2000, decay: 0.85);
            errors.Add(OutputError(layer, bases, KvHeadCompression.Fold(bases, layer.Weights), decodeCpu: false));
            energies.Add(bases.KeyEnergy + bases.ValueEnergy);
        }
        string trace = $"{name}: errors {string.Join(", ", errors.Select(e => e.ToString("E2")))}";
        for (int i = 1; i < errors.Count; i++)
        {
            Assert.True(errors[i] < errors[i - 1], trace);
            Assert.True(energies[i] > energies[i - 1], trace);
        }
        Assert.True(errors[0] > 1e-3, trace);   // rank 8 of 32 does lose something
        Assert.True(errors[^1] < 1e-5, trace);  // full rank loses nothing
    }

    /// <summary>
    /// The construction's claim, checked directly: for the fitted map P = U_Kᵀ and any position m, P(RoPE_m k_G) =
    /// RoPE_m(P k_G) (the compressed head rotated block by block with the original frequencies), and the query map of
    /// every head commutes the same way, so converting before or after RoPE is the same model.
    /// </summary>
    [Theory]
    [InlineData(RopeStyle.RotateHalf, 0, 1)]
    [InlineData(RopeStyle.RotateHalf, 0, 2)]
    [InlineData(RopeStyle.Interleaved, 0, 1)]
    [InlineData(RopeStyle.Interleaved, 4, 2)]
    [InlineData(RopeStyle.RotateHalf, 4, 1)]
    public void The_rope_compatible_key_basis_commutes_with_rotation(RopeStyle rope, int rotaryDim, int directionsPerPlane)
    {
        var geo = new AttentionGeometry(Layers: 1, HiddenSize: 24, QueryHeads: 4, KvHeads: 4, HeadDim: 8) { Rope = rope, RotaryDim = rotaryDim };
        var layer = MakeLayer(geo, seed: 4, biases: false);
        var bases = Fit(layer, new KvCompressionOptions(2) { KeyRank = 8 * directionsPerPlane }, tokens: 400, decay: 0.9);
        double worst = CommutationError(geo, bases, new Random(8));
        Assert.True(worst < 1e-12, $"commutation error {worst:E2}");
    }

    /// <summary>The negative control: the real principal directions of the same moments (the construction without RoPE)
    /// mix frequency planes, and the same check fails by orders of magnitude.</summary>
    [Fact]
    public void A_real_key_basis_does_not_commute_with_rotation()
    {
        var rotary = new AttentionGeometry(Layers: 1, HiddenSize: 24, QueryHeads: 4, KvHeads: 4, HeadDim: 8) { Rope = RopeStyle.RotateHalf };
        var layer = MakeLayer(rotary, seed: 4, biases: false);
        var real = Fit(layer with { Geometry = rotary with { Rope = RopeStyle.None } }, new KvCompressionOptions(2), tokens: 400, decay: 0.9);
        double worst = CommutationError(rotary, real, new Random(8));
        Assert.True(worst > 1e-2, $"commutation error {worst:E2}");
    }

    // max over random keys/queries and positions of ‖P(R_m k) − R'_m(P k)‖ / ‖P k‖, for the key map and each query map.
    private static double CommutationError(AttentionGeometry rotaryGeo, KvHeadBases bases, Random random)
    {
        int g = rotaryGeo.KvHeads / bases.Groups, d = rotaryGeo.HeadDim, r = bases.KeyRank, m = g * d;
        var rope = new LayerRope(rotaryGeo.Rope, d, rotaryGeo.EffectiveRotaryDim);
        double worst = 0;
        foreach (int position in new[] { 1, 2, 7, 100, 4095, 123457 })
            for (int group = 0; group < bases.Groups; group++)
            {
                var u = bases.KeyBasis(group); // [m, r]
                var k = Enumerable.Range(0, m).Select(_ => (double)ConversionFixtures.Normal(random)).ToArray();
                var rotated = (double[])k.Clone();
                for (int h = 0; h < g; h++) rope.Rotate(rotated.AsSpan(h * d, d), position);
                var left = Multiply(u, m, r, rotated, 0, m);              // P(R_m k)
                var right = Multiply(u, m, r, k, 0, m);                   // R'_m(P k)
                rope.Rotate(right, position);
                worst = Math.Max(worst, LayerAttention.RelativeError(left, right));
                for (int h = 0; h < g; h++)
                {
                    var q = Enumerable.Range(0, d).Select(_ => (double)ConversionFixtures.Normal(random)).ToArray();
                    var qRotated = (double[])q.Clone();
                    rope.Rotate(qRotated, position);
                    var qLeft = Multiply(u, m, r, qRotated, h * d, d);  // U_hᵀ(R_m q)
                    var qRight = Multiply(u, m, r, q, h * d, d);        // R'_m(U_hᵀ q)
                    rope.Rotate(qRight, position);
                    worst = Math.Max(worst, LayerAttention.RelativeError(qLeft, qRight));
                }
            }
        return worst;
    }

    // Uᵀ restricted to rows [row0, row0 + rows) times x (of length rows).
    private static double[] Multiply(double[] u, int m, int r, double[] x, int row0, int rows)
    {
        var result = new double[r];
        for (int j = 0; j < r; j++)
            for (int i = 0; i < rows; i++) result[j] += u[(row0 + i) * r + j] * x[i];
        _ = m;
        return result;
    }

    /// <summary>
    /// Keys whose heads in a group differ per frequency plane only by a complex factor (and values by a real one) are
    /// compressed exactly at one complex direction per plane: 4 → 2 KV heads of the original head dim, run with the
    /// attention op's own on-the-fly RoPE (standard layout and frequencies), match the original layer.
    /// </summary>
    [Fact]
    public void Keys_of_rank_one_per_plane_compress_exactly_and_run_with_standard_rope()
    {
        var geo = new AttentionGeometry(Layers: 1, HiddenSize: 32, QueryHeads: 4, KvHeads: 4, HeadDim: 8) { Rope = RopeStyle.RotateHalf };
        var layer = MakeLayer(geo, seed: 6, biases: false);
        var random = new Random(12);
        int hidden = 32, d = 8;
        var key = layer.Weights.Key;
        var value = layer.Weights.Value;
        for (int group = 0; group < 2; group++)
        {
            int h0 = 2 * group, h1 = h0 + 1;
            for (int f = 0; f < d / 2; f++)
            {
                // Head h1's plane f = (α + iβ) · head h0's plane f: rows a, b of h1 = [[α, −β], [β, α]] · rows a, b of h0.
                double alpha = ConversionFixtures.Normal(random), beta = ConversionFixtures.Normal(random);
                int a = f, b = f + d / 2;
                for (int c = 0; c < hidden; c++)
                {
                    double x = key[(h0 * d + a) * hidden + c], y = key[(h0 * d + b) * hidden + c];
                    key[(h1 * d + a) * hidden + c] = (float)(alpha * x - beta * y);
                    key[(h1 * d + b) * hidden + c] = (float)(beta * x + alpha * y);
                }
            }
            float s = ConversionFixtures.Normal(random);
            for (int i = 0; i < d * hidden; i++) value[h1 * d * hidden + i] = s * value[h0 * d * hidden + i];
        }

        var bases = Fit(layer, new KvCompressionOptions(2), tokens: 200, decay: 0.9);
        Assert.Equal(1.0, bases.KeyEnergy, 6);
        Assert.Equal(1.0, bases.ValueEnergy, 6);
        var folded = KvHeadCompression.Fold(bases, layer.Weights);
        Assert.Equal(geo with { KvHeads = 2 }, bases.CompressedGeometry);

        var contexts = new Random(21);
        for (int c = 0; c < 3; c++)
        {
            int n = 6 + 9 * c;
            var x = LayerAttention.CorrelatedActivations(contexts, layer.Mixing, hidden, n, 0.85);
            var inKernel = new LayerRope(RopeStyle.RotateHalf, d, d, InKernel: true);
            var expected = LayerAttention.Oracle(geo, layer.Weights, x, n, inKernel);
            var outside = LayerAttention.Oracle(geo, layer.Weights, x, n, inKernel with { InKernel = false });
            Assert.True(LayerAttention.RelativeError(outside, expected) < 1e-6, "the test's own RoPE agrees with the oracle's");
            var compressed = LayerAttention.Oracle(bases.CompressedGeometry, folded, x, n, inKernel);
            double error = LayerAttention.RelativeError(compressed, expected);
            Assert.True(error < 1e-5, $"oracle, in-kernel RoPE: {error:E2}");
            var cpuOriginal = LayerAttention.DecodeCpu(geo, layer.Weights, x, n, inKernel);
            var cpuCompressed = LayerAttention.DecodeCpu(bases.CompressedGeometry, folded, x, n, inKernel);
            double cpuError = LayerAttention.RelativeError(cpuCompressed, cpuOriginal);
            Assert.True(cpuError < 4e-3, $"DecodeAttentionCpu with in-kernel RoPE: {cpuError:E2}");
        }
    }

    [Fact]
    public void Bad_options_are_argument_errors()
    {
        var geo = new AttentionGeometry(1, 16, 4, 4, 8) { Rope = RopeStyle.RotateHalf };
        Assert.Equal("groups", Assert.Throws<ArgumentException>(() => new KvCovariance(geo, 3)).ParamName);
        Assert.Equal("options", Assert.Throws<ArgumentException>(() => new KvCompressionOptions(2) { KeyRank = 12 }.Validate(geo)).ParamName);
        Assert.Equal("options", Assert.Throws<ArgumentException>(() => new KvCompressionOptions(2) { KeyRank = 24 }.Validate(geo)).ParamName);
        Assert.Equal("options", Assert.Throws<ArgumentException>(() => new KvCompressionOptions(2) { ValueRank = 17 }.Validate(geo)).ParamName);
        new KvCompressionOptions(2) { KeyRank = 12 }.Validate(geo with { Rope = RopeStyle.None }); // any rank without RoPE
        var moments = new KvCovariance(geo, 2);
        Assert.Equal("keys", Assert.Throws<ArgumentException>(() => moments.AddKeysAndValues(new float[31], new float[32], 1)).ParamName);
        Assert.Equal("activations", Assert.Throws<ArgumentException>(() => moments.AddActivations(new float[15], 1, MakeLayer(geo, 1, false).Weights)).ParamName);
        Assert.Throws<ArgumentException>(() => KvHeadBases.Fit(moments, new KvCompressionOptions(4)));
    }
}
