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
/// scale (1/√(nope + rope) · mscale²), not 1/√(kv_lora + rope). Products run in fp32.
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
        for (int h = 0; h < heads; h++)
        {
            // W_UK^hᵀ [kv_lora, nope] · W_UQ^h [nope, q_in] into the head's first kv_lora rows; then its rope rows as they are.
            var ukT = SimdGemm.Transpose(kv.AsSpan(h * kvRows * lora, nope * lora), nope, lora);
            SimdGemm.Multiply(ukT, 0, lora, nope, q, h * geometry.QueryHeadDim * qIn, qIn, result, h * outRows * qIn);
            Array.Copy(q, ((long)h * geometry.QueryHeadDim + nope) * qIn, result, (long)h * outRows * qIn + (long)lora * qIn, (long)rope * qIn);
        }
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
        var wo = new float[(long)hidden * v];
        var absorbed = new float[(long)hidden * lora];
        for (int h = 0; h < heads; h++)
        {
            // W_O^h [hidden, v] · W_UV^h [v, kv_lora], written to the head's kv_lora columns.
            for (int i = 0; i < hidden; i++) Array.Copy(o, (long)i * heads * v + h * v, wo, (long)i * v, v);
            SimdGemm.Multiply(wo, 0, hidden, v, kv, (h * (nope + v) + nope) * lora, lora, absorbed, 0);
            for (int i = 0; i < hidden; i++) Array.Copy(absorbed, (long)i * lora, result, (long)i * heads * lora + h * lora, lora);
        }
        return result;
    }

    private static void Check(long actual, long expected, string name)
    {
        if (actual != expected) throw new ArgumentException($"{name} has {actual} elements; expected {expected}.", name);
    }
}
