"""A tiny end-to-end IT-vs-IM study on CPU: does the paper's Figure 3 pattern appear at this scale?

    python bench/tiny_study.py [--out runs/tiny_study] [--pretrain-steps 600] [--seed 0] [--figure bench/tiny_study_losses.png]

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

Weight curve (issue 14): ``--weight-curve --seeds 0 1`` fine-tunes, from one pre-trained base
per seed, every point of ``CURVE`` (instruction weight λp ∈ {0, 0.1, 0.3, 0.6, 1.0} with output
weight λr 1 under ``token`` normalisation, and WIT's reference point λp 0.4 / λr 0.6 under
``nonzero``), scores held-out output loss per point, writes ``weight_curve.json`` per seed and
plots all seeds into ``--curve-figure``. ``--plot-only`` re-plots from the summaries written so far.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "plugin"))  # run from a checkout without installing

from instruction_modelling.commands.analyze import run_losses, run_memorisation  # noqa: E402
from instruction_modelling.axolotl.configs import cpu_config, write_config  # noqa: E402
from instruction_modelling.quickstart.tiny import build_model, build_tokenizer  # noqa: E402

LIMA = REPO.parent / "shared" / "data" / "lima.jsonl"
PAPER_FIG3 = {"IT": {"train": 1.37, "test": 1.32}, "IM": {"train": 1.45, "test": 1.17}}
# (label, instruction weight λp, output weight λr, im_loss_normalization) of the weight curve.
CURVE = [("p0", 0.0, 1.0, "token"), ("p0.1", 0.1, 1.0, "token"), ("p0.3", 0.3, 1.0, "token"),
         ("p0.6", 0.6, 1.0, "token"), ("p1", 1.0, 1.0, "token"), ("wit_p0.4_r0.6", 0.4, 0.6, "nonzero")]


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


def curve_point_config(base: Path, train_file: Path, out: Path, point: tuple, args) -> dict:
    """The Axolotl config of one weight-curve point: the study's IT/IM config with the weights set."""
    name, lp, lr_, norm = point
    weights = {"im_mode": "it"} if lp == 0 and lr_ == 1 else {"im_instruction_weight": lp, "im_output_weight": lr_}
    cfg = cpu_config(base, train_file, out / name, mode="im", num_epochs=args.epochs, sequence_len=args.seq_len,
                     excess_length_strategy="truncate", learning_rate=args.lr, micro_batch_size=8,
                     logging_steps=5, seed=args.seed, im_on_bad_rows="skip", im_loss_normalization=norm)
    cfg.update(weights)
    return cfg


def run_weight_curve(args, seed: int, root: Path, train_fn) -> dict:
    """One seed of the weight curve: one pre-trained base, every ``CURVE`` point fine-tuned from it."""
    args.seed = seed
    out = root / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0, timings = time.time(), {}
    train_file, heldout_file, base, n_params, pre = prepare_base(args, out)
    timings["pretrain"] = pre["seconds"]
    models = [("base", base)]
    result = {"seed": seed, "model_parameters": n_params, "pretrain": pre, "points": {}}
    for point in CURVE:
        name, lp, lr_, norm = point
        t = time.time()
        train_fn(write_config(curve_point_config(base, train_file, out, point, args), out / f"{name}.yml"),
                 out / f"{name}.log")
        timings[f"finetune_{name}"] = time.time() - t
        print(f"seed {seed}: fine-tuned λp={lp} λr={lr_} ({norm}) in {timings[f'finetune_{name}']:.0f} s", flush=True)
        models.append((name, out / name))
    t = time.time()
    losses = run_losses(models, train_file, heldout_file, out / "analysis", max_length=args.seq_len, device="cpu")
    timings["analyze_losses"] = time.time() - t
    m = losses["models"]
    for name, lp, lr_, norm in CURVE:
        result["points"][name] = {
            "instruction_weight": lp, "output_weight": lr_, "normalisation": norm,
            "train": m[name]["train"]["mean"], "heldout": m[name]["heldout"]["mean"],
            "heldout_minus_it": paired_difference(m[name]["heldout"]["output_loss"], m["p0"]["heldout"]["output_loss"]),
        }
    result["base"] = {"train": m["base"]["train"]["mean"], "heldout": m["base"]["heldout"]["mean"]}
    timings["total"] = time.time() - t0
    result["timings_s"] = timings
    (out / "weight_curve.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def plot_weight_curve(results: list[dict], figure: Path) -> Path:
    """Held-out output loss against λp, one line per seed; the λr < 1 (nonzero) point as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        pts = [p for p in r["points"].values() if p["output_weight"] == 1.0]
        line, = ax.plot([p["instruction_weight"] for p in pts], [p["heldout"] for p in pts], "o-",
                        label=f"seed {r['seed']}, λr 1 (token)")
        for p in r["points"].values():
            if p["output_weight"] != 1.0:
                ax.plot([p["instruction_weight"]], [p["heldout"]], "s", color=line.get_color(), markersize=8,
                        label=f"seed {r['seed']}, λr {p['output_weight']} ({p['normalisation']})")
    ax.set_xlabel("instruction (prompt) loss weight λp")
    ax.set_ylabel("held-out output-token loss (nats, per-example mean)")
    ax.set_title("Tiny study: weight curve on LIMA (0.85 M-parameter Llama)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    return figure


def print_weight_curve(results: list[dict]) -> None:
    print("\nHeld-out output-token loss per point (mean of per-example losses, nats); Δ = point − IT, paired ± SE")
    for r in results:
        print(f"seed {r['seed']}: base {r['base']['heldout']:.4f}")
        for name, p in r["points"].items():
            d = p["heldout_minus_it"]
            print(f"  λp {p['instruction_weight']:<4} λr {p['output_weight']:<4} {p['normalisation']:<8} train "
                  f"{p['train']:.4f} held-out {p['heldout']:.4f}  Δ {d['mean']:+.4f} ± {d['se']:.4f} "
                  f"(lower on {d['im_lower']}/{d['n']})")


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
                        help="fine-tune every CURVE point (λp grid, λr 1, and WIT's λp 0.4 / λr 0.6 with nonzero) "
                        "from one base per seed instead of the IT-vs-IM study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of --weight-curve")
    parser.add_argument("--curve-figure", default=str(REPO / "bench" / "tiny_study_weight_curve.png"))
    parser.add_argument("--plot-only", action="store_true", help="re-plot --weight-curve from the summaries under --out")
    args = parser.parse_args(argv)
    if args.weight_curve and args.plot_only:
        results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(args.out).glob("seed*/weight_curve.json"))]
        print_weight_curve(results)
        print(f"figure: {plot_weight_curve(results, Path(args.curve_figure))}")
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
        root = Path(args.out).resolve()
        results = []
        for seed in args.seeds:
            results.append(run_weight_curve(args, seed, root, _train))
            print_weight_curve(results)
            print(f"figure: {plot_weight_curve(results, Path(args.curve_figure))}", flush=True)
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
