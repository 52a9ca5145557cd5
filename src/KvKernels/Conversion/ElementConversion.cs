using System.Numerics.Tensors;
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
                TensorPrimitives.ConvertToSingle(MemoryMarshal.Cast<byte, Half>(source), destination);
                break;
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
                TensorPrimitives.ConvertToHalf(source, MemoryMarshal.Cast<byte, Half>(destination));
                break;
            case SafetensorsDType.BF16:
                NarrowBFloat16(source, MemoryMarshal.Cast<byte, ushort>(destination));
                break;
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

    // fp32 → bf16 rounding to nearest even, NaN to 0x7FFF: the same function as the BFloat16 conversion, eight at a time.
    private static void NarrowBFloat16(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        var bits = MemoryMarshal.Cast<float, uint>(source);
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var magnitude = Vector256.Create(0x7FFFFFFFu);
            var infinity = Vector256.Create(0x7F800000u);
            var half = Vector256.Create(0x7FFFu);
            var one = Vector256.Create(1u);
            var nan = Vector256.Create(0x7FFFu << 16);
            for (; i + 2 * Vector256<uint>.Count <= bits.Length; i += 2 * Vector256<uint>.Count)
            {
                var lo = Round(Vector256.Create(bits.Slice(i, Vector256<uint>.Count)));
                var hi = Round(Vector256.Create(bits.Slice(i + Vector256<uint>.Count, Vector256<uint>.Count)));
                Vector256.Narrow(lo, hi).CopyTo(destination.Slice(i));
            }

            Vector256<uint> Round(Vector256<uint> u)
            {
                var rounded = u + half + ((u >>> 16) & one);
                var isNaN = Vector256.GreaterThan(u & magnitude, infinity);
                return Vector256.ConditionalSelect(isNaN, nan, rounded) >>> 16;
            }
        }
        for (; i < bits.Length; i++) destination[i] = ((BFloat16)source[i]).Bits;
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
