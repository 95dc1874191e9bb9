"""Train-step time of the segment-weighted loss: IM/IT and weighted/IT, and IM vs stock HF loss.

    python bench/step_time.py [--steps 20] [--vocab 32000]

One tiny Llama (LLaMA-2's 32k vocabulary so the loss is a realistic share of the step), one batch
of the quickstart data, and a full step (forward, loss, backward, AdamW) for:

* ``stock``: the model's own loss on IT labels (what Axolotl's chat_template type trains);
* ``IT``, ``IM``, ``weighted`` (0.3/1.0): ``losses.segment_weighted_loss`` with those tables.

Variants run interleaved, in a rotating order, round after round, and the median step time of
each is kept. Prints
ratios against IT measured in the same run (target: IM/IT and weighted/IT <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from transformers import LlamaConfig, LlamaForCausalLM

    from instruction_modelling.core.evaluation import read_rows
    from instruction_modelling.core.losses import segment_weighted_loss, weight_table
    from instruction_modelling.quickstart.sample_data import TRAIN_FILE
    from instruction_modelling.quickstart.tiny import build_tokenizer, corpus_from_jsonl
    from instruction_modelling.core.segments import ChatRenderer, RowEncoder, Segment

    tok = build_tokenizer(corpus_from_jsonl(TRAIN_FILE))
    enc = RowEncoder(tok, ChatRenderer(tok, tok.chat_template))
    rows = read_rows(TRAIN_FILE)[: args.batch * 2]
    examples = [enc.encode(r) for r in rows]
    # Two rows per sequence to get ~200 tokens per row.
    seqs = [(a.input_ids + b.input_ids, a.segment_ids + b.segment_ids) for a, b in zip(examples[::2], examples[1::2])]
    length = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    segs = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (x, s) in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        segs[i, : len(s)] = torch.tensor(s)
    labels = torch.where(segs == Segment.OUTPUT, ids, torch.full_like(ids, -100))
    attn = (segs >= 0).long()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tables = {"IT": weight_table(0.0, 1.0), "IM": weight_table(1.0, 1.0), "weighted": weight_table(0.3, 1.0)}

    def step(variant: str) -> float:
        t = time.perf_counter()
        if variant == "stock":
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits
            loss = segment_weighted_loss(logits, ids, segs, tables[variant]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    variants = ("stock", "IT", "IM", "weighted")
    for v in variants:  # warm-up
        step(v)
    times = {v: [] for v in variants}
    for r in range(args.steps):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:  # rotate: no position bias
            times[v].append(step(v))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    print(f"batch {tuple(ids.shape)}, vocab {args.vocab}, {args.steps} interleaved rounds, median step times:")
    for v in variants:
        print(f"  {v:9s} {med[v] * 1000:8.1f} ms")
    print(f"ratio IM/IT:        {med['IM'] / med['IT']:.3f} (target <= 1.05)")
    print(f"ratio weighted/IT:  {med['weighted'] / med['IT']:.3f} (target <= 1.05)")
    print(f"ratio IT/stock:     {med['IT'] / med['stock']:.3f} (our loss vs the model's own)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
