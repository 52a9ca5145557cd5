using System.Buffers;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Attention;

/// <summary>
/// The CPU twin of decode attention and of merging attention states: the same functions as the GPU kernels, validated
/// by the same specs, on host spans. fp32 accumulation and an online softmax with max subtraction; each (row, KV head)
/// pair makes one pass over its keys and values, shared by all the query heads and query tokens that read it;
/// Vector256/Vector512 arithmetic; large calls run in parallel over those pairs. Scratch comes from
/// <see cref="ArrayPool{T}"/>, once per worker.
/// </summary>
public static unsafe class DecodeAttentionCpu
{
    /// <summary>Below this many multiply-adds a call stays on the calling thread.</summary>
    private const long ParallelThresholdFlops = 1L << 21;

    /// <summary>Largest <see cref="RopeOptions.RotaryDim"/> / 2.</summary>
    private const int MaxRotaryPairs = DecodeAttentionSpec.MaxHeadDim / 2;

    /// <summary>
    /// Decode attention on the host; see <see cref="DecodeAttentionSpec"/> for the math and the tensors. Storage slots
    /// past each row's length (and pages past its last one) are never read.
    /// </summary>
    /// <typeparam name="TIn">Query, key and value element: <see cref="Half"/> or <see cref="BFloat16"/>, as <see cref="DecodeAttentionSpec.InputType"/>.</typeparam>
    /// <typeparam name="TOut">Output element: <see cref="Half"/>, <see cref="BFloat16"/> or <see cref="float"/>, as <see cref="DecodeAttentionSpec.OutputType"/>.</typeparam>
    /// <param name="spec">Shapes, storage and options.</param>
    /// <param name="query"><c>[B, QueryLength, Hq, HeadDim]</c>, already rotated when the model uses RoPE.</param>
    /// <param name="keys">Key storage (contiguous buffer or paged pool).</param>
    /// <param name="values">Value storage; empty with <see cref="DecodeAttentionSpec.KeyReuse"/>.</param>
    /// <param name="lengths"><c>[rows]</c> tokens per row.</param>
    /// <param name="blockTable"><c>[rows, MaxPagesPerSequence]</c> for paged storage; empty for contiguous.</param>
    /// <param name="output"><c>[B, QueryLength, Hq, OutputDim]</c>, written.</param>
    /// <param name="lse"><c>[B, QueryLength, Hq]</c> natural-log LSE, written; empty when not wanted.</param>
    /// <param name="positions"><c>[rows, MaxTokens]</c> key positions with <see cref="RopeOptions.ExplicitPositions"/>; else empty.</param>
    /// <param name="alibiSlopes"><c>[Hq]</c> with <see cref="DecodeAttentionSpec.Alibi"/>; else empty.</param>
    /// <exception cref="ArgumentException">The spec, an element type, a buffer length, a length or a page index is
    /// invalid (named by the exception); nothing is written.</exception>
    public static void Run<TIn, TOut>(in DecodeAttentionSpec spec, ReadOnlySpan<TIn> query, ReadOnlySpan<TIn> keys, ReadOnlySpan<TIn> values,
        ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable, Span<TOut> output, Span<float> lse = default,
        ReadOnlySpan<int> positions = default, ReadOnlySpan<float> alibiSlopes = default) where TIn : unmanaged where TOut : unmanaged
    {
        spec.ValidateBuffers<TIn, TOut>(query.Length, keys.Length, values.Length, lengths.Length, blockTable.Length, output.Length,
            lse.Length, positions.Length, alibiSlopes.Length);
        spec.ValidateIndices(lengths, blockTable);
        if (spec.BatchSize == 0) return;

        int pairs = spec.BatchSize * spec.NumKvHeads;
        int queryRows = spec.QueryLength * spec.GroupSize;
        long flops = 0;
        for (int r = 0; r < lengths.Length; r++) flops += lengths[r];
        flops *= (long)(spec.HeadDim + spec.OutputDim) * queryRows * (spec.Ragged ? 1 : spec.NumKvHeads);
        int workers = Environment.ProcessorCount;
        bool parallel = workers > 1 && flops >= ParallelThresholdFlops;
        // Fewer pairs than cores (MQA, small batches): split each pair's query rows over the cores. Each block re-reads
        // the pair's keys, which pays off only when the query rows, not the memory, dominate.
        int unitsPerPair = parallel && pairs < workers && queryRows >= 16 ? Math.Min((workers + pairs - 1) / pairs, queryRows / 8) : 1;

        int rotaryPairs = spec.RotaryDim / 2;
        float* invFreq = stackalloc float[MaxRotaryPairs];
        for (int i = 0; i < rotaryPairs; i++) invFreq[i] = (float)Math.Pow(spec.Rope.Theta, -2.0 * i / spec.RotaryDim);

        fixed (TIn* q = query, k = keys, v = values)
        fixed (int* len = lengths, table = blockTable, pos = positions)
        fixed (float* slopes = alibiSlopes, l = lse)
        fixed (TOut* o = output)
        {
            var job = new DecodeAttentionCpuJob<TIn, TOut>(spec, q, k, v, len, table, pos, slopes, invFreq, o, l, unitsPerPair);
            Execute(job, parallel);
        }
    }

    private static void Execute<TIn, TOut>(DecodeAttentionCpuJob<TIn, TOut> job, bool parallel) where TIn : unmanaged where TOut : unmanaged
    {
        int units = job.Units, scratchFloats = job.ScratchFloats;
        if (!parallel || units < 2)
        {
            var buffer = ArrayPool<float>.Shared.Rent(scratchFloats);
            try
            {
                fixed (float* scratch = buffer)
                    for (int unit = 0; unit < units; unit++) job.Execute(unit, scratch);
            }
            finally
            {
                ArrayPool<float>.Shared.Return(buffer);
            }
            return;
        }
        // Units differ in cost (lengths vary), so the loop balances them dynamically; scratch is rented once per
        // worker task, not per unit.
        Parallel.For(0, units,
            () => ArrayPool<float>.Shared.Rent(scratchFloats),
            (unit, _, buffer) =>
            {
                fixed (float* scratch = buffer) job.Execute(unit, scratch);
                return buffer;
            },
            buffer => ArrayPool<float>.Shared.Return(buffer));
    }

    /// <summary>
    /// Merges two attention states over disjoint key sets; see <see cref="MergeStatesSpec"/>. Computed in fp32; an
    /// empty state (LSE −∞) is not read at all, so its output rows may hold anything. The outputs must not overlap the
    /// inputs (neither <paramref name="output"/> nor <paramref name="lse"/> may alias <paramref name="outputA"/>,
    /// <paramref name="outputB"/>, <paramref name="lseA"/> or <paramref name="lseB"/>).
    /// </summary>
    /// <typeparam name="T"><see cref="Half"/>, <see cref="BFloat16"/> or <see cref="float"/>.</typeparam>
    /// <param name="spec">Rows and head dim.</param>
    /// <param name="outputA"><c>[Rows, HeadDim]</c> normalized output of state a.</param>
    /// <param name="lseA"><c>[Rows]</c> natural-log LSE of state a.</param>
    /// <param name="outputB"><c>[Rows, HeadDim]</c> normalized output of state b.</param>
    /// <param name="lseB"><c>[Rows]</c> natural-log LSE of state b.</param>
    /// <param name="output"><c>[Rows, HeadDim]</c>, written.</param>
    /// <param name="lse"><c>[Rows]</c>, written.</param>
    /// <exception cref="ArgumentException">The spec, the element type or a buffer length is invalid, or an output
    /// overlaps an input; nothing is written.</exception>
    public static void MergeStates<T>(in MergeStatesSpec spec, ReadOnlySpan<T> outputA, ReadOnlySpan<float> lseA, ReadOnlySpan<T> outputB,
        ReadOnlySpan<float> lseB, Span<T> output, Span<float> lse) where T : unmanaged
    {
        spec.Validate<T>(outputA.Length, lseA.Length, outputB.Length, lseB.Length, output.Length, lse.Length);
        if (output.Overlaps(outputA) || output.Overlaps(outputB))
            throw new ArgumentException("output overlaps outputA or outputB; the merge needs separate buffers.", nameof(output));
        if (lse.Overlaps(lseA) || lse.Overlaps(lseB))
            throw new ArgumentException("lse overlaps lseA or lseB; the merge needs separate buffers.", nameof(lse));

        fixed (T* a = outputA, b = outputB, o = output)
        fixed (float* la = lseA, lb = lseB, l = lse)
        {
            var job = new MergeJob<T>(spec.HeadDim, a, la, b, lb, o, l);
            int rows = spec.Rows;
            if (Environment.ProcessorCount == 1 || spec.Elements < 1L << 20)
            {
                job.Execute(0, rows);
                return;
            }
            int chunks = Math.Min(rows, Environment.ProcessorCount * 4);
            Parallel.For(0, chunks, chunk => job.Execute((int)((long)rows * chunk / chunks), (int)((long)rows * (chunk + 1) / chunks)));
        }
    }

    /// <summary>Merge of a range of rows; pointer-based so it can run on worker threads.</summary>
    private readonly struct MergeJob<T>(int dim, T* a, float* lseA, T* b, float* lseB, T* output, float* lse) where T : unmanaged
    {
        public void Execute(int start, int end)
        {
            // Head dims are 1..1024 and need not be multiples of 8: widen and combine element by element, in fp32.
            for (int r = start; r < end; r++)
            {
                float la = lseA[r], lb = lseB[r];
                float max = MathF.Max(la, lb);
                T* target = output + (long)r * dim;
                if (float.IsNegativeInfinity(max))
                {
                    new Span<T>(target, dim).Clear();
                    lse[r] = float.NegativeInfinity;
                    continue;
                }
                float wa = MathF.Exp(la - max), wb = MathF.Exp(lb - max);
                float total = wa + wb;
                lse[r] = max + MathF.Log(total);
                T* rowA = a + (long)r * dim, rowB = b + (long)r * dim;
                // An empty side weighs exactly 0 and is skipped, so whatever its output holds cannot leak in.
                if (wb == 0)
                {
                    for (int d = 0; d < dim; d++) target[d] = FromSingle<T>(ToSingle(rowA[d]));
                    continue;
                }
                if (wa == 0)
                {
                    for (int d = 0; d < dim; d++) target[d] = FromSingle<T>(ToSingle(rowB[d]));
                    continue;
                }
                float fa = wa / total, fb = wb / total;
                for (int d = 0; d < dim; d++) target[d] = FromSingle<T>(fa * ToSingle(rowA[d]) + fb * ToSingle(rowB[d]));
            }
        }
    }
}
