using KvKernels.Cuda;

namespace KvKernels.Tests.Common;

/// <summary>
/// kvk_fp8.cuh against <see cref="Fp8Reference"/>: every code of both formats decoded, and a few thousand floats
/// (every fp8 value, every halfway point and its float neighbours, ±max and beyond, NaN, ±0, subnormals, random
/// values) encoded, bit for bit; pair and quad packing order (element 0 in the low byte).
/// NaN encodings are this library's choice (f32 NaN → 0x7F; e4m3 NaN → f16 0x7FFF; e5m2 NaN → its byte in the high
/// half): on the emulator they are asserted exactly, on a GPU only "is a NaN" until confirmed on hardware.
/// </summary>
public sealed class Fp8Tests(Backends backends)
{
    private static bool Exact(CudaDevice device) => device.Kind == DeviceKind.Emulated;

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void EveryCode_DecodesToItsValue(string backend)
    {
        var device = backends.Get(backend);
        var kernel = device.LoadModule(CommonKernels.Specialization).GetKernel("kvk_test_fp8_decode");
        // Pair i = (low i, high (37 i + 11) mod 256): every code appears in both positions.
        const int n = 256;
        var codes = Enumerable.Range(0, n).Select(i => (ushort)(i | (((37 * i + 11) & 0xFF) << 8))).ToArray();
        using var dCodes = device.Allocate<ushort>(codes);
        using var e4m3F16 = device.Allocate<uint>(n);
        using var e5m2F16 = device.Allocate<uint>(n);
        using var e4m3Trick = device.Allocate<uint>(n);
        using var e4m3F16x4 = device.Allocate<uint>(n);
        using var e5m2F16x4 = device.Allocate<uint>(n);
        using var e4m3F32 = device.Allocate<float>(2 * n);
        using var e5m2F32 = device.Allocate<float>(2 * n);
        using var e4m3Scalar = device.Allocate<float>(n);
        using var e5m2Scalar = device.Allocate<float>(n);
        var args = new KernelArguments();
        args.Add(dCodes.Span);
        args.Add(e4m3F16.Span);
        args.Add(e5m2F16.Span);
        args.Add(e4m3Trick.Span);
        args.Add(e4m3F16x4.Span);
        args.Add(e5m2F16x4.Span);
        args.Add(e4m3F32.Span);
        args.Add(e5m2F32.Span);
        args.Add(e4m3Scalar.Span);
        args.Add(e5m2Scalar.Span);
        args.Add(n);
        kernel.Launch(1, 256, 0, null, ref args);

        bool exact = Exact(device);
        var f16 = new Dictionary<Fp8Format, uint[]> { [Fp8Format.E4M3] = e4m3F16.ToArray(), [Fp8Format.E5M2] = e5m2F16.ToArray() };
        var f16x4 = new Dictionary<Fp8Format, uint[]> { [Fp8Format.E4M3] = e4m3F16x4.ToArray(), [Fp8Format.E5M2] = e5m2F16x4.ToArray() };
        var f32 = new Dictionary<Fp8Format, float[]> { [Fp8Format.E4M3] = e4m3F32.ToArray(), [Fp8Format.E5M2] = e5m2F32.ToArray() };
        var scalar = new Dictionary<Fp8Format, float[]> { [Fp8Format.E4M3] = e4m3Scalar.ToArray(), [Fp8Format.E5M2] = e5m2Scalar.ToArray() };
        var trick = e4m3Trick.ToArray();

        foreach (var format in new[] { Fp8Format.E4M3, Fp8Format.E5M2 })
        {
            for (int i = 0; i < n; i++)
            {
                byte lo = (byte)codes[i], hi = (byte)(codes[i] >> 8);
                string where = $"{format} pair 0x{codes[i]:X4}";
                CheckF16(format, lo, (ushort)f16[format][i], exact, where + " low half");
                CheckF16(format, hi, (ushort)(f16[format][i] >> 16), exact, where + " high half");
                Assert.True(f16x4[format][i] == f16[format][i], $"{where}: the x4 form gives 0x{f16x4[format][i]:X8}, the x2 form 0x{f16[format][i]:X8}");
                CheckF32(format, lo, f32[format][2 * i], exact, where + " element 0 as f32");
                CheckF32(format, hi, f32[format][2 * i + 1], exact, where + " element 1 as f32");
                CheckF32(format, lo, scalar[format][i], exact, where + " scalar");
                if (format == Fp8Format.E4M3)
                {
                    // The sm_80 software path (prmt-free bias multiply) gives the documented bits on every backend.
                    CheckF16(format, lo, (ushort)trick[i], exact: true, where + " bias trick low");
                    CheckF16(format, hi, (ushort)(trick[i] >> 16), exact: true, where + " bias trick high");
                }
            }
        }
    }

    private static void CheckF16(Fp8Format format, byte code, ushort got, bool exact, string where)
    {
        if (Fp8Reference.IsNaN(format, code))
        {
            Assert.True(Half.IsNaN(BitConverter.UInt16BitsToHalf(got)), $"{where}: NaN code 0x{code:X2} gave f16 0x{got:X4}");
            if (exact)
            {
                ushort expected = format == Fp8Format.E4M3 ? (ushort)0x7FFF : (ushort)(code << 8);
                Assert.True(expected == got, $"{where}: NaN code 0x{code:X2} gave f16 0x{got:X4}, documented 0x{expected:X4}");
            }
            return;
        }
        ushort want = Fp8Reference.F16Bits(Fp8Reference.Decode(format, code));
        Assert.True(want == got, $"{where}: code 0x{code:X2} gave f16 0x{got:X4}, expected 0x{want:X4} ({Fp8Reference.Decode(format, code)})");
    }

    private static void CheckF32(Fp8Format format, byte code, float got, bool exact, string where)
    {
        uint bits = BitConverter.SingleToUInt32Bits(got);
        if (Fp8Reference.IsNaN(format, code))
        {
            Assert.True(float.IsNaN(got), $"{where}: NaN code 0x{code:X2} gave 0x{bits:X8}");
            if (exact) Assert.True(bits == 0x7FFFFFFFu, $"{where}: NaN code 0x{code:X2} gave 0x{bits:X8}, documented 0x7FFFFFFF");
            return;
        }
        uint want = BitConverter.SingleToUInt32Bits((float)Fp8Reference.Decode(format, code));
        Assert.True(want == bits, $"{where}: code 0x{code:X2} gave 0x{bits:X8} ({got}), expected 0x{want:X8} ({Fp8Reference.Decode(format, code)})");
    }

    /// <summary>Every fp8 value, halfway points and their neighbours, specials and random floats (a multiple of 4).</summary>
    internal static float[] EncodeInputs()
    {
        var values = new List<float>();
        void AddWithNeighbours(double v)
        {
            float f = (float)v;
            values.Add(f);
            values.Add(MathF.BitDecrement(f));
            values.Add(MathF.BitIncrement(f));
        }
        foreach (var format in new[] { Fp8Format.E4M3, Fp8Format.E5M2 })
        {
            var finite = Enumerable.Range(0, 0x80).Select(c => Fp8Reference.Decode(format, (byte)c)).Where(double.IsFinite).ToArray();
            for (int i = 0; i < finite.Length; i++)
            {
                AddWithNeighbours(finite[i]);
                AddWithNeighbours(-finite[i]);
                if (i + 1 < finite.Length)
                {
                    double mid = (finite[i] + finite[i + 1]) / 2;   // exact in float: one more mantissa bit
                    AddWithNeighbours(mid);
                    AddWithNeighbours(-mid);
                }
            }
            double max = Fp8Reference.Max(format), ulpAtMax = format == Fp8Format.E4M3 ? 32 : 8192;
            foreach (double v in new[] { max + ulpAtMax / 2, max + ulpAtMax, max * 4, Math.Pow(2, -10), Math.Pow(2, -17), Math.Pow(2, -18) })
            {
                AddWithNeighbours(v);
                AddWithNeighbours(-v);
            }
        }
        values.AddRange([0.0f, -0.0f, float.Epsilon, -float.Epsilon, 1e-40f, -1e-40f, float.MinValue, float.MaxValue,
            float.PositiveInfinity, float.NegativeInfinity, float.NaN, -float.NaN,
            BitConverter.UInt32BitsToSingle(0x7F800001), BitConverter.UInt32BitsToSingle(0xFFC00123), 1e30f, -1e30f]);
        var random = new Random(8);
        for (int i = 0; i < 1000; i++)
        {
            double magnitude = Math.Pow(2, random.NextDouble() * 40 - 24);        // 2^-24 .. 2^16
            values.Add((float)(random.Next(2) == 0 ? magnitude : -magnitude));
        }
        while (values.Count % 4 != 0) values.Add(1.0f);
        return values.ToArray();
    }

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Floats_EncodeWithRoundToNearestEvenAndSatfinite(string backend)
    {
        var device = backends.Get(backend);
        var kernel = device.LoadModule(CommonKernels.Specialization).GetKernel("kvk_test_fp8_encode");
        var input = EncodeInputs();
        int n = input.Length;
        Assert.True(n >= 3000, $"{n} inputs");
        using var dIn = device.Allocate<float>(input);
        using var e4m3 = device.Allocate<byte>(n);
        using var e5m2 = device.Allocate<byte>(n);
        using var e4m3Pairs = device.Allocate<ushort>(n / 2);
        using var e5m2Pairs = device.Allocate<ushort>(n / 2);
        using var e4m3Quads = device.Allocate<uint>(n / 4);
        using var e5m2Quads = device.Allocate<uint>(n / 4);
        var args = new KernelArguments();
        args.Add(dIn.Span);
        args.Add(e4m3.Span);
        args.Add(e5m2.Span);
        args.Add(e4m3Pairs.Span);
        args.Add(e5m2Pairs.Span);
        args.Add(e4m3Quads.Span);
        args.Add(e5m2Quads.Span);
        args.Add(n);
        kernel.Launch((uint)((n + 255) / 256), 256, 0, null, ref args);

        bool exact = Exact(device);
        var outputs = new[]
        {
            (Fp8Format.E4M3, e4m3.ToArray(), e4m3Pairs.ToArray(), e4m3Quads.ToArray()),
            (Fp8Format.E5M2, e5m2.ToArray(), e5m2Pairs.ToArray(), e5m2Quads.ToArray()),
        };
        foreach (var (format, scalars, pairs, quads) in outputs)
        {
            for (int i = 0; i < n; i++)
            {
                float x = input[i];
                byte want = Fp8Reference.Encode(format, x);
                byte fromPair = (byte)(pairs[i / 2] >> (8 * (i % 2)));
                byte fromQuad = (byte)(quads[i / 4] >> (8 * (i % 4)));
                string where = $"{format} of {x:R} (0x{BitConverter.SingleToUInt32Bits(x):X8}), input {i}";
                foreach (var (got, form) in new[] { (scalars[i], "scalar"), (fromPair, "pair byte " + (i % 2)), (fromQuad, "quad byte " + (i % 4)) })
                {
                    if (float.IsNaN(x) && !exact)
                        Assert.True(Fp8Reference.IsNaN(format, got), $"{where} ({form}): 0x{got:X2} is not a NaN code");
                    else
                        Assert.True(want == got, $"{where} ({form}): got 0x{got:X2}, expected 0x{want:X2}");
                }
            }
        }
    }

    [Fact]
    public void Reference_KnownCodes()
    {
        // Spot checks of the reference itself against the format tables.
        Assert.Equal(448.0, Fp8Reference.Decode(Fp8Format.E4M3, 0x7E));
        Assert.Equal(Math.Pow(2, -9), Fp8Reference.Decode(Fp8Format.E4M3, 0x01));
        Assert.Equal(Math.Pow(2, -6), Fp8Reference.Decode(Fp8Format.E4M3, 0x08));
        Assert.True(double.IsNaN(Fp8Reference.Decode(Fp8Format.E4M3, 0xFF)));
        Assert.Equal(57344.0, Fp8Reference.Decode(Fp8Format.E5M2, 0x7B));
        Assert.Equal(double.NegativeInfinity, Fp8Reference.Decode(Fp8Format.E5M2, 0xFC));
        Assert.Equal(Math.Pow(2, -16), Fp8Reference.Decode(Fp8Format.E5M2, 0x01));
        Assert.Equal(0x7E, Fp8Reference.Encode(Fp8Format.E4M3, 1e6f));
        Assert.Equal(0xFE, Fp8Reference.Encode(Fp8Format.E4M3, float.NegativeInfinity));
        Assert.Equal(0x7B, Fp8Reference.Encode(Fp8Format.E5M2, float.PositiveInfinity));
        Assert.Equal(0x80, Fp8Reference.Encode(Fp8Format.E4M3, -1e-30f));
        Assert.Equal(0x00, Fp8Reference.Encode(Fp8Format.E4M3, (float)Math.Pow(2, -10)));   // tie with 0 → 0
        Assert.Equal(0x01, Fp8Reference.Encode(Fp8Format.E4M3, MathF.BitIncrement((float)Math.Pow(2, -10))));
        Assert.Equal(0x3C, Fp8Reference.Encode(Fp8Format.E4M3, 1.5f));
        Assert.Equal(0x38, Fp8Reference.Encode(Fp8Format.E4M3, 1.0625f));                   // tie 1 / 1.125 → even (1)
        Assert.Equal(0x3A, Fp8Reference.Encode(Fp8Format.E4M3, 1.3125f));                   // tie 1.25 / 1.375 → even (1.25)
    }
}
