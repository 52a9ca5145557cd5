using System.Numerics;
using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;

namespace KvKernels.Bench;

/// <summary>
/// The memory-bandwidth probes every CPU suite runs beside its ops, in the same process and on the same sizes: a
/// one-thread <c>Span.CopyTo</c> (the baseline of the "% of copy" column), the same copy split over all cores (the
/// library parallelises large calls, so this is the fairer ceiling for them), and a read-only sweep over all cores
/// (the ceiling of ops that only read, such as attention). A suite calls <see cref="SetUpProbes"/> from its setup.
/// </summary>
public abstract class MemoryProbeBenchmarks
{
    private byte[] _probeSource = [], _probeDestination = [], _readProbe = [];

    /// <summary>Allocates the probes: a copy of <paramref name="copyBytes"/> and a read of <paramref name="readBytes"/>.
    /// Both should move the bytes the suite reports per op (a copy reads and writes: pass half).</summary>
    protected void SetUpProbes(long copyBytes, long readBytes, Random rng)
    {
        _probeSource = Patterns.RandomArray<byte>(copyBytes, rng);
        _probeDestination = Patterns.RandomArray<byte>(copyBytes, rng);
        _readProbe = Patterns.RandomArray<byte>(readBytes, rng);
    }

    /// <summary>One-thread copy (bytes read + written = 2 × the copy size).</summary>
    [Benchmark(Baseline = true)]
    public void MemoryCopyProbe() => _probeSource.AsSpan().CopyTo(_probeDestination);

    /// <summary>The same copy split over all cores.</summary>
    [Benchmark]
    public void MemoryCopyProbeParallel()
    {
        int parts = Environment.ProcessorCount;
        long length = _probeSource.LongLength, chunk = (length + parts - 1) / parts;
        Parallel.For(0, parts, p =>
        {
            long start = p * chunk, n = Math.Min(chunk, length - start);
            if (n > 0) _probeSource.AsSpan((int)start, (int)n).CopyTo(_probeDestination.AsSpan((int)start, (int)n));
        });
    }

    /// <summary>A read of the whole read probe over all cores (a vectorized sum, returned so it is not optimized away).</summary>
    [Benchmark]
    public long MemoryReadProbeParallel()
    {
        int parts = Environment.ProcessorCount;
        long length = _readProbe.LongLength, chunk = (length + parts - 1) / parts;
        long total = 0;
        Parallel.For(0, parts, p =>
        {
            long start = p * chunk, n = Math.Min(chunk, length - start);
            if (n <= 0) return;
            var vectors = MemoryMarshal.Cast<byte, Vector<long>>(_readProbe.AsSpan((int)start, (int)n));
            var sum = Vector<long>.Zero;
            foreach (var v in vectors) sum += v;
            Interlocked.Add(ref total, Vector.Sum(sum));
        });
        return total;
    }
}
