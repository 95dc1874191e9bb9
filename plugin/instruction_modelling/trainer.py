"""``IMTrainer``: Axolotl's trainer with the segment-weighted loss and per-segment metrics.

It keeps ``AxolotlTrainer.compute_loss`` (token accounting, model quirks) and plugs the loss in
through HF's ``compute_loss_func``. HF then passes the window's normaliser, which this trainer
computes in ``_get_num_items_in_batch`` from ``segment_ids`` (Σ weights, or examples), so the
loss is exact under gradient accumulation and across data-parallel ranks.

Logged: ``instruction_loss`` and ``output_loss`` (token-weighted means since the last log) each
logging step, and ``eval_instruction_loss`` / ``eval_output_loss`` (with the token counts they
average, ``eval_instruction_tokens`` / ``eval_output_tokens``) at evaluation. With
``im_kl_coef > 0`` also ``kl`` / ``eval_kl``: the mean per-token KL to the reference over the
``im_kl_segments`` tokens. The output-token
loss is comparable across IT, IM and weighted runs (the paper's Figure 3 measure); ``loss`` and
``eval_loss`` are the weighted training objective and are not.
"""

from __future__ import annotations

import logging

import torch
from axolotl.core.trainers.base import AxolotlTrainer

from .args import IMArgs
from .kl import AdapterReference, CopyReference, kl_mask
from .losses import loss_normaliser, segment_weighted_loss, weight_table

LOG = logging.getLogger("axolotl.integrations.instruction_modelling")

SEGMENT_COLUMN = "segment_ids"


class _SegmentMeter:
    """Token-weighted running means of the per-segment CE (and KL), reduced across ranks when logged."""

    def __init__(self):
        self.reset()

    def reset(self):
        # instr_sum, instr_n, out_sum, out_n, kl_sum, kl_n
        self.sums = torch.zeros(6, dtype=torch.float64)

    def add(self, out):
        zero = out.output_count.new_zeros(())
        values = [out.instruction_sum, out.instruction_count, out.output_sum, out.output_count,
                  out.kl_sum if out.kl_sum is not None else zero, out.kl_count if out.kl_count is not None else zero]
        self.sums += torch.stack([v.detach().to("cpu", torch.float64) for v in values])

    def means(self, accelerator, with_counts: bool = False) -> dict[str, float]:
        sums = self.sums
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        result = {}
        if sums[1] > 0:
            result["instruction_loss"] = float(sums[0] / sums[1])
        if sums[3] > 0:
            result["output_loss"] = float(sums[2] / sums[3])
        if sums[5] > 0:
            result["kl"] = float(sums[4] / sums[5])
        if with_counts:
            result["instruction_tokens"] = int(sums[1])
            result["output_tokens"] = int(sums[3])
        self.reset()
        return result


class IMTrainer(AxolotlTrainer):
    """Trainer for ``type: instruction_modelling`` datasets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_loss_func = self._segment_loss
        self._meters = {"train": _SegmentMeter(), "eval": _SegmentMeter()}
        self._eval_prefix = "eval"
        self._im_args: IMArgs | None = None
        self._table: torch.Tensor | None = None
        self._batch: dict | None = None
        self._kl_reference = None

    # -- configuration (``axolotl_cfg`` is set right after __init__ by Axolotl's builder) --
    @property
    def im_args(self) -> IMArgs:
        if self._im_args is None:
            cfg = getattr(self, "axolotl_cfg", None)
            self._im_args = IMArgs.from_cfg(cfg) if cfg is not None else IMArgs()
        return self._im_args

    @property
    def weight_table(self) -> torch.Tensor:
        if self._table is None:
            w = self.im_args.role_weight_map()
            self._table = weight_table(w["user"], w["assistant"], w)
        return self._table

    # -- KL reference --------------------------------------------------------------------
    @property
    def kl_enabled(self) -> bool:
        return self.im_args.im_kl_coef > 0

    def init_kl_reference(self):
        """Build the KL reference before the first update (called from ``post_trainer_create``)."""
        if not self.kl_enabled or self._kl_reference is not None:
            return self._kl_reference
        cfg = getattr(self, "axolotl_cfg", None)
        mode = self.im_args.kl_reference_mode(cfg.get("adapter") if cfg is not None else None)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if mode == "adapter":
            self._kl_reference = AdapterReference(unwrapped)
        elif self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self._kl_reference = CopyReference(self._load_sharded_reference(cfg))
        else:
            if self.state.global_step > 0 or (cfg is not None and cfg.get("resume_from_checkpoint")):
                raise RuntimeError(
                    "im_kl_reference: copy takes the reference before the first update, but this model has "
                    "already been trained (resumed run); start from the base model"
                )
            self._kl_reference = CopyReference(CopyReference.frozen_copy(unwrapped))
        LOG.info(f"KL regularisation: λ={self.im_args.im_kl_coef}, type={self.im_args.im_kl_type}, "
                 f"segments={self.im_args.im_kl_segments}, reference={mode}")
        return self._kl_reference

    def _load_sharded_reference(self, cfg):
        """The base model loaded again and prepared like TRL's DPO reference (DeepSpeed / FSDP)."""
        from axolotl.loaders import ModelLoader

        model, _ = ModelLoader(cfg, self.processing_class, reference_model=True).load()
        model.eval()
        model.requires_grad_(False)
        model.config.use_cache = False
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(model, self.accelerator)

    @property
    def kl_reference(self):
        """The reference (``kl.AdapterReference`` or ``kl.CopyReference``), built on first use."""
        return self._kl_reference if self._kl_reference is not None else self.init_kl_reference()

    # -- data plumbing -------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and SEGMENT_COLUMN not in self._signature_columns:
            self._signature_columns.append(SEGMENT_COLUMN)

    def _require_segments(self, batch):
        if SEGMENT_COLUMN not in batch:
            raise KeyError(
                "the batch has no 'segment_ids': IMTrainer needs datasets of type instruction_modelling "
                f"(batch keys: {sorted(batch)}); refusing to fall back to the unweighted loss"
            )

    def _get_num_items_in_batch(self, batch_samples, device):
        """The window's loss normaliser (shape [] or, for share, [2]), summed over micro-batches and ranks."""
        total = torch.zeros((), dtype=torch.float32)
        for batch in batch_samples:
            self._require_segments(batch)
            total = total + loss_normaliser(
                batch["input_ids"],
                batch[SEGMENT_COLUMN],
                self.weight_table,
                batch.get("position_ids"),
                self.im_args.im_loss_normalization,
            ).cpu()
        total = total.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1, -1)).sum(0).reshape(total.shape)
        return total

    # -- loss ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._require_segments(inputs)
        inputs = dict(inputs)
        self._batch = {
            "input_ids": inputs["input_ids"],
            "segment_ids": inputs.pop(SEGMENT_COLUMN),
            "position_ids": inputs.get("position_ids"),
            "forward": {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs},
            "meter": self._meters["train" if model.training else "eval"],
        }
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._batch = None

    def _segment_loss(self, outputs, labels, num_items_in_batch=None):
        b = self._batch
        a = self.im_args
        reference = mask = None
        if self.kl_enabled:
            reference = self.kl_reference(b["forward"])
            mask = kl_mask(b["segment_ids"], b["position_ids"], a.im_kl_segments)
        out = segment_weighted_loss(
            outputs.logits,
            b["input_ids"],
            b["segment_ids"],
            self.weight_table,
            b["position_ids"],
            a.im_loss_normalization,
            normaliser=num_items_in_batch,
            kl_reference=reference,
            kl_mask=mask,
            kl_coef=a.im_kl_coef,
            kl_type=a.im_kl_type,
            chunk_size=a.im_loss_chunk_size,
            instruction_share=a.im_instruction_share or 0.0,
        )
        b["meter"].add(out)
        return out.loss

    # -- metrics -------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        self._meters["eval"].reset()
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._meters["train"].means(self.accelerator))
        elif f"{self._eval_prefix}_loss" in logs:
            for key, value in self._meters["eval"].means(self.accelerator, with_counts=True).items():
                logs[f"{self._eval_prefix}_{key}"] = value
        return super().log(logs, start_time)
