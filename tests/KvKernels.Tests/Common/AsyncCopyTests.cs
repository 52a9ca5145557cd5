using KvKernels.Cuda;

namespace KvKernels.Tests.Common;

/// <summary>
/// kvk_async.cuh: cp.async .ca 4/8/16 and .cg 16 with full copies (the form without src-size), src-size = cp-size,
/// partial src-size (the rest zero-filled) and src-size 0, in three commit groups read back after wait_group 2,
/// wait_group 1 and wait_all. The shared destination is pre-filled with 0xAB, so a missing zero fill shows.
/// </summary>
public sealed class AsyncCopyTests(Backends backends)
{
    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void CpAsync_CopiesAndZeroFills_VisibleAfterTheWait(string backend)
    {
        var device = backends.Get(backend);
        var kernel = device.LoadModule(CommonKernels.Specialization).GetKernel("kvk_test_cp_async");
        const int blocks = 2, threads = 64, total = blocks * threads;
        var random = new Random(16);
        var source = new byte[total * 48];
        random.NextBytes(source);
        for (int i = 0; i < source.Length; i++) source[i] |= 1;    // no zero bytes: zero fill must come from cp.async
        int[] copyBytes = [4, 8, 16, 16];
        int[] offsets = [0, 8, 16, 32];
        var sizes = new int[total * 4];
        for (int i = 0; i < total; i++)
            for (int k = 0; k < 4; k++)
                sizes[4 * i + k] = (i * (k + 3) + k) % (copyBytes[k] + 2) - 1;   // -1 (no src-size), 0 .. cp-size
        Assert.Contains(-1, sizes);
        Assert.Contains(0, sizes);

        using var dSource = device.Allocate<byte>(source);
        using var dSizes = device.Allocate<int>(sizes);
        using var dOut = device.Allocate<byte>(total * 48);
        var args = new KernelArguments();
        args.Add(dSource.Span);
        args.Add(dSizes.Span);
        args.Add(dOut.Span);
        kernel.Launch(blocks, threads, 0, null, ref args);
        var output = dOut.ToArray();

        for (int i = 0; i < total; i++)
        {
            var expected = new byte[48];
            for (int k = 0; k < 4; k++)
            {
                int n = sizes[4 * i + k] < 0 ? copyBytes[k] : sizes[4 * i + k];
                Array.Copy(source, 48 * i + offsets[k], expected, offsets[k], n);   // the rest stays 0
            }
            var got = output.AsSpan(48 * i, 48).ToArray();
            Assert.True(expected.AsSpan().SequenceEqual(got),
                $"thread {i} (sizes {string.Join(", ", sizes.AsSpan(4 * i, 4).ToArray())}): got {Convert.ToHexString(got)}, expected {Convert.ToHexString(expected)}");
        }
    }
}
