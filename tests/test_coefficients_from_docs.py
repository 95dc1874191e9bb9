"""The loss against a float64 brute force written from the documented formulas alone (README's options
table, docs/weighting.md, docs/kl.md), not from ``target_coefficients``: an error in the coefficients
themselves (a weight, a normaliser, the KL's scale, a packed boundary) shows here.

Each example has its own float64 logits; they are laid out in padded or packed micro-batches, split
over gradient-accumulation steps and two simulated data-parallel ranks, and the sum of every
micro-batch's loss (each divided by the window's normaliser, as the trainer does) is compared with
the formula over the whole window, value and gradient with respect to every example's logits. The
implementation computes its coefficients in float32: agreement is to float32 rounding (~1e-7).
"""

from __future__ import annotations

import math

import pytest
import torch

from instruction_modelling.core.kl import kl_mask
from instruction_modelling.core.losses import loss_normaliser, segment_weighted_loss, weight_table
from instruction_modelling.core.options import IMArgs
from instruction_modelling.core.segments import Segment

V = 11
ROLES = ("template", "system", "user", "assistant", "tool", "reasoning")
SEGMENT_OF = {"template": Segment.TEMPLATE, "system": Segment.SYSTEM, "user": Segment.USER,
              "assistant": Segment.OUTPUT, "tool": Segment.TOOL, "reasoning": Segment.REASONING}
INSTRUCTION_ROLES = {"system", "user", "tool"}  # README "What carries loss"
OUTPUT_ROLES = {"assistant", "reasoning"}


def documented_weight(role: str, options: dict) -> float:
    """README's options table: template tokens carry no loss unless ``im_role_weights: {template: w}``;
    instruction roles get ``im_instruction_weight`` (1 under ``im_mode: im``, 0 under ``it``), output
    roles ``im_output_weight`` (1), reasoning the output weight; ``im_role_weights`` overrides per role."""
    overrides = options.get("im_role_weights") or {}
    if role in overrides:
        return float(overrides[role])
    if role == "template":
        return 0.0
    if role in INSTRUCTION_ROLES:
        default = 1.0 if options.get("im_mode", "im") == "im" else 0.0
        return float(options.get("im_instruction_weight", default))
    return float(options.get("im_output_weight", 1.0))


def brute_force(examples, logits, ref_logits, options: dict, kl_coef: float, kl_segments: str):
    """The window's loss in float64 from the documented formulas, with plain loops.

    A target is every token of an example but its first, predicted from the previous position of
    the same example; template targets carry their documented weight (0 by default) and no KL.
    ``im_count_first_token`` (README) adds each example's first token, when its weight is not 0, to
    ``#{w ≠ 0}`` (nonzero) and to the prompt total P_e (example_share); the prompt side of the
    share normalisations is everything that is not output (docs/weighting.md)."""
    normalisation = options.get("im_loss_normalization", "token")
    alpha = options.get("im_instruction_share", 0.0)
    first = options.get("im_count_first_token", False)
    kl_roles = {"output": OUTPUT_ROLES, "instruction": INSTRUCTION_ROLES, "all": OUTPUT_ROLES | INSTRUCTION_ROLES}
    per_example = []  # (Σ w·ce, Σ w, #w≠0, λ Σ kl, Σ_I w·ce, Σ_I w, Σ_O w·ce, Σ_O w)
    for (tokens, roles), z, zq in zip(examples, logits, ref_logits):
        acc = [torch.zeros((), dtype=torch.float64) for _ in range(8)]
        for t in range(1, len(tokens)):
            logp = z[t - 1].log_softmax(-1)
            ce = -logp[tokens[t]]
            w = documented_weight(roles[t], options)
            acc[0] = acc[0] + w * ce
            acc[1] = acc[1] + w
            acc[2] = acc[2] + (w != 0)
            if kl_coef and roles[t] in kl_roles[kl_segments]:
                logq = zq[t - 1].log_softmax(-1)
                acc[3] = acc[3] + kl_coef * (logp.exp() * (logp - logq)).sum()  # Eq. 5, full KL
            if roles[t] in OUTPUT_ROLES:
                acc[6], acc[7] = acc[6] + w * ce, acc[7] + w
            else:  # the prompt side: instruction roles and the template
                acc[4], acc[5] = acc[4] + w * ce, acc[5] + w
        w0 = documented_weight(roles[0], options)
        if first and w0 != 0:
            acc[2] = acc[2] + 1
            if roles[0] not in OUTPUT_ROLES:
                acc.append(torch.tensor(w0, dtype=torch.float64))  # P_e's extra term
        per_example.append(acc)
    total = [sum(e[i] for e in per_example) for i in range(8)]
    if normalisation == "token":  # Σ w·ce / Σ w (KL added before the normalisation: docs/kl.md)
        return (total[0] + total[3]) / total[1]
    if normalisation == "nonzero":  # Σ w·ce / #{w ≠ 0}
        return (total[0] + total[3]) / total[2]
    if normalisation == "sequence":  # mean over the examples that carry weight of their own weighted mean
        kept = [(e[0] + e[3]) / e[1] for e in per_example if e[1] > 0]
        return sum(kept) / len(kept)
    if normalisation == "example_share":  # per example prompt weight α/(1−α)·R_e/P_e, output 1; Σ w·ce / Σ w
        num = den = torch.zeros((), dtype=torch.float64)
        for e in per_example:
            p_e = e[5] + (e[8] if len(e) > 8 else 0.0)
            rho = alpha / (1 - alpha) * e[7] / p_e if p_e > 0 else 0.0
            num, den = num + rho * e[4] + e[6], den + rho * e[5] + e[7]
        return num / den
    assert normalisation == "share" and not kl_coef  # (1 − α)·mean_O + α·mean_I; an empty group adds nothing
    loss = torch.zeros((), dtype=torch.float64)
    if total[7] > 0:
        loss = loss + (1 - alpha) * total[6] / total[7]
    if total[5] > 0:
        loss = loss + alpha * total[4] / total[5]
    return loss


def make_examples(seed: int, n: int = 8):
    """Random examples: token ids and the role of every token."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        tokens = torch.randint(0, V, (length,), generator=g).tolist()
        roles = [ROLES[int(r)] for r in torch.randint(0, len(ROLES), (length,), generator=g)]
        if i % 2:  # half start with a BOS-like template token, half with content (never a target)
            roles[0] = "template"
        if i == 0:
            roles = ["template"] + ["user"] * (length - 1)  # an example without output targets
        examples.append((tokens, roles))
    return examples


def lay_out(examples, logits, ref_logits, layout: str, rows: int):
    """One micro-batch: ``(input_ids, segment_ids, position_ids or None, logits, reference logits)``.
    Padding positions have junk logits (random) and the padding segment (as the collators pad)."""
    g = torch.Generator().manual_seed(len(examples) * 7 + rows)
    if layout == "padded":
        buckets = [[i] for i in range(len(examples))]
    else:
        buckets = [list(range(len(examples)))[r::rows] for r in range(rows)]
    length = max(sum(len(examples[i][0]) for i in b) for b in buckets) + 2
    ids, segs, pos, z, zq = [], [], [], [], []
    for bucket in buckets:
        row_ids, row_segs, row_pos, row_z, row_zq = [], [], [], [], []
        for i in bucket:
            tokens, roles = examples[i]
            row_ids += tokens
            row_segs += [int(SEGMENT_OF[r]) for r in roles]
            row_pos += list(range(len(tokens)))
            row_z.append(logits[i])
            row_zq.append(ref_logits[i])
        pad = length - len(row_ids)
        row_ids += [0] * pad
        row_segs += [int(Segment.PAD)] * pad
        row_pos += list(range(pad))
        row_z.append(torch.randn(pad, V, generator=g, dtype=torch.float64) * 5)
        row_zq.append(torch.randn(pad, V, generator=g, dtype=torch.float64) * 5)
        ids.append(row_ids), segs.append(row_segs), pos.append(row_pos)
        z.append(torch.cat(row_z)), zq.append(torch.cat(row_zq))
    return (torch.tensor(ids), torch.tensor(segs), torch.tensor(pos) if layout == "packed" else None,
            torch.stack(z), torch.stack(zq))


def implementation(examples, logits, ref_logits, options: dict, kl_coef: float, kl_segments: str, layout: str,
                   ranks: int, accumulation: int):
    """The window's loss as the trainer computes it: examples dealt to ranks, then to micro-batches;
    the normaliser summed over all of them; each micro-batch's loss divided by it; the losses summed
    (DDP's mean of the rank-scaled gradients is the gradient of that sum)."""
    args = IMArgs(**options)
    w = args.role_weight_map()
    table = weight_table(w["user"], w["assistant"], w)
    normalisation = args.im_loss_normalization
    index = list(range(len(examples)))
    micro = [index[r::ranks][m::accumulation] for r in range(ranks) for m in range(accumulation)]
    batches = [lay_out([examples[i] for i in m], [logits[i] for i in m], [ref_logits[i] for i in m], layout, rows=2)
               for m in micro if m]
    share, first = args.im_instruction_share or 0.0, args.im_count_first_token
    window = sum(loss_normaliser(ids, segs, table, pos, normalisation, share, first) for ids, segs, pos, _, _ in batches)
    loss = torch.zeros((), dtype=torch.float64)
    for ids, segs, pos, z, zq in batches:
        flat_ref = zq.flatten(0, 1)
        out = segment_weighted_loss(z, ids, segs, table, pos, normalisation, normaliser=window,
                                    kl_reference=(lambda s, e, f=flat_ref: f[s:e]) if kl_coef else None,
                                    kl_mask=kl_mask(segs, pos, kl_segments) if kl_coef else None,
                                    kl_coef=kl_coef, chunk_size=5,
                                    instruction_share=share, count_first_token=first)
        loss = loss + out.loss
    return loss


OPTIONS = {
    "im": {},
    "it": {"im_mode": "it"},
    "weighted": {"im_instruction_weight": 0.3, "im_output_weight": 2.0},
    "role_overrides": {"im_instruction_weight": 0.4, "im_role_weights": {"system": 0.0, "reasoning": 0.5, "tool": 2.5}},
    "wit": {"im_instruction_weight": 0.4, "im_output_weight": 0.6, "im_loss_normalization": "nonzero"},
    "sequence": {"im_instruction_weight": 0.3, "im_loss_normalization": "sequence"},
    "share": {"im_loss_normalization": "share", "im_instruction_share": 0.3, "im_role_weights": {"system": 0.5}},
    "template": {"im_instruction_weight": 0.2, "im_role_weights": {"template": 0.2}},
    "wit_as_run": {"im_instruction_weight": 0.4, "im_output_weight": 0.6, "im_role_weights": {"template": 0.4},
                   "im_loss_normalization": "nonzero", "im_count_first_token": True},
    "gollie_as_run": {"im_loss_normalization": "example_share", "im_instruction_share": 0.2,
                      "im_role_weights": {"template": 1.0}, "im_count_first_token": True},
    "share_template": {"im_loss_normalization": "share", "im_instruction_share": 0.4, "im_role_weights": {"template": 0.5}},
    "sequence_template": {"im_loss_normalization": "sequence", "im_role_weights": {"template": 0.3}},
}
CASES = [
    # (options, kl λ, KL segments, layout, ranks, accumulation)
    ("im", 0.0, "output", "padded", 1, 1),
    ("it", 0.0, "output", "packed", 2, 2),
    ("weighted", 0.0, "output", "packed", 2, 1),
    ("role_overrides", 0.0, "output", "padded", 2, 2),
    ("wit", 0.0, "output", "packed", 1, 3),
    ("sequence", 0.0, "output", "packed", 2, 2),
    ("share", 0.0, "output", "padded", 2, 2),
    ("share", 0.0, "output", "packed", 1, 1),
    ("it", 0.7, "output", "packed", 2, 2),
    ("weighted", 0.7, "all", "padded", 1, 2),
    ("sequence", 0.7, "instruction", "packed", 2, 1),
    ("wit", 0.7, "output", "padded", 2, 2),
    ("template", 0.0, "output", "padded", 2, 2),
    ("template", 0.7, "all", "packed", 1, 2),
    ("wit_as_run", 0.0, "output", "packed", 2, 2),
    ("wit_as_run", 0.0, "output", "padded", 1, 3),
    ("gollie_as_run", 0.0, "output", "padded", 1, 1),
    ("gollie_as_run", 0.0, "output", "packed", 1, 1),
    ("gollie_as_run", 0.0, "output", "packed", 2, 2),
    ("share_template", 0.0, "output", "packed", 2, 2),
    ("sequence_template", 0.0, "output", "padded", 2, 1),
]


@pytest.mark.parametrize("name,kl_coef,kl_segments,layout,ranks,accumulation", CASES)
def test_loss_equals_the_documented_formula_in_float64(name, kl_coef, kl_segments, layout, ranks, accumulation):
    options = OPTIONS[name]
    examples = make_examples(seed=len(name) + ranks * 10 + accumulation)
    g = torch.Generator().manual_seed(3)
    logits = [(torch.randn(len(t), V, generator=g, dtype=torch.float64) * 2).requires_grad_() for t, _ in examples]
    ref_logits = [torch.randn(len(t), V, generator=g, dtype=torch.float64) * 2 for t, _ in examples]

    expected = brute_force(examples, logits, ref_logits, options, kl_coef, kl_segments)
    got = implementation(examples, logits, ref_logits, options, kl_coef, kl_segments, layout, ranks, accumulation)

    # float32 coefficients: agreement to float32 rounding, far tighter than any coefficient error
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got, logits), torch.autograd.grad(expected, logits)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert math.isfinite(float(expected.detach())) and float(expected.detach()) > 0
