"""Killing a judging run and starting it again repeats no judge call (counted by the server)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, benchmarks_dir

from eval_suite.judge.server import JudgeServer
from eval_suite.mtbench import bench as mt


def cache_rows(path: Path) -> int:
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def alpaca_eval_job(run_dir: Path) -> tuple[list[str], int]:
    ae = benchmarks_dir() / "alpaca_eval"
    return ["alpaca-eval", "judge", "--version", "alpaca_eval_1", "--run-dir", str(run_dir), "--limit", "12",
            "--model-outputs", str(ae / "alpaca-7b_outputs.json"), "--reference-outputs",
            str(ae / "text_davinci_003_outputs.json")], 12


def mt_bench_job(run_dir: Path) -> tuple[list[str], int]:
    answers = run_dir.parent / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "model_id": "m",
                                           "choices": [{"index": 0, "turns": ["first answer", "second answer"]}]}) + "\n"
                               for q in mt.load_questions(limit=6)))
    return ["mt-bench", "judge", "--run-dir", str(run_dir), "--answers", str(answers), "--limit", "6"], 12


@pytest.mark.parametrize("job", [alpaca_eval_job, mt_bench_job], ids=["alpaca_eval", "mt_bench"])
def test_killed_judging_run_resumes_without_repeating_calls(tmp_path, job):
    run_dir = tmp_path / "run"
    args, total = job(run_dir)
    cache = run_dir / "judge_cache.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    answered_first = 5
    with JudgeServer() as first:
        first.state.hang_after = answered_first  # answer 5 requests, then hold every further one
        log = tmp_path / "first_run.log"
        with open(log, "w") as out:  # a file, not a pipe: an unread pipe would stall the child when full
            proc = subprocess.Popen([sys.executable, "-m", "eval_suite", *args, "--judge-base-url", first.url,
                                     "--judge-concurrency", "2"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: proc.poll() is not None or (
                first.state.answered == answered_first and first.state.requests > answered_first
                and cache_rows(cache) == answered_first))
            assert proc.poll() is None, f"the first run ended on its own:\n{log.read_text()[-3000:]}"
        finally:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up, like a crash or a lost machine
            proc.wait()
        answered_before_kill = dict(first.state.answered_by_request)
        port = first.httpd.server_address[1]
    assert len(answered_before_kill) == answered_first

    # A fresh server on the same URL (the cache is keyed by the judge's URL): only the cache carries answers over.
    with JudgeServer(port=port) as second:
        proc = subprocess.run([sys.executable, "-m", "eval_suite", *args, "--judge-base-url", second.url,
                               "--judge-concurrency", "2"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answered_after = dict(second.state.answered_by_request)
    assert len(answered_after) == total - answered_first
    assert not set(answered_after) & set(answered_before_kill), "a request answered before the kill was sent again"
    assert all(count == 1 for count in answered_after.values())
    result = json.loads(next((run_dir / "results").glob("*.json")).read_text())
    assert result["config"]["judge_cache_hits"] == answered_first
    assert result["config"]["judge_calls"] == total - answered_first
