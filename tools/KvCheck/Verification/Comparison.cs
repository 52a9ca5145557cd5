using System.Runtime.InteropServices;

namespace KvCheck.Verification;

/// <summary>Element-for-element comparison of an output with its reference.</summary>
internal static class Comparison
{
    private const double Tiny = 1e-30;

    /// <summary>
    /// Compares <paramref name="actual"/> with <paramref name="expected"/>: counts elements whose bytes differ, and the max
    /// relative error (fp16/bf16 read as numbers; other types 0 when identical, else 1). <paramref name="name"/> labels the
    /// first mismatch in the detail.
    /// </summary>
    public static VerificationOutcome Compare<T>(string name, ReadOnlySpan<T> actual, ReadOnlySpan<T> expected, ElementKind kind) where T : unmanaged
    {
        if (actual.Length != expected.Length)
            return new VerificationOutcome(expected.Length, Math.Max(actual.Length, expected.Length), 1,
                $"{name}: {actual.Length} elements, expected {expected.Length}");
        int size = Elements.Size<T>();
        var a = MemoryMarshal.AsBytes(actual);
        var e = MemoryMarshal.AsBytes(expected);
        if (a.SequenceEqual(e)) return new VerificationOutcome(expected.Length, 0, 0, null);

        long mismatches = 0;
        double maxRel = 0;
        string? detail = null;
        bool numeric = size == 2 && kind is ElementKind.Fp16 or ElementKind.Bf16;
        for (int i = 0; i < expected.Length; i++)
        {
            var ai = a.Slice(i * size, size);
            var ei = e.Slice(i * size, size);
            if (ai.SequenceEqual(ei)) continue;
            mismatches++;
            double rel;
            string shown;
            if (numeric)
            {
                ushort ab = MemoryMarshal.Read<ushort>(ai), eb = MemoryMarshal.Read<ushort>(ei);
                double av = Elements.ToDouble(kind, ab), ev = Elements.ToDouble(kind, eb);
                rel = double.IsNaN(av) || double.IsNaN(ev) || double.IsInfinity(av) || double.IsInfinity(ev)
                    ? double.PositiveInfinity
                    : Math.Abs(av - ev) / Math.Max(Math.Abs(ev), Tiny);
                shown = $"{av.ToString("G5", Cli.Ui.Invariant)} (0x{ab:X4}) vs expected {ev.ToString("G5", Cli.Ui.Invariant)} (0x{eb:X4})";
            }
            else
            {
                rel = 1;
                shown = $"0x{Convert.ToHexString(ai)} vs expected 0x{Convert.ToHexString(ei)}";
            }
            maxRel = Math.Max(maxRel, rel);
            detail ??= $"{name}[{i}] = {shown}";
        }
        return new VerificationOutcome(expected.Length, mismatches, maxRel, detail);
    }
}
