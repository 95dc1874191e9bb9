"""Segment-weighted causal-LM loss, exact under gradient accumulation and sample packing.

Pure PyTorch, no Axolotl import. Targets are the next tokens of ``input_ids``; which of them
carry loss, and how much, is decided by ``segment_ids`` (see ``segments.Segment``) and a small
weight table, never by ``labels``. Normalisations (``NORMALISATIONS``; docs/weighting.md has
each formula with its source):

* ``token`` (Axolotl's default): ``loss = Σ_t w_t·ce_t / Σ_t w_t`` over every target of the
  whole gradient-accumulation window (and all data-parallel ranks). With weights 1/1 (IM) or
  0/1 (IT) this is the usual mean over trained tokens; fractional weights give a weighted mean,
  so the loss stays on the cross-entropy scale (PLW, Huerta-Enochian & Ko 2024, Eq. 2).
* ``nonzero`` (Weighted Instruction Tuning, WIT): ``loss = Σ_t w_t·ce_t / #{t : w_t > 0}``, so
  an output weight below 1 also lowers the loss's scale (the effective learning rate under SGD;
  under AdamW a constant scale cancels, see docs/weighting.md).
* ``sequence`` (per-example averaging, what the paper's batch-size-1 runs did): each example's
  loss is its own weighted mean, and the batch loss is the mean over examples.
* ``share`` (GoLLIE's prompt-loss share): ``loss = (1−α)·mean_output + α·mean_instruction``,
  each mean over the window's output (instruction) targets, weighted by the segment weights
  within its group; the normaliser is the pair ``[Σ_instruction w, Σ_output w]``.
* ``example_share`` (GoLLIE as its code runs): per example, prompt targets get the weight
  ``α/(1−α) · R_e/P_e`` (``R_e``, ``P_e``: the example's summed output and prompt weights), output
  targets 1; ``loss = Σ_t w_t·ce_t / Σ_t w_t`` over the window.

The prompt side is everything that is not output: instruction content, and template tokens when
``template`` has a weight. ``count_first_token`` adds each example's first token (never a
target) to the counts where its source's loop counts it: WIT's ``#{w ≠ 0}``, GoLLIE's ``P_e``.

A micro-batch returns ``Σ (effective weight · ce) / normaliser`` where the normaliser is the
window total (``loss_normaliser`` summed over micro-batches), so summing the micro-batch
losses of a window gives exactly the loss of the whole window: gradient accumulation 1 vs 4
gives the same loss and gradients.

Packed rows (several examples concatenated, ``position_ids`` restarting at 0) are handled by
never predicting the first token of an example from the previous one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .segments import INSTRUCTION_SEGMENTS, OUTPUT_SEGMENTS, WEIGHT_KEY_SEGMENT, Segment

NORMALISATIONS = ("token", "nonzero", "sequence", "share", "example_share")
SHARE_NORMALISATIONS = ("share", "example_share")  # α = instruction_share sets the prompt/output balance
FIRST_TOKEN_NORMALISATIONS = ("nonzero", "example_share")  # where count_first_token changes a count


def weight_table(
    instruction_weight: float,
    output_weight: float,
    role_weights: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Loss weight per ``Segment`` id (index = segment id; template 0 unless overridden, padding always 0).

    Args:
        instruction_weight: weight of system, user and tool content.
        output_weight: weight of assistant content (and reasoning) and its end-of-turn token.
        role_weights: per-role overrides, keys ``system``, ``user``, ``assistant``, ``tool``,
            ``reasoning`` and ``template`` (BOS, role tags, separators).

    Example:
        >>> weight_table(1.0, 1.0).tolist()   # IM
        [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
        >>> weight_table(0.0, 1.0, {"system": 0.5}).tolist()
        [0.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0]
        >>> weight_table(0.4, 0.6, {"template": 0.4}).tolist()   # WIT as run: the template is prompt
        [0.4000000059604645, 0.4000000059604645, 0.4000000059604645, 0.6000000238418579, 0.4000000059604645, 0.6000000238418579, 0.0]
    """
    table = torch.zeros(len(Segment), dtype=torch.float32)
    for seg in INSTRUCTION_SEGMENTS:
        table[seg] = instruction_weight
    for seg in OUTPUT_SEGMENTS:
        table[seg] = output_weight
    for role, w in (role_weights or {}).items():
        table[WEIGHT_KEY_SEGMENT[role]] = w
    table[Segment.PAD] = 0.0
    return table


_SEGMENT_SETS: dict = {}


def segment_set(segments, device: torch.device) -> torch.Tensor:
    """``torch.tensor(segments)`` on ``device``, made once: a host-to-device copy per micro-batch
    would synchronise the GPU."""
    key = (tuple(int(s) for s in segments), str(device))
    if key not in _SEGMENT_SETS:
        _SEGMENT_SETS[key] = torch.tensor(key[0], device=device)
    return _SEGMENT_SETS[key]


_SHARE_PAIRS: dict = {}


def _share_pair(alpha: float, device: torch.device) -> torch.Tensor:
    """``[α, 1 − α]`` on ``device``, made once per (α, device): see ``segment_set``."""
    key = (float(alpha), str(device))
    if key not in _SHARE_PAIRS:
        _SHARE_PAIRS[key] = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float32, device=device)
    return _SHARE_PAIRS[key]


def _shifted(input_ids: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor | None):
    """Targets, their segments and validity for next-token prediction, shape ``[B, T-1]``."""
    targets = input_ids[:, 1:]
    segs = segment_ids[:, 1:].long()
    valid = segs != Segment.PAD
    if position_ids is not None:
        # A token at position 0 starts a new packed example: it is not predicted from the previous one.
        valid = valid & (position_ids[:, 1:] != 0)
    return targets, segs, valid


def _example_ids(segment_ids: torch.Tensor, position_ids: torch.Tensor | None, shifted: bool = True) -> torch.Tensor:
    """Example index of every target ``[B, T-1]`` (of every token ``[B, T]`` with ``shifted=False``),
    unique across the batch."""
    bsz, seqlen = segment_ids.shape
    if position_ids is None:
        ids = torch.arange(bsz, device=segment_ids.device).unsqueeze(1).expand(bsz, seqlen)
    else:
        starts = (position_ids == 0).long()
        starts[:, 0] = 1
        per_row = torch.cumsum(starts, dim=1) - 1  # 0.. within each row
        offset = torch.cumsum(per_row[:, -1] + 1, dim=0) - (per_row[:, -1] + 1)
        ids = per_row + offset.unsqueeze(1)
    return ids[:, 1:] if shifted else ids


def _segment_weights(input_ids, segment_ids, table, position_ids) -> torch.Tensor:
    """The segment weight of every valid target ``[B, T-1]`` (0 for padding and packed-example
    boundaries; 0 for template targets unless the table weights them)."""
    _, segs, valid = _shifted(input_ids, segment_ids, position_ids)
    return table.to(device=segs.device)[segs] * valid


def _first_token_weights(segment_ids, table, position_ids) -> torch.Tensor:
    """``[B, T]``: the segment weight of each example's first token (never a target), 0 elsewhere.
    An example starts at column 0 and, in packed rows, wherever ``position_ids`` restarts at 0."""
    first = torch.zeros_like(segment_ids, dtype=torch.bool)
    first[:, 0] = True
    if position_ids is not None:
        first = first | (position_ids == 0)
    return table.to(device=segment_ids.device)[segment_ids.long()] * first


def _is_instruction(segs: torch.Tensor) -> torch.Tensor:
    return torch.isin(segs, segment_set(INSTRUCTION_SEGMENTS, segs.device))


def _is_output(segs: torch.Tensor) -> torch.Tensor:
    return torch.isin(segs, segment_set(OUTPUT_SEGMENTS, segs.device))


def _per_example_sum(values: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    """Σ of ``values`` over each example, read back at every position of ``ex``'s shape. Sized by
    the static bound (an example per position), not ``ex.max()``: no host sync."""
    totals = torch.zeros(values.numel() + ex.shape[0], dtype=values.dtype, device=values.device)
    return totals.scatter_add_(0, ex.flatten(), values.flatten())[ex]


def _scale(w: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor | None, normalisation: str,
           table: torch.Tensor | None = None, instruction_share: float = 0.0, count_first_token: bool = False):
    """Per-target factor applied to the segment weight before the window normaliser divides it."""
    if normalisation in ("token", "nonzero", "share"):
        return torch.ones_like(w)
    if normalisation not in ("sequence", "example_share"):
        raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {NORMALISATIONS}")
    full = _example_ids(segment_ids, position_ids, shifted=False)
    ex = full[:, 1:]
    if normalisation == "sequence":
        denom = _per_example_sum(w, ex)
        return torch.where(denom > 0, 1.0 / denom.clamp_min(1e-12), torch.zeros_like(denom))
    # example_share (GoLLIE's dataset.py): prompt weight α/(1−α)·R_e/P_e, output weight 1.
    out = _is_output(segment_ids[:, 1:].long())
    r_e = _per_example_sum(w * out, ex)
    p_e = _per_example_sum(w * ~out, ex)
    if count_first_token:  # GoLLIE's prompt length counts the first token (BOS), never a target
        first = _first_token_weights(segment_ids, table, position_ids)
        p_e = p_e + _per_example_sum(first * ~_is_output(segment_ids.long()), full)[:, 1:]
    alpha = float(instruction_share)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"example_share needs instruction_share in [0, 1), got {alpha}: at 1 no output weight is left")
    rho = torch.where(p_e > 0, (alpha / (1.0 - alpha)) * r_e / p_e.clamp_min(1e-12), torch.zeros_like(p_e))
    return torch.where(out, torch.ones_like(w), rho)


def example_scale(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    table: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    normalisation: str = "token",
    instruction_share: float = 0.0,
    count_first_token: bool = False,
) -> torch.Tensor:
    """Per-target factor ``[B, T-1]`` that turns token sums into this normalisation's sums:
    1 for ``token``; ``1 / Σ w`` of the target's example for ``sequence`` (0 where that is 0);
    for ``example_share`` the example's prompt factor ``α/(1−α)·R_e/P_e`` on prompt targets, 1 on
    output targets."""
    w = _segment_weights(input_ids, segment_ids, table, position_ids)
    return _scale(w, segment_ids, position_ids, normalisation, table, instruction_share, count_first_token)


def effective_weights(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    table: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    normalisation: str = "token",
    instruction_share: float = 0.0,
    count_first_token: bool = False,
) -> torch.Tensor:
    """Per-target weights ``[B, T-1]`` whose sum over a window, divided by the window's
    ``loss_normaliser``, gives the loss (``share`` divides each group by its own total instead,
    see ``target_coefficients``).

    ``token``, ``nonzero``, ``share``: the segment weight. ``sequence``: the segment weight
    divided by the summed weight of the target's example, so every example with any weight
    contributes 1. ``example_share``: the segment weight times ``example_scale``.
    """
    w = _segment_weights(input_ids, segment_ids, table, position_ids)
    return w * _scale(w, segment_ids, position_ids, normalisation, table, instruction_share, count_first_token)


def loss_normaliser(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    table: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    normalisation: str = "token",
    instruction_share: float = 0.0,
    count_first_token: bool = False,
) -> torch.Tensor:
    """What one micro-batch adds to the window's normaliser (window total = elementwise sum).

    Args:
        count_first_token: ``nonzero`` also counts each example's first token when its own weight
            is not 0 (WIT's loop counts every token whose label is not IGNORE_INDEX, the first one
            included, though it is never predicted); ``example_share`` counts it in ``P_e``.

    Returns:
        shape ``[]``: ``Σ w`` (token, example_share: of the effective weights), the number of
        targets with ``w > 0`` (nonzero) or the number of examples with any weight (sequence);
        shape ``[2]`` for share: ``[Σ w over prompt targets, Σ w over output targets]``.
    """
    seg_w = _segment_weights(input_ids, segment_ids, table, position_ids)
    if normalisation == "nonzero":
        count = (seg_w > 0).sum()
        if count_first_token:
            count = count + (_first_token_weights(segment_ids, table, position_ids) > 0).sum()
        return count.to(seg_w.dtype)
    if normalisation == "share":
        _, segs, _ = _shifted(input_ids, segment_ids, position_ids)
        out = _is_output(segs)
        return torch.stack([(seg_w * ~out).sum(), (seg_w * out).sum()])
    return (seg_w * _scale(seg_w, segment_ids, position_ids, normalisation, table, instruction_share,
                           count_first_token)).sum()


@dataclass
class LossCoefficients:
    """How each target enters the loss: ``loss = Σ ce·ce_coef + λ Σ kl·kl_coef``.

    Attributes:
        ce_coef: ``[B, T-1]`` coefficient of every target's cross-entropy (0 for untrained targets).
        kl_coef: ``[B, T-1]`` factor for the KL of every target before its mask and λ (the
            per-example scale divided by the window normaliser).
    """

    ce_coef: torch.Tensor
    kl_coef: torch.Tensor


def target_coefficients(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    table: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    normalisation: str = "token",
    normaliser: torch.Tensor | float | None = None,
    instruction_share: float = 0.0,
    count_first_token: bool = False,
) -> LossCoefficients:
    """The one place that turns segments, weights and the window normaliser into the loss's
    per-target coefficients; every loss implementation (logits, chunked hidden states, kernels)
    multiplies its per-target CE by ``ce_coef`` and sums.

    Args:
        normaliser: the window's total of ``loss_normaliser`` (summed over micro-batches and
            data-parallel ranks; any shape ``loss_normaliser`` returns); defaults to this batch's own.
        instruction_share: α of the ``share`` and ``example_share`` normalisations (ignored by the others).
        count_first_token: see ``loss_normaliser``.

    Returns:
        ``LossCoefficients``. Under ``share`` a group (instruction or output) with a zero
        window total contributes nothing, and ``kl_coef`` is zero (KL is refused under share).
    """
    seg_w = _segment_weights(input_ids, segment_ids, table, position_ids)
    scale = _scale(seg_w, segment_ids, position_ids, normalisation, table, instruction_share, count_first_token)
    w = seg_w * scale  # = effective_weights(...)
    if normaliser is None:
        normaliser = loss_normaliser(input_ids, segment_ids, table, position_ids, normalisation, instruction_share,
                                     count_first_token)
    normaliser = torch.as_tensor(normaliser, dtype=torch.float32, device=w.device).detach()
    if normalisation == "share":
        if normaliser.shape != (2,):
            raise ValueError(f"the share normalisation needs the [instruction, output] normaliser pair, got shape {tuple(normaliser.shape)}")
        _, segs, _ = _shifted(input_ids, segment_ids, position_ids)
        shares = _share_pair(instruction_share, w.device)
        per_group = torch.where(normaliser > 0, shares / normaliser.clamp_min(1e-12), torch.zeros_like(shares))
        coef = torch.where(_is_output(segs), per_group[1], per_group[0])
        return LossCoefficients(ce_coef=w * coef, kl_coef=torch.zeros_like(w))
    normaliser = normaliser.clamp_min(1e-12)
    return LossCoefficients(ce_coef=w / normaliser, kl_coef=scale / normaliser)


@dataclass
class SegmentLoss:
    """Result of ``segment_weighted_loss``.

    Attributes:
        loss: scalar to back-propagate (already divided by the normaliser).
        instruction_sum, instruction_count: summed CE and count over instruction targets
            (unweighted; measured even when their weight is 0, as under IT).
        output_sum, output_count: the same over output targets.
        kl_sum, kl_count: summed KL and count over the KL-masked targets (when ``kl`` is given).
        template_sum, template_count: the same over template targets (BOS excepted: never a target).
    """

    loss: torch.Tensor
    instruction_sum: torch.Tensor
    instruction_count: torch.Tensor
    output_sum: torch.Tensor
    output_count: torch.Tensor
    kl_sum: torch.Tensor | None = None
    kl_count: torch.Tensor | None = None
    template_sum: torch.Tensor | None = None
    template_count: torch.Tensor | None = None


ReferenceRows = Callable[[int, int], torch.Tensor]
"""``reference(start, end)``: the reference logits of rows ``start..end-1`` of the flat positions."""
KL_TYPES = ("full", "target_token")
DEFAULT_CHUNK = 256


class _TokenLosses(torch.autograd.Function):
    """Per-token CE (and KL to a reference) over a flat ``[N, V]`` logits view, in chunks.

    Forward and backward each walk the rows ``chunk`` at a time, with only that chunk upcast to
    fp32; the backward recomputes the chunk's log-softmax and writes the analytic gradient of
    both terms straight into one gradient buffer. Nothing of size ``N × V`` is stored besides the
    logits the model returned (autograd's slicing would allocate a full-size gradient per chunk).
    """

    @staticmethod
    def forward(ctx, logits, targets, reference, kind, chunk):
        n = logits.shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        ce = torch.empty(n, dtype=dtype, device=logits.device)
        kl = torch.zeros(n if reference is not None else 0, dtype=dtype, device=logits.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logp = logits[s:e].to(dtype).log_softmax(-1)
            logq = reference(s, e).to(dtype).log_softmax(-1) if reference is not None else None
            c, k, _ = _chunk_terms(logp, targets[s:e].unsqueeze(-1), logq, kind)
            ce[s:e] = c
            if k is not None:
                kl[s:e] = k
        ctx.save_for_backward(logits, targets)
        ctx.reference, ctx.kind, ctx.chunk = reference, kind, chunk
        if reference is None:
            ctx.mark_non_differentiable(kl)
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        logits, targets = ctx.saved_tensors
        reference = ctx.reference
        grad = torch.empty_like(logits)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, logits.shape[0])
            logp = logits[s:e].to(dtype).log_softmax(-1)
            with torch.no_grad():
                logq = reference(s, e).to(dtype).log_softmax(-1) if reference is not None else None
            g = _chunk_terms(logp, targets[s:e].unsqueeze(-1), logq, ctx.kind,
                             grad_ce[s:e] if grad_ce is not None else None,
                             grad_kl[s:e] if grad_kl is not None and grad_kl.numel() else None, want_grad=True)[2]
            grad[s:e] = g.to(grad.dtype)
        return grad, None, None, None, None


def token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reference: ReferenceRows | None = None,
    kl_type: str = "full",
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position cross-entropy and, optionally, KL to a reference, both ``[B, T]``.

    Args:
        logits: ``[B, T, V]`` (any dtype; each chunk is upcast to fp32).
        targets: ``[B, T]`` token ids scored at each position.
        reference: ``reference(start, end)`` returns the reference logits ``[end-start, V]`` for
            rows ``start..end-1`` of the flattened ``[B·T]`` positions (e.g. the reference's
            hidden states times its output embedding). Called under ``no_grad``, once in forward
            and once in backward; it must return the same values both times.
        kl_type: ``full`` (KL(p‖q) over the vocabulary, Eq. 5) or ``target_token``
            (``log p(t) − log q(t)``, the released code's variant).
        chunk_size: positions per chunk (only one chunk's fp32 tensors exist at a time).

    Returns:
        ``(ce, kl)``; ``kl`` is None without a reference.
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown KL type {kl_type!r}; expected one of {KL_TYPES}")
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    ce, kl = _TokenLosses.apply(flat, targets.reshape(-1), reference, kl_type, chunk_size)
    return ce.view(shape), (kl.view(shape) if reference is not None else None)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head``'s output before the softmax, in the model's own order:
    ``z = raw * multiplier / divisor``, then ``z = softcap · tanh(z / softcap)``.

    Cohere's ``logit_scale`` is a multiplier, Granite's ``logits_scaling`` a divisor, Gemma-2/3's
    ``final_logit_softcapping`` a softcap. Applied with the same operations as transformers so the
    hidden-state path reproduces the model's logits bit for bit.
    """

    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.multiplier is not None:
            z = z * self.multiplier
        if self.divisor is not None:
            z = z / self.divisor
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    @property
    def is_identity(self) -> bool:
        return self.multiplier is None and self.divisor is None and self.softcap is None


def _plain_linear(head: torch.nn.Module, transform: LogitTransform) -> bool:
    return type(head) is torch.nn.Linear and transform.is_identity


def _linear_into(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``F.linear(h, weight, bias)`` written into ``out`` (no grad)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _linear_params(head: torch.nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's detached weight and bias in ``dtype``, the dtype its input is computed in: an fp32
    head applied to bf16 hidden states (QLoRA's ``prepare_model_for_kbit_training`` upcasts the head,
    Gemma-style norms return the input's dtype) runs in bf16 under the model's autocast, which casts
    the weight once per forward; so is it here, once per call, not per chunk."""
    w, b = head.weight.detach(), head.bias.detach() if head.bias is not None else None
    return w.to(dtype), (b.to(dtype) if b is not None else None)


def compute_dtype(hidden_dtype: torch.dtype, head: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the model's own forward applies its output layer in: the autocast dtype when that
    forward ran under autocast (HF's Trainer runs the model's forward, not the loss, under
    accelerate's autocast), else the hidden states' and the head weight's common dtype
    (``torch.promote_types``; equal dtypes in every model that runs without autocast)."""
    if autocast_dtype is not None:
        return autocast_dtype
    weight = getattr(head, "weight", None)
    return torch.promote_types(hidden_dtype, weight.dtype) if isinstance(weight, torch.Tensor) else hidden_dtype


def _autocast_like(h: torch.Tensor, head: torch.nn.Module):
    """Autocast to ``h``'s dtype around a head (LoRA-adapted, ``modules_to_save``) whose parameters
    are in another dtype, as the model's forward ran it; a no-op otherwise."""
    low = h.dtype in (torch.float16, torch.bfloat16)
    if low and any(p.is_floating_point() and p.dtype != h.dtype for p in head.parameters()):
        return torch.autocast(h.device.type, dtype=h.dtype)
    return contextlib.nullcontext()


@dataclass
class KLRows:
    """Where the KL is computed: the flat positions (ascending) and how many fall in each chunk, as
    host integers (they size the work)."""

    index: torch.Tensor
    per_chunk: list[int]


def kl_chunk_counts(rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """How many of ``rows`` (bool, any shape, flattened as the loss flattens it) fall in each chunk
    of ``chunk`` positions; on the device (the trainer brings a whole step's counts to the host at once)."""
    flat = rows.reshape(-1).to(torch.int32)
    return F.pad(flat, (0, (-flat.numel()) % chunk)).view(-1, chunk).sum(1)


def _kl_rows(rows: torch.Tensor, chunk: int, per_chunk: list[int] | None = None) -> KLRows:
    """``KLRows`` of a flat bool mask, with no host sync when ``per_chunk`` is given (else one:
    ``nonzero`` and a per-chunk ``tolist`` took two per micro-batch)."""
    if per_chunk is None:
        per_chunk = kl_chunk_counts(rows, chunk).tolist()
    # Stable sort puts the set positions first, in order: their index without nonzero's sync.
    order = torch.argsort((~rows).to(torch.uint8), stable=True)
    return KLRows(order[:sum(per_chunk)], per_chunk)


_ADDMM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_exact: torch.Tensor | None = None) -> None:
    """``acc += a @ b`` with the product kept in ``acc``'s dtype (fp32 when ``a``/``b`` are bf16):
    rounding each chunk's product to bf16 before adding it makes the error grow with √chunks.

    On CUDA the bf16 GEMM writes fp32 directly (``addmm(out_dtype=)``, torch >= 2.8, as Liger's
    ``accum_dtype`` does); elsewhere the chunk is upcast (``a_exact``: ``a`` before it was rounded).
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _ADDMM_OUT_DTYPE and a.dtype == b.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_((a_exact if a_exact is not None else a).to(acc.dtype), b.to(acc.dtype))


@dataclass
class ReferenceHidden:
    """``ReferenceRows`` from a reference model's final hidden states ``[N, D]`` and output layer:
    each chunk's logits are computed when asked for, so the reference never holds ``[N, V]``.

    ``kl.AdapterReference`` and ``kl.CopyReference`` return one. ``rows(index, out)`` projects only
    the positions asked for, into ``out`` (a buffer of ``out_dtype``) when the head is a plain
    ``nn.Linear``.
    """

    hidden: torch.Tensor
    head: torch.nn.Module
    transform: LogitTransform = LogitTransform()
    _params: tuple | None = field(default=None, init=False, repr=False)

    @property
    def out_dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def __call__(self, start: int, end: int) -> torch.Tensor:
        return self._project(self.hidden[start:end])

    def rows(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The reference logits of the flat positions ``index``."""
        return self._project(self.hidden.index_select(0, index), out)

    def _project(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if type(self.head) is torch.nn.Linear:
                if self._params is None or self._params[0].dtype != h.dtype:
                    self._params = _linear_params(self.head, h.dtype)  # once per micro-batch
                if out is not None and self.transform.is_identity:
                    return _linear_into(h, *self._params, out)
                return self.transform(F.linear(h, *self._params))
            with _autocast_like(h, self.head):
                return self.transform(self.head(h))


def _chunk_terms(logp, t, logq, kind, grad_ce=None, grad_kl=None, want_grad=False):
    """Per-row CE and KL of one chunk and, with ``want_grad``, the analytic gradient ``[c, V]`` of
    ``Σ grad_ce·ce + Σ grad_kl·kl`` with respect to the chunk's logits (the logits path; the
    hidden-state path calls ``_kl_terms`` and ``_ce_grad`` itself, on the KL rows only).

    ``logp`` / ``logq`` are the chunk's fp32 log-softmaxes and belong to the caller: with a full KL
    both are overwritten.

    Returns:
        ``(ce, kl, grad)``: ``kl`` is None without a reference, ``grad`` None unless ``want_grad``.
    """
    ce = -logp.gather(-1, t).squeeze(-1)
    kl = g_kl = p = None
    if want_grad or (logq is not None and kind == "full"):
        p = logp.exp()
    if logq is not None:
        kl, g_kl = _kl_terms(logp, logq, p, t, kind, grad_kl if want_grad else None)
    if not want_grad:
        return ce, kl, None
    g = _ce_grad(p, t, grad_ce)
    return ce, kl, g if g_kl is None else g.add_(g_kl)


def _ce_grad(p, t, grad_ce):
    """Gradient ``[c, V]`` of ``Σ grad_ce·(−log p_t)`` with respect to the logits,
    ``grad_ce·(p − onehot(t))``, written over ``p``."""
    if grad_ce is None:
        return p.zero_()
    g = grad_ce.unsqueeze(-1)
    return p.mul_(g).scatter_add_(-1, t, -g)


def _kl_terms(logp, logq, p, t, kind, weight=None):
    """KL per row of chunk rows that carry it, and (given ``weight``) the gradient ``[k, V]`` of
    ``Σ weight·kl`` with respect to their logits, written over ``logq``.

    ``logp`` / ``p`` are the policy's log-probabilities and probabilities (``logp`` is overwritten
    by a full KL), ``logq`` the reference's log-probabilities.
    """
    if kind == "full":
        diff = torch.sub(logp, logq, out=logq)  # log p − log q
        kl = torch.mul(p, diff, out=logp).sum(-1)
        if weight is None:
            return kl, None
        # d KL(p‖q)/dz = p ⊙ (log p − log q − KL)
        return kl, diff.sub_(kl.unsqueeze(-1)).mul_(weight.unsqueeze(-1)).mul_(p)
    kl = (logp.gather(-1, t) - logq.gather(-1, t)).squeeze(-1)
    if weight is None:
        return kl, None
    w = weight.unsqueeze(-1)
    g = torch.mul(p, -w, out=logq)  # d(log p_t − log q_t)/dz = onehot(t) − p
    return kl, g.scatter_add_(-1, t, w)


class _Scratch:
    """Per-call ``[chunk, V]`` buffers, reused by every chunk: on the CPU each fresh 10–100 MB
    tensor costs page faults (as much as a pass over it); on CUDA this only saves allocator calls."""

    def __init__(self):
        self.buffers = {}

    def get(self, name, rows, cols, dtype, device):
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1] != cols or buf.shape[0] < rows or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(rows, cols, dtype=dtype, device=device)
        return buf[:rows]


def _log_softmax_into(z, out):
    """``log_softmax(z)`` in ``out``'s dtype (fp32) written into ``out``."""
    if z.dtype != out.dtype:
        z = z.to(out.dtype)
    return torch.ops.aten._log_softmax.out(z, -1, False, out=out)


class _HiddenWeightedLoss(torch.autograd.Function):
    """``Σ ce_coef·CE + Σ kl_weight·KL`` from hidden states ``[N, D]`` through the model's own output
    layer, chunk by chunk: neither the ``[N, V]`` logits nor their gradient ever exist whole.

    The loss is a weighted sum with known weights, so each chunk's gradient is computed in the same
    pass as its loss (as Liger's fused linear cross-entropy does): the head is applied with autograd
    on, the analytic gradient of the chunk's logits is pushed through it with
    ``torch.autograd.grad`` (so any head works: ``nn.Linear`` with or without bias, a LoRA-adapted or
    ``modules_to_save`` head, tied embeddings, dropout inside the adapter), and the gradients of the
    hidden states and of every trainable head parameter are accumulated; ``backward`` only scales
    them. One head matmul forward and two backward per chunk, as with whole logits, and no
    recomputation. Also returns the unweighted per-token CE and KL (detached) for the meters.
    """

    @staticmethod
    def forward(ctx, hidden, targets, ce_coef, kl_weight, kl_rows, head, transform, reference, kind, chunk,
                accum_dtype, *params):
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        want_h = ctx.needs_input_grad[0]
        want_p = [ctx.needs_input_grad[11 + i] for i in range(len(params))]
        grad_inputs = [p for p, w in zip(params, want_p) if w]
        backprop = want_h or bool(grad_inputs)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_p = [None] * len(grad_inputs)
        # Head gradients summed over chunks in accum_dtype (fp32 by default), cast to the parameter's
        # dtype once at the end: one rounding whatever the number of chunks.
        acc_dtypes = [torch.promote_types(p.dtype, accum_dtype or p.dtype) for p in grad_inputs]
        device = hidden.device
        ce = torch.empty(n, dtype=dtype, device=device)
        kl = torch.zeros(n if reference is not None else 0, dtype=dtype, device=device)
        loss = torch.zeros((), dtype=dtype, device=device)
        # A plain nn.Linear head: matmuls by hand, accumulating the weight gradient in place (the
        # generic path allocates a [V, D] gradient per chunk before adding it).
        linear = type(head) is torch.nn.Linear and all(
            w for p, w in zip(params, want_p) if p is head.weight or p is head.bias)
        if linear:
            weight, bias = _linear_params(head, hidden.dtype)
        if linear and backprop:
            def accumulator(p):
                return torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, accum_dtype or p.dtype), device=device)
            grad_w = accumulator(head.weight) if head.weight.requires_grad else None
            grad_b = accumulator(head.bias) if head.bias is not None and head.bias.requires_grad else None
        # ... and without a logit transform, every [chunk, V] tensor lives in a reused buffer: the
        # head's output, the log-softmaxes, the reference's logits and the gradient.
        direct = linear and transform.is_identity
        scratch = _Scratch()
        fp32_model = hidden.dtype == dtype
        logq_name = "z" if direct and fp32_model else "logq"  # the policy's logits are dead by then
        pk_name = "zq" if isinstance(reference, ReferenceHidden) and reference.out_dtype == dtype else "pk"
        if reference is not None:
            # The KL (reference logits included) is computed only where it carries weight: the
            # output tokens by default (``KLRows``: the positions and their count per chunk).
            kl_at, per_chunk = kl_rows.index, kl_rows.per_chunk
            kl_start = 0
        for i, s in enumerate(range(0, n, chunk)):
            e = min(s + chunk, n)
            t = targets[s:e].unsqueeze(-1)
            h = hidden[s:e].detach()
            if direct:
                cols = head.out_features
                z = _linear_into(h, weight, bias, scratch.get("z", e - s, cols, hidden.dtype, device))
            else:
                with torch.enable_grad() if backprop else torch.no_grad():
                    if linear:
                        raw = F.linear(h, weight, bias)
                        raw.requires_grad_(backprop and not transform.is_identity)
                        z = transform(raw)
                    else:
                        h.requires_grad_(want_h)
                        with _autocast_like(h, head):
                            z = transform(head(h))
                cols = z.shape[-1]
            logp = _log_softmax_into(z.detach(), scratch.get("logp", e - s, cols, dtype, device))
            c = -logp.gather(-1, t).squeeze(-1)
            ce[s:e] = c
            loss += (c * ce_coef[s:e]).sum()
            has_kl = reference is not None and per_chunk[i] > 0
            p = torch.exp(logp, out=scratch.get("g", e - s, cols, dtype, device)) if backprop or has_kl else None
            g_kl = None
            if has_kl:
                rows = kl_at[kl_start:kl_start + per_chunk[i]]
                kl_start += per_chunk[i]
                whole = per_chunk[i] == e - s
                local = None if whole else rows - s
                if isinstance(reference, ReferenceHidden):
                    zq = reference.rows(rows, out=scratch.get("zq", len(rows), cols, reference.out_dtype, device))
                else:
                    zq = reference(s, e)
                    zq = zq if whole else zq.index_select(0, local)
                logq = _log_softmax_into(zq, scratch.get(logq_name, len(rows), cols, dtype, device))
                if whole:
                    lp_k, p_k, t_k = logp, p, t
                else:
                    lp_k = torch.index_select(logp, 0, local, out=scratch.get("lpk", len(rows), cols, dtype, device))
                    p_k = torch.index_select(p, 0, local, out=scratch.get(pk_name, len(rows), cols, dtype, device))
                    t_k = t.index_select(0, local)
                w_k = kl_weight[rows].to(dtype)
                k, g_kl = _kl_terms(lp_k, logq, p_k, t_k, kind, w_k if backprop else None)
                kl[rows] = k
                loss += (k * w_k).sum()
            if not backprop:
                continue
            g = _ce_grad(p, t, ce_coef[s:e].to(dtype))
            if g_kl is not None:
                g.add_(g_kl) if local is None else g.index_add_(0, local, g_kl)
            if linear:
                g_exact, g = g, g.to(z.dtype)
                if not transform.is_identity:  # through the softcap / scaling, elementwise
                    g = g_exact = torch.autograd.grad(z, raw, g)[0]
                if want_h:
                    torch.mm(g, weight, out=grad_h[s:e])
                if grad_w is not None:
                    _accumulate_mm(grad_w, g.t(), h, g_exact.t())
                if grad_b is not None:
                    grad_b.add_(g_exact.sum(0, dtype=grad_b.dtype))
                continue
            grads = torch.autograd.grad(z, ([h] if want_h else []) + grad_inputs, g.to(z.dtype), allow_unused=True)
            if want_h:
                grad_h[s:e] = grads[0]
                grads = grads[1:]
            for j, gp in enumerate(grads):
                if gp is not None:
                    grad_p[j] = gp.to(acc_dtypes[j]) if grad_p[j] is None else grad_p[j].add_(gp)
        if linear and backprop:
            by_param = {id(head.weight): grad_w, id(head.bias): grad_b}
            grad_p = [by_param.get(id(p)) for p in grad_inputs]
        # Back to each parameter's dtype now, so that only the parameter-sized gradient is held until
        # backward (which scales it in place).
        grad_p = [gp.to(p.dtype) if gp is not None else None for gp, p in zip(grad_p, grad_inputs)]
        ctx.grad_h, ctx.want_p, ctx.grad_p = grad_h, want_p, grad_p
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        # In place: these buffers belong to this function, and a copy would double the peak.
        grad_h = ctx.grad_h.mul_(grad_loss.to(ctx.grad_h.dtype)) if ctx.grad_h is not None else None
        computed = iter(ctx.grad_p)
        grad_params = []
        for want in ctx.want_p:
            gp = next(computed) if want else None
            grad_params.append(gp.mul_(grad_loss.to(gp.dtype)) if gp is not None else None)
        ctx.grad_h = ctx.grad_p = None
        return (grad_h, None, None, None, None, None, None, None, None, None, None, *grad_params)


def _cce_token_ce(hidden, weight, bias, targets, transform):
    """Per-token CE through Cut Cross Entropy's kernels (``reduction="none"``); CUDA only."""
    from cut_cross_entropy import linear_cross_entropy

    if bias is not None or transform.multiplier is not None or transform.divisor is not None:
        raise ValueError("cut_cross_entropy supports only a bias-free lm_head with at most a softcap")
    return linear_cross_entropy(hidden, weight, targets, softcap=transform.softcap, reduction="none").float()


@dataclass
class HiddenStates:
    """The model's final hidden states and its output layer, to compute the loss without logits.

    Attributes:
        hidden: ``[B, T, D]`` output of the decoder's final norm (what ``lm_head`` is applied to).
        head: the output layer module (``model.get_output_embeddings()``, adapted or not).
        transform: what the model does to the head's output (``LogitTransform``).
        impl: ``chunked`` (pure PyTorch, exact) or ``cce`` (Cut Cross Entropy kernels, CUDA; CE only).
        autocast_dtype: the autocast dtype the model's forward ran under (None: none); the head is
            applied in it, as the model applied it (``compute_dtype``).
        accum_dtype: dtype in which the head's parameter gradients are summed over chunks (None: the
            parameter's own; fp32 by default, see ``im_loss_accum_dtype``).
        through_head: how to run the chunked loss, which reads the head's weights:
            ``through_head(fn, hidden)`` returns ``fn(hidden)`` (default: called directly). DeepSpeed
            ZeRO-3 runs it as the head module's forward, so that its hooks gather the weights.
    """

    hidden: torch.Tensor
    head: torch.nn.Module
    transform: LogitTransform = LogitTransform()
    impl: str = "chunked"
    autocast_dtype: torch.dtype | None = None
    accum_dtype: torch.dtype | None = torch.float32
    through_head: Callable | None = None


def hidden_weighted_loss(
    states: HiddenStates,
    targets: torch.Tensor,
    ce_coef: torch.Tensor,
    reference: ReferenceRows | None = None,
    kl_weight: torch.Tensor | None = None,
    kl_type: str = "full",
    chunk_size: int = DEFAULT_CHUNK,
    kl_rows: torch.Tensor | None = None,
    kl_counts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``Σ ce_coef·CE + Σ kl_weight·KL`` computed from hidden states, and the per-token CE / KL.

    Args:
        states: the hidden states ``[B, T, D]`` and output layer (``HiddenStates``).
        targets: ``[B, T]`` token scored at each position.
        ce_coef: ``[B, T]`` coefficient of each position's CE (``target_coefficients``).
        reference, kl_weight, kl_type: optional KL to a reference (see ``token_losses``) and its
            ``[B, T]`` coefficients (λ · mask · ``kl_coef``).
        kl_rows: ``[B, T]`` bool, where the KL is computed (the KL mask; default: where
            ``kl_weight`` is not 0). Elsewhere the returned KL is 0 and no reference logits are
            computed.
        kl_counts: how many ``kl_rows`` each chunk holds (``kl_chunk_counts(kl_rows, chunk_size)`` on
            the host); without it they are counted here, one host sync.
        chunk_size: positions per chunk.

    Returns:
        ``(loss, ce, kl)``: the scalar loss (gradients reach ``states.hidden`` and every trainable
        parameter of ``states.head``), the detached per-position CE ``[B, T]`` and KL (or None).
        ``impl: cce`` computes the CE through Cut Cross Entropy when there is no KL term.
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown KL type {kl_type!r}; expected one of {KL_TYPES}")
    shape = targets.shape
    flat = states.hidden.reshape(-1, states.hidden.shape[-1])
    # The head runs in the dtype the model's forward ran it in (autocast casts its input the same way).
    flat = flat.to(compute_dtype(flat.dtype, states.head, states.autocast_dtype))
    if states.impl == "cce" and reference is None:
        head = states.head
        bias = getattr(head, "bias", None)
        ce = _cce_token_ce(flat, head.weight.to(flat.dtype), bias.to(flat.dtype) if bias is not None else None,
                           targets.reshape(-1), states.transform)
        return (ce * ce_coef.reshape(-1)).sum(), ce.detach().view(shape), None
    params = tuple(p for p in states.head.parameters() if p.requires_grad)
    kl_w = kl_weight.reshape(-1) if kl_weight is not None else torch.zeros(0, device=flat.device)
    if reference is not None and kl_rows is None:
        kl_rows = kl_w != 0
    rows = _kl_rows(kl_rows.reshape(-1), chunk_size, kl_counts) if reference is not None else None

    def run(hidden):
        return _HiddenWeightedLoss.apply(hidden, targets.reshape(-1), ce_coef.reshape(-1).detach(), kl_w.detach(),
                                         rows, states.head, states.transform, reference, kl_type, chunk_size,
                                         states.accum_dtype, *params)

    loss, ce, kl = run(flat) if states.through_head is None else states.through_head(run, flat)
    return loss, ce.view(shape), (kl.view(shape) if reference is not None else None)


def per_token_ce(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Cross-entropy per position ``[B, T]`` for logits ``[B, T, V]`` and targets ``[B, T]``."""
    return token_losses(logits, targets, chunk_size=chunk_size)[0]


def segment_weighted_loss(
    logits: "torch.Tensor | HiddenStates",
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    table: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    normalisation: str = "token",
    normaliser: torch.Tensor | float | None = None,
    kl_reference: ReferenceRows | None = None,
    kl_mask: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "full",
    chunk_size: int = DEFAULT_CHUNK,
    instruction_share: float = 0.0,
    kl_counts: list[int] | None = None,
    count_first_token: bool = False,
) -> SegmentLoss:
    """Segment-weighted next-token cross-entropy.

    Args:
        logits: ``[B, T, V]`` model outputs, or ``HiddenStates`` (the final hidden states and the
            output layer) to compute the same loss chunk by chunk without the logits.
        input_ids: ``[B, T]`` tokens; the target of position t is ``input_ids[:, t+1]``.
        segment_ids: ``[B, T]`` ``Segment`` ids (``Segment.PAD`` for padding; 0 for padding is fine while the
            template weight is 0, as it is by default).
        table: weight per segment id (``weight_table``).
        position_ids: ``[B, T]`` for packed rows (positions restart at 0 per example), else None.
        normalisation: one of ``NORMALISATIONS``.
        normaliser: the window's total (``loss_normaliser`` summed over its micro-batches and
            ranks); defaults to this batch's own.
        kl_reference, kl_mask, kl_coef, kl_type: optional KL to a reference (see
            ``token_losses``; ``kl.AdapterReference`` / ``kl.CopyReference`` build one), the
            targets ``[B, T-1]`` it applies to (``kl.kl_mask``), λ and the KL variant: adds
            ``λ Σ mask·kl`` to the CE sum before the shared normalisation (Eq. 5), with the same
            per-example scaling as the CE.
        chunk_size: positions per chunk of the CE/KL computation.
        instruction_share: α of the ``share`` and ``example_share`` normalisations.
        count_first_token: count each example's first token where the normalisation's source does
            (``loss_normaliser``).
        kl_counts: with ``HiddenStates`` and a KL, the KL rows per chunk on the host
            (``kl_chunk_counts`` of the padded mask), counted for a whole step at once by the trainer;
            without it the loss counts them (one host sync).

    Returns:
        ``SegmentLoss``; ``loss`` is 0 (with a graph) when nothing carries weight.

    Example:
        >>> out = segment_weighted_loss(model(ids).logits, ids, segs, weight_table(1.0, 1.0))  # doctest: +SKIP
        >>> out.loss.backward()  # doctest: +SKIP
    """
    targets, segs, valid = _shifted(input_ids, segment_ids, position_ids)
    # Targets padded at the end instead of slicing the logits: slicing [:, :-1] would copy them.
    padded = F.pad(targets, (0, 1), value=0)
    coef = target_coefficients(input_ids, segment_ids, table, position_ids, normalisation, normaliser, instruction_share,
                               count_first_token)
    mask = None
    if kl_reference is not None and kl_coef and normalisation in SHARE_NORMALISATIONS:
        raise ValueError(f"KL regularisation is not defined under the {normalisation} normalisation; use token or sequence")
    if kl_reference is not None:
        mask = kl_mask if kl_mask is not None else valid
    if isinstance(logits, HiddenStates):
        # Position T-1 has no target: its coefficients are 0 (padded like the targets).
        ce_coef = F.pad(coef.ce_coef, (0, 1))
        dtype = torch.promote_types(logits.hidden.dtype, torch.float32)
        kl_weight = F.pad((mask * coef.kl_coef).to(dtype) * kl_coef, (0, 1)) if mask is not None else None
        kl_rows = F.pad(mask, (0, 1)) if mask is not None else None
        loss, ce, kl = hidden_weighted_loss(logits, padded, ce_coef, kl_reference, kl_weight, kl_type, chunk_size,
                                            kl_rows, kl_counts)
        ce = ce[:, :-1]
        kl = kl[:, :-1] if kl is not None else None
    else:
        ce, kl = token_losses(logits, padded, kl_reference, kl_type, chunk_size)
        ce = ce[:, :-1]
        kl = kl[:, :-1] if kl is not None else None
        loss = (ce * coef.ce_coef).sum()
        if kl is not None and kl_coef:
            loss = loss + kl_coef * (kl * mask * coef.kl_coef).sum()
    kl_sum = kl_count = None
    if kl is not None:
        kl_sum, kl_count = (kl.detach() * mask).sum(), mask.sum()

    ce_d = ce.detach()
    is_instr = valid & _is_instruction(segs)
    is_out = valid & _is_output(segs)
    is_template = valid & (segs == Segment.TEMPLATE)
    return SegmentLoss(
        loss=loss,
        instruction_sum=(ce_d * is_instr).sum(),
        instruction_count=is_instr.sum(),
        output_sum=(ce_d * is_out).sum(),
        output_count=is_out.sum(),
        kl_sum=kl_sum,
        kl_count=kl_count,
        template_sum=(ce_d * is_template).sum(),
        template_count=is_template.sum(),
    )
