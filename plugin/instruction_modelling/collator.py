"""Collators that carry ``segment_ids`` through padding and sample packing.

Axolotl's collators pad ``labels`` and ``position_ids`` by hand and leave every other column to
``tokenizer.pad``, which cannot pad ``segment_ids`` (it crashes, or with one packed row silently
returns a shorter column). These subclasses pad ``segment_ids`` with 0 (= template: no loss) to
exactly the length the labels get, then defer to Axolotl.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from axolotl.utils.collators import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from .trainer import SEGMENT_COLUMN


@dataclass
class SegmentDataCollatorForSeq2Seq(DataCollatorForSeq2Seq):
    """``DataCollatorForSeq2Seq`` that also pads ``segment_ids``."""

    def __call__(self, features, return_tensors=None):
        if features and SEGMENT_COLUMN in features[0]:
            length = max(len(f[SEGMENT_COLUMN]) for f in features)
            if self.pad_to_multiple_of is not None:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            right = self.tokenizer.padding_side == "right"
            for f in features:
                seg = np.asarray(f[SEGMENT_COLUMN], dtype=np.int64)
                pad = np.zeros(length - len(seg), dtype=np.int64)
                f[SEGMENT_COLUMN] = np.concatenate([seg, pad] if right else [pad, seg])
        return super().__call__(features, return_tensors=return_tensors)


@dataclass
class SegmentV2BatchSamplerDataCollatorForSeq2Seq(V2BatchSamplerDataCollatorForSeq2Seq, SegmentDataCollatorForSeq2Seq):
    """Packing collator (position-id based attention) that pads ``segment_ids``."""


@dataclass
class SegmentBatchSamplerDataCollatorForSeq2Seq(BatchSamplerDataCollatorForSeq2Seq, SegmentDataCollatorForSeq2Seq):
    """Packing collator (flash-attention varlen) that pads ``segment_ids``."""


def collator_for(cfg, is_eval: bool):
    """The collator class Axolotl would pick for this config, with ``segment_ids`` support."""
    packing = cfg.eval_sample_packing if is_eval else cfg.sample_packing
    if not packing:
        return SegmentDataCollatorForSeq2Seq
    from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

    if (
        cfg.attn_implementation == "flex_attention"
        or cfg.model_config_type in SUPPORTED_MULTIPACK_MODEL_TYPES
        or (cfg.model_config_type == "llama" and cfg.attn_implementation != "flash_attention_2")
    ):
        return SegmentV2BatchSamplerDataCollatorForSeq2Seq
    return SegmentBatchSamplerDataCollatorForSeq2Seq
