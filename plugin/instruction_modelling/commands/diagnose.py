"""Does Instruction Modelling suit this data? Length statistics and the paper's Figure 2 forecast.

    python -m instruction_modelling.diagnose DATA [--tokenizer T] [--json] [--plot lengths.png]

DATA is a messages, Alpaca or prompt/completion file (JSONL, or JSON holding a list of rows), or
an Axolotl YAML (every local dataset under ``datasets:`` and ``test_datasets:`` is diagnosed;
the recommendation is made for the training datasets taken together, as Axolotl concatenates
them).

Bad rows (a missing, empty or mistyped field, an unknown role ...) are part of the diagnosis: they
are counted, the first reasons are listed with what training would do with them
(``im_on_bad_rows``), and the statistics are computed over the good rows. The exit code is 2 only
when nothing can be diagnosed (an unreadable file, or not one usable row); ``--on-bad-rows error``
stops at the first bad row instead.

What is measured, and why in words
----------------------------------
The paper's two predictors of IM's benefit (Shi et al. 2024, §4.2 and Table 5) are the
instruction/output length ratio and the number of examples. Its lengths are whitespace-separated
*words*: instruction = every non-assistant message (system, user, tool; all turns of a
multi-turn conversation), output = every assistant message. We report ``len(text.split())``
counts. The paper's Table 5 counts are one word higher *per message* (most likely it counted
each message with its role tag, e.g. ``<|user|>``); that convention, reported under
``table5_convention``, reproduces Table 5's means and standard deviations to their rounding on
LIMA and Alpagasus Dolly 3k (for Alpaca and prompt/completion rows it adds one word per side).
``ratio`` is the ratio of the plain means (as in the paper, a ratio of means, not the mean of
per-example ratios); it is within 2.3% of Table 5 on those files, and the forecasts use it.

With ``--tokenizer``, rows are also encoded exactly as training encodes them
(``segments.RowEncoder``), giving instruction, output and template token counts and the share of
the IM loss that falls on output tokens.

The forecast and the recommendation (a heuristic)
-------------------------------------------------
The paper fits the relative AlpacaEval 1.0 gain of IM over IT (in %) with natural logs:

* ratio fit: ``18.85·ln(ratio) + 25.83`` (19 datasets, ratio 0.09 to 26),
* size fit:  ``−39.37·ln(N) + 431.74`` (Tulu V2 subsets of ratio ≈ 10, N from 1k to 35k).

Each predicted gain becomes a vote for IM between 0 and 1, rising linearly from 0 at a
predicted gain of ``VOTE_ZERO_AT`` (0%) to 1 at ``VOTE_ONE_AT`` (+5%). Both votes 1: IM (weight
1.0, range 0.5-1.0); both 0: IT (0.0, range 0.0-0.1); otherwise a partial instruction weight,
half the mean vote (WIT's best prompt weights lie in 0-0.5) held within WIT's per-benchmark
average best weights 0.17-0.48, with PLW's generation ratio Rg (per-example output/instruction
length, arithmetic and geometric mean) widening the range where PLW found the weight matters
(short completions). docs/weighting.md gives the rule and its sources; every reason printed
cites its source. LIMA gets 0.25 (long outputs, few examples; the paper measured no
AlpacaEval gain) and Alpagasus Dolly 3k, Alpaca 5k and the LESS sets IM. The fits come from
LLaMA-2-7B full fine-tuning,
are noisy (points lie tens of percentage points off the lines) and the size fit was only
measured at ratio ≈ 10; treat the forecast as a prior, and check with ``analyze losses`` after
training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from instruction_modelling.core.segments import (
    INSTRUCTION_SEGMENTS,
    OUTPUT_SEGMENTS,
    RowError,
    RowFields,
    Segment,
    describe_row,
    detect_format,
)
from instruction_modelling.core.stats import side_texts, word_count

# Figure 2 of the paper: relative AlpacaEval 1.0 gain (%) = slope·ln(x) + intercept.
RATIO_FIT = (18.85, 25.83)
SIZE_FIT = (-39.37, 431.74)
# Ranges the fits were measured on (paper.md §5.2); outside them the forecast extrapolates.
RATIO_FIT_RANGE = (0.09, 26.5)  # LIMA 0.094 (0.092 in plain words) to Less MMLU Chat 26.33
SIZE_FIT_RANGE = (1_000, 35_000)
# A predicted gain at or below VOTE_ZERO_AT is a vote for IT, at or above VOTE_ONE_AT one for IM.
VOTE_ZERO_AT = 0.0
VOTE_ONE_AT = 5.0

# Where each signal of the recommendation comes from: a short tag cited in each reason, the
# full reference listed under "Sources" in the text output.
CITE = {"paper": "Shi et al. 2024, Fig. 2", "plw": "PLW", "wit": "WIT"}
SOURCES = {
    "paper": "Shi et al. 2024, Fig. 2: Instruction Tuning With Loss Over Instructions (NeurIPS 2024), arXiv 2405.14394; "
             "LLaMA-2-7B, AlpacaEval 1.0",
    "plw": "PLW: Huerta-Enochian & Ko, Instruction Fine-Tuning: Does Prompt Loss Matter?, arXiv 2401.13586; "
           "LLaMA-1/2 7B, 10 prompt weights 0-1",
    "wit": "WIT: Weighted Instruction Tuning, arXiv 2507.07817 (TACL), github.com/kowndinya-renduchintala/WIT; "
           "525 runs, 5 models x LIMA / Alpaca-Cleaned / Tulu-v2",
}
PLW_SHORT = ("PLW found performance a negative quadratic in the prompt weight, best at 0.01-0.1 for multiple "
             "choice and short generation and about 1 for long generation")
PLW_LONG = "PLW found the prompt weight has no significant effect on long-completion data"
WIT_REGION = (0.0, 0.5)  # WIT: best prompt weights λp 0-0.5 (with response weights 0.5-1)
WIT_BEST_AVERAGE = (0.17, 0.48)  # WIT: average best λp per benchmark, BBH 0.17 to IFEval 0.48

CAVEATS = (
    "The fits come from LLaMA-2-7B full fine-tuning, scored by AlpacaEval 1.0 (GPT-4 judge); other "
    "models, PEFT and other benchmarks may behave differently.",
    "Both fits are noisy: the paper's points lie tens of percentage points off the lines, so read the "
    "predicted gains as a direction, not a number.",
    "The size fit was measured on Tulu V2 subsets whose ratio is about 10; at low ratios the size effect "
    "is unmeasured.",
    "IM also trains on the instructions: toxic, biased or templated prompt text is learned too "
    "(paper §5).",
    "Lengths are in words, as in the paper's Table 5 (len(text.split())); the paper's own counts are "
    "one word higher per message (see table5_convention). PLW measured Rg in tokens.",
    "PLW and WIT score other benchmarks (multiple choice, short generation, IFEval, BBH) than the seed paper's "
    "AlpacaEval; their best weights need not carry over to open-ended generation, nor to other models.",
)


def predicted_gain_from_ratio(ratio: float) -> float:
    """Relative AlpacaEval 1.0 gain of IM over IT (%) that the paper's ratio fit predicts."""
    return RATIO_FIT[0] * math.log(ratio) + RATIO_FIT[1]


def predicted_gain_from_size(examples: int) -> float:
    """Relative AlpacaEval 1.0 gain of IM over IT (%) that the paper's size fit predicts."""
    return SIZE_FIT[0] * math.log(examples) + SIZE_FIT[1]


def _vote(gain: float) -> float:
    return min(1.0, max(0.0, (gain - VOTE_ZERO_AT) / (VOTE_ONE_AT - VOTE_ZERO_AT)))


def generation_ratio(instruction_lengths: Sequence[float], output_lengths: Sequence[float]) -> dict[str, float]:
    """PLW's generation ratio Rg: per-example output/instruction length, as arithmetic and geometric means.

    PLW (Huerta-Enochian & Ko 2024) defines Rg as the mean ratio of completion to prompt length;
    its companion code (github.com/davidsvaughn/prompt-loss-weight, ``gen_ratios.py`` line 183)
    takes the arithmetic mean and plots its log. The arithmetic mean is pulled up by a few very
    long outputs, so the geometric mean is reported beside it. Rows with an empty side are left out.
    """
    ratios = [o / i for i, o in zip(instruction_lengths, output_lengths) if i > 0 and o > 0]
    if not ratios:
        return {"arithmetic": float("nan"), "geometric": float("nan"), "examples": 0}
    return {"arithmetic": statistics.fmean(ratios), "geometric": math.exp(statistics.fmean(map(math.log, ratios))),
            "examples": len(ratios)}


def _continuous_weight(vote: float, rg: Mapping[str, float] | None) -> tuple[float, list[float], list[str]]:
    """``(weight, [low, high], reasons)``: the seed paper's vote combined with PLW's and WIT's findings."""
    reasons = []
    short = long_ = False
    if rg and rg.get("examples"):
        a, g = rg["arithmetic"], rg["geometric"]
        short, long_ = a < 1 and g < 1, a >= 1 and g >= 1
        side = ("short completions (Rg < 1): " + PLW_SHORT) if short else ("long completions (Rg >= 1): " + PLW_LONG) \
            if long_ else "the arithmetic and geometric means fall on either side of 1: PLW's two regimes are mixed here"
        reasons.append(f"Rg (output/instruction words per example) arithmetic {a:.3g}, geometric {g:.3g}: {side} "
                       f"[{CITE['plw']}]")
    if vote >= 1:
        weight, span = 1.0, [0.5, 1.0]
        why = "the seed paper's fits both favour IM"
        why += (", and for long generation PLW's short-completion curve peaks at about 1: weight 1.0 (IM)" if short
                else ": weight 1.0 (IM)")
        reasons.append(why + f"; the range reaches down to 0.5, the top of WIT's best region [{CITE['wit']}]")
    elif vote <= 0:
        weight, span = 0.0, [0.0, 0.1]
        reasons.append("the seed paper's fits both favour IT: weight 0.0 (IT); the range reaches 0.1 because WIT's best "
                       f"prompt weight was non-zero in 43 of 75 settings and PLW's best small weights were 0.01-0.1 "
                       f"[{CITE['wit']}; {CITE['plw']}]")
    else:
        weight = min(WIT_BEST_AVERAGE[1], max(WIT_BEST_AVERAGE[0], round(vote * WIT_REGION[1], 2)))
        span = list(WIT_BEST_AVERAGE)
        reasons.append(f"the seed paper's fits disagree or are weak (vote {vote:.2f} for IM): mapped onto WIT's best "
                       f"prompt-weight region 0-0.5 and held within its per-benchmark average best weights "
                       f"{WIT_BEST_AVERAGE[0]}-{WIT_BEST_AVERAGE[1]}: weight {weight} [{CITE['wit']}]")
        if short:
            span = [0.01, 1.0]
            reasons.append("with short completions PLW found the best weight depends on the task: 0.01-0.1 for "
                           f"multiple choice and short answers, about 1 for long generation [{CITE['plw']}]")
    return weight, span, reasons


def recommend(ratio: float, examples: int, rg: Mapping[str, float] | None = None) -> dict[str, Any]:
    """IM, IT or an instruction weight, with the reasoning (see the module docstring).

    Args:
        ratio: instruction/output ratio of mean words (the seed paper's predictor).
        examples: number of training examples.
        rg: ``generation_ratio`` of the data (PLW's predictor); None leaves PLW's signal out.

    Returns:
        ``choice`` (IM, IT or weighted), ``instruction_weight`` (the recommended weight),
        ``recommended_range``, the seed paper's predicted gains, ``reasons`` (each citing its
        source) and the Axolotl ``config`` lines.
    """
    g_ratio, g_size = predicted_gain_from_ratio(ratio), predicted_gain_from_size(examples)
    v_ratio, v_size = _vote(g_ratio), _vote(g_size)
    vote = (v_ratio + v_size) / 2
    reasons = [
        f"instruction/output ratio {ratio:.4g}: the ratio fit predicts {g_ratio:+.1f}% "
        f"({'favours IM' if v_ratio >= 1 else 'favours IT' if v_ratio <= 0 else 'weak'}) [{CITE['paper']}]",
        f"{examples} examples: the size fit predicts {g_size:+.1f}% "
        f"({'favours IM' if v_size >= 1 else 'favours IT' if v_size <= 0 else 'weak'}) [{CITE['paper']}]",
    ]
    weight, span, more = _continuous_weight(vote, rg)
    reasons += more
    choice = "IM" if weight >= 1.0 else "IT" if weight <= 0.0 else "weighted"
    if choice == "IM":
        config = "im_mode: im"
    elif choice == "IT":
        config = "im_mode: it"
    else:
        reasons.append("if you can afford a sweep, `python -m instruction_modelling.sweep` writes one config per weight; "
                       "compare them with `analyze losses`")
        config = f"im_mode: im\nim_instruction_weight: {weight}"
    notes = []
    if not RATIO_FIT_RANGE[0] <= ratio <= RATIO_FIT_RANGE[1]:
        notes.append(f"ratio {ratio:.4g} is outside the ratio fit's range {RATIO_FIT_RANGE}: extrapolated")
    if not SIZE_FIT_RANGE[0] <= examples <= SIZE_FIT_RANGE[1]:
        notes.append(f"{examples} examples is outside the size fit's range {SIZE_FIT_RANGE}: extrapolated")
    return {
        "choice": choice,
        "instruction_weight": weight,
        "recommended_range": span,
        "paper_vote_for_im": round(vote, 3),
        "predicted_gain_from_ratio_pct": round(g_ratio, 2),
        "predicted_gain_from_size_pct": round(g_size, 2),
        "reasons": reasons,
        "extrapolation": notes,
        "config": config,
        "caveats": list(CAVEATS),
        "sources": dict(SOURCES),
        "heuristic": True,
    }


# ----------------------------------------------------------------------------------------
# Rows -> instruction and output texts (the same readers as training).
# ----------------------------------------------------------------------------------------


def instruction_and_output(row: Mapping[str, Any], fields: RowFields) -> tuple[str, list[str], list[str]]:
    """``(format, instruction_texts, output_texts)`` of a row (``stats.side_texts``), validated as
    training validates it."""
    if not isinstance(row, Mapping):
        raise RowError("<row>", f"must be a JSON object, got {type(row).__name__}")
    instruction, output = side_texts(row, fields)
    return detect_format(row, fields), instruction, output


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, population standard deviation (as Table 5) and percentiles."""
    ordered = sorted(values)
    n = len(ordered)

    def pct(q: float) -> float:
        # Linear interpolation between closest ranks (numpy's default).
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {
        "mean": statistics.fmean(ordered),
        "std": statistics.pstdev(ordered) if n > 1 else 0.0,
        "min": ordered[0],
        "p10": pct(0.10),
        "median": pct(0.50),
        "p90": pct(0.90),
        "max": ordered[-1],
    }


@dataclass
class Source:
    """One dataset to diagnose: its rows, field names and role (train or eval)."""

    name: str
    path: Path
    rows: list
    fields: RowFields = field(default_factory=RowFields)
    role: str = "train"
    unreadable: list[str] = field(default_factory=list)  # rows left out while reading (not UTF-8, not JSON, too long)
    row_names: list[str] | None = None  # "file row N (line M)" of each row, when unreadable ones were left out


class BadRowsError(ValueError):
    """Input that cannot be diagnosed (unreadable file, no usable row), naming file, row, line and field."""


# What training does with the same rows (the plugin's `im_on_bad_rows` option), said wherever bad rows are reported.
BAD_ROWS_ADVICE = ("training stops at the first of them (im_on_bad_rows: error, the default); "
                   "fix them, or set im_on_bad_rows: skip to drop and count them")
FIRST_BAD_ROWS = 10  # reasons listed in the report


def _where(path: Path, index: int) -> str:
    return describe_row(str(path), index)


@dataclass
class _Counts:
    instruction_words: list[int] = field(default_factory=list)
    output_words: list[int] = field(default_factory=list)
    instruction_parts: list[int] = field(default_factory=list)  # messages (chat) or 1 (plain formats)
    output_parts: list[int] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    multi_turn: int = 0
    bad_rows: list[str] = field(default_factory=list)  # "<file> row i (line j): field 'f': reason"
    tokens: dict[str, list[int]] | None = None


def _count(source: Source, on_bad_rows: str, encoder: Any = None) -> _Counts:
    counts = _Counts(tokens={"instruction": [], "output": [], "template": []} if encoder else None)
    bad = list(source.unreadable)
    for i, row in enumerate(source.rows):
        try:
            if not isinstance(row, dict):
                raise RowError("<row>", f"must be a JSON object, got {type(row).__name__}")
            fmt, instr, out = instruction_and_output(row, source.fields)
            if encoder is not None:
                segs = encoder.encode(row).segment_ids
        except RowError as exc:
            bad.append(f"{source.row_names[i] if source.row_names else _where(source.path, i)}: {exc}")
            continue
        counts.formats[fmt] = counts.formats.get(fmt, 0) + 1
        counts.multi_turn += len(out) > 1
        counts.instruction_words.append(word_count(instr))
        counts.output_words.append(word_count(out))
        counts.instruction_parts.append(len(instr) if fmt == "messages" else 1)
        counts.output_parts.append(len(out) if fmt == "messages" else 1)
        if encoder is not None:
            counts.tokens["instruction"].append(sum(s in INSTRUCTION_SEGMENTS for s in segs))
            counts.tokens["output"].append(sum(s in OUTPUT_SEGMENTS for s in segs))
            counts.tokens["template"].append(sum(s == Segment.TEMPLATE for s in segs))
    if bad and on_bad_rows == "error":
        more = f" ({len(bad) - 1} more bad rows; without --on-bad-rows error they are counted)" if len(bad) > 1 else ""
        raise BadRowsError(f"{source.path}: {bad[0]}{more}")
    counts.bad_rows = bad
    if not counts.output_words:
        first = f"; first: {bad[0]}" if bad else ""
        raise BadRowsError(f"{source.path}: no usable rows ({len(source.rows)} rows, {len(bad)} bad{first})")
    return counts


def _merge(parts: Sequence[_Counts]) -> _Counts:
    merged = _Counts(tokens={"instruction": [], "output": [], "template": []} if parts[0].tokens else None)
    for c in parts:
        merged.instruction_words += c.instruction_words
        merged.output_words += c.output_words
        merged.instruction_parts += c.instruction_parts
        merged.output_parts += c.output_parts
        merged.multi_turn += c.multi_turn
        merged.bad_rows += c.bad_rows
        for k, v in c.formats.items():
            merged.formats[k] = merged.formats.get(k, 0) + v
        if merged.tokens is not None:
            for k in merged.tokens:
                merged.tokens[k] += c.tokens[k]
    return merged


def _table5(counts: _Counts) -> dict[str, float]:
    """Means as the paper's Table 5 counts them: one more word per message."""
    instr = [w + k for w, k in zip(counts.instruction_words, counts.instruction_parts)]
    out = [w + k for w, k in zip(counts.output_words, counts.output_parts)]
    mi, mo = statistics.fmean(instr), statistics.fmean(out)
    return {"instruction_mean": mi, "output_mean": mo, "output_std": statistics.pstdev(out), "ratio": mi / mo}


def _report(name: str, counts: _Counts, tokenizer_info: dict | None) -> dict[str, Any]:
    instr, out = counts.instruction_words, counts.output_words
    mi, mo = statistics.fmean(instr), statistics.fmean(out)
    ratio = mi / mo
    report: dict[str, Any] = {
        "source": name,
        "examples": len(out),
        "formats": counts.formats,
        "multi_turn": counts.multi_turn,
        # Left out of every statistic below; the same rows would stop (or be skipped by) training.
        "bad_rows": {"count": len(counts.bad_rows), "first": counts.bad_rows[:FIRST_BAD_ROWS],
                     "advice": BAD_ROWS_ADVICE if counts.bad_rows else None},
        "words": {"instruction": distribution(instr), "output": distribution(out)},
        "table5_convention": _table5(counts),
        # Per-example ratios; rows with an empty side cannot occur (validation rejects empty content).
        "per_example_ratio": distribution([i / o for i, o in zip(instr, out)]),
    }
    if counts.tokens is not None:
        ti, to, tt = (counts.tokens[k] for k in ("instruction", "output", "template"))
        report["tokens"] = {
            **(tokenizer_info or {}),
            "instruction": distribution(ti),
            "output": distribution(to),
            "template_mean": statistics.fmean(tt),
            "ratio": statistics.fmean(ti) / statistics.fmean(to),
            # Share of IM's loss on output tokens: token-normalised (Axolotl's default) and
            # per-example normalised (the paper's batch-size-1 runs).
            "im_output_share_token": sum(to) / (sum(ti) + sum(to)),
            "im_output_share_sequence": statistics.fmean(o / (i + o) for i, o in zip(ti, to)),
        }
    rg = generation_ratio(instr, out)
    report["recommendation"] = rec = recommend(ratio, len(out), rg)
    report["recommended_instruction_weight"] = rec["instruction_weight"]
    report["recommended_range"] = rec["recommended_range"]
    report["rg"] = rg
    report["ratio"] = ratio  # last key: the headline number
    return report


# ----------------------------------------------------------------------------------------
# Inputs: data files and Axolotl YAMLs.
# ----------------------------------------------------------------------------------------


def _read(path: Path, on_bad_rows: str = "error") -> tuple[list, list[str], list[str] | None]:
    """The rows of a file, and the rows left out because they cannot be read (skip mode)."""
    from instruction_modelling.core.read import read_local

    try:
        records = read_local(path, on_bad_rows=on_bad_rows)
    except ValueError as exc:
        raise BadRowsError(f"{exc} (--on-bad-rows skip drops and counts unreadable rows)") from exc
    names = [records.where(i) for i in range(len(records.rows))] if records.unreadable else None
    return records.rows, records.unreadable, names


def load_sources(path: str | Path, on_bad_rows: str = "error") -> list[Source]:
    """The datasets to diagnose: one data file, or every local dataset of an Axolotl YAML."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix not in (".yml", ".yaml"):
        rows, unreadable, names = _read(path, on_bad_rows)
        return [Source(path.name, path, rows, unreadable=unreadable, row_names=names)]
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise BadRowsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(cfg, dict):
        raise BadRowsError(f"{path}: expected an Axolotl config (a mapping), got {type(cfg).__name__}")
    entries = [(ds, "train", f"datasets[{i}]") for i, ds in enumerate(cfg.get("datasets") or [])]
    entries += [(ds, "eval", f"test_datasets[{i}]") for i, ds in enumerate(cfg.get("test_datasets") or [])]
    if not any(role == "train" for _, role, _ in entries):
        raise BadRowsError(f"{path}: no `datasets:` entries to diagnose")
    from instruction_modelling.axolotl.strategy import (
        row_fields_from_dataset_config,  # Axolotl's field options -> RowFields
    )

    sources = []
    for ds, role, where in entries:
        if not isinstance(ds, dict) or not ds.get("path"):
            raise BadRowsError(f"{path}: {where} has no `path`")
        files = ds.get("data_files") or [ds["path"]]
        files = [files] if isinstance(files, str) else files
        for f in files:
            candidates = [Path(f), path.parent / f]  # as Axolotl (cwd), then next to the YAML
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                kind = "a directory" if any(c.is_dir() for c in candidates) else "not a local file"
                raise BadRowsError(
                    f"{path}: {where}.path '{f}' is {kind}; diagnose reads local JSON/JSONL files "
                    "(hub datasets are not downloaded)"
                )
            rows, unreadable, names = _read(found, on_bad_rows)
            sources.append(Source(f"{where} {found.name}", found, rows, row_fields_from_dataset_config(ds), role,
                                  unreadable, names))
    return sources


def row_encoder(tokenizer: Any, fields: RowFields | None = None) -> tuple[Any, str]:
    """``(RowEncoder, template name)`` with the tokenizer's chat template, or the paper's tulu one.

    The analysis commands do not import Axolotl.
    """
    from instruction_modelling.core.segments import ChatRenderer, RowEncoder
    from instruction_modelling.resources import TULU_TEMPLATE

    template, name = (tokenizer.chat_template, "tokenizer's") if tokenizer.chat_template else (TULU_TEMPLATE, "tulu (paper)")
    return RowEncoder(tokenizer, ChatRenderer(tokenizer, template), fields or RowFields()), name


def _encoder(tokenizer_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    name = row_encoder(tok)[1]
    return (lambda fields: row_encoder(tok, fields)[0]), {"tokenizer": str(tokenizer_path), "chat_template": name}


def diagnose(path: str | Path, tokenizer: str | None = None, on_bad_rows: str = "skip",
             plot: str | Path | None = None) -> dict[str, Any]:
    """The full report for a data file or an Axolotl YAML (see the module docstring).

    The top level describes the training data as a whole (for a single file, that file);
    ``datasets`` lists each dataset when there is more than one. ``plot`` writes length
    histograms of the training datasets to that PNG.
    """
    sources = load_sources(path, on_bad_rows)
    make_encoder, tok_info = _encoder(tokenizer) if tokenizer else (None, None)
    per_source = [(s, _count(s, on_bad_rows, make_encoder(s.fields) if make_encoder else None)) for s in sources]
    train = [(s, c) for s, c in per_source if s.role == "train"]
    report = _report(str(path), _merge([c for _, c in train]), tok_info)
    ratio = report.pop("ratio")
    if len(per_source) > 1:
        report["datasets"] = [
            {"role": s.role, "path": str(s.path), **_report(s.name, c, tok_info)} for s, c in per_source
        ]
    if plot:
        by_name = {s.name: (c.instruction_words, c.output_words) for s, c in train}
        report["plot"] = str(plot_lengths({**report, "ratio": ratio}, by_name, plot))
    report["ratio"] = ratio  # last key: the headline number
    return report


# ----------------------------------------------------------------------------------------
# Output: text, JSON and a plot.
# ----------------------------------------------------------------------------------------


def _dist_line(label: str, d: Mapping[str, float]) -> str:
    return f"  {label:<20}" + "".join(f"  {k} {d[k]:<8.4g}" for k in ("mean", "std", "min", "p10", "median", "p90", "max"))


def format_report(rep: Mapping[str, Any]) -> str:
    """Human-readable report."""
    lines = []

    def block(r, title):
        lines.append(title)
        fmts = ", ".join(f"{k} {v}" for k, v in r["formats"].items())
        bad = r["bad_rows"]
        lines.append(f"  examples {r['examples']} ({fmts}; {r['multi_turn']} multi-turn)"
                     + (f"; {bad['count']} bad rows, left out of the statistics" if bad["count"] else ""))
        for s in bad["first"][:5]:
            lines.append(f"    bad row: {s}")
        if bad["count"] > 5:
            lines.append(f"    ... {bad['count'] - 5} more (--json lists the first {FIRST_BAD_ROWS})")
        if bad["count"]:
            lines.append(f"    {bad['advice']}")
        lines.append(_dist_line("instruction words", r["words"]["instruction"]))
        lines.append(_dist_line("output words", r["words"]["output"]))
        lines.append(_dist_line("per-example ratio", r["per_example_ratio"]))
        if "tokens" in r:
            t = r["tokens"]
            lines.append(_dist_line("instruction tokens", t["instruction"]))
            lines.append(_dist_line("output tokens", t["output"]))
            lines.append(f"  template tokens per example {t['template_mean']:.1f}; token ratio {t['ratio']:.4f}; "
                         f"IM puts {100 * t['im_output_share_token']:.1f}% of its loss on output tokens "
                         f"({100 * t['im_output_share_sequence']:.1f}% with per-example averaging) "
                         f"[{t['tokenizer']}, {t['chat_template']} chat template]")
        lines.append(f"  instruction/output ratio (ratio of mean words) {r['ratio']:.4f} "
                     f"(paper's Table 5 convention, +1 word per message: {r['table5_convention']['ratio']:.4f})")

    block(rep, f"Diagnosis of {rep['source']}" + (" (training datasets together)" if "datasets" in rep else ""))
    for d in rep.get("datasets", []):
        block(d, f"- {d['role']} dataset {d['source']} ({d['path']})")
    rec = rep["recommendation"]
    lines.append("")
    lines.append("Predicted relative AlpacaEval 1.0 gain of IM over IT (paper Figure 2 fits):")
    lines.append(f"  from the ratio: {rec['predicted_gain_from_ratio_pct']:+.1f}%   "
                 f"(18.85·ln(ratio) + 25.83)")
    lines.append(f"  from the size:  {rec['predicted_gain_from_size_pct']:+.1f}%   "
                 f"(−39.37·ln(N) + 431.74)")
    lines.append(f"Recommendation (heuristic): {rec['choice']}, instruction weight {rec['instruction_weight']} "
                 f"(plausible range {rec['recommended_range'][0]}-{rec['recommended_range'][1]})")
    lines += [f"  - {r}" for r in rec["reasons"] + rec["extrapolation"]]
    lines.append("  Axolotl config (with the instruction_modelling plugin):")
    lines += [f"    {c}" for c in rec["config"].splitlines()]
    lines.append("Caveats:")
    lines += [f"  - {c}" for c in rec["caveats"]]
    lines.append("Sources:")
    lines += [f"  [{CITE[k]}] {v}" for k, v in rec["sources"].items()]
    return "\n".join(lines)


def plot_lengths(rep: Mapping[str, Any], counts_by_name: Mapping[str, tuple[list[int], list[int]]], path: str | Path) -> Path:
    """Histograms of instruction and output words (log-spaced bins), one outline per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (instr, out) in counts_by_name.items():
        for ax, values in ((axes[0], instr), (axes[1], out)):
            values = np.maximum(np.asarray(values, dtype=float), 1)
            bins = np.logspace(0, np.log10(values.max()) + 0.05, 40)
            (line,) = ax.plot([], [])  # one colour per dataset across panels
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, color=line.get_color(),
                    label=f"{name} (mean {values.mean():.1f})")
            ax.axvline(values.mean(), color=line.get_color(), linestyle="--", linewidth=1)
        ratios = np.asarray(instr, dtype=float) / np.asarray(out, dtype=float)
        ratios = ratios[ratios > 0]
        if len(ratios):
            axes[2].hist(ratios, bins=np.logspace(np.log10(ratios.min()) - 0.05, np.log10(ratios.max()) + 0.05, 40),
                         histtype="step", linewidth=1.5, label=name)
    for ax, title in zip(axes, ("instruction length (words)", "output length (words)", "per-example instruction/output ratio")):
        ax.set_xscale("log")
        ax.set_title(title + (", dashed: mean" if "length" in title else ""))
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    axes[2].axvline(rep["ratio"], color="black", linestyle="--", linewidth=1)
    axes[2].annotate(f"ratio of means {rep['ratio']:.3g} ", (rep["ratio"], 0.97), xycoords=("data", "axes fraction"),
                     fontsize=8, ha="right", va="top")
    rec = rep["recommendation"]
    fig.suptitle(f"{Path(rep['source']).name}: {rep['examples']} examples, ratio {rep['ratio']:.3g}; recommendation "
                 f"{rec['choice']}" + (f" (instruction weight {rec['instruction_weight']})" if rec["choice"] == "weighted" else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instruction_modelling.diagnose",
        description="Instruction/output length statistics of a dataset and whether Instruction Modelling suits it "
                    "(the paper's Figure 2 fits; a heuristic).",
    )
    parser.add_argument("data", help="JSONL/JSON data file (messages, Alpaca or prompt/completion rows) or an Axolotl YAML")
    parser.add_argument("--tokenizer", help="local tokenizer (or model) directory: also count tokens per segment")
    parser.add_argument("--json", action="store_true", help="print the report as one line of JSON (key `ratio` last)")
    parser.add_argument("--plot", metavar="PNG", help="write length histograms to this PNG")
    parser.add_argument("--on-bad-rows", choices=("skip", "error"), default="skip",
                        help="skip: leave bad rows out of the statistics and report them (count, first reasons, "
                             "what training would do); error: stop at the first one with exit code 2 "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        rep = diagnose(args.data, args.tokenizer, args.on_bad_rows, args.plot)
    except (FileNotFoundError, BadRowsError) as exc:
        # Exit 2 only when nothing can be diagnosed: unreadable input, or not one usable row.
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"source": args.data, "error": str(exc), "bad_rows": None, "ratio": None}))
        return 2
    if args.json:
        print(json.dumps(rep, ensure_ascii=False))
    else:
        print(format_report(rep))
        if args.plot:
            print(f"length histograms: {rep['plot']}")
    return 0


if __name__ == "__main__":
    from .cli import run_module_main  # third-party noise filtered; --verbose keeps it

    raise SystemExit(run_module_main(main))
