"""The segment-weighted loss against a brute-force computation written with plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from instruction_modelling.core.losses import (
    loss_normaliser,
    per_token_ce,
    segment_weighted_loss,
    weight_table,
)
from instruction_modelling.core.segments import Segment

V = 11


def make_examples(seed: int, n: int = 5):
    """Random examples: (input_ids, segment_ids) of varying length with every segment kind."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(0, V, (length,), generator=g).tolist()
        segs = torch.randint(0, 5, (length,), generator=g).tolist()
        segs[0] = 0
        segs[-1] = int(Segment.OUTPUT)
        examples.append((ids, segs))
    return examples


def brute_force(examples, logits_of, table, normalisation):
    """Σ over examples of Σ_t w_t ce_t, normalised by Σw (token) or by #examples (sequence)."""
    per_example = []
    for i, (ids, segs) in enumerate(examples):
        logits = logits_of(i)
        num, den = 0.0, 0.0
        for t in range(1, len(ids)):
            w = float(table[segs[t]])
            if segs[t] == 0 or w == 0:
                continue
            logp = logits[t - 1].double().log_softmax(-1)[ids[t]].item()
            num += -w * logp
            den += w
        per_example.append((num, den))
    if normalisation == "token":
        return sum(n for n, _ in per_example) / sum(d for _, d in per_example)
    kept = [(n, d) for n, d in per_example if d > 0]
    return sum(n / d for n, d in kept) / len(kept)


def padded_batch(examples, logits_by_example):
    length = max(len(ids) for ids, _ in examples)
    b = len(examples)
    ids = torch.zeros(b, length, dtype=torch.long)
    segs = torch.full((b, length), int(Segment.PAD), dtype=torch.long)  # as the collators pad
    logits = torch.randn(b, length, V) * 10  # padding logits are junk on purpose
    for i, (x, s) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        segs[i, :len(s)] = torch.tensor(s)
        logits[i, :len(x)] = logits_by_example[i]
    return ids, segs, logits


def packed_batch(examples, logits_by_example, rows: int = 2):
    """Examples concatenated into ``rows`` packed rows, position_ids restarting at 0."""
    buckets = [[] for _ in range(rows)]
    for i, ex in enumerate(examples):
        buckets[i % rows].append(i)
    length = max(sum(len(examples[i][0]) for i in bucket) for bucket in buckets) + 3
    ids = torch.zeros(rows, length, dtype=torch.long)
    segs = torch.full((rows, length), int(Segment.PAD), dtype=torch.long)  # as the collators pad
    pos = torch.zeros(rows, length, dtype=torch.long)
    logits = torch.randn(rows, length, V) * 10
    for r, bucket in enumerate(buckets):
        o = 0
        for i in bucket:
            x, s = examples[i]
            ids[r, o:o + len(x)] = torch.tensor(x)
            segs[r, o:o + len(x)] = torch.tensor(s)
            pos[r, o:o + len(x)] = torch.arange(len(x))
            logits[r, o:o + len(x)] = logits_by_example[i]
            o += len(x)
        pos[r, o:] = torch.arange(length - o)  # Axolotl pads position_ids with a fresh range
    return ids, segs, pos, logits


TABLES = {
    "im": weight_table(1.0, 1.0),
    "it": weight_table(0.0, 1.0),
    "weighted": weight_table(0.3, 1.0),
    "role_overrides": weight_table(0.5, 2.0, {"system": 0.0, "tool": 1.5}),
}


@pytest.mark.parametrize("table_name", sorted(TABLES))
@pytest.mark.parametrize("normalisation", ["token", "sequence"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_matches_brute_force(table_name, normalisation, layout):
    table = TABLES[table_name]
    examples = make_examples(seed=hash((table_name, normalisation, layout)) % 1000)
    g = torch.Generator().manual_seed(1)
    ex_logits = [torch.randn(len(ids), V, generator=g) for ids, _ in examples]
    expected = brute_force(examples, lambda i: ex_logits[i], table, normalisation)
    if layout == "padded":
        ids, segs, logits = padded_batch(examples, ex_logits)
        pos = None
    else:
        ids, segs, pos, logits = packed_batch(examples, ex_logits)
    out = segment_weighted_loss(logits, ids, segs, table, pos, normalisation)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
def test_gradient_accumulation_sums_to_full_batch(normalisation):
    """Micro-batches normalised by the window total give the full batch's loss and gradient."""
    table = weight_table(0.3, 1.0)
    examples = make_examples(seed=7, n=8)
    g = torch.Generator().manual_seed(2)
    ex_logits = [torch.randn(len(ids), V, generator=g) for ids, _ in examples]
    ids, segs, logits = padded_batch(examples, ex_logits)

    full_logits = logits.clone().requires_grad_(True)
    full = segment_weighted_loss(full_logits, ids, segs, table, normalisation=normalisation).loss
    full.backward()

    micro_logits = logits.clone().requires_grad_(True)
    chunks = [slice(i, i + 2) for i in range(0, len(examples), 2)]
    window = sum(loss_normaliser(ids[c], segs[c], table, normalisation=normalisation) for c in chunks)
    total = sum(
        segment_weighted_loss(micro_logits[c], ids[c], segs[c], table, normalisation=normalisation,
                              normaliser=window).loss
        for c in chunks
    )
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(micro_logits.grad, full_logits.grad, rtol=1e-5, atol=1e-7)
    # The naive mean of micro-batch means differs: the test can tell the two apart.
    naive = sum(segment_weighted_loss(logits[c], ids[c], segs[c], table, normalisation=normalisation).loss
                for c in chunks) / len(chunks)
    if normalisation == "token":
        assert not math.isclose(naive.item(), full.item(), rel_tol=1e-4)


def test_packed_equals_unpacked_per_segment_sums():
    # First tokens are content here (a prompt/completion row from a tokenizer without BOS).
    examples = [(ids, [int(Segment.USER)] + segs[1:]) for ids, segs in make_examples(seed=3, n=6)]
    g = torch.Generator().manual_seed(3)
    ex_logits = [torch.randn(len(ids), V, generator=g) for ids, _ in examples]
    table = weight_table(1.0, 1.0)
    ids, segs, logits = padded_batch(examples, ex_logits)
    unpacked = segment_weighted_loss(logits, ids, segs, table)
    ids, segs, pos, logits = packed_batch(examples, ex_logits)
    packed = segment_weighted_loss(logits, ids, segs, table, pos)
    for field in ("instruction_sum", "output_sum"):
        assert getattr(packed, field).item() == pytest.approx(getattr(unpacked, field).item(), rel=1e-5)
    for field in ("instruction_count", "output_count"):
        assert getattr(packed, field).item() == getattr(unpacked, field).item()
    # Without position_ids the packed rows would predict each example's first token from the
    # previous example: the boundary masking matters.
    leaky = segment_weighted_loss(logits, ids, segs, table)
    assert leaky.instruction_count + leaky.output_count > packed.instruction_count + packed.output_count


def test_metrics_measure_instruction_loss_even_when_unweighted():
    examples = make_examples(seed=4)
    g = torch.Generator().manual_seed(4)
    ex_logits = [torch.randn(len(ids), V, generator=g) for ids, _ in examples]
    ids, segs, logits = padded_batch(examples, ex_logits)
    it = segment_weighted_loss(logits, ids, segs, weight_table(0.0, 1.0))
    im = segment_weighted_loss(logits, ids, segs, weight_table(1.0, 1.0))
    assert it.instruction_count > 0
    assert it.instruction_sum.item() == pytest.approx(im.instruction_sum.item())
    assert it.loss.item() == pytest.approx((it.output_sum / it.output_count).item(), rel=1e-6)


def test_per_token_ce_chunks_match_unchunked():
    logits = torch.randn(2, 50, V)
    targets = torch.randint(0, V, (2, 50))
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 50)
    torch.testing.assert_close(per_token_ce(logits, targets, chunk_size=7), ref)


def test_weight_table_layout():
    # template, system, user, output, tool, reasoning, padding
    assert weight_table(1.0, 1.0).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert weight_table(0.0, 1.0, {"system": 0.5}).tolist() == [0.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert weight_table(0.5, 1.0, {"template": 0.25}).tolist() == [0.25, 0.5, 0.5, 1.0, 0.5, 1.0, 0.0]


def test_per_token_ce_gradient_with_recomputation_matches_plain():
    logits = torch.randn(3, 20, V, dtype=torch.float64)
    targets = torch.randint(0, V, (3, 20))
    a = logits.clone().requires_grad_(True)
    per_token_ce(a, targets, chunk_size=8).sum().backward()
    b = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    torch.testing.assert_close(a.grad, b.grad)
