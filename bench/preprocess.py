"""Preprocessing speed: ``type: instruction_modelling`` vs Axolotl's ``chat_template``.

    python bench/preprocess.py [--data ../shared/data/lima.jsonl] [--rounds 3]

Both strategies tokenise the same rows with the same tokenizer (a byte-level BPE trained here
on the data, 8k vocab; no hub access) and the paper's tulu template; Axolotl's is configured
with ``roles_to_train: [system, user, assistant]`` (its closest IM setting). Rounds alternate
between the two and the best round of each is kept (the machine is noisy). Prints examples/s of
each and the ratio ours/Axolotl's (target: >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lima.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"{args.data} not found: pass --data (messages JSONL)", file=sys.stderr)
        return 2

    import datasets
    from axolotl.datasets import TokenizedPromptDataset
    from axolotl.prompt_strategies.chat_template import StrategyLoader
    from axolotl.utils.dict import DictDefault

    from instruction_modelling.quickstart.tiny import TULU_TEMPLATE, build_tokenizer, corpus_from_jsonl
    from instruction_modelling.axolotl.strategy import load as load_im

    datasets.disable_caching()
    datasets.disable_progress_bars()
    rows = datasets.load_dataset("json", data_files=args.data, split="train")
    tokenizer = build_tokenizer(corpus_from_jsonl(args.data), vocab_size=8000)
    cfg = DictDefault({"sequence_len": 100_000, "chat_template": "jinja", "chat_template_jinja": TULU_TEMPLATE,
                       "train_on_inputs": False, "im_mode": "im"})
    axolotl_ds = DictDefault({"type": "chat_template", "field_messages": "messages",
                              "roles_to_train": ["system", "user", "assistant"]})
    ours_ds = DictDefault({"type": "instruction_modelling", "path": args.data})

    def run_axolotl():
        strategy = StrategyLoader()(tokenizer, cfg, axolotl_ds)
        return TokenizedPromptDataset(strategy, rows, process_count=1, keep_in_memory=True)

    def run_ours():
        return load_im(tokenizer, cfg, ours_ds).wrap_dataset(rows, process_count=1, keep_in_memory=True)

    best = {"axolotl chat_template": float("inf"), "instruction_modelling": float("inf")}
    for r in range(args.rounds):
        for name, fn in (("axolotl chat_template", run_axolotl), ("instruction_modelling", run_ours)):
            t = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t
            assert len(out) == len(rows), (name, len(out))
            best[name] = min(best[name], elapsed)
            print(f"round {r + 1} {name:24s} {len(rows) / elapsed:8.1f} examples/s", flush=True)
    ours, theirs = len(rows) / best["instruction_modelling"], len(rows) / best["axolotl chat_template"]
    print(f"\n{len(rows)} rows of {args.data}")
    print(f"axolotl chat_template (roles_to_train all): {theirs:.1f} examples/s")
    print(f"instruction_modelling:                      {ours:.1f} examples/s")
    print(f"ratio instruction_modelling / chat_template: {ours / theirs:.2f} (target >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
