using System.CommandLine;
using KvCheck.Cli;
using KvCheck.Commands;
using KvKernels.Cuda;

namespace KvCheck;

/// <summary>KvCheck: info | compile | verify | bench | convert — the KvKernels command-line tool.</summary>
public static class Program
{
    public static int Main(string[] args)
    {
        var root = new RootCommand(
            "KvCheck — inspect, compile, verify and benchmark the KvKernels CUDA kernels and their CPU twins." +
            Environment.NewLine + Environment.NewLine + ExitCodes.HelpText)
        {
            InfoCommand.Create(),
            CompileCommand.Create(),
            VerifyCommand.Create(),
            BenchCommand.Create(),
            ConvertCommand.Create(),
        };
        var parse = root.Parse(args);
        int code = parse.Invoke();
        return parse.Errors.Count > 0 ? ExitCodes.Usage : code;
    }

    /// <summary>
    /// Runs a verb: expected conditions (no GPU, no NVRTC) become one clear line and exit code 2; anything else is
    /// unexpected and printed in full (exit code 3).
    /// </summary>
    internal static int Guard(Func<int> verb)
    {
        try
        {
            return verb();
        }
        catch (CudaUnavailableException e)
        {
            Ui.Error("Unavailable: " + e.Message);
            return ExitCodes.Unavailable;
        }
        catch (Exception e)
        {
            Console.Error.WriteLine("KvCheck: unexpected error: " + e);
            return ExitCodes.Error;
        }
    }
}
