using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Selection;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Holds <see cref="TokenScoreKernels"/> to the kernels' ABI and launch plan without a GPU: on a recording backend shaped
/// like an H100 (132 SMs), each op launches the right entry points of the right specialization with the kernel's
/// parameter count, and the window scorer plans its splits, grids and shared memory as documented.
/// </summary>
public sealed class TokenScoreLaunchTests : IDisposable
{
    private readonly CudaDevice _device;
    private readonly FakeBackend _backend;
    private readonly TokenScoreKernels _ops;

    public TokenScoreLaunchTests()
    {
        _device = FakeBackend.CreateDevice(out _backend);
        foreach (var name in TokenScoreKernels.EntryPoints)
            _backend.ArgumentCounts[name] = KernelSignatures.Parameters(TokenScoreKernels.Source, name).Count;
        _ops = new TokenScoreKernels(_device);
    }

    public void Dispose() => _device.Dispose();

    [Fact]
    public void WindowScores_PlansSplitsAndLaunchesThreePasses()
    {
        // The bench shape: B=1, W=32, N=32k, Hq=32, Hkv=8, D=128. Rows per KV head g·W = 128 → 2 row tiles; 16 CTAs per
        // split; two waves of 132 SMs × 4 CTAs want 66 splits, chunks of ≥ 512 keys allow 64 → 64.
        var spec = new WindowScoreSpec(1, 32, 32, 8, 128, KvCacheShape.Paged(2048, 16, 2048));
        Assert.Equal(64, _ops.PlanSplits(spec, 32768));
        Assert.Equal(1, _ops.PlanSplits(spec, 0));
        Assert.Equal(7, _ops.PlanSplits(spec with { Splits = 7 }, 32768));

        using var query = _device.Allocate<BFloat16>(spec.QueryElements);
        using var keys = _device.Allocate<BFloat16>(spec.KeyElements);
        using var scores = _device.Allocate<float>(spec.OutputElements);
        using var table = new DeviceBlockTable(_device, 1, 2048);
        table.Update(Enumerable.Range(0, 2048).ToArray(), [32768], spec.KeyPool);
        using var workspace = new WindowScoreWorkspace(_device, spec.QueryRows, 16);   // clamps the 64 planned splits to 16
        _ops.WindowScores(spec, query.Span, keys.Span, table, scores.Span, workspace);

        Assert.Equal(["selection_window_partials", "selection_window_lse", "selection_window_scores"], _backend.Launches.Select(l => l.Kernel));
        Assert.All(_backend.Launches, l => Assert.Equal("HEAD_DIM=128 INPUT_BF16=1", l.Defines));
        var partials = _backend.Launches[0];
        Assert.Equal(new Dim3(2 * 8, 16), partials.Grid);
        Assert.Equal(128u, partials.Block.X);
        Assert.Equal(2 * 64 * (128 + 8) * 2, partials.SharedBytes);
        Assert.Equal(16ul, partials.Arguments[^3]);   // splits
        Assert.Equal((ulong)partials.SharedBytes, partials.Arguments[^1]);
        var lse = _backend.Launches[1];
        Assert.Equal<ulong>([8, 128, 16], lse.Arguments[2..]);
        var pass2 = _backend.Launches[2];
        Assert.Equal(new Dim3(512 * 8), pass2.Grid);
        Assert.Equal(2 * 64 * (128 + 8) * 2 + 64 * 65 * 4, pass2.SharedBytes);
        Assert.Equal(scores.Pointer, pass2.Arguments[5]);
        Assert.Equal<ulong>([0, 0, 512], pass2.Arguments[^4..^1]);   // sum, sum, key tiles
    }

    [Fact]
    public void WindowScores_OfEmptyRows_SkipsThePartialPasses()
    {
        var spec = new WindowScoreSpec(2, 4, 8, 2, 72, KvCacheShape.Contiguous(40, KvLayout.Hnd)) { GroupReduction = ScoreReduction.None };
        using var query = _device.Allocate<Half>(spec.QueryElements);
        using var keys = _device.Allocate<Half>(spec.KeyElements);
        using var scores = _device.Allocate<float>(spec.OutputElements);
        using var lengths = new DeviceSequenceLengths(_device, 2);
        lengths.Update([0, 0], 40);
        using var workspace = new WindowScoreWorkspace(_device, spec.QueryRows, 4);
        _ops.WindowScores(spec, query.Span, keys.Span, lengths, scores.Span, workspace);
        var launch = Assert.Single(_backend.Launches);   // the zero fill only
        Assert.Equal("selection_window_scores", launch.Kernel);
        Assert.Equal("HEAD_DIM=72 INPUT_BF16=0", launch.Defines);
        Assert.Equal<ulong>([2, 40, 0, 0, 1, 1], launch.Arguments[9..15]);   // Hkv, maxTokens, page 0 (contiguous), pages, HND, causal
        Assert.Equal(3ul, launch.Arguments[^3]);   // group reduction none
    }

    [Fact]
    public void Norms_AndPooling_LaunchTheHeadDimIndependentModule()
    {
        var pool = new PagedKvLayout(8, 16, 4, 72);
        var append = new AppendNormSpec(new PagedAppendSpec(pool, 5, KeyTokenStride: 3 * 4 * 72)) { ValueNorm = VectorNorm.L2 };
        using var keys = _device.Allocate<BFloat16>(5 * 3 * 4 * 72);
        using var norms = _device.Allocate<float>(append.NormElements);
        using var slots = new DeviceSlotMapping(_device, 5);
        slots.Update([3, -1, 7, 8, 100], pool);
        _ops.AppendNorms(append, keys.Span, default, slots, norms.Span, default);
        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("selection_norms_append", launch.Kernel);
        Assert.Equal("HEAD_DIM=128 INPUT_BF16=1", launch.Defines);
        Assert.Equal<ulong>([keys.Pointer, 0, slots.Slots.Pointer, norms.Pointer, 0, 5, 4, 72, 3 * 4 * 72, 4 * 72, 2, 2], launch.Arguments);

        _backend.Launches.Clear();
        using var input = _device.Allocate<float>(6 * 50);
        using var output = _device.Allocate<float>(6 * 50);
        _ops.Pool(new PoolingSpec(6, 50, 9, PoolingKind.Max) { RowsPerLength = 3 }, input.Span, null, output.Span);
        launch = Assert.Single(_backend.Launches);
        Assert.Equal("selection_pool", launch.Kernel);
        Assert.Equal("HEAD_DIM=128 INPUT_BF16=0", launch.Defines);
        Assert.Equal<ulong>([input.Pointer, output.Pointer, 0, 6, 50, 3, 9, 1], launch.Arguments);
    }

    [Fact]
    public void BadCalls_NeverReachTheDevice()
    {
        int before = _backend.DeviceCalls;
        using var input = _device.Allocate<float>(20);
        Assert.Throws<ArgumentException>(() => _ops.Pool(new PoolingSpec(2, 10, 2), input.Span, null, input.Span));
        var spec = new WindowScoreSpec(1, 4, 4, 2, 16, KvCacheShape.Contiguous(10));
        using var lengths = new DeviceSequenceLengths(_device, 1);
        Assert.Throws<ArgumentException>(() => _ops.WindowScores(spec with { WindowSize = 11 }, default(DeviceSpan<Half>), default, lengths, default, null!));
        Assert.Equal(before, _backend.DeviceCalls);
        Assert.Empty(_backend.Launches);
    }
}
