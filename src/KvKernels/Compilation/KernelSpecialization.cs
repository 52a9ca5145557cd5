using System.Globalization;
using System.Text;

namespace KvKernels.Compilation;

/// <summary>
/// One kernel source compiled with one set of macros (<c>-DHEAD_DIM=128 …</c>): the unit that is compiled,
/// cached and loaded. Equal specializations share one module. Macros are kept sorted, so their order does not matter.
/// </summary>
public sealed record KernelSpecialization
{
    private KernelSpecialization(string source, string defines, string? text = null)
    {
        Source = source;
        Defines = defines;
        Text = text;
    }

    /// <summary>Source text given directly (tests' own kernels); null for the library's embedded sources.</summary>
    internal string? Text { get; }

    /// <summary>The kernel source text to compile.</summary>
    internal string SourceText => Text ?? KernelSources.Get(Source);

    /// <summary>A specialization of source text that is not embedded (test-only kernels, such as planted faults).
    /// It may include the embedded <c>common/</c> headers.</summary>
    internal static KernelSpecialization FromText(string name, string text, params ReadOnlySpan<(string Name, object Value)> macros)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(text);
        return new KernelSpecialization(name, Canonical(macros), text);
    }

    /// <summary>The source's path under <c>cuda/</c>, for example <c>paging/paging.cu</c>.</summary>
    public string Source { get; }

    /// <summary>The macros in canonical form: <c>NAME=VALUE</c> pairs sorted by name, separated by spaces.</summary>
    public string Defines { get; }

    /// <summary>Creates a specialization of <paramref name="source"/> with the given macros.</summary>
    /// <exception cref="ArgumentException">The source is not embedded in the library, or a macro name is not an identifier.</exception>
    public static KernelSpecialization Create(string source, params ReadOnlySpan<(string Name, object Value)> macros)
    {
        ArgumentException.ThrowIfNullOrEmpty(source);
        if (!KernelSources.Contains(source))
            throw new ArgumentException($"No kernel source '{source}' is embedded in the library.", nameof(source));
        return new KernelSpecialization(source, Canonical(macros));
    }

    private static string Canonical(ReadOnlySpan<(string Name, object Value)> macros)
    {
        var pairs = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var (name, value) in macros)
        {
            if (string.IsNullOrEmpty(name) || !(char.IsAsciiLetter(name[0]) || name[0] == '_') || !name.All(c => char.IsAsciiLetterOrDigit(c) || c == '_'))
                throw new ArgumentException($"'{name}' is not a macro name.", nameof(macros));
            string text = Convert.ToString(value, CultureInfo.InvariantCulture) ?? "";
            if (text.Any(char.IsWhiteSpace)) throw new ArgumentException($"Macro {name} has white space in its value.", nameof(macros));
            pairs[name] = text;
        }
        var sb = new StringBuilder();
        foreach (var (name, value) in pairs)
        {
            if (sb.Length > 0) sb.Append(' ');
            sb.Append(name).Append('=').Append(value);
        }
        return sb.ToString();
    }

    /// <summary>The NVRTC / C++ compiler options that define the macros.</summary>
    public IEnumerable<string> DefineOptions() =>
        Defines.Length == 0 ? [] : Defines.Split(' ').Select(d => "-D" + d);

    /// <inheritdoc />
    public override string ToString() => Defines.Length == 0 ? Source : $"{Source} [{Defines}]";
}
