using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Selection;

namespace KvKernels.Tests.Selection;

/// <summary>
/// Invalid selection calls get an <see cref="ArgumentException"/> naming the parameter, on the CPU and through the GPU
/// wrapper, and the GPU wrapper makes no device call for them (checked on a recording backend).
/// </summary>
public sealed class SelectionBadInputTests
{
    private static readonly TopKSpec Spec = new(Rows: 3, Columns: 16, K: 4);
    private static readonly GlobalTopKSpec Global = new(Sequences: 1, Heads: 3, Columns: 16, Budget: 12);

    internal sealed record BadCall(string Name, string ParamName, Action<Context> Invoke)
    {
        public override string ToString() => Name;
    }

    internal sealed class Context : IDisposable
    {
        public readonly CudaDevice Device;
        public readonly FakeBackend Backend;
        public readonly SelectionKernels Gpu;
        public readonly DeviceMemory<float> Scores;
        public readonly DeviceMemory<int> Indices, Counts;
        public readonly DeviceMemory<uint> Workspace;
        public readonly DeviceSequenceLengths Lengths, LongLengths, OtherLengths;
        public readonly float[] HostScores = new float[48];
        public readonly int[] HostIndices = new int[48];
        public readonly int[] HostCounts = new int[3];

        public Context()
        {
            Device = FakeBackend.CreateDevice(out Backend);
            Gpu = new SelectionKernels(Device);
            Scores = Device.Allocate<float>(48);
            Indices = Device.Allocate<int>(48);
            Counts = Device.Allocate<int>(3);
            Workspace = Device.Allocate<uint>(Math.Max(Gpu.WorkspaceElements(Spec), Gpu.WorkspaceElements(Global)) + 8);
            Lengths = new DeviceSequenceLengths(Device, 4);
            Lengths.Update([16, 3, 0], 16);
            LongLengths = new DeviceSequenceLengths(Device, 4);
            LongLengths.Update([17, 3, 0], 17);
            OtherLengths = new DeviceSequenceLengths(Device, 4);
            OtherLengths.Update([16, 3], 16);
            Backend.Launches.Clear();
        }

        public void Dispose()
        {
            Scores.Dispose(); Indices.Dispose(); Counts.Dispose(); Workspace.Dispose();
            Lengths.Dispose(); LongLengths.Dispose(); OtherLengths.Dispose(); Device.Dispose();
        }
    }

    private static readonly BadCall[] AllCalls =
    [
        // CPU top-k: spec
        new("cpu: k = 0", "spec", c => SelectionCpu.TopK(Spec with { K = 0 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: k > n", "spec", c => SelectionCpu.TopK(Spec with { K = 17 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: negative rows", "spec", c => SelectionCpu.TopK(Spec with { Rows = -1 }, c.HostScores, [], c.HostIndices, c.HostCounts)),
        new("cpu: columns 0", "spec", c => SelectionCpu.TopK(Spec with { Columns = 0, K = 0 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: negative sinks", "spec", c => SelectionCpu.TopK(Spec with { Sinks = -1 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: negative recent", "spec", c => SelectionCpu.TopK(Spec with { Recent = -2 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: unknown order", "spec", c => SelectionCpu.TopK(Spec with { Order = (SelectionOrder)5 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: budget below protected ranges", "spec", c => SelectionCpu.TopK(Spec with { Sinks = 3, Recent = 2 }, c.HostScores, [16, 1, 1], c.HostIndices, c.HostCounts)),
        // CPU top-k: buffers and lengths
        new("cpu: scores too short", "scores", c => SelectionCpu.TopK(Spec, c.HostScores.AsSpan(1), [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: lengths count", "lengths", c => SelectionCpu.TopK(Spec, c.HostScores, [1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: negative length", "lengths", c => SelectionCpu.TopK(Spec, c.HostScores, [1, -1, 1], c.HostIndices, c.HostCounts)),
        new("cpu: length > n", "lengths", c => SelectionCpu.TopK(Spec, c.HostScores, [1, 17, 1], c.HostIndices, c.HostCounts)),
        new("cpu: indices too small", "indices", c => SelectionCpu.TopK(Spec, c.HostScores, [1, 1, 1], c.HostIndices.AsSpan(0, 11), c.HostCounts)),
        new("cpu: counts too small", "counts", c => SelectionCpu.TopK(Spec, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts.AsSpan(0, 2))),
        // CPU global
        new("cpu global: heads 0", "spec", c => SelectionCpu.GlobalTopK(Global with { Heads = 0 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: budget 0", "spec", c => SelectionCpu.GlobalTopK(Global with { Budget = 0 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: budget > heads·n", "spec", c => SelectionCpu.GlobalTopK(Global with { Budget = 49 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: alpha 1.5", "spec", c => SelectionCpu.GlobalTopK(Global with { Alpha = 1.5 }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: alpha NaN", "spec", c => SelectionCpu.GlobalTopK(Global with { Alpha = double.NaN }, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: protected ranges exceed budget", "spec", c => SelectionCpu.GlobalTopK(Global with { Sinks = 3, Recent = 2 }, c.HostScores, [16, 1, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: length > n", "lengths", c => SelectionCpu.GlobalTopK(Global, c.HostScores, [1, 17, 1], c.HostIndices, c.HostCounts)),
        new("cpu global: indices too small", "indices", c => SelectionCpu.GlobalTopK(Global, c.HostScores, [1, 1, 1], c.HostIndices.AsSpan(0, 35), c.HostCounts)),
        new("cpu global: counts too small", "counts", c => SelectionCpu.GlobalTopK(Global, c.HostScores, [1, 1, 1], c.HostIndices, c.HostCounts.AsSpan(0, 2))),
        new("cpu global: scores too short", "scores", c => SelectionCpu.GlobalTopK(Global, c.HostScores.AsSpan(0, 47), [1, 1, 1], c.HostIndices, c.HostCounts)),
        // GPU wrappers
        new("gpu: k > n", "spec", c => c.Gpu.TopK(Spec with { K = 17 }, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu: budget below protected ranges", "spec", c => c.Gpu.TopK(Spec with { Sinks = 2, Recent = 3 }, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu: lengths longer than n", "lengths", c => c.Gpu.TopK(Spec, c.Scores.Span, c.LongLengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu: lengths count", "lengths", c => c.Gpu.TopK(Spec, c.Scores.Span, c.OtherLengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu: scores too short", "scores", c => c.Gpu.TopK(Spec, c.Scores.Span.Slice(1), c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu: indices too small", "indices", c => c.Gpu.TopK(Spec, c.Scores.Span, c.Lengths, c.Indices.Span.Slice(0, 11), c.Counts.Span, c.Workspace.Span)),
        new("gpu: counts too small", "counts", c => c.Gpu.TopK(Spec, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span.Slice(0, 2), c.Workspace.Span)),
        new("gpu: workspace too small", "workspace", c => c.Gpu.TopK(Spec, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span.Slice(0, 3))),
        new("gpu: workspace misaligned", "workspace", c => c.Gpu.TopK(Spec, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span.Slice(1))),
        new("gpu: workspace default", "workspace", c => c.Gpu.TopK(Spec, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, default)),
        new("gpu: lengths null", "lengths", c => c.Gpu.TopK(Spec, c.Scores.Span, null!, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu global: protected ranges exceed budget", "spec", c => c.Gpu.GlobalTopK(Global with { Sinks = 3, Recent = 2 }, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
        new("gpu global: indices too small", "indices", c => c.Gpu.GlobalTopK(Global, c.Scores.Span, c.Lengths, c.Indices.Span.Slice(0, 35), c.Counts.Span, c.Workspace.Span)),
        new("gpu global: workspace too small", "workspace", c => c.Gpu.GlobalTopK(Global, c.Scores.Span, c.Lengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span.Slice(0, 7))),
        new("gpu global: lengths count", "lengths", c => c.Gpu.GlobalTopK(Global, c.Scores.Span, c.OtherLengths, c.Indices.Span, c.Counts.Span, c.Workspace.Span)),
    ];

    public static TheoryData<string> Calls => new(AllCalls.Select(c => c.Name));

    [Theory]
    [MemberData(nameof(Calls))]
    public void InvalidCall_ThrowsArgumentExceptionNamingTheParameter_AndMakesNoDeviceCall(string name)
    {
        var call = AllCalls.Single(c => c.Name == name);
        using var context = new Context();
        int before = context.Backend.DeviceCalls;
        var e = Assert.ThrowsAny<ArgumentException>(() => call.Invoke(context));
        Assert.Equal(call.ParamName, e.ParamName);
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
        Assert.Equal(before, context.Backend.DeviceCalls);
        Assert.Empty(context.Backend.Launches);
    }

    [Fact]
    public void ProtectedRanges_AreNoConflict_WhenEveryRowFitsTheBudget()
    {
        // Sinks + Recent > K is legal while no row is longer than K: those rows keep everything.
        var spec = Spec with { Sinks = 3, Recent = 2 };
        var indices = new int[12];
        var counts = new int[3];
        SelectionCpu.TopK(spec, new float[48], [4, 1, 0], indices, counts);
        Assert.Equal([4, 1, 0], counts);
        Assert.Equal([0, 1, 2, 3, 0, -1, -1, -1, -1, -1, -1, -1], indices);
        Assert.Throws<ArgumentException>("spec", () => SelectionCpu.TopK(spec, new float[48], [5, 1, 0], indices, counts));
    }
}
