"""Axolotl 0.21's packed flash-attention fast path survives our collator subclasses.

Axolotl's builder switches ``emit_fa_varlen_kwargs`` on only for its own exact collator classes;
the plugin returns the same keyword for its subclasses under the same conditions. On Axolotl
versions whose collators have no such field (0.19), nothing is passed.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("axolotl")
from axolotl.utils.collators import V2BatchSamplerDataCollatorForSeq2Seq  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

from instruction_modelling.axolotl.collator import collator_for, collator_kwargs  # noqa: E402

HAS_FAST_PATH = "emit_fa_varlen_kwargs" in {f.name for f in dataclasses.fields(V2BatchSamplerDataCollatorForSeq2Seq)}


def cfg(**overrides):
    base = {"sample_packing": True, "eval_sample_packing": True, "attn_implementation": "flash_attention_2",
            "model_config_type": "llama"}
    return DictDefault({**base, **overrides})


@pytest.mark.parametrize("overrides, fast", [
    ({}, True),
    ({"attn_implementation": "sdpa"}, False),
    ({"sample_packing": False, "eval_sample_packing": False}, False),
    ({"fa_varlen_kwargs_in_collator": False}, False),
    ({"model_config_type": "not_a_multipack_model"}, False),
    ({"accelerator_config": {"dispatch_batches": True}}, False),
])
def test_fast_path_keyword_follows_axolotls_conditions(overrides, fast):
    c = cfg(**overrides)
    cls = collator_for(c, is_eval=False)
    kwargs = collator_kwargs(c, cls, is_eval=False)
    assert kwargs == ({"emit_fa_varlen_kwargs": True} if fast and HAS_FAST_PATH else {})


@pytest.mark.skipif(not HAS_FAST_PATH, reason="this Axolotl's collators have no flash-attention varlen fast path")
def test_our_packing_collator_emits_varlen_metadata(tokenizer):
    c = cfg()
    cls = collator_for(c, is_eval=False)
    collator = cls(tokenizer, return_tensors="pt", padding=True, **collator_kwargs(c, cls, is_eval=False))
    features = [[{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "position_ids": [0, 1, 2],
                  "segment_ids": [0, 1, 3]},
                 {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [8, 9], "position_ids": [0, 1],
                  "segment_ids": [0, 3]}]]
    batch = collator(features)
    assert batch["segment_ids"].tolist() == [[0, 1, 3, 0, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5], sorted(batch)
