namespace KvKernels.Conversion;

/// <summary>
/// MLA weight absorption (DeepSeek-V2/V3, "absorb" decode): the key up-projection is folded into the query side and
/// the value up-projection into the output projection, so that decode attends directly over the cached latent rows
/// <c>[c_KV ; k_pe]</c> as MQA with one (kv_lora + rope)-wide KV head, values being the first kv_lora dims.
/// <para>
/// Per head h, with W_UQ^h the nope rows of the query up-projection <c>[nope, q_in]</c>, W_UK^h and W_UV^h the nope
/// and value rows of <c>kv_b_proj</c> (<c>[nope, kv_lora]</c>, <c>[v, kv_lora]</c>) and W_O^h the head's columns of
/// W_O <c>[hidden, v]</c>: the absorbed query is <c>[W_UK^hᵀ·W_UQ^h ; W_QR^h]</c> <c>[kv_lora + rope, q_in]</c>, so
/// <c>q̃^h·[c_KV; k_pe] = q_nope^h·k_nope^h + q_pe^h·k_pe</c> (RoPE is still applied to the last rope dims of q̃^h,
/// as to q_pe^h); and the absorbed output is <c>W_O^h·W_UV^h</c> <c>[hidden, kv_lora]</c>, so <c>out = Σ_h
/// W̃_O^h·o_lat^h</c> with <c>o_lat^h = Σ_j p^h_j c_KV,j</c>. Logits are unchanged: engines keep the original softmax
/// scale (1/√(nope + rope) · mscale²), not 1/√(kv_lora + rope). Products run in fp64.
/// </para>
/// </summary>
public static class MlaAbsorption
{
    /// <summary>The absorbed query projection <c>[Heads·(kv_lora + rope), q_in]</c> from the query up-projection
    /// <paramref name="queryUp"/> <c>[Heads·(nope + rope), q_in]</c> and <paramref name="kvUp"/> <c>[Heads·(nope + v), kv_lora]</c>.</summary>
    /// <exception cref="ArgumentException">A length that does not match <paramref name="geometry"/>.</exception>
    public static float[] AbsorbQuery(MlaGeometry geometry, ReadOnlySpan<float> queryUp, ReadOnlySpan<float> kvUp)
    {
        ArgumentNullException.ThrowIfNull(geometry);
        geometry.Validate();
        int heads = geometry.Heads, qIn = geometry.QueryInput, nope = geometry.NopeHeadDim, rope = geometry.RopeHeadDim;
        int lora = geometry.KvLoraRank, kvRows = nope + geometry.ValueHeadDim, outRows = geometry.AbsorbedHeadDim;
        Check(queryUp.Length, (long)heads * geometry.QueryHeadDim * qIn, nameof(queryUp));
        Check(kvUp.Length, (long)heads * kvRows * lora, nameof(kvUp));

        var q = queryUp.ToArray();
        var kv = kvUp.ToArray();
        var result = new float[(long)heads * outRows * qIn];
        Parallel.For(0, heads, h =>
        {
            var uq = Rows(q, h * geometry.QueryHeadDim, nope, qIn);   // [nope, q_in]
            var uk = Rows(kv, h * kvRows, nope, lora);                  // [nope, kv_lora]
            var absorbed = RowMajor.TransposeAMultiply(uk, nope, lora, uq, qIn); // [kv_lora, q_in]
            long target = (long)h * outRows * qIn;
            for (long i = 0; i < absorbed.LongLength; i++) result[target + i] = (float)absorbed[i];
            Array.Copy(q, ((long)h * geometry.QueryHeadDim + nope) * qIn, result, target + (long)lora * qIn, (long)rope * qIn);
        });
        return result;
    }

    /// <summary>The absorbed output projection <c>[hidden, Heads·kv_lora]</c> from W_O <paramref name="output"/>
    /// <c>[hidden, Heads·v]</c> and <paramref name="kvUp"/> <c>[Heads·(nope + v), kv_lora]</c>.</summary>
    /// <exception cref="ArgumentException">A length that does not match <paramref name="geometry"/>.</exception>
    public static float[] AbsorbOutput(MlaGeometry geometry, ReadOnlySpan<float> output, ReadOnlySpan<float> kvUp)
    {
        ArgumentNullException.ThrowIfNull(geometry);
        geometry.Validate();
        int heads = geometry.Heads, hidden = geometry.HiddenSize, v = geometry.ValueHeadDim, nope = geometry.NopeHeadDim, lora = geometry.KvLoraRank;
        Check(output.Length, (long)hidden * heads * v, nameof(output));
        Check(kvUp.Length, (long)heads * (nope + v) * lora, nameof(kvUp));

        var o = output.ToArray();
        var kv = kvUp.ToArray();
        var result = new float[(long)hidden * heads * lora];
        Parallel.For(0, heads, h =>
        {
            var wo = new double[(long)hidden * v];
            for (int i = 0; i < hidden; i++)
                for (int e = 0; e < v; e++) wo[(long)i * v + e] = o[(long)i * heads * v + h * v + e];
            var uv = Rows(kv, h * (nope + v) + nope, v, lora);           // [v, kv_lora]
            var absorbed = RowMajor.Multiply(wo, hidden, v, uv, lora);  // [hidden, kv_lora]
            for (int i = 0; i < hidden; i++)
                for (int c = 0; c < lora; c++) result[(long)i * heads * lora + h * lora + c] = (float)absorbed[(long)i * lora + c];
        });
        return result;
    }

    private static double[] Rows(float[] matrix, int row0, int rows, int columns)
    {
        var block = new double[(long)rows * columns];
        for (long i = 0; i < block.LongLength; i++) block[i] = matrix[(long)row0 * columns + i];
        return block;
    }

    private static void Check(long actual, long expected, string name)
    {
        if (actual != expected) throw new ArgumentException($"{name} has {actual} elements; expected {expected}.", name);
    }
}
