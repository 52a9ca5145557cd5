using KvKernels.Quantization;
using KvKernels.Tests.Common;

namespace KvKernels.Tests.Oracles;

/// <summary>
/// The quantization formats written from their definitions (KvFormat's documentation), independent of the library's code:
/// each fp32 step is computed in double and rounded once to float (which is exactly IEEE fp32 arithmetic for +, −, ×, ÷
/// of floats), fp8 codes by searching the sorted list of finite values (<see cref="Fp8Reference"/>), integer rounding with
/// <see cref="MidpointRounding.ToEven"/>, and the tensors addressed by their own index formulas.
/// </summary>
internal static class QuantOracle
{
    /// <summary>One quantized tensor as the oracle stores it: dictionaries keyed by (slot, head) so nothing depends on the
    /// pool's byte layout, plus <see cref="Pack"/> to compare against the library's buffers.</summary>
    public sealed class Tensor
    {
        public Dictionary<(long Slot, int Head), int[]> Codes { get; } = [];
        public Dictionary<(long Slot, int Head), float> TokenScales { get; } = [];
        /// <summary>Per (slot, head): (scale, minimum) of each channel group (channel axis) or, for token groups, of each
        /// channel of the slot's group.</summary>
        public Dictionary<(long Slot, int Head), (float S, float Mn)[]> Params { get; } = [];
    }

    private static float F(double x) => (float)x;

    private static float RoundTo<T>(float x) where T : unmanaged => (float)AttentionElements.ToDouble(AttentionElements.FromFloat<T>(x));

    /// <summary>Quantizes rows x (one row of D values per (token, head)) as the spec says.</summary>
    public static Tensor Quantize<T>(KvQuantizeSpec spec, float[] source, int[] slots, float[] givenScales) where T : unmanaged
    {
        var pool = spec.Pool;
        var f = pool.Format;
        int hkv = pool.Pages.NumKvHeads, dim = pool.Pages.HeadDim;
        var result = new Tensor();
        float X(int token, int head, int c) => source[token * spec.Stride + head * dim + c];

        if (pool.TokenGroups)
        {
            int g = pool.Group;
            for (int i = 0; i < slots.Length; i++)
            {
                if (slots[i] < 0) continue;
                for (int h = 0; h < hkv; h++)
                {
                    var ps = new (float, float)[dim];
                    var codes = new int[g, dim];
                    for (int c = 0; c < dim; c++)
                    {
                        var group = Enumerable.Range(0, g).Select(j => X(i * g + j, h, c)).ToArray();
                        var (s, mn, q) = Asymmetric<T>(group, f.Bits);
                        ps[c] = (s, mn);
                        for (int j = 0; j < g; j++) codes[j, c] = q[j];
                    }
                    for (int j = 0; j < g; j++)
                    {
                        result.Codes[(slots[i] + j, h)] = Enumerable.Range(0, dim).Select(c => codes[j, c]).ToArray();
                        result.Params[(slots[i] + j, h)] = ps;
                    }
                }
            }
            return result;
        }

        for (int t = 0; t < slots.Length; t++)
        {
            if (slots[t] < 0) continue;
            for (int h = 0; h < hkv; h++)
            {
                var x = Enumerable.Range(0, dim).Select(c => X(t, h, c)).ToArray();
                if (f.Codec == KvCodec.Asymmetric)
                {
                    int g = f.Group(dim);
                    var codes = new int[dim];
                    var ps = new (float, float)[dim / g];
                    for (int k = 0; k < dim / g; k++)
                    {
                        var (s, mn, q) = Asymmetric<T>(x[(k * g)..((k + 1) * g)], f.Bits);
                        ps[k] = (s, mn);
                        q.CopyTo(codes, k * g);
                    }
                    result.Codes[(slots[t], h)] = codes;
                    result.Params[(slots[t], h)] = ps;
                    continue;
                }
                float scale = f.Granularity switch
                {
                    KvScaleGranularity.PerTensor => givenScales[0],
                    KvScaleGranularity.PerKvHead => givenScales[h],
                    _ => F(x.Max(v => Math.Abs((double)v)) / (f.Codec == KvCodec.Fp8E4M3 ? 448.0 : f.Codec == KvCodec.Fp8E5M2 ? 57344.0 : 127.0)),
                };
                if (f.Granularity == KvScaleGranularity.PerToken) result.TokenScales[(slots[t], h)] = scale;
                result.Codes[(slots[t], h)] = x.Select(v => SymmetricCode(f, v, scale)).ToArray();
            }
        }
        return result;
    }

    private static int SymmetricCode(in KvFormat f, float x, float s)
    {
        if (s == 0) return 0;
        if (f.Codec == KvCodec.Int8)
            return (byte)(sbyte)Math.Clamp(Math.Round((double)F((double)x / s), MidpointRounding.ToEven), -127, 127);
        float y = f.Convention == Fp8ScaleConvention.Divide ? F((double)x / s) : F((double)x * F(1.0 / s));
        return Fp8Reference.Encode(f.Codec == KvCodec.Fp8E4M3 ? Fp8Format.E4M3 : Fp8Format.E5M2, y);
    }

    /// <summary>One asymmetric group: the stored (rounded) scale and minimum, and the codes.</summary>
    public static (float S, float Mn, int[] Codes) Asymmetric<T>(float[] x, int bits) where T : unmanaged
    {
        int qmax = (1 << bits) - 1;
        float mn = x.Min(), mx = x.Max();
        float s = RoundTo<T>(F((double)F((double)mx - mn) / qmax));
        float m = RoundTo<T>(mn);
        var q = x.Select(v => s == 0 ? 0 : (int)Math.Clamp(Math.Round((double)F((double)F((double)v - m) / s), MidpointRounding.ToEven), 0, qmax)).ToArray();
        return (s, m, q);
    }

    /// <summary>The fp32 value of element c of (slot, head) (before rounding to the element type).</summary>
    public static float Dequantize(in QuantizedKvPool pool, Tensor t, float[] givenScales, long slot, int head, int c)
    {
        var f = pool.Format;
        int code = t.Codes[(slot, head)][c];
        if (f.Codec == KvCodec.Asymmetric)
        {
            var (s, mn) = t.Params[(slot, head)][pool.TokenGroups ? c : c / f.Group(pool.Pages.HeadDim)];
            return F((double)code * s + mn);   // exact product and sum: fma rounds once
        }
        float scale = f.Granularity switch
        {
            KvScaleGranularity.PerTensor => givenScales[0],
            KvScaleGranularity.PerKvHead => givenScales[head],
            _ => t.TokenScales[(slot, head)],
        };
        double value = f.Codec switch
        {
            KvCodec.Fp8E4M3 => Fp8Reference.Decode(Fp8Format.E4M3, (byte)code),
            KvCodec.Fp8E5M2 => Fp8Reference.Decode(Fp8Format.E5M2, (byte)code),
            _ => (sbyte)(byte)code,
        };
        return F(value * scale);
    }

    /// <summary>The oracle tensor in the library's buffers (for bit comparison): codes, per-token scales, group params.
    /// Untouched bytes / entries keep the given fill values.</summary>
    public static void Pack<T>(in QuantizedKvPool pool, Tensor t, byte[] codes, float[] tokenScales, T[] groupParams) where T : unmanaged
    {
        var f = pool.Format;
        int dim = pool.Pages.HeadDim, hkv = pool.Pages.NumKvHeads, bits = f.Bits;
        foreach (var ((slot, head), row) in t.Codes)
        {
            for (int c = 0; c < dim; c++)
            {
                long bit;
                if (pool.TokenGroups)
                {
                    // Block of G tokens: [page][page_size/G][Hkv] (NHD) or [page][Hkv][page_size/G] (HND), then D runs of G codes.
                    int g = pool.Group, perPage = pool.Pages.PageSize / g;
                    long page = slot / pool.Pages.PageSize, block = slot % pool.Pages.PageSize / g;
                    long blockIndex = pool.Pages.Layout == KvKernels.Paging.KvLayout.Nhd ? (page * perPage + block) * hkv + head : (page * hkv + head) * perPage + block;
                    long run = blockIndex * dim + c;
                    bit = run * g * bits + slot % g * bits;
                    var (s, mn) = t.Params[(slot, head)][c];
                    groupParams[run * 2] = AttentionElements.FromFloat<T>(s);
                    groupParams[run * 2 + 1] = AttentionElements.FromFloat<T>(mn);
                }
                else
                {
                    long page = slot / pool.Pages.PageSize, offset = slot % pool.Pages.PageSize;
                    long rowIndex = pool.Pages.Layout == KvKernels.Paging.KvLayout.Nhd ? slot * hkv + head : (page * hkv + head) * pool.Pages.PageSize + offset;
                    bit = (rowIndex * dim + c) * bits;
                    if (f.Codec == KvCodec.Asymmetric && c % f.Group(dim) == 0)
                    {
                        int groups = dim / f.Group(dim), k = c / f.Group(dim);
                        var (s, mn) = t.Params[(slot, head)][k];
                        groupParams[(rowIndex * groups + k) * 2] = AttentionElements.FromFloat<T>(s);
                        groupParams[(rowIndex * groups + k) * 2 + 1] = AttentionElements.FromFloat<T>(mn);
                    }
                    if (c == 0 && t.TokenScales.TryGetValue((slot, head), out float sc)) tokenScales[rowIndex] = sc;
                }
                int mask = (1 << bits) - 1;
                codes[bit / 8] = (byte)((codes[bit / 8] & ~(mask << (int)(bit % 8))) | (row[c] << (int)(bit % 8)));
            }
        }
    }
}
