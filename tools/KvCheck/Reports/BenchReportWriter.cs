using System.Globalization;
using System.Security;
using System.Text;
using KvCheck.Cli;

namespace KvCheck.Reports;

/// <summary>Writes <c>results.json</c>, <c>results.md</c> and <c>chart.svg</c> of a bench run into a folder.</summary>
internal static class BenchReportWriter
{
    public static IReadOnlyList<string> Write(string directory, BenchReport report)
    {
        Directory.CreateDirectory(directory);
        string json = Path.Combine(directory, "results.json");
        string md = Path.Combine(directory, "results.md");
        string svg = Path.Combine(directory, "chart.svg");
        ReportFiles.WriteJson(json, report, ReportJsonContext.Default.BenchReport);
        ReportFiles.WriteText(md, Markdown(report));
        ReportFiles.WriteText(svg, Svg(report));
        return [json, md, svg];
    }

    public static string GoalText(BenchRow row) => row.Goal switch
    {
        null => "",
        "met" => $"met ({Ui.Floor(row.PctOfBandwidth, 1)} % ≥ {row.GoalPercent ?? 90} %)",
        _ => $"missed ({Ui.Floor(row.PctOfBandwidth, 1)} % < {row.GoalPercent ?? 90} %)",
    };

    private static string Markdown(BenchReport r)
    {
        var sb = new StringBuilder();
        sb.AppendLine("# KvCheck bench").AppendLine();
        sb.AppendLine($"- commit: `{r.Commit}`, {r.Date}{(r.Quick ? " (--quick)" : "")}");
        sb.AppendLine($"- device: {r.Device}");
        sb.AppendLine($"- driver: {r.Driver ?? "none"}; NVRTC: {r.Nvrtc ?? "none"}");
        sb.AppendLine($"- copy bandwidth: {Ui.F(r.BandwidthGBs, 1)} GB/s ({r.BandwidthKind})" +
            (r.CpuBandwidthGBs is { } cpu && r.Rows.Any(x => x.Backend == "cuda") ? $"; host copy {Ui.F(cpu, 1)} GB/s for the cpu rows" : ""));
        sb.AppendLine("- µs: median per call; GB/s: bytes the op must read + write / time (1 GB = 1e9 B); % of copy: of the copy " +
            "bandwidth of the same backend measured in the same run; TFLOP/s: the FLOPs the op must do / time (MLA); goal: each GPU row's own (paging rows moving ≥ 256 MiB: 90 %; decode attention: 85 % at N ≥ 8k with B·Hkv ≥ 64, 75 % at B = 1 and N ≥ 32k; MLA latent attention with H ≤ 32: 80 %), " +
            "percentages truncated, never rounded up.");
        if (r.Rows.Any(x => x.Backend == "cpu"))
            sb.AppendLine("- cpu rows: the library runs gather and scatter in parallel over sequences above 8 MiB, so the host copy " +
                "bandwidth is the faster of a 1-thread and an all-threads Span.CopyTo.");
        sb.AppendLine();
        sb.AppendLine("| op | backend | shape | µs | GB/s | % of copy | TFLOP/s | MiB moved | goal | note |");
        sb.AppendLine("|---|---|---|---:|---:|---:|---:|---:|---|---|");
        foreach (var row in r.Rows)
            sb.AppendLine($"| {row.Op} | {row.Backend} | {row.Shape} | {Ui.F(row.Us, 1)} | {Ui.F(row.Gbps, 1)} | {Ui.Floor(row.PctOfBandwidth, 1)} | " +
                $"{(row.Tflops is { } tf ? Ui.F(tf, 2) : "")} | {Ui.F(row.Bytes / 1048576.0, 1)} | {GoalText(row)} | {row.Note?.Replace("|", "/", StringComparison.Ordinal) ?? ""} |");
        return sb.ToString();
    }

    /// <summary>A horizontal bar chart of % of copy bandwidth per row, with a dashed line at the 90 % goal.</summary>
    private static string Svg(BenchReport r)
    {
        const int rowHeight = 24, top = 82, barArea = 520, fontSize = 12, rightPad = 190;
        const double charWidth = 7.3; // monospace at 12 px
        var rows = r.Rows;
        var labels = rows.Select(x => $"{x.Op} · {x.Backend} · {x.Shape}").ToArray();
        int labelWidth = (int)Math.Ceiling((labels.Length == 0 ? 20 : labels.Max(l => l.Length)) * charWidth) + 16;
        double maxPct = rows.Where(x => double.IsFinite(x.PctOfBandwidth)).Select(x => x.PctOfBandwidth).DefaultIfEmpty(0).Max();
        double scaleMax = Math.Max(100, Math.Ceiling(maxPct / 25) * 25);
        int width = labelWidth + barArea + rightPad;
        int height = top + Math.Max(rows.Count, 1) * rowHeight + 40;
        double X(double pct) => labelWidth + Math.Clamp(pct, 0, scaleMax) / scaleMax * barArea;
        string N(double v) => v.ToString("0.##", CultureInfo.InvariantCulture);
        string E(string s) => SecurityElement.Escape(s) ?? "";

        var sb = new StringBuilder();
        sb.AppendLine($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" " +
            $"font-family=\"DejaVu Sans Mono, Menlo, Consolas, monospace\" font-size=\"{fontSize}\">");
        sb.AppendLine($"  <rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"#ffffff\"/>");
        sb.AppendLine($"  <text x=\"12\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{E($"KvKernels — % of measured copy bandwidth (commit {r.Commit}, {r.Date})")}</text>");
        sb.AppendLine($"  <text x=\"12\" y=\"42\" fill=\"#444444\">{E($"{r.Device}; copy {Ui.F(r.BandwidthGBs, 0)} GB/s ({r.BandwidthKind}); driver {r.Driver ?? "none"}, NVRTC {r.Nvrtc ?? "none"}")}</text>");
        int bottom = top + rows.Count * rowHeight;
        for (double tick = 0; tick <= scaleMax + 1e-9; tick += 25)
        {
            double x = X(tick);
            sb.AppendLine($"  <line x1=\"{N(x)}\" y1=\"{top - 6}\" x2=\"{N(x)}\" y2=\"{bottom}\" stroke=\"#dddddd\"/>");
            sb.AppendLine($"  <text x=\"{N(x)}\" y=\"{bottom + 16}\" text-anchor=\"middle\" fill=\"#444444\">{N(tick)} %</text>");
        }
        double goal = X(90);
        sb.AppendLine($"  <line x1=\"{N(goal)}\" y1=\"{top - 10}\" x2=\"{N(goal)}\" y2=\"{bottom}\" stroke=\"#c0392b\" stroke-dasharray=\"5,4\"/>");
        sb.AppendLine($"  <text x=\"{N(goal)}\" y=\"{top - 14}\" text-anchor=\"middle\" fill=\"#c0392b\">goal 90 %</text>");
        for (int i = 0; i < rows.Count; i++)
        {
            var row = rows[i];
            int y = top + i * rowHeight;
            string color = row.Backend == "cuda" ? "#4c78a8" : row.Backend == "cpu" ? "#f58518" : "#54a24b";
            double pct = double.IsFinite(row.PctOfBandwidth) ? row.PctOfBandwidth : 0;
            sb.AppendLine($"  <text x=\"{labelWidth - 8}\" y=\"{y + 16}\" text-anchor=\"end\">{E(labels[i])}</text>");
            sb.AppendLine($"  <rect x=\"{labelWidth}\" y=\"{y + 4}\" width=\"{N(X(pct) - labelWidth)}\" height=\"{rowHeight - 8}\" fill=\"{color}\"/>");
            string value = double.IsFinite(row.PctOfBandwidth) ? $"{Ui.Floor(row.PctOfBandwidth, 1)} % · {Ui.F(row.Gbps, 0)} GB/s" : "error";
            sb.AppendLine($"  <text x=\"{N(X(pct) + 6)}\" y=\"{y + 16}\" stroke=\"#ffffff\" stroke-width=\"3\" paint-order=\"stroke\">{E(value)}</text>");
        }
        sb.AppendLine($"  <text x=\"{labelWidth}\" y=\"{height - 8}\" fill=\"#444444\">{E("bars: cuda blue, cpu orange, other backends (peers) green; % of the copy bandwidth of the same backend")}</text>");
        sb.AppendLine("</svg>");
        return sb.ToString();
    }
}
