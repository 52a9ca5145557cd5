using KvKernels.Cuda;

namespace KvCheck.Verification;

/// <summary>
/// One op checked on fresh random inputs at a list of shapes, on two rungs of the verification ladder:
/// <see cref="RunCpu"/> compares the library's CPU implementation with the scalar oracle, <see cref="RunGpu"/> compares
/// the GPU op with the CPU implementation. Every op family (paging., attention., mla., quant., selection.) adds its
/// verifications to <see cref="VerificationRegistry.All"/>.
/// </summary>
internal interface IVerification
{
    /// <summary>Op name, <c>family.op</c> (for example <c>paging.gather</c>).</summary>
    string Name { get; }

    /// <summary>Op family (<c>paging</c>).</summary>
    string Family { get; }

    /// <summary>The shapes this op is checked at (odd sizes and edge cases included).</summary>
    IReadOnlyList<VerificationShape> Shapes { get; }

    /// <summary>CPU implementation versus the oracle on <paramref name="shape"/>, inputs drawn from <paramref name="seed"/>.</summary>
    VerificationOutcome RunCpu(VerificationShape shape, int seed);

    /// <summary>GPU op versus the CPU implementation on <paramref name="shape"/>, with poisoned outputs.</summary>
    VerificationOutcome RunGpu(GpuContext gpu, VerificationShape shape, int seed);
}

/// <summary>A shape of one verification; <see cref="Description"/> is what the tables and JSON show.</summary>
internal abstract record VerificationShape
{
    public abstract string Description { get; }

    public sealed override string ToString() => Description;
}

/// <summary>Base class that hands each verification its own shape type.</summary>
internal abstract class Verification<TShape> : IVerification where TShape : VerificationShape
{
    protected Verification(string family, string op, IReadOnlyList<TShape> shapes)
    {
        Family = family;
        Name = family + "." + op;
        TypedShapes = shapes;
    }

    public string Name { get; }
    public string Family { get; }
    public IReadOnlyList<TShape> TypedShapes { get; }
    public IReadOnlyList<VerificationShape> Shapes => TypedShapes;

    public VerificationOutcome RunCpu(VerificationShape shape, int seed) => RunCpu((TShape)shape, seed);
    public VerificationOutcome RunGpu(GpuContext gpu, VerificationShape shape, int seed) => RunGpu(gpu, (TShape)shape, seed);

    protected abstract VerificationOutcome RunCpu(TShape shape, int seed);
    protected abstract VerificationOutcome RunGpu(GpuContext gpu, TShape shape, int seed);
}

/// <summary>What one comparison found.</summary>
/// <param name="Elements">Elements compared.</param>
/// <param name="Mismatches">Elements whose bytes differ.</param>
/// <param name="MaxRelError">See <see cref="Reports.VerifyRow"/>.</param>
/// <param name="Detail">The first mismatch, or a failed op-specific check; null when all is well.</param>
/// <param name="ExtraFailure">True when an op-specific check failed even though elements matched.</param>
internal sealed record VerificationOutcome(long Elements, long Mismatches, double MaxRelError, string? Detail, bool ExtraFailure = false)
{
    public bool Passed => Mismatches == 0 && !ExtraFailure && !double.IsNaN(MaxRelError);

    public static VerificationOutcome Empty { get; } = new(0, 0, 0, null);

    /// <summary>Combines the comparisons of several output buffers of one run.</summary>
    public VerificationOutcome And(VerificationOutcome other) => new(
        Elements + other.Elements,
        Mismatches + other.Mismatches,
        Math.Max(MaxRelError, other.MaxRelError),
        Detail ?? other.Detail,
        ExtraFailure || other.ExtraFailure);

    /// <summary>Marks an op-specific check as failed.</summary>
    public VerificationOutcome WithFailure(string detail) => this with { Detail = Detail is null ? detail : Detail + "; " + detail, ExtraFailure = true };
}

/// <summary>
/// The GPU a verification runs on: the device, a stream, and a cache of per-device op objects (kernel wrappers)
/// so that each family creates its wrapper once per run.
/// </summary>
internal sealed class GpuContext(CudaDevice device) : IDisposable
{
    private readonly Dictionary<Type, object> _services = [];

    public CudaDevice Device { get; } = device;

    public CudaStream Stream { get; } = device.CreateStream();

    /// <summary>The one <typeparamref name="T"/> of this device, created by <paramref name="create"/> on first use.</summary>
    public T Get<T>(Func<CudaDevice, T> create) where T : class
    {
        if (_services.TryGetValue(typeof(T), out var existing)) return (T)existing;
        var created = create(Device);
        _services[typeof(T)] = created;
        return created;
    }

    public void Dispose()
    {
        foreach (var service in _services.Values) (service as IDisposable)?.Dispose();
        Stream.Dispose();
    }
}
