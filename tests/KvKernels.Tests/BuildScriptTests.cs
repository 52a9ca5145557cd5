using System.Text.RegularExpressions;

namespace KvKernels.Tests;

/// <summary>build.ps1 (which cannot run here) must stay a mirror of build.sh: the same verbs.</summary>
public sealed partial class BuildScriptTests
{
    [GeneratedRegex(@"^\s{2,}([a-z]+)\)", RegexOptions.Multiline)]
    private static partial Regex BashCaseVerb();

    [GeneratedRegex(@"^\s+'([a-z]+)'\s*\{", RegexOptions.Multiline)]
    private static partial Regex PowerShellSwitchVerb();

    [Fact]
    public void BuildScripts_OfferTheSameVerbs()
    {
        string root = TestEnvironment.RepositoryRoot;
        var bash = BashCaseVerb().Matches(File.ReadAllText(Path.Combine(root, "build.sh"))).Select(m => m.Groups[1].Value).ToHashSet();
        var ps = PowerShellSwitchVerb().Matches(File.ReadAllText(Path.Combine(root, "build.ps1"))).Select(m => m.Groups[1].Value).ToHashSet();
        string[] required = ["run", "test", "bench", "compile", "pack"];
        foreach (var verb in required)
        {
            Assert.Contains(verb, bash);
            Assert.Contains(verb, ps);
        }
        Assert.Equal(bash.Intersect(ps).Order(), bash.Union(ps).Where(v => v != "help").Order());
    }

    [Fact]
    public void CiScript_CallsTheReadmeTestCommand()
    {
        string root = TestEnvironment.RepositoryRoot;
        Assert.Contains("./build.sh test", File.ReadAllText(Path.Combine(root, ".ci", "run")));
        Assert.Contains("./build.sh test", File.ReadAllText(Path.Combine(root, "README.md")));
    }
}
