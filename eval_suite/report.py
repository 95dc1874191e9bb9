"""Table-1-style report: NLP categories and Mean, MT-Bench, AlpacaEval 1.0/2.0, with IM-IT deltas.

``python -m eval_suite report runs/im --baseline runs/it --out report/`` writes ``report.md``,
``report.html`` and bar charts (``nlp.png``, ``open_ended.png``). Every column is higher-is-better
(lower-is-better tasks were flipped by the suite's aggregation), so an up arrow is always a gain.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from eval_suite.nlp.bench import Suite, table1
from eval_suite.results import BenchmarkResult, load_run

OPEN_ENDED = {"MT-Bench": "mt_bench", "AlpacaEval 1.0": "alpaca_eval_1", "AlpacaEval 2.0": "alpaca_eval_2"}


@dataclass
class Row:
    label: str
    values: dict[str, float | None]  # column -> value
    notes: list[str]


def suite_of(results: dict[str, BenchmarkResult]) -> Suite:
    """The suite the NLP run used (stored in its result), else the paper's."""
    nlp = results.get("nlp")
    return Suite.model_validate(nlp.config["suite"]) if nlp and "suite" in nlp.config else Suite.load()


def make_row(label: str, results: dict[str, BenchmarkResult], suite: Suite) -> Row:
    nlp, humaneval = results.get("nlp"), results.get("humaneval")
    notes: list[str] = []
    values: dict[str, float | None] = {}
    if nlp or humaneval:
        combined = table1(nlp.breakdown.get("raw", {}) if nlp else {}, suite, humaneval)
        notes += combined.notes + (nlp.notes if nlp else [])
        values.update({suite.categories[c].label: v for c, v in combined.breakdown["categories"].items()})
        values["Mean"] = combined.headline
    else:
        values.update({c.label: None for c in suite.categories.values()} | {"Mean": None})
    for column, benchmark in OPEN_ENDED.items():
        result = results.get(benchmark)
        values[column] = result.headline if result else None
        notes += [f"{column}: {n}" for n in result.notes] if result else []
    return Row(label, values, notes)


def build_rows(run_dirs: list[Path], baseline: Path | None, labels: list[str] | None = None) -> tuple[list[Row], Row | None]:
    runs = {d: load_run(d) for d in ([baseline] if baseline else []) + list(run_dirs)}
    suite = suite_of(next(iter(runs.values())))
    labels = labels or [d.name for d in run_dirs]
    rows = [make_row(label, runs[d], suite) for label, d in zip(labels, run_dirs)]
    base = make_row(f"{baseline.name} (baseline)", runs[baseline], suite) if baseline else None
    return rows, base


def delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _fmt_delta(d: float | None) -> str:
    if d is None:
        return "–"
    arrow = "▲" if d > 0 else "▼" if d < 0 else "="
    return f"{arrow} {d:+.2f}"


def markdown(rows: list[Row], base: Row | None) -> str:
    columns = list(rows[0].values)
    lines = ["| Run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in ([base] if base else []) + rows:
        lines.append(f"| {row.label} | " + " | ".join(_fmt(row.values[c]) for c in columns) + " |")
        if base and row is not base:
            lines.append(f"| Δ {row.label} − {base.label.split(' ')[0]} | "
                         + " | ".join(_fmt_delta(delta(row.values[c], base.values[c])) for c in columns) + " |")
    notes = sorted({f"{r.label}: {n}" for r in ([base] if base else []) + rows for n in r.notes})
    footer = ["", "NLP columns: percent, category = mean of its tasks, Mean = mean of categories (Table 1). "
              "MT-Bench: 1-10. AlpacaEval: win rate in %."]
    return "\n".join(lines + footer + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def html_table(rows: list[Row], base: Row | None) -> str:
    columns = list(rows[0].values)
    out = ["<table>", "<tr><th>Run</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for row in ([base] if base else []) + rows:
        out.append(f"<tr><td>{html.escape(row.label)}</td>" + "".join(f"<td>{_fmt(row.values[c])}</td>" for c in columns) + "</tr>")
        if base and row is not base:
            cells = []
            for c in columns:
                d = delta(row.values[c], base.values[c])
                color = "" if d is None or d == 0 else (' style="color:#1a7f37"' if d > 0 else ' style="color:#cf222e"')
                cells.append(f"<td{color}>{html.escape(_fmt_delta(d))}</td>")
            out.append(f"<tr><td>Δ {html.escape(row.label)}</td>" + "".join(cells) + "</tr>")
    out.append("</table>")
    notes = sorted({f"{r.label}: {n}" for r in ([base] if base else []) + rows for n in r.notes})
    body = "\n".join(out) + ("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes else "")
    style = "table{border-collapse:collapse;font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>eval_suite report</title><style>{style}</style></head><body>{body}</body></html>\n"


def bar_charts(rows: list[Row], base: Row | None, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    all_rows = ([base] if base else []) + rows
    columns = list(rows[0].values)
    groups = {"nlp.png": [c for c in columns if c not in OPEN_ENDED], "open_ended.png": list(OPEN_ENDED)}
    written = []
    for name, cols in groups.items():
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 3.5))
        x = np.arange(len(cols))
        width = 0.8 / len(all_rows)
        for i, row in enumerate(all_rows):
            ax.bar(x + i * width, [row.values[c] or 0.0 for c in cols], width, label=row.label)
        ax.set_xticks(x + 0.4 - width / 2, cols)
        ax.legend(fontsize="small")
        ax.set_title("NLP suite (%, Table 1)" if name == "nlp.png" else "MT-Bench (1-10) and AlpacaEval (win rate %)")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def write_report(run_dirs: list[Path], out_dir: Path, baseline: Path | None = None, labels: list[str] | None = None) -> list[Path]:
    rows, base = build_rows(run_dirs, baseline, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(markdown(rows, base))
    page.write_text(html_table(rows, base))
    return [md, page, *bar_charts(rows, base, out_dir)]
