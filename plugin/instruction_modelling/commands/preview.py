"""Show which tokens carry loss: ``python -m instruction_modelling.preview CONFIG.yml``.

Loads the Axolotl config (validated, with the plugin's options), its tokenizer and chat template,
segments the first rows of every ``type: instruction_modelling`` dataset exactly as training does,
and prints the tokens coloured by segment with the loss weight each segment gets in this config:

    template (no loss)   system   user   output (assistant + end-of-turn)

(the template gets its weight, and its colour, when ``im_role_weights: {template: w}`` gives it one).

``--plain`` prints ``[token]U`` / ``·token·`` notation instead of colours (for logs and diffs).
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from instruction_modelling.core.segments import EncodedExample, Segment

STYLES = {
    Segment.TEMPLATE: "bold cyan",  # when it carries loss; dim otherwise
    Segment.SYSTEM: "bold magenta",
    Segment.USER: "bold blue",
    Segment.OUTPUT: "bold green",
    Segment.TOOL: "bold yellow",
    Segment.REASONING: "green",
}
LETTERS = {Segment.TEMPLATE: "M", Segment.SYSTEM: "S", Segment.USER: "U", Segment.OUTPUT: "O", Segment.TOOL: "T", Segment.REASONING: "R"}


def plain_tokens(tokenizer, ex: EncodedExample, weights: dict[int, float] | None = None) -> str:
    """``·tok·`` for tokens without loss, ``[tok]X`` for tokens with loss (X = segment letter; M =
    template markup, when the template is weighted)."""
    parts = []
    for tok, seg in zip(ex.input_ids, ex.segment_ids):
        text = tokenizer.decode([tok]).replace("\n", "\\n")
        trained = weights.get(seg, 0) > 0 if weights is not None else seg != Segment.TEMPLATE
        parts.append(f"[{text}]{LETTERS[Segment(seg)]}" if trained else f"·{text}·")
    return "".join(parts)


def rich_tokens(tokenizer, ex: EncodedExample, weights: dict[int, float]):
    from rich.text import Text

    out = Text()
    for tok, seg in zip(ex.input_ids, ex.segment_ids):
        seg = Segment(seg)
        style = STYLES[seg] if weights.get(seg, 0) > 0 else "dim strike" if seg else "dim"
        out.append(tokenizer.decode([tok]), style=style)
    return out


def legend(weights: dict[int, float]):
    from rich.text import Text

    t = Text("legend: ")
    template = weights.get(Segment.TEMPLATE, 0)
    t.append(f"template w={template:g}" if template > 0 else "template (no loss)",
             style=STYLES[Segment.TEMPLATE] if template > 0 else "dim")
    for seg, name in ((Segment.SYSTEM, "system"), (Segment.USER, "user"), (Segment.TOOL, "tool"), (Segment.OUTPUT, "output"),
                      (Segment.REASONING, "reasoning")):
        w = weights.get(seg, 0)
        t.append("  ")
        t.append(f"{name} w={w:g}", style=STYLES[seg] if w > 0 else "dim strike")
    return t


def _first_rows(ds_cfg, n: int) -> list:
    """The first ``n`` rows as written (a row that cannot be read is its ``RowError``)."""
    from instruction_modelling.axolotl import raw_rows

    path = ds_cfg.get("path")
    saved = raw_rows.load_saved(path)  # the plugin's copy of a local file's rows (raw_rows.py)
    if saved is not None:
        head = saved[:n]
        return [raw_rows.parse_row(t, e) for t, e in zip(head[raw_rows.ROW_TEXT], head[raw_rows.READ_ERROR])]
    if path and os.path.isfile(path) and str(path).endswith((".json", ".jsonl")):
        from instruction_modelling.core.evaluation import read_rows

        return read_rows(path)[:n]
    from datasets import load_dataset

    ds = load_dataset(path, data_files=ds_cfg.get("data_files"), name=ds_cfg.get("name"),
                      split=ds_cfg.get("split") or "train")
    return [ds[i] for i in range(min(n, len(ds)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instruction_modelling.preview", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="Axolotl YAML that uses type: instruction_modelling")
    parser.add_argument("--rows", type=int, default=2, help="rows per dataset (default: %(default)s)")
    parser.add_argument("--plain", action="store_true", help="no colours: [token]X marks tokens with loss")
    args = parser.parse_args(argv)
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer
    from rich.console import Console

    from instruction_modelling.axolotl.plugin import is_im_dataset
    from instruction_modelling.axolotl.strategy import load as load_strategy
    from instruction_modelling.core.options import IMArgs
    from instruction_modelling.core.segments import WEIGHT_KEY_SEGMENT, RowError

    cfg = load_cfg(args.config)
    tokenizer = load_tokenizer(cfg)
    im_args = IMArgs.from_cfg(cfg)
    weights = {int(WEIGHT_KEY_SEGMENT[r]): w for r, w in im_args.role_weight_map().items()}
    from instruction_modelling.axolotl import raw_rows

    console = Console(highlight=False, no_color=args.plain)
    for ds_cfg in cfg.datasets or []:
        if not is_im_dataset(ds_cfg):
            continue
        strategy = load_strategy(tokenizer, cfg, ds_cfg)
        saved = raw_rows.load_saved(ds_cfg.get("path"))
        console.print(f"== {raw_rows.source_of(saved) if saved is not None else ds_cfg.get('path')}  "
                      f"({im_args.weighting_summary()})", soft_wrap=True)  # one line, whatever the width
        if not args.plain:
            console.print(legend(weights))
        for i, row in enumerate(_first_rows(ds_cfg, args.rows)):
            try:
                if isinstance(row, RowError):
                    raise row
                ex = strategy.encoder.encode(row)
            except RowError as exc:
                console.print(f"row {i}: {exc}")
                continue
            n_loss = sum(1 for s in ex.segment_ids if weights.get(s, 0) > 0)
            console.print(f"row {i}: {len(ex.input_ids)} tokens, {n_loss} carry loss, {ex.straddled} straddled")
            if args.plain:
                print(plain_tokens(tokenizer, ex, weights), flush=True)
            else:
                console.print(rich_tokens(tokenizer, ex, weights))
    return 0


if __name__ == "__main__":
    from .cli import run_module_main  # third-party noise filtered; --verbose keeps it

    raise SystemExit(run_module_main(main))
