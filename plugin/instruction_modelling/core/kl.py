"""KL regularisation toward a reference (base) model, computed in chunks over the sequence.

Eq. 5 of Shi et al. (2024) adds ``λ Σ_t KL(pθ(·|x<t) ‖ p_ref(·|x<t))`` to the loss: the full KL over
the vocabulary, per target position. Two variants:

* ``full`` (Eq. 5): ``Σ_v pθ(v) (log pθ(v) − log p_ref(v))``.
* ``target_token``: ``log pθ(x_t) − log p_ref(x_t)`` at the data token, which is what the
  authors' released code computes. It is not a KL estimator (that would need samples from pθ),
  and at λ = 1 its gradient cancels the cross-entropy's exactly; it is here so that the paper's
  ablation can be re-run as released.

Memory: a full-vocabulary log-softmax of policy and reference in fp32 costs ``2·B·T·V·4`` bytes
(plus what autograd saves). The KL is computed by ``losses.token_losses`` together with the
cross-entropy, a chunk of positions at a time; the reference provides its logits per chunk
(its hidden states times its output embedding) and the backward pass recomputes each chunk and
writes the gradient of both terms into one buffer, so only one chunk's fp32 tensors exist at a
time and the KL adds no full-size tensor.

Pure PyTorch, no Axolotl import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import DEFAULT_CHUNK, LogitTransform, ReferenceHidden, ReferenceRows, segment_set, token_losses
from .segments import INSTRUCTION_SEGMENTS, OUTPUT_SEGMENTS, Segment

KL_SEGMENTS = {
    "output": OUTPUT_SEGMENTS,
    "instruction": INSTRUCTION_SEGMENTS,
    "all": INSTRUCTION_SEGMENTS + OUTPUT_SEGMENTS,
}



def kl_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor | None, segments: str) -> torch.Tensor:
    """Which targets ``[B, T-1]`` carry the KL penalty (independent of which carry CE)."""
    segs = segment_ids[:, 1:].long()
    chosen = segment_set(KL_SEGMENTS[segments], segs.device)
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
    reference: ReferenceRows,
    input_ids: torch.Tensor,
    kind: str = "full",
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-target KL ``[B, T-1]`` between the policy and the reference (chunked, see module doc).

    Args:
        policy_logits: ``[B, T, V]`` policy logits.
        reference: ``reference(start, end)`` returns the reference logits for rows
            ``start..end-1`` of the flattened ``[B·T]`` positions.
        input_ids: ``[B, T]``; targets are ``input_ids[:, 1:]`` (used by ``target_token``).
        kind: ``"full"`` or ``"target_token"``.

    Example:
        >>> kl = token_kl(logits, lambda s, e: ref_logits.flatten(0, 1)[s:e], ids)  # doctest: +SKIP
    """
    padded = F.pad(input_ids[:, 1:], (0, 1), value=0)
    return token_losses(policy_logits, padded, reference, kind, chunk_size)[1][:, :-1]


class EvalMode:
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


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The module a PEFT wrapper computes with when its adapters are disabled: the original module
    of a ``modules_to_save`` copy, the base layer of a LoRA layer, else ``module`` itself.

    Resolving it once replaces entering ``disable_adapter()`` (which walks every module of the
    model) around every chunk's head call.
    """
    if hasattr(module, "original_module"):  # peft ModulesToSaveWrapper
        return module.original_module
    if hasattr(module, "get_base_layer"):  # peft BaseTunerLayer (LoRA, ...)
        return module.get_base_layer()
    return module


class AdapterReference:
    """The policy itself with its PEFT adapters disabled: the base model, at no extra memory.

    Adapters are disabled once per step, for the backbone's forward pass; the reference logits of
    each chunk come from those hidden states and the head's base layer (``base_layer``), so the
    per-chunk loop never toggles adapters.

    Args:
        model: the (unwrapped) ``peft.PeftModel`` being trained.
        transform: what the model does to the head's output (softcapping, scaling).
    """

    mode = "adapter"

    def __init__(self, model: torch.nn.Module, transform: LogitTransform = LogitTransform()):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("im_kl_reference: adapter needs a PEFT model (adapter: lora or qlora)")
        self.model = model
        self.transform = transform

    def __call__(self, forward_inputs: dict) -> ReferenceHidden:
        """Run the reference backbone once; return ``reference(start, end)`` over flat positions."""
        backbone, head = _backbone_and_head(self.model)
        head = base_layer(head)  # an adapted lm_head must be bypassed too
        with torch.no_grad(), self.model.disable_adapter(), EvalMode(self.model):
            hidden = backbone(**forward_inputs, use_cache=False).last_hidden_state
        return ReferenceHidden(hidden.reshape(-1, hidden.shape[-1]), head, self.transform)


class CopyReference:
    """A frozen copy of the model taken before training (full fine-tuning).

    Args:
        model: a module to use as the reference as it is (already frozen and in eval mode), e.g.
            ``CopyReference.frozen_copy(policy)`` or a separately loaded base model.
        transform: what the model does to the head's output (softcapping, scaling).
    """

    mode = "copy"

    def __init__(self, model: torch.nn.Module, transform: LogitTransform = LogitTransform()):
        self.model = model
        self.transform = transform

    @staticmethod
    def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        import copy

        ref = copy.deepcopy(model)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    def __call__(self, forward_inputs: dict) -> ReferenceHidden:
        backbone, head = _backbone_and_head(self.model)
        with torch.no_grad():
            hidden = backbone(**forward_inputs, use_cache=False).last_hidden_state
        return ReferenceHidden(hidden.reshape(-1, hidden.shape[-1]), head, self.transform)


def naive_token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, input_ids: torch.Tensor,
                   kind: str = "full") -> torch.Tensor:
    """Unchunked reference implementation (whole fp32 log-softmaxes): for tests and benchmarks."""
    return _chunk_kl(policy_logits[:, :-1], reference_logits[:, :-1].detach(), input_ids[:, 1:], kind)
