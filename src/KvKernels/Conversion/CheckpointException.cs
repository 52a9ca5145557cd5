namespace KvKernels.Conversion;

/// <summary>
/// A checkpoint cannot be converted as asked: a tensor is missing, has the wrong shape or element type, or the config
/// disagrees with the weights. <see cref="TensorName"/> names the tensor (or config field) at fault.
/// </summary>
public sealed class CheckpointException : Exception
{
    /// <summary>Creates the exception for <paramref name="tensorName"/>.</summary>
    public CheckpointException(string tensorName, string message) : base(message) => TensorName = tensorName;

    /// <summary>Creates the exception with no tensor name.</summary>
    public CheckpointException() : this("", "The checkpoint cannot be converted.")
    {
    }

    /// <summary>Creates the exception with no tensor name.</summary>
    public CheckpointException(string message) : this("", message)
    {
    }

    /// <summary>Creates the exception with no tensor name and an inner exception.</summary>
    public CheckpointException(string message, Exception innerException) : base(message, innerException) => TensorName = "";

    /// <summary>The tensor (or config field) at fault; empty when none applies.</summary>
    public string TensorName { get; }
}
