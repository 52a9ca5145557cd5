using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace KvKernels.Attention;

/// <summary>
/// SIMD building blocks of the CPU attention twin, on fp32 scratch rows whose lengths are multiples of 8 (every head
/// dim is): widening fp16/bf16 rows to fp32, dot products of one query row with four keys, fused P·V updates, and
/// sin/cos of fp32 rotary angles. Vector512 is used where the hardware accelerates it, Vector256 otherwise.
/// </summary>
internal static unsafe class DecodeAttentionCpuMath
{
    /// <summary>Widens <paramref name="count"/> (a multiple of 8) fp16 or bf16 values to fp32, exactly.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Widen<T>(T* source, float* destination, int count) where T : unmanaged
    {
        var bits = (ushort*)source;
        if (typeof(T) == typeof(BFloat16))
        {
            for (int i = 0; i < count; i += 8)
                (Load8(bits + i) << 16).AsSingle().Store(destination + i);
        }
        else if (typeof(T) == typeof(Half))
        {
            for (int i = 0; i < count; i += 8)
                HalfToSingle(Load8(bits + i)).Store(destination + i);
        }
        else if (typeof(T) == typeof(float))
        {
            Buffer.MemoryCopy(source, destination, (long)count * sizeof(float), (long)count * sizeof(float));
        }
        else
        {
            throw new NotSupportedException(typeof(T).Name);
        }
    }

    /// <summary>One element as fp32 (fp16, bf16 or fp32).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToSingle<T>(T value) where T : unmanaged
    {
        if (typeof(T) == typeof(Half)) return (float)Unsafe.As<T, Half>(ref value);
        if (typeof(T) == typeof(BFloat16)) return (float)Unsafe.As<T, BFloat16>(ref value);
        if (typeof(T) == typeof(float)) return Unsafe.As<T, float>(ref value);
        throw new NotSupportedException(typeof(T).Name);
    }

    /// <summary>fp32 rounded to <typeparamref name="T"/> (nearest even).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static T FromSingle<T>(float value) where T : unmanaged
    {
        if (typeof(T) == typeof(float)) return Unsafe.As<float, T>(ref value);
        if (typeof(T) == typeof(Half))
        {
            var h = (Half)value;
            return Unsafe.As<Half, T>(ref h);
        }
        if (typeof(T) == typeof(BFloat16))
        {
            var b = (BFloat16)value;
            return Unsafe.As<BFloat16, T>(ref b);
        }
        throw new NotSupportedException(typeof(T).Name);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<uint> Load8(ushort* p) => Vector256.WidenLower(Vector128.Load(p).ToVector256Unsafe());

    /// <summary>
    /// fp16 bits (in the low half of each lane) to fp32. Normal and subnormal values: the exponent and mantissa
    /// shifted into fp32 position read as a float 2^112 too small, so one exact multiply fixes the bias; Inf/NaN keep
    /// an all-ones exponent (and the NaN payload).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> HalfToSingle(Vector256<uint> h)
    {
        var magnitude = h & Vector256.Create(0x7FFFu);
        var sign = (h & Vector256.Create(0x8000u)) << 16;
        var shifted = magnitude << 13;
        var finite = (shifted.AsSingle() * Vector256.Create(BitConverter.UInt32BitsToSingle(0x77800000u))).AsUInt32(); // × 2^112
        var special = shifted | Vector256.Create(0x7F800000u);
        var isSpecial = Vector256.GreaterThanOrEqual(magnitude, Vector256.Create(0x7C00u));
        return (Vector256.ConditionalSelect(isSpecial, special, finite) | sign).AsSingle();
    }

    /// <summary>The dot products of row <paramref name="q"/> with the four rows starting at <paramref name="k"/>
    /// (<paramref name="stride"/> apart), into <paramref name="result"/>[0..4).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Dot4(float* q, float* k, int stride, int dim, float* result)
    {
        float* k0 = k, k1 = k + stride, k2 = k1 + stride, k3 = k2 + stride;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int i = 0;
        if (Vector512.IsHardwareAccelerated && dim >= 16)
        {
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i <= dim - 16; i += 16)
            {
                var qv = Vector512.Load(q + i);
                a0 = Vector512.FusedMultiplyAdd(qv, Vector512.Load(k0 + i), a0);
                a1 = Vector512.FusedMultiplyAdd(qv, Vector512.Load(k1 + i), a1);
                a2 = Vector512.FusedMultiplyAdd(qv, Vector512.Load(k2 + i), a2);
                a3 = Vector512.FusedMultiplyAdd(qv, Vector512.Load(k3 + i), a3);
            }
            s0 = Vector512.Sum(a0); s1 = Vector512.Sum(a1); s2 = Vector512.Sum(a2); s3 = Vector512.Sum(a3);
        }
        if (i < dim)
        {
            Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i < dim; i += 8)
            {
                var qv = Vector256.Load(q + i);
                a0 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k0 + i), a0);
                a1 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k1 + i), a1);
                a2 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k2 + i), a2);
                a3 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k3 + i), a3);
            }
            s0 += Vector256.Sum(a0); s1 += Vector256.Sum(a1); s2 += Vector256.Sum(a2); s3 += Vector256.Sum(a3);
        }
        result[0] = s0; result[1] = s1; result[2] = s2; result[3] = s3;
    }

    /// <summary>The dot product of two rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Dot(float* q, float* k, int dim)
    {
        float s = 0;
        int i = 0;
        if (Vector512.IsHardwareAccelerated && dim >= 16)
        {
            Vector512<float> a = default;
            for (; i <= dim - 16; i += 16) a = Vector512.FusedMultiplyAdd(Vector512.Load(q + i), Vector512.Load(k + i), a);
            s = Vector512.Sum(a);
        }
        if (i < dim)
        {
            Vector256<float> a = default;
            for (; i < dim; i += 8) a = Vector256.FusedMultiplyAdd(Vector256.Load(q + i), Vector256.Load(k + i), a);
            s += Vector256.Sum(a);
        }
        return s;
    }

    /// <summary><c>acc += p0·v0 + p1·v1 + p2·v2 + p3·v3</c> for the four rows starting at <paramref name="v"/>
    /// (<paramref name="stride"/> apart): the accumulator row is loaded and stored once per four keys.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Accumulate4(float* acc, float* p, float* v, int stride, int dim)
    {
        float* v0 = v, v1 = v + stride, v2 = v1 + stride, v3 = v2 + stride;
        int i = 0;
        if (Vector512.IsHardwareAccelerated && dim >= 16)
        {
            Vector512<float> p0 = Vector512.Create(p[0]), p1 = Vector512.Create(p[1]), p2 = Vector512.Create(p[2]), p3 = Vector512.Create(p[3]);
            for (; i <= dim - 16; i += 16)
            {
                var a = Vector512.Load(acc + i);
                a = Vector512.FusedMultiplyAdd(p0, Vector512.Load(v0 + i), a);
                a = Vector512.FusedMultiplyAdd(p1, Vector512.Load(v1 + i), a);
                a = Vector512.FusedMultiplyAdd(p2, Vector512.Load(v2 + i), a);
                a = Vector512.FusedMultiplyAdd(p3, Vector512.Load(v3 + i), a);
                a.Store(acc + i);
            }
        }
        if (i < dim)
        {
            Vector256<float> p0 = Vector256.Create(p[0]), p1 = Vector256.Create(p[1]), p2 = Vector256.Create(p[2]), p3 = Vector256.Create(p[3]);
            for (; i < dim; i += 8)
            {
                var a = Vector256.Load(acc + i);
                a = Vector256.FusedMultiplyAdd(p0, Vector256.Load(v0 + i), a);
                a = Vector256.FusedMultiplyAdd(p1, Vector256.Load(v1 + i), a);
                a = Vector256.FusedMultiplyAdd(p2, Vector256.Load(v2 + i), a);
                a = Vector256.FusedMultiplyAdd(p3, Vector256.Load(v3 + i), a);
                a.Store(acc + i);
            }
        }
    }

    /// <summary><c>acc += p·v</c>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Accumulate(float* acc, float p, float* v, int dim)
    {
        var pv = Vector256.Create(p);
        for (int i = 0; i < dim; i += 8)
            Vector256.FusedMultiplyAdd(pv, Vector256.Load(v + i), Vector256.Load(acc + i)).Store(acc + i);
    }

    /// <summary><c>row ← row · factor</c>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Scale(float* row, float factor, int dim)
    {
        var f = Vector256.Create(factor);
        for (int i = 0; i < dim; i += 8) (Vector256.Load(row + i) * f).Store(row + i);
    }

    /// <summary>
    /// <c>p[t] = exp(s[t] − max)</c> over <paramref name="count"/> (a multiple of 8) scores, in place; −∞ scores
    /// give 0. Returns Σ p.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ExpSubtract(float* s, float max, int count)
    {
        var m = Vector256.Create(max);
        var sum = Vector256<float>.Zero;
        for (int t = 0; t < count; t += 8)
        {
            var p = Vector256.Exp(Vector256.Load(s + t) - m);
            p.Store(s + t);
            sum += p;
        }
        return Vector256.Sum(sum);
    }

    /// <summary>The largest of <paramref name="count"/> (a multiple of 8) scores.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Max(float* s, int count)
    {
        var m = Vector256.Create(float.NegativeInfinity);
        for (int t = 0; t < count; t += 8) m = Vector256.Max(m, Vector256.Load(s + t));
        float result = m[0];
        for (int i = 1; i < 8; i++) result = MathF.Max(result, m[i]);
        return result;
    }

    /// <summary>Above this magnitude the vector reduction by π/2 is not exact enough; such angles take the scalar path.</summary>
    private const float ReductionLimit = 1 << 20;

    /// <summary>
    /// Cosine and sine of <paramref name="count"/> fp32 angles, each accurate to fp32 rounding of the exact value
    /// (the angle is widened to double, reduced by π/2 in two parts, and the Taylor polynomials to degree 11/12 on
    /// [−π/4, π/4] are below 1e-11), so RoPE here matches the double-precision oracle of the same fp32 angles.
    /// </summary>
    public static void CosSin(float* angles, float* cos, float* sin, int count)
    {
        int i = 0;
        for (; i <= count - 8; i += 8)
        {
            var a = Vector256.Load(angles + i);
            if (Vector256.GreaterThanAny(Vector256.Abs(a), Vector256.Create(ReductionLimit)))
            {
                for (int j = i; j < i + 8; j++) ScalarCosSin(angles[j], out cos[j], out sin[j]);
                continue;
            }
            CosSin(Vector256.WidenLower(a), out var cl, out var sl);
            CosSin(Vector256.WidenUpper(a), out var ch, out var sh);
            Vector256.Narrow(cl, ch).Store(cos + i);
            Vector256.Narrow(sl, sh).Store(sin + i);
        }
        for (; i < count; i++) ScalarCosSin(angles[i], out cos[i], out sin[i]);
    }

    private static void ScalarCosSin(float angle, out float cos, out float sin)
    {
        cos = (float)Math.Cos(angle);
        sin = (float)Math.Sin(angle);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CosSin(Vector256<double> x, out Vector256<double> cos, out Vector256<double> sin)
    {
        // x = k·π/2 + r with |r| ≤ π/4. Pio2Hi has 33 significant bits, so k·Pio2Hi is exact for |k| < 2^20.
        const double TwoOverPi = 0.63661977236758134308;
        const double Pio2Hi = 1.57079632673412561417e+00;
        const double Pio2Lo = 6.07710050650619224932e-11;
        var k = Vector256.Round(x * Vector256.Create(TwoOverPi));
        var r = (x - k * Vector256.Create(Pio2Hi)) - k * Vector256.Create(Pio2Lo);
        var r2 = r * r;

        var sinR = r + r * r2 * Poly(r2, -1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800);
        var cosR = Vector256<double>.One + r2 * Poly(r2, -1.0 / 2, 1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800, 1.0 / 479001600);

        // Quadrant k mod 4 selects (sin, cos) = (s, c), (c, −s), (−s, −c), (−c, s).
        var quadrant = k - Vector256.Create(4.0) * Vector256.Floor(k * Vector256.Create(0.25));
        var one = Vector256.Create(1.0);
        var two = Vector256.Create(2.0);
        var three = Vector256.Create(3.0);
        var odd = Vector256.Equals(quadrant, one) | Vector256.Equals(quadrant, three);
        var s = Vector256.ConditionalSelect(odd, cosR, sinR);
        var c = Vector256.ConditionalSelect(odd, sinR, cosR);
        sin = Vector256.ConditionalSelect(Vector256.GreaterThanOrEqual(quadrant, two), -s, s);
        cos = Vector256.ConditionalSelect(Vector256.Equals(quadrant, one) | Vector256.Equals(quadrant, two), -c, c);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<double> Poly(Vector256<double> x, double c0, double c1, double c2, double c3, double c4) =>
        Vector256.Create(c0) + x * (Vector256.Create(c1) + x * (Vector256.Create(c2) + x * (Vector256.Create(c3) + x * Vector256.Create(c4))));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<double> Poly(Vector256<double> x, double c0, double c1, double c2, double c3, double c4, double c5) =>
        Vector256.Create(c0) + x * Poly(x, c1, c2, c3, c4, c5);
}
