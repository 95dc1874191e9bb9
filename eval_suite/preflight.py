"""Checks that run before any generation, so a run does not fail after 40 minutes of sampling.

Each check raises :class:`PreflightError` with one line that names the fix. ``eval-suite all`` runs
every check that applies and prints all failures at once, one line each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """A check failed; the message is one line naming what to do."""


def check_code_execution(allowed: bool) -> None:
    if not allowed:
        raise PreflightError("HumanEval executes model-written code (sandboxed): pass --allow-code-execution, "
                             "or --skip humaneval")


def probe_judge(client, model: str, timeout: float = 5.0) -> str:
    """One cheap request (one output token) to the judge; returns the model name the server reports."""
    import openai

    quick = client._openai.with_options(timeout=timeout, max_retries=0)
    where = client.endpoint.base_url or "https://api.openai.com/v1"
    try:
        response = quick.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say OK."}],
                                                 max_tokens=1, temperature=0.0)
    except openai.APIConnectionError as e:
        raise PreflightError(f"judge at {where} is not reachable ({type(e).__name__}); start it (e.g. "
                             "`eval-suite judge-server` or `vllm serve JUDGE`), fix --judge-base-url, or --skip "
                             "alpaca_eval_1 alpaca_eval_2 mt_bench") from None
    except openai.APIStatusError as e:
        raise PreflightError(f"judge at {where} refused a test request for model {model!r} (HTTP {e.status_code}); "
                             f"check --judge-model and the key in ${client.endpoint.api_key_env}") from None
    client.expect(model, response.model)  # cached answers are used only while this model answers
    return response.model or model


def judge_host(base_url: str | None) -> str:
    """Scheme, host and port of the judge URL: what a results file may record (never a key or a query)."""
    parsed = urlparse(base_url or "https://api.openai.com/v1")
    return f"{parsed.scheme}://{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")


def check_file(path: Path | None, what: str, flag: str, skip: str) -> Path:
    if path is None:
        raise PreflightError(f"{what} needs {flag} FILE, or --skip {skip}")
    if not Path(path).is_file():
        raise PreflightError(f"{flag} {path}: no such file")
    return Path(path)


def check_device(device: str) -> str:
    """The device to use: ``auto`` picks CUDA when available, else CPU (with a note)."""
    from eval_suite.generation import resolve_device

    try:
        return resolve_device(device)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_backend(backend: str) -> str:
    """The generation and NLP backend (``auto`` resolved once for both); ``vllm`` needs vLLM installed."""
    from eval_suite.generation import resolve_backend

    try:
        return resolve_backend(backend)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_gpu_memory(free_bytes: int, weights_bytes: int, kv_bytes_per_token: int, tokens_needed: int,
                     device: str) -> None:
    """The weights plus the KV cache of the largest single row must fit in free GPU memory.

    Args:
        tokens_needed: longest prompt plus max new tokens (the smallest batch the run cannot avoid).
    """
    need = weights_bytes + kv_bytes_per_token * tokens_needed
    if need > free_bytes:
        raise PreflightError(f"{device}: {free_bytes / 2**30:.1f} GiB free, but the model needs {weights_bytes / 2**30:.1f} GiB "
                             f"plus {kv_bytes_per_token * tokens_needed / 2**30:.1f} GiB of KV cache for one sample; "
                             "free the GPU, use --backend vllm --tensor-parallel-size N, or a larger card")


def gpu_memory_check(model_dir: str, device: str, tokens_needed: int) -> None:
    """:func:`check_gpu_memory` with this machine's free memory and the model's size on disk."""
    import torch
    from transformers import AutoConfig

    from eval_suite.generation import kv_bytes_per_token, model_fingerprint

    if not device.startswith("cuda"):
        return
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    weights = model_fingerprint(model_dir).get("weights_bytes", 0)
    config = AutoConfig.from_pretrained(model_dir)
    dtype_bytes = 2  # generation loads bf16 on GPU
    if str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "")).endswith("float32"):
        weights //= 2  # an fp32 checkpoint on disk is loaded as bf16
    check_gpu_memory(free, weights, kv_bytes_per_token(getattr(config, "text_config", config), dtype_bytes),
                     tokens_needed, device)


# ---- NLP datasets ------------------------------------------------------------------------------

def nlp_task_configs(task_manager, names: list[str], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every leaf task under ``names`` (groups and tags expanded), with the dataset overrides applied."""
    out: dict[str, dict[str, Any]] = {}

    def walk(name: str) -> None:
        entry = task_manager.task_index.get(name)
        if entry is None:
            raise PreflightError(f"NLP suite: lm-eval knows no task or group {name!r}; check --tasks / --include-path")
        if entry["type"] in ("task", "python_task"):
            if name not in out:
                config = task_manager._get_config(name)
                out[name] = {**config, **overrides.get(name, {})}
            return
        members = entry["task"] if entry["type"] == "tag" else task_manager._get_config(name).get("task", [])
        for member in members if isinstance(members, list) else [members]:
            walk(member["task"] if isinstance(member, dict) else member)

    for name in names:
        walk(name)
    return out


def _hub_cached(repo: str) -> bool:
    """Whether a hub dataset has a local copy in the Hugging Face caches (hub files or prepared Arrow)."""
    from huggingface_hub import constants

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    return hub.is_dir() or (datasets_cache / repo.replace("/", "___")).is_dir()


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except OSError:
        return False


def missing_nlp_datasets(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """task -> what is missing, for every task whose data cannot be loaded here."""
    missing: dict[str, str] = {}
    online = None
    for task, config in sorted(configs.items()):
        if config.get("custom_dataset"):
            continue
        path = config.get("dataset_path") or ""
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if files:
            flat = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else list(files)
            absent = [f for f in flat if isinstance(f, str) and "*" not in f and not Path(f).exists()]
            if absent:
                missing[task] = f"file {absent[0]}"
            continue
        if Path(path).exists():
            continue
        if _hub_cached(path):
            continue
        online = _hub_reachable() if online is None else online
        if not online:
            missing[task] = path
    return missing


def write_override_template(missing: dict[str, str], path: Path) -> Path:
    """A dataset-overrides YAML with one entry per missing task, for the user to point at local copies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Point each task at a local copy, then pass this file with --dataset-overrides (docs/eval_suite.md).",
             "# A folder laid out like the hub repo keeps dataset_name; JSON/parquet files need dataset_path: json|parquet,",
             "# dataset_name: null and dataset_kwargs: {data_files: {test: /abs/file}}."]
    for task, what in missing.items():
        lines.append(f"{task}:\n  dataset_path: /path/to/local/{what.replace('file ', '').strip('/')}  # missing: {what}")
    path.write_text("\n".join(lines) + "\n")
    return path


# lm-eval task folders the paper's suite uses: indexing only these takes a fraction of a second, where
# indexing all of lm-eval's 15,000 files takes ~6 s of CPU. Any other task falls back to the full index.
SUITE_LM_EVAL_DIRS = ("arc", "bbh", "coqa", "gsm8k", "hellaswag", "hendrycks_ethics", "lambada", "lambada_multilingual",
                      "mmlu", "openbookqa", "piqa", "toxigen", "translation", "truthfulqa", "winogrande", "wsc273")


def _simple_config(task_manager, name: str) -> dict[str, Any]:
    """A task's YAML with includes resolved but ``!function`` tags left unimported (fast; enough for dataset fields)."""
    from lm_eval import utils

    path = task_manager.task_index[name]["yaml_path"]
    return {} if path == -1 else utils.load_yaml_config(path, mode="simple")


def check_nlp_datasets(include_paths: list[Path], tasks: list[str], overrides: dict[str, dict[str, Any]],
                       include_defaults: bool, template_path: Path) -> None:
    """Every dataset the NLP suite needs is loadable here; else one line listing all that are not."""
    from eval_suite.nlp.bench import check_lm_eval_version

    try:
        check_lm_eval_version()  # before the task index below, which lm-eval 0.4.12 changed
    except ValueError as e:
        raise PreflightError(str(e)) from None
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    configs = None
    if include_defaults:
        builtin = Path(lm_eval.__file__).parent / "tasks"
        quick = TaskManager(include_path=paths + [str(builtin / d) for d in SUITE_LM_EVAL_DIRS if (builtin / d).is_dir()],
                            include_defaults=False)
        quick._get_config = lambda name: _simple_config(quick, name)
        try:
            configs = nlp_task_configs(quick, tasks, overrides)
        except PreflightError:
            log.info("preflight: tasks outside the paper's suite; indexing all of lm-eval's tasks")
    if configs is None:
        task_manager = TaskManager(include_path=paths, include_defaults=include_defaults)
        task_manager._get_config = lambda name: _simple_config(task_manager, name)
        configs = nlp_task_configs(task_manager, tasks, overrides)
    missing = missing_nlp_datasets(configs)
    if missing:
        write_override_template(missing, template_path)
        repos = sorted(set(missing.values()))
        raise PreflightError(f"NLP suite: {len(missing)} tasks have no local data and the hub is not reachable "
                             f"({len(repos)} datasets: {', '.join(repos)}); fill in {template_path} and pass "
                             "--dataset-overrides with it, or --skip nlp")
