using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

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
        int i = 0;
        if (typeof(T) == typeof(BFloat16))
        {
            if (Vector512.IsHardwareAccelerated)
                for (; i + 16 <= count; i += 16) (Load16(bits + i) << 16).AsSingle().Store(destination + i);
            for (; i < count; i += 8) (Load8(bits + i) << 16).AsSingle().Store(destination + i);
        }
        else if (typeof(T) == typeof(Half))
        {
            if (Vector512.IsHardwareAccelerated)
                for (; i + 16 <= count; i += 16) HalfToSingle(Load16(bits + i)).Store(destination + i);
            for (; i < count; i += 8) HalfToSingle(Load8(bits + i)).Store(destination + i);
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

    /// <summary>Asks for the cache lines of <paramref name="bytes"/> bytes at <paramref name="address"/> (a hint: no
    /// fault, no effect on results; nothing on hardware without a prefetch instruction).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Prefetch(void* address, int bytes)
    {
        if (!Sse.IsSupported) return;
        for (int i = 0; i < bytes; i += 64) Sse.Prefetch0((byte*)address + i);
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

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<uint> Load16(ushort* p) => Vector512.WidenLower(Vector256.Load(p).ToVector512Unsafe());

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

    /// <summary>The 16-lane form of <see cref="HalfToSingle(Vector256{uint})"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> HalfToSingle(Vector512<uint> h)
    {
        var magnitude = h & Vector512.Create(0x7FFFu);
        var sign = (h & Vector512.Create(0x8000u)) << 16;
        var shifted = magnitude << 13;
        var finite = (shifted.AsSingle() * Vector512.Create(BitConverter.UInt32BitsToSingle(0x77800000u))).AsUInt32();
        var special = shifted | Vector512.Create(0x7F800000u);
        var isSpecial = Vector512.GreaterThanOrEqual(magnitude, Vector512.Create(0x7C00u));
        return (Vector512.ConditionalSelect(isSpecial, special, finite) | sign).AsSingle();
    }

    /// <summary>The dot products of rows <paramref name="q0"/> and <paramref name="q1"/> with the four rows starting at
    /// <paramref name="k"/> (<paramref name="stride"/> apart), into <paramref name="result0"/>[0..4) and
    /// <paramref name="result1"/>[0..4): each key chunk is loaded once for both query rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Dot2x4(float* q0, float* q1, float* k, int stride, int dim, float* result0, float* result1)
    {
        float* k0 = k, k1 = k + stride, k2 = k1 + stride, k3 = k2 + stride;
        int i = 0;
        if (Vector512.IsHardwareAccelerated && dim >= 16)
        {
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            Vector512<float> b0 = default, b1 = default, b2 = default, b3 = default;
            for (; i <= dim - 16; i += 16)
            {
                var x = Vector512.Load(q0 + i);
                var y = Vector512.Load(q1 + i);
                var c = Vector512.Load(k0 + i);
                a0 = Vector512.FusedMultiplyAdd(x, c, a0);
                b0 = Vector512.FusedMultiplyAdd(y, c, b0);
                c = Vector512.Load(k1 + i);
                a1 = Vector512.FusedMultiplyAdd(x, c, a1);
                b1 = Vector512.FusedMultiplyAdd(y, c, b1);
                c = Vector512.Load(k2 + i);
                a2 = Vector512.FusedMultiplyAdd(x, c, a2);
                b2 = Vector512.FusedMultiplyAdd(y, c, b2);
                c = Vector512.Load(k3 + i);
                a3 = Vector512.FusedMultiplyAdd(x, c, a3);
                b3 = Vector512.FusedMultiplyAdd(y, c, b3);
            }
            result0[0] = Vector512.Sum(a0); result0[1] = Vector512.Sum(a1); result0[2] = Vector512.Sum(a2); result0[3] = Vector512.Sum(a3);
            result1[0] = Vector512.Sum(b0); result1[1] = Vector512.Sum(b1); result1[2] = Vector512.Sum(b2); result1[3] = Vector512.Sum(b3);
            if (i == dim) return;
        }
        else
        {
            for (int j = 0; j < 4; j++) result0[j] = result1[j] = 0;
        }
        {
            Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default;
            Vector256<float> b0 = default, b1 = default, b2 = default, b3 = default;
            for (; i < dim; i += 8)
            {
                var x = Vector256.Load(q0 + i);
                var y = Vector256.Load(q1 + i);
                var c = Vector256.Load(k0 + i);
                a0 = Vector256.FusedMultiplyAdd(x, c, a0);
                b0 = Vector256.FusedMultiplyAdd(y, c, b0);
                c = Vector256.Load(k1 + i);
                a1 = Vector256.FusedMultiplyAdd(x, c, a1);
                b1 = Vector256.FusedMultiplyAdd(y, c, b1);
                c = Vector256.Load(k2 + i);
                a2 = Vector256.FusedMultiplyAdd(x, c, a2);
                b2 = Vector256.FusedMultiplyAdd(y, c, b2);
                c = Vector256.Load(k3 + i);
                a3 = Vector256.FusedMultiplyAdd(x, c, a3);
                b3 = Vector256.FusedMultiplyAdd(y, c, b3);
            }
            result0[0] += Vector256.Sum(a0); result0[1] += Vector256.Sum(a1); result0[2] += Vector256.Sum(a2); result0[3] += Vector256.Sum(a3);
            result1[0] += Vector256.Sum(b0); result1[1] += Vector256.Sum(b1); result1[2] += Vector256.Sum(b2); result1[3] += Vector256.Sum(b3);
        }
    }

    /// <summary><c>acc0 += Σ p0[j]·v_j</c> and <c>acc1 += Σ p1[j]·v_j</c> over the four rows v_j starting at
    /// <paramref name="v"/> (<paramref name="stride"/> apart): each value chunk is loaded once for both query rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Accumulate2x4(float* acc0, float* acc1, float* p0, float* p1, float* v, int stride, int dim)
    {
        float* v0 = v, v1 = v + stride, v2 = v1 + stride, v3 = v2 + stride;
        int i = 0;
        if (Vector512.IsHardwareAccelerated && dim >= 16)
        {
            Vector512<float> x0 = Vector512.Create(p0[0]), x1 = Vector512.Create(p0[1]), x2 = Vector512.Create(p0[2]), x3 = Vector512.Create(p0[3]);
            Vector512<float> y0 = Vector512.Create(p1[0]), y1 = Vector512.Create(p1[1]), y2 = Vector512.Create(p1[2]), y3 = Vector512.Create(p1[3]);
            for (; i <= dim - 16; i += 16)
            {
                var a = Vector512.Load(acc0 + i);
                var b = Vector512.Load(acc1 + i);
                var c = Vector512.Load(v0 + i);
                a = Vector512.FusedMultiplyAdd(x0, c, a);
                b = Vector512.FusedMultiplyAdd(y0, c, b);
                c = Vector512.Load(v1 + i);
                a = Vector512.FusedMultiplyAdd(x1, c, a);
                b = Vector512.FusedMultiplyAdd(y1, c, b);
                c = Vector512.Load(v2 + i);
                a = Vector512.FusedMultiplyAdd(x2, c, a);
                b = Vector512.FusedMultiplyAdd(y2, c, b);
                c = Vector512.Load(v3 + i);
                a = Vector512.FusedMultiplyAdd(x3, c, a);
                b = Vector512.FusedMultiplyAdd(y3, c, b);
                a.Store(acc0 + i);
                b.Store(acc1 + i);
            }
        }
        if (i < dim)
        {
            Vector256<float> x0 = Vector256.Create(p0[0]), x1 = Vector256.Create(p0[1]), x2 = Vector256.Create(p0[2]), x3 = Vector256.Create(p0[3]);
            Vector256<float> y0 = Vector256.Create(p1[0]), y1 = Vector256.Create(p1[1]), y2 = Vector256.Create(p1[2]), y3 = Vector256.Create(p1[3]);
            for (; i < dim; i += 8)
            {
                var a = Vector256.Load(acc0 + i);
                var b = Vector256.Load(acc1 + i);
                var c = Vector256.Load(v0 + i);
                a = Vector256.FusedMultiplyAdd(x0, c, a);
                b = Vector256.FusedMultiplyAdd(y0, c, b);
                c = Vector256.Load(v1 + i);
                a = Vector256.FusedMultiplyAdd(x1, c, a);
                b = Vector256.FusedMultiplyAdd(y1, c, b);
                c = Vector256.Load(v2 + i);
                a = Vector256.FusedMultiplyAdd(x2, c, a);
                b = Vector256.FusedMultiplyAdd(y2, c, b);
                c = Vector256.Load(v3 + i);
                a = Vector256.FusedMultiplyAdd(x3, c, a);
                b = Vector256.FusedMultiplyAdd(y3, c, b);
                a.Store(acc0 + i);
                b.Store(acc1 + i);
            }
        }
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
        int t = 0;
        float total = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            var m = Vector512.Create(max);
            var sum = Vector512<float>.Zero;
            for (; t + 16 <= count; t += 16)
            {
                var p = ExpNonPositive(Vector512.Load(s + t) - m);
                p.Store(s + t);
                sum += p;
            }
            total = Vector512.Sum(sum);
        }
        if (t < count)
        {
            var m = Vector256.Create(max);
            var sum = Vector256<float>.Zero;
            for (; t < count; t += 8)
            {
                var p = ExpNonPositive(Vector256.Load(s + t) - m);
                p.Store(s + t);
                sum += p;
            }
            total += Vector256.Sum(sum);
        }
        return total;
    }

    // exp in fp32 for x ≤ 0 (Cephes expf): x = n·ln2 + r with |r| ≤ ln2/2 (ln2 in two parts), e^r by a degree-7
    // polynomial (relative error about 1 ulp), then 2^n put into the exponent bits. Below ln(2^−126) the result is 0:
    // such a weight is under 2^−126 of the row's largest, so flushing it changes no fp32 sum. exp(0) is exactly 1, −∞
    // gives 0 and NaN stays NaN.
    private const float ExpLowest = -87.33654f, Log2E = 1.44269504088896341f, Ln2Hi = 0.693359375f, Ln2Lo = -2.12194440e-4f;
    private const float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f, P3 = 4.1665795894e-2f, P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> ExpNonPositive(Vector512<float> x)
    {
        var underflow = Vector512.LessThan(x, Vector512.Create(ExpLowest));
        x = Vector512.ConditionalSelect(underflow, Vector512.Create(ExpLowest), x);
        var n = Vector512.Round(x * Vector512.Create(Log2E));
        var r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Hi), x);
        r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Lo), r);
        var p = Vector512.FusedMultiplyAdd(Vector512.Create(P0), r, Vector512.Create(P1));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P2));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P3));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P4));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P5));
        p = Vector512.FusedMultiplyAdd(p, r * r, r + Vector512<float>.One);
        var scale = ((Vector512.ConvertToInt32(n) + Vector512.Create(127)) << 23).AsSingle();
        return Vector512.AndNot(p * scale, underflow.AsSingle());
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> ExpNonPositive(Vector256<float> x)
    {
        var underflow = Vector256.LessThan(x, Vector256.Create(ExpLowest));
        x = Vector256.ConditionalSelect(underflow, Vector256.Create(ExpLowest), x);
        var n = Vector256.Round(x * Vector256.Create(Log2E));
        var r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Hi), x);
        r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Lo), r);
        var p = Vector256.FusedMultiplyAdd(Vector256.Create(P0), r, Vector256.Create(P1));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P2));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P3));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P4));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P5));
        p = Vector256.FusedMultiplyAdd(p, r * r, r + Vector256<float>.One);
        var scale = ((Vector256.ConvertToInt32(n) + Vector256.Create(127)) << 23).AsSingle();
        return Vector256.AndNot(p * scale, underflow.AsSingle());
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

    /// <summary>
    /// Rotates the first 2·<paramref name="pairs"/> dimensions of an fp32 key row by RoPE at <paramref name="position"/>:
    /// angle i is the fp32 product <c>position · invFreq[i]</c>; pair i is (i, i + pairs) (rotate-half) or (2i, 2i + 1)
    /// (interleaved); <c>(x, y) → (x·cos − y·sin, x·sin + y·cos)</c>. <paramref name="angles"/>,
    /// <paramref name="cos"/> and <paramref name="sin"/> are scratch of <paramref name="pairs"/> floats.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void RotateRow(float* key, float position, float* invFreq, int pairs, bool interleaved, float* angles, float* cos, float* sin)
    {
        int i = 0;
        var p = Vector256.Create(position);
        for (; i + 8 <= pairs; i += 8) (p * Vector256.Load(invFreq + i)).Store(angles + i);
        for (; i < pairs; i++) angles[i] = position * invFreq[i];
        CosSin(angles, cos, sin, pairs);

        i = 0;
        if (interleaved)
        {
            // Four pairs per vector: (x, y) · (c, c) + (y, x) · (−s, s).
            var sign = Vector256.Create(-1f, 1f, -1f, 1f, -1f, 1f, -1f, 1f);
            var duplicate = Vector256.Create(0, 0, 1, 1, 2, 2, 3, 3);
            var swap = Vector256.Create(1, 0, 3, 2, 5, 4, 7, 6);
            for (; i + 4 <= pairs; i += 4)
            {
                var v = Vector256.Load(key + 2 * i);
                var c = Vector256.Shuffle(Vector128.Load(cos + i).ToVector256Unsafe(), duplicate);
                var s = Vector256.Shuffle(Vector128.Load(sin + i).ToVector256Unsafe(), duplicate) * sign;
                Vector256.FusedMultiplyAdd(Vector256.Shuffle(v, swap), s, v * c).Store(key + 2 * i);
            }
            for (; i < pairs; i++)
            {
                float x = key[2 * i], y = key[2 * i + 1];
                key[2 * i] = x * cos[i] - y * sin[i];
                key[2 * i + 1] = x * sin[i] + y * cos[i];
            }
        }
        else
        {
            float* second = key + pairs;
            for (; i + 8 <= pairs; i += 8)
            {
                Vector256<float> x = Vector256.Load(key + i), y = Vector256.Load(second + i);
                Vector256<float> c = Vector256.Load(cos + i), s = Vector256.Load(sin + i);
                (x * c - y * s).Store(key + i);
                (x * s + y * c).Store(second + i);
            }
            for (; i < pairs; i++)
            {
                float x = key[i], y = second[i];
                key[i] = x * cos[i] - y * sin[i];
                second[i] = x * sin[i] + y * cos[i];
            }
        }
    }

    /// <summary>Above this magnitude the vector reduction by π/2 is not exact enough; such angles take the scalar path.</summary>
    private const float ReductionLimit = 1 << 20;

    /// <summary>
    /// Cosine and sine of <paramref name="count"/> fp32 angles, each accurate to fp32 rounding of the exact value
    /// (the angle is widened to double, reduced by π/2 in two parts, and the Taylor polynomials to degree 11/12 on
    /// [−π/4, π/4] are below 1e-11), so RoPE here matches the double-precision oracle of the same fp32 angles.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void CosSin(float* angles, float* cos, float* sin, int count)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            for (; i + 16 <= count; i += 16)
            {
                var a = Vector512.Load(angles + i);
                if (Vector512.GreaterThanAny(Vector512.Abs(a), Vector512.Create(ReductionLimit)))
                {
                    for (int j = i; j < i + 16; j++) ScalarCosSin(angles[j], out cos[j], out sin[j]);
                    continue;
                }
                CosSin(Vector512.WidenLower(a), out var cl, out var sl);
                CosSin(Vector512.WidenUpper(a), out var ch, out var sh);
                Vector512.Narrow(cl, ch).Store(cos + i);
                Vector512.Narrow(sl, sh).Store(sin + i);
            }
        }
        for (; i + 8 <= count; i += 8)
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

    /// <summary>The 8-lane form of <see cref="CosSin(Vector256{double}, out Vector256{double}, out Vector256{double})"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CosSin(Vector512<double> x, out Vector512<double> cos, out Vector512<double> sin)
    {
        const double TwoOverPi = 0.63661977236758134308;
        const double Pio2Hi = 1.57079632673412561417e+00;
        const double Pio2Lo = 6.07710050650619224932e-11;
        var k = Vector512.Round(x * Vector512.Create(TwoOverPi));
        var r = (x - k * Vector512.Create(Pio2Hi)) - k * Vector512.Create(Pio2Lo);
        var r2 = r * r;

        var sinR = r + r * r2 * Poly(r2, -1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800);
        var cosR = Vector512<double>.One + r2 * Poly(r2, -1.0 / 2, 1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800, 1.0 / 479001600);

        var quadrant = k - Vector512.Create(4.0) * Vector512.Floor(k * Vector512.Create(0.25));
        var one = Vector512.Create(1.0);
        var two = Vector512.Create(2.0);
        var odd = Vector512.Equals(quadrant, one) | Vector512.Equals(quadrant, Vector512.Create(3.0));
        var s = Vector512.ConditionalSelect(odd, cosR, sinR);
        var c = Vector512.ConditionalSelect(odd, sinR, cosR);
        sin = Vector512.ConditionalSelect(Vector512.GreaterThanOrEqual(quadrant, two), -s, s);
        cos = Vector512.ConditionalSelect(Vector512.Equals(quadrant, one) | Vector512.Equals(quadrant, two), -c, c);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<double> Poly(Vector512<double> x, double c0, double c1, double c2, double c3, double c4) =>
        Vector512.Create(c0) + x * (Vector512.Create(c1) + x * (Vector512.Create(c2) + x * (Vector512.Create(c3) + x * Vector512.Create(c4))));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<double> Poly(Vector512<double> x, double c0, double c1, double c2, double c3, double c4, double c5) =>
        Vector512.Create(c0) + x * Poly(x, c1, c2, c3, c4, c5);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<double> Poly(Vector256<double> x, double c0, double c1, double c2, double c3, double c4) =>
        Vector256.Create(c0) + x * (Vector256.Create(c1) + x * (Vector256.Create(c2) + x * (Vector256.Create(c3) + x * Vector256.Create(c4))));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<double> Poly(Vector256<double> x, double c0, double c1, double c2, double c3, double c4, double c5) =>
        Vector256.Create(c0) + x * Poly(x, c1, c2, c3, c4, c5);
}
