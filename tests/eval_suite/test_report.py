"""The Table-1 report from two run directories, and the results schema it reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, run_cli

from eval_suite.nlp.bench import Suite, table1
from eval_suite.results import BenchmarkResult, load_result, load_run


def make_run(run_dir, nlp_scale: float, mt: float, ae1: float, ae2: float | None, pass1: float):
    suite = Suite.load()
    raw = {name: (nlp_scale / spec.scale if spec.higher_is_better else (100 - nlp_scale) / spec.scale)
           for name, spec in suite.lm_eval_tasks().items()}
    nlp = table1(raw, suite)
    nlp.model = run_dir.name
    nlp.config["suite"] = suite.model_dump()
    nlp.write(run_dir)
    BenchmarkResult(benchmark="humaneval", model=run_dir.name, headline=100 * pass1, metrics={"pass@1": pass1}).write(run_dir)
    BenchmarkResult(benchmark="mt_bench", model=run_dir.name, headline=mt).write(run_dir)
    BenchmarkResult(benchmark="alpaca_eval_1", model=run_dir.name, headline=ae1).write(run_dir)
    if ae2 is not None:
        BenchmarkResult(benchmark="alpaca_eval_2", model=run_dir.name, headline=ae2).write(run_dir)


def test_report_from_two_run_directories(tmp_path):
    it, im = tmp_path / "it", tmp_path / "im"
    make_run(it, nlp_scale=40.0, mt=4.0, ae1=20.0, ae2=2.0, pass1=0.10)
    make_run(im, nlp_scale=42.0, mt=3.5, ae1=25.0, ae2=None, pass1=0.30)
    out = tmp_path / "report"
    proc = run_cli("report", str(im), "--baseline", str(it), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    title, _, header, _, base_row, im_row, delta_row = md.splitlines()[:7]
    assert title == "# Instruction Modelling: evaluation results"
    assert header == ("| Run | U&K | Multi | CR | M&C | BBH | S&H | Mean | HumanEval | MT-Bench | AlpacaEval 1.0 "
                      "| AlpacaEval 2.0 |")
    # Results without a recorded protocol follow the default one: every number is marked † (not Table 1's).
    assert base_row == ("| it (baseline) | 40.00† | 40.00† | 40.00† | 25.00† | 40.00† | 40.00† | 37.50† | 10.00† | 4.00† "
                        "| 20.00† | 2.00† |")
    assert im_row == "| im | 42.00† | 42.00† | 42.00† | 36.00† | 42.00† | 42.00† | 41.00† | 30.00† | 3.50† | 25.00† | – |"
    assert ("- im: U&K, Multi, CR, M&C, BBH, S&H, Mean, HumanEval: protocol default, not paper" in md
            and "- im: MT-Bench, AlpacaEval 1.0: protocol default, not paper; judge unknown, not GPT-4" in md), md
    assert delta_row == ("| Δ im − it | ▲ +2.00 | ▲ +2.00 | ▲ +2.00 | ▲ +11.00 | ▲ +2.00 | ▲ +2.00 | ▲ +3.50 "
                         "| ▲ +20.00 | ▼ -0.50 | ▲ +5.00 | – |")
    page = (out / "report.html").read_text()
    assert "<table>" in page and "▼ -0.50" in page and "class='loss'" in page and "class='gain'" in page
    assert page.count("src='data:image/png;base64,") == 3  # charts inline: %, win rate %, MT-Bench 1-10
    assert "<td class='missing' title='not run or no score'>missing</td>" in page  # AlpacaEval 2.0 of im
    for png in ("nlp.png", "alpaca_eval.png", "mt_bench.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def with_provenance(run_dir, benchmark: str, **fields):
    path = run_dir / "results" / f"{benchmark}.json"
    result = load_result(path)
    result.provenance = {"model": {"path": str(run_dir)}, "template": {"name": "tokenizer", "sha256": "abc"},
                         "sampling": {"n": 20, "temperatures": [0.1, 0.7], "top_k": None}, "limit": None,
                         "judge_model": "gpt-4-0613", **fields}
    result.write(run_dir)


def test_report_refuses_mixed_protocols_unless_allowed_and_marks_smoke_runs(tmp_path):
    it, im = tmp_path / "it", tmp_path / "im"
    make_run(it, nlp_scale=40.0, mt=4.0, ae1=20.0, ae2=2.0, pass1=0.10)
    make_run(im, nlp_scale=42.0, mt=3.5, ae1=25.0, ae2=None, pass1=0.30)
    with_provenance(it, "humaneval")
    with_provenance(im, "humaneval", sampling={"n": 1, "temperatures": [0.1, 0.7], "top_k": None})
    with_provenance(im, "mt_bench", limit=3, judge_model="eval-suite-rule-judge")
    out = tmp_path / "report"
    proc = run_cli("report", str(im), "--baseline", str(it), "--out", str(out))
    assert proc.returncode != 0
    assert "runs with different protocols in one report (humaneval:" in proc.stderr and "differ in sampling" in proc.stderr
    assert "--allow-mixed" in proc.stderr
    proc = run_cli("report", str(im), "--baseline", str(it), "--out", str(out), "--allow-mixed")
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "| im [smoke] |" in md
    page = (out / "report.html").read_text()
    assert "Smoke runs, not comparable with the paper:</b> im (mt_bench: --limit 3, rule-based test judge)" in page
    assert "Mixed protocols (--allow-mixed):</b> humaneval:" in page


def test_several_pairs_get_one_section_each_and_notes_once(tmp_path):
    runs = {}
    for name, scale in [("dolly_it", 40.0), ("dolly_im", 44.0), ("lima_it", 30.0), ("lima_im", 33.0)]:
        runs[name] = tmp_path / name
        make_run(runs[name], nlp_scale=scale, mt=4.0, ae1=20.0, ae2=None, pass1=0.1)
    out = tmp_path / "report"
    proc = run_cli("report", "--pair", "Alpagasus Dolly 3k", str(runs["dolly_it"]), str(runs["dolly_im"]),
                   "--pair", "LIMA", str(runs["lima_it"]), str(runs["lima_im"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "## Alpagasus Dolly 3k" in md and "## LIMA" in md
    dolly, lima = md.split("## LIMA")
    assert "| IT (dolly_it) | 40.00† |" in dolly and "| Δ IM (dolly_im) − IT | ▲ +4.00 |" in dolly
    assert "| IT (lima_it) | 30.00† |" in lima and "| Δ IM (lima_im) − IT | ▲ +3.00 |" in lima
    assert md.count("- NLP: M&C: no score for GSM8K") == 0  # every task has a score here: no notes to repeat


def test_results_schema_rejects_bad_files_with_file_and_field(tmp_path):
    path = tmp_path / "results" / "mt_bench.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"benchmark": "mt_bench", "model": "m", "headline": "high"}))
    with pytest.raises(ValueError, match=rf"{path}: not a valid eval_suite result \(field headline"):
        load_result(path)
    path.write_text(json.dumps({"benchmark": "mmlu", "model": "m", "headline": 1.0}))
    with pytest.raises(ValueError, match="field benchmark"):
        load_run(tmp_path)


def test_eval_suite_never_imports_axolotl():
    modules = ["eval_suite.__main__", "eval_suite.nlp.bench", "eval_suite.humaneval.bench", "eval_suite.alpacaeval.bench",
               "eval_suite.mtbench.bench", "eval_suite.report", "eval_suite.judge.server", "eval_suite.generation"]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
           "from eval_suite.__main__ import build_parser\nbuild_parser()\n" \
           "assert 'axolotl' not in sys.modules, sorted(m for m in sys.modules if 'axolotl' in m)\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")


def test_report_page_renders_in_headless_chromium(tmp_path):
    """The page as a reader sees it: rendered by Chromium, with the title, every column and the charts."""
    import matplotlib.image

    it, im = tmp_path / "it", tmp_path / "im"
    make_run(it, nlp_scale=40.0, mt=4.0, ae1=20.0, ae2=2.0, pass1=0.10)
    make_run(im, nlp_scale=42.0, mt=3.5, ae1=25.0, ae2=None, pass1=0.30)
    out = tmp_path / "report"
    assert run_cli("report", "--pair", "Alpagasus Dolly 3k", str(it), str(im), "--out", str(out)).returncode == 0
    page = (out / "report.html").as_uri()
    common = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>Instruction Modelling: evaluation results</title>" in html
    assert "<h1>Instruction Modelling: evaluation results</h1>" in html and "<h2>Alpagasus Dolly 3k</h2>" in html
    for column in ("U&amp;K", "Multi", "CR", "M&amp;C", "BBH", "S&amp;H", "Mean", "HumanEval", "MT-Bench",
                   "AlpacaEval 1.0", "AlpacaEval 2.0"):
        assert f"<th>{column}<br>" in html, column
    assert html.count('src="data:image/png;base64,') == 3
    shot = tmp_path / "shot.png"
    proc = subprocess.run([*common, "--window-size=1280,1400", f"--screenshot={shot}", page], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1400, 1280) and pixels.std() > 0.05  # not a blank page


def test_incomplete_categories_and_mean_are_marked_partial_not_shown_as_table1_numbers(tmp_path):
    """A smoke run's nlp.json with MMLU missing and no HumanEval: U&K has 4 of 5 tasks, M&C 1 of 2. Neither
    they nor the Mean get a number or a delta; the cells say partial, with the mean over what is there."""
    it, im = tmp_path / "it", tmp_path / "im"
    make_run(it, nlp_scale=40.0, mt=4.0, ae1=20.0, ae2=2.0, pass1=0.10)
    make_run(im, nlp_scale=42.0, mt=3.5, ae1=25.0, ae2=None, pass1=0.30)
    nlp = load_result(im / "results" / "nlp.json")
    suite = Suite.load()
    raw = {**nlp.breakdown["raw"], "MMLU": None}
    partial = table1(raw, suite)
    partial.model, partial.config["suite"] = "im", suite.model_dump()
    partial.write(im)
    (im / "results" / "humaneval.json").unlink()
    out = tmp_path / "report"
    proc = run_cli("report", str(im), "--baseline", str(it), "--out", str(out), "--format", "html", "csv", "latex")
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    im_row, delta_row = md.splitlines()[5:7]
    # Default-protocol results: every shown number, partial means included, also carries the † mark.
    assert im_row == ("| im | partial (42.00)† | 42.00† | 42.00† | partial (42.00)† | 42.00† | 42.00† | partial (42.00)† | – "
                      "| 3.50† | 25.00† | – |")
    flagged = md.split("Not comparable with the paper's Table 1:")[1]
    assert "U&K partial: no score for MMLU" in flagged and "M&C partial: no score for HumanEval" in flagged
    assert delta_row.startswith("| Δ im − it | – | ▲ +2.00 | ▲ +2.00 | – | ▲ +2.00 | ▲ +2.00 | – | – |")
    assert "- NLP: U&K: not reported, 4 of 5 tasks have a score (missing: MMLU); partial mean 42.00 (im)" in md
    assert "- NLP: M&C: not reported, 1 of 2 tasks have a score (missing: HumanEval); partial mean 42.00 (im)" in md
    assert "- NLP: Mean: not reported, 4 of 6 categories are complete (incomplete: U&K, M&C) (im)" in md
    page = (out / "report.html").read_text()
    assert page.count("<td class='partial' title='") == 3
    assert "title='U&amp;K: not reported, 4 of 5 tasks have a score (missing: MMLU); partial mean 42.00'>(42.00) " in page
    im_csv = (out / "report.csv").read_text().splitlines()[2]  # the values stay empty, the last columns say why
    assert im_csv.startswith('Runs,run,im,,42.00,42.00,,42.00,42.00,,,3.50,25.00,,"U&K: not reported, 4 of 5 tasks')
    assert r"im & (42.00)$^\dagger$ & 42.00 & 42.00 & (42.00)$^\dagger$ &" in (out / "report.tex").read_text()


def long_provenance(run_dir, benchmarks=("nlp", "humaneval", "mt_bench", "alpaca_eval_1")):
    """Provenance as a real 7B run writes it: a long checkpoint path, the HumanEval sampling, a judge, times."""
    for benchmark in benchmarks:
        with_provenance(run_dir, benchmark, model={"path": "/mnt/shared/home/researcher/checkpoints/llama-2-7b-instruction-modelling"
                                                            f"-alpagasus-dolly-3k/{run_dir.name}/checkpoint-final-merged"},
                        backend="hf", sampling={"n": 20, "temperatures": [0.1, 0.7], "top_p": 0.95, "top_k": None,
                                                "max_new_tokens": 512}, judge={"model": "gpt-4-0613", "host": "api.openai.com"},
                        started="2026-12-03T09:00:00.123456+00:00", ended="2026-12-03T11:22:33.654321+00:00")


def test_provenance_table_fits_a_1280_px_page(tmp_path):
    """Every folded section opened, as a reader would: the page is no wider than a 1280 px window and the
    provenance table ends inside it (long checkpoint paths wrap instead of widening it)."""
    it, im = tmp_path / "it", tmp_path / "im"
    make_run(it, nlp_scale=40.0, mt=4.0, ae1=20.0, ae2=2.0, pass1=0.10)
    make_run(im, nlp_scale=42.0, mt=3.5, ae1=25.0, ae2=None, pass1=0.30)
    long_provenance(it)
    long_provenance(im)
    out = tmp_path / "report"
    assert run_cli("report", str(im), "--baseline", str(it), "--out", str(out)).returncode == 0
    measure = ("<script>document.querySelectorAll('details').forEach(d => d.open = true);"
               "const t = Array.from(document.querySelectorAll('table')).pop();"  # the provenance table: the last one
               "document.body.dataset.measure = JSON.stringify({page: document.documentElement.scrollWidth, "
               "view: document.documentElement.clientWidth, window: window.innerWidth, table: Math.ceil(t.getBoundingClientRect().right)});</script></body>")
    opened = out / "opened.html"
    opened.write_text((out / "report.html").read_text().replace("</body>", measure))
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400",
                          "--dump-dom", opened.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import html as html_lib
    import re

    found = re.search(r'data-measure="([^"]+)"', dom.stdout)
    assert found, dom.stdout[-2000:]
    sizes = json.loads(html_lib.unescape(found[1]))
    # view: the window's 1280 px less the vertical scroll bar
    assert sizes["window"] == 1280 and sizes["page"] <= sizes["view"] and sizes["table"] <= sizes["view"], sizes


def test_csv_and_latex_exports_of_the_table1_view_and_chart_axes_in_their_units(tmp_path):
    import csv

    from eval_suite.report import build_sections, chart_figures

    it, im = tmp_path / "it", tmp_path / "im"
    make_run(it, nlp_scale=40.0, mt=4.0, ae1=20.0, ae2=2.0, pass1=0.10)
    make_run(im, nlp_scale=42.0, mt=3.5, ae1=25.0, ae2=None, pass1=0.30)
    out = tmp_path / "report"
    proc = run_cli("report", str(im), "--baseline", str(it), "--out", str(out), "--format", "csv", "latex")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.tex"]  # only what was asked for
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["kind"], r["run"]) for r in rows] == [("baseline", "it (baseline)"), ("run", "im"), ("delta", "Δ im − it")]
    assert rows[1] | {} == {**rows[1], "U&K": "42.00", "M&C": "36.00", "Mean": "41.00", "HumanEval": "30.00",
                           "MT-Bench": "3.50", "AlpacaEval 2.0": "", "incomplete": "", "smoke": ""}
    assert (rows[2]["Mean"], rows[2]["MT-Bench"], rows[2]["AlpacaEval 2.0"]) == ("+3.50", "-0.50", "")
    tex = (out / "report.tex").read_text()
    assert r"\begin{tabular}{lrrrrrrrrrrr}" in tex
    assert r"Run & U\&K & Multi & CR & M\&C & BBH & S\&H & Mean & HumanEval & MT-Bench & AlpacaEval 1.0 & AlpacaEval 2.0 \\" in tex
    assert r"im & 42.00 & 42.00 & 42.00 & 36.00 & 42.00 & 42.00 & 41.00 & 30.00 & 3.50 & 25.00 & -- \\" in tex
    assert r"$\Delta$ im -- it & \textit{+2.00} &" in tex and tex.count(r"\\") == 4
    sections, _ = build_sections([im], it)
    axes = {name: fig.axes[0] for name, fig in chart_figures(sections).items()}
    assert axes["nlp.png"].get_ylim() == (0, 100) and axes["nlp.png"].get_ylabel().startswith("percent")
    assert axes["alpaca_eval.png"].get_ylim() == (0, 100) and axes["mt_bench.png"].get_ylim() == (0, 10)
