"""A number that would silently change a benchmark is refused by the command line before any work."""

from __future__ import annotations

import pytest
from conftest import run_cli


@pytest.mark.parametrize("args, message", [
    (["humaneval", "score", "--samples", "s.jsonl", "--allow-code-execution", "--timeout", "0.05"],
     "argument --timeout: 0.05 should be at least 1 second"),
    (["humaneval", "score", "--samples", "s.jsonl", "--allow-code-execution", "--k", "0"], "--k: 0 should be above 0"),
    (["humaneval", "score", "--samples", "s.jsonl", "--allow-code-execution", "--k", "5"], "--k must include 1"),
    (["humaneval", "sample", "--model", "m", "--run-dir", "r", "--temperatures", "-1"],
     "--temperatures: -1 should be at least 0"),
    (["humaneval", "sample", "--model", "m", "--run-dir", "r", "--limit", "0"], "--limit: 0 should be above 0"),
    (["humaneval", "sample", "--model", "m", "--run-dir", "r", "--limit", "-1"], "--limit: -1 should be above 0"),
    (["humaneval", "sample", "--model", "m", "--run-dir", "r", "--n", "0"], "--n: 0 should be above 0"),
    (["all", "m", "--run-dir", "r", "--timeout", "0"], "--timeout: 0 should be at least 1 second"),
    (["all", "m", "--run-dir", "r", "--temperatures", "nan"], "--temperatures: nan should be at least 0"),
    (["all", "m", "--run-dir", "r", "--limit", "0"], "--limit: 0 should be above 0"),
    (["all", "m", "--run-dir", "r", "--k", "5"], "all: --k must include 1 (the headline is pass@1); got [5]"),
    (["mt-bench", "generate", "--model", "m", "--run-dir", "r", "--limit", "0"], "--limit: 0 should be above 0"),
    (["nlp", "--model", "m", "--run-dir", "r", "--limit", "0"], "--limit: 0 should be above 0"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, args, message):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()  # no run folder: nothing was started
