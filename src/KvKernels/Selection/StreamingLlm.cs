namespace KvKernels.Selection;

/// <summary>How a StreamingLLM cache gives positions to its keys when RoPE is applied in attention.</summary>
public enum StreamingPositions
{
    /// <summary>Positions inside the cache, 0 … L − 1 in token order (the StreamingLLM paper: what lets a model run past
    /// its trained length).</summary>
    CacheIndex,

    /// <summary>Each token's original position in the stream.</summary>
    Original,
}

/// <summary>
/// StreamingLLM (attention sinks): the first <see cref="Sinks"/> tokens stay forever, the later ones live in a ring of
/// <see cref="Window"/> slots. Token at stream position p is stored at slot <c>p</c> when <c>p &lt; Sinks</c>, else at
/// <c>Sinks + (p − Sinks) mod Window</c>, overwriting the token Window positions older. A row's storage then holds
/// <see cref="Length"/> tokens in ring order; decode attention reads them as an ordinary row of that length (every stored
/// token is older than the query, and softmax does not depend on storage order) with on-the-fly RoPE at explicit positions
/// from <see cref="FillPositions"/> (<see cref="Attention.RopeOptions.ExplicitPositions"/>). The slots feed the paging
/// append (<see cref="Paging.PagedKvCache.Append{T}"/>) through a block table of <c>ceil((Sinks + Window) / page)</c> pages.
/// </summary>
/// <param name="Sinks">Sink tokens kept (paper: 4).</param>
/// <param name="Window">Recent tokens kept (the ring; the paper's examples use 2000).</param>
public readonly record struct StreamingLlmSpec(int Sinks = 4, int Window = 2000)
{
    /// <summary>Storage tokens a row needs: Sinks + Window.</summary>
    public int Capacity => Sinks + Window;

    /// <summary>Checks the spec.</summary>
    public void Validate()
    {
        if (Sinks < 0) throw new ArgumentException($"Sinks is {Sinks}; expected ≥ 0.", "spec");
        if (Window < 1) throw new ArgumentException($"Window is {Window}; expected ≥ 1.", "spec");
    }

    /// <summary>The storage index (token slot of the row) of stream position <paramref name="position"/>.</summary>
    public int Slot(long position)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        return position < Sinks ? (int)position : Sinks + (int)((position - Sinks) % Window);
    }

    /// <summary>Tokens stored after <paramref name="tokensSeen"/> tokens of the stream: min(seen, Sinks + Window).</summary>
    public int Length(long tokensSeen)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokensSeen);
        return (int)Math.Min(tokensSeen, Capacity);
    }

    /// <summary>The stream position held by storage index <paramref name="slot"/> after <paramref name="tokensSeen"/> tokens.</summary>
    public long PositionAt(int slot, long tokensSeen)
    {
        Validate();
        if (slot < 0 || slot >= Length(tokensSeen)) throw new ArgumentOutOfRangeException(nameof(slot), slot, $"expected 0..{Length(tokensSeen) - 1}");
        if (slot < Sinks) return slot;
        // The newest position p ≤ tokensSeen − 1 with p ≥ Sinks and (p − Sinks) mod Window == slot − Sinks.
        long last = tokensSeen - 1, ring = slot - Sinks;
        long shift = ((last - Sinks - ring) % Window + Window) % Window;
        return last - shift;
    }

    /// <summary>Writes the RoPE position of every stored token, in storage order, for decode attention's explicit
    /// positions: the original stream positions, or their rank in token order (cache positions).</summary>
    /// <param name="tokensSeen">Tokens of the stream so far.</param>
    /// <param name="kind">Which positions.</param>
    /// <param name="positions">At least <see cref="Length"/> entries; the first Length are written.</param>
    public void FillPositions(long tokensSeen, StreamingPositions kind, Span<int> positions)
    {
        Validate();
        int length = Length(tokensSeen);
        if (positions.Length < length) throw new ArgumentException($"positions has {positions.Length} entries; {length} are needed.", nameof(positions));
        long oldestRing = Math.Max(Sinks, tokensSeen - Window);   // oldest stream position still in the ring
        for (int slot = 0; slot < length; slot++)
        {
            long p = PositionAt(slot, tokensSeen);
            if (kind == StreamingPositions.Original)
            {
                if (p > int.MaxValue) throw new ArgumentException($"Stream position {p} does not fit int32 positions.", nameof(tokensSeen));
                positions[slot] = (int)p;
            }
            else
            {
                positions[slot] = p < Sinks ? (int)p : Sinks + (int)(p - oldestRing);
            }
        }
    }
}
