using System.Diagnostics;
using KvKernels;
using KvKernels.Cuda;

namespace KvCheck.Probes;

/// <summary>A copy-bandwidth measurement: GB/s = (bytes read + bytes written) / median time, GB = 1e9 bytes.</summary>
/// <param name="Kind">What was copied ("device-to-device copy", "host Span.CopyTo, 1 thread" …).</param>
/// <param name="BufferBytes">Size of the source (and of the destination) buffer.</param>
/// <param name="Runs">Timed runs.</param>
/// <param name="MedianSeconds">Median time of one copy.</param>
internal sealed record BandwidthMeasurement(string Kind, long BufferBytes, int Runs, double MedianSeconds)
{
    public double GBs => 2.0 * BufferBytes / MedianSeconds / 1e9;

    public override string ToString() =>
        $"{Cli.Ui.F(GBs, 1)} GB/s ({Kind}, {Cli.Ui.Bytes(BufferBytes)} buffers, median of {Runs})";
}

/// <summary>Memory-bandwidth probes for the GPU (device-to-device copy timed with CUDA events) and the host.</summary>
internal static class BandwidthProbe
{
    /// <summary>
    /// Times <paramref name="runs"/> device-to-device copies of a buffer of at least 512 MiB (1 GiB when memory allows)
    /// with CUDA events on <paramref name="stream"/>. All copies are enqueued back to back after a warm-up and read
    /// after one synchronisation, so the GPU never waits for the host between them.
    /// </summary>
    public static BandwidthMeasurement MeasureDeviceCopy(CudaDevice device, CudaStream stream, int runs = 20)
    {
        var (free, _) = device.MemoryInfo();
        long bytes = free >= 6L << 30 ? 1L << 30 : free >= 2L << 30 ? 512L << 20 : Math.Max(free / 4 / 4096 * 4096, 1L << 20);
        using var source = device.Allocate<byte>(bytes);
        using var destination = device.Allocate<byte>(bytes);
        source.Span.FillBytes(0xA5, stream);
        destination.Span.FillBytes(0x5A, stream);
        for (int i = 0; i < 3; i++) source.Span.CopyTo(destination.Span, stream);
        stream.Synchronize();

        var starts = new CudaEvent[runs];
        var ends = new CudaEvent[runs];
        try
        {
            for (int i = 0; i < runs; i++)
            {
                starts[i] = device.CreateEvent();
                ends[i] = device.CreateEvent();
            }
            for (int i = 0; i < runs; i++)
            {
                starts[i].Record(stream);
                source.Span.CopyTo(destination.Span, stream);
                ends[i].Record(stream);
            }
            stream.Synchronize();
            var seconds = new double[runs];
            for (int i = 0; i < runs; i++) seconds[i] = CudaEvent.ElapsedMilliseconds(starts[i], ends[i]) / 1e3;
            return new BandwidthMeasurement("device-to-device copy", bytes, runs, Statistics.Median(seconds));
        }
        finally
        {
            foreach (var e in starts) e?.Dispose();
            foreach (var e in ends) e?.Dispose();
        }
    }

    /// <summary>
    /// The device's dense bf16 rate in TFLOP/s: cuBLAS bf16 GEMMs of 8192³ (fp32 accumulation, bf16 output), 3 warm-up
    /// calls, then the median of <paramref name="runs"/> event-timed calls; null without cuBLAS. The yardstick of rows
    /// that report TFLOP/s (MLA decode with many heads is compute-bound).
    /// </summary>
    public static double? MeasureDenseBf16(CudaDevice device, CudaStream stream, int runs = 10)
    {
        if (!Cublas.IsAvailable) return null;
        const int n = 8192;
        using var cublas = new CublasHandle(device);
        using var a = device.Allocate<BFloat16>((long)n * n);
        using var b = device.Allocate<BFloat16>((long)n * n);
        using var c = device.Allocate<BFloat16>((long)n * n);
        a.Span.FillBytes(0x3C, stream);   // 0x3C3C ≈ 0.0115: finite, no overflow over 8192 terms
        b.Span.FillBytes(0x3C, stream);
        for (int i = 0; i < 3; i++) cublas.Gemm(n, n, n, a.Span, b.Span, c.Span, stream);
        stream.Synchronize();
        var seconds = new double[runs];
        using var start = device.CreateEvent();
        using var end = device.CreateEvent();
        for (int i = 0; i < runs; i++)
        {
            start.Record(stream);
            cublas.Gemm(n, n, n, a.Span, b.Span, c.Span, stream);
            end.Record(stream);
            end.Synchronize();
            seconds[i] = CudaEvent.ElapsedMilliseconds(start, end) / 1e3;
        }
        return 2.0 * n * n * n / Statistics.Median(seconds) / 1e12;
    }

    /// <summary>The host buffer size: at least 256 MiB and 4× the last-level cache, at most 1 GiB.</summary>
    public static long HostBufferBytes => Math.Clamp(4 * (HostInfo.LastLevelCacheBytes ?? 32L << 20), 256L << 20, 1L << 30);

    /// <summary>
    /// Host copy bandwidth: <see cref="Span{T}.CopyTo"/> of a buffer ≥ 4× the last-level cache, on one thread and
    /// split across all cores; returns the faster of the two (the CPU ops run in parallel for large calls).
    /// </summary>
    public static (BandwidthMeasurement Best, BandwidthMeasurement SingleThread, BandwidthMeasurement AllThreads) MeasureHostCopy(int runs = 7)
    {
        long bytes = HostBufferBytes;
        var source = GC.AllocateUninitializedArray<byte>((int)bytes);
        var destination = GC.AllocateUninitializedArray<byte>((int)bytes);
        RandomFill(source, 12345);
        destination.AsSpan().Fill(0x5A);

        double TimeOne(bool parallel)
        {
            var sw = Stopwatch.StartNew();
            if (!parallel)
            {
                source.AsSpan().CopyTo(destination);
            }
            else
            {
                int parts = Environment.ProcessorCount;
                long chunk = (bytes + parts - 1) / parts;
                Parallel.For(0, parts, p =>
                {
                    long start = p * chunk, length = Math.Min(chunk, bytes - start);
                    if (length > 0) source.AsSpan((int)start, (int)length).CopyTo(destination.AsSpan((int)start, (int)length));
                });
            }
            return sw.Elapsed.TotalSeconds;
        }

        BandwidthMeasurement Measure(bool parallel)
        {
            TimeOne(parallel); // warm-up: page faults, thread pool
            var seconds = new double[runs];
            for (int i = 0; i < runs; i++) seconds[i] = TimeOne(parallel);
            return new BandwidthMeasurement(parallel ? $"host Span.CopyTo, {Environment.ProcessorCount} threads" : "host Span.CopyTo, 1 thread",
                bytes, runs, Statistics.Median(seconds));
        }

        var single = Measure(parallel: false);
        var all = Environment.ProcessorCount > 1 ? Measure(parallel: true) : single;
        return (all.GBs > single.GBs ? all : single, single, all);
    }

    /// <summary>Fills a buffer with pseudo-random bytes quickly (a 1 MiB random block, varied per repetition).</summary>
    public static void RandomFill(Span<byte> destination, int seed)
    {
        var rng = new Random(seed);
        var block = new byte[1 << 20];
        rng.NextBytes(block);
        for (long offset = 0; offset < destination.Length; offset += block.Length)
        {
            int length = (int)Math.Min(block.Length, destination.Length - offset);
            block.AsSpan(0, length).CopyTo(destination.Slice((int)offset, length));
            block[rng.Next(block.Length)] ^= 0x5A; // successive blocks differ
        }
    }
}

internal static class Statistics
{
    public static double Median(ReadOnlySpan<double> values)
    {
        if (values.IsEmpty) return double.NaN;
        var sorted = values.ToArray();
        Array.Sort(sorted);
        int mid = sorted.Length / 2;
        return sorted.Length % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
    }
}
