"""Numerics of the chunked hidden-state loss in bf16: the head's weight gradient summed over many
chunks, and heads whose dtype differs from the hidden states' (QLoRA's fp32 head, Gemma-style norms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instruction_modelling.core.losses import HiddenStates, ReferenceHidden, hidden_weighted_loss

CHUNK, CHUNKS, V, D = 16, 128, 512, 64


def _bf16_problem(logit_scale: float, seed: int = 0):
    """bf16 hidden states [N, D] and an nn.Linear head [V, D], targets and token-mean coefficients."""
    g = torch.Generator().manual_seed(seed)
    n = CHUNK * CHUNKS
    hidden = torch.randn(n, D, generator=g).bfloat16()
    head = torch.nn.Linear(D, V, bias=False).bfloat16()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * logit_scale)
    targets = torch.randint(0, V, (n,), generator=g)
    coef = torch.full((n,), 1.0 / n)
    return hidden, head, targets, coef


def _exact_weight_grad(hidden, weight, targets, coef):
    """The head's weight gradient in float64 from the same bf16 inputs."""
    w = weight.detach().double().requires_grad_()
    loss = (F.cross_entropy(hidden.double() @ w.t(), targets, reduction="none") * coef.double()).sum()
    return torch.autograd.grad(loss, w)[0]


def _relative_error(got, exact):
    return float((got.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("logit_scale", [0.05, 1.0])
def test_bf16_head_gradient_over_128_chunks_has_the_error_of_one_rounding(logit_scale):
    """Summing 128 chunk products into a bf16 buffer rounds 128 times (error ~ √chunks × one rounding,
    7.7× at 128 chunks before the fix); summed in fp32 and rounded once it stays at the floor, the error
    of one bf16 rounding of the exact gradient. With large logits the model's own bf16 logits dominate
    (stock HF has the same error): there the bound is stock HF's error, not the floor."""
    hidden, head, targets, coef = _bf16_problem(logit_scale)
    exact = _exact_weight_grad(hidden, head.weight, targets, coef)
    floor = _relative_error(exact.bfloat16(), exact)

    loss, _, _ = hidden_weighted_loss(HiddenStates(hidden[None], head), targets[None], coef[None], chunk_size=CHUNK)
    loss.backward()
    ours = _relative_error(head.weight.grad, exact)
    assert head.weight.grad.dtype == torch.bfloat16

    head.weight.grad = None  # stock HF: bf16 logits, fp32 cross-entropy, one bf16 GEMM for the gradient
    (F.cross_entropy(head(hidden).float(), targets, reduction="none") * coef).sum().backward()
    stock = _relative_error(head.weight.grad, exact)

    assert ours <= 1.5 * floor if logit_scale < 0.1 else ours <= 1.05 * stock, (ours / floor, stock / floor)


def test_bf16_accumulation_stays_available_and_is_what_the_fp32_one_fixes():
    """accum_dtype None (im_loss_accum_dtype: model) keeps the bf16 buffer, and its error grows with
    the chunks: the fp32 default is what brings it to the floor."""
    hidden, head, targets, coef = _bf16_problem(0.05)
    exact = _exact_weight_grad(hidden, head.weight, targets, coef)
    floor = _relative_error(exact.bfloat16(), exact)
    loss, _, _ = hidden_weighted_loss(HiddenStates(hidden[None], head, accum_dtype=None), targets[None], coef[None],
                                      chunk_size=CHUNK)
    loss.backward()
    assert _relative_error(head.weight.grad, exact) > 3 * floor


class _Adapted(torch.nn.Module):
    """A head that is not a plain nn.Linear (as a LoRA-adapted one), with fp32 parameters."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(4, base.in_features) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(base.out_features, 4) * 0.1)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


@pytest.mark.parametrize("kind", ["linear", "bias", "adapted"])
def test_fp32_head_on_bf16_hidden_states_follows_the_models_autocast(kind):
    """QLoRA (prepare_model_for_kbit_training upcasts the head to fp32) with Gemma-style norms (which
    return the input's dtype) gives bf16 hidden states and an fp32 head. The model's forward applies
    the head under accelerate's bf16 autocast; the loss, run after it, crashed with "expected m1 and
    m2 to have the same dtype". It now applies the head as that autocast does: same loss and
    gradients as the head run under autocast with a plain cross-entropy."""
    g = torch.Generator().manual_seed(1)
    n = 96
    hidden = torch.randn(n, D, generator=g).bfloat16()
    torch.manual_seed(2)
    head = torch.nn.Linear(D, V, bias=kind == "bias")  # fp32
    if kind == "adapted":
        head = _Adapted(head)
    targets = torch.randint(0, V, (n,), generator=g)
    coef = torch.rand(n, generator=g) / n

    h = hidden.clone().requires_grad_()
    loss, _, _ = hidden_weighted_loss(HiddenStates(h[None], head, autocast_dtype=torch.bfloat16), targets[None],
                                      coef[None], chunk_size=32)
    loss.backward()
    ours = [h.grad] + [p.grad for p in head.parameters()]
    head.zero_grad()

    h_ref = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(h_ref)
    assert logits.dtype == torch.bfloat16
    ref_loss = (F.cross_entropy(logits.float(), targets, reduction="none") * coef).sum()
    ref_loss.backward()
    theirs = [h_ref.grad] + [p.grad for p in head.parameters()]

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_fp32_head_reference_on_bf16_hidden_states():
    """The KL reference (``ReferenceHidden``) with an fp32 head and bf16 hidden states: its logits are
    the head's under bf16 autocast (it crashed the same way)."""
    torch.manual_seed(3)
    head = torch.nn.Linear(D, V)
    hidden = torch.randn(40, D).bfloat16()
    ref = ReferenceHidden(hidden, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = head(hidden)
    torch.testing.assert_close(ref(0, 40), expected)
    index = torch.tensor([3, 7, 30])
    torch.testing.assert_close(ref.rows(index, out=torch.empty(3, V, dtype=torch.bfloat16)), expected[index])
