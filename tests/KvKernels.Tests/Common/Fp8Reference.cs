namespace KvKernels.Tests.Common;

/// <summary>The two fp8 formats, written from their definitions (OCP 8-bit floating point / NVIDIA e4m3 and e5m2).</summary>
internal enum Fp8Format
{
    /// <summary>Bias 7, 3 mantissa bits, no infinities, NaN = S.1111.111, max 448.</summary>
    E4M3,

    /// <summary>Bias 15, 2 mantissa bits, IEEE-style Inf (S.11111.00) and NaN (S.11111.xx, xx ≠ 0), max 57344.</summary>
    E5M2,
}

/// <summary>
/// A C# reference for fp8, independent of the C++ headers: decoding straight from the bit fields, and encoding as "the
/// nearest representable value, ties to the even code, satfinite" by searching the sorted list of all finite values.
/// </summary>
internal static class Fp8Reference
{
    private static readonly double[] E4M3Magnitudes = Magnitudes(Fp8Format.E4M3);
    private static readonly double[] E5M2Magnitudes = Magnitudes(Fp8Format.E5M2);

    public static int MantissaBits(Fp8Format f) => f == Fp8Format.E4M3 ? 3 : 2;
    public static int Bias(Fp8Format f) => f == Fp8Format.E4M3 ? 7 : 15;
    public static double Max(Fp8Format f) => f == Fp8Format.E4M3 ? 448.0 : 57344.0;

    public static bool IsNaN(Fp8Format f, byte code) => f == Fp8Format.E4M3
        ? (code & 0x7F) == 0x7F
        : (code & 0x7C) == 0x7C && (code & 0x03) != 0;

    /// <summary>The value of an fp8 code (double: exact), NaN for the NaN codes, ±Inf for e5m2's infinities.</summary>
    public static double Decode(Fp8Format f, byte code)
    {
        int m = MantissaBits(f), e = (code >> m) & ((1 << (7 - m)) - 1), mantissa = code & ((1 << m) - 1);
        double sign = (code & 0x80) != 0 ? -1.0 : 1.0;
        if (IsNaN(f, code)) return double.NaN;
        if (f == Fp8Format.E5M2 && e == 31) return sign * double.PositiveInfinity;
        double value = e == 0
            ? mantissa / (double)(1 << m) * Math.Pow(2, 1 - Bias(f))                // subnormal
            : (1.0 + mantissa / (double)(1 << m)) * Math.Pow(2, e - Bias(f));       // normal
        return sign * value;
    }

    /// <summary>All finite non-negative magnitudes, indexed by code 0x00 .. max code (monotone in the code).</summary>
    private static double[] Magnitudes(Fp8Format f)
    {
        var list = new List<double>();
        for (int code = 0; code < 0x80; code++)
        {
            double v = Decode(f, (byte)code);
            if (double.IsFinite(v)) list.Add(v);
        }
        // The decoder's own sanity: magnitudes strictly increasing up to the format's max (thrown, not asserted, so
        // KvCheck can link this file too).
        for (int i = 1; i < list.Count; i++)
            if (!(list[i] > list[i - 1])) throw new InvalidOperationException($"{f}: magnitudes not increasing at code {i}.");
        if (list[^1] != Max(f)) throw new InvalidOperationException($"{f}: largest finite value {list[^1]}, expected {Max(f)}.");
        return list.ToArray();
    }

    /// <summary>
    /// cvt.rn.satfinite: the nearest finite value (ties to the even code, whose mantissa is even), |x| above the largest
    /// finite value or ±Inf → ±max, the sign of x kept on zeros; NaN → the NaN code 0x7F (this library's choice).
    /// </summary>
    public static byte Encode(Fp8Format f, float x)
    {
        if (float.IsNaN(x)) return 0x7F;
        var magnitudes = f == Fp8Format.E4M3 ? E4M3Magnitudes : E5M2Magnitudes;
        int sign = float.IsNegative(x) ? 0x80 : 0;
        double a = Math.Abs((double)x);
        int code;
        if (a >= magnitudes[^1]) code = magnitudes.Length - 1;
        else
        {
            int hi = Array.FindIndex(magnitudes, v => v > a);   // magnitudes[hi - 1] <= a < magnitudes[hi]
            int lo = hi - 1;
            double below = a - magnitudes[lo], above = magnitudes[hi] - a;
            code = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
        }
        return (byte)(sign | code);
    }

    /// <summary>binary16 bits of an exact f16 value (every fp8 value is one); NaN is handled by the caller.</summary>
    public static ushort F16Bits(double value) => BitConverter.HalfToUInt16Bits((Half)value);
}
