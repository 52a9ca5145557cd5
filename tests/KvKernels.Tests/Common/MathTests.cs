using KvKernels.Cuda;

namespace KvKernels.Tests.Common;

/// <summary>
/// kvk_math.cuh: ex2/lg2/rcp .approx.ftz special values (exact on every backend, as the PTX ISA tables list them,
/// with .ftz applied to subnormal inputs and results) and accuracy on random inputs against double-precision
/// references. On the emulator the host twins are held to relative error below 2^-22 (they are correctly rounded up to
/// double-rounding accidents); on a GPU to the PTX ISA's bounds (ex2: 2 ulp from the correctly rounded result; lg2:
/// absolute 2^-22 in (0.5, 2), relative 2^-22 elsewhere; rcp: 1 ulp).
/// </summary>
public sealed class MathTests(Backends backends)
{
    private static readonly float MinNormal = BitConverter.UInt32BitsToSingle(0x00800000);
    private static readonly float MaxSubnormal = BitConverter.UInt32BitsToSingle(0x007FFFFF);

    private static float[] Inputs()
    {
        var values = new List<float>
        {
            float.NegativeInfinity, float.PositiveInfinity, float.NaN, BitConverter.UInt32BitsToSingle(0xFFC00001),
            0.0f, -0.0f, float.Epsilon, -float.Epsilon, MaxSubnormal, -MaxSubnormal, MinNormal, -MinNormal,
            1.0f, -1.0f, 2.0f, 0.5f, 0.75f, 1.5f, 3.0f, 1e-3f, 10.0f, 100.0f, -3.5f, -100.0f,
            127.5f, 128.0f, 200.0f, 1e30f, -125.9f, -126.5f, -140.0f, -149.0f, -200.0f, -1e30f,
            MathF.BitIncrement(1.0f), MathF.BitDecrement(1.0f), float.MaxValue, float.MinValue,
        };
        var random = new Random(22);
        for (int i = 0; i < 600; i++) values.Add((float)(random.NextDouble() * 252 - 125));             // ex2's normal range
        for (int i = 0; i < 400; i++) values.Add((float)(0.5 + random.NextDouble() * 1.5));             // lg2's (0.5, 2)
        for (int i = 0; i < 600; i++)
        {
            double magnitude = Math.Pow(2, random.NextDouble() * 250 - 125);                        // 2^-125 .. 2^125
            values.Add((float)(random.Next(2) == 0 ? magnitude : -magnitude));
        }
        return values.ToArray();
    }

    private static bool IsSubnormalOrZero(float x) => (BitConverter.SingleToUInt32Bits(x) & 0x7F800000u) == 0;

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Ex2Lg2Rcp_SpecialValuesExact_AndRandomWithinBounds(string backend)
    {
        var device = backends.Get(backend);
        bool emulated = device.Kind == DeviceKind.Emulated;
        var kernel = device.LoadModule(CommonKernels.Specialization).GetKernel("kvk_test_math");
        var input = Inputs();
        int n = input.Length;
        using var dIn = device.Allocate<float>(input);
        using var dEx2 = device.Allocate<float>(n);
        using var dLg2 = device.Allocate<float>(n);
        using var dRcp = device.Allocate<float>(n);
        var args = new KernelArguments();
        args.Add(dIn.Span);
        args.Add(dEx2.Span);
        args.Add(dLg2.Span);
        args.Add(dRcp.Span);
        args.Add(n);
        kernel.Launch((uint)((n + 255) / 256), 256, 0, null, ref args);
        var ex2 = dEx2.ToArray();
        var lg2 = dLg2.ToArray();
        var rcp = dRcp.ToArray();

        for (int i = 0; i < n; i++)
        {
            CheckEx2(input[i], ex2[i], emulated);
            CheckLg2(input[i], lg2[i], emulated);
            CheckRcp(input[i], rcp[i], emulated);
        }
    }

    private static string Describe(float x, float got) =>
        $"input {x:R} (0x{BitConverter.SingleToUInt32Bits(x):X8}) gave {got:R} (0x{BitConverter.SingleToUInt32Bits(got):X8})";

    private static void AssertBits(float expected, float got, string what) =>
        Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(got), $"{what}, expected {expected:R}");

    private static void CheckEx2(float x, float got, bool emulated)
    {
        string what = "ex2: " + Describe(x, got);
        if (float.IsNaN(x)) { Assert.True(float.IsNaN(got), what); return; }
        if (IsSubnormalOrZero(x)) { AssertBits(1.0f, got, what); return; }     // ±0, and ±subnormal flushed to ±0
        double reference = Math.Pow(2, x);
        if (reference < MinNormal) { AssertBits(0.0f, got, what); return; }   // -Inf, and results flushed (ftz)
        if (reference > float.MaxValue) { AssertBits(float.PositiveInfinity, got, what); return; }
        // Emulator: the brief's 2^-22; GPU: 2 ulp from the correctly rounded result, plus its own 1/2 ulp.
        double tolerance = emulated ? Math.Pow(2, -22) : 1.25 * Math.Pow(2, -22);
        Assert.True(Math.Abs(got - reference) <= tolerance * reference, $"{what}, reference {reference:R}, relative error {Math.Abs(got - reference) / reference:E3}");
    }

    private static void CheckLg2(float x, float got, bool emulated)
    {
        string what = "lg2: " + Describe(x, got);
        if (float.IsNaN(x)) { Assert.True(float.IsNaN(got), what); return; }
        if (IsSubnormalOrZero(x)) { AssertBits(float.NegativeInfinity, got, what); return; }   // incl. -0 / -subnormal
        if (x < 0) { Assert.True(float.IsNaN(got), what); return; }
        if (float.IsPositiveInfinity(x)) { AssertBits(float.PositiveInfinity, got, what); return; }
        double reference = Math.Log2(x);
        double error = Math.Abs(got - reference);
        if (emulated)
        {
            if (reference == 0) AssertBits(0.0f, got, what);
            else Assert.True(error < Math.Pow(2, -22) * Math.Abs(reference), $"{what}, reference {reference:R}, relative error {error / Math.Abs(reference):E3}");
        }
        else
        {
            double bound = x > 0.5f && x < 2.0f ? Math.Pow(2, -22) : Math.Pow(2, -22) * Math.Abs(reference);
            Assert.True(error <= bound, $"{what}, reference {reference:R}, error {error:E3}");
        }
    }

    private static void CheckRcp(float x, float got, bool emulated)
    {
        string what = "rcp: " + Describe(x, got);
        if (float.IsNaN(x)) { Assert.True(float.IsNaN(got), what); return; }
        if (IsSubnormalOrZero(x)) { AssertBits(float.IsNegative(x) ? float.NegativeInfinity : float.PositiveInfinity, got, what); return; }
        double reference = 1.0 / x;
        if (Math.Abs(reference) < MinNormal) { AssertBits(float.IsNegative(x) ? -0.0f : 0.0f, got, what); return; }   // incl. ±Inf
        double tolerance = emulated ? Math.Pow(2, -24) : Math.Pow(2, -23) * 1.5;     // twin: correctly rounded; GPU: 1 ulp
        Assert.True(Math.Abs(got - reference) <= tolerance * Math.Abs(reference), $"{what}, reference {reference:R}");
    }
}
