"""The paper's NLP suite through lm-eval, and Table 1's aggregation.

What runs is lm-eval task/group YAML (``eval_suite/nlp/tasks``, group ``im_sft_eval``); how the
scores are averaged is ``eval_suite/nlp/suite.yaml``. Tasks are pointed at other data (a
script-free mirror, or a local copy for offline runs) by *dataset overrides*: small YAML files
generated at run time that ``include:`` the registered task config and replace its dataset fields,
placed on lm-eval's include path after everything else so they win.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from eval_suite.protocol import DEFAULT, LowerIsBetter, Protocol, lower_is_better_note
from eval_suite.results import BenchmarkResult

HERE = Path(__file__).parent
TASKS_DIR = HERE / "tasks"
SUITE_FILE = HERE / "suite.yaml"
DEFAULT_OVERRIDES = HERE / "dataset_overrides.yaml"


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    result: str | None = Field(None, description="lm-eval task or group whose metric is read")
    source: Literal["lm_eval", "humaneval"] = "lm_eval"
    metric: str = Field(description="lm-eval metric key, e.g. 'acc_norm,none', or 'pass@1' for HumanEval")
    higher_is_better: bool = True
    scale: float = Field(100.0, description="multiplier to percent (100 for fractions, 1 for TER)")

    def percent(self, value: float, lower_is_better: LowerIsBetter = "flip") -> float:
        """The value in percent as it enters its category; a lower-is-better metric is flipped to
        ``100 - value`` unless the protocol adds it as it is (``"as-is"``, the authors' code)."""
        if self.higher_is_better or lower_is_better == "as-is":
            return self.scale * value
        return 100.0 - self.scale * value


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    tasks: dict[str, TaskSpec]


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lm_eval_group: str
    categories: dict[str, Category]

    @classmethod
    def load(cls, path: str | Path = SUITE_FILE) -> Suite:
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()))
        except Exception as e:
            raise ValueError(f"{path}: not a valid suite file: {e}") from None

    def lm_eval_tasks(self) -> dict[str, TaskSpec]:
        return {name: spec for c in self.categories.values() for name, spec in c.tasks.items() if spec.source == "lm_eval"}


def tables_of(lm_eval_output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**lm_eval_output.get("results", {}), **lm_eval_output.get("groups", {})}


def raw_scores(lm_eval_output: dict[str, Any], suite: Suite) -> dict[str, float | None]:
    """Each suite task's metric as lm-eval reported it (task results, then group results)."""
    tables = tables_of(lm_eval_output)
    return {name: _number(tables.get(spec.result, {}).get(spec.metric)) for name, spec in suite.lm_eval_tasks().items()}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for missing


def aggregate(raw: dict[str, float | None], suite: Suite, protocol: Protocol = DEFAULT
              ) -> tuple[dict[str, float], dict[str, float | None], float | None, list[str]]:
    """Table 1's numbers from raw task scores, lower-is-better metrics entering as ``protocol`` says.

    Returns:
        (task percents, category means, mean of categories, notes on anything missing). A category
        has a value only when every one of its tasks has a score, and the Mean only when every
        category has one: a mean over fewer is not Table 1's number (see :func:`incomplete` for what
        is missing and the partial means).
    """
    tasks: dict[str, float] = {}
    categories: dict[str, float | None] = {}
    for cat_name, cat in suite.categories.items():
        have = {name: spec.percent(raw[name], protocol.lower_is_better) for name, spec in cat.tasks.items()
                if raw.get(name) is not None}
        tasks.update(have)
        categories[cat_name] = statistics.fmean(have.values()) if len(have) == len(cat.tasks) else None
    complete = all(v is not None for v in categories.values())
    mean = statistics.fmean(categories.values()) if complete else None
    return tasks, categories, mean, [gap["reason"] for gap in incomplete(raw, suite, protocol).values()]


def incomplete(raw: dict[str, float | None], suite: Suite, protocol: Protocol = DEFAULT) -> dict[str, dict[str, Any]]:
    """What keeps a category (by name) or the Mean (``"mean"``) from being reported.

    Returns:
        name -> a JSON record: ``have``/``of`` counts, the ``missing`` tasks (or incomplete categories'
        labels), ``partial_mean`` (the mean over what is there, never a Table 1 number; None when
        nothing is) and ``reason``, one line saying all that.
    """
    out: dict[str, dict[str, Any]] = {}
    complete: list[float] = []
    for cat_name, cat in suite.categories.items():
        have = [spec.percent(raw[name], protocol.lower_is_better) for name, spec in cat.tasks.items()
                if raw.get(name) is not None]
        missing = [name for name in cat.tasks if raw.get(name) is None]
        if not missing:
            complete.append(statistics.fmean(have))
            continue
        partial = statistics.fmean(have) if have else None
        out[cat_name] = {"have": len(have), "of": len(cat.tasks), "missing": missing, "partial_mean": partial,
                         "reason": f"{cat.label}: not reported, {len(have)} of {len(cat.tasks)} tasks have a score "
                                   f"(missing: {', '.join(missing)})" + (f"; partial mean {partial:.2f}" if have else "")}
    if out:
        labels = [suite.categories[c].label for c in out]
        partial = statistics.fmean(complete) if complete else None
        n = len(suite.categories)
        out["mean"] = {"have": n - len(out), "of": n, "missing": labels, "partial_mean": partial,
                       "reason": f"Mean: not reported, {n - len(out)} of {n} categories are complete "
                                 f"(incomplete: {', '.join(labels)})"}
    return out


# The lm-eval releases this suite runs on; pyproject's `eval` extra declares the same range. lm-eval
# 0.4.12 rebuilt the task index that the overrides (here) and the dataset preflight read: its entries
# became `Entry` objects and `TaskManager._get_config` went away.
LM_EVAL_RANGE = ("0.4.11", "0.4.12")  # [lowest, first unsupported)


def check_lm_eval_version(installed: str | None = None) -> None:
    """A one-sentence ``ValueError`` when the installed lm-eval is outside ``LM_EVAL_RANGE``."""
    from importlib.metadata import version

    from packaging.version import Version

    installed = installed or version("lm_eval")
    low, high = LM_EVAL_RANGE
    if not Version(low) <= Version(installed) < Version(high):
        raise ValueError(f"eval-suite nlp runs on lm-eval >={low},<{high} (0.4.12 changed the task index it reads), "
                         f"and this environment has lm-eval {installed}: pip install 'lm-eval[hf]>={low},<{high}'")


def overrides_include_dir(overrides: dict[str, dict[str, Any]], task_manager, out_dir: Path) -> Path:
    """Write one YAML per overridden task that includes its registered config and replaces fields."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, fields in overrides.items():
        entry = task_manager.task_index.get(task)
        if entry is None or entry["type"] not in ("task", "python_task") or entry["yaml_path"] == -1:
            raise ValueError(f"dataset override: {task!r} is not an lm-eval task with a YAML config")
        config = {"include": str(entry["yaml_path"]), "task": task, **fields}
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def load_overrides(*paths: str | Path | None) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for path in filter(None, paths):
        data = yaml.safe_load(Path(path).read_text()) or {}
        for task, fields in data.items():
            if not isinstance(fields, dict):
                raise ValueError(f"{path}: entry {task!r} should map field names to values, got {fields!r}")
            merged.setdefault(task, {}).update(fields)
    return merged


def lm_eval_model_args(model: str | Path, backend_options: dict[str, Any] | None = None,
                       protocol: Protocol = DEFAULT) -> str:
    """lm-eval's ``model_args`` for a model directory; ``add_bos_token`` as the protocol says (the
    authors' 2024 lm-eval added no BOS for causal LMs; 0.4.11 leaves it to the tokenizer, which adds
    LLaMA's)."""
    options = dict(backend_options or {})
    if protocol.lm_eval_add_bos_token is not None:
        options["add_bos_token"] = protocol.lm_eval_add_bos_token
    return ",".join([f"pretrained={model}", *(f"{k}={v}" for k, v in options.items())])


def run(model: Any, run_dir: Path, suite: Suite | None = None, tasks: list[str] | None = None,
        include_paths: list[Path] = (TASKS_DIR,), include_defaults: bool = True,
        dataset_overrides: Path | None = None, limit: int | float | None = None, batch_size: int | str = 8,
        device: str | None = None, model_name: str | None = None, humaneval: BenchmarkResult | None = None,
        backend: str = "hf", backend_options: dict[str, Any] | None = None, log_samples: bool = False,
        use_cache: str | None = None, protocol: Protocol = DEFAULT) -> BenchmarkResult:
    """Evaluate ``model`` (a model directory, or an ``lm_eval`` LM object) on the suite's lm-eval group.

    Args:
        tasks: lm-eval tasks/groups to run; default the suite's group (``im_sft_eval``).
        include_defaults: index lm-eval's built-in tasks too (4 s); off only for suites of local tasks.
        dataset_overrides: YAML of task -> dataset fields, applied on top of the shipped overrides.
        limit: examples per task (lm-eval ``--limit``), for smoke runs.
        humaneval: the HumanEval result of the same model, to fill the Math & Coding category.
        backend: lm-eval model type for a model directory: ``hf`` or ``vllm`` (lm-eval's vLLM backend).
        backend_options: more ``model_args`` (e.g. vLLM's dtype, tensor_parallel_size, gpu_memory_utilization).
        log_samples: lm-eval's ``--log_samples``: every prompt and answer, written to RUN_DIR/nlp/samples_<task>.jsonl.
        use_cache: lm-eval's request cache (SQLite path prefix): a rerun answers cached requests without the model.
        protocol: how lower-is-better metrics are averaged, and whether lm-eval adds a BOS
            (``add_bos_token`` model argument; see :mod:`eval_suite.protocol`).
    """
    check_lm_eval_version()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    suite = suite or Suite.load()
    start = time.monotonic()
    overrides = load_overrides(DEFAULT_OVERRIDES if include_defaults else None, dataset_overrides)
    with tempfile.TemporaryDirectory(prefix="eval_suite_overrides_") as tmp:
        paths = [str(p) for p in include_paths]
        if overrides:
            index = TaskManager(include_path=paths, include_defaults=include_defaults)
            paths.append(str(overrides_include_dir(overrides, index, Path(tmp))))
        task_manager = TaskManager(include_path=paths, include_defaults=include_defaults)
        if isinstance(model, (str, Path)):
            model_name = model_name or str(model)
            model_args = lm_eval_model_args(model, backend_options, protocol)
            model = backend
        else:
            model_args = None
        output = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks or [suite.lm_eval_group],
                                         task_manager=task_manager, limit=limit, batch_size=batch_size, device=device,
                                         log_samples=log_samples, use_cache=use_cache, confirm_run_unsafe_code=False)
    keep = {k: output.get(k) for k in ("results", "groups", "group_subtasks", "n-shot", "versions", "higher_is_better")}
    lm_eval_file = Path(run_dir) / "nlp" / "lm_eval_results.json"
    lm_eval_file.parent.mkdir(parents=True, exist_ok=True)
    lm_eval_file.write_text(json.dumps(keep, indent=2, default=handle_non_serializable))
    if log_samples:
        for task, samples in (output.get("samples") or {}).items():
            with open(lm_eval_file.parent / f"samples_{task}.jsonl", "w") as f:
                f.writelines(json.dumps(x, default=handle_non_serializable, ensure_ascii=False) + "\n" for x in samples)
    raw = raw_scores(output, suite)
    stderr = {name: _number(tables_of(output).get(spec.result, {}).get(spec.metric.replace(",", "_stderr,", 1)))
              for name, spec in suite.lm_eval_tasks().items()}
    result = table1(raw, suite, humaneval, protocol)
    result.model = model_name or "model"
    result.breakdown["stderr"] = {k: v for k, v in stderr.items() if v is not None}
    result.duration_seconds = time.monotonic() - start
    result.config.update(suite=suite.model_dump(), tasks=tasks or [suite.lm_eval_group], limit=limit, n_shot=output.get("n-shot", {}),
                         dataset_overrides=overrides, lm_eval_results=str(lm_eval_file), protocol=protocol.name,
                         lm_eval_model_args=model_args, lower_is_better=protocol.lower_is_better)
    if limit is not None:
        result.notes.append(f"--limit {limit}: a smoke run on a subset, not comparable to the paper")
    return result


def table1(raw: dict[str, float | None], suite: Suite, humaneval: BenchmarkResult | None = None,
           protocol: Protocol = DEFAULT) -> BenchmarkResult:
    """The NLP result: raw scores plus HumanEval's pass@1, aggregated as in Table 1 under ``protocol``."""
    raw = dict(raw)
    for name, spec in _humaneval_tasks(suite).items():
        raw[name] = humaneval.metrics.get(spec.metric) if humaneval else None
    tasks, categories, mean, notes = aggregate(raw, suite, protocol)
    gaps = incomplete(raw, suite, protocol)
    lower = [n for c in suite.categories.values() for n, s in c.tasks.items() if not s.higher_is_better and n in tasks]
    if lower:
        notes.append(lower_is_better_note(protocol, lower))
    breakdown = {"raw": raw, "tasks": tasks, "categories": categories}
    if gaps:  # the means over what is there, kept apart from Table 1's numbers
        breakdown["partial"] = {name: record["partial_mean"] for name, record in gaps.items()}
    return BenchmarkResult(benchmark="nlp", model="", headline=mean, breakdown=breakdown, notes=notes,
                           config={"incomplete": gaps} if gaps else {})


def _humaneval_tasks(suite: Suite) -> dict[str, TaskSpec]:
    return {n: s for c in suite.categories.values() for n, s in c.tasks.items() if s.source == "humaneval"}
