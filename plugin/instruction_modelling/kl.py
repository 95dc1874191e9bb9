"""KL regularisation toward a reference (base) model, computed in chunks over the sequence.

Eq. 5 of Shi et al. (2024) adds ``λ Σ_t KL(pθ(·|x<t) ‖ p_ref(·|x<t))`` to the loss: the full KL over
the vocabulary, per target position. Two variants:

* ``full`` (Eq. 5): ``Σ_v pθ(v) (log pθ(v) − log p_ref(v))``.
* ``target_token``: ``log pθ(x_t) − log p_ref(x_t)`` at the data token, which is what the
  authors' released code computes. It is not a KL estimator (that would need samples from pθ),
  and at λ = 1 its gradient cancels the cross-entropy's exactly; it is here so that the paper's
  ablation can be re-run as released.

Memory: a full-vocabulary log-softmax of policy and reference in fp32 costs ``2·B·T·V·4`` bytes
(plus what autograd saves). ``token_kl`` never materialises them whole: it walks the sequence in
chunks, asks ``reference(start, end)`` for that chunk's reference logits (e.g. the reference's
hidden states times its output embedding), and recomputes each chunk in the backward pass
(activation checkpointing), so only one chunk's fp32 tensors exist at a time.

Pure PyTorch, no Axolotl import.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .segments import INSTRUCTION_SEGMENTS, OUTPUT_SEGMENTS, Segment

KL_TYPES = ("full", "target_token")
KL_SEGMENTS = {
    "output": OUTPUT_SEGMENTS,
    "instruction": INSTRUCTION_SEGMENTS,
    "all": INSTRUCTION_SEGMENTS + OUTPUT_SEGMENTS,
}

ReferenceLogits = Callable[[int, int], torch.Tensor]


def kl_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor | None, segments: str) -> torch.Tensor:
    """Which targets ``[B, T-1]`` carry the KL penalty (independent of which carry CE)."""
    segs = segment_ids[:, 1:].long()
    chosen = torch.tensor(KL_SEGMENTS[segments], device=segs.device)
    mask = torch.isin(segs, chosen) & (segs != Segment.TEMPLATE)
    if position_ids is not None:
        mask = mask & (position_ids[:, 1:] != 0)
    return mask


def _chunk_kl(policy: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    logp = policy.float().log_softmax(-1)
    logq = ref.float().log_softmax(-1)
    if kind == "full":
        return (logp.exp() * (logp - logq)).sum(-1)
    t = targets.unsqueeze(-1)
    return (logp.gather(-1, t) - logq.gather(-1, t)).squeeze(-1)


def token_kl(
    policy_logits: torch.Tensor,
    reference: ReferenceLogits,
    input_ids: torch.Tensor,
    kind: str = "full",
    chunk_size: int = 128,
) -> torch.Tensor:
    """Per-target KL ``[B, T-1]`` between the policy and the reference.

    Args:
        policy_logits: ``[B, T, V]`` policy logits (any dtype; upcast per chunk).
        reference: ``reference(start, end)`` returns the reference logits ``[B, end-start, V]``
            for positions ``start..end-1``. Called under ``no_grad``; it may be called twice per
            chunk (forward and recomputation in backward) and must return the same values.
        input_ids: ``[B, T]``; targets are ``input_ids[:, 1:]`` (used by ``target_token``).
        kind: ``"full"`` or ``"target_token"``.
        chunk_size: positions per chunk.

    Returns:
        ``[B, T-1]`` KL per target (unmasked; multiply by ``kl_mask``).

    Example:
        >>> kl = token_kl(policy_logits, lambda s, e: ref_logits[:, s:e], ids)  # doctest: +SKIP
    """
    if kind not in KL_TYPES:
        raise ValueError(f"unknown KL type {kind!r}; expected one of {KL_TYPES}")
    n = policy_logits.shape[1] - 1
    targets = input_ids[:, 1:]
    pieces = []
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)

        def chunk(pol: torch.Tensor, tgt: torch.Tensor, s: int = s, e: int = e) -> torch.Tensor:
            with torch.no_grad():
                ref = reference(s, e)
            return _chunk_kl(pol, ref, tgt, kind)

        pol = policy_logits[:, s:e]
        if pol.requires_grad and torch.is_grad_enabled():
            pieces.append(checkpoint(chunk, pol, targets[:, s:e], use_reentrant=False))
        else:
            pieces.append(chunk(pol, targets[:, s:e]))
    return torch.cat(pieces, dim=1)


class _EvalMode:
    """Put a module in eval mode (no dropout, no NEFTune noise) and restore it afterwards."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _backbone_and_head(model: torch.nn.Module):
    if not hasattr(model, "get_decoder") and hasattr(model, "module"):
        model = model.module  # a DeepSpeed engine wrapping the reference (ZeRO-3 gathers per module)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class AdapterReference:
    """The policy itself with its PEFT adapters disabled: the base model, at no extra memory.

    Args:
        model: the (unwrapped) ``peft.PeftModel`` being trained.
    """

    mode = "adapter"

    def __init__(self, model: torch.nn.Module):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("im_kl_reference: adapter needs a PEFT model (adapter: lora or qlora)")
        self.model = model

    def __call__(self, forward_inputs: dict) -> ReferenceLogits:
        """Run the reference backbone once; return ``reference(start, end)`` for ``token_kl``."""
        backbone, head = _backbone_and_head(self.model)
        with torch.no_grad(), self.model.disable_adapter(), _EvalMode(self.model):
            hidden = backbone(**forward_inputs, use_cache=False).last_hidden_state

        def reference(start: int, end: int) -> torch.Tensor:
            with self.model.disable_adapter():  # an adapted lm_head must be bypassed too
                return head(hidden[:, start:end])

        return reference


class CopyReference:
    """A frozen copy of the model taken before training (full fine-tuning).

    Args:
        model: a module to use as the reference as it is (already frozen and in eval mode), e.g.
            ``CopyReference.frozen_copy(policy)`` or a separately loaded base model.
    """

    mode = "copy"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @staticmethod
    def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        import copy

        ref = copy.deepcopy(model)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    def __call__(self, forward_inputs: dict) -> ReferenceLogits:
        backbone, head = _backbone_and_head(self.model)
        with torch.no_grad():
            hidden = backbone(**forward_inputs, use_cache=False).last_hidden_state
        return lambda start, end: head(hidden[:, start:end])


def naive_token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, input_ids: torch.Tensor,
                   kind: str = "full") -> torch.Tensor:
    """Unchunked reference implementation (whole fp32 log-softmaxes): for tests and benchmarks."""
    return _chunk_kl(policy_logits[:, :-1], reference_logits[:, :-1].detach(), input_ids[:, 1:], kind)
