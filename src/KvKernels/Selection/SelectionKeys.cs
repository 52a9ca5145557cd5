using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace KvKernels.Selection;

/// <summary>
/// The selection order as 32-bit keys and the exact radix select the CPU twin runs on them — the host side of
/// <c>cuda/selection/topk.cu</c> (its header comment is the specification; the two must agree key for key; the
/// select itself need not follow the kernel's steps, only find the same set).
/// </summary>
internal static unsafe class SelectionKeys
{
    /// <summary>Level-0 and level-1 histogram size (12-bit digits); level 2 uses 256 of the entries.</summary>
    public const int Bins = 4096;

    /// <summary>The key of a forced token in the global selection: above every real key (those lie in
    /// [0x007FFFFF, 0xFF800000]; NaN is 0).</summary>
    public const uint Sentinel = 0xFFFFFFFF;

    /// <summary>A cutoff that accepts every tie.</summary>
    public const uint All = 0xFFFFFFFF;

    /// <summary>The rule that keeps everything.</summary>
    public static Rule KeepAll => new(0, All);

    /// <summary>
    /// The key of a score: NaN → 0 (the worst, in both orders); −0 → +0; otherwise the order-preserving map of the bits
    /// (flip every bit of a negative, set the sign bit of a positive), complemented for <see cref="SelectionOrder.Smallest"/>.
    /// A higher key is a better element.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static uint OrderKey(float score, bool smallest)
    {
        uint bits = BitConverter.SingleToUInt32Bits(score);
        if ((bits & 0x7FFFFFFF) > 0x7F800000) return 0;
        if (bits == 0x80000000) bits = 0;
        uint key = (bits & 0x80000000) != 0 ? ~bits : bits | 0x80000000;
        return smallest ? ~key : key;
    }

    /// <summary>A selection as a threshold: keep key x at position p iff x &gt; Key, or x == Key and p &lt; Cutoff.</summary>
    public readonly record struct Rule(uint Key, uint Cutoff)
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public bool Keeps(uint key, uint position) => key > Key || (key == Key && position < Cutoff);
    }

    /// <summary>
    /// <c>keys[i] = OrderKey(scores[i], smallest)</c>, eight at a time with Vector256 where the hardware has it.
    /// </summary>
    public static void Keys(ReadOnlySpan<float> scores, Span<uint> keys, bool smallest)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated && scores.Length >= Vector256<uint>.Count)
        {
            var flip = smallest ? Vector256<uint>.AllBitsSet : Vector256<uint>.Zero;
            var sign = Vector256.Create(0x80000000u);
            var abs = Vector256.Create(0x7FFFFFFFu);
            var inf = Vector256.Create(0x7F800000u);
            ref float source = ref MemoryMarshal.GetReference(scores);
            ref uint target = ref MemoryMarshal.GetReference(keys);
            for (; i <= scores.Length - Vector256<uint>.Count; i += Vector256<uint>.Count)
            {
                var bits = Vector256.LoadUnsafe(ref source, (nuint)i).AsUInt32();
                var nan = Vector256.GreaterThan(bits & abs, inf);
                bits = Vector256.ConditionalSelect(Vector256.Equals(bits, sign), Vector256<uint>.Zero, bits);
                var negative = Vector256.ShiftRightArithmetic(bits.AsInt32(), 31).AsUInt32();   // all ones for a negative
                var key = (bits ^ (negative | sign)) ^ flip;
                Vector256.AndNot(key, nan).StoreUnsafe(ref target, (nuint)i);
            }
        }
        for (; i < scores.Length; i++) keys[i] = OrderKey(scores[i], smallest);
    }

    /// <summary>
    /// The rule that keeps exactly the best <paramref name="need"/> of <paramref name="keys"/> (higher key first, then
    /// lower index; positions in the rule are indices into <paramref name="keys"/>), for 0 ≤ need &lt; keys.Length:
    /// level 0 (key bits 31..20) over all keys; the indices of the chosen bin's keys are listed, in order, in the
    /// candidate scratch; level 1 (19..8), level 2 (7..0) and the tie cutoff run over the candidates only. Stops early
    /// (whole-prefix rule) when a whole bin is needed, as the kernel does; the set kept is the same either way.
    /// </summary>
    /// <param name="keys">The list's keys in position order.</param>
    /// <param name="need">How many to keep.</param>
    /// <param name="hist">Scratch of <see cref="Bins"/> ints.</param>
    /// <param name="candidates">Scratch of at least keys.Length entries.</param>
    public static Rule Select(ReadOnlySpan<uint> keys, long need, int* hist, Span<uint> candidates)
    {
        if (need <= 0) return new Rule(Sentinel, 0);

        new Span<int>(hist, Bins).Clear();
        foreach (uint key in keys) hist[key >> 20]++;
        var (bin0, above0, count0) = FindBin(hist, Bins, need);
        long rem = need - above0;
        if (rem == count0) return WholePrefix(bin0, 20);

        int count = 0;
        for (int i = 0; i < keys.Length; i++)
            if (keys[i] >> 20 == bin0) candidates[count++] = (uint)i;
        candidates = candidates[..count];

        new Span<int>(hist, Bins).Clear();
        foreach (uint i in candidates) hist[(keys[(int)i] >> 8) & 0xFFF]++;
        var (bin1, above1, count1) = FindBin(hist, Bins, rem);
        uint prefix = (bin0 << 12) | bin1;
        rem -= above1;
        if (rem == count1) return WholePrefix(prefix, 8);

        new Span<int>(hist, 256).Clear();
        foreach (uint i in candidates)
            if (keys[(int)i] >> 8 == prefix) hist[keys[(int)i] & 0xFF]++;
        var (bin2, above2, count2) = FindBin(hist, 256, rem);
        uint threshold = (prefix << 8) | bin2;
        rem -= above2;
        if (rem == count2) return new Rule(threshold, All);

        long seen = 0;
        foreach (uint i in candidates)
            if (keys[(int)i] == threshold && ++seen == rem) return new Rule(threshold, i + 1);
        throw new InvalidOperationException("Radix select: the tie cutoff was not found.");
    }

    /// <summary>Keep every key whose top (32 − shift) bits are at least <paramref name="prefix"/>.</summary>
    private static Rule WholePrefix(uint prefix, int shift) => prefix == 0 ? KeepAll : new Rule((prefix << shift) - 1, 0);

    /// <summary>The bin of the need-th best element (scanning from the top bin), the count above it and its own count.</summary>
    private static (uint Bin, long Above, long Count) FindBin(int* hist, int bins, long need)
    {
        long above = 0;
        for (int b = bins - 1; b >= 0; b--)
        {
            if (above + hist[b] >= need) return ((uint)b, above, hist[b]);
            above += hist[b];
        }
        throw new InvalidOperationException($"Radix select: asked for the {need}-th element of a list of {above}.");
    }
}
