"""The evaluation protocol as one declarative object: the choices that make a score comparable.

Two presets, selected with ``--protocol``:

- ``default``: this suite's own choices (each benchmark's defaults as the docs' protocol table lists
  them): WMT's TER enters the Multilinguality category as ``100 - TER`` (so every column is
  higher-is-better), lm-eval tokenises with the tokenizer's own BOS setting, MT-Bench uses the
  model's chat template, no top-k, no cap at the model's context length.
- ``paper``: what the authors' released scripts did (``research/paper.md`` §4; their
  ``src/get_results_group.py``, ``eval/alpaca_farm/run_eval.py``, ``eval/codex_humaneval/run_eval.py``
  and README commands): TER added as it is (``TER/100`` in their code, so a higher TER raises
  Multilinguality), lm-eval without a BOS (``add_bos_token=False``, the 2024 lm-eval default for
  causal LMs), MT-Bench through FastChat's ``one_shot`` template with HF ``generate``'s top-k 50,
  AlpacaEval in the tulu format, and generation stopped at the model's context length as their
  vLLM did.

Both generate AlpacaEval outputs once and judge them with both annotators (the authors' script
reuses its ``-greedy-long-output.json`` for the second version).

The protocol's name is recorded in every result's provenance, is part of what must agree for two
runs to share a table, and the report marks every cell that is not comparable with the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

LowerIsBetter = Literal["flip", "as-is"]


@dataclass(frozen=True)
class Protocol:
    """One named set of evaluation choices (data only; the benchmarks read it)."""

    name: str
    summary: str
    # NLP aggregation: a lower-is-better metric (WMT's TER) enters its category as 100 - value
    # ("flip") or as the value itself ("as-is", the authors' get_results_group.py).
    lower_is_better: LowerIsBetter
    # lm-eval's add_bos_token model argument: None keeps the tokenizer's own setting (lm-eval 0.4.11
    # then adds LLaMA's BOS); False is the authors' lm-eval (2024), which added none for causal LMs.
    lm_eval_add_bos_token: bool | None
    # MT-Bench prompt format: "chat-template" (the model's) or "fastchat" (FastChat's conversation
    # template: by name when mt_bench_fastchat_template is set, else picked by the model path).
    mt_bench_format: str
    mt_bench_fastchat_template: str | None
    # MT-Bench sampling top-k (None = off); FastChat's HF generate() ran with transformers' default 50.
    mt_bench_top_k: int | None
    # AlpacaEval prompt: a template name from eval_suite/templates, or None for the model's own.
    alpaca_eval_chat_template: str | None
    # Stop each sample at the model's context length (prompt + new tokens), as vLLM does; applied to
    # the benchmarks the authors generated with vLLM (HumanEval, AlpacaEval).
    cap_at_context_length: bool

    def record(self) -> dict[str, Any]:
        """What a results file stores about the protocol (its name plus every choice)."""
        return asdict(self)


DEFAULT = Protocol(
    name="default",
    summary="this suite's choices: WMT as 100 - TER, lm-eval's own BOS, MT-Bench in the model's chat template",
    lower_is_better="flip",
    lm_eval_add_bos_token=None,
    mt_bench_format="chat-template",
    mt_bench_fastchat_template=None,
    mt_bench_top_k=None,
    alpaca_eval_chat_template=None,
    cap_at_context_length=False,
)

PAPER = Protocol(
    name="paper",
    summary="the authors' scripts: WMT's TER averaged as it is, lm-eval without BOS, MT-Bench in FastChat's "
            "one_shot template with top-k 50, AlpacaEval in the tulu format, generation capped at the context length",
    lower_is_better="as-is",
    lm_eval_add_bos_token=False,
    mt_bench_format="fastchat",
    mt_bench_fastchat_template="one_shot",
    mt_bench_top_k=50,
    alpaca_eval_chat_template="tulu",
    cap_at_context_length=True,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (DEFAULT, PAPER)}


def get(name: str | None) -> Protocol:
    """The preset called ``name`` (``None``: a result written before protocols were recorded = default)."""
    if name is None:
        return DEFAULT
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"--protocol {name!r}: choose one of {', '.join(PROTOCOLS)}") from None


def of_result(provenance: dict[str, Any] | None) -> Protocol:
    """The protocol a result was produced under (its provenance's ``protocol`` name)."""
    return get((provenance or {}).get("protocol"))


def lower_is_better_note(protocol: Protocol, tasks: list[str]) -> str:
    """One line saying how lower-is-better tasks (the paper's: WMT 2014/2016's TER) entered their category."""
    names = ", ".join(tasks)
    if protocol.lower_is_better == "as-is":
        return (f"{names}: TER enters its category as it is (lower is better), as the authors' get_results_group.py "
                "did; Multi and Mean are Table 1's")
    return (f"{names}: enters its category as 100 - TER (higher is better), so Multi differs from Table 1's by "
            "TER - 50 and Mean by (TER - 50) / 6; --protocol paper scores it as the authors did")
