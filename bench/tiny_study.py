"""A tiny end-to-end IT-vs-IM study on CPU: does the paper's Figure 3 pattern appear at this scale?

    python bench/tiny_study.py [--out runs/tiny_study] [--pretrain-steps 600] [--seed 0] [--figure bench/tiny_study_losses.png]
    python bench/tiny_study.py --weight-curve [--finetune-seeds 0 1 2] [--points LABEL ...]   (see "Weight curve")

1. Pre-training text: the docstrings of the Python standard library installed with the
   interpreter running this script (module, class and function docstrings, read with ``ast``).
   They are English technical prose under the PSF License (which allows derivative works); they
   are read at run time and never redistributed, and they contain no LIMA text.
2. A byte-level BPE tokenizer (trained on those docstrings and the LIMA training subset only) and
   a tiny Llama (``quickstart.tiny``), pre-trained with a plain PyTorch loop on packed docstring
   text (600 steps of 16 x 256 tokens by default: about 6 passes, 2.5 minutes on 2 idle cores).
3. LIMA (``../shared/data/lima.jsonl``): a seeded shuffle gives ``--train-rows`` training rows
   and ``--heldout-rows`` other rows as held-out data (the paper used a Tulu V2 sample as its
   test set; we have none, so held-out LIMA rows play that role).
4. IT and IM fine-tuning through the real Axolotl CLI (``axolotl.configs.cpu_config`` with
   ``mode="it"`` / ``"im"``; the configs differ in that line only), rows truncated to
   ``--seq-len`` tokens (a row whose instruction alone fills them is skipped by the plugin and
   counted in the Axolotl log; it is the same row for IT and IM).
5. ``analyze losses`` on the pre-trained base, IT and IM models (train and held-out
   output-token losses, histograms) and ``analyze memorisation`` on a few training rows.

The paper (LLaMA-2-7B on LIMA, Figure 3): IM has the higher train loss (1.45 vs 1.37) and the
lower test loss (1.17 vs 1.32). Whether a ~1M-parameter model shows the same is what this
script measures; it prints the answer either way, with the paired per-example difference
IM − IT and its standard error (the same examples are scored for both models).
Needs ``../shared/data/lima.jsonl``.

Weight curve (issues 14 and 21): ``--weight-curve`` pre-trains ONE base (``--seed``, ``--pretrain-steps``)
and fine-tunes every selected point of ``CURVE`` (``--points``, by label) from it once per fine-tuning seed
(``--finetune-seeds``, default 0 1 2: Axolotl's ``seed``, i.e. the order of the training data; the base,
data split and tokenizer stay those of ``--seed``). The points: λp ∈ {0 (the IT config), 0.1, 0.3, 0.6,
0.4/0.6 = 0.6667, 1 (IM)} with λr 1 under ``token``; WIT's reference λp 0.4 / λr 0.6 under ``nonzero``
(0.6667 is its AdamW equivalent: a constant loss scale cancels under AdamW); and the two sources as their
authors ran them, ``wit_asrun`` (template tokens weighted 0.4, each example's first token counted) and
``plw_asrun_p0.1`` (template weighted 0.1), which need the plugin's template-weight options (every
selected point is checked against the plugin's options before pre-training; leave out a point it refuses
with ``--points``). All fine-tunes share the prepared dataset (``dataset_prepared_path``, keyed by
Axolotl's hash) and each has its own output_dir.
Reported per point: mean ± sd over seeds of the train and held-out output-token loss; and paired
differences (each point − IT, λp 0.6 − 1, WIT − its AdamW equivalent, WIT as run − WIT, PLW as run − λp
0.1), per seed the per-example paired mean and standard error, over seeds their mean and sd. Everything
(all seeds) goes to ``--out``/weight_curve/weight_curve.json, rewritten after each seed; the Markdown tables for
bench/RESULTS.md are printed, the figure (``--curve-figure``) shows the mean with sd error bars against λp.
``--plot-only`` re-prints and re-plots from weight_curve.json. ``--max-grad-norm 0`` fine-tunes without
gradient clipping (WIT's setting; Axolotl's default clips at 1.0, which is what separates WIT's ``nonzero``
point from its AdamW equivalent, bench/RESULTS.md). This replaces issue 14's design (one base per
seed, each point fine-tuned once from it), which mixed pre-training noise into every difference and
measured none of it.
Time on 2 idle cores at the defaults (600 pre-training steps, 200 rows, 3 epochs, 512 tokens, as issue 14,
so nothing was reduced), measured 2026-12-03: pre-training about 90 s (15 s per 100 steps), one fine-tune 26 s
(13 s of it training, the rest Axolotl's start-up), scoring 3 s per model: 9 points x 3 seeds, about 15
minutes. Other jobs on the cores slow the fine-tunes 3-6x (74-147 s each, measured beside a test run): run
it on idle cores. The end of the run prints the total; weight_curve.json keeps each fine-tune's wall and CPU
seconds.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "plugin"))  # run from a checkout without installing

from instruction_modelling.commands.analyze import run_losses, run_memorisation  # noqa: E402
from instruction_modelling.axolotl.configs import cpu_config, write_config  # noqa: E402
from instruction_modelling.quickstart.tiny import build_model, build_tokenizer  # noqa: E402

LIMA = REPO.parent / "shared" / "data" / "lima.jsonl"
PAPER_FIG3 = {"IT": {"train": 1.37, "test": 1.32}, "IM": {"train": 1.45, "test": 1.17}}
def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of the installed standard library (PSF License), tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
    return texts


def pretrain(model, tok, texts: list[str], steps: int, *, block: int = 256, batch: int = 16,
             lr: float = 2e-3, seed: int = 0) -> dict:
    """Causal-LM pre-training on packed text: a fixed number of steps (reproducible, unlike a time budget),
    20 warm-up steps, then linear decay to 5% of ``lr``."""
    import torch

    torch.manual_seed(seed)
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_blocks = len(ids) // block
    data = torch.tensor(ids[: n_blocks * block]).view(n_blocks, block)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, losses = time.time(), []
    order = torch.cat([torch.randperm(n_blocks) for _ in range(steps * batch // n_blocks + 1)])
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * max(0.05, 1 - step / steps)
        x = data[order[step * batch:(step + 1) * batch]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "tokens": steps * batch * block, "corpus_tokens": len(ids), "seconds": time.time() - start,
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def paired_difference(a: list, b: list) -> dict:
    """Mean of per-example ``a - b`` over examples scored by both, its standard error, and how often a < b."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else float("nan")
    return {"mean": mean, "se": sd / len(d) ** 0.5, "n": len(d), "im_lower": sum(x < 0 for x in d)}


def lima_split(train_rows: int, heldout_rows: int, out: Path, seed: int, lima: Path = LIMA) -> tuple[Path, Path]:
    rows = [line for line in Path(lima).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    train, heldout = out / "lima_train.jsonl", out / "lima_heldout.jsonl"
    train.write_text("\n".join(rows[:train_rows]) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(rows[train_rows:train_rows + heldout_rows]) + "\n", encoding="utf-8")
    return train, heldout


class CurvePoint(NamedTuple):
    """One point of the weight curve: its label, λp, λr, normalisation, and further ``im_*`` options."""

    label: str
    instruction_weight: float  # λp (its place on the figure's x axis)
    output_weight: float  # λr
    normalisation: str  # im_loss_normalization
    options: dict  # further im_* options (the as-run points)
    description: str


CURVE = [
    CurvePoint("p0", 0.0, 1.0, "token", {}, "λp 0 (the IT config), `token`"),
    CurvePoint("p0.1", 0.1, 1.0, "token", {}, "λp 0.1, λr 1, `token`"),
    CurvePoint("p0.3", 0.3, 1.0, "token", {}, "λp 0.3, λr 1, `token`"),
    CurvePoint("p0.6", 0.6, 1.0, "token", {}, "λp 0.6, λr 1, `token`"),
    # WIT's reference point under AdamW, where a constant loss scale cancels: λp/λr with λr 1.
    CurvePoint("p0.6667", 0.4 / 0.6, 1.0, "token", {}, "λp 0.4/0.6 = 0.6667, λr 1, `token` (WIT's AdamW equivalent)"),
    CurvePoint("p1", 1.0, 1.0, "token", {}, "λp 1 (the IM config), `token`"),
    CurvePoint("wit_p0.4_r0.6", 0.4, 0.6, "nonzero", {}, "WIT's reference λp 0.4 / λr 0.6, `nonzero`"),
    # As WIT's released loop ran it (issue 21 item 1): template tokens weighted with λp, and each
    # example's first token counted in the nonzero denominator.
    CurvePoint("wit_asrun", 0.4, 0.6, "nonzero", {"im_role_weights": {"template": 0.4}, "im_count_first_token": True},
               "WIT as run: λp 0.4 / λr 0.6, template 0.4, first token counted, `nonzero`"),
    # As PLW ran it: the whole prompt, template included, weighted with λp.
    CurvePoint("plw_asrun_p0.1", 0.1, 1.0, "token", {"im_role_weights": {"template": 0.1}},
               "PLW as run: λp 0.1 with template 0.1, λr 1, `token`"),
]
POINTS = {p.label: p for p in CURVE}
DEFAULT_POINTS = [p.label for p in CURVE]
IT_POINT = "p0"
# Paired differences reported besides "each point − IT": (a, b) for a − b.
CONTRASTS = [("p0.6", "p1"), ("wit_p0.4_r0.6", "p0.6667"), ("wit_asrun", "wit_p0.4_r0.6"), ("plw_asrun_p0.1", "p0.1")]


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (n − 1; NaN for one value) of some numbers."""
    n = len(values)
    if not n:
        raise ValueError("mean_sd of no values")
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "n": n}


def paired_across_seeds(a: dict, b: dict) -> dict:
    """Paired difference a − b over fine-tuning seeds: per seed the per-example paired difference
    (``paired_difference``: mean, standard error over examples, how many examples have a < b), then the
    mean and standard deviation of the per-seed means (the spread that seed noise gives).

    Args:
        a, b: seed -> per-example losses (lists aligned by example, None where an example has no output tokens);
            only the seeds present in both are used.
    """
    seeds = [s for s in a if s in b]
    if not seeds:
        raise ValueError("no fine-tuning seed is present for both points")
    per_seed = {}
    for s in seeds:
        d = paired_difference(a[s], b[s])
        per_seed[s] = {"mean": d["mean"], "se": d["se"], "n": d["n"], "a_lower": d["im_lower"]}
    return {**mean_sd([v["mean"] for v in per_seed.values()]), "per_seed": per_seed}


def contrasts(labels: list[str]) -> list[tuple[str, str]]:
    """The (a, b) pairs reported for these points: each point − IT, then ``CONTRASTS`` whose points are present."""
    pairs = [(label, IT_POINT) for label in labels if label != IT_POINT and IT_POINT in labels]
    return pairs + [(a, b) for a, b in CONTRASTS if a in labels and b in labels and (a, b) not in pairs]


def summarise_curve(labels: list[str], losses: dict) -> tuple[dict, dict]:
    """Per point the mean ± sd over fine-tuning seeds of train and held-out loss, and the paired differences.

    Args:
        labels: the points, in order.
        losses: seed -> point label -> split ("train" / "heldout") -> per-example output losses (None where
            an example has no output tokens).

    Returns:
        ``(points, differences)``: points[label][split] = mean_sd of the per-seed means plus ``seeds`` (seed ->
        mean); differences["a − b"][split] = ``paired_across_seeds``.
    """
    def seed_mean(values):
        scored = [v for v in values if v is not None]
        return sum(scored) / len(scored)

    points = {}
    for label in labels:
        points[label] = {}
        for split in ("train", "heldout"):
            seeds = {s: seed_mean(m[label][split]) for s, m in losses.items() if label in m}
            points[label][split] = {**mean_sd(list(seeds.values())), "seeds": seeds}
    differences = {}
    for a, b in contrasts(labels):
        differences[f"{a} − {b}"] = {"a": a, "b": b, **{
            split: paired_across_seeds({s: m[a][split] for s, m in losses.items() if a in m},
                                       {s: m[b][split] for s, m in losses.items() if b in m})
            for split in ("train", "heldout")}}
    return points, differences


def _pm(d: dict) -> str:
    return f"{d['mean']:.4f} ± {d['sd']:.4f}" if d["n"] > 1 else f"{d['mean']:.4f}"


def _signed_pm(d: dict) -> str:
    text = f"{d['mean']:+.4f}".replace("-", "−")
    return text + (f" ± {d['sd']:.4f}" if d["n"] > 1 else "")


def markdown_tables(result: dict) -> str:
    """The study's two tables in Markdown (for bench/RESULTS.md): per point, and the paired differences."""
    seeds = result["finetune_seeds"]
    lines = [f"Per point: mean ± sd over fine-tuning seeds {', '.join(map(str, seeds))} of the mean per-example "
             "output-token loss (nats); Δ IT = held-out loss − IT's, paired per seed, mean ± sd over seeds.", "",
             "| point | train | held-out | held-out Δ IT |", "|---|---|---|---|"]
    for label, p in result["points"].items():
        diff = result["differences"].get(f"{label} − {IT_POINT}")
        lines.append(f"| `{label}`: {p['description']} | {_pm(p['train'])} | {_pm(p['heldout'])} | "
                     f"{_signed_pm(diff['heldout']) if diff else '0'} |")
    lines += ["", "Paired held-out differences a − b: mean ± sd over seeds; per seed the per-example paired mean "
              "± its standard error (a lower on k of n examples).", "",
              "| a − b | over seeds | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|---|" + "---|" * len(seeds)]
    for name, d in result["differences"].items():
        h = d["heldout"]
        cells = []
        for s in seeds:
            v = h["per_seed"].get(s, h["per_seed"].get(str(s)))
            cells.append(f"{v['mean']:+.4f} ± {v['se']:.4f} ({v['a_lower']}/{v['n']})".replace("-", "−") if v else "")
        lines.append(f"| {name} | {_signed_pm(h)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_point_config(base: Path, train_file: Path, root: Path, point: CurvePoint, seed: int, args) -> dict:
    """The Axolotl config of one weight-curve point and fine-tuning seed (Axolotl's ``seed``: data order):
    the study's IT/IM config with the weights set, its own output_dir, and the prepared dataset shared by
    every point (Axolotl keys it by a hash of what changes it, the trained roles included)."""
    if point.instruction_weight == 0 and point.output_weight == 1 and not point.options:
        weights = {"im_mode": "it"}
    else:
        weights = {"im_instruction_weight": point.instruction_weight, "im_output_weight": point.output_weight,
                   **point.options}
    cfg = cpu_config(base, train_file, root / "points" / f"{point.label}_s{seed}", mode="im", num_epochs=args.epochs,
                     sequence_len=args.seq_len, excess_length_strategy="truncate", learning_rate=args.lr,
                     micro_batch_size=8, logging_steps=5, seed=seed, im_on_bad_rows="skip",
                     im_loss_normalization=point.normalisation, dataset_prepared_path=str(root / "prepared"))
    cfg.update(weights)
    if getattr(args, "max_grad_norm", None) is not None:
        cfg["max_grad_norm"] = args.max_grad_norm
    return cfg


def check_points(labels: list[str]) -> None:
    """Refuse an unknown label or a point whose options this plugin does not accept, before pre-training."""
    from instruction_modelling.core.options import IMArgs

    for label in labels:
        if label not in POINTS:
            raise SystemExit(f"--points: unknown point '{label}'; the points are {', '.join(POINTS)}")
        cfg = curve_point_config(Path("base"), Path("train.jsonl"), Path("out"), POINTS[label], 0,
                                 argparse.Namespace(epochs=1, seq_len=8, lr=1e-3))
        try:
            IMArgs.from_cfg(cfg)
        except ValueError as exc:  # pydantic's ValidationError included: its messages, on one line
            reason = "; ".join(e["msg"] for e in exc.errors()) if hasattr(exc, "errors") else str(exc)
            raise SystemExit(f"point '{label}' is not a valid config for this plugin ({reason}); "
                             f"leave it out with --points") from exc


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished subprocesses (the Axolotl runs)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_weight_curve(args, root: Path, train_fn) -> dict:
    """One pre-trained base (``--seed``), every selected point fine-tuned from it once per fine-tuning seed
    (seed-major, so each finished seed is scored, summarised and written before the next starts)."""
    labels = args.points
    check_points(labels)
    if root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    t0, timings = time.time(), {}
    train_file, heldout_file, base, n_params, pre = prepare_base(args, root)
    timings["pretrain"] = pre["seconds"]
    settings = {k: getattr(args, k) for k in ("pretrain_steps", "train_rows", "heldout_rows", "seq_len", "epochs",
                                              "lr", "hidden_size", "layers")}
    result = {"base_seed": args.seed, "finetune_seeds": [], "settings": settings, "model_parameters": n_params,
              "pretrain": pre, "base": None, "points": {}, "differences": {}, "finetune_s": {}, "finetune_cpu_s": {},
              "timings_s": timings}
    losses = {}
    for seed in args.finetune_seeds:
        models = [] if result["base"] else [("base", base)]
        for label in labels:
            point = POINTS[label]
            t, cpu = time.time(), _children_cpu_s()
            name = f"{label}_s{seed}"
            train_fn(write_config(curve_point_config(base, train_file, root, point, seed, args),
                                  root / "configs" / f"{name}.yml"), root / "logs" / f"{name}.log")
            result["finetune_s"][name] = time.time() - t
            # CPU seconds beside wall seconds: a wall time well above CPU / threads means other jobs shared the cores.
            result["finetune_cpu_s"][name] = _children_cpu_s() - cpu
            print(f"fine-tune seed {seed}: {label} ({point.description}) in {result['finetune_s'][name]:.0f} s "
                  f"({result['finetune_cpu_s'][name]:.0f} CPU s)", flush=True)
            models.append((label, root / "points" / name))
        t = time.time()
        m = run_losses(models, train_file, heldout_file, root / "analysis" / f"seed{seed}", max_length=args.seq_len,
                       device="cpu")["models"]
        timings[f"score_seed{seed}"] = time.time() - t
        if result["base"] is None:
            result["base"] = {split: m["base"][split]["mean"] for split in ("train", "heldout")}
        losses[seed] = {label: {split: m[label][split]["output_loss"] for split in ("train", "heldout")}
                        for label in labels}
        result["finetune_seeds"].append(seed)
        points, result["differences"] = summarise_curve(labels, losses)
        result["points"] = {label: {"instruction_weight": POINTS[label].instruction_weight,
                                    "output_weight": POINTS[label].output_weight,
                                    "normalisation": POINTS[label].normalisation, "options": POINTS[label].options,
                                    "description": POINTS[label].description, **points[label]}
                            for label in labels}
        ft = list(result["finetune_s"].values())
        timings.update(finetune_total=sum(ft), finetune_mean=sum(ft) / len(ft), total=time.time() - t0)
        (root / "weight_curve.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"\nafter fine-tuning seed {seed}:\n" + markdown_tables(result), flush=True)
        print(f"figure: {plot_weight_curve(result, Path(args.curve_figure))}", flush=True)
    return result


def plot_weight_curve(result: dict, figure: Path) -> Path:
    """Held-out loss, its paired difference to IT, and train loss against λp: the λr 1 `token` points as a
    line, the others as markers (nudged right when they share a λp); mean over fine-tuning seeds, error
    bars one sd over seeds (the absolute losses' sd includes what a seed does to every point alike; the
    paired panel removes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, n = result["points"], len(result["finetune_seeds"])
    curve = sorted((label for label, p in points.items() if p["output_weight"] == 1.0 and p["normalisation"] == "token"
                    and not p["options"]), key=lambda label: points[label]["instruction_weight"])
    others = [label for label in points if label not in curve]
    markers = dict(zip(others, "sDv^P*XhH"))
    x = {label: points[label]["instruction_weight"] for label in curve}
    for k, label in enumerate(others):
        x[label] = points[label]["instruction_weight"] + 0.012 * (1 + k % 3)

    def stat(label, panel):
        if panel == "delta":
            d = result["differences"].get(f"{label} − {IT_POINT}")
            d = d["heldout"] if d else {"mean": 0.0, "sd": 0.0}
        else:
            d = points[label][panel]
        return d["mean"], (d["sd"] if n > 1 else 0.0)

    panels = [("heldout", "held-out output-token loss (nats)"),
              ("delta", f"held-out loss − IT's ({IT_POINT}), paired per seed (nats)"),
              ("train", "train output-token loss (nats)")]
    if IT_POINT not in points:
        panels.pop(1)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    for ax, (panel, ylabel) in zip(axes, panels):
        m, e = zip(*(stat(label, panel) for label in curve)) if curve else ((), ())
        ax.errorbar([x[label] for label in curve], m, yerr=e, fmt="o-", capsize=3, label="λr 1, `token`")
        for label in others:
            m, e = stat(label, panel)
            ax.errorbar([x[label]], [m], yerr=[e], fmt=markers[label], capsize=3, markersize=7, label=label)
        ax.set_xlabel("instruction (prompt) loss weight λp")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Tiny study: weight curve on LIMA ({result['model_parameters'] / 1e6:.2f} M-parameter Llama, one "
                 f"pre-trained base); mean ± sd over {n} fine-tuning seed{'s' if n > 1 else ''}")
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    return figure


def prepare_base(args, out: Path):
    """LIMA split, tokenizer and a pre-trained tiny Llama saved to ``out/base``."""
    train_file, heldout_file = lima_split(args.train_rows, args.heldout_rows, out, args.seed, args.lima)
    docs = stdlib_docstrings()
    lima_texts = [m["content"] for line in train_file.read_text(encoding="utf-8").splitlines()
                  for m in json.loads(line)["messages"]]
    tok = build_tokenizer(docs + lima_texts)
    model = build_model(tok, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    import torch

    print(f"corpus: {len(docs)} stdlib docstrings, {sum(map(len, docs)) / 1e6:.2f} M chars; model {n_params / 1e6:.2f} M "
          f"parameters, vocab {len(tok)}; torch threads {torch.get_num_threads()}", flush=True)
    pre = pretrain(model, tok, docs, args.pretrain_steps, seed=args.seed)
    base = out / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    print(f"pre-trained {pre['steps']} steps, {pre['tokens'] / 1e6:.2f} M tokens "
          f"({pre['tokens'] / pre['corpus_tokens']:.2f} passes over {pre['corpus_tokens'] / 1e6:.2f} M), "
          f"loss {pre['first_loss']:.2f} -> {pre['final_loss']:.2f}", flush=True)
    return train_file, heldout_file, base, n_params, pre


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "tiny_study"), help="working directory")
    parser.add_argument("--pretrain-steps", type=int, default=600,
                        help="pre-training steps of 16 x 256 tokens (default: %(default)s: about 6 passes over the corpus, 2.5 minutes on 2 idle cores)")
    parser.add_argument("--train-rows", type=int, default=200)
    parser.add_argument("--heldout-rows", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=512, help="fine-tuning and scoring length in tokens")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--memorisation-rows", type=int, default=32, help="0 skips the BLEU analysis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=str(REPO / "bench" / "tiny_study_losses.png"),
                        help="copy the loss histogram PNG here")
    parser.add_argument("--lima", default=str(LIMA), help="LIMA JSONL (default: %(default)s)")
    parser.add_argument("--weight-curve", action="store_true",
                        help="fine-tune the CURVE points from one pre-trained base, each with every --finetune-seeds "
                        "seed, instead of the IT-vs-IM study")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="--weight-curve: Axolotl seeds (data order) of each point's fine-tunes (default: %(default)s)")
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, metavar="LABEL",
                        help=f"--weight-curve: the points to fine-tune, of {', '.join(POINTS)} (default: %(default)s)")
    parser.add_argument("--curve-figure", default=str(REPO / "bench" / "tiny_study_weight_curve.png"))
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="fine-tuning gradient clipping (default: Axolotl's, 1.0; 0 turns it off, as WIT's script)")
    parser.add_argument("--plot-only", action="store_true",
                        help="re-print and re-plot --weight-curve from the weight_curve.json under --out")
    args = parser.parse_args(argv)
    if args.weight_curve and args.plot_only:
        result = json.loads((Path(args.out) / "weight_curve" / "weight_curve.json").read_text(encoding="utf-8"))
        print(markdown_tables(result))
        print(f"figure: {plot_weight_curve(result, Path(args.curve_figure))}")
        return 0
    if not Path(args.lima).is_file():
        print(f"{args.lima} not found: this study needs the shared LIMA file", file=sys.stderr)
        return 2

    import os

    from transformers import AutoTokenizer

    os.environ.update(AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "plugin"), str(REPO), os.environ.get("PYTHONPATH", "")])
    from instruction_modelling.quickstart.__main__ import _train  # the quickstart's Axolotl subprocess runner

    if args.weight_curve:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per scored model
        # Its own subfolder, which it empties first: never the IT-vs-IM study's outputs under --out.
        result = run_weight_curve(args, Path(args.out).resolve() / "weight_curve", _train)
        t = result["timings_s"]
        print(f"weight curve: {len(result['finetune_s'])} fine-tunes ({len(args.points)} points x "
              f"{len(args.finetune_seeds)} seeds), {t['finetune_mean']:.0f} s each on average; pre-training "
              f"{t['pretrain']:.0f} s; total {t['total']:.0f} s ({t['total'] / 60:.1f} min); "
              f"{Path(args.out).resolve() / 'weight_curve' / 'weight_curve.json'}", flush=True)
        return 0

    t0 = time.time()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings = {}

    train_file, heldout_file, base, n_params, pre = prepare_base(args, out)
    tok_len = len(AutoTokenizer.from_pretrained(base))
    timings["setup_and_pretrain"] = time.time() - t0
    timings["pretrain"] = pre["seconds"]

    for mode in ("it", "im"):
        t = time.time()
        cfg = cpu_config(base, train_file, out / mode, mode=mode, num_epochs=args.epochs, sequence_len=args.seq_len,
                         excess_length_strategy="truncate", learning_rate=args.lr, micro_batch_size=8,
                         logging_steps=5, seed=args.seed,
                         # A LIMA row whose instruction fills --seq-len has no output left: skipped and
                         # counted by the plugin (the same rows for IT and IM), reported in the log.
                         im_on_bad_rows="skip")
        _train(write_config(cfg, out / f"{mode}.yml"), out / f"{mode}.log")
        timings[f"finetune_{mode}"] = time.time() - t
        print(f"fine-tuned {mode.upper()} through axolotl.cli.train in {timings[f'finetune_{mode}']:.0f} s", flush=True)

    models = [("base", base), ("IT", out / "it"), ("IM", out / "im")]
    t = time.time()
    losses = run_losses(models, train_file, heldout_file, out / "analysis", max_length=args.seq_len, device="cpu")
    timings["analyze_losses"] = time.time() - t
    memo = None
    if args.memorisation_rows:
        t = time.time()
        memo = run_memorisation(models[1:], train_file, out / "analysis", max_rows=args.memorisation_rows,
                                max_new_tokens=64, device="cpu")
        timings["analyze_memorisation"] = time.time() - t
    timings["total"] = time.time() - t0

    m = losses["models"]
    paired = {split: paired_difference(m["IM"][split]["output_loss"], m["IT"][split]["output_loss"])
              for split in ("train", "heldout")}
    higher_train = paired["train"]["mean"] > 0
    lower_test = paired["heldout"]["mean"] < 0
    pattern = higher_train and lower_test
    clear = pattern and all(abs(p["mean"]) > 2 * p["se"] for p in paired.values())
    summary = {
        "model_parameters": n_params, "vocab": tok_len, "pretrain": pre, "timings_s": timings,
        "train_rows": args.train_rows, "heldout_rows": args.heldout_rows, "seq_len": args.seq_len,
        "epochs": args.epochs, "lr": args.lr,
        "losses": {name: {split: {k: v[split][k] for k in ("mean", "pooled", "no_output_tokens")}
                          for split in ("train", "heldout")} for name, v in m.items()},
        "bleu": {name: v["bleu"] for name, v in memo["models"].items()} if memo else None,
        "im_minus_it": paired,
        "figure3_pattern": {"im_higher_train": higher_train, "im_lower_heldout": lower_test, "both": pattern,
                            "both_beyond_2se": clear},
        "paper_figure3": PAPER_FIG3,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(losses["plot"], args.figure)

    print("\nMean per-example output-token loss (nats); pooled = token-weighted")
    print(f"{'model':<8}{'train':>10}{'held-out':>10}{'gap':>8}{'train pooled':>14}{'held-out pooled':>17}")
    for name, v in m.items():
        tr, ho = v["train"], v["heldout"]
        print(f"{name:<8}{tr['mean']:>10.4f}{ho['mean']:>10.4f}{ho['mean'] - tr['mean']:>8.3f}"
              f"{tr['pooled']:>14.4f}{ho['pooled']:>17.4f}")
    print("paper (LLaMA-2-7B, LIMA): IT train 1.37 / test 1.32; IM train 1.45 / test 1.17")
    if memo:
        print("BLEU vs training outputs: " + ", ".join(f"{k} {v['bleu']:.2f}" for k, v in memo["models"].items()))
    for split, p in paired.items():
        print(f"IM - IT per example, {split}: {p['mean']:+.4f} (paired standard error {p['se']:.4f}; IM lower on "
              f"{p['im_lower']}/{p['n']} examples)")
    print(f"IM train loss {'higher' if higher_train else 'not higher'} than IT, held-out loss "
          f"{'lower' if lower_test else 'not lower'}: the Figure 3 pattern "
          f"{'appears' if pattern else 'does not appear'} at this scale"
          + ("" if not pattern else " (both differences beyond 2 standard errors)" if clear
             else " (in direction only: not every difference is beyond 2 standard errors)"))
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"outputs: {out} (summary.json, analysis/losses.json, analysis/losses.png)"
          + (f"; figure copied to {args.figure}" if args.figure else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
