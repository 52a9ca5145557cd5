using System.Runtime.Intrinsics;

namespace KvKernels.Selection;

public static unsafe partial class TokenScoresCpu
{
    /// <summary>
    /// 1-D pooling along tokens (see <see cref="PoolingSpec"/>): average (zero padding counted, ÷ k) or max (−∞ padding),
    /// stride 1, odd kernel; positions at or past a row's length are padding and are written 0. Bit-identical to the GPU.
    /// </summary>
    /// <param name="spec">Rows, length, kernel size, kind.</param>
    /// <param name="input">fp32 <c>[Rows, Length]</c>.</param>
    /// <param name="lengths">Row lengths <c>[Rows / RowsPerLength]</c>, each in [0, Length]; empty when every row is full.</param>
    /// <param name="output">fp32 <c>[Rows, Length]</c>, written; must not overlap <paramref name="input"/>.</param>
    /// <exception cref="ArgumentException">A bad spec, buffer length or length entry, or overlapping buffers; nothing is written.</exception>
    public static void Pool(in PoolingSpec spec, ReadOnlySpan<float> input, ReadOnlySpan<int> lengths, Span<float> output)
    {
        spec.Validate(input.Length, output.Length, lengths.Length);
        spec.ValidateLengths(lengths);
        if (input.Overlaps(output)) throw new ArgumentException("output overlaps input; pooling reads neighbours, so it cannot run in place.", nameof(output));
        fixed (float* x = input, y = output)
        fixed (int* len = lengths)
        {
            var job = new PoolJob(spec, x, y, lengths.IsEmpty ? null : len);
            Run(ref job, spec.Rows, spec.Elements * 4 * spec.KernelSize);
        }
    }

    private readonly struct PoolJob(in PoolingSpec spec, float* input, float* output, int* lengths) : IRangeJob
    {
        private readonly PoolingSpec _spec = spec;

        public void Execute(int r)
        {
            int length = _spec.Length, half = _spec.KernelSize / 2;
            int len = lengths == null ? length : lengths[r / _spec.EffectiveRowsPerLength];
            float* x = input + (long)r * length;
            float* y = output + (long)r * length;
            bool max = _spec.Kind == PoolingKind.Max;
            float divisor = _spec.KernelSize;
            // Interior outputs (the whole window inside the row) 8 at a time: lane e of the vector adds the same inputs
            // in the same ascending order as the scalar edge loop below would.
            int j = 0;
            int interiorEnd = len - half - 8;   // last vector start whose window ends inside the row
            for (j = 0; j < Math.Min(half, len); j++) y[j] = Scalar(x, j, len, half, max, divisor);
            for (; j <= interiorEnd; j += 8)
            {
                float* w = x + j - half;
                if (max)
                {
                    var m = Vector256.Create(float.NegativeInfinity);
                    for (int t = 0; t < 2 * half + 1; t++)
                    {
                        var value = Vector256.Load(w + t);
                        m = Vector256.ConditionalSelect(Vector256.GreaterThan(value, m), value, m);
                    }
                    m.Store(y + j);
                }
                else
                {
                    var s = Vector256<float>.Zero;
                    for (int t = 0; t < 2 * half + 1; t++) s += Vector256.Load(w + t);
                    (s / Vector256.Create(divisor)).Store(y + j);
                }
            }
            for (; j < len; j++) y[j] = Scalar(x, j, len, half, max, divisor);
            for (; j < length; j++) y[j] = 0;
        }

        private static float Scalar(float* x, int j, int len, int half, bool max, float divisor)
        {
            int lo = Math.Max(j - half, 0), hi = Math.Min(j + half, len - 1);
            if (max)
            {
                float m = float.NegativeInfinity;
                for (int t = lo; t <= hi; t++) m = x[t] > m ? x[t] : m;
                return m;
            }
            float s = 0;
            for (int t = lo; t <= hi; t++) s += x[t];
            return s / divisor;
        }
    }
}
