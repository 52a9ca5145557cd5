using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Tests.Compilation;

/// <summary>
/// Every shipped specialization compiles with NVRTC for sm_80, sm_89 and sm_90, with zero spills and every entry
/// point the library launches. Needs libnvrtc, not a GPU; in CI a missing NVRTC fails these tests.
/// </summary>
public sealed class CompileGateTests
{
    private static readonly KernelCompiler Compiler = new(cacheDirectory: null);

    public static TheoryData<int, string> Cases
    {
        get
        {
            var data = new TheoryData<int, string>();
            for (int i = 0; i < KernelCatalog.Entries.Count; i++)
                foreach (var arch in KernelCatalog.GateArchs) data.Add(i, arch);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void ShippedSpecialization_CompilesWithoutSpills(int entryIndex, string arch)
    {
        TestEnvironment.RequireNvrtc();
        var entry = KernelCatalog.Entries[entryIndex];
        var compiled = Compiler.Compile(entry.Specialization, arch);

        Assert.True(compiled.IsCubin, $"expected SASS for {arch}, got PTX for {compiled.Arch}");
        Assert.Equal(arch, compiled.Arch);
        Assert.NotEmpty(compiled.Binary);
        foreach (var name in entry.EntryPoints)
        {
            var resources = Assert.Single(compiled.Resources, r => r.Kernel == name);
            Assert.Equal(arch, resources.Arch);
            Assert.False(resources.Spills, $"{name} [{entry.Specialization.Defines}] on {arch} spills {resources.SpillStoreBytes} B stores / {resources.SpillLoadBytes} B loads");
            Assert.Equal(0, resources.StackFrameBytes);
            Assert.InRange(resources.Registers, 1, 255);
        }
    }

    [Fact]
    public void CompileError_ThrowsNvrtcExceptionWithTheLog()
    {
        TestEnvironment.RequireNvrtc();
        var e = Assert.Throws<NvrtcException>(() => Nvrtc.Compile("broken.cu",
            "extern \"C\" __global__ void k(int* p) { p[0] = undefined_name; }", [], ["--gpu-architecture=sm_80"], cubin: true));
        Assert.Equal(KvKernels.Cuda.Interop.nvrtcResult.NVRTC_ERROR_COMPILATION, e.Result);
        Assert.Contains("undefined_name", e.Log);
        Assert.Contains("undefined_name", e.Message);
    }

    [Fact]
    public void NvrtcProbe_ReportsVersionAndTargets()
    {
        TestEnvironment.RequireNvrtc();
        Assert.NotNull(Nvrtc.Version);
        Assert.True(Nvrtc.Version!.Major >= 12);
        Assert.Contains(80, Nvrtc.SupportedArchs);
        Assert.Contains(90, Nvrtc.SupportedArchs);
        Assert.False(string.IsNullOrEmpty(Nvrtc.LibraryPath));
    }

    [Fact]
    public void HeadersAreEmbedded_AndEveryKernelSourceIsInTheCatalog()
    {
        Assert.Contains(KernelSources.Headers, h => h.Key.StartsWith("common/", StringComparison.Ordinal));
        var cataloged = KernelCatalog.Entries.Select(e => e.Specialization.Source).ToHashSet();
        foreach (var path in KernelSources.Paths.Where(p => p.EndsWith(".cu", StringComparison.Ordinal) && !p.StartsWith("emulation/", StringComparison.Ordinal)))
            Assert.Contains(path, cataloged);
    }

    [Fact]
    public void ResourceReport_ParsesPtxasLines()
    {
        const string log = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function 'paging_gather' for 'sm_90'
            ptxas info    : Function properties for paging_gather
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 40 registers
            ptxas info    : Compiling entry function 'attn' for 'sm_80'
            ptxas info    : Function properties for helper
            ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Function properties for attn
            ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
            ptxas info    : Used 255 registers, 16384 bytes smem, 380 bytes cmem[0]
            """;
        var report = ResourceReport.Parse(log);
        Assert.Equal(2, report.Count);
        Assert.Equal(new KernelResources("paging_gather", "sm_90", 40, 0, 0, 0, 0), report[0]);
        Assert.Equal(new KernelResources("attn", "sm_80", 255, 8, 12, 24, 16384), report[1]);
        Assert.True(report[1].Spills);
    }

    [Fact]
    public void Specialization_IsCanonicalAndValidated()
    {
        var a = KernelSpecialization.Create(KvKernels.Paging.PagedKvKernels.Source, ("VEC_BYTES", 16), ("KV_LAYOUT_HND", 0));
        var b = KernelSpecialization.Create(KvKernels.Paging.PagedKvKernels.Source, ("KV_LAYOUT_HND", 0), ("VEC_BYTES", 16));
        Assert.Equal(a, b);
        Assert.Equal("KV_LAYOUT_HND=0 VEC_BYTES=16", a.Defines);
        Assert.Equal(["-DKV_LAYOUT_HND=0", "-DVEC_BYTES=16"], a.DefineOptions());
        Assert.Throws<ArgumentException>("source", () => KernelSpecialization.Create("nope/missing.cu"));
        Assert.Throws<ArgumentException>("macros", () => KernelSpecialization.Create(KvKernels.Paging.PagedKvKernels.Source, ("1BAD", 1)));
        Assert.Throws<ArgumentException>("macros", () => KernelSpecialization.Create(KvKernels.Paging.PagedKvKernels.Source, ("X", "a b")));
    }
}
