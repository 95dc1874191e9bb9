"""Numerics of the chunked hidden-state loss in bf16: the head's weight gradient summed over many
chunks, and heads whose dtype differs from the hidden states' (QLoRA's fp32 head, Gemma-style norms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


class _HostSyncs(TorchDispatchMode):
    """Records the operations that make a GPU wait for the host or the host wait for the GPU: reading a
    value (``item``, ``tolist``, ``bool``: ``_local_scalar_dense``), data-dependent shapes (``nonzero``),
    and new tensors made from Python data (``torch.tensor``: a host-to-device copy per call)."""

    WATCHED = ("aten._local_scalar_dense", "aten.nonzero", "aten.lift_fresh")

    def __init__(self):
        super().__init__()
        self.seen = []
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(self.WATCHED):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_syncs(monkeypatch):
    """``_HostSyncs`` plus ``Tensor.tolist`` / ``Tensor.item`` calls (on CPU they read memory without
    dispatching an operation)."""
    mode = _HostSyncs()
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)

        def recording(self, *args, _original=original, _name=method, **kwargs):
            if mode.active:
                mode.seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, recording)
    return mode


def _kl_batch():
    from test_hidden_loss import batch

    ids, segs, pos = batch("packed", seed=4)
    torch.manual_seed(5)
    head = torch.nn.Linear(8, 23)
    hidden = torch.randn(*ids.shape, 8, requires_grad=True)
    reference = ReferenceHidden(torch.randn(ids.numel(), 8), torch.nn.Linear(8, 23))
    return ids, segs, pos, head, hidden, reference


def test_share_normalisation_makes_no_host_copy_per_micro_batch(host_syncs):
    from test_losses import TABLES
    from instruction_modelling.core.losses import loss_normaliser, segment_weighted_loss

    ids, segs, pos, head, hidden, _ = _kl_batch()
    table = TABLES["im"]
    normaliser = loss_normaliser(ids, segs, table, pos, "share") * 2

    def step():
        out = segment_weighted_loss(HiddenStates(hidden, head), ids, segs, table, pos, "share", normaliser=normaliser,
                                    chunk_size=7, instruction_share=0.3)
        out.loss.backward()

    step()  # the first call makes the cached device constants
    with host_syncs:
        step()
    assert host_syncs.seen == []


def test_kl_rows_need_no_host_sync_when_counted_for_the_step(host_syncs):
    """The KL is computed only at its rows, which needs their number per chunk on the host: counted by
    the trainer for the whole step (``kl_chunk_counts``, one transfer), the loss itself syncs nowhere;
    without the counts it syncs once (``nonzero`` and ``bincount().tolist()`` did twice)."""
    from test_losses import TABLES
    from instruction_modelling.core.kl import kl_mask
    from instruction_modelling.core.losses import kl_chunk_counts, loss_normaliser, segment_weighted_loss

    ids, segs, pos, head, hidden, reference = _kl_batch()
    table = TABLES["im"]
    normaliser = loss_normaliser(ids, segs, table, pos)
    mask = kl_mask(segs, pos, "output")
    counts = kl_chunk_counts(F.pad(mask, (0, 1)), 7).tolist()

    def step(kl_counts):
        out = segment_weighted_loss(HiddenStates(hidden, head), ids, segs, table, pos, normaliser=normaliser,
                                    kl_reference=reference, kl_mask=mask, kl_coef=0.5, chunk_size=7,
                                    kl_counts=kl_counts)
        out.loss.backward()
        return out

    expected = step(None)
    with host_syncs:
        got = step(counts)
    assert host_syncs.seen == []
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(got.kl_sum, expected.kl_sum, rtol=0, atol=0)
    host_syncs.seen.clear()
    with host_syncs:
        step(None)
    assert len(host_syncs.seen) == 1, host_syncs.seen
