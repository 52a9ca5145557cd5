using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Emulation;

namespace KvKernels.Tests.Common;

/// <summary>
/// Misuse of the warp-collective and alignment-sensitive helpers is reported by the emulator (as a GPU would fault or
/// behave undefined), never passed: an ldmatrix row address that is not 16-byte aligned, an mma executed by half a warp,
/// a cp.async whose src-size exceeds its cp-size. The correct use of the same kernel passes, so the test cannot succeed
/// by the emulator failing everything. Emulator only (the faults are undefined behaviour on a GPU).
/// </summary>
public sealed class HelperMisuseTests(Backends backends)
{
    private const string Source = """
        #include "common/kvk_mma.cuh"
        #include "common/kvk_async.cuh"

        extern "C" __global__ __launch_bounds__(32) void kvk_planted_helper_misuse(const float* src, float* out, int fault)
        {
            __shared__ __align__(16) kvk_u16 tile[8 * 16];
            __shared__ __align__(16) float staged[32];
            const kvk_u32 lane = kvk_lane_id();
            for (kvk_u32 i = lane; i < 128; i += 32) tile[i] = (kvk_u16)(0x3C00u + i);   // f16 1.0 + small steps
            __syncwarp();
            kvk_u32 r[1];
            kvk_ldmatrix_x1(r, &tile[(lane % 8) * 16 + (fault == 1 ? 4 : 0)]);           // fault 1: 8 bytes off
            kvk_u32 a[4] = {r[0], r[0], r[0], r[0]}, b[2] = {r[0], r[0]};
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (fault != 2 || lane < 16) kvk_mma_m16n8k16_f16(d, a, b);                   // fault 2: half the warp
            kvk_cp_async_ca<4>(&staged[lane], &src[lane], fault == 3 ? 5u : 4u);          // fault 3: src-size 5 > 4
            kvk_cp_async_commit();
            kvk_cp_async_wait_all();
            out[lane] = d[0] + staged[lane];
        }
        """;

    private static readonly KernelSpecialization Planted = KernelSpecialization.FromText("tests/planted_helper_misuse.cu", Source);

    [Fact]
    public void Misuse_IsReportedNamingTheKernel_AndCorrectUsePasses()
    {
        var device = backends.Get("emulated");
        var kernel = device.LoadModule(Planted).GetKernel("kvk_planted_helper_misuse");
        using var src = device.Allocate<float>(Enumerable.Range(0, 32).Select(i => (float)i).ToArray());
        using var output = device.Allocate<float>(32);
        void Run(int fault)
        {
            var args = new KernelArguments();
            args.Add(src.Span);
            args.Add(output.Span);
            args.Add(fault);
            kernel.Launch(1, 32, 0, null, ref args);
        }

        Run(fault: 0);
        var values = output.ToArray();
        Assert.All(values, v => Assert.True(float.IsFinite(v) && v > 0, $"value {v}"));

        var misaligned = Assert.Throws<EmulatorException>(() => Run(fault: 1));
        Assert.Equal("kvk_planted_helper_misuse", misaligned.Kernel);
        Assert.Contains("ldmatrix", misaligned.Message);

        var halfWarp = Assert.Throws<EmulatorException>(() => Run(fault: 2));
        Assert.Equal("kvk_planted_helper_misuse", halfWarp.Kernel);

        var oversized = Assert.Throws<EmulatorException>(() => Run(fault: 3));
        Assert.Equal("kvk_planted_helper_misuse", oversized.Kernel);
        Assert.Contains("src-size", oversized.Message);

        TestContext.Current.TestOutputHelper?.WriteLine(misaligned.Message);
        TestContext.Current.TestOutputHelper?.WriteLine(halfWarp.Message);
        TestContext.Current.TestOutputHelper?.WriteLine(oversized.Message);
    }
}
