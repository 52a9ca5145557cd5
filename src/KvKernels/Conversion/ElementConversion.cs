using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace KvKernels.Conversion;

/// <summary>fp16 / bf16 / fp32 / fp64 bytes ⇄ fp32, little-endian; narrowing rounds to nearest even.</summary>
internal static class ElementConversion
{
    public static void ToSingle(ReadOnlySpan<byte> source, SafetensorsDType type, Span<float> destination)
    {
        switch (type)
        {
            case SafetensorsDType.F32:
                MemoryMarshal.Cast<byte, float>(source).CopyTo(destination);
                break;
            case SafetensorsDType.F16:
            {
                var h = MemoryMarshal.Cast<byte, Half>(source);
                for (int i = 0; i < h.Length; i++) destination[i] = (float)h[i];
                break;
            }
            case SafetensorsDType.BF16:
                WidenBFloat16(MemoryMarshal.Cast<byte, ushort>(source), destination);
                break;
            case SafetensorsDType.F64:
            {
                var d = MemoryMarshal.Cast<byte, double>(source);
                for (int i = 0; i < d.Length; i++) destination[i] = (float)d[i];
                break;
            }
            default:
                throw new NotSupportedException($"{type.Name()} is not a float type.");
        }
    }

    public static void FromSingle(ReadOnlySpan<float> source, SafetensorsDType type, Span<byte> destination)
    {
        switch (type)
        {
            case SafetensorsDType.F32:
                MemoryMarshal.AsBytes(source).CopyTo(destination);
                break;
            case SafetensorsDType.F16:
            {
                var h = MemoryMarshal.Cast<byte, Half>(destination);
                for (int i = 0; i < source.Length; i++) h[i] = (Half)source[i];
                break;
            }
            case SafetensorsDType.BF16:
            {
                var b = MemoryMarshal.Cast<byte, BFloat16>(destination);
                for (int i = 0; i < source.Length; i++) b[i] = (BFloat16)source[i];
                break;
            }
            case SafetensorsDType.F64:
            {
                var d = MemoryMarshal.Cast<byte, double>(destination);
                for (int i = 0; i < source.Length; i++) d[i] = source[i];
                break;
            }
            default:
                throw new NotSupportedException($"{type.Name()} is not a float type.");
        }
    }

    // bf16 → fp32 is a 16-bit shift: exact, and vectorised because checkpoints are mostly bf16.
    private static void WidenBFloat16(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        var bits = MemoryMarshal.Cast<float, uint>(destination);
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i + Vector256<ushort>.Count <= source.Length; i += Vector256<ushort>.Count)
            {
                var (lo, hi) = Vector256.Widen(Vector256.Create(source.Slice(i, Vector256<ushort>.Count)));
                Vector256.ShiftLeft(lo, 16).CopyTo(bits.Slice(i));
                Vector256.ShiftLeft(hi, 16).CopyTo(bits.Slice(i + Vector256<uint>.Count));
            }
        }
        for (; i < source.Length; i++) bits[i] = (uint)source[i] << 16;
    }
}
