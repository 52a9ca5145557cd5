using System.Runtime.CompilerServices;
using KvKernels.Paging;
using static KvKernels.Attention.DecodeAttentionCpuMath;

namespace KvKernels.Attention;

/// <summary>
/// One decode-attention call on the host, split into work units: a unit is a block of the query rows that read one
/// (row, KV head) pair (all <c>QueryLength × GroupSize</c> rows unless there are fewer pairs than cores). A unit makes
/// ONE pass over its pair's visible keys and values in tiles: each key and value row is widened to fp32 scratch (and
/// rotated) once, then every query row of the unit takes its scores, an online-softmax update (running max, one
/// rescale per tile) and its P·V accumulation from that tile. Holds only pointers and values, so copies of it run on
/// worker threads while the caller keeps the buffers pinned.
/// </summary>
internal readonly unsafe struct DecodeAttentionCpuJob<TIn, TOut> where TIn : unmanaged where TOut : unmanaged
{
    private readonly DecodeAttentionSpec _spec;
    private readonly TIn* _query, _keys, _values;
    private readonly int* _lengths, _blockTable, _positions;
    private readonly float* _slopes, _invFreq;
    private readonly TOut* _output;
    private readonly float* _lse;
    private readonly int _queryRows, _rowsPerUnit, _unitsPerPair, _tile, _valueScratchDim, _anglesPadded;

    public DecodeAttentionCpuJob(in DecodeAttentionSpec spec, TIn* query, TIn* keys, TIn* values, int* lengths, int* blockTable,
        int* positions, float* slopes, float* invFreq, TOut* output, float* lse, int unitsPerPair)
    {
        _spec = spec;
        _query = query; _keys = keys; _values = values;
        _lengths = lengths; _blockTable = blockTable; _positions = positions;
        _slopes = slopes; _invFreq = invFreq; _output = output; _lse = lse;
        _queryRows = spec.QueryLength * spec.GroupSize;
        _unitsPerPair = Math.Max(1, Math.Min(unitsPerPair, _queryRows));
        _rowsPerUnit = (_queryRows + _unitsPerPair - 1) / _unitsPerPair;
        _unitsPerPair = (_queryRows + _rowsPerUnit - 1) / _rowsPerUnit;
        // Values come from their own storage, or are the un-rotated keys (key reuse with RoPE), or are the key tile itself.
        _valueScratchDim = !spec.KeyReuse ? spec.ValueDim : spec.Rope.Enabled ? spec.HeadDim : 0;
        // Tiles of about 16 KiB of fp32 keys and values, so they stay in L1 next to a query row and its accumulator;
        // at least 16 keys, so the per-tile softmax work of each row stays small; a multiple of 8 (the score vectors).
        _tile = Math.Clamp(16384 / ((spec.HeadDim + _valueScratchDim) * sizeof(float)) & ~7, 16, 32);
        _anglesPadded = (spec.RotaryDim / 2 + 7) & ~7;
    }

    /// <summary>Work units: (row, KV head) pairs × query-row blocks per pair.</summary>
    public int Units => _spec.BatchSize * _spec.NumKvHeads * _unitsPerPair;

    /// <summary>fp32 scratch one worker needs.</summary>
    public int ScratchFloats
    {
        get
        {
            int dk = _spec.HeadDim, dOut = _spec.OutputDim;
            return _rowsPerUnit * (dk + dOut + 2) + _tile * (dk + _valueScratchDim + 2) + 3 * _anglesPadded + 8;
        }
    }

    /// <summary>What one unit works on: its pair, its query rows, and where its scratch lies.</summary>
    private struct Unit
    {
        public int B, Kvh, Row, Head, Length, FirstRow, EndRow, FirstToken, LastToken;
        public float* Q, Acc, Max, Sum, KeyTile, ValueTile, Scores, Angles, Cos, Sin;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public void Execute(int unitIndex, float* scratch)
    {
        var spec = _spec;
        int dk = spec.HeadDim, dOut = spec.OutputDim, group = spec.GroupSize, kvHeads = spec.NumKvHeads;
        int pair = unitIndex / _unitsPerPair;
        var u = new Unit { B = pair / kvHeads, Kvh = pair % kvHeads };
        u.Row = spec.Ragged ? pair : u.B;
        u.Head = spec.PoolKvHeads == 1 ? 0 : u.Kvh;
        u.Length = _lengths[u.Row];
        u.FirstRow = unitIndex % _unitsPerPair * _rowsPerUnit;
        u.EndRow = Math.Min(_queryRows, u.FirstRow + _rowsPerUnit);
        u.FirstToken = u.FirstRow / group;
        u.LastToken = (u.EndRow - 1) / group;
        int rows = u.EndRow - u.FirstRow;

        // Scratch: q (scaled), accumulators, running max and sum per query row; then the key, value and score tiles
        // and the rotary tables.
        u.Q = scratch;
        u.Acc = u.Q + (long)rows * dk;
        u.Max = u.Acc + (long)rows * dOut;
        u.Sum = u.Max + rows;
        u.KeyTile = u.Sum + rows;
        u.ValueTile = u.KeyTile + _tile * dk;
        u.Scores = u.ValueTile + _tile * _valueScratchDim;
        u.Angles = u.Scores + 2 * _tile;
        u.Cos = u.Angles + _anglesPadded;
        u.Sin = u.Cos + _anglesPadded;

        float scale = spec.EffectiveScale;
        for (int r = 0; r < rows; r++)
        {
            int m = u.FirstRow + r;
            int i = m / group, h = u.Kvh * group + m % group;
            TIn* source = _query + (((long)u.B * spec.QueryLength + i) * spec.NumQueryHeads + h) * dk;
            float* target = u.Q + (long)r * dk;
            Widen(source, target, dk);
            Scale(target, scale, dk);
            new Span<float>(u.Acc + (long)r * dOut, dOut).Clear();
            u.Max[r] = float.NegativeInfinity;
            u.Sum[r] = 0;
        }

        // Keys any row of the unit sees: the union over its query tokens i of what qi = length − QueryLength + i sees.
        int lastQi = u.Length - spec.QueryLength + u.LastToken;
        if (lastQi >= 0)
        {
            int firstQi = Math.Max(0, u.Length - spec.QueryLength + u.FirstToken);
            int end = lastQi + 1;
            if (spec.Window == 0)
            {
                ProcessRange(u, 0, end);
            }
            else
            {
                int windowStart = Math.Max(0, firstQi - spec.Window + 1);
                ProcessRange(u, 0, Math.Min(spec.Sinks, windowStart));
                ProcessRange(u, windowStart, end);
            }
        }

        for (int r = 0; r < rows; r++)
        {
            int m = u.FirstRow + r;
            int i = m / group, h = u.Kvh * group + m % group;
            long index = ((long)u.B * spec.QueryLength + i) * spec.NumQueryHeads + h;
            TOut* target = _output + index * dOut;
            float* source = u.Acc + (long)r * dOut;
            float sum = u.Sum[r];
            if (sum == 0)
            {
                // No visible key: zeros and an empty state.
                new Span<TOut>(target, dOut).Clear();
                if (_lse != null) _lse[index] = float.NegativeInfinity;
                continue;
            }
            float inverse = 1f / sum;
            for (int d = 0; d < dOut; d++) target[d] = FromSingle<TOut>(source[d] * inverse);
            if (_lse != null) _lse[index] = u.Max[r] + MathF.Log(sum);
        }
    }

    private void ProcessRange(in Unit u, int start, int stop)
    {
        for (int t0 = start; t0 < stop; t0 += _tile)
            ProcessTile(u, t0, Math.Min(_tile, stop - t0), stop);
    }

    /// <summary>Keys [t0, t0 + count): widened once, then every query row of the unit updates its state from them, two
    /// rows at a time so that each key and value chunk loaded from the tile serves both.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void ProcessTile(in Unit u, int t0, int count, int stop)
    {
        var spec = _spec;
        int dk = spec.HeadDim, dOut = spec.OutputDim, group = spec.GroupSize;
        LoadTile(u.Row, u.Head, t0, count, stop, u.KeyTile, u.ValueTile, u.Angles, u.Cos, u.Sin);
        float* values = _valueScratchDim == 0 ? u.KeyTile : u.ValueTile;
        int valueStride = _valueScratchDim == 0 ? dk : _valueScratchDim;
        float* keys = u.KeyTile;
        float* s0 = u.Scores, s1 = u.Scores + _tile;

        for (int i = u.FirstToken; i <= u.LastToken; i++)
        {
            int qi = u.Length - spec.QueryLength + i;
            var visibility = Visibility(qi, t0, count);
            if (visibility == TileVisibility.None) continue;
            int rowStart = Math.Max(u.FirstRow, i * group) - u.FirstRow;
            int rowEnd = Math.Min(u.EndRow, (i + 1) * group) - u.FirstRow;
            for (int r = rowStart; r < rowEnd; r += 2)
            {
                float* q0 = u.Q + (long)r * dk;
                float* acc0 = u.Acc + (long)r * dOut;
                int t = 0;
                if (r + 1 < rowEnd)
                {
                    float* q1 = q0 + dk;
                    float* acc1 = acc0 + dOut;
                    for (; t + 4 <= count; t += 4) Dot2x4(q0, q1, keys + (long)t * dk, dk, dk, s0 + t, s1 + t);
                    for (; t < count; t++)
                    {
                        s0[t] = Dot(q0, keys + (long)t * dk, dk);
                        s1[t] = Dot(q1, keys + (long)t * dk, dk);
                    }
                    bool live0 = UpdateState(u, r, s0, qi, t0, count, visibility);
                    bool live1 = UpdateState(u, r + 1, s1, qi, t0, count, visibility);
                    if (live0 && live1)
                    {
                        for (t = 0; t + 4 <= count; t += 4)
                            if (AnyWeight(s0 + t) || AnyWeight(s1 + t))
                                Accumulate2x4(acc0, acc1, s0 + t, s1 + t, values + (long)t * valueStride, valueStride, dOut);
                        for (; t < count; t++)
                        {
                            if (s0[t] != 0) Accumulate(acc0, s0[t], values + (long)t * valueStride, dOut);
                            if (s1[t] != 0) Accumulate(acc1, s1[t], values + (long)t * valueStride, dOut);
                        }
                    }
                    else if (live0) // one row only: both see the same keys, so only with infinite scores
                    {
                        AccumulateRow(acc0, s0, values, valueStride, count, dOut);
                    }
                    else if (live1)
                    {
                        AccumulateRow(acc1, s1, values, valueStride, count, dOut);
                    }
                }
                else
                {
                    for (; t + 4 <= count; t += 4) Dot4(q0, keys + (long)t * dk, dk, dk, s0 + t);
                    for (; t < count; t++) s0[t] = Dot(q0, keys + (long)t * dk, dk);
                    if (UpdateState(u, r, s0, qi, t0, count, visibility)) AccumulateRow(acc0, s0, values, valueStride, count, dOut);
                }
            }
        }
    }

    /// <summary>Whether any of four weights is not 0 (a NaN counts as a weight: it must reach the output).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool AnyWeight(float* p) => p[0] != 0 || p[1] != 0 || p[2] != 0 || p[3] != 0;

    /// <summary><c>acc += Σ p[t]·v_t</c> over the tile's keys.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AccumulateRow(float* acc, float* p, float* values, int valueStride, int count, int dim)
    {
        int t = 0;
        for (; t + 4 <= count; t += 4)
            if (AnyWeight(p + t)) Accumulate4(acc, p + t, values + (long)t * valueStride, valueStride, dim);
        for (; t < count; t++)
            if (p[t] != 0) Accumulate(acc, p[t], values + (long)t * valueStride, dim);
    }

    /// <summary>
    /// Turns query row <paramref name="r"/>'s raw dot products over the tile into its weights: soft-cap, ALiBi and the
    /// mask, then the online-softmax step (new running max, rescale of what was accumulated, <c>p = exp(s − max)</c>
    /// in place, running sum). Returns false when the row sees none of these keys (nothing to accumulate).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private bool UpdateState(in Unit u, int r, float* scores, int qi, int t0, int count, TileVisibility visibility)
    {
        var spec = _spec;
        int paddedCount = (count + 7) & ~7;
        for (int t = count; t < paddedCount; t++) scores[t] = float.NegativeInfinity;
        if (spec.SoftCap > 0)
        {
            float cap = spec.SoftCap, inverseCap = 1f / spec.SoftCap;
            for (int t = 0; t < count; t++) scores[t] = cap * MathF.Tanh(scores[t] * inverseCap);
        }
        if (spec.Alibi)
        {
            float slope = _slopes[u.Kvh * spec.GroupSize + (u.FirstRow + r) % spec.GroupSize];
            for (int t = 0; t < count; t++) scores[t] -= slope * (qi - (t0 + t));
        }
        if (visibility == TileVisibility.Partial)
        {
            for (int t = 0; t < count; t++)
                if (!Visible(qi, t0 + t)) scores[t] = float.NegativeInfinity;
        }

        float tileMax = Max(scores, paddedCount);
        if (tileMax == float.NegativeInfinity) return false;
        float oldMax = u.Max[r];
        float newMax = MathF.Max(oldMax, tileMax);
        if (newMax != oldMax)
        {
            // Rescale what was accumulated under the old max (a no-op on the first tile: everything is 0).
            float alpha = MathF.Exp(oldMax - newMax);
            u.Sum[r] *= alpha;
            Scale(u.Acc + (long)r * spec.OutputDim, alpha, spec.OutputDim);
            u.Max[r] = newMax;
        }
        u.Sum[r] += ExpSubtract(scores, newMax, paddedCount);
        return true;
    }

    private enum TileVisibility { None, Partial, All }

    private bool Visible(int qi, int n) =>
        n <= qi && (_spec.Window == 0 || n < _spec.Sinks || n > qi - _spec.Window);

    /// <summary>How much of keys [t0, t0 + count) a query at index <paramref name="qi"/> sees.</summary>
    private TileVisibility Visibility(int qi, int t0, int count)
    {
        int last = t0 + count - 1;
        if (qi < t0) return TileVisibility.None;
        if (_spec.Window == 0) return qi >= last ? TileVisibility.All : TileVisibility.Partial;
        // Visible: the sinks [0, sinkEnd) and the window [windowStart, qi]; hidden: the gap [sinkEnd, windowStart).
        int windowStart = qi - _spec.Window + 1;
        int sinkEnd = Math.Min(_spec.Sinks, qi + 1);
        if (t0 >= sinkEnd && last < windowStart) return TileVisibility.None;
        bool gapMissesTile = sinkEnd >= windowStart || windowStart <= t0 || sinkEnd > last;
        return qi >= last && gapMissesTile ? TileVisibility.All : TileVisibility.Partial;
    }

    /// <summary>Widens keys [t0, t0 + count) of (row, head) to fp32 (rotating them when RoPE is on the fly) and, unless
    /// keys serve as values, the values too; meanwhile it prefetches the rows of the next <paramref name="count"/>
    /// tokens below <paramref name="prefetchEnd"/>, so the next tile's memory latency overlaps this tile's work.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void LoadTile(int row, int head, int t0, int count, int prefetchEnd, float* keyTile, float* valueTile, float* angles, float* cos, float* sin)
    {
        var spec = _spec;
        int dk = spec.HeadDim, dv = spec.ValueDim;
        bool rope = spec.Rope.Enabled, reuse = spec.KeyReuse;
        var current = new RowCursor(spec, _blockTable, row, head, t0);
        var ahead = new RowCursor(spec, _blockTable, row, head, t0 + count);
        int keyBytes = dk * sizeof(TIn), valueBytes = reuse ? 0 : dv * sizeof(TIn);
        for (int t = 0; t < count; t++)
        {
            int n = t0 + t;
            if (n + count < prefetchEnd)
            {
                ahead.Next(out long aheadKey, out long aheadValue);
                Prefetch(_keys + aheadKey, keyBytes);
                Prefetch(_values + aheadValue, valueBytes);
            }
            current.Next(out long keyOffset, out long valueOffset);
            float* key = keyTile + (long)t * dk;
            if (reuse && rope)
            {
                float* plain = valueTile + (long)t * dk;
                Widen(_keys + keyOffset, plain, dk);
                Buffer.MemoryCopy(plain, key, (long)dk * sizeof(float), (long)dk * sizeof(float));
            }
            else
            {
                Widen(_keys + keyOffset, key, dk);
                if (!reuse) Widen(_values + valueOffset, valueTile + (long)t * dv, dv);
            }
            if (rope)
            {
                int position = spec.Rope.ExplicitPositions ? _positions[(long)row * spec.Cache.MaxTokens + n] : n;
                Rotate(key, position, angles, cos, sin);
            }
        }
    }

    /// <summary>
    /// Walks the storage offsets of one (row, head)'s key and value rows token by token: a fixed stride within a page
    /// (or the whole contiguous row), the block table and its division only at page starts.
    /// </summary>
    private struct RowCursor
    {
        private readonly DecodeAttentionSpec _spec;
        private readonly int* _blockTable;
        private readonly int _row, _head;
        private readonly long _keyStride, _valueStride;
        private int _token, _leftInPage;
        private long _key, _value;

        public RowCursor(in DecodeAttentionSpec spec, int* blockTable, int row, int head, int token)
        {
            _spec = spec;
            _blockTable = blockTable;
            _row = row;
            _head = head;
            _token = token;
            bool nhd = spec.Cache.Layout == KvLayout.Nhd;
            _keyStride = nhd ? (long)spec.PoolKvHeads * spec.HeadDim : spec.HeadDim;
            _valueStride = spec.KeyReuse ? 0 : nhd ? (long)spec.PoolKvHeads * spec.ValueDim : spec.ValueDim;
            _leftInPage = 0;
            _key = _value = 0;
        }

        /// <summary>Offsets of the current token's rows; then moves to the next token.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Next(out long key, out long value)
        {
            if (_leftInPage == 0)
            {
                var cache = _spec.Cache;
                int page = cache.IsPaged ? _blockTable[(long)_row * cache.MaxPagesPerSequence + _token / cache.PageSize] : 0;
                _key = _spec.StorageOffset(_row, _token, page, _head, _spec.HeadDim);
                _value = _spec.KeyReuse ? 0 : _spec.StorageOffset(_row, _token, page, _head, _spec.ValueDim);
                _leftInPage = cache.IsPaged ? cache.PageSize - _token % cache.PageSize : int.MaxValue;
            }
            key = _key;
            value = _value;
            _key += _keyStride;
            _value += _valueStride;
            _leftInPage--;
            _token++;
        }
    }

    /// <summary>RoPE of one fp32 key row at <paramref name="position"/>, with the spec's fp32 angles.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void Rotate(float* key, int position, float* angles, float* cos, float* sin) =>
        RotateRow(key, position, _invFreq, _spec.RotaryDim / 2, _spec.Rope.Style == RopeStyle.Interleaved, angles, cos, sin);
}
