using KvKernels.Cuda;

namespace KvKernels.Attention;

/// <summary>
/// Device scratch for split-KV decode attention (Flash-Decoding): each split's fp32 normalised partial output
/// <c>[splits, B·q_len·Hq, OutputDim]</c> and natural-log LSE <c>[splits, B·q_len·Hq]</c>, combined by a second
/// kernel. Allocated once for the largest call; calls that use it must be ordered (one stream, or events), since
/// they share the memory.
/// </summary>
public sealed class DecodeAttentionWorkspace : IDisposable
{
    private readonly DeviceMemory<float> _partialOutput;
    private readonly DeviceMemory<float> _partialLse;

    /// <summary>Allocates room for calls of up to <paramref name="maxQueryRows"/> query rows (B · q_len · Hq), outputs of
    /// up to <paramref name="maxOutputDim"/> columns and <paramref name="maxSplits"/> splits.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A size is out of range.</exception>
    public DecodeAttentionWorkspace(CudaDevice device, long maxQueryRows, int maxOutputDim, int maxSplits)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfNegative(maxQueryRows);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxOutputDim, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(maxOutputDim, DecodeAttentionSpec.MaxHeadDim);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxSplits, 1);
        Device = device;
        MaxQueryRows = maxQueryRows;
        MaxOutputDim = maxOutputDim;
        MaxSplits = maxSplits;
        long lseElements = checked(maxSplits * maxQueryRows);
        _partialOutput = device.Allocate<float>(Math.Max(1, checked(lseElements * maxOutputDim)));
        try
        {
            _partialLse = device.Allocate<float>(Math.Max(1, lseElements));
        }
        catch
        {
            _partialOutput.Dispose();
            throw;
        }
    }

    /// <summary>The device the scratch lives on.</summary>
    public CudaDevice Device { get; }

    /// <summary>Most query rows (B · q_len · Hq) of a call.</summary>
    public long MaxQueryRows { get; }

    /// <summary>Most output columns of a call.</summary>
    public int MaxOutputDim { get; }

    /// <summary>Most splits a call can use; larger requests are clamped to it.</summary>
    public int MaxSplits { get; }

    internal DeviceSpan<float> PartialOutput => _partialOutput.Span;

    internal DeviceSpan<float> PartialLse => _partialLse.Span;

    /// <summary>Throws when a call of <paramref name="spec"/> does not fit.</summary>
    internal void Check(in DecodeAttentionSpec spec, string paramName)
    {
        if (spec.LseElements > MaxQueryRows)
            throw new ArgumentException($"The workspace holds {MaxQueryRows} query rows; the call has B·q_len·Hq = {spec.LseElements}.", paramName);
        if (spec.OutputDim > MaxOutputDim)
            throw new ArgumentException($"The workspace holds outputs of {MaxOutputDim} columns; the call has OutputDim = {spec.OutputDim}.", paramName);
    }

    /// <summary>Frees the device memory.</summary>
    public void Dispose()
    {
        _partialOutput.Dispose();
        _partialLse.Dispose();
    }
}
