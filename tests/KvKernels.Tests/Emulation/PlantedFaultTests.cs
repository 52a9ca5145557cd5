using KvKernels.Compilation;
using KvKernels.Cuda;
using KvKernels.Emulation;

namespace KvKernels.Tests.Emulation;

/// <summary>
/// The emulator's safety net, proved with faults planted in test-only kernels: an out-of-bounds write and a
/// barrier problem are reported as failures, never passed. Each fault kernel has a correct twin that must pass,
/// so the tests cannot succeed by the emulator failing everything.
/// </summary>
public sealed class PlantedFaultTests(Backends backends)
{
    private const string Source = """
        #include "common/kvk_types.cuh"

        // Writes out[0..n]: one element past the end when `overrun` is set.
        extern "C" __global__ void planted_bounds(float* out, int n, int overrun)
        {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n + overrun) out[i] = 1.0f + i;
        }

        // Reverses a 64-element tile through shared memory. Without the barrier (withBarrier = 0) a thread reads its
        // partner's slot before the partner wrote it: a race the GPU may hide and the emulator exposes.
        extern "C" __global__ void planted_race(float* out, const float* in, int withBarrier)
        {
            __shared__ float tile[64];
            tile[threadIdx.x] = in[threadIdx.x];
            if (withBarrier) __syncthreads();
            out[threadIdx.x] = tile[63 - threadIdx.x];
        }

        // Only the first half of the block reaches the barrier: on a GPU a hang or undefined behaviour.
        extern "C" __global__ void planted_divergent_barrier(float* out, int divergent)
        {
            __shared__ float tile[64];
            tile[threadIdx.x] = (float)threadIdx.x;
            if (!divergent || threadIdx.x < 32) __syncthreads();
            out[threadIdx.x] = tile[63 - threadIdx.x];
        }
        """;

    private static readonly KernelSpecialization Planted = KernelSpecialization.FromText("tests/planted_faults.cu", Source);

    private CudaDevice Emulated() => backends.Get("emulated");

    [Fact]
    public void OutOfBoundsWrite_IsReportedNamingTheKernel_AndTheInBoundsTwinPasses()
    {
        var device = Emulated();
        var kernel = device.LoadModule(Planted).GetKernel("planted_bounds");
        using var output = device.Allocate<float>(1000);

        Launch(kernel, output, overrun: 0);
        var values = output.ToArray();
        Assert.Equal(1.0f, values[0]);
        Assert.Equal(1000.0f, values[999]);

        var e = Assert.Throws<EmulatorException>(() => Launch(kernel, output, overrun: 1));
        Assert.Equal("planted_bounds", e.Kernel);
        Assert.Contains("planted_bounds", e.Message);
        Assert.Matches("(?i)out of bounds|past the end|guard|canary", e.Message);
    }

    private static void Launch(CudaKernel kernel, DeviceMemory<float> output, int overrun)
    {
        var args = new KernelArguments();
        args.Add(output.Span);
        args.Add((int)output.Length);
        args.Add(overrun);
        kernel.Launch(new Dim3(4), 256, 0, null, ref args);
    }

    [Fact]
    public void MissingBarrier_GivesAWrongResult_ThatTheComparisonCatches()
    {
        var device = Emulated();
        var kernel = device.LoadModule(Planted).GetKernel("planted_race");
        var input = Enumerable.Range(0, 64).Select(i => (float)i * 3 + 1).ToArray();
        var expected = input.Reverse().ToArray();
        using var dIn = device.Allocate<float>(input);
        using var dOut = device.Allocate<float>(64);

        float[] Run(int withBarrier)
        {
            dOut.Span.FillBytes(0);
            var args = new KernelArguments();
            args.Add(dOut.Span);
            args.Add(dIn.Span);
            args.Add(withBarrier);
            kernel.Launch(1, 64, 0, null, ref args);
            return dOut.ToArray();
        }

        Assert.Equal(expected, Run(withBarrier: 1));
        Assert.NotEqual(expected, Run(withBarrier: 0));
    }

    [Fact]
    public void BarrierNotReachedByEveryThread_IsReportedNamingTheKernel()
    {
        var device = Emulated();
        var kernel = device.LoadModule(Planted).GetKernel("planted_divergent_barrier");
        using var output = device.Allocate<float>(64);

        void Run(int divergent)
        {
            var args = new KernelArguments();
            args.Add(output.Span);
            args.Add(divergent);
            kernel.Launch(1, 64, 0, null, ref args);
        }

        Run(divergent: 0);
        Assert.Equal(Enumerable.Range(0, 64).Select(i => (float)(63 - i)).ToArray(), output.ToArray());
        var e = Assert.Throws<EmulatorException>(() => Run(divergent: 1));
        Assert.Equal("planted_divergent_barrier", e.Kernel);
        Assert.Contains("planted_divergent_barrier", e.Message);
    }

    [Fact]
    public void SharedMemoryAboveTheDeviceLimit_IsRefused()
    {
        var device = Emulated();
        var kernel = device.LoadModule(Planted).GetKernel("planted_bounds");
        using var output = device.Allocate<float>(16);
        void Run(int sharedBytes)
        {
            var args = new KernelArguments();
            args.Add(output.Span);
            args.Add(16);
            args.Add(0);
            kernel.Launch(1, 16, sharedBytes, null, ref args);
        }

        int limit = device.Info.SharedMemoryPerBlockOptin;
        Run(limit - 4096);
        // Over the device limit by itself: the launcher refuses it before any device call.
        Assert.Throws<ArgumentException>("sharedBytes", () => Run(limit + 1));
        // Within the limit alone, but not with the library's static __shared__ arrays: the emulator refuses it.
        var e = Assert.Throws<EmulatorException>(() => Run(limit));
        Assert.Contains("shared memory", e.Message);
    }
}
