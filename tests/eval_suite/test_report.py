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
    header, _, base_row, im_row, delta_row = md.splitlines()[:5]
    assert header == "| Run | U&K | Multi | CR | M&C | BBH | S&H | Mean | MT-Bench | AlpacaEval 1.0 | AlpacaEval 2.0 |"
    assert base_row.startswith("| it (baseline) | 40.00 | 40.00 | 40.00 | 25.00 | 40.00 | 40.00 | 37.50 | 4.00 | 20.00 | 2.00 |")
    assert im_row.startswith("| im | 42.00 | 42.00 | 42.00 | 36.00 | 42.00 | 42.00 | 41.00 | 3.50 | 25.00 | – |")
    assert delta_row == ("| Δ im − it | ▲ +2.00 | ▲ +2.00 | ▲ +2.00 | ▲ +11.00 | ▲ +2.00 | ▲ +2.00 | ▲ +3.50 "
                         "| ▼ -0.50 | ▲ +5.00 | – |")
    page = (out / "report.html").read_text()
    assert "<table>" in page and "▼ -0.50" in page and 'style="color:#cf222e"' in page
    for png in ("nlp.png", "open_ended.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
