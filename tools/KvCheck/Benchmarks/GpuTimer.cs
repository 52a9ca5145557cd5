using System.Diagnostics;
using KvCheck.Probes;
using KvKernels.Cuda;

namespace KvCheck.Benchmarks;

/// <summary>
/// Times GPU cases with CUDA events on one stream.
/// <list type="bullet">
/// <item>Warm-up first (module load, first launch); every rotating buffer set is touched once.</item>
/// <item>A sample is a pair of events around K back-to-back calls (K chosen so a sample lasts ≥ 200 µs), rotating over the
/// buffer sets; the sample time is divided by K. The median over samples is reported.</item>
/// <item>Each batch of samples is preceded by a "primer" (device-to-device copies of a scratch buffer) long enough for the
/// host to enqueue the whole batch while the GPU is busy, so that samples measure GPU time, not launch gaps. A sample
/// counts only if the host had finished enqueueing it before the GPU reached its start event (checked with the event
/// times against a host stopwatch started before the primer, which errs on the safe side). If no sample qualifies the
/// op is launch-bound: all samples are used and the row says so.</item>
/// <item>The first sample of a batch is dropped (it pays for the primer's dirty L2 lines).</item>
/// </list>
/// </summary>
internal sealed class GpuTimer : IDisposable
{
    private const long PrimerBytes = 256L << 20;
    private const int EntriesPerBatch = 480; // launches + event records queued per batch, well under the driver's queue depth
    private const double TargetSampleSeconds = 200e-6;
    private const double MarginSeconds = 20e-6;

    private readonly CudaDevice _device;
    private readonly CudaStream _stream;
    private readonly double _copyGBs;
    private DeviceMemory<byte>? _primerSource, _primerDestination;

    public GpuTimer(CudaDevice device, CudaStream stream, double copyGBs)
    {
        _device = device;
        _stream = stream;
        _copyGBs = copyGBs;
    }

    public Timing Measure(GpuBenchCase c, int sets, int wantedSamples)
    {
        _primerSource ??= Filled(_device, PrimerBytes, 0x3C);
        _primerDestination ??= Filled(_device, PrimerBytes, 0xC3);
        int counter = 0;

        // Warm-up: load the module, touch every set.
        for (int i = 0; i < Math.Max(3, sets); i++) c.Enqueue(_stream, counter++ % sets);
        _stream.Synchronize();

        // Estimate one call (GPU) and one enqueue (host).
        double callSeconds, enqueueSeconds;
        using (var a = _device.CreateEvent())
        using (var b = _device.CreateEvent())
        {
            const int n = 5;
            a.Record(_stream);
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < n; i++) c.Enqueue(_stream, counter++ % sets);
            enqueueSeconds = sw.Elapsed.TotalSeconds / n;
            b.Record(_stream);
            b.Synchronize();
            callSeconds = CudaEvent.ElapsedMilliseconds(a, b) / 1e3 / n;
        }
        int k = (int)Math.Clamp(Math.Ceiling(TargetSampleSeconds / Math.Max(callSeconds, 1e-7)), 1, 64);
        int samplesPerBatch = Math.Max(2, EntriesPerBatch / (k + 2));
        double primerCopySeconds = 2.0 * PrimerBytes / (_copyGBs * 1e9);

        var clean = new List<double>();
        var all = new List<double>();
        double primerFactor = 1.5;
        int batches = 0;
        var starts = new List<CudaEvent>();
        var ends = new List<CudaEvent>();
        try
        {
            while (clean.Count < wantedSamples && batches < 6)
            {
                batches++;
                int samples = Math.Min(samplesPerBatch, wantedSamples - clean.Count + 1) ;
                samples = Math.Max(samples, 2);
                while (starts.Count < samples + 1)
                {
                    starts.Add(_device.CreateEvent());
                    ends.Add(_device.CreateEvent());
                }
                double hostEstimate = samples * (k * enqueueSeconds + 2 * 3e-6) + 50e-6;
                int copies = (int)Math.Clamp(Math.Ceiling(primerFactor * hostEstimate / primerCopySeconds), 1, 256);

                var primerStart = starts[samples];
                var sw = Stopwatch.StartNew();
                primerStart.Record(_stream);
                for (int i = 0; i < copies; i++) _primerSource.Span.CopyTo(_primerDestination.Span, _stream);
                var hostDone = new double[samples];
                for (int j = 0; j < samples; j++)
                {
                    starts[j].Record(_stream);
                    for (int i = 0; i < k; i++) c.Enqueue(_stream, counter++ % sets);
                    ends[j].Record(_stream);
                    hostDone[j] = sw.Elapsed.TotalSeconds;
                }
                _stream.Synchronize();

                bool starved = false;
                for (int j = 1; j < samples; j++) // sample 0 pays for the primer's dirty L2 lines
                {
                    double seconds = CudaEvent.ElapsedMilliseconds(starts[j], ends[j]) / 1e3 / k;
                    double gpuStart = CudaEvent.ElapsedMilliseconds(primerStart, starts[j]) / 1e3;
                    all.Add(seconds);
                    if (gpuStart >= hostDone[j] + MarginSeconds) clean.Add(seconds);
                    else starved = true;
                }
                if (starved) primerFactor *= 2;
            }
        }
        finally
        {
            foreach (var e in starts) e.Dispose();
            foreach (var e in ends) e.Dispose();
        }

        if (clean.Count >= Math.Min(wantedSamples, all.Count / 2) && clean.Count > 0)
            return new Timing(Statistics.Median(clean.ToArray()), clean.Count, k, null);
        return new Timing(Statistics.Median(all.ToArray()), all.Count, k,
            $"launch-bound: the GPU waited for the host in {all.Count - clean.Count} of {all.Count} samples");
    }

    private static DeviceMemory<byte> Filled(CudaDevice device, long bytes, byte value)
    {
        var memory = device.Allocate<byte>(bytes);
        memory.Span.FillBytes(value);
        return memory;
    }

    public void Dispose()
    {
        _primerSource?.Dispose();
        _primerDestination?.Dispose();
    }
}

/// <summary>Times CPU cases with a stopwatch: warm-up, samples of K calls (≥ 5 ms each) over rotating sets, median.</summary>
internal static class CpuTimer
{
    private const double TargetSampleSeconds = 5e-3;

    public static Timing Measure(CpuBenchCase c, int sets, int wantedSamples)
    {
        int counter = 0;
        for (int i = 0; i < Math.Max(2, sets); i++) c.Run(counter++ % sets);
        var sw = Stopwatch.StartNew();
        c.Run(counter++ % sets);
        double call = sw.Elapsed.TotalSeconds;
        int k = (int)Math.Clamp(Math.Ceiling(TargetSampleSeconds / Math.Max(call, 1e-7)), 1, 10_000);
        var samples = new double[wantedSamples];
        for (int j = 0; j < wantedSamples; j++)
        {
            sw.Restart();
            for (int i = 0; i < k; i++) c.Run(counter++ % sets);
            samples[j] = sw.Elapsed.TotalSeconds / k;
        }
        return new Timing(Statistics.Median(samples), wantedSamples, k, null);
    }
}
