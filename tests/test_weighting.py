"""The prompt-loss-weight family (issue 14): ``nonzero`` (WIT) and ``share`` (GoLLIE) against
brute-force float64 computations of each source's formula, on padded and packed batches, and
exact under gradient accumulation.

Sources read for these formulas (pinned commits):

* WIT, github.com/kowndinya-renduchintala/WIT @ 3cde54fb6be17b21aa3d6c8116064bac8a4da3c1,
  ``instruction_tuner_wit_loss_fsdp.py``: line 379 gives every prompt token the weight λp and
  every response token λr; line 570 counts the tokens whose label is not IGNORE_INDEX (labels
  are IGNORE_INDEX exactly where the weight is 0, lines 371-376); line 600 sums
  ``weight · (−log p)`` per micro-batch; lines 616-624 multiply the accumulated gradients by
  ``num_processes / num_tokens`` (the count gathered over the window and ranks, DDP then
  averages over ranks): loss = Σ w·CE / #{w ≠ 0}.
* GoLLIE, github.com/hitz-zentroa/GoLLIE @ 164c611743fdc1befe71bbdf03e08c5eb4e35957,
  ``src/dataset/dataset.py`` lines 157-165 (prompt token weight ``α/(1−α) · n_result /
  n_prompt``, result tokens 1) and ``src/trainer.py`` line 300 (``Σ w·CE / Σ w``): per example,
  (1−α)·mean result CE + α·mean prompt CE.
"""

from __future__ import annotations

import math

import pytest
import torch

from instruction_modelling.core.losses import loss_normaliser, segment_weighted_loss, weight_table
from instruction_modelling.core.segments import INSTRUCTION_SEGMENTS, Segment
from test_losses import V, make_examples, packed_batch, padded_batch

TABLES = {
    "wit_reference": weight_table(0.4, 0.6),
    "plw_small": weight_table(0.01, 1.0),
    "it": weight_table(0.0, 1.0),
    "role_overrides": weight_table(0.5, 0.8, {"system": 0.0, "tool": 1.5}),
}


def _targets(examples, logits_of, table):
    """Every target as (is_instruction, weight, −log p) in float64, template targets dropped."""
    out = []
    for i, (ids, segs) in enumerate(examples):
        logits = logits_of(i).double()
        for t in range(1, len(ids)):
            if segs[t] == Segment.TEMPLATE:
                continue
            ce = -logits[t - 1].log_softmax(-1)[ids[t]].item()
            out.append((segs[t] in INSTRUCTION_SEGMENTS, float(table[segs[t]]), ce, i))
    return out


def wit_brute_force(examples, logits_of, table):
    """WIT: Σ w·CE / (number of targets with w ≠ 0)."""
    targets = _targets(examples, logits_of, table)
    return sum(w * ce for _, w, ce, _ in targets) / sum(1 for _, w, _, _ in targets if w != 0)


def share_brute_force(examples, logits_of, table, alpha):
    """(1−α)·(weighted mean output CE) + α·(weighted mean instruction CE) over the window."""
    targets = _targets(examples, logits_of, table)
    total = 0.0
    for is_instr, share in ((True, alpha), (False, 1 - alpha)):
        group = [(w, ce) for instr, w, ce, _ in targets if instr == is_instr]
        den = sum(w for w, _ in group)
        if den > 0:
            total += share * sum(w * ce for w, ce in group) / den
    return total


def _batch(examples, ex_logits, layout):
    if layout == "padded":
        ids, segs, logits = padded_batch(examples, ex_logits)
        return ids, segs, None, logits
    return packed_batch(examples, ex_logits)


def _examples(seed, n=6):
    g = torch.Generator().manual_seed(seed + 100)
    examples = make_examples(seed=seed, n=n)
    return examples, [torch.randn(len(ids), V, generator=g) for ids, _ in examples]


@pytest.mark.parametrize("table_name", sorted(TABLES))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_nonzero_matches_wit_formula(table_name, layout):
    table = TABLES[table_name]
    examples, ex_logits = _examples(seed=sorted(TABLES).index(table_name) + (layout == "packed") * 10)
    expected = wit_brute_force(examples, lambda i: ex_logits[i], table)
    ids, segs, pos, logits = _batch(examples, ex_logits, layout)
    got = segment_weighted_loss(logits.double(), ids, segs, table, pos, "nonzero").loss.item()
    assert got == pytest.approx(expected, rel=1e-6)
    # It differs from token (Σw) normalisation whenever a non-zero weight is not 1.
    token = segment_weighted_loss(logits.double(), ids, segs, table, pos, "token").loss.item()
    if table_name != "it":
        assert not math.isclose(got, token, rel_tol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.4, 1.0])
@pytest.mark.parametrize("table_name", ["im", "role_overrides"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_share_matches_formula(alpha, table_name, layout):
    table = weight_table(1.0, 1.0) if table_name == "im" else TABLES[table_name]
    examples, ex_logits = _examples(seed=int(alpha * 100) + (layout == "packed") * 7)
    expected = share_brute_force(examples, lambda i: ex_logits[i], table, alpha)
    ids, segs, pos, logits = _batch(examples, ex_logits, layout)
    got = segment_weighted_loss(logits.double(), ids, segs, table, pos, "share", instruction_share=alpha).loss.item()
    assert got == pytest.approx(expected, rel=1e-6)


def gollie_loss_weight_mask(len_prompt: int, len_result: int, prompt_loss_weight: float) -> list[float]:
    """GoLLIE's ``src/dataset/dataset.py`` lines 157-165, transcribed."""
    prompt_token_weight = len_result * prompt_loss_weight
    prompt_token_weight = prompt_token_weight * (len_result / (len_result * (1 - prompt_loss_weight)))
    prompt_token_weight = prompt_token_weight / len_prompt
    return [prompt_token_weight] * len_prompt + [1.0] * len_result


@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_share_of_one_example_is_gollies_weighting(alpha):
    """One example per window: share equals GoLLIE's weights with its ``Σ w·CE / Σ w`` loss
    (``src/trainer.py`` line 300). GoLLIE's prompt length counts the example's first token, which
    is never a target; the weights here are built from the trained counts (the lengths of the
    shifted prompt and result), on which the two formulas agree exactly. Over several examples
    GoLLIE weighs each example by its result length, while share takes the means over the window."""
    n_prompt, n_result = 5, 6
    ids = torch.randint(0, V, (1, 1 + n_prompt + n_result))
    segs = torch.tensor([[int(Segment.TEMPLATE)] + [int(Segment.USER)] * n_prompt + [int(Segment.OUTPUT)] * n_result])
    logits = torch.randn(1, ids.shape[1], V, dtype=torch.float64)
    ce = -logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # the shifted targets
    w = torch.tensor(gollie_loss_weight_mask(n_prompt, n_result, alpha), dtype=torch.float64)
    gollie = (ce * w).sum() / w.sum()
    ours = segment_weighted_loss(logits, ids, segs, weight_table(1.0, 1.0), None, "share", instruction_share=alpha).loss
    assert ours.item() == pytest.approx(gollie.item(), rel=1e-6)  # coefficients are fp32


def test_nonzero_matches_wit_training_loop():
    """WIT's loop (file and lines in the module docstring) run on the same window: identical up to
    WIT counting each example's first token (its label is not IGNORE_INDEX at line 570, but it is
    never a target), which we do not count."""
    lp, lr = 0.4, 0.6
    table = weight_table(lp, lr)
    examples, ex_logits = _examples(seed=3, n=8)
    # WIT has one prompt and one response: recast each example as user tokens then output tokens.
    examples = [(ids, [int(Segment.USER)] * (len(ids) // 2) + [int(Segment.OUTPUT)] * (len(ids) - len(ids) // 2))
                for ids, _ in examples]
    micro_batches = [examples[i:i + 2] for i in range(0, 8, 2)]  # GA 4, one rank
    num, num_tokens = 0.0, 0
    for mb, mb_logits in zip(micro_batches, [ex_logits[i:i + 2] for i in range(0, 8, 2)]):
        for (ids, segs), logits in zip(mb, mb_logits):
            prompt_len = segs.count(int(Segment.USER))
            token_weights = [lp] * prompt_len + [lr] * (len(ids) - prompt_len)  # line 379
            num_tokens += len(ids)  # line 570: no label is IGNORE_INDEX when λp, λr > 0
            logp = logits.double()[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
            num += -(torch.tensor(token_weights[1:], dtype=torch.float64) * logp).sum().item()  # line 600
    wit = num / num_tokens  # lines 616-624
    ids, segs, pos, logits = packed_batch(examples, ex_logits)
    ours = segment_weighted_loss(logits.double(), ids, segs, table, pos, "nonzero").loss.item()
    n_targets = sum(len(ids) - 1 for ids, _ in examples)
    assert num_tokens - n_targets == len(examples)  # WIT's count: one more token per example
    assert ours == pytest.approx(wit * num_tokens / n_targets, rel=1e-6)  # the table is fp32
    token = segment_weighted_loss(logits.double(), ids, segs, table, pos, "token").loss.item()
    assert not math.isclose(token, ours, rel_tol=1e-3)  # Σw normalisation cannot reproduce WIT


@pytest.mark.parametrize("normalisation,alpha", [("nonzero", 0.0), ("share", 0.3)])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradient_accumulation_1_vs_4_equal(normalisation, alpha, layout):
    """Four micro-batches normalised by the window total give the one-batch loss and gradient."""
    table = weight_table(0.4, 0.6) if normalisation == "nonzero" else weight_table(1.0, 1.0)
    examples, ex_logits = _examples(seed=11, n=8)
    kwargs = dict(normalisation=normalisation, instruction_share=alpha)

    def batch(part):
        return _batch([examples[i] for i in part], [ex_logits[i] for i in part], layout)

    ids, segs, pos, logits = batch(range(8))
    full_logits = logits.double().requires_grad_(True)
    full = segment_weighted_loss(full_logits, ids, segs, table, pos, **kwargs).loss
    full.backward()

    parts = [range(i, i + 2) for i in range(0, 8, 2)]
    micro = [batch(p) for p in parts]
    window = sum(loss_normaliser(i, s, table, p, normalisation) for i, s, p, _ in micro)
    assert window.shape == ((2,) if normalisation == "share" else ())
    total = 0.0
    grads = []
    for i, s, p, lg in micro:
        lg = lg.double().requires_grad_(True)
        loss = segment_weighted_loss(lg, i, s, table, p, normaliser=window, **kwargs).loss
        loss.backward()
        total += loss.item()
        grads.append(lg.grad)
    assert total == pytest.approx(full.item(), rel=1e-9)
    # The gradient of each example's logits is the same as in the full batch.
    if layout == "padded":
        for k, g in enumerate(grads):
            torch.testing.assert_close(g, full_logits.grad[2 * k:2 * k + 2, :g.shape[1]])
    # Each micro-batch divided by its own normaliser (the naive mean) gives a different loss.
    naive = sum(segment_weighted_loss(lg.double(), i, s, table, p, **kwargs).loss.item() for i, s, p, lg in micro) / 4
    assert not math.isclose(naive, full.item(), rel_tol=1e-4)


def test_share_needs_the_normaliser_pair():
    examples, ex_logits = _examples(seed=5)
    ids, segs, pos, logits = _batch(examples, ex_logits, "padded")
    with pytest.raises(ValueError, match="pair"):
        segment_weighted_loss(logits, ids, segs, weight_table(1.0, 1.0), normalisation="share",
                              normaliser=torch.tensor(3.0), instruction_share=0.1)


def test_share_refuses_kl():
    from instruction_modelling.core.kl import kl_mask

    examples, ex_logits = _examples(seed=6)
    ids, segs, pos, logits = _batch(examples, ex_logits, "padded")
    with pytest.raises(ValueError, match="share"):
        segment_weighted_loss(logits, ids, segs, weight_table(1.0, 1.0), normalisation="share", instruction_share=0.1,
                              kl_reference=lambda s, e: logits.reshape(-1, V)[s:e], kl_mask=kl_mask(segs, None, "output"),
                              kl_coef=0.1)


def test_options_validate():
    from instruction_modelling.core.options import IMArgs

    assert IMArgs(im_loss_normalization="nonzero", im_instruction_weight=0.4, im_output_weight=0.6)
    assert IMArgs(im_loss_normalization="share", im_instruction_share=0.05).im_instruction_share == 0.05
    bad = [
        (dict(im_loss_normalization="share"), "im_instruction_share in \\[0, 1\\]"),
        (dict(im_loss_normalization="share", im_instruction_share=1.5), "in \\[0, 1\\]"),
        (dict(im_instruction_share=0.1), "only used by im_loss_normalization: share"),
        (dict(im_loss_normalization="share", im_instruction_share=0.1, im_instruction_weight=0.5), "remove im_instruction_weight"),
        (dict(im_loss_normalization="share", im_instruction_share=0.1, im_mode="it"), "use im_mode: im"),
        (dict(im_loss_normalization="share", im_instruction_share=0.1, im_kl_coef=0.1), "KL regularisation"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            IMArgs(**kwargs)


def test_share_through_axolotl_gradient_accumulation_1_vs_4(tmp_path, tiny_model_dir):
    """The [instruction, output] normaliser pair through the real trainer: GA 1 and GA 4 log the same loss."""
    pytest.importorskip("axolotl")
    from cli_helpers import run_axolotl
    from test_axolotl_cli import small_train_file

    from instruction_modelling.axolotl.configs import cpu_config

    runs = {}
    for name, mb, ga in (("ga1", 4, 1), ("ga4", 1, 4)):
        cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / name, mode="im",
                         im_loss_normalization="share", im_instruction_share=0.3, max_steps=2, save_strategy="steps",
                         save_steps=2, learning_rate=1e-2, micro_batch_size=mb, gradient_accumulation_steps=ga,
                         dataset_prepared_path=str(tmp_path / f"{name}_prepared"))
        run = run_axolotl("train", cfg, tmp_path / f"{name}.yml")
        assert run.returncode == 0, run.output[-3000:]
        runs[name] = [h for h in run.log_history() if "loss" in h]
    assert len(runs["ga1"]) == len(runs["ga4"]) == 2
    for a, b in zip(runs["ga1"], runs["ga4"]):
        for key in ("loss", "instruction_loss", "output_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-4, abs=2e-4), (key, a, b)
        # The logged loss is the share mix of the two means (both measured on the same tokens).
        assert float(a["loss"]) == pytest.approx(0.7 * a["output_loss"] + 0.3 * a["instruction_loss"], rel=1e-3)
