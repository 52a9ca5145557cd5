using KvKernels.Attention;
using KvKernels.Cuda;
using KvKernels.Paging;

namespace KvKernels.Tests.Attention;

/// <summary>
/// Holds the GPU wrapper to the kernels' ABI and its planning without a GPU: on a recording backend (132 SMs, 2048
/// threads and 228 KiB of shared memory per SM), each call launches the right entry points of the right specialization
/// with as many arguments as the kernels declare, the values they expect, and the planned grid.
/// </summary>
public sealed class DecodeAttentionKernelsLaunchTests : IDisposable
{
    private readonly CudaDevice _device;
    private readonly FakeBackend _backend;
    private readonly DecodeAttentionKernels _ops;

    public DecodeAttentionKernelsLaunchTests()
    {
        _device = FakeBackend.CreateDevice(out _backend);
        foreach (var name in DecodeAttentionKernels.EntryPoints)
            _backend.ArgumentCounts[name] = KernelSignatures.Parameters(DecodeAttentionKernels.Source, name).Count;
        _ops = new DecodeAttentionKernels(_device);
    }

    public void Dispose() => _device.Dispose();

    private static ulong Bits(float value) => BitConverter.SingleToUInt32Bits(value);

    [Fact]
    public void Signatures_HaveTheParameterCountsTheWrapperPasses()
    {
        Assert.Equal(30, _backend.ArgumentCounts["attention_decode"]);
        Assert.Equal(7, _backend.ArgumentCounts["attention_merge_splits"]);
        Assert.Equal(8, _backend.ArgumentCounts["attention_merge_states"]);
        var decode = KernelSignatures.Parameters(DecodeAttentionKernels.Source, "attention_decode");
        Assert.Equal("const in_t*", decode[0]);
        Assert.Equal("out_t*", decode[7]);
        Assert.Equal("kvk_i32", decode[11]);
        Assert.Equal("float", decode[20]);
        Assert.Equal("float", decode[25]);
        Assert.Equal("kvk_i32", decode[^1]);
        var merge = KernelSignatures.Parameters(DecodeAttentionKernels.Source, "attention_merge_states");
        Assert.Equal(["const out_t*", "const float*", "const out_t*", "const float*", "out_t*", "float*", "kvk_i32", "kvk_i32"], merge);
    }

    [Fact]
    public void Catalog_ShipsTheAttentionSpecializations_WithEveryEntryPoint()
    {
        var attention = KernelCatalog.Entries.Where(e => e.Family == "attention").ToArray();
        Assert.Equal(DecodeAttentionKernels.Specializations.Count, attention.Length);
        Assert.InRange(attention.Length, 12, 24);
        Assert.All(attention, e => Assert.Equal(DecodeAttentionKernels.EntryPoints, e.EntryPoints));
        Assert.Contains(attention, e => e.Specialization.Defines == "HEAD_DIM=128 INPUT_BF16=0 KEY_REUSE=0 KV_LAYOUT_HND=0 OUT_TYPE=0 PAGED=1 ROPE_STYLE=0 VALUE_DIM=128");
        Assert.Contains(attention, e => e.Specialization.Defines.Contains("OUT_TYPE=2", StringComparison.Ordinal));
        Assert.Equal(attention.Length, attention.Select(e => e.Specialization).Distinct().Count());
    }

    [Fact]
    public void PagedRun_LaunchesDecodeWithTheKernelsArguments()
    {
        // 2 sequences, q_len 1, 8 query heads on 2 KV heads (4 rows per KV head: the warps split the tokens),
        // HND pages of 16, fp16 in, fp32 out, soft-cap and window; no workspace: one split.
        var spec = new DecodeAttentionSpec(2, 1, 8, 2, 128, KvCacheShape.Paged(8, 16, 3, KvLayout.Hnd))
        {
            InputType = AttentionElement.Float16, OutputType = AttentionElement.Float32, SoftCap = 30f, Window = 64, Sinks = 4,
        };
        using var query = _device.Allocate<Half>(spec.QueryElements);
        using var keys = _device.Allocate<Half>(spec.KeyElements);
        using var values = _device.Allocate<Half>(spec.ValueElements);
        using var output = _device.Allocate<float>(spec.OutputElements);
        using var lse = _device.Allocate<float>(spec.LseElements);
        using var table = new DeviceBlockTable(_device, 2, 3);
        table.Update([0, 1, 2, 3, -1, -1], [40, 5], spec.KeyPool);
        _ops.Run(spec, query.Span, keys.Span, values.Span, table, output.Span, lse.Span);

        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("attention_decode", launch.Kernel);
        Assert.Equal("HEAD_DIM=128 INPUT_BF16=0 KEY_REUSE=0 KV_LAYOUT_HND=1 OUT_TYPE=2 PAGED=1 ROPE_STYLE=0 VALUE_DIM=128", launch.Defines);
        Assert.Equal(new Dim3(4), launch.Grid);   // B · Hkv · 1 split · 1 row tile
        Assert.Equal(128u, launch.Block.X);
        // Shared memory of the Dk = Dv = 128 tiling (8 tokens per warp, tile 32, key rows padded to 17 units):
        // query 16 · 128 · 4 + addresses 2 · 32 · 8 + K 2 · 32 · 17 · 16 + V 2 · 32 · 16 · 16.
        const int shared = 8192 + 512 + 2 * 8704 + 2 * 8192;
        Assert.Equal(shared, launch.SharedBytes);
        ulong[] expected =
        [
            query.Pointer, keys.Pointer, values.Pointer, table.Lengths.Pointer, table.Table.Pointer, 0, 0, output.Pointer, lse.Pointer, 0, 0,
            2, 1, 8, 2, 0, 2, 48, 16, 3,
            Bits(1f / MathF.Sqrt(128)), Bits(30f), 64, 4, 0, 0,   // no RoPE: rotary dim 0, theta of default(RopeOptions)
            1, 4, 1, shared,
        ];
        Assert.Equal(expected, launch.Arguments);
    }

    [Fact]
    public void TensorCoreKernel_HasTheSameSignature_AndRunsManyRows()
    {
        Assert.Equal(KernelSignatures.Parameters(DecodeAttentionKernels.Source, "attention_decode"),
            KernelSignatures.Parameters(DecodeAttentionKernels.Source, "attention_decode_mma"));
        // MFA: 64 query heads on one KV head, Dk = Dv = 256: one CTA of 4 warp tiles of 16 rows, one token stream.
        var spec = new DecodeAttentionSpec(2, 1, 64, 1, 256, KvCacheShape.Contiguous(100));
        using var query = _device.Allocate<Half>(spec.QueryElements);
        using var keys = _device.Allocate<Half>(spec.KeyElements);
        using var values = _device.Allocate<Half>(spec.ValueElements);
        using var output = _device.Allocate<Half>(spec.OutputElements);
        using var lengths = new DeviceSequenceLengths(_device, 2);
        lengths.Update([100, 3], 100);
        _ops.Run(spec, query.Span, keys.Span, values.Span, lengths, output.Span);

        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("attention_decode_mma", launch.Kernel);
        Assert.Equal(new Dim3(2), launch.Grid);
        Assert.Equal(128u, launch.Block.X);
        // 1024 B of K+V per token: stages of one 16-token sub-tile; rows padded to 33 units. Query 64 · 33 · 16,
        // addresses 2 · 16 · 8, K and V 2 · 16 · 33 · 16 each (more than the merge scratch 2 · 16 · 258 · 4).
        const int shared = 33792 + 256 + 2 * 16896;
        Assert.Equal(shared, launch.SharedBytes);
        Assert.Equal([1UL, 1UL, 1UL, (ulong)shared], launch.Arguments[26..30]);   // splits, token streams, row tiles, shared

        // The same call on the CUDA cores when forced.
        _backend.Launches.Clear();
        _ops.KernelChoice = DecodeKernelChoice.CudaCores;
        _ops.Run(spec, query.Span, keys.Span, values.Span, lengths, output.Span);
        Assert.Equal("attention_decode", Assert.Single(_backend.Launches).Kernel);
    }

    [Fact]
    public void ContiguousRun_RaggedKeyReuseRope_PassesRowsAndOptions()
    {
        // Ragged rows (b, kvh), key reuse (no values), interleaved RoPE with explicit positions, ALiBi, q_len 16 ×
        // group 8 = 128 rows per KV head: 8 row tiles of 16.
        var spec = new DecodeAttentionSpec(2, 16, 16, 2, 64, KvCacheShape.Contiguous(50))
        {
            InputType = AttentionElement.BFloat16, OutputType = AttentionElement.BFloat16, Ragged = true, KeyReuse = true, Alibi = true,
            Rope = new RopeOptions(RopeStyle.Interleaved, 500000f, RotaryDim: 32, ExplicitPositions: true), Scale = 0.5f,
        };
        using var query = _device.Allocate<BFloat16>(spec.QueryElements);
        using var keys = _device.Allocate<BFloat16>(spec.KeyElements);
        using var output = _device.Allocate<BFloat16>(spec.OutputElements);
        using var positions = _device.Allocate<int>(spec.PositionElements);
        using var slopes = _device.Allocate<float>(spec.NumQueryHeads);
        using var lengths = new DeviceSequenceLengths(_device, 4);
        lengths.Update([50, 0, 7, 49], 50);
        _ops.Run(spec, query.Span, keys.Span, default, lengths, output.Span, positions: positions.Span, alibiSlopes: slopes.Span);

        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("HEAD_DIM=64 INPUT_BF16=1 KEY_REUSE=1 KV_LAYOUT_HND=0 OUT_TYPE=1 PAGED=0 ROPE_STYLE=2 VALUE_DIM=64", launch.Defines);
        Assert.Equal(new Dim3(2 * 2 * 8), launch.Grid);
        ulong[] pointers = [query.Pointer, keys.Pointer, 0, lengths.Lengths.Pointer, 0, positions.Pointer, slopes.Pointer, output.Pointer, 0, 0, 0];
        Assert.Equal(pointers, launch.Arguments[..11]);
        ulong[] shape = [2, 16, 16, 2, 1, 2, 50, 0, 0, Bits(0.5f), 0, 0, 0, 32, Bits(500000f), 1, 1, 8];
        Assert.Equal(shape, launch.Arguments[11..29]);
        Assert.Equal((ulong)launch.SharedBytes, launch.Arguments[29]);
    }

    [Fact]
    public void EmptyOptionalSpans_ReachTheKernelAsNull()
    {
        // Zero-length allocations still have an address; the kernel reads a non-null pointer as "present", so the
        // wrapper must pass null for every optional input the spec does not use, whatever span it was handed.
        var spec = new DecodeAttentionSpec(1, 1, 4, 1, 64, KvCacheShape.Contiguous(8)) { KeyReuse = true };
        using var query = _device.Allocate<Half>(spec.QueryElements);
        using var keys = _device.Allocate<Half>(spec.KeyElements);
        using var output = _device.Allocate<Half>(spec.OutputElements);
        using var none = _device.Allocate<Half>(0);
        using var noLse = _device.Allocate<float>(0);
        using var noPositions = _device.Allocate<int>(0);
        using var noSlopes = _device.Allocate<float>(0);
        using var lengths = new DeviceSequenceLengths(_device, 1);
        lengths.Update([8], 8);
        Assert.NotEqual(0ul, noPositions.Span.Pointer);
        _ops.Run(spec, query.Span, keys.Span, none.Span, lengths, output.Span, noLse.Span, positions: noPositions.Span, alibiSlopes: noSlopes.Span);

        var launch = Assert.Single(_backend.Launches);
        ulong[] pointers = [query.Pointer, keys.Pointer, 0, lengths.Lengths.Pointer, 0, 0, 0, output.Pointer, 0, 0, 0];
        Assert.Equal(pointers, launch.Arguments[..11]);
    }

    [Fact]
    public void PlanSplits_FillsTheGpuWithChunksOfAtLeast256Tokens()
    {
        var spec = new DecodeAttentionSpec(1, 1, 32, 8, 128, KvCacheShape.Paged(4096, 16, 2048));
        // 8 CTAs against 132 SMs × 3: split to fill (⌈396 / 8⌉ = 50), since 32768 tokens allow 128 chunks of 256.
        Assert.Equal(50, _ops.PlanSplits(spec, 32768));
        // Short rows: chunks of 256 tokens bound the count.
        Assert.Equal(1, _ops.PlanSplits(spec, 300));
        Assert.Equal(3, _ops.PlanSplits(spec, 800));
        // A window bounds the tokens a row can see.
        Assert.Equal(3, _ops.PlanSplits(spec with { Window = 1000, Sinks = 4 }, 32768));
        // Enough CTAs already (64 · 8 = 512 ≥ 0.8 · 396): no split.
        Assert.Equal(1, _ops.PlanSplits(spec with { BatchSize = 64 }, 32768));
        // Many row tiles count as CTAs too: 16 query tokens × 128 heads = 2048 rows = 128 tiles per KV head on the CUDA
        // cores; the tensor-core kernel (the default for so many rows) holds 64 rows per CTA: 4 · 32 = 128 CTAs against
        // 132 SMs × 2, so it splits in 3.
        var manyRows = new DecodeAttentionSpec(1, 16, 512, 4, 128, KvCacheShape.Paged(4096, 16, 2048));
        Assert.Equal(3, _ops.PlanSplits(manyRows, 32768));
        _ops.KernelChoice = DecodeKernelChoice.CudaCores;
        Assert.Equal(1, _ops.PlanSplits(manyRows, 32768));
        _ops.KernelChoice = DecodeKernelChoice.Auto;
        // A cap on the plan, and the spec's override.
        Assert.Equal(DecodeAttentionKernels.MaxPlannedSplits, _ops.PlanSplits(spec with { NumQueryHeads = 1, NumKvHeads = 1 }, 1 << 20));
        Assert.Equal(5, _ops.PlanSplits(spec with { Splits = 5 }, 10));
        Assert.Equal(1, _ops.PlanSplits(spec with { BatchSize = 0 }, 0));
        Assert.Throws<ArgumentException>("spec", () => _ops.PlanSplits(spec with { QueryLength = 0 }, 10));
        Assert.Empty(_backend.Launches);
    }

    [Fact]
    public void SplitRun_LaunchesDecodeIntoTheWorkspace_ThenTheMerge()
    {
        var spec = new DecodeAttentionSpec(1, 1, 4, 1, 256, KvCacheShape.Contiguous(4096)) { InputType = AttentionElement.Float16, OutputType = AttentionElement.Float16 };
        using var query = _device.Allocate<Half>(spec.QueryElements);
        using var keys = _device.Allocate<Half>(spec.KeyElements);
        using var values = _device.Allocate<Half>(spec.ValueElements);
        using var output = _device.Allocate<Half>(spec.OutputElements);
        using var lse = _device.Allocate<float>(spec.LseElements);
        using var lengths = new DeviceSequenceLengths(_device, 1);
        lengths.Update([4096], 4096);
        using var workspace = new DecodeAttentionWorkspace(_device, 8, 256, maxSplits: 6);
        // The heuristic wants 16 splits (4096 / 256): the workspace holds 6.
        Assert.Equal(16, _ops.PlanSplits(spec, 4096));
        Assert.Equal(6, _ops.PlanSplits(spec, 4096, workspace));
        Assert.Equal(1, _ops.PlanSplits(spec, 4096, null));
        _ops.Run(spec, query.Span, keys.Span, values.Span, lengths, output.Span, lse.Span, workspace);

        Assert.Equal(2, _backend.Launches.Count);
        var decode = _backend.Launches[0];
        Assert.Equal(new Dim3(6), decode.Grid);
        Assert.Equal<ulong>([output.Pointer, lse.Pointer, workspace.PartialOutput.Pointer, workspace.PartialLse.Pointer], decode.Arguments[7..11]);
        Assert.Equal<ulong>([6, 4, 1], decode.Arguments[26..29]);   // splits, token streams (4 rows), row tiles
        var merge = _backend.Launches[1];
        Assert.Equal("attention_merge_splits", merge.Kernel);
        Assert.Equal(decode.Defines, merge.Defines);
        Assert.Equal(256u, merge.Block.X);
        Assert.Equal<ulong>([workspace.PartialOutput.Pointer, workspace.PartialLse.Pointer, output.Pointer, lse.Pointer, 4, 256, 6], merge.Arguments);

        // A forced count is clamped to the workspace too; without a workspace there is one split.
        _backend.Launches.Clear();
        _ops.Run(spec with { Splits = 2 }, query.Span, keys.Span, values.Span, lengths, output.Span, default, workspace);
        Assert.Equal(2, _backend.Launches.Count);
        Assert.Equal(2ul, _backend.Launches[0].Arguments[26]);
        Assert.Equal(0ul, _backend.Launches[1].Arguments[3]);   // no LSE wanted
        _backend.Launches.Clear();
        _ops.Run(spec, query.Span, keys.Span, values.Span, lengths, output.Span);
        Assert.Equal(1ul, Assert.Single(_backend.Launches).Arguments[26]);
    }

    [Fact]
    public void MergeStates_LaunchesOneWarpPerRow_FromTheShippedModuleOfItsType()
    {
        var spec = new MergeStatesSpec(100, 130);
        using var a = _device.Allocate<float>(spec.Elements);
        using var b = _device.Allocate<float>(spec.Elements);
        using var la = _device.Allocate<float>(100);
        using var lb = _device.Allocate<float>(100);
        _ops.MergeStates(spec, a.Span, la.Span, b.Span, lb.Span, a.Span, la.Span);
        var launch = Assert.Single(_backend.Launches);
        Assert.Equal("attention_merge_states", launch.Kernel);
        Assert.Contains(DecodeAttentionKernels.Specializations, s => s.Defines == launch.Defines);
        Assert.Contains("OUT_TYPE=2", launch.Defines, StringComparison.Ordinal);
        Assert.Equal(new Dim3(13), launch.Grid);   // 100 rows / 8 warps per block
        Assert.Equal<ulong>([a.Pointer, la.Pointer, b.Pointer, lb.Pointer, a.Pointer, la.Pointer, 100, 130], launch.Arguments);
    }

    [Fact]
    public void EmptyBatch_LaunchesNothing_AllEmptyRowsStillLaunch()
    {
        var spec = new DecodeAttentionSpec(0, 1, 4, 1, 128, KvCacheShape.Contiguous(16));
        using var lengths = new DeviceSequenceLengths(_device, 2);
        lengths.Update([], 16);
        _ops.Run<Half, Half>(spec, default, default, default, lengths, default);
        Assert.Empty(_backend.Launches);

        // Rows of length 0 are written by the kernel (zeros, −∞), so the launch happens.
        spec = spec with { BatchSize = 2 };
        using var query = _device.Allocate<Half>(spec.QueryElements);
        using var keys = _device.Allocate<Half>(spec.KeyElements);
        using var values = _device.Allocate<Half>(spec.ValueElements);
        using var output = _device.Allocate<Half>(spec.OutputElements);
        lengths.Update([0, 0], 16);
        _ops.Run(spec, query.Span, keys.Span, values.Span, lengths, output.Span);
        Assert.Single(_backend.Launches);
    }
}
