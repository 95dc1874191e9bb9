"""Train-step time (and, on CUDA, peak memory) of the segment-weighted loss against stock HF.

    python bench/step_time.py [--steps 20] [--vocab 32000]                        # CPU, quickstart data
    python bench/step_time.py --device cuda --preset 1b                          # ~1.1B Llama, 8 x 2048, V 128k
    python bench/step_time.py --device cpu --preset 1b --smoke                   # the 1b plumbing, tiny sizes

``--preset quickstart`` (default): one tiny Llama (LLaMA-2's 32k vocabulary so the loss is a
realistic share of the step), one batch of the quickstart data. ``--preset 1b``: a TinyLlama-1.1B-
shaped Llama built locally from its config (no hub, random weights), 8 sequences of 2,048 random
tokens with random segments, vocabulary 128,256, bf16 on CUDA. A full step (forward, loss,
backward, AdamW) for:

* ``stock``: the model's own loss on IT labels (``lm_head`` → full logits → ``ForCausalLMLoss``);
* ``IT``, ``IM``, ``weighted`` (0.3/1.0): ``losses.segment_weighted_loss`` on the full logits
  (``im_loss_impl: logits``);
* ``IM-chunked``: the same loss from the final hidden states and the output layer, chunk by chunk,
  as ``IMTrainer`` runs ``im_loss_impl: chunked`` (``logits_to_keep=1``, a hook on the decoder);
* ``IM-cce``: the same through Cut Cross Entropy (CUDA, when importable).

Variants run interleaved, in a rotating order, round after round; the median step time of each is
kept. On CUDA the peak memory of each variant's steps (``max_memory_allocated`` above the
allocation before its step: model, optimizer state and batch excluded) is reported too. Prints
ratios against stock HF and IT measured in the same run. Targets: IM/IT and weighted/IT <= 1.05
(CPU); on the GPU (issue 19) IM-chunked step <= 1.0x stock and peak <= 0.25x stock.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PRESETS = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, batch=8, seq=2048),
    # the same code path at sizes a CPU runs in seconds (--smoke)
    "1b-smoke": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, batch=2, seq=64),
}


def quickstart_batch(batch: int):
    from instruction_modelling.core.evaluation import read_rows
    from instruction_modelling.core.segments import ChatRenderer, RowEncoder
    from instruction_modelling.quickstart.sample_data import TRAIN_FILE
    from instruction_modelling.quickstart.tiny import build_tokenizer, corpus_from_jsonl

    tok = build_tokenizer(corpus_from_jsonl(TRAIN_FILE))
    enc = RowEncoder(tok, ChatRenderer(tok, tok.chat_template))
    examples = [enc.encode(r) for r in read_rows(TRAIN_FILE)[: batch * 2]]
    # Two rows per sequence to get ~200 tokens per row.
    seqs = [(a.input_ids + b.input_ids, a.segment_ids + b.segment_ids) for a, b in zip(examples[::2], examples[1::2])]
    length = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    segs = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (x, s) in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        segs[i, : len(s)] = torch.tensor(s)
    return ids, segs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=["quickstart", "1b"], default="quickstart")
    parser.add_argument("--smoke", action="store_true", help="with --preset 1b: tiny sizes, to check the plumbing")
    parser.add_argument("--steps", type=int, default=None, help="interleaved rounds (default 20, 1b: 5)")
    parser.add_argument("--vocab", type=int, default=32000, help="quickstart preset's vocabulary")
    parser.add_argument("--batch", type=int, default=4, help="quickstart preset's rows")
    parser.add_argument("--chunk", type=int, default=256, help="im_loss_chunk_size")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (5 if args.preset == "1b" else 20)

    from transformers import LlamaConfig, LlamaForCausalLM

    from instruction_modelling.core.losses import HiddenStates, segment_weighted_loss, weight_table
    from instruction_modelling.core.segments import Segment

    torch.manual_seed(0)
    if args.preset == "quickstart":
        ids, segs = quickstart_batch(args.batch)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4)
    else:
        p = dict(PRESETS["1b-smoke" if args.smoke else "1b"])
        batch, seq = p.pop("batch"), p.pop("seq")
        config = LlamaConfig(**p, max_position_embeddings=seq)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        segs = torch.randint(1, 4, (batch, seq), generator=g)
        segs[:, 0] = Segment.TEMPLATE
    dtype = torch.bfloat16 if cuda else torch.float32
    with device:  # built on the device: a 1B model's CPU init would take minutes
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    ids, segs = ids.to(device), segs.to(device)
    labels = torch.where(segs == Segment.OUTPUT, ids, torch.full_like(ids, -100))
    attn = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tables = {k: v.to(device) for k, v in
              {"IT": weight_table(0.0, 1.0), "IM": weight_table(1.0, 1.0), "weighted": weight_table(0.3, 1.0)}.items()}
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    captured = {}
    decoder.register_forward_hook(lambda m, a, out: captured.__setitem__("hidden", out.last_hidden_state))

    variants = ["stock", "IT", "IM", "weighted", "IM-chunked"]
    try:
        import cut_cross_entropy  # noqa: F401

        if cuda:
            variants.append("IM-cce")
    except ImportError:
        pass

    def step(variant: str) -> tuple[float, int]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t = time.perf_counter()
        if variant == "stock":
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        elif variant.startswith("IM-"):  # as IMTrainer: only the last position's logits, hidden states hooked
            model(input_ids=ids, attention_mask=attn, logits_to_keep=1)
            states = HiddenStates(captured.pop("hidden"), head, impl=variant[3:])
            loss = segment_weighted_loss(states, ids, segs, tables["IM"], chunk_size=args.chunk).loss
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits
            loss = segment_weighted_loss(logits, ids, segs, tables[variant], chunk_size=args.chunk).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base if cuda else 0)

    for v in variants:  # warm-up (and AdamW's state, so that it is in every variant's baseline)
        step(v)
    times = {v: [] for v in variants}
    peaks = {v: 0 for v in variants}
    for r in range(steps):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:  # rotate: no position bias
            dt, peak = step(v)
            times[v].append(dt)
            peaks[v] = max(peaks[v], peak)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.device}, {params / 1e9:.2f}B parameters, batch {tuple(ids.shape)}, vocab {config.vocab_size}, "
          f"{dtype}, chunk {args.chunk}, {steps} interleaved rounds, median step times"
          + (", peak memory above the step's start:" if cuda else ":"))
    for v in variants:
        print(f"  {v:11s} {med[v] * 1000:9.1f} ms" + (f"   peak +{peaks[v] / 2**30:7.2f} GiB" if cuda else ""))
    print(f"ratio IM/IT:             {med['IM'] / med['IT']:.3f} (target <= 1.05)")
    print(f"ratio weighted/IT:       {med['weighted'] / med['IT']:.3f} (target <= 1.05)")
    print(f"ratio IT/stock:          {med['IT'] / med['stock']:.3f} (our loss on full logits vs the model's own)")
    for v in [v for v in variants if v.startswith("IM-")]:
        line = f"ratio {v}/stock: step {med[v] / med['stock']:.3f} (target <= 1.0)"
        if cuda:
            line += f", peak {peaks[v] / max(peaks['stock'], 1):.3f} (target <= 0.25)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
