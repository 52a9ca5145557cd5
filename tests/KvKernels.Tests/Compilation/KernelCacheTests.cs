using KvKernels.Compilation;
using KvKernels.Paging;

namespace KvKernels.Tests.Compilation;

public sealed class KernelCacheTests : IDisposable
{
    private readonly string _directory = Path.Combine(Path.GetTempPath(), "kvk-cache-test-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_directory)) Directory.Delete(_directory, recursive: true);
    }

    private static KernelSpecialization Spec => PagedKvKernels.Specializations[0];

    [Fact]
    public void SecondCompiler_ReadsTheEntryFromDisk()
    {
        TestEnvironment.RequireNvrtc();
        var first = new KernelCompiler(_directory).Compile(Spec, "sm_80");
        Assert.False(first.FromCache);
        var second = new KernelCompiler(_directory);
        var cached = second.Compile(Spec, "sm_80");
        Assert.True(cached.FromCache);
        Assert.Equal(0, second.NvrtcCompilations);
        Assert.Equal(first.Binary, cached.Binary);
        Assert.Equal(first.Resources, cached.Resources);
        Assert.Empty(Directory.GetFiles(_directory, "*.tmp"));
    }

    [Theory]
    [InlineData("flip a payload byte")]
    [InlineData("truncate")]
    [InlineData("empty file")]
    [InlineData("wrong magic")]
    public void CorruptedEntry_IsRebuilt(string corruption)
    {
        TestEnvironment.RequireNvrtc();
        var original = new KernelCompiler(_directory).Compile(Spec, "sm_89");
        string file = Assert.Single(Directory.GetFiles(_directory, "*.bin"));
        byte[] bytes = File.ReadAllBytes(file);
        switch (corruption)
        {
            case "flip a payload byte": bytes[^10] ^= 0x40; break;
            case "truncate": bytes = bytes[..(bytes.Length / 2)]; break;
            case "empty file": bytes = []; break;
            case "wrong magic": bytes[0] ^= 0xFF; break;
        }
        File.WriteAllBytes(file, bytes);

        var compiler = new KernelCompiler(_directory);
        var rebuilt = compiler.Compile(Spec, "sm_89");
        Assert.False(rebuilt.FromCache);
        Assert.Equal(1, compiler.NvrtcCompilations);
        Assert.Equal(original.Binary, rebuilt.Binary);
        Assert.True(new KernelCompiler(_directory).Compile(Spec, "sm_89").FromCache, "the rebuilt entry was written back");
    }

    [Fact]
    public async Task ConcurrentRequestsForOneKey_CompileOnce()
    {
        TestEnvironment.RequireNvrtc();
        var compiler = new KernelCompiler(_directory);
        using var start = new ManualResetEventSlim();
        var tasks = Enumerable.Range(0, 8).Select(_ => Task.Run(() =>
        {
            start.Wait();
            return compiler.Compile(Spec, "sm_90");
        })).ToArray();
        start.Set();
        var results = await Task.WhenAll(tasks);
        Assert.Equal(1, compiler.NvrtcCompilations);
        Assert.All(results, r => Assert.Same(results[0], r));
    }

    [Fact]
    public void DifferentArchOrMacros_AreDifferentEntries()
    {
        TestEnvironment.RequireNvrtc();
        var compiler = new KernelCompiler(_directory);
        compiler.Compile(PagedKvKernels.Specializations[0], "sm_80");
        compiler.Compile(PagedKvKernels.Specializations[0], "sm_90");
        compiler.Compile(PagedKvKernels.Specializations[1], "sm_90");
        Assert.Equal(3, compiler.NvrtcCompilations);
        Assert.Equal(3, Directory.GetFiles(_directory, "*.bin").Length);
    }
}
