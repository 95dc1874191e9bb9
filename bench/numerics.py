"""Error of the output layer's bf16 weight gradient from the chunked loss, against float64, on any device.

    python bench/numerics.py --device cuda                 # 32,768 tokens, d 4096, V 128,256 (issue 19)
    python bench/numerics.py --device cpu --smoke          # small sizes

``tests/test_loss_numerics.py`` checks the same on CPU; this runs it where the CUDA path differs
(the bf16 GEMM writes the fp32 accumulator directly, ``addmm(out_dtype=)``). Prints, as multiples of
the floor (the error of one bf16 rounding of the exact gradient): the chunked loss with the fp32
accumulator (default), with a bf16 one (``im_loss_accum_dtype: model``), and stock HF (bf16
logits, fp32 cross-entropy). The exact gradient is computed in float64 on the same device from the
same bf16 inputs, in blocks of rows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def exact_weight_grad(hidden, weight, targets, coef, block=8192):
    """d(Σ coef·CE)/dW in float64 on the inputs' device (an H200 does it in seconds), a block of rows at a time."""
    h = hidden.double()
    w = weight.double()
    t = targets
    c = coef.double()
    grad = torch.zeros_like(w)
    for s in range(0, h.shape[0], block):
        z = h[s:s + block] @ w.t()
        g = z.softmax(-1)
        g[torch.arange(g.shape[0], device=g.device), t[s:s + block]] -= 1
        grad += (g * c[s:s + block, None]).t() @ h[s:s + block]
    return grad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="2,048 tokens, d 64, V 512")
    parser.add_argument("--chunk", type=int, default=256, help="im_loss_chunk_size")
    args = parser.parse_args()
    n, d, v = (2048, 64, 512) if args.smoke else (32768, 4096, 128256)
    chunk = 16 if args.smoke else args.chunk

    from instruction_modelling.core.losses import HiddenStates, hidden_weighted_loss

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).bfloat16().to(device)
    head = torch.nn.Linear(d, v, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g) * (0.05 if args.smoke else 0.02))
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    coef = torch.full((n,), 1.0 / n, device=device)
    exact = exact_weight_grad(hidden, head.weight.detach(), targets, coef)
    floor = float((exact.bfloat16().double() - exact).norm() / exact.norm())

    def error(grad):
        return float((grad.double() - exact).norm() / exact.norm()) / floor

    rows = {}
    for name, accum in (("chunked, fp32 accumulator (default)", torch.float32), ("chunked, bf16 accumulator", None)):
        head.weight.grad = None
        loss, _, _ = hidden_weighted_loss(HiddenStates(hidden[None], head, accum_dtype=accum), targets[None],
                                          coef[None], chunk_size=chunk)
        loss.backward()
        rows[name] = error(head.weight.grad)
    head.weight.grad = None
    (F.cross_entropy(head(hidden).float(), targets, reduction="none") * coef).sum().backward()
    rows["stock HF (bf16 logits)"] = error(head.weight.grad)
    print(f"{args.device}: {n} tokens, d {d}, V {v}, {n // chunk} chunks of {chunk}; floor (one bf16 rounding) "
          f"= {floor:.3g} relative")
    for name, ratio in rows.items():
        print(f"  {name:38s} {ratio:6.2f} x floor")
    print("target: the fp32 accumulator within 1.5x the floor, or no worse than stock HF")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
