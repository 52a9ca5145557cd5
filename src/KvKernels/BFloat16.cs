using System.Globalization;
using System.Runtime.InteropServices;

namespace KvKernels;

/// <summary>
/// A bfloat16 value (the upper 16 bits of an IEEE binary32): the storage type of bf16 activations and KV caches.
/// .NET has no built-in bfloat16, so the library defines this 2-byte blittable struct; its bits are what the kernels
/// read and write. Conversion from <see cref="float"/> rounds to nearest even and maps NaN to the canonical 0x7FFF,
/// as the GPU's <c>cvt.rn.bf16.f32</c> does; conversion to <see cref="float"/> is exact.
/// </summary>
[StructLayout(LayoutKind.Sequential, Size = 2)]
public readonly struct BFloat16 : IEquatable<BFloat16>
{
    private BFloat16(ushort bits) => Bits = bits;

    /// <summary>The raw bits.</summary>
    public ushort Bits { get; }

    /// <summary>Wraps raw bits.</summary>
    public static BFloat16 FromBits(ushort bits) => new(bits);

    /// <summary>Rounds <paramref name="value"/> to the nearest bfloat16 (ties to even; overflow to ±∞; NaN to 0x7FFF).</summary>
    public static explicit operator BFloat16(float value)
    {
        uint u = BitConverter.SingleToUInt32Bits(value);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) return new BFloat16(0x7FFF);
        return new BFloat16((ushort)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16));
    }

    /// <summary>The exact float value.</summary>
    public static explicit operator float(BFloat16 value) => BitConverter.UInt32BitsToSingle((uint)value.Bits << 16);

    /// <inheritdoc/>
    public bool Equals(BFloat16 other) => Bits == other.Bits;

    /// <inheritdoc/>
    public override bool Equals(object? obj) => obj is BFloat16 other && Equals(other);

    /// <inheritdoc/>
    public override int GetHashCode() => Bits;

    /// <summary>Bitwise equality (so NaN equals the same NaN, and +0 differs from −0).</summary>
    public static bool operator ==(BFloat16 left, BFloat16 right) => left.Bits == right.Bits;

    /// <summary>Bitwise inequality.</summary>
    public static bool operator !=(BFloat16 left, BFloat16 right) => left.Bits != right.Bits;

    /// <inheritdoc/>
    public override string ToString() => ((float)this).ToString(CultureInfo.InvariantCulture);
}
