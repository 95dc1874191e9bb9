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

Each predicted gain becomes a vote for IM between 0 and 1 (0 at a predicted 0%, 1 at +5%: our
thresholds). The size fit votes only inside the range it was measured on; outside, its
extrapolation is not used and its vote at the range's end fades out over a factor ``SIZE_FADE``,
so the ratio fit decides alone. The combined vote maps continuously onto the instruction weight
(0 = IT, 0.25 = the centre of WIT's best region when the fits disagree, 1 = IM). The range adds
the weights at the ends of the ratio's bootstrap interval and the sources' findings: WIT's best
region and per-benchmark averages, and PLW's small weights 0.01-0.5 when PLW's generation ratio
Rg (per-example output/prompt length, counted with the template as PLW does) is below 1. Every
reason names its source, or says ``[our heuristic]``; docs/weighting.md tabulates the rule and
docs/diagnostics.md how sure it is (intervals, the 200-row minimum). LIMA gets 0.25 (long
outputs, few examples; the paper measured no AlpacaEval gain) and Alpagasus Dolly 3k, Alpaca 5k
and the LESS sets IM. The fits come from LLaMA-2-7B full fine-tuning, are noisy (points lie tens
of percentage points off the lines) and the size fit was only measured at ratio ≈ 10; treat the
forecast as a prior, and check with ``analyze losses`` after training.
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
SIZE_FIT_RANGE = (1_000, 35_000)  # Tulu V2 subsets 1k-35k, ratio ≈ 10
# Outside SIZE_FIT_RANGE the size fit's own (extrapolated) prediction is never used: the value it
# has at the nearest end of the range is relied on less and less, down to not at all a factor
# SIZE_FADE beyond it (our heuristic; a hard cut-off would make the weight jump at 35k examples).
SIZE_FADE = 2.0
# A predicted gain at or below VOTE_ZERO_AT is a vote for IT, at or above VOTE_ONE_AT one for IM.
VOTE_ZERO_AT = 0.0
VOTE_ONE_AT = 5.0
# Percentile bootstrap over rows: the ratio and Rg of a resampled data set, BOOTSTRAP_RESAMPLES times.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0  # fixed: the same file always gets the same intervals
# Above this many rows the sample means are normal to a good approximation and resampling costs
# seconds (17 s at 300k rows): the intervals come from the delta method instead.
BOOTSTRAP_MAX_ROWS = 20_000
# Below this many examples the 95% percentile intervals themselves undercover: on random subsets of
# LIMA and Alpagasus Dolly 3k they held the whole file's ratio and Rg 73-93% of the time at 10 rows,
# 88-96% at 100 and 92-97% at 200 (docs/diagnostics.md, "How sure is it?").
MIN_EXAMPLES = 200

# Where each signal of the recommendation comes from: a short tag cited in each reason, the
# full reference listed under "Sources" in the text output. "ours" marks our own mappings.
CITE = {"paper": "Shi et al. 2024, Fig. 2", "plw": "PLW", "wit": "WIT", "ours": "our heuristic"}
SOURCES = {
    "paper": "Shi et al. 2024, Fig. 2: Instruction Tuning With Loss Over Instructions (NeurIPS 2024), arXiv 2405.14394; "
             "LLaMA-2-7B, AlpacaEval 1.0; ratio fit on 19 datasets (ratio 0.09-26), size fit on Tulu V2 subsets of "
             "1k-35k examples at ratio ≈ 10",
    "plw": "PLW: Huerta-Enochian & Ko, Instruction Fine-Tuning: Does Prompt Loss Matter?, arXiv 2401.13586 "
           "(final version); LLaMA-1/2 7B, 10 prompt weights 0-1; Rg counted in tokens, template included",
    "wit": "WIT: Chatterjee et al., On the Effect of Instruction Tuning Loss on Generalization, arXiv 2507.07817 "
           "(TACL), github.com/kowndinya-renduchintala/WIT; 525 runs, 5 models x LIMA / Alpaca-Cleaned / Tulu-v2",
    "ours": "this tool: the vote thresholds (0% and +5%), the vote-to-weight mapping, the fade of the size fit "
            "outside its range, the bootstrap intervals and the minimum size are our own choices, not any paper's",
}
PLW_SHORT = ("PLW found performance a negative quadratic in the prompt weight, best at small weights (0.01-0.5) for "
             "multiple choice and short generation and about 1 for long generation")
PLW_LONG = "PLW found the prompt weight has no significant effect on long-completion data"
PLW_SMALL = (0.01, 0.5)  # PLW (final version): best prompt weights for multiple choice and short generation
WIT_REGION = (0.0, 0.5)  # WIT: best prompt weights λp 0-0.5 (with response weights 0.5-1)
WIT_BEST_AVERAGE = (0.17, 0.48)  # WIT: average best λp per benchmark, BBH 0.17 to IFEval 0.48

CAVEATS = (
    "The fits come from LLaMA-2-7B full fine-tuning, scored by AlpacaEval 1.0 (GPT-4 judge); other "
    "models, PEFT and other benchmarks may behave differently.",
    "Both fits are noisy: the paper's points lie tens of percentage points off the lines, so read the "
    "predicted gains as a direction, not a number. The bootstrap intervals cover only the sampling noise of "
    "this data's lengths, not the fits' own error.",
    "The size fit was measured on Tulu V2 subsets whose ratio is about 10 and whose size is 1k-35k; at low "
    "ratios and outside that size range the size effect is unmeasured, and it is not used there.",
    "IM also trains on the instructions: toxic, biased or templated prompt text is learned too "
    "(paper §5).",
    "Lengths are in words, as in the paper's Table 5 (len(text.split())); the paper's own counts are "
    "one word higher per message (see table5_convention). PLW measured Rg in tokens with the template "
    "(rg_with_template; exact with --tokenizer).",
    "Our instruction weight applies to instruction content only (template tokens carry no loss, Eq. 4); "
    "PLW's and WIT's released code weight the whole prompt, template and BOS included, so their weights "
    "are not exactly ours (docs/weighting.md).",
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


def size_evidence(examples: float) -> tuple[float, float]:
    """``(vote, reliance)`` of the size fit: its vote at ``examples`` inside the range it was measured
    on (reliance 1); outside, its vote at the nearest end of that range, relied on linearly less in
    ln(N) until a factor ``SIZE_FADE`` beyond (reliance 0). Its extrapolated prediction never counts."""
    low, high = SIZE_FIT_RANGE
    if low <= examples <= high:
        return _vote(predicted_gain_from_size(examples)), 1.0
    edge = low if examples < low else high
    reliance = max(0.0, 1.0 - abs(math.log(examples / edge)) / math.log(SIZE_FADE))
    return _vote(predicted_gain_from_size(edge)), reliance


def paper_vote(ratio: float, examples: float) -> float:
    """The seed paper's vote for IM in [0, 1]: the ratio vote and the size vote averaged, the size vote
    weighted by its reliance (so outside the size fit's range the ratio fit decides alone)."""
    v_size, reliance = size_evidence(examples)
    return (_vote(predicted_gain_from_ratio(ratio)) + reliance * v_size) / (1.0 + reliance)


def weight_from_vote(vote: float) -> float:
    """Our mapping (a heuristic) from the paper's vote to an instruction weight: continuous and
    increasing, 0 at vote 0 (IT), the centre of WIT's best region 0-0.5 (0.25) when the two fits
    disagree (vote 0.5), 1 at vote 1 (IM); linear in between."""
    vote = min(1.0, max(0.0, vote))
    return WIT_REGION[1] * vote if vote <= 0.5 else 0.25 + 1.5 * (vote - 0.5)


def recommended_weight(ratio: float, examples: float) -> float:
    """The recommended instruction weight, unrounded (``recommend`` rounds it to 2 decimals)."""
    return weight_from_vote(paper_vote(ratio, examples))


def generation_ratio(instruction_lengths: Sequence[float], output_lengths: Sequence[float]) -> dict[str, float]:
    """PLW's generation ratio Rg: per-example output/instruction length, as arithmetic and geometric means.

    PLW (Huerta-Enochian & Ko 2024) defines Rg as the mean ratio of completion to prompt length,
    counted in tokens with the prompt template. D. Vaughn's article on PLW (its code,
    github.com/davidsvaughn/prompt-loss-weight, ``gen_ratios.py`` line 183; not the PLW paper's
    code) takes the arithmetic mean and plots its log. The arithmetic mean is pulled up by a few
    very long outputs, so the geometric mean is reported beside it. Rows with an empty side are
    left out.
    """
    ratios = [o / i for i, o in zip(instruction_lengths, output_lengths) if i > 0 and o > 0]
    if not ratios:
        return {"arithmetic": float("nan"), "geometric": float("nan"), "examples": 0}
    return {"arithmetic": statistics.fmean(ratios), "geometric": math.exp(statistics.fmean(map(math.log, ratios))),
            "examples": len(ratios)}


def bootstrap_intervals(instruction: Sequence[float], output: Sequence[float],
                        rg_prompts: Mapping[str, Sequence[float]] = {}, rg_outputs: Mapping[str, Sequence[float]] = {},
                        resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Percentile bootstrap intervals over rows, all statistics from the same resamples.

    ``ratio``: the ratio of mean instruction to mean output lengths. For each name in
    ``rg_prompts``: Rg's arithmetic and geometric means of output/prompt per example, with
    ``rg_outputs[name]`` as outputs (default ``output``). Returns ``{"level", "resamples",
    "ratio": [low, high], "<name>": {"arithmetic": [low, high], "geometric": [low, high]}}``.
    """
    import numpy as np

    n = len(output)
    rng = np.random.default_rng(seed)
    instr, out = np.asarray(instruction, dtype=float), np.asarray(output, dtype=float)
    cols = {"instruction": instr, "output": out}
    for name, prompt in rg_prompts.items():
        p = np.asarray(prompt, dtype=float)
        o = np.asarray(rg_outputs.get(name, output), dtype=float)
        valid = (p > 0) & (o > 0)
        r = np.where(valid, o / np.where(valid, p, 1.0), 0.0)
        cols[f"{name}.valid"], cols[f"{name}.r"] = valid.astype(float), r
        cols[f"{name}.logr"] = np.where(valid, np.log(np.where(valid, r, 1.0)), 0.0)
    if n > BOOTSTRAP_MAX_ROWS:
        return _normal_intervals(cols, list(rg_prompts), level, resamples)
    sums: dict[str, list] = {k: [] for k in cols}
    chunk = max(1, 2_000_000 // max(n, 1))  # resamples per batch: bounded memory at 300k rows
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        for k, v in cols.items():
            sums[k].append(v[idx].sum(axis=1))
    sums = {k: np.concatenate(v) for k, v in sums.items()}
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(values):
        values = values[np.isfinite(values)]
        return [float(x) for x in np.percentile(values, q)] if len(values) else [float("nan")] * 2

    with np.errstate(divide="ignore", invalid="ignore"):
        result: dict[str, Any] = {"level": level, "resamples": resamples, "method": "percentile bootstrap",
                                  "ratio": interval(sums["instruction"] / sums["output"])}
        for name in rg_prompts:
            count = sums[f"{name}.valid"]
            result[name] = {"arithmetic": interval(sums[f"{name}.r"] / count),
                            "geometric": interval(np.exp(sums[f"{name}.logr"] / count))}
    return result


def _normal_intervals(cols: Mapping[str, Any], names: Sequence[str], level: float, resamples: int) -> dict[str, Any]:
    """The delta-method (normal) intervals of the statistics ``bootstrap_intervals`` resamples."""
    import numpy as np
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    instr, out = cols["instruction"], cols["output"]
    n, ratio = len(out), instr.mean() / out.mean()
    se = np.std(instr - ratio * out) / out.mean() / math.sqrt(n)
    result: dict[str, Any] = {"level": level, "resamples": 0, "method": "normal (delta method)",
                              "ratio": [float(ratio - z * se), float(ratio + z * se)]}
    for name in names:
        valid = cols[f"{name}.valid"] > 0
        r, logr = cols[f"{name}.r"][valid], cols[f"{name}.logr"][valid]
        if not len(r):
            result[name] = {"arithmetic": [float("nan")] * 2, "geometric": [float("nan")] * 2}
            continue
        half_a, half_g = z * np.std(r) / math.sqrt(len(r)), z * np.std(logr) / math.sqrt(len(r))
        result[name] = {"arithmetic": [float(r.mean() - half_a), float(r.mean() + half_a)],
                        "geometric": [float(math.exp(logr.mean() - half_g)), float(math.exp(logr.mean() + half_g))]}
    return result


def plw_regime(rg: Mapping[str, float] | None, interval: Mapping[str, Sequence[float]] | None = None) -> str:
    """PLW's regime: ``short`` (both means of Rg below 1), ``long`` (both at or above 1), ``mixed``, or
    ``uncertain`` when an interval of either mean straddles 1, ``unknown`` without Rg."""
    if not rg or not rg.get("examples"):
        return "unknown"
    if interval and any(lo < 1 <= hi for lo, hi in (interval["arithmetic"], interval["geometric"])):
        return "uncertain"
    a, g = rg["arithmetic"], rg["geometric"]
    return "short" if a < 1 and g < 1 else "long" if a >= 1 and g >= 1 else "mixed"


def _rg_text(rg: Mapping[str, float], interval: Mapping[str, Sequence[float]] | None) -> str:
    def one(k):
        ci = f" [{interval[k][0]:.3g}, {interval[k][1]:.3g}]" if interval else ""
        return f"{rg[k]:.3g}{ci}"

    return f"arithmetic {one('arithmetic')}, geometric {one('geometric')}"


def recommend(ratio: float, examples: int, rg: Mapping[str, float] | None = None,
              intervals: Mapping[str, Any] | None = None, rg_label: str = "words, without the template",
              rg_key: str = "rg") -> dict[str, Any]:
    """IM, IT or an instruction weight, with the reasoning (see the module docstring).

    Args:
        ratio: instruction/output ratio of mean words (the seed paper's predictor).
        examples: number of training examples.
        rg: ``generation_ratio`` that decides PLW's regime (PLW's own count is tokens with the
            template); None leaves PLW's signal out.
        intervals: ``bootstrap_intervals`` of the data: ``ratio`` and ``intervals[rg_key]``. The
            weights at the ends of the ratio's interval widen the range.
        rg_label: how ``rg`` was counted, for the reasons.

    Returns:
        ``choice`` (IM, IT or weighted), ``instruction_weight`` (the recommended weight),
        ``recommended_range``, the seed paper's predicted gains, ``reasons`` (each citing its
        source, ``[our heuristic]`` for our own mappings) and the Axolotl ``config`` lines.
    """
    g_ratio, g_size = predicted_gain_from_ratio(ratio), predicted_gain_from_size(examples)
    v_ratio = _vote(g_ratio)
    v_size, reliance = size_evidence(examples)
    vote = paper_vote(ratio, examples)
    exact = weight_from_vote(vote)
    weight = round(exact, 2)
    label = lambda v: "favours IM" if v >= 1 else "favours IT" if v <= 0 else "weak"  # noqa: E731
    reasons = [
        f"instruction/output ratio {ratio:.4g}: the ratio fit 18.85·ln(ratio) + 25.83 predicts {g_ratio:+.1f}% "
        f"[{CITE['paper']}] ({label(v_ratio)}: a vote for IM rising from 0 at a predicted 0% to 1 at +5% "
        f"[{CITE['ours']}])",
    ]
    if reliance == 1:
        reasons.append(f"{examples} examples: the size fit −39.37·ln(N) + 431.74 predicts {g_size:+.1f}% "
                       f"[{CITE['paper']}] ({label(v_size)})")
    else:
        edge = SIZE_FIT_RANGE[0] if examples < SIZE_FIT_RANGE[0] else SIZE_FIT_RANGE[1]
        reasons.append(
            f"{examples} examples is outside the size fit's measured range {SIZE_FIT_RANGE[0]}-{SIZE_FIT_RANGE[1]} "
            f"[{CITE['paper']}]: its extrapolation ({g_size:+.1f}%) is not used; its vote at {edge} examples "
            f"({label(v_size)}) counts with reliance {reliance:.2f}, fading to 0 at a factor {SIZE_FADE:g} beyond "
            f"the range [{CITE['ours']}]" + ("; the ratio fit decides alone" if reliance == 0 else ""))
    reasons.append(
        f"vote for IM {vote:.2f} (ratio vote and size vote averaged, the size vote weighted by its reliance) -> "
        f"instruction weight {weight}: 0 at vote 0 (IT), 0.25 at 0.5 (the centre of WIT's best prompt-weight "
        f"region 0-0.5 [{CITE['wit']}]), 1 at vote 1 (IM), linear in between [{CITE['ours']}]")

    # The range: the weights at the ends of the ratio's interval, widened by the sources' findings.
    low = high = weight
    ratio_ci = (intervals or {}).get("ratio")
    if ratio_ci and all(math.isfinite(x) and x > 0 for x in ratio_ci):
        at_ends = [round(recommended_weight(r, examples), 2) for r in ratio_ci]
        low, high = min(low, *at_ends), max(high, *at_ends)
        if max(at_ends) - min(at_ends) >= 0.05:
            reasons.append(f"across the ratio's {100 * intervals['level']:.0f}% bootstrap interval "
                           f"[{ratio_ci[0]:.3g}, {ratio_ci[1]:.3g}] the weight goes from {min(at_ends)} to "
                           f"{max(at_ends)}: the range includes both [{CITE['ours']}]")
    if weight >= 1:
        low = min(low, WIT_REGION[1])
        reasons.append(f"the range reaches down to 0.5, the top of WIT's best region [{CITE['wit']}]")
    elif weight <= 0:
        high = max(high, 0.1)
        reasons.append("the range reaches 0.1 because WIT's best prompt weight was non-zero in 43 of 75 settings "
                       f"[{CITE['wit']}]")
    else:
        low, high = min(low, WIT_BEST_AVERAGE[0]), max(high, WIT_BEST_AVERAGE[1])
        reasons.append(f"the range includes WIT's per-benchmark average best weights {WIT_BEST_AVERAGE[0]}-"
                       f"{WIT_BEST_AVERAGE[1]} [{CITE['wit']}]")
    rg_ci = (intervals or {}).get(rg_key)
    regime = plw_regime(rg, rg_ci)
    if regime != "unknown":
        side = {
            "short": "short completions (Rg < 1): " + PLW_SHORT + "; the range includes PLW's small weights "
                     f"{PLW_SMALL[0]}-{PLW_SMALL[1]}",
            "long": "long completions (Rg >= 1): " + PLW_LONG,
            "mixed": "the arithmetic and geometric means fall on either side of 1: PLW's two regimes are mixed here",
            "uncertain": "an interval straddles 1: this data does not settle PLW's regime (more rows would)",
        }[regime]
        reasons.append(f"Rg (output/prompt length per example, {rg_label}) {_rg_text(rg, rg_ci)}: {side} "
                       f"[{CITE['plw']}]")
        if regime == "short":
            low, high = min(low, PLW_SMALL[0]), 1.0
            reasons.append("with short completions PLW found small weights best for multiple choice and short answers "
                           f"and about 1 for long generation: which applies depends on your task [{CITE['plw']}]")
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
        notes.append(f"ratio {ratio:.4g} is outside the ratio fit's range {RATIO_FIT_RANGE}: extrapolated "
                     "(the vote is already 0 or 1 there)")
    if reliance < 1:
        notes.append(f"{examples} examples is outside the size fit's range {SIZE_FIT_RANGE}: extrapolated, so the "
                     "size fit does not decide")
    return {
        "choice": choice,
        "instruction_weight": weight,
        "recommended_range": [round(low, 2), round(high, 2)],
        "paper_vote_for_im": round(vote, 3),
        "size_fit_reliance": round(reliance, 3),
        "plw_regime": regime,
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
    # Template words on the prompt side (Alpaca preamble and section tags; one role tag per message
    # for chat rows, as the paper's tulu template; 0 for prompt/completion): PLW's prompt includes them.
    template_words: list[int] = field(default_factory=list)
    # With a tokenizer: instruction, output and template tokens, and the template tokens on the prompt
    # side (everything before the last output token; the end-of-turn tokens after it close the completion).
    tokens: dict[str, list[int]] | None = None


def _count(source: Source, on_bad_rows: str, encoder: Any = None) -> _Counts:
    counts = _Counts(tokens=_token_lists() if encoder else None)
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
        counts.template_words.append(_prompt_template_words(row, fmt, source.fields, len(instr) + len(out)))
        if encoder is not None:
            counts.tokens["instruction"].append(sum(s in INSTRUCTION_SEGMENTS for s in segs))
            counts.tokens["output"].append(sum(s in OUTPUT_SEGMENTS for s in segs))
            counts.tokens["template"].append(sum(s == Segment.TEMPLATE for s in segs))
            last_out = max((j for j, s in enumerate(segs) if s in OUTPUT_SEGMENTS), default=len(segs))
            counts.tokens["prompt_template"].append(sum(s == Segment.TEMPLATE for s in segs[:last_out]))
    if bad and on_bad_rows == "error":
        more = f" ({len(bad) - 1} more bad rows; without --on-bad-rows error they are counted)" if len(bad) > 1 else ""
        raise BadRowsError(f"{source.path}: {bad[0]}{more}")
    counts.bad_rows = bad
    if not counts.output_words:
        first = f"; first: {bad[0]}" if bad else ""
        raise BadRowsError(f"{source.path}: no usable rows ({len(source.rows)} rows, {len(bad)} bad{first})")
    return counts


def _token_lists() -> dict[str, list[int]]:
    return {"instruction": [], "output": [], "template": [], "prompt_template": []}


def _prompt_template_words(row: Mapping[str, Any], fmt: str, fields: RowFields, messages: int) -> int:
    """Words of template text before the completion, as PLW's prompt counts them (see ``_Counts``)."""
    if fmt == "messages":
        return messages  # one role tag per message (tulu: <|user|>, <|assistant|> ...); exact with --tokenizer
    from instruction_modelling.core.segments import alpaca_pieces, prompt_completion_pieces

    pieces = alpaca_pieces(row, fields) if fmt == "alpaca" else prompt_completion_pieces(row, fields)
    return sum(len(p.text.split()) for p in pieces if p.segment == Segment.TEMPLATE)


def _merge(parts: Sequence[_Counts]) -> _Counts:
    merged = _Counts(tokens=_token_lists() if parts[0].tokens else None)
    for c in parts:
        merged.instruction_words += c.instruction_words
        merged.output_words += c.output_words
        merged.instruction_parts += c.instruction_parts
        merged.output_parts += c.output_parts
        merged.template_words += c.template_words
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


def _size_warnings(examples: int, intervals: Mapping[str, Any], rg_key: str) -> list[str]:
    """Too few rows for the statistics the recommendation rests on."""
    warnings = []
    if examples < MIN_EXAMPLES:
        warnings.append(f"only {examples} examples (fewer than {MIN_EXAMPLES}): the ratio and Rg are noisy and even "
                        "their bootstrap intervals are too narrow at this size; diagnose the whole data set")
    rg_ci = intervals.get(rg_key)
    if rg_ci and any(lo < 1 <= hi for lo, hi in (rg_ci["arithmetic"], rg_ci["geometric"])):
        warnings.append("PLW's regime (Rg below or above 1) is not settled by this data: an interval of Rg "
                        "straddles 1")
    return warnings


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
    prompts = {"rg": instr, "rg_with_template": [i + t for i, t in zip(instr, counts.template_words)]}
    outputs = {}
    if counts.tokens is not None:
        ti, to, tt = (counts.tokens[k] for k in ("instruction", "output", "template"))
        prompts["tokens.rg"], outputs["tokens.rg"] = ti, to
        prompts["tokens.rg_with_template"] = [i + t for i, t in zip(ti, counts.tokens["prompt_template"])]
        # PLW's completion ends with the end-of-turn/EOS tokens after the last output token.
        outputs["tokens.rg_with_template"] = [o + t - p for o, t, p in zip(to, tt, counts.tokens["prompt_template"])]
    intervals = bootstrap_intervals(instr, out, prompts, outputs)
    rgs = {k: generation_ratio(v, outputs.get(k, out)) for k, v in prompts.items()}
    if counts.tokens is not None:
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
            # PLW's Rg in tokens, its own unit: content only, and with the template on each side.
            "rg": {**rgs["tokens.rg"], "interval": intervals["tokens.rg"]},
            "rg_with_template": {**rgs["tokens.rg_with_template"], "interval": intervals["tokens.rg_with_template"]},
        }
    # PLW's regime is decided on its own count, tokens with the template; without a tokenizer, words
    # with the template (the role tags or the Alpaca preamble).
    rg_key = "tokens.rg_with_template" if counts.tokens is not None else "rg_with_template"
    rg_label = ("tokens with the template (PLW's count)" if counts.tokens is not None
                else "words with the template's words, an estimate of PLW's token count")
    report["intervals"] = {k: intervals[k] for k in ("level", "method", "resamples", "ratio")}
    report["warnings"] = _size_warnings(len(out), intervals, rg_key)
    report["recommendation"] = rec = recommend(ratio, len(out), rgs[rg_key], intervals, rg_label, rg_key)
    report["recommended_instruction_weight"] = rec["instruction_weight"]
    report["recommended_range"] = rec["recommended_range"]
    report["rg"] = {**rgs["rg"], "interval": intervals["rg"]}
    report["rg_with_template"] = {**rgs["rg_with_template"], "interval": intervals["rg_with_template"]}
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
        ci = r["intervals"]
        lines.append(f"  instruction/output ratio (ratio of mean words) {r['ratio']:.4f}, "
                     f"{100 * ci['level']:.0f}% interval ({ci['method']}) [{ci['ratio'][0]:.4f}, {ci['ratio'][1]:.4f}] "
                     f"(paper's Table 5 convention, +1 word per message: {r['table5_convention']['ratio']:.4f})")
        rgs = [("words", r["rg"]), ("words with template", r["rg_with_template"])]
        if "tokens" in r:
            rgs += [("tokens", r["tokens"]["rg"]), ("tokens with template", r["tokens"]["rg_with_template"])]
        for label, rg in rgs:
            if rg["examples"]:
                lines.append(f"  PLW's Rg (output/prompt per example), {label + ':':<21} {_rg_text(rg, rg['interval'])}")
        lines.extend(f"  WARNING: {w}" for w in r["warnings"])

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
