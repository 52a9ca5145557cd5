namespace KvKernels.Quantization;

/// <summary>
/// Bit-exact software fp8 (OCP e4m3 / e5m2) conversions, the CPU twin of <c>cuda/common/kvk_fp8.cuh</c>: f32 → fp8 with
/// round-to-nearest-even and satfinite (|x| above the maximum and ±Inf give ±max; NaN gives 0x7F), fp8 → f32 exact.
/// </summary>
public static class Fp8
{
    private static readonly float[] E4M3Values = Table(KvCodec.Fp8E4M3);
    private static readonly float[] E5M2Values = Table(KvCodec.Fp8E5M2);

    /// <summary>f32 → e4m3 code.</summary>
    public static byte ToE4M3(float x) => Encode(x, 3, 0x43E00000u, 0x7Eu, 0x3C800000u, 0x3A800000u, 120u);

    /// <summary>f32 → e5m2 code.</summary>
    public static byte ToE5M2(float x) => Encode(x, 2, 0x47600000u, 0x7Bu, 0x38800000u, 0x37000000u, 112u);

    /// <summary>e4m3 code → f32 (exact; the NaN codes give NaN).</summary>
    public static float FromE4M3(byte code) => E4M3Values[code];

    /// <summary>e5m2 code → f32 (exact; ±Inf and NaN codes give ±Inf and NaN).</summary>
    public static float FromE5M2(byte code) => E5M2Values[code];

    // The same steps as kvk_f32_to_fp8_bits_generic: rebias in place for normals, shift for subnormals, round half to even.
    private static byte Encode(float x, int mantissaBits, uint maxBits, uint maxCode, uint minNormalBits, uint halfMinSubBits, uint rebias)
    {
        uint u = BitConverter.SingleToUInt32Bits(x);
        uint sign = (u >> 24) & 0x80u;
        uint a = u & 0x7FFFFFFFu;
        if (a > 0x7F800000u) return 0x7F;
        if (a > maxBits) return (byte)(sign | maxCode);
        uint result, rem, half;
        if (a >= minNormalBits)
        {
            uint m = a - (rebias << 23);
            result = m >> (23 - mantissaBits);
            rem = m & ((1u << (23 - mantissaBits)) - 1u);
            half = 1u << (22 - mantissaBits);
        }
        else if (a <= halfMinSubBits)
        {
            return (byte)sign;
        }
        else
        {
            uint e = a >> 23;
            uint mant = (a & 0x7FFFFFu) | 0x800000u;
            int shift = (int)(rebias + 24u - (uint)mantissaBits - e);
            result = mant >> shift;
            rem = mant & ((1u << shift) - 1u);
            half = 1u << (shift - 1);
        }
        if (rem > half || (rem == half && (result & 1u) != 0)) ++result;
        return (byte)(sign | result);
    }

    private static float[] Table(KvCodec codec)
    {
        int m = codec == KvCodec.Fp8E4M3 ? 3 : 2, bias = codec == KvCodec.Fp8E4M3 ? 7 : 15;
        var values = new float[256];
        for (int code = 0; code < 256; code++)
        {
            int e = (code >> m) & ((1 << (7 - m)) - 1), mantissa = code & ((1 << m) - 1);
            float sign = (code & 0x80) != 0 ? -1f : 1f;
            bool special = codec == KvCodec.Fp8E4M3 ? (code & 0x7F) == 0x7F : e == 31;
            values[code] = special
                ? codec == KvCodec.Fp8E5M2 && mantissa == 0 ? sign * float.PositiveInfinity : float.NaN
                : sign * (float)(e == 0
                    ? mantissa / (double)(1 << m) * Math.Pow(2, 1 - bias)
                    : (1 + mantissa / (double)(1 << m)) * Math.Pow(2, e - bias));
        }
        return values;
    }
}
