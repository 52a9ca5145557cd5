using KvKernels.Cuda;
using KvKernels.Paging;
using KvKernels.Tests.Oracles;

namespace KvCheck.Verification;

/// <summary>
/// The geometry of a pair of paged pools: element type, layout, page size, KV heads, head dim, and whether the cache
/// holds keys only. Shown as <c>Hkv=8 D=128 page=16 NHD fp16</c> (+ <c> keys-only</c>), the shape-string tail that
/// every KvCheck and peer row uses.
/// </summary>
internal sealed record PagingGeometry(ElementKind Type, KvLayout Layout, int PageSize, int Heads, int HeadDim, bool KeysOnly = false)
{
    public string Describe => $"Hkv={Heads} D={HeadDim} page={PageSize} {(Layout == KvLayout.Nhd ? "NHD" : "HND")} {Type.Name()}{(KeysOnly ? " keys-only" : "")}";

    public PagedKvLayout Pool(int numPages) => new(numPages, PageSize, Heads, HeadDim, Layout);

    public bool Hnd => Layout == KvLayout.Hnd;

    /// <summary>The geometries every paging op is verified on: page sizes 1, 7, 16; Hkv 1, 3, 8; D 8, 64, 128, 576;
    /// fp16, bf16 and bytes; NHD and HND; keys-only twice.</summary>
    public static IReadOnlyList<PagingGeometry> Verified { get; } =
    [
        new(ElementKind.Fp16, KvLayout.Nhd, 16, 8, 128),
        new(ElementKind.Fp16, KvLayout.Hnd, 16, 8, 128),
        new(ElementKind.Bf16, KvLayout.Nhd, 7, 3, 64),
        new(ElementKind.Bf16, KvLayout.Hnd, 1, 1, 576),
        new(ElementKind.U8, KvLayout.Nhd, 1, 3, 8),
        new(ElementKind.U8, KvLayout.Hnd, 7, 8, 8),
        new(ElementKind.Fp16, KvLayout.Hnd, 7, 1, 576, KeysOnly: true),
        new(ElementKind.Bf16, KvLayout.Nhd, 16, 1, 8, KeysOnly: true),
        new(ElementKind.U8, KvLayout.Nhd, 16, 3, 64),
    ];
}

/// <summary>Append of <see cref="Tokens"/> tokens to random distinct slots; every <see cref="PadEvery"/>-th token is padding
/// (slot −1); <see cref="Strided"/> reads keys from a fused-QKV-like buffer (stride 3·Hkv·D) and values with stride Hkv·D + 8.</summary>
internal sealed record AppendShape(PagingGeometry Geometry, int Tokens, int PadEvery = 0, bool Strided = false) : VerificationShape
{
    public int NumPages => (Tokens + Geometry.PageSize - 1) / Geometry.PageSize + 2;
    public long KeyStride => Strided ? 3L * Geometry.Heads * Geometry.HeadDim : 0;
    public long ValueStride => Strided ? (long)Geometry.Heads * Geometry.HeadDim + 8 : 0;

    public override string Description =>
        $"T={Tokens}{(PadEvery > 0 ? $" pad=1/{PadEvery}" : "")}{(Strided ? $" kstride={KeyStride} vstride={ValueStride}" : "")} {Geometry.Describe}";
}

/// <summary>A batch for gather or scatter: sequence lengths, MaxTokens = longest + <see cref="ExtraTokens"/>, one spare
/// block-table column of −1; gather may leave padding untouched and may share every sequence's first page (prefix sharing).</summary>
internal sealed record BatchShape(PagingGeometry Geometry, int[] Lengths, int ExtraTokens = 3, bool ZeroFill = true, bool SharedPrefix = false)
    : VerificationShape
{
    public int BatchSize => Lengths.Length;
    public int MaxTokens => (Lengths.Length == 0 ? 0 : Lengths.Max()) + ExtraTokens;
    public int MaxPages => (MaxTokens + Geometry.PageSize - 1) / Geometry.PageSize + 1;
    public int PagesUsed => Lengths.Sum(l => (l + Geometry.PageSize - 1) / Geometry.PageSize);
    public int NumPages => PagesUsed + 3;

    public override string Description =>
        $"B={BatchSize} N=[{string.Join(',', Lengths)}] Nmax={MaxTokens} {Geometry.Describe}" +
        (ZeroFill ? "" : " no-zero-fill") + (SharedPrefix ? " shared-prefix" : "");

    /// <summary>Edge lengths: 0, 1, page − 1, page, page + 1, 3·page + 2.</summary>
    public static int[] Edge(int page) => [0, 1, page - 1, page, page + 1, 3 * page + 2];

    /// <summary>A ragged batch.</summary>
    public static int[] Ragged(int page) => [2 * page + 5, 1, 0, 5 * page - 1, 7];

    /// <summary>Block table <c>[B, MaxPages]</c> with random pages (distinct unless <see cref="SharedPrefix"/>) and −1 in unused columns.</summary>
    public int[] BlockTable(Random rng)
    {
        var pages = Permutation(NumPages, rng);
        var table = new int[BatchSize * MaxPages];
        Array.Fill(table, -1);
        int next = 0, shared = -1;
        for (int b = 0; b < BatchSize; b++)
        {
            int count = (Lengths[b] + Geometry.PageSize - 1) / Geometry.PageSize;
            for (int p = 0; p < count; p++)
            {
                if (p == 0 && SharedPrefix)
                {
                    if (shared < 0) shared = pages[next++];
                    table[b * MaxPages] = shared;
                    continue;
                }
                table[b * MaxPages + p] = pages[next++];
            }
        }
        return table;
    }

    internal static int[] Permutation(int n, Random rng)
    {
        var result = Enumerable.Range(0, n).ToArray();
        rng.Shuffle(result);
        return result;
    }
}

/// <summary>Page copy of <see cref="Pairs"/> random (source, destination) pairs with disjoint sources and destinations.</summary>
internal sealed record CopyPagesShape(PagingGeometry Geometry, int Pairs) : VerificationShape
{
    public int NumPages => 2 * Pairs + 3;

    public override string Description => $"pairs={Pairs} pages={NumPages} {Geometry.Describe}";

    public int[] PairList(Random rng)
    {
        var pages = BatchShape.Permutation(NumPages, rng);
        var pairs = new int[2 * Pairs];
        for (int i = 0; i < Pairs; i++)
        {
            pairs[2 * i] = pages[i];
            pairs[2 * i + 1] = pages[Pairs + i];
        }
        return pairs;
    }
}

/// <summary>The paging op family's verifications: append, gather, scatter, copy_pages.</summary>
internal static class PagingVerifications
{
    public static IReadOnlyList<IVerification> All { get; } =
        [new AppendVerification(), new GatherVerification(), new ScatterVerification(), new CopyPagesVerification()];

    internal static PagedKvKernels Kernels(GpuContext gpu) => gpu.Get(device => new PagedKvKernels(device));

    internal static T[] RandomArray<T>(long length, ElementKind kind, Random rng) where T : unmanaged
    {
        var array = new T[length];
        Elements.FillRandom<T>(array, kind, rng);
        return array;
    }

    internal static T[] PoisonedArray<T>(long length) where T : unmanaged
    {
        var array = new T[length];
        Elements.Poison<T>(array);
        return array;
    }

    /// <summary>Uploads <paramref name="data"/> (null: no buffer) to a new allocation.</summary>
    internal static DeviceMemory<T>? Upload<T>(CudaDevice device, T[]? data) where T : unmanaged =>
        data is null ? null : device.Allocate<T>(data);

    /// <summary>An allocation of <paramref name="length"/> elements filled with 0xFF bytes on <paramref name="stream"/>.</summary>
    internal static DeviceMemory<T> Poisoned<T>(CudaDevice device, long length, CudaStream stream) where T : unmanaged
    {
        var memory = device.Allocate<T>(length);
        memory.Span.FillBytes(0xFF, stream);
        return memory;
    }

    internal static DeviceSpan<T> SpanOf<T>(DeviceMemory<T>? memory) where T : unmanaged => memory is null ? default : memory.Span;

    internal static VerificationOutcome Compare<T>(string name, T[]? actual, T[]? expected, ElementKind kind) where T : unmanaged =>
        actual is null && expected is null ? VerificationOutcome.Empty : Comparison.Compare<T>(name, actual ?? [], expected ?? [], kind);

    /// <summary>
    /// The shape append and scatter share: upload the key/value sources, poison the device pools, run the op, and
    /// compare the pools with the CPU implementation's (<paramref name="expected"/>).
    /// </summary>
    internal static VerificationOutcome IntoPoisonedPools<T>(GpuContext gpu, T[] keys, T[]? values, long poolElements, ElementKind kind,
        Action<DeviceSpan<T>, DeviceSpan<T>, DeviceSpan<T>, DeviceSpan<T>> run, (T[] K, T[]? V) expected) where T : unmanaged
    {
        var device = gpu.Device;
        using var dKeys = device.Allocate<T>(keys);
        using var dValues = Upload(device, values);
        using var keyPool = Poisoned<T>(device, poolElements, gpu.Stream);
        using var valuePool = values is null ? null : Poisoned<T>(device, poolElements, gpu.Stream);
        run(dKeys.Span, SpanOf(dValues), keyPool.Span, SpanOf(valuePool));
        gpu.Stream.Synchronize();
        return Compare("keyPool", keyPool.ToArray(), expected.K, kind)
            .And(Compare("valuePool", valuePool?.ToArray(), expected.V, kind));
    }

    internal static VerificationOutcome Dispatch(ElementKind kind, Func<VerificationOutcome> fp16, Func<VerificationOutcome> bf16, Func<VerificationOutcome> u8) =>
        kind switch { ElementKind.Fp16 => fp16(), ElementKind.Bf16 => bf16(), _ => u8() };
}

internal sealed class AppendVerification() : Verification<AppendShape>("paging", "append", ShapeList())
{
    private static AppendShape[] ShapeList()
    {
        var g = PagingGeometry.Verified;
        return
        [
            new(g[0], 33, PadEvery: 5),
            new(g[1], 16),
            new(g[2], 8, Strided: true),
            new(g[3], 1),
            new(g[4], 0),
            new(g[5], 6, PadEvery: 3),
            new(g[6], 19, PadEvery: 4),
            new(g[7], 15, Strided: true),
            new(g[8], 111, PadEvery: 7),
            new(g[1], 5000, PadEvery: 11),
        ];
    }

    private sealed record Inputs<T>(PagedAppendSpec Spec, T[] Keys, T[]? Values, int[] Slots) where T : unmanaged;

    private static Inputs<T> Make<T>(AppendShape s, int seed) where T : unmanaged
    {
        var rng = new Random(seed);
        var g = s.Geometry;
        var pool = g.Pool(s.NumPages);
        var spec = new PagedAppendSpec(pool, s.Tokens, s.KeyStride, s.ValueStride);
        long Source(long stride) => s.Tokens == 0 ? 0 : (s.Tokens - 1) * stride + pool.TokenElements;
        var keys = PagingVerifications.RandomArray<T>(Source(spec.KeyStride), g.Type, rng);
        var values = g.KeysOnly ? null : PagingVerifications.RandomArray<T>(Source(spec.ValueStride), g.Type, rng);
        var slots = BatchShape.Permutation(checked((int)pool.Slots), rng)[..s.Tokens];
        if (s.PadEvery > 0)
            for (int t = s.PadEvery - 1; t < slots.Length; t += s.PadEvery) slots[t] = -1;
        return new Inputs<T>(spec, keys, values, slots);
    }

    /// <summary>The CPU implementation on pools poisoned with 0xFF (rows it must not touch keep the poison).</summary>
    private static (T[] K, T[]? V) Cpu<T>(Inputs<T> x, bool keysOnly) where T : unmanaged
    {
        long n = x.Spec.Pool.PoolElements;
        var k = PagingVerifications.PoisonedArray<T>(n);
        var v = keysOnly ? null : PagingVerifications.PoisonedArray<T>(n);
        PagedKvCache.Append(x.Spec, x.Keys, x.Values, x.Slots, k, v);
        return (k, v);
    }

    protected override VerificationOutcome RunCpu(AppendShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Cpu<Half>(s, seed), () => Cpu<ushort>(s, seed), () => Cpu<byte>(s, seed));

    private static VerificationOutcome Cpu<T>(AppendShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        var (k, v) = Cpu(x, g.KeysOnly);
        long n = x.Spec.Pool.PoolElements;
        var ok = PagingVerifications.PoisonedArray<T>(n);
        var ov = g.KeysOnly ? null : PagingVerifications.PoisonedArray<T>(n);
        PagingOracle.Append(g.Hnd, g.PageSize, g.Heads, g.HeadDim, x.Keys, x.Values, x.Spec.KeyStride, x.Spec.ValueStride, x.Slots, ok, ov);
        return PagingVerifications.Compare("keyPool", k, ok, g.Type).And(PagingVerifications.Compare("valuePool", v, ov, g.Type));
    }

    protected override VerificationOutcome RunGpu(GpuContext gpu, AppendShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Gpu<Half>(gpu, s, seed), () => Gpu<ushort>(gpu, s, seed), () => Gpu<byte>(gpu, s, seed));

    private static VerificationOutcome Gpu<T>(GpuContext gpu, AppendShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        using var slots = new DeviceSlotMapping(gpu.Device, Math.Max(s.Tokens, 1));
        slots.Update(x.Slots, x.Spec.Pool, gpu.Stream);
        return PagingVerifications.IntoPoisonedPools(gpu, x.Keys, x.Values, x.Spec.Pool.PoolElements, g.Type,
            (keys, values, keyPool, valuePool) => PagingVerifications.Kernels(gpu).Append(x.Spec, keys, values, slots, keyPool, valuePool, gpu.Stream),
            Cpu(x, g.KeysOnly));
    }
}

internal sealed class GatherVerification() : Verification<BatchShape>("paging", "gather", ShapeList())
{
    private static BatchShape[] ShapeList()
    {
        var g = PagingGeometry.Verified;
        return
        [
            new(g[0], BatchShape.Edge(g[0].PageSize)),
            new(g[1], BatchShape.Ragged(g[1].PageSize), ZeroFill: false),
            new(g[2], BatchShape.Edge(g[2].PageSize), ZeroFill: false, SharedPrefix: true),
            new(g[3], BatchShape.Ragged(g[3].PageSize), ExtraTokens: 0),
            new(g[4], BatchShape.Edge(g[4].PageSize)),
            new(g[5], BatchShape.Ragged(g[5].PageSize), ZeroFill: false, SharedPrefix: true),
            new(g[6], BatchShape.Edge(g[6].PageSize), ZeroFill: false),
            new(g[7], BatchShape.Ragged(g[7].PageSize)),
            new(g[8], BatchShape.Edge(g[8].PageSize), SharedPrefix: true),
            new(g[0], [], ExtraTokens: 4),
            new(g[1], [0, 0], ExtraTokens: 2),
            new(g[0], [2049, 4096, 1], ExtraTokens: 4), // > 8 MiB: the CPU implementation's parallel path
            new(g[1], [4095, 17, 3000], ExtraTokens: 5, ZeroFill: false),
        ];
    }

    private sealed record Inputs<T>(PagedBatchSpec Spec, T[] KeyPool, T[]? ValuePool, int[] Table, int[] Lengths) where T : unmanaged;

    private static Inputs<T> Make<T>(BatchShape s, int seed) where T : unmanaged
    {
        var rng = new Random(seed);
        var g = s.Geometry;
        var pool = g.Pool(s.NumPages);
        var spec = new PagedBatchSpec(pool, s.BatchSize, s.MaxPages, s.MaxTokens, s.ZeroFill);
        var keyPool = PagingVerifications.RandomArray<T>(pool.PoolElements, g.Type, rng);
        var valuePool = g.KeysOnly ? null : PagingVerifications.RandomArray<T>(pool.PoolElements, g.Type, rng);
        return new Inputs<T>(spec, keyPool, valuePool, s.BlockTable(rng), s.Lengths.ToArray());
    }

    /// <summary>The CPU implementation into outputs poisoned with 0xFF (padding keeps it unless zero-filled).</summary>
    private static (T[] K, T[]? V) Cpu<T>(Inputs<T> x, bool keysOnly) where T : unmanaged
    {
        var k = PagingVerifications.PoisonedArray<T>(x.Spec.ContiguousElements);
        var v = keysOnly ? null : PagingVerifications.PoisonedArray<T>(x.Spec.ContiguousElements);
        PagedKvCache.Gather(x.Spec, x.KeyPool, x.ValuePool, x.Table, x.Lengths, k, v);
        return (k, v);
    }

    protected override VerificationOutcome RunCpu(BatchShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Cpu<Half>(s, seed), () => Cpu<ushort>(s, seed), () => Cpu<byte>(s, seed));

    private static VerificationOutcome Cpu<T>(BatchShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        var (k, v) = Cpu(x, g.KeysOnly);
        var ok = PagingVerifications.PoisonedArray<T>(x.Spec.ContiguousElements);
        PagingOracle.Gather(g.Hnd, g.PageSize, g.Heads, g.HeadDim, s.MaxPages, s.MaxTokens, s.ZeroFill, x.KeyPool, x.Table, x.Lengths, ok);
        T[]? ov = null;
        if (x.ValuePool is not null)
        {
            ov = PagingVerifications.PoisonedArray<T>(x.Spec.ContiguousElements);
            PagingOracle.Gather(g.Hnd, g.PageSize, g.Heads, g.HeadDim, s.MaxPages, s.MaxTokens, s.ZeroFill, x.ValuePool, x.Table, x.Lengths, ov);
        }
        return PagingVerifications.Compare("keys", k, ok, g.Type).And(PagingVerifications.Compare("values", v, ov, g.Type));
    }

    protected override VerificationOutcome RunGpu(GpuContext gpu, BatchShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Gpu<Half>(gpu, s, seed), () => Gpu<ushort>(gpu, s, seed), () => Gpu<byte>(gpu, s, seed));

    private static VerificationOutcome Gpu<T>(GpuContext gpu, BatchShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        var device = gpu.Device;
        var stream = gpu.Stream;
        using var keyPool = device.Allocate<T>(x.KeyPool);
        using var valuePool = PagingVerifications.Upload(device, x.ValuePool);
        using var keys = PagingVerifications.Poisoned<T>(device, x.Spec.ContiguousElements, stream);
        using var values = g.KeysOnly ? null : PagingVerifications.Poisoned<T>(device, x.Spec.ContiguousElements, stream);
        using var table = new DeviceBlockTable(device, s.BatchSize, s.MaxPages);
        table.Update(x.Table, x.Lengths, x.Spec.Pool, stream);
        PagingVerifications.Kernels(gpu).Gather(x.Spec, keyPool.Span, PagingVerifications.SpanOf(valuePool), table,
            keys.Span, PagingVerifications.SpanOf(values), stream);
        stream.Synchronize();
        var gk = keys.ToArray();
        var gv = values?.ToArray();
        var (k, v) = Cpu(x, g.KeysOnly);
        var outcome = PagingVerifications.Compare("keys", gk, k, g.Type).And(PagingVerifications.Compare("values", gv, v, g.Type));
        if (!s.ZeroFill)
        {
            // Padding rows must still hold the 0xFF poison: the kernel may not write past a sequence's length.
            if (FirstUnpoisoned(gk, s) is { } where) outcome = outcome.WithFailure("keys padding lost its poison at " + where);
            if (gv is not null && FirstUnpoisoned(gv, s) is { } whereV) outcome = outcome.WithFailure("values padding lost its poison at " + whereV);
        }
        return outcome;
    }

    private static string? FirstUnpoisoned<T>(T[] output, BatchShape s) where T : unmanaged
    {
        int tokenElements = s.Geometry.Heads * s.Geometry.HeadDim;
        for (int b = 0; b < s.BatchSize; b++)
        {
            long start = ((long)b * s.MaxTokens + s.Lengths[b]) * tokenElements;
            long count = (long)(s.MaxTokens - s.Lengths[b]) * tokenElements;
            var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(output.AsSpan((int)start, (int)count));
            int i = bytes.IndexOfAnyExcept((byte)0xFF);
            if (i >= 0) return $"sequence {b}, element {start + i / Elements.Size<T>()}";
        }
        return null;
    }
}

internal sealed class ScatterVerification() : Verification<BatchShape>("paging", "scatter", ShapeList())
{
    private static BatchShape[] ShapeList()
    {
        var g = PagingGeometry.Verified;
        return
        [
            new(g[0], BatchShape.Edge(g[0].PageSize)),
            new(g[1], BatchShape.Ragged(g[1].PageSize)),
            new(g[2], BatchShape.Edge(g[2].PageSize)),
            new(g[3], BatchShape.Ragged(g[3].PageSize), ExtraTokens: 0),
            new(g[4], BatchShape.Edge(g[4].PageSize)),
            new(g[5], BatchShape.Ragged(g[5].PageSize)),
            new(g[6], BatchShape.Edge(g[6].PageSize)),
            new(g[7], BatchShape.Ragged(g[7].PageSize)),
            new(g[8], BatchShape.Edge(g[8].PageSize)),
            new(g[0], [], ExtraTokens: 4),
            new(g[1], [2049, 4096, 1], ExtraTokens: 4), // > 8 MiB: the CPU implementation's parallel path
        ];
    }

    private sealed record Inputs<T>(PagedBatchSpec Spec, T[] Keys, T[]? Values, int[] Table, int[] Lengths) where T : unmanaged;

    private static Inputs<T> Make<T>(BatchShape s, int seed) where T : unmanaged
    {
        var rng = new Random(seed);
        var g = s.Geometry;
        var spec = new PagedBatchSpec(g.Pool(s.NumPages), s.BatchSize, s.MaxPages, s.MaxTokens);
        var keys = PagingVerifications.RandomArray<T>(spec.ContiguousElements, g.Type, rng);
        var values = g.KeysOnly ? null : PagingVerifications.RandomArray<T>(spec.ContiguousElements, g.Type, rng);
        return new Inputs<T>(spec, keys, values, s.BlockTable(rng), s.Lengths.ToArray());
    }

    /// <summary>The CPU implementation into pools poisoned with 0xFF (rows of no token keep the poison).</summary>
    private static (T[] K, T[]? V) Cpu<T>(Inputs<T> x, bool keysOnly) where T : unmanaged
    {
        long n = x.Spec.Pool.PoolElements;
        var k = PagingVerifications.PoisonedArray<T>(n);
        var v = keysOnly ? null : PagingVerifications.PoisonedArray<T>(n);
        PagedKvCache.Scatter(x.Spec, x.Keys, x.Values, x.Table, x.Lengths, k, v);
        return (k, v);
    }

    protected override VerificationOutcome RunCpu(BatchShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Cpu<Half>(s, seed), () => Cpu<ushort>(s, seed), () => Cpu<byte>(s, seed));

    private static VerificationOutcome Cpu<T>(BatchShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        var (k, v) = Cpu(x, g.KeysOnly);
        long n = x.Spec.Pool.PoolElements;
        var ok = PagingVerifications.PoisonedArray<T>(n);
        PagingOracle.Scatter(g.Hnd, g.PageSize, g.Heads, g.HeadDim, s.MaxPages, s.MaxTokens, x.Keys, x.Table, x.Lengths, ok);
        T[]? ov = null;
        if (x.Values is not null)
        {
            ov = PagingVerifications.PoisonedArray<T>(n);
            PagingOracle.Scatter(g.Hnd, g.PageSize, g.Heads, g.HeadDim, s.MaxPages, s.MaxTokens, x.Values, x.Table, x.Lengths, ov);
        }
        return PagingVerifications.Compare("keyPool", k, ok, g.Type).And(PagingVerifications.Compare("valuePool", v, ov, g.Type));
    }

    protected override VerificationOutcome RunGpu(GpuContext gpu, BatchShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Gpu<Half>(gpu, s, seed), () => Gpu<ushort>(gpu, s, seed), () => Gpu<byte>(gpu, s, seed));

    private static VerificationOutcome Gpu<T>(GpuContext gpu, BatchShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        using var table = new DeviceBlockTable(gpu.Device, s.BatchSize, s.MaxPages);
        table.Update(x.Table, x.Lengths, x.Spec.Pool, gpu.Stream);
        return PagingVerifications.IntoPoisonedPools(gpu, x.Keys, x.Values, x.Spec.Pool.PoolElements, g.Type,
            (keys, values, keyPool, valuePool) => PagingVerifications.Kernels(gpu).Scatter(x.Spec, keys, values, table, keyPool, valuePool, gpu.Stream),
            Cpu(x, g.KeysOnly));
    }
}

internal sealed class CopyPagesVerification() : Verification<CopyPagesShape>("paging", "copy_pages", ShapeList())
{
    private static CopyPagesShape[] ShapeList()
    {
        var g = PagingGeometry.Verified;
        int[] pairs = [4, 1, 9, 0, 3, 2, 5, 1, 6];
        return [.. g.Select((geometry, i) => new CopyPagesShape(geometry, pairs[i])), new CopyPagesShape(g[0], 300)];
    }

    private sealed record Inputs<T>(KvKernels.Paging.PagedKvLayout Pool, T[] KeyPool, T[]? ValuePool, int[] Pairs) where T : unmanaged;

    /// <summary>Random pools whose destination pages are poisoned with 0xFF, so a page the op does not copy keeps the poison.</summary>
    private static Inputs<T> Make<T>(CopyPagesShape s, int seed) where T : unmanaged
    {
        var rng = new Random(seed);
        var g = s.Geometry;
        var pool = g.Pool(s.NumPages);
        var keyPool = PagingVerifications.RandomArray<T>(pool.PoolElements, g.Type, rng);
        var valuePool = g.KeysOnly ? null : PagingVerifications.RandomArray<T>(pool.PoolElements, g.Type, rng);
        var pairs = s.PairList(rng);
        int page = (int)pool.PageElements;
        for (int i = 1; i < pairs.Length; i += 2)
        {
            Elements.Poison(keyPool.AsSpan(pairs[i] * page, page));
            if (valuePool is not null) Elements.Poison(valuePool.AsSpan(pairs[i] * page, page));
        }
        return new Inputs<T>(pool, keyPool, valuePool, pairs);
    }

    private static (T[] K, T[]? V) Cpu<T>(Inputs<T> x) where T : unmanaged
    {
        var k = x.KeyPool.ToArray();
        var v = x.ValuePool?.ToArray();
        PagedKvCache.CopyPages(x.Pool, x.Pairs, k, v);
        return (k, v);
    }

    protected override VerificationOutcome RunCpu(CopyPagesShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Cpu<Half>(s, seed), () => Cpu<ushort>(s, seed), () => Cpu<byte>(s, seed));

    private static VerificationOutcome Cpu<T>(CopyPagesShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        var (k, v) = Cpu(x);
        var ok = x.KeyPool.ToArray();
        PagingOracle.CopyPages((int)x.Pool.PageElements, x.Pairs, ok);
        var ov = x.ValuePool?.ToArray();
        if (ov is not null) PagingOracle.CopyPages((int)x.Pool.PageElements, x.Pairs, ov);
        return PagingVerifications.Compare("keyPool", k, ok, g.Type).And(PagingVerifications.Compare("valuePool", v, ov, g.Type));
    }

    protected override VerificationOutcome RunGpu(GpuContext gpu, CopyPagesShape s, int seed) =>
        PagingVerifications.Dispatch(s.Geometry.Type, () => Gpu<Half>(gpu, s, seed), () => Gpu<ushort>(gpu, s, seed), () => Gpu<byte>(gpu, s, seed));

    private static VerificationOutcome Gpu<T>(GpuContext gpu, CopyPagesShape s, int seed) where T : unmanaged
    {
        var g = s.Geometry;
        var x = Make<T>(s, seed);
        var device = gpu.Device;
        var stream = gpu.Stream;
        // The host arrays already carry the poisoned destination pages; poison them on the device as well, through
        // FillBytes on slices, so that the check does not depend on the upload alone.
        using var keyPool = device.Allocate<T>(x.KeyPool);
        using var valuePool = PagingVerifications.Upload(device, x.ValuePool);
        long page = x.Pool.PageElements;
        for (int i = 1; i < x.Pairs.Length; i += 2)
        {
            keyPool.Span.Slice(x.Pairs[i] * page, page).FillBytes(0xFF, stream);
            valuePool?.Span.Slice(x.Pairs[i] * page, page).FillBytes(0xFF, stream);
        }
        using var copies = new DevicePageCopies(device, Math.Max(s.Pairs, 1));
        copies.Update(x.Pairs, x.Pool, stream);
        PagingVerifications.Kernels(gpu).CopyPages(x.Pool, copies, keyPool.Span, PagingVerifications.SpanOf(valuePool), stream);
        stream.Synchronize();
        var (k, v) = Cpu(x);
        return PagingVerifications.Compare("keyPool", keyPool.ToArray(), k, g.Type)
            .And(PagingVerifications.Compare("valuePool", valuePool?.ToArray(), v, g.Type));
    }
}
