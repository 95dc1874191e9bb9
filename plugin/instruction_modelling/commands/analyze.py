"""Did IM reduce overfitting? The paper's analyses (Figure 3, Table 2, Figure 2) as commands.

    python -m instruction_modelling.analyze losses --model IT=runs/it --model IM=runs/im \\
        --train train.jsonl --heldout heldout.jsonl --out analysis/
    python -m instruction_modelling.analyze memorisation --model IT=runs/it --model IM=runs/im \\
        --train train.jsonl --max-rows 200 --out analysis/
    python -m instruction_modelling.analyze gains results.csv --out analysis/

``losses``
    Per-example output-token loss (mean cross-entropy over the assistant tokens and the
    end-of-turn token of each example) of each model on a training file and a held-out file,
    written to ``losses.json`` and drawn as overlaid histograms with the means marked
    (``losses.png``; the paper's Figure 3). Only output tokens are scored, so IT and IM models
    compare like for like. Rows are segmented exactly as training segments them
    (``segments.RowEncoder``) and the losses come from ``evaluation.example_losses``.
``memorisation``
    Greedy generations for the training instructions (everything before the last assistant
    turn, ending with the template's assistant tag), scored with BLEU (sacrebleu, n-grams up to 4)
    against the training outputs (the last assistant turn): the paper's Table 2. Lower BLEU means
    less memorisation. Writes ``memorisation.json`` (with every generation) and ``memorisation.png``.
``gains``
    From a table of results (CSV, JSON or JSONL; columns ``dataset, ratio, size, it_score,
    im_score``, or ``gain_pct`` instead of the two scores) the relative gain of IM over IT,
    ``100·(IM − IT)/IT``, against the instruction/output ratio and against the number of
    examples, with least-squares fits ``gain = a·ln(x) + b`` and the paper's two fits for
    comparison (the paper's Figure 2). A row with an empty ``ratio`` (or ``size``) is left out of
    that panel, so one table can hold both of the paper's point sets.

Models are local directories holding a causal LM and its tokenizer (an Axolotl ``output_dir``).
Chat rows are rendered with the tokenizer's chat template, or the paper's tulu template when the
tokenizer has none.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .diagnose import RATIO_FIT, SIZE_FIT

PAPER_FITS = {"ratio": RATIO_FIT, "size": SIZE_FIT}


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the directory)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not name or not path:
        raise ValueError(f"--model '{spec}': expected NAME=PATH")
    return name, Path(path)


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """``(model, encoder)`` for a local model directory; the encoder segments rows as training does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .diagnose import row_encoder

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    return model, row_encoder(tok)[0]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _rows(path: str | Path, max_rows: int | None) -> list:
    from instruction_modelling.core.evaluation import read_rows

    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows[:max_rows] if max_rows else rows


# ----------------------------------------------------------------------------------------
# losses: Figure 3
# ----------------------------------------------------------------------------------------


def output_losses(model: Any, encoder: Any, rows: Sequence[Mapping], *, batch_size: int = 8,
                  max_length: int | None = None) -> dict[str, Any]:
    """Per-example output-token losses of one model on some rows, with their mean.

    ``mean`` is the mean of the per-example losses (each example weighs the same, as in the
    paper's Figure 3); ``pooled`` is the token-weighted mean (what the trainer logs).
    Rows left without output tokens by ``max_length`` get ``None`` and are counted.
    """
    from instruction_modelling.core.evaluation import example_losses, pooled

    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    losses = example_losses(model, encoder, rows, batch_size=batch_size, max_length=max_length)
    values = [x.output_loss for x in losses]
    scored = [v for v in values if v is not None]
    return {
        "examples": len(values),
        "no_output_tokens": len(values) - len(scored),
        "mean": sum(scored) / len(scored) if scored else float("nan"),
        "pooled": pooled(losses)["output_loss"],
        "output_tokens": sum(x.output_tokens for x in losses),
        "output_loss": values,
    }


def plot_losses(result: Mapping[str, Any], path: str | Path) -> Path:
    """Overlaid per-example loss histograms, one panel per split, means as dashed lines."""
    plt, np = _pyplot()
    splits = [s for s in ("train", "heldout") if any(s in m for m in result["models"].values())]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        all_values = [v for m in result["models"].values() for v in m[split]["output_loss"] if v is not None]
        bins = np.linspace(min(all_values), max(all_values), 40) if all_values else 10
        for name, m in result["models"].items():
            values = [v for v in m[split]["output_loss"] if v is not None]
            (line,) = ax.plot([], [])
            ax.hist(values, bins=bins, alpha=0.35, color=line.get_color(), label=f"{name} (mean {m[split]['mean']:.3f})")
            ax.axvline(m[split]["mean"], color=line.get_color(), linestyle="--", linewidth=2)
        ax.set_title(f"{'train' if split == 'train' else 'held-out'}: {Path(result[split + '_file']).name}")
        ax.set_xlabel("per-example output-token loss (mean cross-entropy, nats)")
        ax.set_ylabel("examples")
        ax.legend()
    fig.suptitle("Output-token loss per example (dashed: means)")
    return _save(fig, plt, path)


def run_losses(models: Sequence[tuple[str, Path]], train: str | Path, heldout: str | Path | None, out: str | Path, *,
               max_rows: int | None = None, max_length: int | None = None, batch_size: int = 8,
               device: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """``analyze losses``: writes ``losses.json`` and ``losses.png`` under ``out``; returns the result."""
    device = device or _default_device()
    splits = {"train": _rows(train, max_rows)}
    if heldout:
        splits["heldout"] = _rows(heldout, max_rows)
    result: dict[str, Any] = {"train_file": str(train), "heldout_file": str(heldout) if heldout else None,
                              "max_length": max_length, "models": {}}
    for name, path in models:
        model, encoder = load_model(path, device, dtype)
        entry = {"path": str(path)}
        for split, rows in splits.items():
            try:
                entry[split] = output_losses(model, encoder, rows, batch_size=batch_size, max_length=max_length)
            except ValueError as exc:
                raise ValueError(f"{result[split + '_file']}: {exc}") from exc
        result["models"][name] = entry
        del model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    result["plot"] = str(plot_losses(result, out / "losses.png"))
    return result


# ----------------------------------------------------------------------------------------
# memorisation: Table 2
# ----------------------------------------------------------------------------------------


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, n-grams up to 4), 0–100."""
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=4).corpus_score(list(hypotheses), [list(references)]).score


def sentence_bleu(hypothesis: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=4, effective_order=True).sentence_score(hypothesis, [reference]).score


def generation_prompt(encoder: Any, row: Mapping) -> tuple[list[int], str]:
    """``(prompt token ids, reference)``: the row up to its last output, and that output.

    The prompt is the training text before the last assistant content, so it ends with the
    template's assistant tag (a generation prompt); Alpaca and prompt/completion rows get BOS as
    in training.
    """
    from instruction_modelling.core.segments import Segment

    pieces, plain = encoder.pieces(row)
    last = max(i for i, p in enumerate(pieces) if p.segment == Segment.OUTPUT)
    tok = encoder.tokenizer
    ids = tok("".join(p.text for p in pieces[:last]), add_special_tokens=False)["input_ids"]
    if plain and encoder.add_bos_to_plain and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return list(ids), pieces[last].text


def greedy_generations(model: Any, encoder: Any, rows: Sequence[Mapping], *, max_new_tokens: int = 256,
                       batch_size: int = 8) -> tuple[list[str], list[str], int]:
    """``(generations, references, prompts_truncated)`` with greedy decoding, batched with left padding.

    Prompts longer than the model's context minus ``max_new_tokens`` keep their last tokens.
    """
    import torch

    tok = encoder.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    limit = getattr(model.config, "max_position_embeddings", None)
    limit = limit - max_new_tokens if limit else None
    prompts, refs, truncated = [], [], 0
    for i, row in enumerate(rows):
        try:
            ids, ref = generation_prompt(encoder, row)
        except ValueError as exc:
            raise ValueError(f"row {i}: {exc}") from exc
        if limit is not None and len(ids) > limit:
            if limit <= 0:
                raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context")
            ids, truncated = ids[-limit:], truncated + 1
        prompts.append(ids)
        refs.append(ref)
    device = next(model.parameters()).device
    gens = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(encoder.end_ids), pad_token_id=pad)
        gens += [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return gens, refs, truncated


def plot_memorisation(result: Mapping[str, Any], path: str | Path) -> Path:
    plt, _ = _pyplot()
    names = list(result["models"])
    scores = [result["models"][n]["bleu"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    bars = ax.bar(names, scores, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("BLEU of generations vs training outputs")
    ax.set_ylim(0, max(max(scores) * 1.2, 1))
    ax.set_title(f"Memorisation on {result['examples']} training examples (lower: less memorised)")
    return _save(fig, plt, path)


def run_memorisation(models: Sequence[tuple[str, Path]], train: str | Path, out: str | Path, *,
                     max_rows: int | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                     device: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """``analyze memorisation``: writes ``memorisation.json`` and ``memorisation.png``; returns the result."""
    device = device or _default_device()
    rows = _rows(train, max_rows)
    result: dict[str, Any] = {"train_file": str(train), "examples": len(rows), "max_new_tokens": max_new_tokens,
                              "bleu": "sacrebleu corpus BLEU, max_ngram_order=4, 13a", "models": {}}
    for name, path in models:
        model, encoder = load_model(path, device, dtype)
        try:
            gens, refs, truncated = greedy_generations(model, encoder, rows, max_new_tokens=max_new_tokens,
                                                       batch_size=batch_size)
        except ValueError as exc:
            raise ValueError(f"{train}: {exc}") from exc
        sent = [sentence_bleu(g, r) for g, r in zip(gens, refs)]
        result["models"][name] = {
            "path": str(path),
            "bleu": bleu(gens, refs),
            "sentence_bleu_mean": sum(sent) / len(sent),
            "prompts_truncated": truncated,
            "generations": [{"index": i, "reference": r, "generation": g, "sentence_bleu": s}
                            for i, (g, r, s) in enumerate(zip(gens, refs, sent))],
        }
        del model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memorisation.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    result["plot"] = str(plot_memorisation(result, out / "memorisation.png"))
    return result


# ----------------------------------------------------------------------------------------
# gains: Figure 2
# ----------------------------------------------------------------------------------------

GAIN_COLUMNS = ("dataset", "ratio", "size", "it_score", "im_score", "gain_pct")


def _number(value: Any, where: str, column: str, *, positive: bool = False, required: bool = False) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"{where}: column '{column}' is empty")
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column '{column}' is not a number: {value!r}") from None
    if not math.isfinite(x) or (positive and x <= 0):
        raise ValueError(f"{where}: column '{column}' must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return x


def read_results_table(path: str | Path) -> list[dict[str, Any]]:
    """Validated rows ``{dataset, ratio, size, gain_pct}`` of a results table (CSV, JSON or JSONL)."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
        where = [f"{path.name} row {i} (line {i + 2})" for i in range(len(raw))]
    else:
        from instruction_modelling.core.evaluation import read_rows

        raw = read_rows(path)
        where = [f"{path.name} row {i}" for i in range(len(raw))]
    if not raw:
        raise ValueError(f"{path}: no rows")
    points = []
    for row, w in zip(raw, where):
        if not isinstance(row, Mapping):
            raise ValueError(f"{w}: must be an object with columns {', '.join(GAIN_COLUMNS)}")
        unknown = sorted(set(row) - set(GAIN_COLUMNS))
        if unknown:
            raise ValueError(f"{w}: unknown column(s) {unknown}; expected {', '.join(GAIN_COLUMNS)}")
        name = str(row.get("dataset") or "").strip()
        if not name:
            raise ValueError(f"{w}: column 'dataset' is empty")
        gain = _number(row.get("gain_pct"), w, "gain_pct")
        if gain is None:
            it = _number(row.get("it_score"), w, "it_score", positive=True, required=True)
            im = _number(row.get("im_score"), w, "im_score", required=True)
            gain = 100.0 * (im - it) / it
        ratio = _number(row.get("ratio"), w, "ratio", positive=True)
        size = _number(row.get("size"), w, "size", positive=True)
        if ratio is None and size is None:
            raise ValueError(f"{w}: needs a 'ratio' or a 'size' (both are empty)")
        points.append({"dataset": name, "ratio": ratio, "size": size, "gain_pct": gain})
    return points


def log_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """Least-squares ``y = slope·ln(x) + intercept`` with R²; ``None`` below two distinct x."""
    import numpy as np

    lx, y = np.log(np.asarray(x, dtype=float)), np.asarray(y, dtype=float)
    if len(set(lx.tolist())) < 2:
        return None
    slope, intercept = np.polyfit(lx, y, 1)
    residual = y - (slope * lx + intercept)
    total = ((y - y.mean()) ** 2).sum()
    return {"slope": float(slope), "intercept": float(intercept), "n": int(len(y)),
            "r2": float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan")}


def plot_gains(result: Mapping[str, Any], path: str | Path) -> Path:
    plt, np = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "ratio", "instruction/output length ratio"), (axes[1], "size", "number of examples")):
        pts = [p for p in result["points"] if p[key] is not None]
        ax.set_xscale("log")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel(f"relative gain of IM over IT (%), {result['score_name']}")
        if not pts:
            ax.set_title(f"no rows with a {key}")
            continue
        xs, ys = [p[key] for p in pts], [p["gain_pct"] for p in pts]
        ax.scatter(xs, ys, zorder=3)
        for p in pts:
            ax.annotate(p["dataset"], (p[key], p["gain_pct"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        grid = np.logspace(np.log10(min(xs)) - 0.1, np.log10(max(xs)) + 0.1, 100)
        fit = result["fits"][key]
        if fit:
            ax.plot(grid, fit["slope"] * np.log(grid) + fit["intercept"], color="C1",
                    label=f"fit: {fit['slope']:.2f}·ln(x) {fit['intercept']:+.2f} (R² {fit['r2']:.2f}, n={fit['n']})")
        a, b = PAPER_FITS[key]
        ax.plot(grid, a * np.log(grid) + b, color="black", linestyle="--", linewidth=1,
                label=f"paper: {a:.2f}·ln(x) {b:+.2f}")
        ax.legend(fontsize=8)
        ax.set_title(f"gain vs {label}")
    fig.suptitle("Relative gain of Instruction Modelling over Instruction Tuning")
    return _save(fig, plt, path)


def run_gains(table: str | Path, out: str | Path, *, score_name: str = "AlpacaEval 1.0") -> dict[str, Any]:
    """``analyze gains``: writes ``gains.json`` and ``gains.png``; returns the result."""
    points = read_results_table(table)
    fits = {}
    for key in ("ratio", "size"):
        pts = [p for p in points if p[key] is not None]
        fits[key] = log_fit([p[key] for p in pts], [p["gain_pct"] for p in pts]) if pts else None
    result = {"table": str(table), "score_name": score_name, "points": points, "fits": fits,
              "paper_fits": {k: {"slope": a, "intercept": b} for k, (a, b) in PAPER_FITS.items()}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gains.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    result["plot"] = str(plot_gains(result, out / "gains.png"))
    return result


# ----------------------------------------------------------------------------------------
# Plot helpers and the command line
# ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    return plt, np


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a local model directory (repeat for each model, e.g. --model IT=runs/it --model IM=runs/im)")
    p.add_argument("--train", required=True, help="training data file (JSONL/JSON; messages, Alpaca or prompt/completion)")
    p.add_argument("--max-rows", type=int, help="use only the first N rows of each file")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights dtype (default: %(default)s)")
    p.add_argument("--out", default="analysis", help="output directory (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instruction_modelling.analyze",
                                     description="The paper's overfitting analyses: loss histograms, memorisation BLEU, "
                                                 "gain-vs-ratio/size plots.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="per-example output-token losses on train and held-out data (Figure 3)")
    _model_args(p)
    p.add_argument("--heldout", required=True, help="held-out data file")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default: the model's context)")
    p = sub.add_parser("memorisation", help="BLEU of greedy generations vs training outputs (Table 2)")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit (default: %(default)s)")
    p = sub.add_parser("gains", help="relative IM-over-IT gain vs ratio and vs size, with log fits (Figure 2)")
    p.add_argument("table", help="CSV/JSON/JSONL with columns dataset, ratio, size, it_score, im_score (or gain_pct)")
    p.add_argument("--score-name", default="AlpacaEval 1.0", help="what the scores are, for the axis label (default: %(default)s)")
    p.add_argument("--out", default="analysis", help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)

    try:
        if args.command == "gains":
            res = run_gains(args.table, args.out, score_name=args.score_name)
            for key, fit in res["fits"].items():
                a, b = PAPER_FITS[key]
                text = (f"{fit['slope']:.2f}·ln({key}) {fit['intercept']:+.2f}  (R² {fit['r2']:.3f}, n={fit['n']})"
                        if fit else "no fit (fewer than two distinct values)")
                print(f"gain vs {key}: {text}   paper: {a:.2f}·ln({key}) {b:+.2f}")
        else:
            models = [parse_model_spec(s) for s in args.model]
            common = dict(max_rows=args.max_rows, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
            if args.command == "losses":
                res = run_losses(models, args.train, args.heldout, args.out, max_length=args.max_length, **common)
                print(f"{'model':<16}{'train mean':>12}{'held-out mean':>15}{'train pooled':>14}{'held-out pooled':>17}")
                for name, m in res["models"].items():
                    print(f"{name:<16}{m['train']['mean']:>12.4f}{m['heldout']['mean']:>15.4f}"
                          f"{m['train']['pooled']:>14.4f}{m['heldout']['pooled']:>17.4f}")
            else:
                res = run_memorisation(models, args.train, args.out, max_new_tokens=args.max_new_tokens, **common)
                for name, m in res["models"].items():
                    print(f"{name:<16} BLEU {m['bleu']:6.2f}  (mean sentence BLEU {m['sentence_bleu_mean']:6.2f}, "
                          f"{res['examples']} examples, {m['prompts_truncated']} prompts truncated)")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / (args.command + '.json')} and {res['plot']}")
    return 0


if __name__ == "__main__":
    from .cli import run_module_main  # third-party noise filtered; --verbose keeps it

    raise SystemExit(run_module_main(main))
