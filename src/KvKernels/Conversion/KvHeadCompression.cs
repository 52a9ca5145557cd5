using System.Numerics;
using KvKernels.Attention;
using MathNet.Numerics.LinearAlgebra;
using MathNet.Numerics.LinearAlgebra.Factorization;

namespace KvKernels.Conversion;

/// <summary>The attention weights of one layer, fp32, row-major <c>nn.Linear</c> layout (see <see cref="AttentionGeometry"/>).</summary>
/// <param name="Query">W_Q <c>[Hq·Dk, hidden]</c>.</param>
/// <param name="Key">W_K <c>[Hkv·Dk, hidden]</c>.</param>
/// <param name="Value">W_V <c>[Hkv·Dv, hidden]</c>.</param>
/// <param name="Output">W_O <c>[hidden, Hq·Dv]</c>.</param>
public sealed record AttentionWeights(float[] Query, float[] Key, float[] Value, float[] Output)
{
    /// <summary>Query bias <c>[Hq·Dk]</c>, or null.</summary>
    public float[]? QueryBias { get; init; }

    /// <summary>Key bias <c>[Hkv·Dk]</c>, or null.</summary>
    public float[]? KeyBias { get; init; }

    /// <summary>Value bias <c>[Hkv·Dv]</c>, or null.</summary>
    public float[]? ValueBias { get; init; }

    /// <summary>Checks every array against <paramref name="geometry"/>.</summary>
    /// <exception cref="ArgumentException">An array of the wrong length (named).</exception>
    public void Validate(AttentionGeometry geometry)
    {
        ArgumentNullException.ThrowIfNull(geometry);
        long hidden = geometry.HiddenSize;
        Check(Query, (long)geometry.QueryHeads * geometry.HeadDim * hidden, nameof(Query));
        Check(Key, (long)geometry.KvHeads * geometry.HeadDim * hidden, nameof(Key));
        Check(Value, (long)geometry.KvHeads * geometry.ValueDim * hidden, nameof(Value));
        Check(Output, hidden * geometry.QueryHeads * geometry.ValueDim, nameof(Output));
        if (QueryBias is not null) Check(QueryBias, (long)geometry.QueryHeads * geometry.HeadDim, nameof(QueryBias));
        if (KeyBias is not null) Check(KeyBias, (long)geometry.KvHeads * geometry.HeadDim, nameof(KeyBias));
        if (ValueBias is not null) Check(ValueBias, (long)geometry.KvHeads * geometry.ValueDim, nameof(ValueBias));

        static void Check(float[] array, long expected, string name)
        {
            if (array is null || array.LongLength != expected)
                throw new ArgumentException($"{name} has {array?.LongLength ?? 0} elements; expected {expected}.", name);
        }
    }
}

/// <summary>Options of SVD-based KV-head compression.</summary>
/// <param name="Groups">KV heads after compression: a divisor of the model's KV heads; each group of g = Hkv / Groups
/// consecutive KV heads becomes one head.</param>
public sealed record KvCompressionOptions(int Groups)
{
    /// <summary>Key dims per compressed head; 0 means the head dim (plain GQA, the default). Without RoPE any value in
    /// 1..g·Dk; with RoPE a multiple of Dk up to g·Dk (a whole number of complex directions per frequency plane), and
    /// only Dk gives a head that standard RoPE rotates correctly (larger ranks repeat each frequency; for analysis).</summary>
    public int KeyRank { get; init; }

    /// <summary>Value dims per compressed head; 0 means the value head dim. Any value in 1..g·Dv.</summary>
    public int ValueRank { get; init; }

    /// <summary>Multiply the folded W_Q (and its bias) by √(KeyRank / Dk), so that an engine scaling logits by
    /// 1/√(new head dim) computes the original logits. No effect when KeyRank = Dk.</summary>
    public bool FoldScaleIntoQuery { get; init; } = true;

    /// <summary>Key rank as used for <paramref name="geometry"/>.</summary>
    public int KeyRankFor(AttentionGeometry geometry) => KeyRank == 0 ? geometry.HeadDim : KeyRank;

    /// <summary>Value rank as used for <paramref name="geometry"/>.</summary>
    public int ValueRankFor(AttentionGeometry geometry) => ValueRank == 0 ? geometry.ValueDim : ValueRank;

    /// <summary>Checks the options against <paramref name="geometry"/>.</summary>
    /// <exception cref="ArgumentException">A group count that does not divide the KV heads, or a rank out of range.</exception>
    public void Validate(AttentionGeometry geometry)
    {
        ArgumentNullException.ThrowIfNull(geometry);
        geometry.Validate();
        HeadPooling.CheckGroups(geometry.KvHeads, Groups);
        int g = geometry.KvHeads / Groups, d = geometry.HeadDim;
        int r = KeyRankFor(geometry), rv = ValueRankFor(geometry);
        if (geometry.Rope == RopeStyle.None)
        {
            if (r < 1 || r > g * d) throw new ArgumentException($"KeyRank is {KeyRank}; expected 0 (= head dim {d}) or 1..{g * d} (g·Dk).", "options");
        }
        else if (r < d || r % d != 0 || r / d > g)
        {
            throw new ArgumentException($"KeyRank is {KeyRank}; with RoPE expected 0 (= head dim {d}) or a multiple of {d} up to {g * d} " +
                "(whole complex directions per frequency plane).", "options");
        }
        if (rv < 1 || rv > g * geometry.ValueDim)
            throw new ArgumentException($"ValueRank is {ValueRank}; expected 0 (= value head dim {geometry.ValueDim}) or 1..{g * geometry.ValueDim}.", "options");
    }
}

/// <summary>
/// Second moments of a layer's keys and values, per group of KV heads: <c>C_G = Σ_t k_G,t k_G,tᵀ</c> over calibration
/// tokens, with k_G the concatenation of the group's key heads (g·Dk numbers), and the same for values; accumulated in
/// fp64. The moments are not centred: the compressed head reconstructs k itself (k ≈ U Uᵀ k), bias included.
/// </summary>
public sealed class KvCovariance
{
    private readonly double[][] _keys, _values;

    /// <summary>An empty accumulator for <paramref name="groups"/> groups of <paramref name="geometry"/>'s KV heads.</summary>
    /// <exception cref="ArgumentException">The geometry is invalid or the group count does not divide the KV heads.</exception>
    public KvCovariance(AttentionGeometry geometry, int groups)
    {
        ArgumentNullException.ThrowIfNull(geometry);
        geometry.Validate();
        HeadPooling.CheckGroups(geometry.KvHeads, groups);
        Geometry = geometry;
        Groups = groups;
        int g = HeadsPerGroup;
        _keys = Enumerable.Range(0, groups).Select(_ => new double[checked(g * geometry.HeadDim * g * geometry.HeadDim)]).ToArray();
        _values = Enumerable.Range(0, groups).Select(_ => new double[checked(g * geometry.ValueDim * g * geometry.ValueDim)]).ToArray();
    }

    /// <summary>The model's attention shape.</summary>
    public AttentionGeometry Geometry { get; }

    /// <summary>Groups (= KV heads after compression).</summary>
    public int Groups { get; }

    /// <summary>KV heads per group, g.</summary>
    public int HeadsPerGroup => Geometry.KvHeads / Groups;

    /// <summary>Calibration tokens seen.</summary>
    public long Tokens { get; private set; }

    /// <summary>
    /// Adds <paramref name="tokens"/> tokens of keys <c>[tokens, Hkv·Dk]</c> and values <c>[tokens, Hkv·Dv]</c>. Keys may
    /// be taken before or after RoPE: the per-plane complex moments the RoPE-compatible fit uses are the same either way
    /// (RoPE multiplies every head's plane-f value by the same phase), and the real moments are used only without RoPE.
    /// </summary>
    /// <exception cref="ArgumentException">A length that does not match.</exception>
    public void AddKeysAndValues(ReadOnlySpan<float> keys, ReadOnlySpan<float> values, int tokens)
    {
        var geo = Geometry;
        if (tokens < 0) throw new ArgumentException($"tokens is {tokens}; expected ≥ 0.", nameof(tokens));
        if (keys.Length != (long)tokens * geo.KvHeads * geo.HeadDim)
            throw new ArgumentException($"keys has {keys.Length} elements; expected tokens·Hkv·Dk = {(long)tokens * geo.KvHeads * geo.HeadDim}.", nameof(keys));
        if (values.Length != (long)tokens * geo.KvHeads * geo.ValueDim)
            throw new ArgumentException($"values has {values.Length} elements; expected tokens·Hkv·Dv = {(long)tokens * geo.KvHeads * geo.ValueDim}.", nameof(values));
        if (tokens == 0) return;
        AddGroups(keys, tokens, geo.KvHeads * geo.HeadDim, HeadsPerGroup * geo.HeadDim, _keys);
        AddGroups(values, tokens, geo.KvHeads * geo.ValueDim, HeadsPerGroup * geo.ValueDim, _values);
        Tokens += tokens;
    }

    /// <summary>
    /// Adds calibration activations <c>[tokens, hidden]</c> (the input of the layer's Q/K/V projections): projects them
    /// with W_K and W_V (plus biases) of <paramref name="weights"/> and adds the keys and values.
    /// </summary>
    public void AddActivations(ReadOnlySpan<float> activations, int tokens, AttentionWeights weights)
    {
        ArgumentNullException.ThrowIfNull(weights);
        var geo = Geometry;
        if (tokens < 0 || activations.Length != (long)tokens * geo.HiddenSize)
            throw new ArgumentException($"activations has {activations.Length} elements; expected tokens·hidden = {(long)tokens * geo.HiddenSize}.", nameof(activations));
        if (tokens == 0) return;
        // Kᵀ = W_K·Xᵀ [Hkv·Dk, tokens]: each group's rows are then contiguous for its moments.
        var xt = SimdGemm.Transpose(activations, tokens, geo.HiddenSize);
        int keyRows = geo.KvHeads * geo.HeadDim, valueRows = geo.KvHeads * geo.ValueDim;
        var kt = new float[(long)keyRows * tokens];
        var vt = new float[(long)valueRows * tokens];
        SimdGemm.Multiply(weights.Key, 0, keyRows, geo.HiddenSize, xt, 0, tokens, kt, 0);
        SimdGemm.Multiply(weights.Value, 0, valueRows, geo.HiddenSize, xt, 0, tokens, vt, 0);
        AddBias(kt, weights.KeyBias, tokens);
        AddBias(vt, weights.ValueBias, tokens);
        AddGroupsTransposed(kt, tokens, HeadsPerGroup * geo.HeadDim, _keys);
        AddGroupsTransposed(vt, tokens, HeadsPerGroup * geo.ValueDim, _values);
        Tokens += tokens;
    }

    /// <summary>A copy of group <paramref name="group"/>'s key moments <c>[g·Dk, g·Dk]</c>.</summary>
    public double[] KeyMoments(int group) => (double[])_keys[group].Clone();

    /// <summary>A copy of group <paramref name="group"/>'s value moments <c>[g·Dv, g·Dv]</c>.</summary>
    public double[] ValueMoments(int group) => (double[])_values[group].Clone();

    internal double[] KeyMomentsShared(int group) => _keys[group];

    internal double[] ValueMomentsShared(int group) => _values[group];

    private void AddGroups(ReadOnlySpan<float> data, int tokens, int width, int m, double[][] target)
    {
        // Transpose to [width, tokens] so that each group's rows are contiguous.
        AddGroupsTransposed(SimdGemm.Transpose(data, tokens, width), tokens, m, target);
    }

    // rows [G·m, (G+1)·m) of the transposed data [Groups·m, tokens] give C_G += K_Gᵀ K_G = (K_Gᵀ)(K_Gᵀ)ᵀ; the batch's
    // product is fp32 (a batch is a few hundred tokens), the running sum fp64.
    private void AddGroupsTransposed(float[] transposed, int tokens, int m, double[][] target)
    {
        var rows = new float[(long)m * tokens];
        var gram = new float[(long)m * m];
        for (int group = 0; group < Groups; group++)
        {
            Array.Copy(transposed, (long)group * m * tokens, rows, 0, rows.LongLength);
            var t = SimdGemm.Transpose(rows, m, tokens);
            SimdGemm.Multiply(rows, 0, m, tokens, t, 0, m, gram, 0);
            var c = target[group];
            for (int i = 0; i < c.Length; i++) c[i] += gram[i];
        }
    }

    private static void AddBias(float[] transposed, float[]? bias, int tokens)
    {
        if (bias is null) return;
        for (int row = 0; row < bias.Length; row++)
            for (int t = 0; t < tokens; t++) transposed[(long)row * tokens + t] += bias[row];
    }
}

/// <summary>
/// The compression of a layer's KV heads, fitted from <see cref="KvCovariance"/>: per group an orthonormal key basis
/// U_K <c>[g·Dk, r]</c> and value basis U_V <c>[g·Dv, rv]</c>, so the compressed key is <c>k' = U_Kᵀ k_G</c> and
/// <c>k_G ≈ U_K k'</c> (likewise for values); the retained energy is the share of the moments' trace the kept
/// directions hold.
/// <para>
/// <b>Values</b> (and keys of a model without RoPE): the top eigenvectors of the real moment matrix (principal
/// directions, as in "Effectively Compress KV Heads for LLM", arXiv 2406.07056).
/// </para>
/// <para>
/// <b>RoPE-compatible keys.</b> A linear map on keys commutes with every RoPE rotation only if it never mixes
/// frequency planes and acts on each plane as a complex scalar. So for each rotary pair f (dims (a, b) of every head:
/// (f, f + R/2) rotate-half, (2f, 2f+1) interleaved), with <c>z_h = k_h[a] + i·k_h[b]</c>, the fit eigendecomposes the
/// g×g Hermitian moment <c>M_f = Σ_t z zᴴ</c> (MathNet, Hermitian EVD) and keeps its top ρ = r / Dk eigenvectors
/// c_{f,j}; compressed plane j of frequency f is <c>z'_{f,j} = c_{f,j}ᴴ z = Σ_h conj(c_{f,j,h}) z_h</c>, written to
/// dims (j·Dk + a, j·Dk + b), and each query head h of the group absorbs the same conjugate weight:
/// <c>q'_{f,j} = conj(c_{f,j,h}) q_{h,f}</c>, so that <c>Re(conj(q') z')</c> sums to the original logit's projection.
/// RoPE multiplies z_h and q_h by phases that do not depend on h, which a complex scalar commutes with; and M_f is the
/// same for keys taken before or after RoPE. Non-rotated dims (partial rotary) get real principal directions, ρ·(Dk − R)
/// of them, in dims j·Dk + R … With ρ = 1 the compressed head has exactly the original layout and frequencies.
/// </para>
/// </summary>
public sealed class KvHeadBases
{
    private readonly double[][] _key, _value;

    private KvHeadBases(AttentionGeometry geometry, KvCompressionOptions options, double[][] key, double[][] value,
        double keyKept, double keyTotal, double valueKept, double valueTotal)
    {
        Geometry = geometry;
        Options = options;
        _key = key;
        _value = value;
        KeyRank = options.KeyRankFor(geometry);
        ValueRank = options.ValueRankFor(geometry);
        KeyEnergy = keyTotal > 0 ? keyKept / keyTotal : 1;
        ValueEnergy = valueTotal > 0 ? valueKept / valueTotal : 1;
    }

    /// <summary>The original geometry.</summary>
    public AttentionGeometry Geometry { get; }

    /// <summary>The options fitted with.</summary>
    public KvCompressionOptions Options { get; }

    /// <summary>Groups.</summary>
    public int Groups => Options.Groups;

    /// <summary>Key dims per compressed head.</summary>
    public int KeyRank { get; }

    /// <summary>Value dims per compressed head.</summary>
    public int ValueRank { get; }

    /// <summary>Share of the key moments' trace kept, over all groups (1 at full rank).</summary>
    public double KeyEnergy { get; }

    /// <summary>Share of the value moments' trace kept, over all groups.</summary>
    public double ValueEnergy { get; }

    /// <summary>Group <paramref name="group"/>'s key basis U_K <c>[g·Dk, KeyRank]</c>, row-major (a copy).</summary>
    public double[] KeyBasis(int group) => (double[])_key[group].Clone();

    /// <summary>Group <paramref name="group"/>'s value basis U_V <c>[g·Dv, ValueRank]</c>, row-major (a copy).</summary>
    public double[] ValueBasis(int group) => (double[])_value[group].Clone();

    /// <summary>The geometry after folding: <see cref="Groups"/> KV heads of <see cref="KeyRank"/> / <see cref="ValueRank"/> dims.</summary>
    public AttentionGeometry CompressedGeometry => Geometry with
    {
        KvHeads = Groups,
        HeadDim = KeyRank,
        ValueHeadDim = ValueRank == KeyRank ? 0 : ValueRank,
    };

    /// <summary>Fits the bases from accumulated moments.</summary>
    /// <exception cref="ArgumentException">Options that do not fit the geometry, or a group count other than the
    /// accumulator's.</exception>
    public static KvHeadBases Fit(KvCovariance moments, KvCompressionOptions options)
    {
        ArgumentNullException.ThrowIfNull(moments);
        ArgumentNullException.ThrowIfNull(options);
        var geo = moments.Geometry;
        options.Validate(geo);
        if (options.Groups != moments.Groups)
            throw new ArgumentException($"options.Groups is {options.Groups} but the moments were accumulated for {moments.Groups} groups.", nameof(options));
        int r = options.KeyRankFor(geo), rv = options.ValueRankFor(geo);
        var key = new double[options.Groups][];
        var value = new double[options.Groups][];
        var energy = new (double KeyKept, double KeyTotal, double ValueKept, double ValueTotal)[options.Groups];
        Parallel.For(0, options.Groups, group =>
        {
            var (vb, vk, vt) = RealBasis(moments.ValueMomentsShared(group), moments.HeadsPerGroup * geo.ValueDim, rv);
            var (kb, kk, kt) = geo.Rope == RopeStyle.None
                ? RealBasis(moments.KeyMomentsShared(group), moments.HeadsPerGroup * geo.HeadDim, r)
                : RopeBasis(moments.KeyMomentsShared(group), geo, moments.HeadsPerGroup, r / geo.HeadDim);
            value[group] = vb;
            key[group] = kb;
            energy[group] = (kk, kt, vk, vt);
        });
        double keyKept = energy.Sum(e => e.KeyKept), keyTotal = energy.Sum(e => e.KeyTotal);
        double valueKept = energy.Sum(e => e.ValueKept), valueTotal = energy.Sum(e => e.ValueTotal);
        return new KvHeadBases(geo, options, key, value, keyKept, keyTotal, valueKept, valueTotal);
    }

    // Top `rank` eigenvectors of the symmetric m×m matrix c, as columns of a row-major [m, rank] array.
    private static (double[] Basis, double Kept, double Total) RealBasis(double[] c, int m, int rank)
    {
        var (vectors, eigenvalues, order) = SymmetricEigen(c, m);
        var basis = new double[m * rank];
        double kept = 0, total = 0;
        for (int i = 0; i < m; i++) total += Math.Max(eigenvalues[i], 0);
        for (int j = 0; j < rank; j++)
        {
            int col = order[j];
            kept += Math.Max(eigenvalues[col], 0);
            for (int i = 0; i < m; i++) basis[i * rank + j] = vectors[i, col];
        }
        return (basis, kept, total);
    }

    // Eigenvectors (columns), eigenvalues, and the column indices by descending eigenvalue.
    private static (Matrix<double> Vectors, double[] Values, int[] Descending) SymmetricEigen(double[] c, int m)
    {
        var matrix = Matrix<double>.Build.Dense(m, m, (double[])c.Clone()); // symmetric: the storage order does not matter
        var evd = matrix.Evd(Symmetricity.Symmetric);
        var values = evd.EigenValues.Select(v => v.Real).ToArray();
        var order = Enumerable.Range(0, m).OrderByDescending(i => values[i]).ThenBy(i => i).ToArray();
        return (evd.EigenVectors, values, order);
    }

    private static (double[] Basis, double Kept, double Total) RopeBasis(double[] c, AttentionGeometry geo, int g, int rho)
    {
        int d = geo.HeadDim, m = g * d, r = rho * d, rd = geo.EffectiveRotaryDim, nr = d - rd;
        var basis = new double[m * r];
        double kept = 0, total = 0;
        for (int i = 0; i < m; i++) total += Math.Max(c[i * m + i], 0);

        for (int f = 0; f < rd / 2; f++)
        {
            var (a, b) = geo.RotaryPair(f);
            var plane = Matrix<Complex>.Build.Dense(g, g, (h1, h2) =>
            {
                int a1 = h1 * d + a, b1 = h1 * d + b, a2 = h2 * d + a, b2 = h2 * d + b;
                // E[z1·conj(z2)] with z = x + iy: real xx + yy, imaginary y1·x2 − x1·y2.
                return new Complex(c[a1 * m + a2] + c[b1 * m + b2], c[b1 * m + a2] - c[a1 * m + b2]);
            });
            var evd = plane.Evd(Symmetricity.Hermitian);
            var order = Enumerable.Range(0, g).OrderByDescending(i => evd.EigenValues[i].Real).ToArray();
            for (int j = 0; j < rho; j++)
            {
                var vector = evd.EigenVectors.Column(order[j]);
                double norm = vector.L2Norm();
                kept += Math.Max(evd.EigenValues[order[j]].Real, 0);
                int colA = j * d + a, colB = j * d + b;
                for (int h = 0; h < g; h++)
                {
                    double alpha = vector[h].Real / norm, beta = vector[h].Imaginary / norm;
                    // k'[colA] + i·k'[colB] = Σ_h conj(c_h)·(k_h[a] + i·k_h[b]).
                    basis[(h * d + a) * r + colA] = alpha;
                    basis[(h * d + b) * r + colA] = beta;
                    basis[(h * d + a) * r + colB] = -beta;
                    basis[(h * d + b) * r + colB] = alpha;
                }
            }
        }

        if (nr > 0)
        {
            // Non-rotated dims: real principal directions of their own g·(Dk − R) block.
            int mn = g * nr;
            var rows = new int[mn];
            for (int h = 0; h < g; h++)
                for (int e = 0; e < nr; e++) rows[h * nr + e] = h * d + rd + e;
            var sub = new double[mn * mn];
            for (int i = 0; i < mn; i++)
                for (int j = 0; j < mn; j++) sub[i * mn + j] = c[rows[i] * m + rows[j]];
            var (vectors, values, order) = SymmetricEigen(sub, mn);
            for (int k = 0; k < rho * nr; k++)
            {
                int col = order[k], target = k / nr * d + rd + k % nr;
                kept += Math.Max(values[col], 0);
                for (int i = 0; i < mn; i++) basis[rows[i] * r + target] = vectors[i, col];
            }
        }
        return (basis, kept, total);
    }
}

/// <summary>Folding fitted KV-head bases into a layer's projections: the result is a plain GQA layer.</summary>
public static class KvHeadCompression
{
    /// <summary>
    /// Folds <paramref name="bases"/> into <paramref name="weights"/>: per group W_K' = U_Kᵀ W_K,G and W_V' = U_Vᵀ W_V,G
    /// (biases alike); per query head h, reading original KV head j (local index l in its group), W_Q'^(h) =
    /// U_K,lᵀ W_Q^(h) where U_K,l is the l-th block of Dk rows of U_K, and W_O'^(h) = W_O^(h) U_V,l. At full rank
    /// (U Uᵀ = I) every logit and every output is unchanged; the bases are fitted in fp64, the products run in fp32 (<c>SimdGemm</c>).
    /// </summary>
    /// <returns>Weights of shapes W_Q <c>[Hq·r, hidden]</c>, W_K <c>[G·r, hidden]</c>, W_V <c>[G·rv, hidden]</c>,
    /// W_O <c>[hidden, Hq·rv]</c>.</returns>
    public static AttentionWeights Fold(KvHeadBases bases, AttentionWeights weights)
    {
        ArgumentNullException.ThrowIfNull(bases);
        ArgumentNullException.ThrowIfNull(weights);
        var geo = bases.Geometry;
        weights.Validate(geo);
        int hidden = geo.HiddenSize, d = geo.HeadDim, dv = geo.ValueDim, r = bases.KeyRank, rv = bases.ValueRank;
        int groups = bases.Groups, g = geo.KvHeads / groups, rep = geo.GroupSize;
        // fp32 transposed bases: row j of Uᵀ is direction j.
        var keyT = Enumerable.Range(0, groups).Select(g0 => TransposeToSingle(bases.KeyBasis(g0), g * d, r, 1.0)).ToArray();
        var valueT = Enumerable.Range(0, groups).Select(g0 => TransposeToSingle(bases.ValueBasis(g0), g * dv, rv, 1.0)).ToArray();
        float queryScale = bases.Options.FoldScaleIntoQuery ? (float)Math.Sqrt((double)r / d) : 1f;

        var key = new float[(long)groups * r * hidden];
        var value = new float[(long)groups * rv * hidden];
        float[]? keyBias = weights.KeyBias is null ? null : new float[groups * r];
        float[]? valueBias = weights.ValueBias is null ? null : new float[groups * rv];
        for (int group = 0; group < groups; group++)
        {
            // W_K' rows of the group = U_Kᵀ [r, g·Dk] · W_K rows of the group [g·Dk, hidden]; biases alike.
            SimdGemm.Multiply(keyT[group], 0, r, g * d, weights.Key, group * g * d * hidden, hidden, key, group * r * hidden);
            SimdGemm.Multiply(valueT[group], 0, rv, g * dv, weights.Value, group * g * dv * hidden, hidden, value, group * rv * hidden);
            if (keyBias is not null) SimdGemm.Multiply(keyT[group], 0, r, g * d, weights.KeyBias!, group * g * d, 1, keyBias, group * r);
            if (valueBias is not null) SimdGemm.Multiply(valueT[group], 0, rv, g * dv, weights.ValueBias!, group * g * dv, 1, valueBias, group * rv);
        }

        var query = new float[(long)geo.QueryHeads * r * hidden];
        float[]? queryBias = weights.QueryBias is null ? null : new float[geo.QueryHeads * r];
        var output = new float[(long)hidden * geo.QueryHeads * rv];
        var wo = new float[(long)hidden * dv];
        var folded = new float[(long)hidden * rv];
        for (int h = 0; h < geo.QueryHeads; h++)
        {
            int kvHead = h / rep, group = kvHead / g, local = kvHead % g;
            // U_K,lᵀ [r, Dk]: columns l·Dk … of the group's Uᵀ, scaled for the new head dim when asked.
            var uk = Columns(keyT[group], r, g * d, local * d, d, queryScale);
            SimdGemm.Multiply(uk, 0, r, d, weights.Query, h * d * hidden, hidden, query, h * r * hidden);
            if (queryBias is not null) SimdGemm.Multiply(uk, 0, r, d, weights.QueryBias!, h * d, 1, queryBias, h * r);

            // W_O'^(h) = W_O^(h) [hidden, Dv] · U_V,l [Dv, rv].
            var uv = Rows(bases.ValueBasis(group), local * dv, dv, rv);
            for (int i = 0; i < hidden; i++) Array.Copy(weights.Output, (long)i * geo.QueryHeads * dv + h * dv, wo, (long)i * dv, dv);
            SimdGemm.Multiply(wo, 0, hidden, dv, uv, 0, rv, folded, 0);
            for (int i = 0; i < hidden; i++) Array.Copy(folded, (long)i * rv, output, (long)i * geo.QueryHeads * rv + h * rv, rv);
        }

        return new AttentionWeights(query, key, value, output) { QueryBias = queryBias, KeyBias = keyBias, ValueBias = valueBias };
    }

    // [m, r] fp64 row-major → its transpose [r, m] in fp32, times scale.
    private static float[] TransposeToSingle(double[] basis, int m, int r, double scale)
    {
        var result = new float[(long)r * m];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < r; j++) result[(long)j * m + i] = (float)(scale * basis[(long)i * r + j]);
        return result;
    }

    // Columns [column0, column0 + count) of a row-major [rows, width] matrix, times scale.
    private static float[] Columns(float[] matrix, int rows, int width, int column0, int count, float scale)
    {
        var result = new float[rows * count];
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < count; j++) result[i * count + j] = scale * matrix[i * width + column0 + j];
        return result;
    }

    // Rows [row0, row0 + rows) of a row-major fp64 [*, columns] matrix, in fp32.
    private static float[] Rows(double[] matrix, int row0, int rows, int columns)
    {
        var result = new float[rows * columns];
        for (int i = 0; i < result.Length; i++) result[i] = (float)matrix[(long)row0 * columns + i];
        return result;
    }
}
