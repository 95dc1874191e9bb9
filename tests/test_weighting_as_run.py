"""PLW, WIT and GoLLIE as their authors ran them (issue 21): each source's loss, transcribed from
its code, against ours with the template weighted like the prompt, on the same batches.

Sources (pinned commits; the line numbers are those files' lines):

* WIT, github.com/kowndinya-renduchintala/WIT @ 3cde54fb6be17b21aa3d6c8116064bac8a4da3c1,
  ``instruction_tuner_wit_loss_fsdp.py``: lines 362-382 (the prompt, a pre-formatted string with
  its template, is tokenised alone, BOS included, and its ``prompt_len`` tokens get λp, the rest
  λr; labels are IGNORE_INDEX where a weight is 0.0), lines 104-108 (padding: labels and weights
  IGNORE_INDEX), lines 566-571 (``num_tokens`` counts every token whose label is not IGNORE_INDEX,
  the first included), lines 575-600 (shifted ``Σ weight · (−log p)`` per micro-batch), lines
  609-624 (the count gathered over ranks, gradients scaled by ``num_processes / num_tokens``; DDP
  averages over ranks).
* GoLLIE, github.com/hitz-zentroa/GoLLIE @ 164c611743fdc1befe71bbdf03e08c5eb4e35957:
  ``src/dataset/dataset.py`` lines 155-176 (per example: ``len_prompt`` tokens up to ``result =``,
  BOS included, weighted ``α/(1−α) · len_result / len_prompt``, result tokens 1; α in [0, 1) by the
  assertion at lines 308-310), lines 538-560 (weights padded with 0.0), ``src/trainer.py`` lines
  288-300 (shifted, ``Σ CE·w / Σ w`` over the micro-batch).
* PLW (Huerta-Enochian & Ko, arXiv 2401.13586): no code of the authors is public (searched: the
  first author's GitHub account, EQ4ALL's, code and issue indexes). The paper trains with Stanford
  Alpaca's ``train.py`` (github.com/tatsu-lab/stanford_alpaca @ 761dc5b), where the prompt is the
  whole formatted source (``PROMPT_DICT``, lines 31-40: preamble and ``### ...:`` tags), tokenised
  with BOS and masked at line 123 (``label[:source_len] = IGNORE_INDEX``), the target is the output
  plus EOS (line 141) and padding is masked (line 167); PLW gives that masked prefix the weight PLW
  instead ("PLW = 0.0 is identical to the masking used in the original Alpaca project, and PLW = 1.0
  is equivalent to unmasked training"). The weighted mean ``Σ w·CE / Σ w`` is the normaliser every
  public PLW implementation uses (D. Vaughn's ``run_plw.py`` line 577) and matches both ends.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from instruction_modelling.core.losses import loss_normaliser, segment_weighted_loss, weight_table
from instruction_modelling.core.options import IMArgs
from instruction_modelling.core.segments import Segment
from test_losses import V, packed_batch, padded_batch

IGNORE_INDEX = -100
T, U, O = int(Segment.TEMPLATE), int(Segment.USER), int(Segment.OUTPUT)


def make_examples(seed: int, n: int):
    """Chat-shaped examples as (token ids, segment ids): BOS and tags (template), user content, the
    assistant tag (template), output ending with EOS (output). Edge cases: an empty instruction,
    a one-token output, a template-only prompt."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        n_user = 0 if i == 1 else rng.randint(1, 9)
        n_out = 1 if i == 2 else rng.randint(1, 8)
        segs = [T] + [T] * rng.randint(1, 3) + [U] * n_user + [T] * rng.randint(1, 2) + [O] * n_out
        ids = [rng.randrange(3, V) for _ in segs]
        examples.append((ids, segs))
    return examples


def logits_for(examples, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(len(ids), V, generator=g, dtype=torch.float64) * 3 for ids, _ in examples]


def prompt_len(segs) -> int:
    """Tokens before the first output token: the source's prompt (template, BOS included)."""
    return segs.index(O)


def logp_of(logits, ids):
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


# -- WIT, transcribed ---------------------------------------------------------------------------
def wit_preprocess(ids, segs, lp, lr):
    """``instruction_tuner_wit_loss_fsdp.py`` lines 366-382."""
    plen = prompt_len(segs)
    labels = list(ids)
    if lp == 0.0:
        labels[:plen] = [IGNORE_INDEX] * plen
    if lr == 0.0:
        labels[plen:] = [IGNORE_INDEX] * len(labels[plen:])
    token_weights = [lp] * plen + [lr] * (len(labels) - plen)
    return labels, token_weights


def wit_window(ranks, lp, lr):
    """Lines 566-624 over one optimizer step: ``ranks`` is a list (one per rank) of micro-batches,
    each a list of (ids, segs, logits leaf). Returns the step's effective objective, whose gradient
    is what WIT's scaled gradients are (DDP averages the ranks' scaled gradients)."""
    num_tokens, sums = 0, []
    for micro_batches in ranks:
        for mb in micro_batches:
            for ids, segs, logits in mb:  # one example per row; padding is IGNORE_INDEX (lines 104-108)
                labels, w = wit_preprocess(ids, segs, lp, lr)
                num_tokens += sum(1 for x in labels if x != IGNORE_INDEX)  # line 570
                keep = torch.tensor([x != IGNORE_INDEX for x in labels[1:]])  # lines 590-594
                logp = logp_of(logits, ids)
                sums.append(-(torch.tensor(w[1:], dtype=torch.float64)[keep] * logp[keep]).sum())  # line 600
    total = torch.stack(sums).sum()
    # Lines 611-624: grads × num_processes / num_tokens, then DDP's mean over ranks: Σ / num_tokens.
    return total / num_tokens


# -- GoLLIE, transcribed ------------------------------------------------------------------------
def gollie_loss_weight_mask(len_prompt: int, len_result: int, prompt_loss_weight: float) -> list[float]:
    """``src/dataset/dataset.py`` lines 155-174."""
    loss_weight_mask = [1.0] * (len_prompt + len_result)
    prompt_token_weight = len_result * prompt_loss_weight
    try:
        prompt_token_weight = prompt_token_weight * (len_result / (len_result * (1 - prompt_loss_weight)))
        prompt_token_weight = prompt_token_weight / len_prompt
    except ZeroDivisionError:
        prompt_token_weight = 0.0
    for i in range(len_prompt):
        loss_weight_mask[i] = prompt_token_weight
    return loss_weight_mask


def gollie_batch_loss(batch, alpha):
    """``src/trainer.py`` lines 288-300 over one micro-batch (weights padded with 0.0, lines 538-560:
    padding adds nothing to either sum)."""
    num, den = 0.0, 0.0
    for ids, segs, logits in batch:
        plen = prompt_len(segs)
        w = torch.tensor(gollie_loss_weight_mask(plen, len(ids) - plen, alpha)[1:], dtype=torch.float64)
        num = num + (-logp_of(logits, ids) * w).sum()
        den = den + w.sum()
    return num / den


# -- PLW (Stanford Alpaca's masking, weighted) ---------------------------------------------------
def plw_batch_loss(batch, plw):
    """Alpaca ``train.py`` line 123 masks the ``source_len`` prompt tokens (BOS and template
    included); PLW weights them ``plw`` instead, the target (output + EOS, line 141) 1; weighted mean."""
    num, den = 0.0, 0.0
    for ids, segs, logits in batch:
        source_len = prompt_len(segs)
        w = torch.tensor(([plw] * source_len + [1.0] * (len(ids) - source_len))[1:], dtype=torch.float64)
        num = num + (-logp_of(logits, ids) * w).sum()
        den = den + w.sum()
    return num / den


# -- ours ---------------------------------------------------------------------------------------
def ours(examples, logits, table, normalisation, layout, normaliser=None, **kw):
    """Our loss over ``examples`` laid out padded or packed, and the per-example logits it is a
    function of (leaves of the graph, so that gradients compare example by example)."""
    leaves = [x.clone().requires_grad_(True) for x in logits]
    if layout == "padded":
        ids, segs, _ = padded_batch(examples, [x.detach() for x in leaves])
        full = torch.zeros(len(examples), ids.shape[1], V, dtype=torch.float64)
        rows = []
        for i, x in enumerate(leaves):
            rows.append(torch.cat([x, full[i, len(x):]]))
        batch_logits, pos = torch.stack(rows), None
    else:
        ids, segs, pos, _ = packed_batch(examples, [x.detach() for x in leaves])
        rows = [[] for _ in range(ids.shape[0])]
        for i, x in enumerate(leaves):
            rows[i % ids.shape[0]].append(x)
        batch_logits = torch.stack([torch.cat(r + [torch.zeros(ids.shape[1] - sum(len(x) for x in r), V,
                                                                dtype=torch.float64)]) for r in rows])
    out = segment_weighted_loss(batch_logits, ids, segs, table, pos, normalisation, normaliser=normaliser, **kw)
    return out, leaves, (ids, segs, pos)


def assert_same_loss_and_grads(expected, expected_leaves, got, got_leaves, rel=1e-6):
    assert got.item() == pytest.approx(expected.item(), rel=rel)
    g_exp = torch.autograd.grad(expected, expected_leaves)
    g_got = torch.autograd.grad(got, got_leaves)
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=rel, atol=1e-12)


WIT_GRID = [(0.4, 0.6), (0.01, 0.6), (0.1, 1.0), (1.0, 1.0), (0.0, 1.0), (0.4, 0.0)]


def wit_as_run_table(lp, lr):
    return weight_table(lp, lr, {"template": lp})


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("lp,lr", WIT_GRID)
def test_wit_as_run_equals_wits_loop_over_ranks_and_accumulation(lp, lr, layout):
    """Two ranks × two micro-batches × 3 examples: WIT's loop and ours (template weighted λp,
    ``nonzero`` with the first-token count, the window's normaliser summed over micro-batches and
    ranks as the trainer does) give the same step objective and the same gradients."""
    examples = make_examples(seed=int(lp * 100 + lr * 10), n=12)
    logits = logits_for(examples, seed=7)
    groups = [(examples[i:i + 3], logits[i:i + 3]) for i in range(0, 12, 3)]  # rank r: groups 2r, 2r+1
    table = wit_as_run_table(lp, lr)
    normaliser = sum(loss_normaliser(ids, segs, table, pos, "nonzero", count_first_token=True)
                     for ids, segs, pos in (_layout(ex, lg, layout) for ex, lg in groups))
    got, got_leaves = 0.0, []
    for ex, lg in groups:
        out, leaves, _ = ours(ex, lg, table, "nonzero", layout, normaliser=normaliser, count_first_token=True)
        got, got_leaves = got + out.loss, got_leaves + leaves
    wit_leaves = [x.clone().requires_grad_(True) for x in logits]
    mbs = [[(ids, segs, wit_leaves[g * 3 + j]) for j, (ids, segs) in enumerate(groups[g][0])] for g in range(4)]
    expected = wit_window([mbs[0:2], mbs[2:4]], lp, lr)
    assert_same_loss_and_grads(expected, wit_leaves, got, got_leaves)


def _layout(ex, lg, layout):
    """``(input_ids, segment_ids, position_ids or None)`` of ``ex`` laid out as ``ours`` lays it out."""
    if layout == "padded":
        ids, segs, _ = padded_batch(ex, lg)
        return ids, segs, None
    ids, segs, pos, _ = packed_batch(ex, lg)
    return ids, segs, pos


def test_content_only_weighting_is_not_wits_and_each_part_is_needed():
    """The as-run options are what makes the difference: content-only λp (Eq. 4), or the template
    weighted without the first-token count, each miss WIT's loop by far more than the tolerance."""
    lp, lr = 0.4, 0.6
    examples = make_examples(seed=3, n=6)
    logits = logits_for(examples, seed=3)
    leaves = [x.clone().requires_grad_(True) for x in logits]
    expected = wit_window([[[(ids, segs, leaves[i]) for i, (ids, segs) in enumerate(examples)]]], lp, lr).item()
    content_only = ours(examples, logits, weight_table(lp, lr), "nonzero", "padded")[0].loss.item()
    no_count = ours(examples, logits, wit_as_run_table(lp, lr), "nonzero", "padded")[0].loss.item()
    full = ours(examples, logits, wit_as_run_table(lp, lr), "nonzero", "padded", count_first_token=True)[0].loss.item()
    assert full == pytest.approx(expected, rel=1e-6)
    assert not math.isclose(content_only, expected, rel_tol=1e-2)
    assert not math.isclose(no_count, expected, rel_tol=1e-2)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.2, 0.5, 0.9])
def test_example_share_equals_gollies_code(alpha, layout):
    """GoLLIE as run: its per-example weights (prompt = template + instruction, BOS counted) and its
    micro-batch weighted mean, against ``example_share`` with the template weighted 1 and the first
    token counted; one micro-batch of 5 examples, as GoLLIE normalises per micro-batch."""
    examples = make_examples(seed=11, n=5)
    logits = logits_for(examples, seed=11)
    table = weight_table(1.0, 1.0, {"template": 1.0})
    out, leaves, _ = ours(examples, logits, table, "example_share", layout, instruction_share=alpha,
                          count_first_token=True)
    g_leaves = [x.clone().requires_grad_(True) for x in logits]
    expected = gollie_batch_loss([(ids, segs, g_leaves[i]) for i, (ids, segs) in enumerate(examples)], alpha)
    assert_same_loss_and_grads(expected, g_leaves, out.loss, leaves)


def test_example_share_differs_from_window_share_over_several_examples():
    """GoLLIE's code weighs examples by their result length; ``share`` takes both means over the
    window: equal for one example, different for several (so the two options are both needed)."""
    examples = make_examples(seed=5, n=4)
    logits = logits_for(examples, seed=5)
    table = weight_table(1.0, 1.0, {"template": 1.0})
    per_example = ours(examples, logits, table, "example_share", "padded", instruction_share=0.3,
                       count_first_token=True)[0].loss.item()
    window = ours(examples, logits, table, "share", "padded", instruction_share=0.3)[0].loss.item()
    assert not math.isclose(per_example, window, rel_tol=1e-3)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("plw", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_plw_as_run_equals_alpacas_masking_weighted(plw, layout):
    """PLW as run: the whole Alpaca source (BOS, preamble, tags, instruction) weighted PLW, output +
    EOS 1, weighted mean; ours with the template weighted PLW under ``token``."""
    examples = make_examples(seed=21, n=6)
    logits = logits_for(examples, seed=21)
    out, leaves, _ = ours(examples, logits, weight_table(plw, 1.0, {"template": plw}), "token", layout)
    p_leaves = [x.clone().requires_grad_(True) for x in logits]
    expected = plw_batch_loss([(ids, segs, p_leaves[i]) for i, (ids, segs) in enumerate(examples)], plw)
    assert_same_loss_and_grads(expected, p_leaves, out.loss, leaves)


@pytest.mark.parametrize("normalisation", ["token", "nonzero", "sequence"])
def test_template_weight_zero_is_the_content_only_loss(normalisation):
    """``template: 0`` (the default) is exactly the Eq. 4 weighting: same table, same loss."""
    examples = make_examples(seed=9, n=5)
    logits = logits_for(examples, seed=9)
    a = ours(examples, logits, weight_table(0.3, 0.8), normalisation, "packed")[0].loss
    b = ours(examples, logits, weight_table(0.3, 0.8, {"template": 0.0}), normalisation, "packed")[0].loss
    assert torch.equal(weight_table(0.3, 0.8), weight_table(0.3, 0.8, {"template": 0.0}))
    assert a.item() == b.item()


def test_padding_never_carries_template_weight():
    """Padding is ``Segment.PAD``: with the template weighted, a padded batch gives the loss of the
    same examples without padding (the collators pad with PAD, never with the template id)."""
    examples = make_examples(seed=13, n=4)
    logits = logits_for(examples, seed=13)
    table = wit_as_run_table(0.4, 0.6)
    padded = ours(examples, logits, table, "nonzero", "padded", count_first_token=True)[0].loss.item()
    one_by_one_num = sum(
        ours([ex], [lg], table, "nonzero", "padded", count_first_token=True,
             normaliser=loss_normaliser(*_layout(examples, logits, "padded")[:2], table, None, "nonzero",
                                        count_first_token=True))[0].loss.item()
        for ex, lg in zip(examples, logits))
    assert padded == pytest.approx(one_by_one_num, rel=1e-9)


def test_as_run_options_validate():
    wit = IMArgs(im_instruction_weight=0.4, im_output_weight=0.6, im_role_weights={"template": 0.4},
                 im_loss_normalization="nonzero", im_count_first_token=True)
    assert wit.role_weight_map()["template"] == 0.4 and "template" in wit.trained_roles()
    IMArgs(im_loss_normalization="example_share", im_instruction_share=0.05, im_role_weights={"template": 1.0},
           im_count_first_token=True)
    for bad, message in [
        ({"im_count_first_token": True}, "im_count_first_token changes a count only under"),
        ({"im_loss_normalization": "example_share", "im_instruction_share": 1.0}, "in [0, 1) (at 1 no output"),
        ({"im_loss_normalization": "example_share"}, "needs im_instruction_share"),
        ({"im_mode": "it", "im_role_weights": {"template": 0.4}}, "gives template a positive weight"),
        ({"im_role_weights": {"template": -1.0}}, "im_role_weights['template'] must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            IMArgs(**bad)


def test_collators_pad_segments_with_pad(tokenizer):
    """Padding (and packing's tail padding) gets ``Segment.PAD``: a weighted template never reaches it."""
    pytest.importorskip("axolotl")
    from axolotl.utils.dict import DictDefault

    from instruction_modelling.axolotl.collator import collator_for

    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "segment_ids": [T, U, O]},
            {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [8, 9], "segment_ids": [T, O]}]
    padded = collator_for(DictDefault({"sample_packing": False}), is_eval=False)(
        tokenizer, return_tensors="pt", padding=True, pad_to_multiple_of=4)([dict(r) for r in rows])
    P = int(Segment.PAD)
    assert padded["segment_ids"].tolist() == [[T, U, O, P], [T, O, P, P]]
    cfg = DictDefault({"sample_packing": True, "attn_implementation": "sdpa", "model_config_type": "llama"})
    packed = collator_for(cfg, is_eval=False)(tokenizer, return_tensors="pt", padding=True, pad_to_multiple_of=8)(
        [[{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows]])
    assert packed["segment_ids"].tolist() == [[T, U, O, T, O, P, P, P]]


def test_wit_as_run_through_axolotl(tmp_path, tiny_model_dir):
    """The real CLI with WIT's as-run options: gradient accumulation 1 (4 padded rows) and 4 (one row
    each, no padding) log the same losses (so padding carries no template weight and the first-token
    count sums over the window), the template's loss is logged, and the loss is not the
    content-only one."""
    pytest.importorskip("axolotl")
    from cli_helpers import run_axolotl
    from test_axolotl_cli import small_train_file

    from instruction_modelling.axolotl.configs import cpu_config

    as_run = {"im_instruction_weight": 0.4, "im_output_weight": 0.6, "im_role_weights": {"template": 0.4},
              "im_loss_normalization": "nonzero", "im_count_first_token": True}
    content_only = {"im_instruction_weight": 0.4, "im_output_weight": 0.6, "im_loss_normalization": "nonzero"}
    runs = {}
    for name, mb, ga, options in (("ga1", 4, 1, as_run), ("ga4", 1, 4, as_run), ("content", 4, 1, content_only)):
        cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / name, mode="im", max_steps=2,
                         save_strategy="steps", save_steps=2, learning_rate=1e-2, micro_batch_size=mb, gradient_accumulation_steps=ga,
                         sample_packing=False, dataset_prepared_path=str(tmp_path / f"{name}_prepared"), **options)
        run = run_axolotl("train", cfg, tmp_path / f"{name}.yml")
        assert run.returncode == 0, run.output[-3000:]
        runs[name] = [h for h in run.log_history() if "loss" in h]
        said = "'template': 0.4" in run.output and "template weight 0.4" in run.output
        assert said == (options is as_run), run.output[-3000:]  # the weighting is logged at the first step
    assert len(runs["ga1"]) == len(runs["ga4"]) == 2
    for a, b in zip(runs["ga1"], runs["ga4"]):
        for key in ("loss", "instruction_loss", "output_loss", "template_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-4, abs=2e-4), (key, a, b)
    assert "template_loss" not in runs["content"][0]
    assert not math.isclose(float(runs["content"][0]["loss"]), float(runs["ga1"][0]["loss"]), rel_tol=1e-3)


def test_preview_shows_the_template_weight(tiny_model_dir, tmp_path):
    """``im preview`` (the real command): with the template weighted, the header names its weight and
    the template's tokens are marked as carrying loss (``[tok]M``); without, neither."""
    pytest.importorskip("axolotl")
    from test_cli import im

    from instruction_modelling.axolotl.configs import cpu_config, write_config
    from instruction_modelling.quickstart.sample_data import TRAIN_FILE

    outputs = {}
    for name, options in (("eq4", {}), ("wit", {"im_instruction_weight": 0.4, "im_output_weight": 0.6,
                                               "im_role_weights": {"template": 0.4},
                                               "im_loss_normalization": "nonzero", "im_count_first_token": True})):
        cfg = write_config(cpu_config(tiny_model_dir, TRAIN_FILE, tmp_path / name, **options), tmp_path / f"{name}.yml")
        proc = im("preview", str(cfg), "--rows", "1", "--plain", timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = " ".join(proc.stdout.split())  # the header is one line; a row may wrap
    assert "template weight 0.4" in outputs["wit"] and "first token counted" in outputs["wit"]
    assert "]M" in outputs["wit"]
    assert "template weight" not in outputs["eq4"] and "]M" not in outputs["eq4"]
    carry = {k: int(re.search(r"tokens, (\d+) carry loss", v).group(1)) for k, v in outputs.items()}
    assert carry["wit"] > carry["eq4"]


def _sentencepiece_like(texts):
    """LLaMA-2's fast tokenizer as shipped (legacy ``tokenizer.json``): a normalizer that prepends "▁"
    to every run of text between special tokens and turns spaces into "▁", pieces within words, BOS added
    by the tokenizer itself, "</s>" EOS; decoding strips the leading space."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # SentencePiece pieces never cross a "▁" word start (split_by_whitespace).
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=sorted(set(string.printable) | {"▁"}),
                                                        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["sentencepiece", "merging_bpe"])
def test_plw_recipe_weights_the_tokens_stanford_alpaca_masks(kind):
    """Token level, with real tokenizers: for Alpaca rows rendered by ``recipes/plw``'s template, the
    tokens are Stanford Alpaca's (``train.py`` lines 31-40, 141: source + output + EOS, BOS added by
    the tokenizer) and the ones our segments weight with PLW are exactly the ``source_len`` tokens
    its line 123 masks (the source tokenised alone); output and EOS get 1. Tokens that straddle
    template and instruction text (``\n`` merged into a word) are prompt either way: weight PLW."""
    import json
    from pathlib import Path

    import yaml

    from agentic_corpus import merging_tokenizer
    from instruction_modelling.core.segments import ChatRenderer, RowEncoder

    here = Path(__file__).parent
    rows = [r for r in json.loads((here / "fixtures" / "alpagasus_triples.json").read_text()) if not r.get("input", "").strip()]
    recipe = yaml.safe_load((here.parent / "recipes" / "plw" / "alpagasus_alpaca_5k_plw_0.1.yml").read_text())
    template = recipe["chat_template_jinja"]
    source_fmt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")  # train.py prompt_no_input
    # Trained on sources and outputs apart (as a general tokenizer sees them), so that merges across
    # the source/output boundary are the exception they are in LLaMA's vocabulary.
    texts = [t for r in rows for t in (source_fmt.format(instruction=r["instruction"]), r["output"])] * 30
    if kind == "sentencepiece":
        tok = _sentencepiece_like(texts)
    else:  # merges punctuation with what follows; BOS added by the template, not by the tokenizer
        tok = merging_tokenizer(extra_texts=texts)
    plw = 0.1
    table = weight_table(plw, 1.0, {"template": plw})
    encoder = RowEncoder(tok, ChatRenderer(tok, template))
    checked = 0
    for r in rows:
        ex = encoder.encode({"messages": [{"role": "user", "content": r["instruction"]},
                                          {"role": "assistant", "content": r["output"]}]})
        source = source_fmt.format(instruction=r["instruction"])
        bos = [] if kind == "sentencepiece" else [tok.bos_token_id]  # the template's {{ bos_token }}
        theirs = bos + tok(source + r["output"] + tok.eos_token)["input_ids"]
        source_len = len(bos + tok(source)["input_ids"])
        assert ex.input_ids == theirs, (kind, r)
        weights = [float(table[s]) for s in ex.segment_ids]
        assert weights == pytest.approx([plw] * source_len + [1.0] * (len(theirs) - source_len)), (kind, r)
        checked += 1
    assert checked == len(rows)
