using System.Numerics;

namespace KvKernels.Conversion;

/// <summary>
/// fp32 row-major matrix product for the conversion folds and projections, C <c>[m, n]</c> = A <c>[m, k]</c> ·
/// B <c>[k, n]</c>: rows of C in blocks of four, each updated by a scaled row of B per k (vectorised multiply-adds over
/// a 1 KiB column tile that stays in L1), blocks in parallel. The accumulation order over k is fixed (ascending), so
/// the result does not depend on the thread count. Several times faster than a general managed GEMM for these shapes,
/// which is what keeps an SVD conversion of a 7B model to seconds per layer.
/// </summary>
internal static class SimdGemm
{
    private const int BlockRows = 4, Tile = 256;

    /// <summary>C = A·B with A at element <paramref name="aOffset"/>, B at <paramref name="bOffset"/>, C written at
    /// <paramref name="cOffset"/> (overwritten).</summary>
    public static void Multiply(float[] a, int aOffset, int m, int k, float[] b, int bOffset, int n, float[] c, int cOffset)
    {
        if (aOffset + (long)m * k > a.LongLength || bOffset + (long)k * n > b.LongLength || cOffset + (long)m * n > c.LongLength)
            throw new ArgumentException($"A [{m}, {k}] at {aOffset}, B [{k}, {n}] at {bOffset}, C [{m}, {n}] at {cOffset} exceed the arrays.", nameof(a));
        int blocks = (m + BlockRows - 1) / BlockRows;
        if ((long)m * n * k < 1 << 20) // small: threads cost more than they save
            for (int block = 0; block < blocks; block++) Block(a, aOffset, k, b, bOffset, n, c, cOffset, m, block);
        else
            Parallel.For(0, blocks, block => Block(a, aOffset, k, b, bOffset, n, c, cOffset, m, block));
    }

    private static void Block(float[] a, int aOffset, int k, float[] b, int bOffset, int n, float[] c, int cOffset, int m, int block)
    {
        int i0 = block * BlockRows, rows = Math.Min(BlockRows, m - i0);
        for (int j0 = 0; j0 < n; j0 += Tile)
        {
            int width = Math.Min(Tile, n - j0);
            var c0 = c.AsSpan(cOffset + i0 * n + j0, width);
            var c1 = rows > 1 ? c.AsSpan(cOffset + (i0 + 1) * n + j0, width) : default;
            var c2 = rows > 2 ? c.AsSpan(cOffset + (i0 + 2) * n + j0, width) : default;
            var c3 = rows > 3 ? c.AsSpan(cOffset + (i0 + 3) * n + j0, width) : default;
            c0.Clear(); c1.Clear(); c2.Clear(); c3.Clear();
            for (int p = 0; p < k; p++)
            {
                var bRow = b.AsSpan(bOffset + p * n + j0, width);
                float a0 = a[aOffset + i0 * k + p];
                float a1 = rows > 1 ? a[aOffset + (i0 + 1) * k + p] : 0, a2 = rows > 2 ? a[aOffset + (i0 + 2) * k + p] : 0;
                float a3 = rows > 3 ? a[aOffset + (i0 + 3) * k + p] : 0;
                int j = 0;
                if (Vector.IsHardwareAccelerated && rows == BlockRows)
                {
                    Vector<float> v0 = new(a0), v1 = new(a1), v2 = new(a2), v3 = new(a3);
                    for (; j + Vector<float>.Count <= width; j += Vector<float>.Count)
                    {
                        var x = new Vector<float>(bRow[j..]);
                        Vector.FusedMultiplyAdd(v0, x, new Vector<float>(c0[j..])).CopyTo(c0[j..]);
                        Vector.FusedMultiplyAdd(v1, x, new Vector<float>(c1[j..])).CopyTo(c1[j..]);
                        Vector.FusedMultiplyAdd(v2, x, new Vector<float>(c2[j..])).CopyTo(c2[j..]);
                        Vector.FusedMultiplyAdd(v3, x, new Vector<float>(c3[j..])).CopyTo(c3[j..]);
                    }
                }
                for (; j < width; j++)
                {
                    float x = bRow[j];
                    c0[j] = MathF.FusedMultiplyAdd(a0, x, c0[j]);
                    if (rows > 1) c1[j] = MathF.FusedMultiplyAdd(a1, x, c1[j]);
                    if (rows > 2) c2[j] = MathF.FusedMultiplyAdd(a2, x, c2[j]);
                    if (rows > 3) c3[j] = MathF.FusedMultiplyAdd(a3, x, c3[j]);
                }
            }
        }
    }

    /// <summary>The transpose of row-major <paramref name="source"/> <c>[rows, columns]</c>, in blocks for the cache.</summary>
    public static float[] Transpose(ReadOnlySpan<float> source, int rows, int columns)
    {
        var result = new float[(long)rows * columns];
        const int B = 32;
        for (int i0 = 0; i0 < rows; i0 += B)
            for (int j0 = 0; j0 < columns; j0 += B)
                for (int i = i0; i < Math.Min(i0 + B, rows); i++)
                    for (int j = j0; j < Math.Min(j0 + B, columns); j++) result[(long)j * rows + i] = source[i * columns + j];
        return result;
    }
}
