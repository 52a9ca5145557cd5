using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Attention;

/// <summary>
/// Per-row sequence lengths <c>[rows]</c> on the device for contiguous KV storage, validated on the host against a
/// token capacity before upload, so the decode kernel never sees a length it could overrun with. Capacity is fixed at
/// construction; <see cref="Update"/> reuses the device buffer (no allocation). An engine updates it once per step and
/// reuses it for every layer.
/// </summary>
public sealed class DeviceSequenceLengths : DeviceIndexBuffer
{
    /// <summary>Creates room for up to <paramref name="capacity"/> rows.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="capacity"/> is negative.</exception>
    public DeviceSequenceLengths(CudaDevice device, int capacity) : base(device, ValidCapacity(capacity)) => Capacity = capacity;

    /// <summary>Most rows one update can hold.</summary>
    public int Capacity { get; }

    /// <summary>Rows in the current update.</summary>
    public int Count { get; private set; }

    /// <summary>The token capacity the lengths were validated against (every length is in [0, MaxTokens]).</summary>
    public int MaxTokens { get; private set; }

    /// <summary>The longest row of the current update (0 when empty).</summary>
    public int LongestSequence { get; private set; }

    internal DeviceSpan<int> Lengths => Memory;

    /// <summary>
    /// Validates every length in [0, <paramref name="maxTokens"/>] and uploads them (ordered on <paramref name="stream"/>
    /// when given; the host span may be reused on return).
    /// </summary>
    /// <exception cref="ArgumentException">More lengths than the capacity, a negative <paramref name="maxTokens"/>, or a
    /// length out of range; the buffer is unchanged.</exception>
    public void Update(ReadOnlySpan<int> lengths, int maxTokens, CudaStream? stream = null)
    {
        if (lengths.Length > Capacity)
            throw new ArgumentException($"lengths has {lengths.Length} entries; this buffer holds at most {Capacity}.", nameof(lengths));
        if (maxTokens < 0) throw new ArgumentException($"maxTokens is {maxTokens}; expected ≥ 0.", nameof(maxTokens));
        int longest = 0;
        for (int r = 0; r < lengths.Length; r++)
        {
            if ((uint)lengths[r] > (uint)maxTokens)
                throw new ArgumentException($"lengths[{r}] is {lengths[r]}; expected 0..maxTokens = {maxTokens}.", nameof(lengths));
            longest = Math.Max(longest, lengths[r]);
        }
        Upload(lengths, 0, stream);
        Count = lengths.Length;
        MaxTokens = maxTokens;
        LongestSequence = longest;
    }

    private static long ValidCapacity(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(capacity);
        return capacity;
    }
}
