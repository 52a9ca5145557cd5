using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Selection;

/// <summary>
/// CPU implementations of the token-scoring primitives: the same functions as the GPU kernels of
/// <c>cuda/selection/scores.cu</c> (<see cref="TokenScoreKernels"/>), validated by the same specs, on host spans.
/// Norms and pooling give the GPU's bits exactly (one fixed summation order); window scores agree within a few ulp
/// (exp). Large calls run in parallel over (row, head) items.
/// </summary>
public static unsafe partial class TokenScoresCpu
{
    /// <summary>Below this many input bytes a call stays on the calling thread.</summary>
    private const long ParallelThresholdBytes = 4L << 20;

    /// <summary>Largest head dim of a norm row (<see cref="Paging.PagedKvLayout.MaxHeadDim"/>).</summary>
    private const int MaxRow = Paging.PagedKvLayout.MaxHeadDim;

    /// <summary>
    /// Norms of appended tokens into slot-indexed side buffers (see <see cref="AppendNormSpec"/>): for each token t with
    /// <c>slots[t] ≥ 0</c> and head h, <c>norms[slots[t] · Hkv + h]</c> = the norm of row (t, h). Other entries are untouched.
    /// </summary>
    /// <param name="spec">The append's shape and the norms wanted.</param>
    /// <param name="keys">Source keys <c>[NumTokens, KeyStride]</c>, or empty (no key norms).</param>
    /// <param name="values">Source values, or empty (no value norms).</param>
    /// <param name="slots">Destination slot per token, −1 to skip; distinct.</param>
    /// <param name="keyNorms">fp32 <c>[NumPages · PageSize, Hkv]</c>, written at the slots; empty with the keys.</param>
    /// <param name="valueNorms">The same for the values.</param>
    /// <exception cref="ArgumentException">A bad spec, element type, buffer length or slot; nothing is written.</exception>
    public static void AppendNorms<T>(in AppendNormSpec spec, ReadOnlySpan<T> keys, ReadOnlySpan<T> values, ReadOnlySpan<int> slots,
        Span<float> keyNorms, Span<float> valueNorms) where T : unmanaged
    {
        spec.Validate<T>(keys.Length, values.Length, slots.Length, keyNorms.Length, valueNorms.Length);
        spec.Append.ValidateSlots(slots);
        var pool = spec.Append.Pool;
        int heads = pool.NumKvHeads, dim = pool.HeadDim;
        bool withKeys = !keyNorms.IsEmpty, withValues = !valueNorms.IsEmpty;
        long keyStride = spec.Append.KeyStride, valueStride = spec.Append.ValueStride;
        float* scratch = stackalloc float[MaxRow];
        fixed (T* k = keys, v = values)
        {
            for (int t = 0; t < spec.Append.NumTokens; t++)
            {
                int slot = slots[t];
                if (slot < 0) continue;
                for (int h = 0; h < heads; h++)
                {
                    long output = (long)slot * heads + h;
                    if (withKeys) keyNorms[(int)output] = RowNorm(k + t * keyStride + (long)h * dim, dim, spec.KeyNorm, scratch);
                    if (withValues) valueNorms[(int)output] = RowNorm(v + t * valueStride + (long)h * dim, dim, spec.ValueNorm, scratch);
                }
            }
        }
    }

    /// <summary>
    /// Norms of every cached token into <c>[Rows, Hkv, MaxTokens]</c> (see <see cref="CacheNormSpec"/>); positions at or past
    /// a row's length are written 0.
    /// </summary>
    /// <param name="spec">Storage shape and the norms wanted.</param>
    /// <param name="keys">Key storage, or empty (no key norms).</param>
    /// <param name="values">Value storage (same shape), or empty (no value norms).</param>
    /// <param name="lengths">Tokens per row <c>[Rows]</c>.</param>
    /// <param name="blockTable">Block table <c>[Rows, MaxPagesPerSequence]</c> for paged storage; empty for contiguous.</param>
    /// <param name="keyNorms">fp32 <c>[Rows, Hkv, MaxTokens]</c>, written; empty with the keys.</param>
    /// <param name="valueNorms">The same for the values.</param>
    /// <exception cref="ArgumentException">A bad spec, element type, buffer length, length or page; nothing is written.</exception>
    public static void CacheNorms<T>(in CacheNormSpec spec, ReadOnlySpan<T> keys, ReadOnlySpan<T> values, ReadOnlySpan<int> lengths,
        ReadOnlySpan<int> blockTable, Span<float> keyNorms, Span<float> valueNorms) where T : unmanaged
    {
        spec.ValidateBuffers<T>(keys.Length, values.Length, lengths.Length, blockTable.Length, keyNorms.Length, valueNorms.Length);
        spec.ValidateIndices(lengths, blockTable);
        fixed (T* k = keys, v = values)
        fixed (int* len = lengths, table = blockTable)
        fixed (float* kn = keyNorms, vn = valueNorms)
        {
            var job = new CacheNormJob<T>(spec, k, v, len, table, kn, vn);
            long bytes = spec.OutputElements * spec.HeadDim * sizeof(T) * ((keyNorms.IsEmpty ? 0 : 1) + (valueNorms.IsEmpty ? 0 : 1));
            Run(ref job, spec.Rows * CacheNormJob<T>.Blocks(spec), bytes);
        }
    }

    /// <summary>
    /// The norm of one row of <paramref name="dim"/> (a multiple of 8) elements, in the GPU kernel's order: vector v of 8
    /// elements goes to lane <c>v mod 8</c>, whose 8 accumulators (one per element position) take it by fused multiply-add
    /// (L2) or by adding |x| (L1); each lane folds as ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)); the 8 lanes fold the same way.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float RowNorm<T>(T* row, int dim, VectorNorm kind, float* scratch) where T : unmanaged
    {
        Widen(row, scratch, dim);
        var a0 = Vector256<float>.Zero;
        var a1 = a0;
        var a2 = a0;
        var a3 = a0;
        var a4 = a0;
        var a5 = a0;
        var a6 = a0;
        var a7 = a0;
        int vectors = dim / 8;
        if (kind == VectorNorm.L2)
        {
            for (int v = 0; v < vectors; v += 8)
            {
                float* x = scratch + 8 * v;
                int left = vectors - v;
                a0 = Vector256.FusedMultiplyAdd(Vector256.Load(x), Vector256.Load(x), a0);
                if (left > 1) a1 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 8), Vector256.Load(x + 8), a1);
                if (left > 2) a2 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 16), Vector256.Load(x + 16), a2);
                if (left > 3) a3 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 24), Vector256.Load(x + 24), a3);
                if (left > 4) a4 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 32), Vector256.Load(x + 32), a4);
                if (left > 5) a5 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 40), Vector256.Load(x + 40), a5);
                if (left > 6) a6 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 48), Vector256.Load(x + 48), a6);
                if (left > 7) a7 = Vector256.FusedMultiplyAdd(Vector256.Load(x + 56), Vector256.Load(x + 56), a7);
            }
        }
        else
        {
            for (int v = 0; v < vectors; v += 8)
            {
                float* x = scratch + 8 * v;
                int left = vectors - v;
                a0 += Vector256.Abs(Vector256.Load(x));
                if (left > 1) a1 += Vector256.Abs(Vector256.Load(x + 8));
                if (left > 2) a2 += Vector256.Abs(Vector256.Load(x + 16));
                if (left > 3) a3 += Vector256.Abs(Vector256.Load(x + 24));
                if (left > 4) a4 += Vector256.Abs(Vector256.Load(x + 32));
                if (left > 5) a5 += Vector256.Abs(Vector256.Load(x + 40));
                if (left > 6) a6 += Vector256.Abs(Vector256.Load(x + 48));
                if (left > 7) a7 += Vector256.Abs(Vector256.Load(x + 56));
            }
        }
        float sum = Avx.IsSupported ? FoldLanesAvx(a0, a1, a2, a3, a4, a5, a6, a7) : FoldLanes(a0, a1, a2, a3, a4, a5, a6, a7);
        return kind == VectorNorm.L2 ? MathF.Sqrt(sum) : sum;
    }

    /// <summary>The GPU's fold of 8 lanes' accumulators (lane l in <c>a_l</c>, one element per position): each lane's
    /// 8 values folded, then the 8 lane values folded, both as <see cref="Fold(float, float, float, float, float, float, float, float)"/>.</summary>
    internal static float FoldLanes(Vector256<float> a0, Vector256<float> a1, Vector256<float> a2, Vector256<float> a3,
        Vector256<float> a4, Vector256<float> a5, Vector256<float> a6, Vector256<float> a7) =>
        Fold(Fold(a0), Fold(a1), Fold(a2), Fold(a3), Fold(a4), Fold(a5), Fold(a6), Fold(a7));

    /// <summary>
    /// <see cref="FoldLanes"/> with one 8×8 transpose instead of 64 element extractions: after it, register <c>T_e</c>
    /// holds element e of every lane, so the in-lane fold is the same tree of vertical adds (lane l of the result is
    /// lane l's fold, with the same association), and one more fold combines the lanes. Bit-identical to FoldLanes.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float FoldLanesAvx(Vector256<float> a0, Vector256<float> a1, Vector256<float> a2, Vector256<float> a3,
        Vector256<float> a4, Vector256<float> a5, Vector256<float> a6, Vector256<float> a7)
    {
        // Rows r_l = a_l; the standard unpack / shuffle / permute transpose.
        var t0 = Avx.UnpackLow(a0, a1);    // r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] r0[5] r1[5]
        var t1 = Avx.UnpackHigh(a0, a1);   // r0[2] r1[2] r0[3] r1[3] | r0[6] r1[6] r0[7] r1[7]
        var t2 = Avx.UnpackLow(a2, a3);
        var t3 = Avx.UnpackHigh(a2, a3);
        var t4 = Avx.UnpackLow(a4, a5);
        var t5 = Avx.UnpackHigh(a4, a5);
        var t6 = Avx.UnpackLow(a6, a7);
        var t7 = Avx.UnpackHigh(a6, a7);
        var u0 = Avx.Shuffle(t0, t2, 0x44);   // r0..3[0] | r0..3[4]
        var u1 = Avx.Shuffle(t0, t2, 0xEE);   // r0..3[1] | r0..3[5]
        var u2 = Avx.Shuffle(t1, t3, 0x44);   // r0..3[2] | r0..3[6]
        var u3 = Avx.Shuffle(t1, t3, 0xEE);   // r0..3[3] | r0..3[7]
        var u4 = Avx.Shuffle(t4, t6, 0x44);
        var u5 = Avx.Shuffle(t4, t6, 0xEE);
        var u6 = Avx.Shuffle(t5, t7, 0x44);
        var u7 = Avx.Shuffle(t5, t7, 0xEE);
        var e0 = Avx.Permute2x128(u0, u4, 0x20);
        var e4 = Avx.Permute2x128(u0, u4, 0x31);
        var e1 = Avx.Permute2x128(u1, u5, 0x20);
        var e5 = Avx.Permute2x128(u1, u5, 0x31);
        var e2 = Avx.Permute2x128(u2, u6, 0x20);
        var e6 = Avx.Permute2x128(u2, u6, 0x31);
        var e3 = Avx.Permute2x128(u3, u7, 0x20);
        var e7 = Avx.Permute2x128(u3, u7, 0x31);
        var lanes = ((e0 + e4) + (e2 + e6)) + ((e1 + e5) + (e3 + e7));
        return Fold(lanes);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Fold(Vector256<float> a) => Fold(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);

    /// <summary>((x0+x4)+(x2+x6))+((x1+x5)+(x3+x7)): a xor butterfly over 8 values (masks 4, 2, 1) as lane 0 sees it.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Fold(float x0, float x1, float x2, float x3, float x4, float x5, float x6, float x7) =>
        ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7));

    private interface IRangeJob
    {
        void Execute(int index);
    }

    /// <summary>Runs items 0 … count − 1, in a few contiguous ranges per core when the call is large.</summary>
    private static void Run<TJob>(ref TJob job, int count, long bytes) where TJob : struct, IRangeJob
    {
        if (bytes < ParallelThresholdBytes || count < 2 || Environment.ProcessorCount == 1)
        {
            for (int i = 0; i < count; i++) job.Execute(i);
            return;
        }
        var copy = job; // the job holds only pointers and values, so a copy shares the buffers
        int chunks = Math.Min(count, Environment.ProcessorCount * 4);
        Parallel.For(0, chunks, chunk =>
        {
            int start = (int)((long)count * chunk / chunks), end = (int)((long)count * (chunk + 1) / chunks);
            for (int i = start; i < end; i++) copy.Execute(i);
        });
    }

    /// <summary>Tokens per item of <see cref="CacheNorms{T}"/>.</summary>
    private const int NormBlockTokens = 256;

    /// <summary>A block of <see cref="NormBlockTokens"/> tokens of one row of <see cref="CacheNorms{T}"/>, every head (token
    /// outer, head inner: in NHD storage that reads each token's rows contiguously).</summary>
    private readonly struct CacheNormJob<T>(in CacheNormSpec spec, T* keys, T* values, int* lengths, int* table, float* keyNorms, float* valueNorms)
        : IRangeJob where T : unmanaged
    {
        private readonly CacheNormSpec _spec = spec;

        public static int Blocks(in CacheNormSpec spec) => (spec.Cache.MaxTokens + NormBlockTokens - 1) / NormBlockTokens;

        public void Execute(int index)
        {
            var storage = _spec.Storage;
            var cache = _spec.Cache;
            int heads = _spec.NumKvHeads, dim = _spec.HeadDim, maxTokens = cache.MaxTokens;
            int blocks = Blocks(_spec);
            int r = index / blocks, start = (index - r * blocks) * NormBlockTokens, end = Math.Min(maxTokens, start + NormBlockTokens);
            int length = lengths[r];
            float* scratch = stackalloc float[MaxRow];
            for (int n = start; n < end; n++)
            {
                int page = cache.IsPaged && n < length ? table[(long)r * cache.MaxPagesPerSequence + n / cache.PageSize] : 0;
                for (int h = 0; h < heads; h++)
                {
                    long output = ((long)r * heads + h) * maxTokens + n;
                    float kn = 0, vn = 0;
                    if (n < length)
                    {
                        long offset = storage.StorageOffset(r, n, page, h, dim);
                        if (keyNorms != null) kn = RowNorm(keys + offset, dim, _spec.KeyNorm, scratch);
                        if (valueNorms != null) vn = RowNorm(values + offset, dim, _spec.ValueNorm, scratch);
                    }
                    if (keyNorms != null) keyNorms[output] = kn;
                    if (valueNorms != null) valueNorms[output] = vn;
                }
            }
        }
    }
}
