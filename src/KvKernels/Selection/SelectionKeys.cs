using System.Runtime.CompilerServices;

namespace KvKernels.Selection;

/// <summary>
/// The selection order as 32-bit keys and the exact radix select the CPU twin runs on them — the host side of
/// <c>cuda/selection/topk.cu</c> (its header comment is the specification; the two must agree key for key).
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

    /// <summary>Receives a list's (key, position) pairs in position order.</summary>
    public interface IVisitor
    {
        void Visit(uint key, uint position);
    }

    /// <summary>A list of keyed elements that can be walked in position order, any number of times.</summary>
    public interface IKeyList
    {
        long Count { get; }

        void Visit<TVisitor>(ref TVisitor visitor) where TVisitor : struct, IVisitor;
    }

    /// <summary>
    /// The rule that keeps exactly the best <paramref name="need"/> elements of <paramref name="list"/> (higher key first,
    /// then lower position), for 0 ≤ need &lt; Count: level 0 (key bits 31..20), level 1 (19..8), level 2 (7..0), each a
    /// histogram pass restricted to the prefix found so far, then a pass for the tie cutoff when only some of the
    /// elements equal to the threshold key are needed. Stops early (whole-prefix rule) when a whole bin is needed, as
    /// the kernel does; the set kept is the same either way.
    /// </summary>
    /// <param name="list">The elements.</param>
    /// <param name="need">How many to keep.</param>
    /// <param name="hist">Scratch of <see cref="Bins"/> ints.</param>
    public static Rule Select<TList>(ref TList list, long need, int* hist) where TList : struct, IKeyList
    {
        if (need <= 0) return new Rule(Sentinel, 0);

        new Span<int>(hist, Bins).Clear();
        var level0 = new Level(hist, 0, 32, 20, 0xFFF);
        list.Visit(ref level0);
        var (bin0, above0, count0) = FindBin(hist, Bins, need);
        long rem = need - above0;
        if (rem == count0) return WholePrefix(bin0, 20);

        new Span<int>(hist, Bins).Clear();
        var level1 = new Level(hist, bin0, 20, 8, 0xFFF);
        list.Visit(ref level1);
        var (bin1, above1, count1) = FindBin(hist, Bins, rem);
        uint prefix = (bin0 << 12) | bin1;
        rem -= above1;
        if (rem == count1) return WholePrefix(prefix, 8);

        new Span<int>(hist, 256).Clear();
        var level2 = new Level(hist, prefix, 8, 0, 0xFF);
        list.Visit(ref level2);
        var (bin2, above2, count2) = FindBin(hist, 256, rem);
        uint key = (prefix << 8) | bin2;
        rem -= above2;
        if (rem == count2) return new Rule(key, All);

        var cutoff = new TieCutoff(key, rem);
        list.Visit(ref cutoff);
        return new Rule(key, cutoff.Cutoff);
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

    /// <summary>Histogram of (key &gt;&gt; shift) &amp; mask over the keys with key &gt;&gt; prefixShift == prefix
    /// (prefixShift 32: every key).</summary>
    private struct Level(int* hist, uint prefix, int prefixShift, int shift, uint mask) : IVisitor
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Visit(uint key, uint position)
        {
            if (prefixShift == 32 || key >> prefixShift == prefix) hist[(key >> shift) & mask]++;
        }
    }

    /// <summary>Position + 1 of the rem-th element equal to the key, in position order.</summary>
    private struct TieCutoff(uint key, long rem) : IVisitor
    {
        private long _seen;
        public uint Cutoff;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Visit(uint k, uint position)
        {
            if (k == key && ++_seen == rem) Cutoff = position + 1;
        }
    }
}
