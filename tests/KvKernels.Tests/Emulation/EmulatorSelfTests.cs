using System.Diagnostics;

namespace KvKernels.Tests.Emulation;

/// <summary>
/// The emulator's own C++ suite (cuda/emulation/tests): every shuffle mode and width, votes, atomics across blocks,
/// shared memory, and the planted faults (guard page, canary, divergent barriers and collectives, stack overflow,
/// traps), driven through the same C ABI the library uses.
/// </summary>
public sealed class EmulatorSelfTests
{
    [Fact]
    public async Task NativeSuite_Passes()
    {
        if (!KvKernels.Cuda.CudaDevice.IsEmulatorAvailable)
        {
            string reason = "The emulator is unavailable: " + KvKernels.Cuda.CudaDevice.EmulatorUnavailableReason;
            if (TestEnvironment.ToolchainRequired) Assert.Fail(reason);
            Assert.Skip(reason);
        }
        string root = TestEnvironment.RepositoryRoot;
        string build = Path.Combine(Path.GetTempPath(), "kvk-emu-selftest-" + Guid.NewGuid().ToString("N"));
        var info = new ProcessStartInfo("bash", [Path.Combine(root, "cuda", "emulation", "tests", "run.sh")])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        info.Environment["KVK_EMU_BUILD_DIR"] = build;
        try
        {
            using var process = Process.Start(info)!;
            var token = TestContext.Current.CancellationToken;
            var stdout = process.StandardOutput.ReadToEndAsync(token);
            var stderr = process.StandardError.ReadToEndAsync(token);
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(token);
            timeout.CancelAfter(TimeSpan.FromMinutes(5));
            await process.WaitForExitAsync(timeout.Token);
            string output = await stdout + await stderr;
            Assert.True(process.ExitCode == 0, output);
            Assert.Matches(@"\n\d+ checks, 0 failed", output);
        }
        finally
        {
            if (Directory.Exists(build)) Directory.Delete(build, recursive: true);
        }
    }
}
