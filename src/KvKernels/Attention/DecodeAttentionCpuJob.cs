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
        // Longer tiles when many query rows share them: the rows' q and accumulators are re-read once per tile.
        _tile = _rowsPerUnit <= 16 ? 32 : 64;
        // Values come from their own storage, or are the un-rotated keys (key reuse with RoPE), or are the key tile itself.
        _valueScratchDim = !spec.KeyReuse ? spec.ValueDim : spec.Rope.Enabled ? spec.HeadDim : 0;
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
            return _rowsPerUnit * (dk + dOut + 2) + _tile * (dk + _valueScratchDim + 1) + 3 * _anglesPadded + 8;
        }
    }

    /// <summary>What one unit works on: its pair, its query rows, and where its scratch lies.</summary>
    private struct Unit
    {
        public int B, Kvh, Row, Head, Length, FirstRow, EndRow, FirstToken, LastToken;
        public float* Q, Acc, Max, Sum, KeyTile, ValueTile, Scores, Angles, Cos, Sin;
    }

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
        u.Angles = u.Scores + _tile;
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
            ProcessTile(u, t0, Math.Min(_tile, stop - t0));
    }

    /// <summary>Keys [t0, t0 + count): widened once, then every query row of the unit updates its state from them.</summary>
    private void ProcessTile(in Unit u, int t0, int count)
    {
        var spec = _spec;
        int dk = spec.HeadDim, dOut = spec.OutputDim, group = spec.GroupSize;
        LoadTile(u.Row, u.Head, t0, count, u.KeyTile, u.ValueTile, u.Angles, u.Cos, u.Sin);
        float* values = _valueScratchDim == 0 ? u.KeyTile : u.ValueTile;
        int valueStride = _valueScratchDim == 0 ? dk : _valueScratchDim;
        int paddedCount = (count + 7) & ~7;
        float* scores = u.Scores;

        for (int i = u.FirstToken; i <= u.LastToken; i++)
        {
            int qi = u.Length - spec.QueryLength + i;
            var visibility = Visibility(qi, t0, count);
            if (visibility == TileVisibility.None) continue;
            int rowStart = Math.Max(u.FirstRow, i * group) - u.FirstRow;
            int rowEnd = Math.Min(u.EndRow, (i + 1) * group) - u.FirstRow;
            for (int r = rowStart; r < rowEnd; r++)
            {
                int h = u.Kvh * group + (u.FirstRow + r) % group;
                float* qRow = u.Q + (long)r * dk;
                int t = 0;
                for (; t + 4 <= count; t += 4) Dot4(qRow, u.KeyTile + (long)t * dk, dk, dk, scores + t);
                for (; t < count; t++) scores[t] = Dot(qRow, u.KeyTile + (long)t * dk, dk);
                for (; t < paddedCount; t++) scores[t] = float.NegativeInfinity;

                if (spec.SoftCap > 0)
                {
                    float cap = spec.SoftCap, inverseCap = 1f / spec.SoftCap;
                    for (t = 0; t < count; t++) scores[t] = cap * MathF.Tanh(scores[t] * inverseCap);
                }
                if (spec.Alibi)
                {
                    float slope = _slopes[h];
                    for (t = 0; t < count; t++) scores[t] -= slope * (qi - (t0 + t));
                }
                if (visibility == TileVisibility.Partial)
                {
                    for (t = 0; t < count; t++)
                        if (!Visible(qi, t0 + t)) scores[t] = float.NegativeInfinity;
                }

                float tileMax = Max(scores, paddedCount);
                if (tileMax == float.NegativeInfinity) continue;
                float oldMax = u.Max[r];
                float newMax = MathF.Max(oldMax, tileMax);
                float* accRow = u.Acc + (long)r * dOut;
                if (newMax != oldMax)
                {
                    // Rescale what was accumulated under the old max (a no-op on the first tile: everything is 0).
                    float alpha = MathF.Exp(oldMax - newMax);
                    u.Sum[r] *= alpha;
                    Scale(accRow, alpha, dOut);
                    u.Max[r] = newMax;
                }
                u.Sum[r] += ExpSubtract(scores, newMax, paddedCount);

                t = 0;
                for (; t + 4 <= count; t += 4)
                    if (scores[t] != 0 || scores[t + 1] != 0 || scores[t + 2] != 0 || scores[t + 3] != 0)
                        Accumulate4(accRow, scores + t, values + (long)t * valueStride, valueStride, dOut);
                for (; t < count; t++)
                    if (scores[t] != 0) Accumulate(accRow, scores[t], values + (long)t * valueStride, dOut);
            }
        }
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
    /// keys serve as values, the values too.</summary>
    private void LoadTile(int row, int head, int t0, int count, float* keyTile, float* valueTile, float* angles, float* cos, float* sin)
    {
        var spec = _spec;
        int dk = spec.HeadDim, dv = spec.ValueDim;
        bool paged = spec.Cache.IsPaged, rope = spec.Rope.Enabled;
        for (int t = 0; t < count; t++)
        {
            int n = t0 + t;
            int page = paged ? _blockTable[(long)row * spec.Cache.MaxPagesPerSequence + n / spec.Cache.PageSize] : 0;
            float* key = keyTile + (long)t * dk;
            TIn* keySource = _keys + spec.StorageOffset(row, n, page, head, dk);
            if (spec.KeyReuse && rope)
            {
                float* plain = valueTile + (long)t * dk;
                Widen(keySource, plain, dk);
                Buffer.MemoryCopy(plain, key, (long)dk * sizeof(float), (long)dk * sizeof(float));
            }
            else
            {
                Widen(keySource, key, dk);
                if (!spec.KeyReuse) Widen(_values + spec.StorageOffset(row, n, page, head, dv), valueTile + (long)t * dv, dv);
            }
            if (rope)
            {
                int position = spec.Rope.ExplicitPositions ? _positions[(long)row * spec.Cache.MaxTokens + n] : n;
                Rotate(key, position, angles, cos, sin);
            }
        }
    }

    /// <summary>RoPE of one fp32 key row at <paramref name="position"/>, with the spec's fp32 angles.</summary>
    private void Rotate(float* key, int position, float* angles, float* cos, float* sin)
    {
        int pairs = _spec.RotaryDim / 2;
        float p = position;
        for (int i = 0; i < pairs; i++) angles[i] = p * _invFreq[i];
        CosSin(angles, cos, sin, pairs);
        if (_spec.Rope.Style == RopeStyle.RotateHalf)
        {
            float* y = key + pairs;
            for (int i = 0; i < pairs; i++)
            {
                float a = key[i], c = y[i];
                key[i] = a * cos[i] - c * sin[i];
                y[i] = a * sin[i] + c * cos[i];
            }
        }
        else
        {
            for (int i = 0; i < pairs; i++)
            {
                float a = key[2 * i], c = key[2 * i + 1];
                key[2 * i] = a * cos[i] - c * sin[i];
                key[2 * i + 1] = a * sin[i] + c * cos[i];
            }
        }
    }
}
