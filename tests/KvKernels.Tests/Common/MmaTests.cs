using KvKernels.Cuda;

namespace KvKernels.Tests.Common;

/// <summary>
/// kvk_mma.cuh's mma.sync m16n8k16 (f16 and bf16) against the double-precision product A·B + C, with fragments built
/// from the PTX ISA table by plain loads, and again with A and B loaded by ldmatrix (A: x4; B: x2.trans from [k][n],
/// x2 from Bᵀ [n][k]) — which also checks the documented standard ldmatrix uses against the MMA layout — and with the
/// accumulate-in-place overload applied twice. Values that are small multiples of 1/8 make every partial sum exact in
/// f32, so the result must be bit-exact on any backend; random values are compared with a tolerance relative to
/// Σ|A·B| + |C| (the tensor core's internal rounding is not documented).
/// </summary>
public sealed class MmaTests(Backends backends)
{
    public static TheoryData<string, bool, bool> Cases
    {
        get
        {
            var data = new TheoryData<string, bool, bool>();
            foreach (var backend in Backends.All)
                foreach (bool bf16 in new[] { false, true })
                    foreach (bool exactValues in new[] { true, false })
                        data.Add(backend, bf16, exactValues);
            return data;
        }
    }

    private static ushort ToBits(float value, bool bf16)
    {
        if (!bf16) return BitConverter.HalfToUInt16Bits((Half)value);
        uint u = BitConverter.SingleToUInt32Bits(value);
        return (ushort)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);   // round to nearest even (finite inputs)
    }

    private static double FromBits(ushort bits, bool bf16) =>
        bf16 ? BitConverter.UInt32BitsToSingle((uint)bits << 16) : (double)BitConverter.UInt16BitsToHalf(bits);

    [Theory]
    [MemberData(nameof(Cases))]
    public void Mma_m16n8k16_MatchesDoubleReference(string backend, bool bf16, bool exactValues)
    {
        var device = backends.Get(backend);
        var kernel = device.LoadModule(CommonKernels.Specialization).GetKernel("kvk_test_mma");
        var random = new Random((bf16 ? 100 : 200) + (exactValues ? 1 : 2));
        float Sample(int range) => exactValues ? random.Next(-range, range + 1) / 8.0f : (float)(random.NextDouble() * 2 - 1);

        var a = new ushort[16 * 16];
        var b = new ushort[16 * 8];     // [k][n]
        var c = new float[16 * 8];
        for (int i = 0; i < a.Length; i++) a[i] = ToBits(Sample(16), bf16);
        for (int i = 0; i < b.Length; i++) b[i] = ToBits(Sample(16), bf16);
        for (int i = 0; i < c.Length; i++) c[i] = Sample(64);

        using var dA = device.Allocate<ushort>(a);
        using var dB = device.Allocate<ushort>(b);
        using var dC = device.Allocate<float>(c);
        using var dD = device.Allocate<float>(4 * 128);
        var args = new KernelArguments();
        args.Add(dA.Span);
        args.Add(dB.Span);
        args.Add(dC.Span);
        args.Add(dD.Span);
        args.Add(bf16 ? 1 : 0);
        kernel.Launch(1, 32, 0, null, ref args);
        var d = dD.ToArray();

        double scaleFactor = exactValues ? 0 : device.Kind == DeviceKind.Emulated ? Math.Pow(2, -22) : Math.Pow(2, -18);
        string[] forms = ["ISA-table fragments", "ldmatrix A x4 + B x2.trans", "ldmatrix A x4 + Bt x2", "acc += A*B twice"];
        for (int form = 0; form < 4; form++)
        {
            int products = form == 3 ? 2 : 1;
            for (int m = 0; m < 16; m++)
            {
                for (int n = 0; n < 8; n++)
                {
                    double sum = c[m * 8 + n], magnitude = Math.Abs(c[m * 8 + n]);
                    for (int k = 0; k < 16; k++)
                    {
                        double p = FromBits(a[m * 16 + k], bf16) * FromBits(b[k * 8 + n], bf16);
                        sum += products * p;
                        magnitude += products * Math.Abs(p);
                    }
                    float got = d[form * 128 + m * 8 + n];
                    string where = $"{(bf16 ? "bf16" : "f16")} {forms[form]}: D[{m}][{n}] = {got:R}, reference {sum:R}";
                    if (exactValues) Assert.True((float)sum == got, where);
                    else Assert.True(Math.Abs(got - sum) <= scaleFactor * magnitude, $"{where}, error {Math.Abs(got - sum):E3}, Σ|A·B|+|C| = {magnitude:R}");
                }
            }
        }
    }
}
