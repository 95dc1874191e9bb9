"""Peak memory and time of the loss's forward + backward, from the final hidden states to their
gradient (and the output layer's), for each loss implementation, in one run.

    python bench/loss_memory.py                                   # CPU: 4,096 tokens, d 1024
    python bench/loss_memory.py --device cuda --tokens 32768 --hidden 4096 --dtype bfloat16

Implementations, each in a fresh subprocess (so its peak is its own), same hidden states, output
layer and IM weights (segments random, weights 0.3 / 1.0):

* ``hf``       stock transformers: ``lm_head`` → full logits → ``ForCausalLMLoss`` (fp32 upcast)
* ``logits``   ``im_loss_impl: logits``: full logits → ``losses.segment_weighted_loss`` (chunked CE)
* ``chunked``  ``im_loss_impl: chunked``: ``losses.HiddenStates``, no full logits
* ``cce``      ``im_loss_impl: cce``: Cut Cross Entropy ``reduction="none"`` × IM weights (CUDA, when importable)
* ``liger``    Liger fused linear CE ``reduction="none"`` × IM weights (CUDA, when importable)

Peak: on CUDA ``max_memory_allocated`` above the allocation after set-up; on CPU the peak
resident set above the resident set after set-up (``ru_maxrss`` − RSS, with a fixed glibc mmap
threshold so that freed tensors leave the resident set). Prints median times,
peaks, and ratios against ``logits`` and ``hf`` measured in the same run, for vocabularies
32,000 and 128,256. CPU target: chunked peak ≤ 0.3× logits at vocabulary 32k, 4,096 tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

IMPLS = ("hf", "logits", "chunked", "cce", "liger")
VOCABS = (32000, 128256)


def available(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run here (None when it can)."""
    if impl == "cce":
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut_cross_entropy not installed"
        if device != "cuda":
            return "needs CUDA"
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel not installed"
        if device != "cuda":
            return "needs CUDA (Triton kernels)"
    return None


def run_impl(impl: str, vocab: int, tokens: int, hidden_size: int, device: str, dtype_name: str, reps: int,
             chunk: int) -> dict:
    import torch

    from instruction_modelling.core.losses import HiddenStates, segment_weighted_loss, target_coefficients, weight_table
    from measure import baseline, peak_since, sync, time_steps  # bench/measure.py

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device=device, dtype=dtype)
    hidden = (torch.randn(1, tokens, hidden_size, device=device) / hidden_size ** 0.5).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    segs = torch.randint(1, 4, (1, tokens), device=device)
    table = weight_table(0.3, 1.0).to(device)

    def loss_fn():
        if impl == "hf":
            from transformers.loss.loss_utils import ForCausalLMLoss

            labels = torch.where(table[segs] > 0, ids, -100)
            return ForCausalLMLoss(head(hidden), labels, vocab)
        if impl == "logits":
            return segment_weighted_loss(head(hidden), ids, segs, table, chunk_size=chunk).loss
        if impl == "chunked":
            return segment_weighted_loss(HiddenStates(hidden, head), ids, segs, table, chunk_size=chunk).loss
        coef = target_coefficients(ids, segs, table).ce_coef.reshape(-1)
        h, t = hidden[0, :-1], ids[0, 1:]
        if impl == "cce":
            from cut_cross_entropy import linear_cross_entropy

            ce = linear_cross_entropy(h, head.weight, t, reduction="none")
        else:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss(reduction="none")(head.weight, h, t)
        return (ce.float() * coef).sum()

    def step():
        loss_fn().backward()
        hidden.grad = None
        head.weight.grad = None

    step()  # warm-up (kernels, allocator)
    sync(device)
    base = baseline(device)
    times = time_steps(step, device, reps)
    peak = peak_since(base, device)
    return {"impl": impl, "vocab": vocab, "time_s": statistics.median(times), "peak_bytes": max(peak, 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--chunk", type=int, default=256, help="im_loss_chunk_size")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.impl:
        print(json.dumps(run_impl(args.impl, args.vocab[0], args.tokens, args.hidden, args.device, dtype,
                                  args.reps, args.chunk)))
        return 0

    print(f"loss fwd+bwd on {args.device}, {args.tokens} tokens, d {args.hidden}, {dtype}, chunk {args.chunk}, "
          f"median of {args.reps}")
    for vocab in args.vocab:
        results = {}
        for impl in IMPLS:
            why = available(impl, args.device)
            if why:
                print(f"  vocab {vocab:6d} {impl:8s} skipped: {why}")
                continue
            proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--vocab", str(vocab), "--tokens",
                                   str(args.tokens), "--hidden", str(args.hidden), "--device", args.device,
                                   "--dtype", dtype, "--reps", str(args.reps), "--chunk", str(args.chunk)],
                                  capture_output=True, text=True,
                                  # A fixed mmap threshold: glibc's adaptive one keeps freed chunk-sized
                                  # blocks in the heap, so the resident set would count memory no tensor holds.
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "131072"})
            if proc.returncode != 0:
                print(f"  vocab {vocab:6d} {impl:8s} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  vocab {vocab:6d} {impl:8s} {r['time_s'] * 1000:9.1f} ms   peak +{r['peak_bytes'] / 2**20:8.1f} MiB",
                  flush=True)
        for base in ("logits", "hf"):
            if base not in results:
                continue
            for impl, r in results.items():
                if impl != base:
                    b = results[base]
                    print(f"  vocab {vocab:6d} {impl:8s}/ {base:7s} time {r['time_s'] / b['time_s']:5.2f}   "
                          f"peak {r['peak_bytes'] / max(b['peak_bytes'], 1):5.2f}")
    print("CPU target: chunked peak <= 0.3x logits at vocab 32k, 4,096 tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
