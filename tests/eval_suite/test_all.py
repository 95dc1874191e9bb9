"""``eval-suite all``: fail-fast preflight, and a run killed during generation that resumes to the same results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, benchmarks_dir, lm_eval_reported_as, run_cli

from eval_suite.judge.server import JudgeServer
from eval_suite.preflight import PreflightError, check_gpu_memory

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def all_args(model: Path, run_dir: Path, judge_url: str, *extra: str) -> list[str]:
    ae = benchmarks_dir() / "alpaca_eval"
    return ["all", str(model), "--run-dir", str(run_dir), "--allow-code-execution", "--judge-base-url", judge_url,
            "--alpaca-eval-1-reference", str(ae / "text_davinci_003_outputs.json"), "--skip", "alpaca_eval_2", "nlp",
            "--limit", "2", "--n", "3", "--max-new-tokens", "24", "--batch-size", "1", *extra]


def complete_rows(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def run_until(args: list[str], store: Path, at_least: int, log: Path) -> int:
    """Start ``eval-suite``, SIGKILL it once ``store`` holds ``at_least`` samples; returns the rows it had."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "eval_suite", *args], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while complete_rows(store) < at_least:
            assert proc.poll() is None, f"ended before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up, like a crash or a lost machine
        proc.wait()
    return complete_rows(store)


def counts(stdout: str, benchmark: str) -> tuple[int, int]:
    m = re.search(rf"^{benchmark}: generated (\d+) samples, (\d+) already in", stdout, re.M)
    assert m, stdout[-3000:]
    return int(m[1]), int(m[2])


def comparable(run_dir: Path) -> dict:
    out = {}
    for path in sorted((run_dir / "results").glob("*.json")):
        r = json.loads(path.read_text())
        out[r["benchmark"]] = (r["headline"], r["metrics"], r["breakdown"])
    out["samples"] = (run_dir / "humaneval" / "samples.jsonl").read_text()
    out["alpaca"] = [o["output"] for o in json.loads((run_dir / "alpaca_eval_1" / "model_outputs.json").read_text())]
    out["mt"] = [json.loads(line)["choices"] for line in (run_dir / "mt_bench" / "model_answer.jsonl").read_text().splitlines()]
    return out


@pytest.mark.slow
def test_killed_during_humaneval_and_alpaca_eval_generation_resumes_to_the_same_results(tiny_model_dir, tmp_path):
    humaneval_rows, alpaca_rows = 2 * 3 * 2, 2  # 2 problems x 3 samples x 2 temperatures; 2 instructions
    with JudgeServer() as judge:
        run = tmp_path / "killed"
        args = all_args(tiny_model_dir, run, judge.url)
        had = run_until(args, run / "humaneval" / "generations.jsonl", 3, tmp_path / "first.log")
        assert 3 <= had < humaneval_rows
        had_alpaca = run_until(args, run / "alpaca_eval" / "generations.jsonl", 1, tmp_path / "second.log")  # AE1 and AE2 share it
        assert counts((tmp_path / "second.log").read_text(), "humaneval") == (humaneval_rows - had, had)
        assert 1 <= had_alpaca < alpaca_rows
        assert not (run / "results" / "alpaca_eval_1.json").exists()

        last = run_cli(*args)
        assert last.returncode == 0, last.stderr[-3000:]
        assert "humaneval: results already in" in last.stdout  # scored in the second run, not redone
        assert counts(last.stdout, "alpaca_eval_1") == (alpaca_rows - had_alpaca, had_alpaca)
        assert counts(last.stdout, "mt_bench") == (4, 0)

        straight = tmp_path / "uninterrupted"
        proc = run_cli(*all_args(tiny_model_dir, straight, judge.url))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts(proc.stdout, "humaneval") == (humaneval_rows, 0)
    assert comparable(run) == comparable(straight)
    assert (run / "report" / "report.html").is_file()
    provenance = json.loads((run / "results" / "alpaca_eval_1.json").read_text())["provenance"]
    assert provenance["judge_model"] == "eval-suite-rule-judge" and provenance["limit"] == 2
    assert provenance["judge"]["host"].startswith("http://127.0.0.1:")
    assert provenance["sampling"]["max_new_tokens"] == 24 and provenance["sampling"]["top_k"] is None


# ---- preflight: each failure stops before any generation, in under 10 s, with one line ----------

def preflight(tmp_path: Path, *args: str, env: dict | None = None, model: Path | None = None) -> tuple[str, float]:
    """Run a failing preflight; returns stderr and the CPU seconds it took.

    CPU time, not wall time, is what is compared with 10 s: on a machine shared by several test runs
    the wall time stretches with the load (measured: 4 s CPU, 12 s wall at load 10 on 2 cores).
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = run_cli("all", str(model or tmp_path / "no-model-needed"), "--run-dir", str(tmp_path / "run"), *args, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert time.monotonic() - start < 60  # no hang
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode != 0
    assert "preflight failed (nothing was generated)" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "run").rglob("generations.jsonl"))
    return proc.stderr, seconds


def failure_lines(stderr: str) -> list[str]:
    return [line.strip()[2:] for line in stderr.splitlines() if line.startswith("  - ")]


def test_preflight_names_every_fix_at_once_before_loading_anything(tmp_path, tiny_model_dir):
    closed = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    stderr, seconds = preflight(tmp_path, "--skip", "nlp", "--judge-base-url", closed, "--device", "cuda",
                                "--alpaca-eval-2-reference", str(tmp_path / "nope.json"))
    lines = failure_lines(stderr)
    expected = [r"pass --allow-code-execution, or --skip humaneval",
                r"alpaca_eval_1 needs --alpaca-eval-1-reference FILE, or --skip alpaca_eval_1",
                r"--alpaca-eval-2-reference .*nope.json: no such file",
                r"no-model-needed: no such directory",
                r"--device cuda: this torch has no usable CUDA device; pass --device cpu",
                r"judge at http://127.0.0.1:9/v1 is not reachable .*fix --judge-base-url, or --skip"]
    assert len(lines) == len(expected), stderr
    for line, pattern in zip(lines, expected):
        assert re.search(pattern, line), (pattern, line)
    assert seconds < 10, seconds


def test_preflight_refuses_the_wrong_reference_outputs(tmp_path, tiny_model_dir):
    ae = benchmarks_dir() / "alpaca_eval"
    with JudgeServer() as judge:
        stderr, seconds = preflight(tmp_path, "--skip", "nlp", "humaneval", "--judge-base-url", judge.url,
                                    "--alpaca-eval-1-reference", str(ae / "text_davinci_003_outputs.json"),
                                    "--alpaca-eval-2-reference", str(ae / "text_davinci_003_outputs.json"),
                                    model=tiny_model_dir)
    assert len(failure_lines(stderr)) == 1, stderr
    assert any("reference outputs are by text_davinci_003, but alpaca_eval_2 compares against gpt4_turbo" in line
               for line in failure_lines(stderr)), stderr
    assert seconds < 10


def test_preflight_lists_every_missing_nlp_dataset_and_writes_the_override_file(tmp_path, tiny_model_dir):
    env = {"HF_HOME": str(tmp_path / "empty_hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    stderr, seconds = preflight(tmp_path, "--skip", "humaneval", "alpaca_eval_1", "alpaca_eval_2", "mt_bench", env=env,
                                model=tiny_model_dir)
    (line,) = failure_lines(stderr)
    todo = tmp_path / "run" / "nlp" / "dataset_overrides.todo.yaml"
    for repo in ("SaylorTwift/bbh", "cais/mmlu", "openai/gsm8k", "allenai/ai2_arc", "EleutherAI/hendrycks_ethics",
                 "lighteval/winograd_wsc", "truthfulqa/truthful_qa"):
        assert repo in line
    assert f"fill in {todo} and pass --dataset-overrides with it, or --skip nlp" in line
    import yaml

    entries = yaml.safe_load(todo.read_text())
    assert {"arc_easy", "gsm8k_cot", "wsc273", "ethics_cm", "mmlu_anatomy"} <= set(entries)
    assert seconds < 10, seconds


def test_gpu_memory_check_names_the_fix():
    gib = 2**30
    check_gpu_memory(free_bytes=70 * gib, weights_bytes=13 * gib, kv_bytes_per_token=512 * 1024, tokens_needed=10_240,
                     device="cuda")
    with pytest.raises(PreflightError, match=r"cuda: 14.0 GiB free, but the model needs 13.0 GiB plus 5.0 GiB of KV "
                                             r"cache for one sample; free the GPU"):
        check_gpu_memory(14 * gib, 13 * gib, 512 * 1024, 10_240, "cuda")


def test_preflight_names_an_unsupported_lm_eval(tmp_path):
    """lm-eval reported as 0.4.13: one more preflight line, nothing run."""
    stderr, _ = preflight(tmp_path, "--skip", "humaneval", "alpaca_eval_1", "alpaca_eval_2", "mt_bench", "--device", "cpu",
                          env=lm_eval_reported_as("0.4.13", tmp_path))
    assert any(line.startswith("eval-suite nlp runs on lm-eval >=0.4.11,<0.4.12") and line.endswith(
        "this environment has lm-eval 0.4.13: pip install 'lm-eval[hf]>=0.4.11,<0.4.12'") for line in failure_lines(stderr)), stderr
