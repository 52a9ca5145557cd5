using KvKernels.Compilation;

namespace KvKernels.Tests.Common;

/// <summary>
/// The helper test kernels (which call every helper of kvk_fp8 / kvk_math / kvk_mma / kvk_async) compile with NVRTC for
/// every target the library supports, without spills or stack, and the arch gates pick the intended PTX: hardware fp8
/// cvt on sm_89 and newer, the software path (no fp8 instruction at all) on sm_80. Needs libnvrtc, not a GPU.
/// </summary>
public sealed class CommonCompileGateTests
{
    private static readonly KernelCompiler Compiler = new(cacheDirectory: null);

    public static TheoryData<string> Archs => new(["sm_80", "sm_89", "sm_90", "sm_90a"]);

    [Theory]
    [MemberData(nameof(Archs))]
    public void HelperKernels_CompileWithoutSpills(string arch)
    {
        TestEnvironment.RequireNvrtc();
        var compiled = Compiler.Compile(CommonKernels.Specialization, arch);
        Assert.True(compiled.IsCubin, $"expected SASS for {arch}, got PTX for {compiled.Arch}");
        Assert.Equal(arch, compiled.Arch);
        foreach (var name in CommonKernels.EntryPoints)
        {
            var resources = Assert.Single(compiled.Resources, r => r.Kernel == name);
            Assert.False(resources.Spills, $"{name} on {arch} spills {resources.SpillStoreBytes} B stores / {resources.SpillLoadBytes} B loads");
            Assert.Equal(0, resources.StackFrameBytes);
            Assert.InRange(resources.Registers, 1, 255);
            TestContext.Current.TestOutputHelper?.WriteLine($"{arch} {name}: {resources.Registers} registers, {resources.SharedBytes} B smem");
        }
    }

    private static string Ptx(string computeArch)
    {
        var spec = CommonKernels.Specialization;
        var output = Nvrtc.Compile(spec.Source, CommonKernels.Source, KernelSources.Headers,
            [$"--gpu-architecture={computeArch}", "-std=c++17", "-DKVK_NVRTC=1"], cubin: false);
        return System.Text.Encoding.UTF8.GetString(output.Binary).TrimEnd('\0');
    }

    [Fact]
    public void ArchGates_SelectHardwareFp8OnSm89AndUp_AndSoftwareOnSm80()
    {
        TestEnvironment.RequireNvrtc();
        string[] everywhere =
        [
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "movmatrix.sync.aligned.m8n8.trans.b16",
            "cp.async.ca.shared.global", "cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 2",
            "cp.async.wait_all", "ex2.approx.ftz.f32", "lg2.approx.ftz.f32", "rcp.approx.ftz.f32", "mul.rn.f16x2",
        ];
        string[] fp8 =
        [
            "cvt.rn.satfinite.e4m3x2.f32", "cvt.rn.satfinite.e5m2x2.f32", "cvt.rn.f16x2.e4m3x2", "cvt.rn.f16x2.e5m2x2",
        ];
        string sm80 = Ptx("compute_80"), sm89 = Ptx("compute_89"), sm90 = Ptx("compute_90");
        foreach (var instruction in everywhere)
        {
            Assert.Contains(instruction, sm80);
            Assert.Contains(instruction, sm89);
            Assert.Contains(instruction, sm90);
        }
        foreach (var instruction in fp8)
        {
            Assert.Contains(instruction, sm89);
            Assert.Contains(instruction, sm90);
        }
        Assert.DoesNotContain("e4m3", sm80);
        Assert.DoesNotContain("e5m2", sm80);
    }
}
