using KvKernels.Cuda;

namespace KvKernels.Selection;

/// <summary>
/// Device scratch of <see cref="TokenScoreKernels.WindowScores{T}(in WindowScoreSpec, DeviceSpan{T}, DeviceSpan{T}, Paging.DeviceBlockTable, DeviceSpan{float}, WindowScoreWorkspace, CudaStream?)"/>:
/// each key split's running max and exp-sum per window query row (<c>[B·Hkv, splits, g·W, 2]</c> fp32) and the merged
/// log-sum-exp per row (<c>[B·Hkv, g·W]</c>). Allocated once for the largest call; calls that share it must be ordered
/// (one stream, or events).
/// </summary>
public sealed class WindowScoreWorkspace : IDisposable
{
    private readonly DeviceMemory<float> _partials;
    private readonly DeviceMemory<float> _lse;

    /// <summary>Allocates room for calls of up to <paramref name="maxQueryRows"/> window query rows (B · W · Hq) and
    /// <paramref name="maxSplits"/> key splits: <c>4 · maxQueryRows · (2 · maxSplits + 1)</c> bytes.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A size is out of range.</exception>
    public WindowScoreWorkspace(CudaDevice device, long maxQueryRows, int maxSplits)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfNegative(maxQueryRows);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxSplits, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(maxSplits, TokenScoreKernels.MaxSplits);
        Device = device;
        MaxQueryRows = maxQueryRows;
        MaxSplits = maxSplits;
        _partials = device.Allocate<float>(Math.Max(1, checked(2 * maxSplits * maxQueryRows)));
        try
        {
            _lse = device.Allocate<float>(Math.Max(1, maxQueryRows));
        }
        catch
        {
            _partials.Dispose();
            throw;
        }
    }

    /// <summary>The device the scratch lives on.</summary>
    public CudaDevice Device { get; }

    /// <summary>Most window query rows (B · W · Hq) of a call.</summary>
    public long MaxQueryRows { get; }

    /// <summary>Most key splits a call can use; larger plans are clamped to it.</summary>
    public int MaxSplits { get; }

    internal DeviceSpan<float> Partials => _partials.Span;

    internal DeviceSpan<float> Lse => _lse.Span;

    /// <summary>Throws when a call of <paramref name="spec"/> does not fit.</summary>
    internal void Check(in WindowScoreSpec spec, string paramName)
    {
        if (spec.QueryRows > MaxQueryRows)
            throw new ArgumentException($"The workspace holds {MaxQueryRows} window query rows; the call has B·W·Hq = {spec.QueryRows}.", paramName);
    }

    /// <summary>Frees the device memory.</summary>
    public void Dispose()
    {
        _partials.Dispose();
        _lse.Dispose();
    }
}
