using System.Buffers;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Selection;

public static unsafe partial class TokenScoresCpu
{
    /// <summary>Keys per tile of the window scorer (as the GPU kernel's).</summary>
    private const int WindowTile = 64;

    /// <summary>
    /// Observation-window scores (see <see cref="WindowScoreSpec"/>): softmax probabilities of the last W queries over each
    /// sequence's keys, reduced over the window and over each KV head's group of query heads. The same order as the GPU
    /// kernel (64-key tiles; per key, queries of a head in ascending order, heads in ascending order); the exponentials
    /// differ from the GPU's by a few ulp.
    /// </summary>
    /// <param name="spec">Shapes, storage, scale, mask and reductions.</param>
    /// <param name="query">Window queries <c>[B, W, Hq, D]</c>, already rotated.</param>
    /// <param name="keys">Key storage.</param>
    /// <param name="lengths">Sequence lengths <c>[B]</c> (0 … MaxTokens; a length below W leaves the first queries absent).</param>
    /// <param name="blockTable">Block table <c>[B, MaxPagesPerSequence]</c> for paged storage; empty for contiguous.</param>
    /// <param name="scores">fp32 <c>[B, OutputHeads, MaxTokens]</c>, written (0 past each length).</param>
    /// <exception cref="ArgumentException">A bad spec, element type, buffer length, length or page; nothing is written.</exception>
    public static void WindowScores<T>(in WindowScoreSpec spec, ReadOnlySpan<T> query, ReadOnlySpan<T> keys, ReadOnlySpan<int> lengths,
        ReadOnlySpan<int> blockTable, Span<float> scores) where T : unmanaged
    {
        spec.ValidateBuffers<T>(query.Length, keys.Length, lengths.Length, blockTable.Length, scores.Length);
        spec.ValidateIndices(lengths, blockTable);
        fixed (T* q = query, k = keys)
        fixed (int* len = lengths, table = blockTable)
        fixed (float* s = scores)
        {
            var job = new WindowJob<T>(spec, q, k, len, table, s);
            long work = (long)spec.QueryRows * spec.Cache.MaxTokens * spec.HeadDim;
            Run(ref job, spec.BatchSize * spec.NumKvHeads, work);
        }
    }

    /// <summary>One (sequence, KV head): pass 1 (per-row max and exp-sum over 64-key tiles, online), then pass 2 (tile by
    /// tile: p = exp(s − lse), window reduction per head, group reduction over heads).</summary>
    private readonly struct WindowJob<T>(in WindowScoreSpec spec, T* query, T* keys, int* lengths, int* table, float* scores)
        : IRangeJob where T : unmanaged
    {
        private readonly WindowScoreSpec _spec = spec;

        public void Execute(int bh)
        {
            var spec = _spec;
            int heads = spec.NumKvHeads, g = spec.GroupSize, w = spec.WindowSize, dim = spec.HeadDim;
            int b = bh / heads, kvh = bh - b * heads;
            int len = lengths[b], maxTokens = spec.Cache.MaxTokens;
            int rows = g * w;
            bool perHead = spec.GroupReduction == ScoreReduction.None;
            float scale = spec.EffectiveScale;

            if (len == 0)
            {
                for (int j = 0; j < (perHead ? g : 1); j++) new Span<float>(OutputRow(b, kvh, j), maxTokens).Clear();
                return;
            }

            float[] rented = ArrayPool<float>.Shared.Rent(WindowTile * dim + dim + 3 * WindowTile + 3 * rows);
            try
            {
                fixed (float* scratch = rented)
                {
                    float* kTile = scratch, q = kTile + WindowTile * dim, s = q + dim;
                    float* headAcc = s + WindowTile, groupAcc = headAcc + WindowTile;
                    float* m = groupAcc + WindowTile, l = m + rows, lse = l + rows;

                    // Pass 1: running max and exp-sum per row R = hh·W + i.
                    for (int r = 0; r < rows; r++)
                    {
                        m[r] = float.NegativeInfinity;
                        l[r] = 0;
                    }
                    for (int n0 = 0; n0 < len; n0 += WindowTile)
                    {
                        int count = Math.Min(WindowTile, len - n0);
                        LoadKeys(b, kvh, n0, count, kTile);
                        for (int r = 0; r < rows; r++)
                        {
                            int visible = Logits(b, kvh, r, len, n0, count, kTile, q, s, scale);
                            if (visible == 0) continue;
                            int padded = (visible + 7) & ~7;
                            float tileMax = Max(s, padded);
                            float mNew = MathF.Max(m[r], tileMax);
                            float sum = ExpSubtract(s, mNew, padded);
                            l[r] = l[r] * MathF.Exp(m[r] - mNew) + sum;   // m = −∞ the first time: exp gives 0
                            m[r] = mNew;
                        }
                    }
                    for (int r = 0; r < rows; r++) lse[r] = l[r] > 0 ? m[r] + MathF.Log(l[r]) : float.PositiveInfinity;

                    // Pass 2, tile by tile: per key column, the window reduction of each head (queries ascending), folded
                    // into the group reduction (heads ascending).
                    for (int n0 = 0; n0 < maxTokens; n0 += WindowTile)
                    {
                        int columns = Math.Min(WindowTile, maxTokens - n0);
                        int count = Math.Max(0, Math.Min(columns, len - n0));
                        if (count > 0) LoadKeys(b, kvh, n0, count, kTile);
                        new Span<float>(groupAcc, WindowTile).Clear();
                        for (int hh = 0; hh < g; hh++)
                        {
                            new Span<float>(headAcc, WindowTile).Clear();
                            for (int i = 0; i < w && count > 0; i++)
                            {
                                int r = hh * w + i;
                                int visible = Logits(b, kvh, r, len, n0, count, kTile, q, s, scale);
                                if (visible == 0) continue;
                                ExpSubtract(s, lse[r], (visible + 7) & ~7);
                                if (spec.WindowReduction == ScoreReduction.Max)
                                    for (int j = 0; j < visible; j++) headAcc[j] = s[j] > headAcc[j] ? s[j] : headAcc[j];
                                else
                                    for (int j = 0; j < visible; j++) headAcc[j] += s[j];
                            }
                            if (spec.WindowReduction == ScoreReduction.Mean)
                                for (int j = 0; j < columns; j++) headAcc[j] /= w;
                            if (perHead)
                            {
                                new Span<float>(headAcc, columns).CopyTo(new Span<float>(OutputRow(b, kvh, hh) + n0, columns));
                                continue;
                            }
                            if (spec.GroupReduction == ScoreReduction.Max)
                                for (int j = 0; j < columns; j++) groupAcc[j] = headAcc[j] > groupAcc[j] ? headAcc[j] : groupAcc[j];
                            else
                                for (int j = 0; j < columns; j++) groupAcc[j] += headAcc[j];
                        }
                        if (perHead) continue;
                        if (spec.GroupReduction == ScoreReduction.Mean)
                            for (int j = 0; j < columns; j++) groupAcc[j] /= g;
                        new Span<float>(groupAcc, columns).CopyTo(new Span<float>(OutputRow(b, kvh, 0) + n0, columns));
                    }
                }
            }
            finally
            {
                ArrayPool<float>.Shared.Return(rented);
            }
        }

        /// <summary>The output row of (b, kvh), or of query head kvh·g + <paramref name="head"/> without a group reduction.</summary>
        private float* OutputRow(int b, int kvh, int head)
        {
            var spec = _spec;
            long row = spec.GroupReduction == ScoreReduction.None
                ? (long)b * spec.NumQueryHeads + (long)kvh * spec.GroupSize + head
                : (long)b * spec.NumKvHeads + kvh;
            return scores + row * spec.Cache.MaxTokens;
        }

        /// <summary>Widens keys n0 … n0 + count − 1 of (b, kvh) into <paramref name="tile"/> (rows of HeadDim floats).</summary>
        private void LoadKeys(int b, int kvh, int n0, int count, float* tile)
        {
            var storage = _spec.Storage;
            var cache = _spec.Cache;
            int dim = _spec.HeadDim;
            for (int j = 0; j < count; j++)
            {
                int n = n0 + j;
                int page = cache.IsPaged ? table[(long)b * cache.MaxPagesPerSequence + n / cache.PageSize] : 0;
                Widen(keys + storage.StorageOffset(b, n, page, kvh, dim), tile + (long)j * dim, dim);
            }
        }

        /// <summary>
        /// Scaled logits of row R = hh·W + i of (b, kvh) against the tile's keys it sees, into s[0 … visible), with −∞ up
        /// to the next multiple of 8; returns how many keys of the tile (from its first) the row sees (0 for an absent query).
        /// </summary>
        private int Logits(int b, int kvh, int r, int len, int n0, int count, float* tile, float* q, float* s, float scale)
        {
            var spec = _spec;
            int w = spec.WindowSize, dim = spec.HeadDim;
            int hh = r / w, i = r - hh * w;
            int position = len - w + i;
            if (position < 0) return 0;
            int last = spec.Causal ? position : len - 1;
            int visible = Math.Min(count, last - n0 + 1);
            if (visible <= 0) return 0;
            long row = ((long)b * w + i) * spec.NumQueryHeads + (long)kvh * spec.GroupSize + hh;
            Widen(query + row * dim, q, dim);
            int j = 0;
            for (; j + 4 <= visible; j += 4) Dot4(q, tile + (long)j * dim, dim, dim, s + j);
            for (; j < visible; j++) s[j] = Dot(q, tile + (long)j * dim, dim);
            for (j = 0; j < visible; j++) s[j] *= scale;
            int padded = (visible + 7) & ~7;
            for (j = visible; j < padded; j++) s[j] = float.NegativeInfinity;
            return visible;
        }
    }
}
