namespace KvCheck.Verification;

/// <summary>Every verification KvCheck runs, family by family. A new op family appends its list here.</summary>
internal static class VerificationRegistry
{
    public static IReadOnlyList<IVerification> All { get; } =
    [
        .. PagingVerifications.All,
        .. AttentionVerifications.All,
        .. MlaVerifications.All,
        .. QuantVerifications.All,
        .. ScoreVerifications.All,
        .. SelectionVerifications.All,
    ];
}
