using BenchmarkDotNet.Attributes;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Bench;

/// <summary>
/// The GPU paging ops (<see cref="PagedKvKernels"/>) against a device-to-device copy probe moving the same bytes, in the
/// same run. Each invocation enqueues <see cref="Ops"/> calls on one stream and synchronises once (BenchmarkDotNet divides
/// by <c>OperationsPerInvoke</c>), so the time is dominated by the GPU, not by launch or synchronisation. Every shape
/// moves ≥ 256 MiB per call, far beyond L2, so no buffer rotation is needed. KvCheck bench (CUDA events, median) is the
/// reference measurement; this suite cross-checks it with BenchmarkDotNet's statistics.
/// </summary>
[GpuSuite]
public class PagingGpuBenchmarks
{
    private const int Ops = 8;

    private CudaDevice? _device;
    private CudaStream? _stream;
    private PagedKvKernels? _kernels;
    private DeviceMemory<Half>? _keyPool, _valuePool, _keys, _values, _copyKeyPool, _copyValuePool;
    private DeviceMemory<byte>? _probeSource, _probeDestination;
    private DeviceBlockTable? _table;
    private DeviceSlotMapping? _slots;
    private DevicePageCopies? _pairs;
    private PagedBatchSpec _batch;
    private PagedAppendSpec _append;
    private PagedKvLayout _copyPool;

    public static IEnumerable<PagingShape> Shapes =>
    [
        new(KvLayout.Nhd, 8, 4096),
        new(KvLayout.Nhd, 32, 8192),
        new(KvLayout.Hnd, 32, 8192),
    ];

    [ParamsSource(nameof(Shapes))]
    public PagingShape Shape { get; set; } = Shapes.First();

    [GlobalSetup]
    public void Setup()
    {
        var rng = new Random(20250102);
        var s = Shape;
        _device = CudaDevice.Open();
        _stream = _device.CreateStream();
        _kernels = new PagedKvKernels(_device);
        var pool = s.Pool(s.Pages);
        _batch = new PagedBatchSpec(pool, s.Batch, s.Tokens / PagingShape.PageSize, s.Tokens);
        _append = new PagedAppendSpec(pool, s.Batch * s.Tokens);
        _keyPool = Random(pool.PoolElements, rng);
        _valuePool = Random(pool.PoolElements, rng);
        _keys = Random(_batch.ContiguousElements, rng);
        _values = Random(_batch.ContiguousElements, rng);
        _table = new DeviceBlockTable(_device, s.Batch, _batch.MaxPagesPerSequence);
        _table.Update(Patterns.Permutation(s.Pages, rng), Enumerable.Repeat(s.Tokens, s.Batch).ToArray(), pool);
        _slots = new DeviceSlotMapping(_device, s.Batch * s.Tokens);
        _slots.Update(Patterns.PrefillSlots(s.Batch * s.Tokens, PagingShape.PageSize, s.Pages, rng), pool);
        _copyPool = s.Pool(2 * s.Pages);
        _copyKeyPool = Random(_copyPool.PoolElements, rng);
        _copyValuePool = Random(_copyPool.PoolElements, rng);
        _pairs = new DevicePageCopies(_device, s.Pages);
        _pairs.Update(Patterns.Pairs(s.Pages, 2 * s.Pages, rng), _copyPool);
        _probeSource = _device.Allocate<byte>(s.Moved / 2);
        _probeDestination = _device.Allocate<byte>(s.Moved / 2);
        _probeSource.Span.FillBytes(0xA5);
        _probeDestination.Span.FillBytes(0x5A);
        // Load the kernels (NVRTC compile or cache) outside the measurement.
        DeviceCopyProbe();
        Append();
        Gather();
        Scatter();
        CopyPages();
    }

    private DeviceMemory<Half> Random(long elements, Random rng)
    {
        var memory = _device!.Allocate<Half>(elements);
        var chunk = Patterns.RandomArray<Half>(Math.Min(elements, 8L << 20), rng);
        for (long offset = 0; offset < elements; offset += chunk.Length)
        {
            long n = Math.Min(chunk.Length, elements - offset);
            memory.Span.Slice(offset, n).CopyFrom(chunk.AsSpan(0, (int)n));
        }
        return memory;
    }

    /// <summary>The bandwidth probe: a device-to-device copy of M/2 bytes.</summary>
    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public void DeviceCopyProbe()
    {
        for (int i = 0; i < Ops; i++) _probeSource!.Span.CopyTo(_probeDestination!.Span, _stream);
        _stream!.Synchronize();
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Append()
    {
        for (int i = 0; i < Ops; i++) _kernels!.Append(_append, _keys!.Span, _values!.Span, _slots!, _keyPool!.Span, _valuePool!.Span, _stream);
        _stream!.Synchronize();
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Gather()
    {
        for (int i = 0; i < Ops; i++) _kernels!.Gather(_batch, _keyPool!.Span, _valuePool!.Span, _table!, _keys!.Span, _values!.Span, _stream);
        _stream!.Synchronize();
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void Scatter()
    {
        for (int i = 0; i < Ops; i++) _kernels!.Scatter(_batch, _keys!.Span, _values!.Span, _table!, _keyPool!.Span, _valuePool!.Span, _stream);
        _stream!.Synchronize();
    }

    [Benchmark(OperationsPerInvoke = Ops)]
    public void CopyPages()
    {
        for (int i = 0; i < Ops; i++) _kernels!.CopyPages(_copyPool, _pairs!, _copyKeyPool!.Span, _copyValuePool!.Span, _stream);
        _stream!.Synchronize();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _table?.Dispose();
        _slots?.Dispose();
        _pairs?.Dispose();
        foreach (var m in new[] { _keyPool, _valuePool, _keys, _values, _copyKeyPool, _copyValuePool }) m?.Dispose();
        _probeSource?.Dispose();
        _probeDestination?.Dispose();
        _stream?.Dispose();
        _device?.Dispose();
    }
}
