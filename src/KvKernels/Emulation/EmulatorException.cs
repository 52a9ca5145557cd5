namespace KvKernels.Emulation;

/// <summary>
/// The emulated device refused or aborted a launch (out-of-bounds access, a barrier not every thread reached, a
/// warp collective with missing lanes, too much shared memory), or could not build a kernel. The message names the
/// kernel and, for faults, the block and thread.
/// </summary>
public sealed class EmulatorException : Exception
{
    /// <summary>The kernel the error happened in (null for build failures outside a launch).</summary>
    public string? Kernel { get; }

    /// <summary>Creates the exception.</summary>
    public EmulatorException(string? kernel, string message) : base(message) => Kernel = kernel;
}
