"""One results schema for every benchmark, read by the report.

A run directory holds ``results/<benchmark>.json``, one :class:`BenchmarkResult` per benchmark, next
to the raw artefacts each benchmark writes (samples, model outputs, annotations, judgments).

Example:
    >>> r = BenchmarkResult(benchmark="mt_bench", model="my-sft", headline=4.5, metrics={"turn_1": 4.8})
    >>> path = r.write("runs/im")  # doctest: +SKIP
    >>> load_run("runs/im")["mt_bench"].headline  # doctest: +SKIP
    4.5
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Benchmark = Literal["nlp", "humaneval", "alpaca_eval_1", "alpaca_eval_2", "mt_bench"]
BENCHMARKS: tuple[str, ...] = Benchmark.__args__


class BenchmarkResult(BaseModel):
    """The scores of one model on one benchmark."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    benchmark: Benchmark = Field(description="Which benchmark these scores are for.")
    model: str = Field(description="Model path or name that produced the outputs.")
    headline: float | None = Field(
        description="The number Table 1 shows: NLP mean of categories and win rates in %, HumanEval best "
        "pass@1 in %, MT-Bench average score (1-10). None when it could not be computed."
    )
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Other summary metrics.")
    breakdown: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description="Named tables of sub-scores, e.g. {'categories': {...}, 'tasks': {...}} or per temperature.",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Settings used; never secrets.")
    notes: list[str] = Field(default_factory=list, description="What was skipped or approximated, and why.")
    provenance: dict[str, Any] = Field(
        default_factory=dict,
        description="How it was produced (eval_suite.provenance.record): model and config hash, backend, template, "
        "sampling, limit, judge as the server reports it, reference hash, package versions, start and end.",
    )
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    duration_seconds: float | None = None

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "results" / f"{self.benchmark}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def load_result(path: str | Path) -> BenchmarkResult:
    """Read one results file; a bad file raises a ValueError naming the file and the field."""
    path = Path(path)
    try:
        return BenchmarkResult.model_validate_json(path.read_text())
    except ValidationError as e:
        problems = "; ".join(f"field {'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: not a valid eval_suite result ({problems})") from None


def load_run(run_dir: str | Path) -> dict[str, BenchmarkResult]:
    """All results of a run directory, keyed by benchmark."""
    results_dir = Path(run_dir) / "results"
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no results/ folder; run a benchmark with --run-dir {run_dir} first")
    return {r.benchmark: r for r in map(load_result, sorted(results_dir.glob("*.json")))}


def print_summary(result: BenchmarkResult, keys: list[str]) -> None:
    """Print a JSON object of the chosen metrics as the last line of output (scripts parse it)."""
    summary = {k: result.metrics.get(k) for k in keys}
    print(json.dumps(summary), flush=True)
