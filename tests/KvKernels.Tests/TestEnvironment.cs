using KvKernels.Compilation;
using KvKernels.Cuda;

namespace KvKernels.Tests;

/// <summary>What this machine offers the tests, probed once, and the skip/fail policy for missing pieces.</summary>
public static class TestEnvironment
{
    /// <summary>
    /// The toolchain-dependent tests (the NVRTC compile gate, the emulated backend) must run in CI and under
    /// <c>./build.sh test</c>: there a missing NVRTC or C++ compiler is a failure, not a skip. Elsewhere (an IDE on a
    /// machine without them) they skip with the reason.
    /// </summary>
    public static bool ToolchainRequired =>
        Environment.GetEnvironmentVariable("KVKERNELS_REQUIRE_NVRTC") == "1" ||
        string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    /// <summary>Fails or skips (per <see cref="ToolchainRequired"/>) when NVRTC cannot be loaded.</summary>
    public static void RequireNvrtc()
    {
        if (Nvrtc.IsAvailable) return;
        if (ToolchainRequired) Assert.Fail("NVRTC is required here (CI or KVKERNELS_REQUIRE_NVRTC=1) but cannot be loaded: " + Nvrtc.UnavailableReason);
        Assert.Skip("NVRTC is not available: " + Nvrtc.UnavailableReason);
    }

    /// <summary>The repository root (the folder holding Kernels.sln), found by walking up from the test assembly.</summary>
    public static string RepositoryRoot
    {
        get
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
                if (File.Exists(Path.Combine(dir.FullName, "Kernels.sln"))) return dir.FullName;
            throw new InvalidOperationException("Kernels.sln not found above " + AppContext.BaseDirectory);
        }
    }
}

/// <summary>
/// The backends a GPU test runs on. Each test takes a backend name from <see cref="Names"/> and asks for the device;
/// an absent backend skips with its reason (never passes silently).
/// </summary>
public sealed class Backends : IDisposable
{
    private readonly Lazy<CudaDevice?> _cuda = new(() => CudaDevice.IsAvailable ? CudaDevice.Open() : null);
    private readonly Lazy<CudaDevice?> _emulated = new(() => CudaDevice.IsEmulatorAvailable ? CudaDevice.OpenEmulated() : null);

    /// <summary>Every backend a GPU test runs on: the real device, and the CPU emulator of the same kernels.</summary>
    public static IReadOnlyList<string> All { get; } = ["cuda", "emulated"];

    /// <summary>Backend names for theory data.</summary>
    public static TheoryData<string> Names => new(All);

    /// <summary>(backend, case index) for every backend and each of <paramref name="cases"/> cases.</summary>
    public static TheoryData<string, int> CasesOnEach(int cases)
    {
        var data = new TheoryData<string, int>();
        foreach (var backend in All)
            for (int i = 0; i < cases; i++) data.Add(backend, i);
        return data;
    }

    /// <summary>The device for <paramref name="backend"/>, or a skip with the reason it is missing.</summary>
    public CudaDevice Get(string backend) => backend switch
    {
        "cuda" => _cuda.Value ?? throw SkipException("No CUDA device: " + FirstLine(CudaDevice.UnavailableReason)),
        "emulated" => _emulated.Value ?? throw MissingEmulator(),
        _ => throw new ArgumentException($"Unknown backend {backend}.", nameof(backend)),
    };

    private static string FirstLine(string? text) => (text ?? "").Split('\n')[0].Trim();

    private static Exception MissingEmulator()
    {
        string reason = "The emulator is unavailable: " + CudaDevice.EmulatorUnavailableReason;
        if (TestEnvironment.ToolchainRequired) Assert.Fail(reason + " (required here: CI or KVKERNELS_REQUIRE_NVRTC=1)");
        return SkipException(reason);
    }

    private static Exception SkipException(string reason)
    {
        Assert.Skip(reason);
        return new InvalidOperationException("unreachable");
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_cuda.IsValueCreated) _cuda.Value?.Dispose();
        if (_emulated.IsValueCreated) _emulated.Value?.Dispose();
    }
}

/// <summary>Deterministic random test data (never all zeros).</summary>
public static class TestData
{
    /// <summary>Random bytes viewed as <typeparamref name="T"/> (every bit pattern, NaNs included, which byte-exact ops must move unchanged).</summary>
    public static T[] Random<T>(Random random, long length) where T : unmanaged
    {
        var array = new T[length];
        random.NextBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(array.AsSpan()));
        return array;
    }

    /// <summary>A random permutation of 0..n−1.</summary>
    public static int[] Permutation(Random random, int n)
    {
        var p = Enumerable.Range(0, n).ToArray();
        random.Shuffle(p);
        return p;
    }
}
