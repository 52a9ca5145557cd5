using MathNet.Numerics.LinearAlgebra;

namespace KvKernels.Conversion;

/// <summary>
/// Row-major matrix products on arrays through MathNet.Numerics (whose matrices are column-major: a row-major
/// <c>[m, n]</c> array is the column-major storage of its <c>[n, m]</c> transpose, so each product below is the
/// transposed product in MathNet's terms, with no copy of the operands' layout).
/// </summary>
internal static class RowMajor
{
    /// <summary>C <c>[m, n]</c> = A <c>[m, k]</c> · B <c>[k, n]</c>.</summary>
    public static double[] Multiply(double[] a, int m, int k, double[] b, int n)
    {
        // Cᵀ = Bᵀ·Aᵀ; Bᵀ is B's storage as an [n, k] column-major matrix, Aᵀ is A's as [k, m].
        var c = Matrix<double>.Build.Dense(n, k, b) * Matrix<double>.Build.Dense(k, m, a);
        return c.AsColumnMajorArray() ?? c.ToColumnMajorArray();
    }

    /// <summary>C <c>[m, n]</c> = Aᵀ · B with A <c>[k, m]</c>, B <c>[k, n]</c>.</summary>
    public static double[] TransposeAMultiply(double[] a, int k, int m, double[] b, int n)
    {
        // Cᵀ = Bᵀ·A; A's storage as an [m, k] column-major matrix is Aᵀ.
        var c = Matrix<double>.Build.Dense(n, k, b).TransposeAndMultiply(Matrix<double>.Build.Dense(m, k, a));
        return c.AsColumnMajorArray() ?? c.ToColumnMajorArray();
    }

    /// <summary>C <c>[m, n]</c> = A <c>[m, k]</c> · Bᵀ with B <c>[n, k]</c> (activations times an nn.Linear weight).</summary>
    public static float[] MultiplyTransposeB(float[] a, int m, int k, float[] b, int n)
    {
        // Cᵀ = B·Aᵀ; B's storage as a [k, n] column-major matrix is Bᵀ, A's as [k, m] is Aᵀ.
        var c = Matrix<float>.Build.Dense(k, n, b).TransposeThisAndMultiply(Matrix<float>.Build.Dense(k, m, a));
        return c.AsColumnMajorArray() ?? c.ToColumnMajorArray();
    }

    /// <summary>C <c>[m, m]</c> += Aᵀ·A for A <c>[rows, m]</c> (a Gram matrix, symmetric).</summary>
    public static void AddGram(double[] a, int rows, int m, double[] c)
    {
        // A's storage as an [m, rows] column-major matrix is Aᵀ; Aᵀ·A = M·Mᵀ.
        var mat = Matrix<double>.Build.Dense(m, rows, a);
        var gram = mat.TransposeAndMultiply(mat);
        var g = gram.AsColumnMajorArray() ?? gram.ToColumnMajorArray();
        for (int i = 0; i < c.Length; i++) c[i] += g[i];
    }
}
