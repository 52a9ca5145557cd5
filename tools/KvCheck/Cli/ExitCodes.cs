namespace KvCheck.Cli;

/// <summary>The process exit codes of every verb (also printed by <c>--help</c>).</summary>
internal static class ExitCodes
{
    /// <summary>Everything that was asked for ran and passed.</summary>
    public const int Success = 0;

    /// <summary>A check failed: a compile error, a spill or a missing entry point (compile), a mismatch (verify).</summary>
    public const int CheckFailed = 1;

    /// <summary>The environment lacks what the verb needs (NVRTC for compile, a GPU for <c>--backend cuda</c>).</summary>
    public const int Unavailable = 2;

    /// <summary>An unexpected error (a bug, or a CUDA/NVRTC call that failed where it should not).</summary>
    public const int Error = 3;

    /// <summary>The command line could not be parsed.</summary>
    public const int Usage = 64;

    public const string HelpText =
        "Exit codes: 0 success; 1 a check failed (compile error, spill or missing entry point; a verification mismatch); " +
        "2 unavailable (NVRTC missing for compile, no GPU for --backend cuda); 3 unexpected error; 64 bad command line.";
}
