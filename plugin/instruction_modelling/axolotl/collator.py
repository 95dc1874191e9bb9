"""Collators that carry ``segment_ids`` through padding and sample packing.

Axolotl's collators pad ``labels`` and ``position_ids`` by hand and leave every other column to
``tokenizer.pad``, which cannot pad ``segment_ids`` (it crashes, or with one packed row silently
returns a shorter column). These subclasses pad ``segment_ids`` with ``Segment.PAD`` (never a
token of an example, never any loss, whatever weight the template gets) to exactly the length the
labels get, then defer to Axolotl.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from axolotl.utils.collators import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from instruction_modelling.core.segments import Segment

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
                pad = np.full(length - len(seg), int(Segment.PAD), dtype=np.int64)
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


def collator_kwargs(cfg, cls, is_eval: bool) -> dict:
    """Keyword arguments Axolotl would give its own class of this collator.

    Axolotl 0.21 lets its packing collators emit flash-attention varlen metadata (``cu_seq_lens``),
    which spares transformers several host syncs per layer, but it checks for its exact classes, so
    our subclasses would lose the fast path. The same conditions as Axolotl's builder, for our classes;
    nothing on versions whose collators have no such field.
    """
    if "emit_fa_varlen_kwargs" not in {f.name for f in dataclasses.fields(cls)}:
        return {}
    from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES
    from transformers.utils.generic import is_flash_attention_requested

    packing = cfg.eval_sample_packing if is_eval else cfg.sample_packing
    dispatches = (cfg.accelerator_config or {}).get("dispatch_batches")
    if dispatches is None:
        dispatches = bool(cfg.streaming or cfg.pretraining_dataset)
    fast = (
        issubclass(cls, (V2BatchSamplerDataCollatorForSeq2Seq, BatchSamplerDataCollatorForSeq2Seq))
        and packing
        and is_flash_attention_requested(requested_attention_implementation=cfg.attn_implementation)
        and cfg.fa_varlen_kwargs_in_collator is not False
        and cfg.model_config_type in SUPPORTED_MULTIPACK_MODEL_TYPES
        and not dispatches
    )  # Axolotl also excludes DeepSpeed sequence parallelism, which the plugin refuses
    return {"emit_fa_varlen_kwargs": True} if fast else {}
