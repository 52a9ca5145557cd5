namespace KvKernels.Tests.Selection;

/// <summary>How a test draws its scores.</summary>
public enum ScoreKind
{
    /// <summary>Normal(0, 1): distinct values, both signs.</summary>
    Normal,

    /// <summary>Six values (−2, −0.0, +0.0, 0.5, 1, 3): ties everywhere, and −0 / +0 must tie.</summary>
    FewValues,

    /// <summary>Normal values mixed with NaNs (several payloads, both signs), ±∞, ±0 and subnormals.</summary>
    Special,

    /// <summary>Softmax-like attention mass: most tokens near zero, a few heavy hitters.</summary>
    Attention,

    /// <summary>Two values only (0 and 1): huge ties, so the candidate buffer overflows and the slow path runs.</summary>
    TwoValues,

    /// <summary>Normal(0, 1) plus 100 on the first 32 tokens of every 1024 — where the kernel's sample looks — so the
    /// sampled guess overestimates the threshold and the kernel must fall back to an exact second pass.</summary>
    SampleDecoy,
}

/// <summary>Deterministic score and length generators for the selection tests.</summary>
public static class SelectionData
{
    private static readonly float[] Few = [-2f, -0.0f, 0.0f, 0.5f, 1f, 3f];

    private static readonly float[] Specials =
    [
        float.NaN, -float.NaN, BitConverter.UInt32BitsToSingle(0x7FC00001), BitConverter.UInt32BitsToSingle(0xFF800001),
        float.PositiveInfinity, float.NegativeInfinity, 0.0f, -0.0f, float.Epsilon, -float.Epsilon, float.MaxValue, float.MinValue,
    ];

    public static float[] Scores(Random rng, long count, ScoreKind kind)
    {
        var scores = new float[count];
        for (long i = 0; i < count; i++)
        {
            scores[i] = kind switch
            {
                ScoreKind.Normal => Gaussian(rng),
                ScoreKind.FewValues => Few[rng.Next(Few.Length)],
                ScoreKind.Special => rng.Next(4) == 0 ? Specials[rng.Next(Specials.Length)] : Gaussian(rng),
                ScoreKind.Attention => rng.Next(64) == 0 ? (float)rng.NextDouble() : (float)(rng.NextDouble() * 1e-3 * Math.Exp(-8 * rng.NextDouble())),
                ScoreKind.TwoValues => rng.Next(2),
                ScoreKind.SampleDecoy => Gaussian(rng) + (i % 1024 < 32 ? 100 : 0),
                _ => throw new ArgumentOutOfRangeException(nameof(kind)),
            };
        }
        return scores;
    }

    private static float Gaussian(Random rng) =>
        (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()));

    /// <summary>A seed from a case name, stable across processes (string.GetHashCode is not).</summary>
    public static int Seed(string name) => name.Aggregate(17, (h, ch) => unchecked(h * 31 + ch));

    public static int[] Poisoned(long count)
    {
        var a = new int[count];
        Array.Fill(a, -12345);
        return a;
    }
}
