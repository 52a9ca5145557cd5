using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace KvCheck.Verification;

/// <summary>Element types the ops are verified with. The paging kernels move bytes, so bf16 travels as <c>ushort</c>.</summary>
internal enum ElementKind
{
    /// <summary>IEEE half (<see cref="Half"/>).</summary>
    Fp16,

    /// <summary>bfloat16 stored as <c>ushort</c> bits.</summary>
    Bf16,

    /// <summary>Raw bytes (fp8, int8, packed int4 …).</summary>
    U8,
}

internal static class Elements
{
    public static string Name(this ElementKind kind) => kind switch
    {
        ElementKind.Fp16 => "fp16",
        ElementKind.Bf16 => "bf16",
        _ => "u8",
    };

    /// <summary>Reads element <paramref name="bits"/> as a number (fp16, bf16), for the relative error.</summary>
    public static double ToDouble(ElementKind kind, ushort bits) => kind switch
    {
        ElementKind.Fp16 => (double)BitConverter.UInt16BitsToHalf(bits),
        ElementKind.Bf16 => BitConverter.Int32BitsToSingle(bits << 16),
        _ => bits,
    };

    /// <summary>float → bf16 bits, round to nearest even (NaN kept quiet).</summary>
    public static ushort ToBf16(float value)
    {
        uint u = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value)) return (ushort)((u >> 16) | 0x40);
        u += 0x7FFF + ((u >> 16) & 1);
        return (ushort)(u >> 16);
    }

    /// <summary>
    /// Fills <paramref name="destination"/> with realistic, never-zero values of <paramref name="kind"/>: normally distributed
    /// activations with a few large outlier channels (every 61st element ×24) for fp16/bf16, bytes 1..255 for u8.
    /// </summary>
    public static void FillRandom<T>(Span<T> destination, ElementKind kind, Random rng) where T : unmanaged
    {
        switch (kind)
        {
            case ElementKind.Fp16:
                {
                    var halves = MemoryMarshal.Cast<T, Half>(destination);
                    for (int i = 0; i < halves.Length; i++) halves[i] = (Half)Value(rng, i);
                    break;
                }
            case ElementKind.Bf16:
                {
                    var bits = MemoryMarshal.Cast<T, ushort>(destination);
                    for (int i = 0; i < bits.Length; i++) bits[i] = ToBf16(Value(rng, i));
                    break;
                }
            default:
                {
                    var bytes = MemoryMarshal.AsBytes(destination);
                    for (int i = 0; i < bytes.Length; i++) bytes[i] = (byte)rng.Next(1, 256);
                    break;
                }
        }
    }

    private static float Value(Random rng, int index)
    {
        // Box–Muller normal sample; outlier channels as real keys have them.
        double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
        double x = Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
        if (index % 61 == 7) x *= 24;
        if (Math.Abs(x) < 1e-3) x = x < 0 ? -1e-3 : 1e-3;
        return (float)x;
    }

    /// <summary>Sets every byte to 0xFF (NaN for fp16 and bf16): the poison of outputs and never-written pool rows.</summary>
    public static void Poison<T>(Span<T> destination) where T : unmanaged => MemoryMarshal.AsBytes(destination).Fill(0xFF);

    public static int Size<T>() where T : unmanaged => Unsafe.SizeOf<T>();
}
