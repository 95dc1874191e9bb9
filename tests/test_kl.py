"""Chunked KL and its gradient against a brute-force computation on random tensors."""

from __future__ import annotations

import pytest
import torch

from instruction_modelling.core.kl import kl_mask, naive_token_kl, token_kl
from instruction_modelling.core.losses import segment_weighted_loss, weight_table
from instruction_modelling.core.segments import Segment

V = 13


def brute_force_kl(policy, ref, ids, kind):
    """Loops over positions; float64; KL(p_policy || p_ref) or the target-token log-ratio."""
    b, t, _ = policy.shape
    out = torch.zeros(b, t - 1, dtype=torch.float64)
    for i in range(b):
        for j in range(t - 1):
            logp = policy[i, j].double().log_softmax(-1)
            logq = ref[i, j].double().log_softmax(-1)
            if kind == "full":
                out[i, j] = sum(logp[v].exp() * (logp[v] - logq[v]) for v in range(policy.shape[-1]))
            else:
                out[i, j] = logp[ids[i, j + 1]] - logq[ids[i, j + 1]]
    return out


def batch(seed, packed):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 17
    ids = torch.randint(0, V, (b, t), generator=g)
    segs = torch.randint(0, 5, (b, t), generator=g)
    segs[:, -3:] = 0  # padding
    pos = None
    if packed:
        pos = torch.cat([torch.arange(7), torch.arange(10)]).repeat(b, 1)
    policy = torch.randn(b, t, V, generator=g, dtype=torch.float64).float()
    ref = torch.randn(b, t, V, generator=g, dtype=torch.float64).float()
    return ids, segs, pos, policy, ref


@pytest.mark.parametrize("kind", ["full", "target_token"])
@pytest.mark.parametrize("segments", ["output", "instruction", "all"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_kl_and_gradient_match_brute_force(kind, segments, packed, chunk_size):
    ids, segs, pos, policy, ref = batch(seed=chunk_size, packed=packed)
    mask = kl_mask(segs, pos, segments)
    expected_tok = brute_force_kl(policy, ref, ids, kind)
    p1 = policy.clone().double().requires_grad_(True)
    expected = (expected_tok.new_zeros(()) + (brute_force_kl(p1, ref, ids, kind) * mask).sum())
    expected.backward()

    p2 = policy.clone().requires_grad_(True)
    got_tok = token_kl(p2, lambda s, e: ref.flatten(0, 1)[s:e], ids, kind=kind, chunk_size=chunk_size)
    got = (got_tok * mask).sum()
    got.backward()
    torch.testing.assert_close(got_tok.double() * mask, expected_tok * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p2.grad.double(), p1.grad, rtol=1e-4, atol=1e-6)
    assert ref.grad is None


def test_mask_selects_segments_and_skips_packed_boundaries():
    segs = torch.tensor([[0, 2, 2, 3, 3, 0, 2, 3]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    assert kl_mask(segs, pos, "output").tolist() == [[False, False, True, True, False, False, True]]
    assert kl_mask(segs, pos, "instruction").tolist() == [[True, True, False, False, False, True, False]]
    segs_first_content = torch.tensor([[0, 2, 3, 3, 2, 3]])
    pos2 = torch.tensor([[0, 1, 2, 3, 0, 1]])
    # The first token of the second packed example (position 0) is never a target.
    assert kl_mask(segs_first_content, pos2, "all").tolist() == [[True, True, True, False, True]]


def test_full_kl_is_zero_for_identical_models_and_positive_otherwise():
    ids, segs, _, policy, ref = batch(seed=0, packed=False)
    same = token_kl(policy, lambda s, e: policy.flatten(0, 1)[s:e], ids)
    assert same.abs().max().item() < 1e-6
    assert (token_kl(policy, lambda s, e: ref.flatten(0, 1)[s:e], ids) > 0).all()


def test_chunked_matches_naive():
    ids, _, _, policy, ref = batch(seed=5, packed=False)
    for kind in ("full", "target_token"):
        torch.testing.assert_close(token_kl(policy, lambda s, e: ref.flatten(0, 1)[s:e], ids, kind=kind, chunk_size=5),
                                   naive_token_kl(policy, ref, ids, kind))


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
def test_loss_with_kl_term(normalisation):
    """loss = CE part + λ Σ m·kl / normaliser, with the same per-example scaling as the CE."""
    ids, segs, pos, policy, ref = batch(seed=9, packed=True)
    segs[:, 1] = Segment.OUTPUT
    table = weight_table(1.0, 1.0)
    reference = lambda s, e: ref.flatten(0, 1)[s:e]  # noqa: E731
    kl = token_kl(policy, reference, ids)
    mask = kl_mask(segs, pos, "output")
    base = segment_weighted_loss(policy, ids, segs, table, pos, normalisation)
    with_kl = segment_weighted_loss(policy, ids, segs, table, pos, normalisation, kl_reference=reference,
                                    kl_mask=mask, kl_coef=0.5)
    from instruction_modelling.core.losses import effective_weights, example_scale

    scale = example_scale(ids, segs, table, pos, normalisation)
    norm = effective_weights(ids, segs, table, pos, normalisation).sum()
    expected = base.loss + 0.5 * (kl * mask * scale).sum() / norm
    assert with_kl.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert with_kl.kl_sum.item() == pytest.approx((kl * mask).sum().item(), rel=1e-6)
    assert with_kl.kl_count.item() == mask.sum().item()


def test_target_token_variant_cancels_the_ce_gradient_at_lambda_1():
    """The released code's "KL" (target-token log-ratio) at λ=1 leaves no learning signal, while the
    full KL of Eq. 5 does not: why the paper's Table 3 says little about a real KL regulariser."""
    ids, segs, _, policy, ref = batch(seed=11, packed=False)
    segs[:, 1:-3] = Segment.OUTPUT
    table = weight_table(0.0, 1.0)
    grads = {}
    for kind in ("target_token", "full"):
        logits = policy.clone().requires_grad_(True)
        mask = kl_mask(segs, None, "output")
        loss = segment_weighted_loss(logits, ids, segs, table, kl_reference=lambda s, e: ref.flatten(0, 1)[s:e],
                                     kl_mask=mask, kl_coef=1.0, kl_type=kind).loss
        loss.backward()
        grads[kind] = logits.grad
    assert grads["target_token"].abs().max().item() < 1e-6
    assert grads["full"].abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", ["full", "target_token"])
def test_fused_ce_and_kl_pass_gradcheck(kind):
    from instruction_modelling.core.losses import token_losses

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g).requires_grad_(True)
    ref = torch.randn(2, 5, 7, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    reference = lambda s, e: ref.flatten(0, 1)[s:e]  # noqa: E731
    assert torch.autograd.gradcheck(lambda x: token_losses(x, targets, reference, kind, chunk_size=3), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_losses(x, targets, chunk_size=4)[0], (logits,))
