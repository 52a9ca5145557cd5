using KvKernels.Cuda;

namespace KvCheck.Benchmarks;

/// <summary>
/// One op at one shape, timed on one backend. <see cref="BytesMoved"/> counts the bytes the op must read and write per
/// call (KV rows only; block tables and slot maps are a fraction of a percent and not counted).
/// </summary>
internal abstract class BenchCase : IDisposable
{
    /// <summary>Op name, <c>family.op</c>.</summary>
    public abstract string Op { get; }

    /// <summary>The shape string (see <see cref="ShapeText"/>): identical to the peers' for the same shape.</summary>
    public abstract string Shape { get; }

    /// <summary>Bytes read + bytes written by one call.</summary>
    public abstract long BytesMoved { get; }

    /// <summary>Floating-point operations one call must do (multiply-add = 2), or 0 where bytes alone bound the op.
    /// Rows with FLOPs also report TFLOP/s.</summary>
    public virtual long Flops => 0;

    /// <summary>The % of the copy bandwidth a GPU row is held to, or null for none. By default rows moving ≥ 256 MiB
    /// are held to 90 % (the paging goal); op families with other goals override it.</summary>
    public virtual double? GoalPercent => BytesMoved >= 256L << 20 ? 90 : null;

    /// <summary>Bytes allocated once, whatever the number of rotating buffer sets.</summary>
    public abstract long SharedAllocationBytes { get; }

    /// <summary>Bytes allocated per rotating buffer set.</summary>
    public abstract long SetAllocationBytes { get; }

    public abstract void Dispose();
}

/// <summary>A GPU case: <see cref="Prepare"/> allocates and fills; <see cref="Enqueue"/> launches one call on set <c>set</c>.</summary>
internal abstract class GpuBenchCase : BenchCase
{
    public abstract void Prepare(CudaDevice device, CudaStream stream, int sets, int seed);

    public abstract void Enqueue(CudaStream stream, int set);
}

/// <summary>A CPU case: <see cref="Prepare"/> allocates and fills; <see cref="Run"/> runs one call on set <c>set</c>.</summary>
internal abstract class CpuBenchCase : BenchCase
{
    public abstract void Prepare(int sets, int seed);

    public abstract void Run(int set);
}

/// <summary>The result of timing one case.</summary>
/// <param name="MedianSeconds">Median time of one call.</param>
/// <param name="Samples">Samples the median is taken over.</param>
/// <param name="OpsPerSample">Calls per timed sample (the sample time is divided by it).</param>
/// <param name="Note">Anything the reader must know (launch-bound, fewer buffer sets …), or null.</param>
internal sealed record Timing(double MedianSeconds, int Samples, int OpsPerSample, string? Note);

/// <summary>
/// The shape strings of benchmark rows. One format for KvCheck and the peers (bench/peers/*.py build the same strings):
/// <code>
///   paging.gather / paging.scatter:  B=&lt;sequences&gt; N=&lt;tokens per sequence&gt; &lt;geometry&gt;
///   paging.append:                   T=&lt;tokens&gt; decode|prefill &lt;geometry&gt;
///   paging.copy_pages:               pairs=&lt;page pairs&gt; &lt;geometry&gt;
///   geometry:                        Hkv=&lt;kv heads&gt; D=&lt;head dim&gt; page=&lt;page size&gt; NHD|HND fp16|bf16|u8[ keys-only]
/// </code>
/// e.g. <c>B=32 N=8192 Hkv=8 D=128 page=16 NHD fp16</c>. K and V both move unless the geometry says keys-only.
/// </summary>
internal static class ShapeText
{
    public static string Batch(int batch, int tokens, Verification.PagingGeometry g) => $"B={batch} N={tokens} {g.Describe}";

    public static string Append(int tokens, bool decode, Verification.PagingGeometry g) => $"T={tokens} {(decode ? "decode" : "prefill")} {g.Describe}";

    public static string CopyPages(int pairs, Verification.PagingGeometry g) => $"pairs={pairs} {g.Describe}";
}
