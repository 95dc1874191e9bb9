"""AlpacaEval 1.0 and 2.0: generate with the model's chat template, judge with alpaca_eval's annotators.

Judging is alpaca_eval's own code (``alpaca_eval.evaluate``, its prompt templates, parsers and
``get_winrate``); the only piece swapped in is the completion function, so every judge request goes
through :class:`eval_suite.judge.JudgeClient` (any OpenAI-compatible server, retries, cache).

Routed around, as ``research/eval.md`` records for alpaca-eval 0.6.6 offline:
- the default eval set loader (a hub loading script, broken on datasets>=4): the instructions and
  reference outputs always come from a local JSON file (``--reference-outputs``);
- ``get_length_controlled_winrate`` downloads ``df_gamed.csv`` from the hub: it runs only when that
  file is given locally (``--lc-data``), otherwise the LC win rate is reported as missing, with a note;
- annotation caching next to the config inside site-packages: off, the judge cache replaces it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from eval_suite.arguments import COUNT
from eval_suite.judge import JudgeClient, JudgeReply, JudgeRequest
from eval_suite.records import RecordError, read_records
from eval_suite.results import BenchmarkResult

log = logging.getLogger(__name__)

VERSIONS: dict[str, dict[str, str]] = yaml.safe_load((Path(__file__).parent / "versions.yaml").read_text())


def read_outputs(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """AlpacaEval outputs: a JSON list of {instruction, output, generator, ...}."""
    rows = read_records(path, {"instruction": str, "output": str})
    return rows[:limit] if limit else rows


def generate(generator, reference_outputs: str | Path, name: str, sampling, limit: int | None = None,
             store=None) -> list[dict]:
    """The model's outputs on the reference file's instructions, in alpaca_eval's format.

    Args:
        store: a :class:`eval_suite.records.SampleStore`; outputs already in it are not generated again.
    """
    rows = read_outputs(reference_outputs, limit)
    # Keyed by the instruction's text alone: AE1's and AE2's reference files hold the same 805
    # instructions, so one store serves both versions whatever order each file lists them in.
    keys = [hashlib.sha256(r["instruction"].encode()).hexdigest()[:16] for r in rows]
    replies = generator.chat([[{"role": "user", "content": r["instruction"]}] for r in rows], sampling,
                             desc="AlpacaEval generation", store=store, keys=keys)
    return [{"dataset": r.get("dataset", ""), "instruction": r["instruction"], "output": out, "generator": name}
            for r, out in zip(rows, replies)]


def check_reference(version: str, reference_outputs: list[dict], source: str) -> None:
    """Refuse a reference file from another generator than the version's (e.g. AE1's file for AE2)."""
    want = VERSIONS[version]["reference"]
    generators = {str(r.get("generator")) for r in reference_outputs if r.get("generator") is not None}
    if generators and want not in generators:
        raise ValueError(f"{source}: reference outputs are by {', '.join(sorted(generators))}, but {version} compares "
                         f"against {want}; pass that generator's model_outputs.json (see docs/eval_suite.md)")


def _completion(reply: JudgeReply) -> dict[str, Any]:
    return {"text": reply.text or " ", "logprobs": reply.logprobs, "total_tokens": reply.total_tokens}


def reply_parser(version: str) -> Callable[[JudgeReply], Any]:
    """The judge client's parser for ``version``: alpaca_eval's own parser with its stock settings.

    A reply it cannot turn into one preference (ValueError) is asked again, then counted as a
    failure; alpaca_eval then leaves that instruction out, as it does with any unparsed annotation.
    """
    from alpaca_eval import completion_parsers, constants, utils

    cfg = next(iter(utils.load_configs(constants.EVALUATORS_CONFIG_DIR / VERSIONS[version]["annotator"]).values()))
    parser = getattr(completion_parsers, cfg["fn_completion_parser"])
    kwargs = cfg.get("completion_parser_kwargs") or {}
    whole = cfg.get("completion_key") == "completions_all"

    def parse(reply: JudgeReply) -> Any:
        values = list(parser(_completion(reply) if whole else reply.text, **kwargs))
        if len(values) != 1 or values[0] is None or (isinstance(values[0], float) and math.isnan(values[0])):
            raise ValueError(f"{cfg['fn_completion_parser']} found no preference in {reply.text[:80]!r}")
        return values[0]

    return parse


def judge_completions(client: JudgeClient, judge_model: str | None,
                      parse: Callable[[JudgeReply], Any] | None = None) -> Callable[..., dict[str, list]]:
    """An alpaca_eval ``fn_completions`` that sends every prompt through our judge client.

    Same contract as ``alpaca_eval.decoders.openai.openai_completions``: chatml prompts in; the texts,
    per-example price and time, and the raw choices (with ``logprobs`` for ``logprob_parser``) out.
    A failed reply goes back as " " with no logprobs: alpaca_eval's parser rejects it and drops
    that instruction; the client counts it.
    """
    from alpaca_eval.utils import prompt_to_chatml

    def completions(prompts, model_name, max_tokens=2048, temperature=0.0, logprobs=False, top_logprobs=None,
                    **ignored) -> dict[str, list]:
        requests = [JudgeRequest(model=judge_model or model_name, messages=prompt_to_chatml(p.strip()),
                                 max_tokens=max_tokens, temperature=temperature, logprobs=bool(logprobs),
                                 top_logprobs=top_logprobs) for p in prompts]
        start = time.monotonic()
        replies = client.complete_many(requests, desc="AlpacaEval judge", parse=parse)
        per_example = (time.monotonic() - start) / max(1, len(prompts))
        return dict(
            completions=[r.text or " " for r in replies],  # alpaca_eval treats "" as a failed call
            price_per_example=[math.nan] * len(replies),
            time_per_example=[per_example] * len(replies),
            completions_all=[_completion(r) for r in replies],
        )

    return completions


def annotator_config(version: str, out_dir: Path) -> tuple[Path, str]:
    """Write alpaca_eval's stock annotator config for ``version`` with absolute prompt paths.

    ``fn_completions`` is left out of the file because we pass our own function; everything else (prompt,
    parser, decoding settings) is the stock config. Returns the config path and the paper's judge model.
    """
    from alpaca_eval import constants, utils

    name = VERSIONS[version]["annotator"]
    configs = utils.load_configs(constants.EVALUATORS_CONFIG_DIR / name)
    for cfg in configs.values():
        cfg.pop("fn_completions", None)
        cfg["prompt_template"] = str(constants.EVALUATORS_CONFIG_DIR / cfg["prompt_template"])
    path = out_dir / "annotator" / name / "configs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(configs, sort_keys=False))
    return path, next(iter(configs.values()))["completions_kwargs"]["model_name"]


def judge(version: str, model_outputs: list[dict], reference_outputs: list[dict], client: JudgeClient,
          out_dir: Path, judge_model: str | None = None, lc_data: Path | None = None) -> BenchmarkResult:
    """Annotate model vs reference with alpaca_eval and score the annotations."""
    from alpaca_eval import evaluate

    references = {r["instruction"]: r for r in reference_outputs}
    missing = [o["instruction"][:60] for o in model_outputs if o["instruction"] not in references]
    if missing:
        raise ValueError(f"{len(missing)} model outputs have no reference output, e.g. {missing[0]!r}")
    reference_outputs = [references[o["instruction"]] for o in model_outputs]
    config_path, default_judge = annotator_config(version, out_dir)
    start = time.monotonic()
    failures_before = client.failures
    try:
        _, annotations = evaluate(
            model_outputs=model_outputs, reference_outputs=reference_outputs, annotators_config=str(config_path),
            name=model_outputs[0]["generator"], output_path=str(out_dir), precomputed_leaderboard=None,
            is_return_instead_of_print=True, fn_metric="get_winrate", sort_by="win_rate", caching_path=None,
            fn_completions=judge_completions(client, judge_model, reply_parser(version)),
        )
    except Exception:
        failed = client.failures - failures_before
        if failed >= len(model_outputs):  # alpaca_eval cannot score an empty annotation set
            raise RecordError(f"the judge gave no usable answer for any of the {len(model_outputs)} instructions "
                              f"({failed} failures after retries; see the warnings above); nothing to score") from None
        raise
    failed = client.failures - failures_before
    result = score(annotations, version, lc_data, source=str(out_dir / "annotations.json"))
    result.duration_seconds = time.monotonic() - start
    result.metrics["n_judge_failures"] = float(failed)
    if failed:
        result.notes.append(f"{failed} of {len(model_outputs)} instructions had no usable judge answer after retries "
                            "and are left out of the win rate")
    result.config.update(judge_model=judge_model or default_judge, annotator=VERSIONS[version]["annotator"],
                         judge_calls=client.calls, judge_cache_hits=client.cache_hits, judge_failures=failed)
    return result


def score(annotations: list[dict], version: str | None = None, lc_data: Path | None = None,
          source: str = "annotations") -> BenchmarkResult:
    """Win rates of an annotation set (alpaca_eval's ``get_winrate``; LC only with ``lc_data``)."""
    from alpaca_eval.metrics import get_winrate

    _check_preferences(annotations, source)
    version = version or _infer_version(annotations, source)
    metrics = {k: float(v) for k, v in get_winrate(annotations).items()}
    notes = []
    lc = _length_controlled(annotations, lc_data) if lc_data else None
    if lc_data is None:
        notes.append("length-controlled win rate not computed: alpaca_eval downloads df_gamed.csv from the hub "
                     "for it; pass --lc-data df_gamed.csv to compute it offline")
    generators = {str(a.get("generator_2")) for a in annotations}
    win_rate = metrics.pop("win_rate")
    return BenchmarkResult(
        benchmark=version, model=", ".join(sorted(generators)), headline=win_rate,
        metrics={**metrics, "length_controlled_win_rate": lc, "win_rate": win_rate},
        config={"source": source}, notes=notes,
    )


def _check_preferences(annotations: list[dict], source: str) -> None:
    """alpaca_eval crashes obscurely on unusable preferences; say which row is wrong instead."""
    usable = 0
    for i, a in enumerate(annotations, 1):
        p = a.get("preference")
        if p is None or (isinstance(p, float) and math.isnan(p)):
            continue
        try:
            value = float(p)
        except (TypeError, ValueError):
            raise RecordError(f"{source}: row {i}: field 'preference' should be a number in [0, 2], got {p!r}") from None
        if not 0 <= value <= 2:
            raise RecordError(f"{source}: row {i}: field 'preference' should be in [0, 2], got {p!r}")
        usable += 1
    if usable == 0:
        raise RecordError(f"{source}: no row has a usable 'preference' (did the judge answer in the expected format?)")


def _infer_version(annotations: list[dict], source: str) -> str:
    annotators = {a.get("annotator") for a in annotations}
    for version, spec in VERSIONS.items():
        if annotators == {spec["annotator"]}:
            return version
    raise RecordError(f"{source}: cannot tell the AlpacaEval version from field 'annotator' ({sorted(map(str, annotators))}); "
                      "pass --version alpaca_eval_1 or alpaca_eval_2")


def _length_controlled(annotations: list[dict], lc_data: Path) -> float | None:
    """alpaca_eval's LC win rate, with its hub download of df_gamed.csv replaced by the local file."""
    import pandas as pd
    from alpaca_eval.metrics import glm_winrate

    download = glm_winrate.hf_hub_download
    glm_winrate.hf_hub_download = lambda **kwargs: str(lc_data)
    try:
        out = glm_winrate.get_length_controlled_winrate(pd.DataFrame(annotations), save_weights_dir=None)
    finally:
        glm_winrate.hf_hub_download = download
    return float(out["length_controlled_winrate"])


def add_arguments(parser: argparse.ArgumentParser, with_generation: bool, with_judge: bool) -> None:
    parser.add_argument("--version", choices=list(VERSIONS), help="alpaca_eval_1 (paper: vs text-davinci-003, "
                        "GPT-4 judge) or alpaca_eval_2 (vs GPT-4 Turbo, GPT-4 Turbo judge)")
    parser.add_argument("--lc-data", type=Path, help="local df_gamed.csv for the length-controlled win rate")
    if with_generation or with_judge:
        parser.add_argument("--reference-outputs", type=Path, required=True,
                            help="reference outputs JSON (805 rows; " + ", ".join(
                                f"{v}: {spec['reference']}" for v, spec in VERSIONS.items()) + ")")
        parser.add_argument("--limit", type=COUNT, help="only the first N instructions")
