namespace KvKernels.Attention;

/// <summary>The CPU twin of decode attention (SKELETON: signatures only; being implemented in this session).</summary>
public static class DecodeAttentionCpu
{
    /// <summary>Decode attention on the host; see <see cref="DecodeAttentionSpec"/> for the math and the tensors.</summary>
    public static void Run<TIn, TOut>(in DecodeAttentionSpec spec, ReadOnlySpan<TIn> query, ReadOnlySpan<TIn> keys, ReadOnlySpan<TIn> values,
        ReadOnlySpan<int> lengths, ReadOnlySpan<int> blockTable, Span<TOut> output, Span<float> lse = default,
        ReadOnlySpan<int> positions = default, ReadOnlySpan<float> alibiSlopes = default) where TIn : unmanaged where TOut : unmanaged =>
        throw new NotImplementedException();

    /// <summary>Merges two attention states; see <see cref="MergeStatesSpec"/>.</summary>
    public static void MergeStates<T>(in MergeStatesSpec spec, ReadOnlySpan<T> outputA, ReadOnlySpan<float> lseA, ReadOnlySpan<T> outputB,
        ReadOnlySpan<float> lseB, Span<T> output, Span<float> lse) where T : unmanaged =>
        throw new NotImplementedException();
}
