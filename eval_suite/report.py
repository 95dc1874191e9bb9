"""The results page: Table 1's layout for one or several IT/IM pairs, settings, per-task scores, charts.

``eval-suite report runs/im --baseline runs/it --out report/`` (one pair) or
``eval-suite report --pair "Dolly 3k" runs/dolly_it runs/dolly_im --pair LIMA runs/lima_it runs/lima_im``
writes ``report.html`` (one self-contained page: charts inline as PNG), ``report.md`` and the charts
as files. Every column is higher-is-better under ``--protocol default`` (lower-is-better tasks were
flipped by the suite's aggregation), so green / ▲ is a gain; under ``--protocol paper`` WMT's TER
enters Multilinguality as it is, as in Table 1, so a rise there can be a worse translation. Each
run's NLP scores are re-aggregated as its protocol says, and every cell that is not comparable
with Table 1 carries a † and a one-line reason. Runs whose protocols differ (template, sampling, limit,
judge, reference outputs) are refused unless ``allow_mixed``; smoke runs (``--limit``, the rule-based
test judge) are marked on every row.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from eval_suite import protocol as protocols
from eval_suite import provenance as prov
from eval_suite.nlp.bench import Suite, table1
from eval_suite.results import BenchmarkResult, load_run

HUMANEVAL = "HumanEval"
OPEN_ENDED = {"MT-Bench": "mt_bench", "AlpacaEval 1.0": "alpaca_eval_1", "AlpacaEval 2.0": "alpaca_eval_2"}
UNITS = {"MT-Bench": "score 1-10", "AlpacaEval 1.0": "win rate %", "AlpacaEval 2.0": "win rate %", HUMANEVAL: "pass@1 %"}


@dataclass
class Row:
    label: str
    values: dict[str, float | None]  # column -> value
    notes: list[str]
    stderr: dict[str, float] = field(default_factory=dict)  # column -> standard error, where the benchmark gives one
    tasks: dict[str, float | None] = field(default_factory=dict)  # NLP task -> percent
    task_stderr: dict[str, float] = field(default_factory=dict)
    smoke: list[str] = field(default_factory=list)  # why this row is a smoke run
    partial: dict[str, tuple[float | None, str]] = field(default_factory=dict)  # column -> (partial mean, what is missing)
    results: dict[str, BenchmarkResult] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)  # column -> why it is not comparable with the paper


@dataclass
class Section:
    title: str
    rows: list[Row]
    base: Row | None  # the IT (baseline) row the deltas subtract


def suite_of(results: dict[str, BenchmarkResult]) -> Suite:
    """The suite the NLP run used (stored in its result), else the paper's."""
    nlp = results.get("nlp")
    return Suite.model_validate(nlp.config["suite"]) if nlp and "suite" in nlp.config else Suite.load()


def _stderr(result: BenchmarkResult) -> float | None:
    """The headline's standard error, in the headline's unit, where the benchmark gives one."""
    if result.benchmark.startswith("alpaca_eval"):
        return result.metrics.get("standard_error")
    return (result.breakdown.get("stderr") or {}).get("headline")


def provenance_of(result: BenchmarkResult) -> dict:
    """A result's provenance, with the protocol and limit from its config where the command wrote no provenance."""
    p = dict(result.provenance)
    p.setdefault("protocol", result.config.get("protocol"))
    if "limit" not in p:
        p["limit"] = result.config.get("limit")
    return p


def protocol_of(result: BenchmarkResult | None) -> protocols.Protocol:
    return protocols.of_result(provenance_of(result)) if result else protocols.DEFAULT


def _flag(row: Row, columns: list[str], reasons: list[str]) -> None:
    for column in columns:
        for reason in reasons:
            if reason not in row.flags.setdefault(column, []):
                row.flags[column].append(reason)


def flag_cells(row: Row, suite: Suite, combined: BenchmarkResult | None) -> None:
    """Mark every cell whose number is not comparable with Table 1's, with the reasons."""
    categories = [c.label for c in suite.categories.values()]
    sources = {"nlp": categories + ["Mean"], "humaneval": [HUMANEVAL, "Mean"] + [
        c.label for c in suite.categories.values() if any(t.source == "humaneval" for t in c.tasks.values())]}
    sources.update({b: [col] for col, b in OPEN_ENDED.items()})
    for benchmark, result in row.results.items():
        reasons = prov.not_paper_comparable(provenance_of(result), judged=benchmark in OPEN_ENDED.values())
        _flag(row, sources.get(benchmark, []), reasons)
    if combined is not None:  # a category shown as a partial mean of some of its tasks is not Table 1's category
        for name, cat in suite.categories.items():
            missing = [t for t in cat.tasks if combined.breakdown["tasks"].get(t) is None]
            if missing and row.partial.get(cat.label, (None,))[0] is not None:
                _flag(row, [cat.label, "Mean"], [f"{cat.label} partial: no score for {', '.join(missing)}"])
    # Only cells that show a number (a value, or a partial mean) carry the mark.
    row.flags = {c: r for c, r in row.flags.items()
                 if r and (row.values.get(c) is not None or row.partial.get(c, (None,))[0] is not None)}


def make_row(label: str, results: dict[str, BenchmarkResult], suite: Suite) -> Row:
    nlp, humaneval = results.get("nlp"), results.get("humaneval")
    notes: list[str] = []
    values: dict[str, float | None] = {}
    row = Row(label, values, notes, results=results)
    combined = None
    if nlp or humaneval:
        # Lower-is-better tasks (WMT's TER) are averaged as the NLP run's protocol says.
        combined = table1(nlp.breakdown.get("raw", {}) if nlp else {}, suite, humaneval, protocol_of(nlp))
        notes += [f"NLP: {n}" for n in combined.notes + (nlp.notes if nlp else [])]
        # A category with a task missing, and a Mean with a category missing, are not Table 1's numbers:
        # no value (so no delta), and the cell says "partial" with what is missing.
        values.update({suite.categories[c].label: v for c, v in combined.breakdown["categories"].items()})
        values["Mean"] = combined.headline
        for name, gap in (combined.config.get("incomplete") or {}).items():
            row.partial["Mean" if name == "mean" else suite.categories[name].label] = (gap["partial_mean"], gap["reason"])
        row.tasks = dict(combined.breakdown["tasks"])
        if nlp:
            specs = {n: s for c in suite.categories.values() for n, s in c.tasks.items()}
            row.task_stderr = {t: specs[t].scale * se for t, se in (nlp.breakdown.get("stderr") or {}).items() if t in specs}
    else:
        values.update({c.label: None for c in suite.categories.values()} | {"Mean": None})
    values[HUMANEVAL] = humaneval.headline if humaneval else None
    if humaneval and _stderr(humaneval) is not None:
        row.stderr[HUMANEVAL] = _stderr(humaneval)
    if humaneval:
        notes += [f"HumanEval: {n}" for n in humaneval.notes]
    for column, benchmark in OPEN_ENDED.items():
        result = results.get(benchmark)
        values[column] = result.headline if result else None
        if result:
            notes += [f"{column}: {n}" for n in result.notes]
            if _stderr(result) is not None:
                row.stderr[column] = _stderr(result)
    for benchmark, result in results.items():
        reasons = prov.smoke_reasons(result.provenance)
        if reasons:
            row.smoke.append(f"{benchmark}: {', '.join(reasons)}")
    flag_cells(row, suite, combined)
    return row


def check_protocols(runs: dict[str, dict[str, BenchmarkResult]]) -> list[str]:
    """One line per benchmark whose protocol differs between runs (empty when all agree)."""
    problems = []
    benchmarks = sorted({b for results in runs.values() for b in results})
    for benchmark in benchmarks:
        seen = {label: prov.protocol(r[benchmark].provenance) for label, r in runs.items()
                if benchmark in r and r[benchmark].provenance}
        if len(seen) < 2:
            continue
        first_label, first = next(iter(seen.items()))
        for label, other in seen.items():
            diff = [k for k in first if first[k] != other[k]]
            if diff:
                problems.append(f"{benchmark}: {label} and {first_label} differ in {', '.join(diff)}")
    return problems


def build_sections(run_dirs: list[Path], baseline: Path | None, labels: list[str] | None = None,
                   pairs: list[tuple[str, str, str]] | None = None, allow_mixed: bool = False) -> tuple[list[Section], list[str]]:
    """Sections of rows, and notes about mixed protocols (allowed ones).

    Raises:
        ValueError: runs with different protocols, unless ``allow_mixed``.
    """
    dirs: list[Path] = [Path(d) for d in run_dirs] + ([Path(baseline)] if baseline else [])
    for _, it, im in pairs or []:
        dirs += [Path(it), Path(im)]
    loaded = {d: load_run(d) for d in dict.fromkeys(dirs)}
    suite = suite_of(next(iter(loaded.values())))
    sections = []
    if run_dirs:
        labels = labels or [Path(d).name for d in run_dirs]
        rows = [make_row(label, loaded[Path(d)], suite) for label, d in zip(labels, run_dirs)]
        base = make_row(f"{Path(baseline).name} (baseline)", loaded[Path(baseline)], suite) if baseline else None
        sections.append(Section("Runs", rows, base))
    for dataset, it, im in pairs or []:
        # The section names the dataset; rows name the method and the run folder.
        base = make_row(f"IT ({Path(it).name})", loaded[Path(it)], suite)
        sections.append(Section(dataset, [make_row(f"IM ({Path(im).name})", loaded[Path(im)], suite)], base))
    mixed = check_protocols({str(d): r for d, r in loaded.items()})
    if mixed and not allow_mixed:
        raise ValueError("runs with different protocols in one report (" + "; ".join(mixed) + "); rerun them alike, "
                         "or pass --allow-mixed to compare anyway (the report then lists the differences)")
    return sections, mixed


def delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _fmt_cell(row: Row, column: str) -> str:
    """A value; an incomplete category or Mean as "partial" with the mean over what is there."""
    if column in row.partial:
        mean = row.partial[column][0]
        return "partial" + ("" if mean is None else f" ({mean:.2f})")
    return _fmt(row.values.get(column))


def _fmt_delta(d: float | None) -> str:
    if d is None:
        return "–"
    arrow = "▲" if d > 0 else "▼" if d < 0 else "="
    return f"{arrow} {d:+.2f}"


def _rows(section: Section) -> list[Row]:
    return ([section.base] if section.base else []) + section.rows


def _label(row: Row) -> str:
    return row.label + (" [smoke]" if row.smoke else "")


FLAG = "†"  # on a cell whose number is not comparable with the paper's Table 1


def comparability_lines(sections: list[Section]) -> list[str]:
    """One line per run and set of reasons: which of its cells are not comparable with the paper, and why."""
    lines: list[str] = []
    for row in {r.label: r for s in sections for r in _rows(s)}.values():
        by_reasons: dict[tuple[str, ...], list[str]] = {}
        for column in [c for c in row.values if c in row.flags]:  # in the table's column order
            reasons = row.flags[column]
            by_reasons.setdefault(tuple(reasons), []).append(column)
        for reasons, columns in by_reasons.items():
            lines.append(f"{row.label}: {', '.join(columns)}: {'; '.join(reasons)}")
    return lines


def protocol_line(sections: list[Section]) -> str:
    """Which protocol each run's results follow (``--protocol``), with what the protocol means."""
    used: dict[str, list[str]] = {}
    for row in {r.label: r for s in sections for r in _rows(s)}.values():
        for name in sorted({provenance_of(r).get("protocol") or "default" for r in row.results.values()}):
            used.setdefault(name, []).append(row.label)
    return "; ".join(f"{name} ({protocols.get(name).summary}): {', '.join(labels)}" for name, labels in used.items())


def _notes(sections: list[Section]) -> list[str]:
    """Each distinct note once, followed by the runs it applies to."""
    by_note: dict[str, list[str]] = {}
    for s in sections:
        for row in _rows(s):
            for n in row.notes:
                by_note.setdefault(n, [])
                if row.label not in by_note[n]:
                    by_note[n].append(row.label)
    return [f"{n} ({', '.join(labels)})" for n, labels in sorted(by_note.items())]


def markdown(sections: list[Section], title: str = "Evaluation results") -> str:
    columns = list(_rows(sections[0])[0].values)
    lines = [f"# {title}", ""]
    for s in sections:
        if len(sections) > 1 or s.title != "Runs":
            lines += [f"## {s.title}", ""]
        lines += ["| Run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row in _rows(s):
            lines.append(f"| {_label(row)} | " + " | ".join(_fmt_cell(row, c) + (FLAG if c in row.flags else "")
                                                            for c in columns) + " |")
            if s.base and row is not s.base:
                lines.append(f"| Δ {row.label} − {s.base.label.split(' (')[0]} | "
                             + " | ".join(_fmt_delta(delta(row.values[c], s.base.values[c])) for c in columns) + " |")
        lines.append("")
    lines.append("NLP columns: percent; a category is the mean of its tasks, Mean the mean of the six categories "
                 "(Table 1); \"partial (x)\" is a category or Mean with a score missing (x: the mean over what is "
                 "there, not Table 1's number; the notes say what is missing). HumanEval: best pass@1 over "
                 "temperatures, %. MT-Bench: score 1-10. AlpacaEval: win rate %.")
    lines += ["", f"Protocol: {protocol_line(sections)}"]
    flagged = comparability_lines(sections)
    if flagged:
        lines += ["", f"{FLAG} Not comparable with the paper's Table 1:"] + [f"- {line}" for line in flagged]
    notes = _notes(sections)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


# ---- CSV and LaTeX (the Table-1 view) -------------------------------------------------------------

def _table_rows(section: Section, columns: list[str]) -> list[tuple[str, str, list[str], Row]]:
    """(kind, label, cells, row) per line of a section's table: baseline, runs, and a delta under each run."""
    out = []
    for row in _rows(section):
        kind = "baseline" if row is section.base else "run"
        out.append((kind, row.label, [_fmt_cell(row, c) for c in columns], row))
        if section.base and row is not section.base:
            deltas = [delta(row.values[c], section.base.values[c]) for c in columns]
            out.append(("delta", f"Δ {row.label} − {section.base.label.split(' (')[0]}",
                        ["" if d is None else f"{d:+.2f}" for d in deltas], row))
    return out


def csv_table(sections: list[Section]) -> str:
    """The Table-1 view as CSV: one line per run (and per delta), numbers with two decimals, empty when
    missing; ``incomplete`` names the partial cells (their values stay empty) and ``smoke`` why a run is one."""
    import csv

    columns = list(_rows(sections[0])[0].values)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "kind", "run", *columns, "incomplete", "smoke"])
    for s in sections:
        for kind, label, cells, row in _table_rows(s, columns):
            if kind != "delta":
                cells = ["" if row.values.get(c) is None else f"{row.values[c]:.2f}" for c in columns]
            writer.writerow([s.title, kind, label, *cells,
                             "; ".join(reason for _, reason in row.partial.values()) if kind != "delta" else "",
                             "; ".join(row.smoke) if kind != "delta" else ""])
    return buffer.getvalue()


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "Δ": r"$\Delta$", "−": "--"}


def _tex(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def latex_table(sections: list[Section], title: str = "Evaluation results") -> str:
    """The Table-1 view as a LaTeX ``table`` (booktabs): a block per section, deltas in italics; a partial
    category or Mean is the mean over what is there, in parentheses with a dagger, explained below."""
    columns = list(_rows(sections[0])[0].values)
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * len(columns) + "}", r"\toprule",
             "Run & " + " & ".join(_tex(c) for c in columns) + r" \\", r"\midrule"]
    partial = False
    for i, s in enumerate(sections):
        if len(sections) > 1 or s.title != "Runs":
            if i:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{len(columns) + 1}}}{{l}}{{\textbf{{{_tex(s.title)}}}}} \\")
        for kind, label, cells, row in _table_rows(s, columns):
            if kind == "delta":
                tex_cells = [rf"\textit{{{c}}}" if c else "--" for c in cells]
            else:
                tex_cells = []
                for c in columns:
                    if c in row.partial:
                        partial = True
                        mean = row.partial[c][0]
                        tex_cells.append(("--" if mean is None else f"({mean:.2f})") + r"$^\dagger$")
                    else:
                        tex_cells.append(_tex(_fmt(row.values.get(c))).replace("–", "--"))
            lines.append(_tex(label + (" [smoke]" if row.smoke and kind != "delta" else "")) + " & "
                         + " & ".join(tex_cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = _tex(title) + ". NLP columns and HumanEval in \\%, MT-Bench 1--10, AlpacaEval win rate \\%."
    if partial:
        caption += r" $^\dagger$Partial: a task (or category) is missing; the mean over what is there, not Table 1's number."
    lines += [rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---- HTML --------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#1f2328;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:right}
th{background:#f6f8fa} td:first-child,th:first-child{text-align:left} tr.delta td{font-size:.9em;background:#fbfbfb}
.partial{color:#9a6700;font-style:italic} .gain{color:#1a7f37;font-weight:600} .loss{color:#cf222e;font-weight:600} .missing{color:#8c959f}
.se{color:#656d76;font-size:.8em} .smoke{background:#fff8c5;border:1px solid #d4a72c;padding:.5em .8em;margin:.8em 0}
table.settings{table-layout:fixed;width:100%;font-size:.8em}
table.settings td,table.settings th{text-align:left;vertical-align:top;overflow-wrap:anywhere}
.charts img{max-width:100%;border:1px solid #d0d7de;margin:.4em 0} .meta{color:#656d76} details{margin:.6em 0}
.flag{color:#9a6700;font-weight:600;cursor:help}
"""


def _cell(row: Row, column: str) -> str:
    value = row.values.get(column)
    reasons = row.flags.get(column)
    flag = (f"<sup class='flag' title='not comparable with the paper: {html.escape('; '.join(reasons))}'>{FLAG}</sup>"
            if reasons else "")
    if column in row.partial:
        mean, reason = row.partial[column]
        return (f"<td class='partial' title='{html.escape(reason, quote=True)}'>"
                + ("" if mean is None else f"({mean:.2f}) ") + f"<span class='se'>partial</span>{flag}</td>")
    if value is None:
        return "<td class='missing' title='not run or no score'>missing</td>"
    se = row.stderr.get(column)
    return f"<td>{value:.2f}{flag}" + (f" <span class='se'>± {se:.2f}</span>" if se is not None else "") + "</td>"


def _delta_cell(d: float | None) -> str:
    cls = "missing" if d is None else "gain" if d > 0 else "loss" if d < 0 else ""
    return f"<td class='{cls}'>{html.escape(_fmt_delta(d))}</td>"


def _section_html(s: Section, columns: list[str], suite: Suite) -> str:
    out = [f"<h2>{html.escape(s.title)}</h2>", "<table>",
           "<tr><th>Run</th>" + "".join(f"<th>{html.escape(c)}<br><span class='se'>{UNITS.get(c, '%')}</span></th>"
                                        for c in columns) + "</tr>"]
    for row in _rows(s):
        out.append(f"<tr><td>{html.escape(_label(row))}</td>" + "".join(_cell(row, c) for c in columns) + "</tr>")
        if s.base and row is not s.base:
            out.append("<tr class='delta'><td>Δ IM − IT</td>" if s.title != "Runs" else
                       f"<tr class='delta'><td>Δ {html.escape(row.label)} − {html.escape(s.base.label.split(' (')[0])}</td>")
            out[-1] += "".join(_delta_cell(delta(row.values[c], s.base.values[c])) for c in columns) + "</tr>"
    out.append("</table>")
    # Per-task numbers, folded under each category.
    rows = _rows(s)
    if any(r.tasks for r in rows):
        out.append("<details><summary>Per-task scores (%)</summary>")
        for cat in suite.categories.values():
            out.append(f"<details><summary>{html.escape(cat.label)}</summary><table><tr><th>Task</th>"
                       + "".join(f"<th>{html.escape(r.label)}</th>" for r in rows) + "</tr>")
            for task in cat.tasks:
                cells = []
                for r in rows:
                    v, se = r.tasks.get(task), r.task_stderr.get(task)
                    cells.append("<td class='missing'>missing</td>" if v is None else
                                 f"<td>{v:.2f}" + (f" <span class='se'>± {se:.2f}</span>" if se is not None else "") + "</td>")
                out.append(f"<tr><td>{html.escape(task)}</td>{''.join(cells)}</tr>")
            out.append("</table></details>")
        out.append("</details>")
    return "\n".join(out)


# Fixed column widths with wrapping anywhere: long model paths and sampling lists wrap inside a 1280 px page
# instead of pushing the table past it.
SETTINGS_COLUMNS = "<colgroup>" + "".join(f"<col style='width:{w}%'>" for w in (9, 8, 19, 6, 6, 10, 16, 5, 10, 11)) + "</colgroup>"


def _time_span(started: str | None, ended: str | None) -> str:
    """``2026-12-03 09:00 → 11:22`` (UTC, to the minute; the day again only when it changed)."""
    def short(t: str | None) -> str:
        return (t or "")[:16].replace("T", " ")

    start, end = short(started), short(ended)
    return f"{start} → {end[11:] if end[:10] == start[:10] else end}" if start or end else ""


def _settings_html(sections: list[Section]) -> str:
    """One line per run and benchmark: how it was produced (from the results' provenance)."""
    out = ["<details><summary>Settings of every run (provenance)</summary><table class='settings'>" + SETTINGS_COLUMNS
           + "<tr><th>Run</th><th>Benchmark</th>"
           "<th>Model</th><th>Protocol</th><th>Backend</th><th>Template</th><th>Sampling</th><th>Limit</th><th>Judge</th>"
           "<th>Time</th></tr>"]
    seen = set()
    for s in sections:
        for row in _rows(s):
            if row.label in seen:
                continue
            seen.add(row.label)
            for b, r in sorted(row.results.items()):
                p = r.provenance
                if not p:
                    out.append(f"<tr><td>{html.escape(row.label)}</td><td>{b}</td><td colspan='8' class='missing'>"
                               "no provenance (written by an older eval_suite)</td></tr>")
                    continue
                template = p.get("template") or {}
                sampling = p.get("sampling") or {}
                samp = ", ".join(f"{k} {v}" for k, v in sampling.items() if k in ("n", "temperatures", "temperature", "top_p",
                                                                                  "top_k", "max_new_tokens", "decoding"))
                judge = p.get("judge") or {}
                cells = [row.label, b, (p.get("model") or {}).get("path", ""), p.get("protocol") or "default",
                         p.get("backend") or "",
                         f"{template.get('name', p.get('prompt_format', 'raw'))} {template.get('sha256') or ''}", samp,
                         str(p.get("limit") or "full"), f"{judge.get('model') or ''} {judge.get('host') or ''}",
                         _time_span(p.get("started"), p.get("ended"))]
                out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    out.append("</table></details>")
    return "\n".join(out)


def html_page(sections: list[Section], charts: dict[str, bytes], title: str, mixed: list[str], suite: Suite) -> str:
    columns = list(_rows(sections[0])[0].values)
    models = []
    for s in sections:
        for row in _rows(s):
            for r in row.results.values():
                path = (r.provenance.get("model") or {}).get("path") or r.model
                entry = f"{row.label}: {path}"
                if entry not in models:
                    models.append(entry)
                break
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p class='meta'>Models: " + "; ".join(html.escape(m) for m in models) + "</p>",
            "<p class='meta'>Layout of Table 1 in Shi et al. (2024): six NLP categories (%), their Mean, HumanEval pass@1 "
            "(%), MT-Bench (1-10), AlpacaEval 1.0 and 2.0 win rates (%). ± is a standard error where the benchmark gives one.</p>"]
    smoke = sorted({f"{row.label} ({'; '.join(row.smoke)})" for s in sections for row in _rows(s) if row.smoke})
    if smoke:
        body.append("<div class='smoke'><b>Smoke runs, not comparable with the paper:</b> " + html.escape("; ".join(smoke)) + "</div>")
    if mixed:
        body.append("<div class='smoke'><b>Mixed protocols (--allow-mixed):</b> " + html.escape("; ".join(mixed)) + "</div>")
    body.append("<p class='meta'><b>Protocol:</b> " + html.escape(protocol_line(sections)) + "</p>")
    body += [_section_html(s, columns, suite) for s in sections]
    flagged = comparability_lines(sections)
    if flagged:
        body.append(f"<p><b><span class='flag'>{FLAG}</span> Not comparable with the paper's Table 1:</b></p><ul>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in flagged) + "</ul>")
    body.append("<h2>Charts</h2><div class='charts'>")
    for name, png in charts.items():
        body.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    body.append("</div>")
    body.append(_settings_html(sections))
    notes = _notes(sections)
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


CHARTS = {  # file -> (columns, title, y label, y range): a percent axis runs 0-100, MT-Bench's 1-10 scale to 10
    "nlp.png": (None, "NLP suite and HumanEval", "percent (accuracy, 100 − TER, pass@1)", (0, 100)),
    "alpaca_eval.png": (["AlpacaEval 1.0", "AlpacaEval 2.0"], "AlpacaEval", "win rate (%)", (0, 100)),
    "mt_bench.png": (["MT-Bench"], "MT-Bench", "score (1-10)", (0, 10)),
}


def chart_figures(sections: list[Section]) -> dict:
    """One matplotlib figure per unit (see :data:`CHARTS`); a missing value gets no bar and an 'n/a' mark,
    every bar its value (small win rates stay readable on a 0-100 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for s in sections for r in _rows(s)]
    rows = list({r.label: r for r in rows}.values())
    columns = list(rows[0].values)
    figures = {}
    for name, (cols, title, unit, limits) in CHARTS.items():
        cols = cols or [c for c in columns if c not in OPEN_ENDED]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(cols) * max(1, len(rows)) / 2 + 2), 3.4))
        x = np.arange(len(cols))
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            vals = [row.values.get(c) for c in cols]
            pos = x + i * width
            bars = ax.bar([p for p, v in zip(pos, vals) if v is not None], [v for v in vals if v is not None], width,
                          label=_label(row), color=f"C{i}")
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
            for p, v in zip(pos, vals):
                if v is None:
                    ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=7, color="#8c959f", rotation=90)
        ax.set_xticks(x + 0.4 - width / 2, cols, fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_ylim(*limits)
        ax.set_title(title)
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        figures[name] = fig
    return figures


def bar_charts(sections: list[Section]) -> dict[str, bytes]:
    """The charts as PNG bytes, by file name."""
    import matplotlib.pyplot as plt

    charts = {}
    for name, fig in chart_figures(sections).items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        charts[name] = buffer.getvalue()
    return charts


FORMATS = ("html", "csv", "latex")


def write_report(run_dirs: list[Path], out_dir: Path, baseline: Path | None = None, labels: list[str] | None = None,
                 pairs: list[tuple[str, str, str]] | None = None, allow_mixed: bool = False,
                 title: str = "Instruction Modelling: evaluation results", formats: tuple[str, ...] = ("html",)) -> list[Path]:
    """Write the report in ``formats``; returns the paths written.

    ``html``: ``report.html`` (self-contained), ``report.md`` and the chart PNGs; ``csv``: ``report.csv``;
    ``latex``: ``report.tex`` (the Table-1 view, for a paper).
    """
    if not run_dirs and not pairs:
        raise ValueError("report: give run folders, or --pair DATASET IT_RUN IM_RUN")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"report --format {' '.join(unknown)}: choose from {', '.join(FORMATS)}")
    sections, mixed = build_sections(list(run_dirs), baseline, labels, pairs, allow_mixed)
    suite = suite_of(next(iter(r.results for s in sections for r in _rows(s))))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "csv" in formats:
        written.append(out_dir / "report.csv")
        written[-1].write_text(csv_table(sections))
    if "latex" in formats:
        written.append(out_dir / "report.tex")
        written[-1].write_text(latex_table(sections, title))
    if "html" not in formats:
        return written
    charts = bar_charts(sections)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(markdown(sections, title))
    page.write_text(html_page(sections, charts, title, mixed, suite))
    written += [md, page]
    for name, png in charts.items():
        (out_dir / name).write_bytes(png)
        written.append(out_dir / name)
    return written
