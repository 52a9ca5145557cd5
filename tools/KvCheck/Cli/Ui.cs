using System.Globalization;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace KvCheck.Cli;

/// <summary>
/// Console output: Spectre.Console tables and a status line on a terminal; plain, fixed-width text when the output
/// is redirected (logs, CI), so that files stay readable and free of escape codes.
/// </summary>
internal static class Ui
{
    /// <summary>True when stdout is not a terminal: no colours, no live status, plain tables.</summary>
    public static bool Plain { get; } = Console.IsOutputRedirected;

    public static CultureInfo Invariant => CultureInfo.InvariantCulture;

    public static void Line(string text = "") => Console.Out.WriteLine(text);

    public static void Heading(string text)
    {
        if (Plain) Console.Out.WriteLine(text);
        else AnsiConsole.Write(new Markup($"[bold]{Markup.Escape(text)}[/]{Environment.NewLine}"));
    }

    /// <summary>A warning or an explanation of something skipped (stdout, so that it sits with the tables).</summary>
    public static void Note(string text)
    {
        if (Plain) Console.Out.WriteLine(text);
        else AnsiConsole.Write(new Markup($"[yellow]{Markup.Escape(text)}[/]{Environment.NewLine}"));
    }

    /// <summary>An error line on stderr.</summary>
    public static void Error(string text)
    {
        if (Console.IsErrorRedirected || Plain) Console.Error.WriteLine(text);
        else AnsiConsole.Console.Write(new Markup($"[red]{Markup.Escape(text)}[/]{Environment.NewLine}"));
    }

    /// <summary>
    /// Runs <paramref name="work"/> under a live status line (terminal) or silently (redirected); the callback
    /// updates the status text. In plain mode <paramref name="plainProgress"/> decides whether updates are printed
    /// as lines (useful in logs of long runs).
    /// </summary>
    public static T WithStatus<T>(string initial, Func<Action<string>, T> work, bool plainProgress = false)
    {
        if (Plain)
            return work(plainProgress ? s => Console.Out.WriteLine(s) : _ => { });
        return AnsiConsole.Status().Spinner(Spinner.Known.Dots).Start(Markup.Escape(initial),
            ctx => work(s => ctx.Status(Markup.Escape(s))));
    }

    public static string F(double value, int decimals) =>
        double.IsFinite(value) ? value.ToString("F" + decimals.ToString(Invariant), Invariant) : value.ToString(Invariant);

    /// <summary>Formats with <paramref name="decimals"/> decimals, truncated toward zero (never rounded up).</summary>
    public static string Floor(double value, int decimals)
    {
        if (!double.IsFinite(value)) return value.ToString(Invariant);
        double scale = Math.Pow(10, decimals);
        return (Math.Floor(value * scale) / scale).ToString("F" + decimals.ToString(Invariant), Invariant);
    }

    public static string Bytes(long bytes) => bytes switch
    {
        >= 1L << 30 => F(bytes / (double)(1L << 30), 2) + " GiB",
        >= 1L << 20 => F(bytes / (double)(1L << 20), 1) + " MiB",
        >= 1L << 10 => F(bytes / (double)(1L << 10), 1) + " KiB",
        _ => bytes.ToString(Invariant) + " B",
    };
}

/// <summary>A table rendered by Spectre.Console on a terminal and as aligned plain text otherwise.</summary>
internal sealed class TextTable
{
    private readonly (string Header, bool RightAligned)[] _columns;
    private readonly List<(string[] Cells, bool Bad)> _rows = [];

    public TextTable(string? title, params (string Header, bool RightAligned)[] columns)
    {
        Title = title;
        _columns = columns;
    }

    public string? Title { get; }

    public int Count => _rows.Count;

    /// <summary>Adds a row; <paramref name="bad"/> colours it red on a terminal.</summary>
    public void AddRow(bool bad, params string[] cells)
    {
        if (cells.Length != _columns.Length)
            throw new ArgumentException($"Expected {_columns.Length} cells, got {cells.Length}.", nameof(cells));
        _rows.Add((cells, bad));
    }

    public void Write()
    {
        if (Ui.Plain) WritePlain(Console.Out);
        else WriteSpectre();
    }

    private void WriteSpectre()
    {
        var table = new Table().Border(TableBorder.Rounded);
        if (Title is not null) table.Title(new TableTitle(Title));
        foreach (var (header, right) in _columns)
        {
            var column = new TableColumn(new Text(header, new Style(decoration: Decoration.Bold)));
            if (right) column.RightAligned();
            table.AddColumn(column);
        }
        foreach (var (cells, bad) in _rows)
        {
            var style = bad ? new Style(Color.Red) : Style.Plain;
            table.AddRow(cells.Select(c => (IRenderable)new Text(c, style)).ToArray());
        }
        AnsiConsole.Write(table);
    }

    public void WritePlain(TextWriter writer)
    {
        int[] widths = _columns.Select(c => c.Header.Length).ToArray();
        foreach (var (cells, _) in _rows)
            for (int i = 0; i < cells.Length; i++) widths[i] = Math.Max(widths[i], cells[i].Length);
        if (Title is not null) writer.WriteLine(Title);
        void Row(IReadOnlyList<string> cells)
        {
            var parts = new string[cells.Count];
            for (int i = 0; i < cells.Count; i++)
                parts[i] = _columns[i].RightAligned ? cells[i].PadLeft(widths[i]) : cells[i].PadRight(widths[i]);
            writer.WriteLine(string.Join("  ", parts).TrimEnd());
        }
        Row(_columns.Select(c => c.Header).ToArray());
        writer.WriteLine(string.Join("  ", widths.Select(w => new string('-', w))));
        foreach (var (cells, _) in _rows) Row(cells);
    }
}
