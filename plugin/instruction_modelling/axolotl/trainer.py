"""``IMTrainer``: Axolotl's trainer with the segment-weighted loss and per-segment metrics.

It keeps ``AxolotlTrainer.compute_loss`` (token accounting, model quirks) and plugs the loss in
through HF's ``compute_loss_func``. HF then passes the window's normaliser, which this trainer
computes in ``_get_num_items_in_batch`` from ``segment_ids`` (Σ weights, or examples) and sums
over all data-parallel ranks whatever ``average_tokens_across_devices`` says; each rank's loss is
scaled so that DDP's mean of the gradients is the gradient of the global weighted mean. The loss is
therefore exact under gradient accumulation and across ranks.

Loss implementation (``im_loss_impl``, resolved and logged once at the first step): the model is
called through its wrapper with ``logits_to_keep=1`` (so only the last position's logits are built),
a forward hook on the decoder keeps the final hidden states, and the loss is computed from them and
the model's own output layer chunk by chunk (``losses.HiddenStates``), or through Cut Cross
Entropy's kernels. ``logits`` keeps the full-logits path; it is also the fallback, with a log line,
when the output layer cannot be reproduced (checked once against the model's own logits) or is
sharded where it cannot be gathered (FSDP1, an FSDP2 unit of its own; FSDP2: ``fsdp.py``). Under
DeepSpeed ZeRO-3 the chunked loss runs as the output layer's forward (``deepspeed.py``).
Evaluation takes the same path unless logits are returned
(``prediction_loss_only: false``).

Logged: ``instruction_loss`` and ``output_loss`` (token-weighted means since the last log) each
logging step, and ``eval_instruction_loss`` / ``eval_output_loss`` (with the token counts they
average, ``eval_instruction_tokens`` / ``eval_output_tokens``) at evaluation. With
``im_kl_coef > 0`` also ``kl`` / ``eval_kl``: the mean per-token KL to the reference over the
``im_kl_segments`` tokens. The output-token
loss is comparable across IT, IM and weighted runs (the paper's Figure 3 measure); ``loss`` and
``eval_loss`` are the weighted training objective and are not. The meters stay on the device and
reach the host only when logged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F
from axolotl.core.trainers.base import AxolotlTrainer

from instruction_modelling.core.kl import AdapterReference, CopyReference, EvalMode, kl_mask
from instruction_modelling.core.losses import (
    HiddenStates,
    LogitTransform,
    kl_chunk_counts,
    loss_normaliser,
    segment_weighted_loss,
    weight_table,
)
from instruction_modelling.core.options import MEMORY_EFFICIENT_CE_OPTIONS, IMArgs

from . import fsdp
from .deepspeed import (
    gather_reference_head,
    is_zero3_module,
    restore_hf_deepspeed_config,
    zero3_blocker,
    zero3_through_head,
)

LOG = logging.getLogger("axolotl.integrations.instruction_modelling")

SEGMENT_COLUMN = "segment_ids"


class _SegmentMeter:
    """Token-weighted running means of the per-segment CE (and KL), kept on the device and reduced
    across ranks (one host transfer) only when logged."""

    def __init__(self):
        self.reset()

    def reset(self):
        # instr_sum, instr_n, out_sum, out_n, kl_sum, kl_n, template_sum, template_n
        self.sums = None

    def add(self, out):
        zero = out.output_count.new_zeros(())
        values = [out.instruction_sum, out.instruction_count, out.output_sum, out.output_count,
                  out.kl_sum if out.kl_sum is not None else zero, out.kl_count if out.kl_count is not None else zero,
                  out.template_sum if out.template_sum is not None else zero,
                  out.template_count if out.template_count is not None else zero]
        dtype = torch.float32 if out.output_count.device.type == "mps" else torch.float64
        step = torch.stack([v.detach().to(dtype) for v in values])
        self.sums = step if self.sums is None else self.sums + step

    def means(self, accelerator, with_counts: bool = False, template: bool = False) -> dict[str, float]:
        """The logged means (and, ``with_counts``, token counts); ``template``: the template's too (set
        when the template carries loss)."""
        sums = self.sums if self.sums is not None else torch.zeros(8, dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        sums = sums.cpu()
        result = {}
        if sums[1] > 0:
            result["instruction_loss"] = float(sums[0] / sums[1])
        if sums[3] > 0:
            result["output_loss"] = float(sums[2] / sums[3])
        if sums[5] > 0:
            result["kl"] = float(sums[4] / sums[5])
        if template and sums[7] > 0:
            result["template_loss"] = float(sums[6] / sums[7])
        if with_counts:
            result["instruction_tokens"] = int(sums[1])
            result["output_tokens"] = int(sums[3])
            if template:
                result["template_tokens"] = int(sums[7])
        self.reset()
        return result


def logit_transform(config) -> LogitTransform:
    """What a transformers model does to ``lm_head``'s output, read from its config (Gemma-2/3
    ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``)."""
    text = getattr(config, "text_config", None) or config
    softcap = getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    divisor = getattr(text, "logits_scaling", None)
    return LogitTransform(
        multiplier=float(scale) if scale not in (None, 1, 1.0) else None,
        divisor=float(divisor) if divisor not in (None, 1, 1.0) else None,
        softcap=float(softcap) if softcap else None,
    )


class _HiddenCapture:
    """Forward hook on the decoder that keeps its final hidden states of the next forward pass."""

    def __init__(self):
        self.armed = False
        self.hidden = None
        self.handle = None
        self.device = "cpu"
        self.autocast_dtype = None  # accelerate runs the model's forward, not the loss, under autocast

    def attach(self, decoder: torch.nn.Module):
        if self.handle is None:
            self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.armed and self.hidden is None:
            self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self.device = self.hidden.device.type
            self.autocast_dtype = torch.get_autocast_dtype(self.device) if torch.is_autocast_enabled(self.device) else None

    def autocast(self):
        """The autocast the model's last forward ran under (a no-op without one)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.autocast_dtype)

    def arm(self):
        self.armed, self.hidden = True, None

    def take(self) -> torch.Tensor | None:
        hidden, self.armed, self.hidden = self.hidden, False, None
        return hidden


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
        self._loss_impl: str | None = None  # resolved at the first step: chunked, cce or logits
        self._capture = _HiddenCapture()
        self._return_logits = False
        self._device_tables: dict = {}
        self._kl_counts: dict = {}  # id(input_ids) -> KL rows per loss chunk, counted once per step

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
        transform = logit_transform(unwrapped.config)
        if mode == "adapter":
            self._kl_reference = AdapterReference(unwrapped, transform)
        elif self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self._kl_reference = CopyReference(self._load_sharded_reference(cfg), transform)
        else:
            if self.state.global_step > 0 or (cfg is not None and cfg.get("resume_from_checkpoint")):
                raise RuntimeError(
                    "im_kl_reference: copy takes the reference before the first update, but this model has "
                    "already been trained (resumed run); start from the base model"
                )
            self._kl_reference = CopyReference(CopyReference.frozen_copy(unwrapped), transform)
        LOG.info(f"KL regularisation: λ={self.im_args.im_kl_coef}, type={self.im_args.im_kl_type}, "
                 f"segments={self.im_args.im_kl_segments}, reference={mode}")
        return self._kl_reference

    def _load_sharded_reference(self, cfg):
        """The base model loaded again and prepared like TRL's DPO reference (DeepSpeed / FSDP)."""
        from axolotl.loaders import ModelLoader

        model, _ = ModelLoader(cfg, self.processing_class, reference_model=True).load()
        restore_hf_deepspeed_config(self.args)  # else a ZeRO-3 run saves an empty model
        model.eval()
        model.requires_grad_(False)
        model.config.use_cache = False
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        if self.accelerator.is_fsdp2:
            return fsdp.shard_like_policy(model, self.accelerator)
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

    def _table_on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = self.weight_table.to(device)
        return self._device_tables[key]

    def _get_num_items_in_batch(self, batch_samples, device):
        """The window's loss normaliser (Σ weights or number of examples; whatever shape
        ``loss_normaliser`` returns), summed over its micro-batches and over all data-parallel
        ranks, whatever ``average_tokens_across_devices`` says. Stays on the device."""
        total = None
        counts = []
        for batch in batch_samples:
            self._require_segments(batch)
            ids = batch["input_ids"]
            part = loss_normaliser(
                ids,
                batch[SEGMENT_COLUMN],
                self._table_on(ids.device),
                batch.get("position_ids"),
                self.im_args.im_loss_normalization,
                self.im_args.im_instruction_share or 0.0,
                self.im_args.im_count_first_token,
            )
            total = part if total is None else total + part
            if self.kl_enabled:
                # The chunked KL needs its rows per chunk on the host: one transfer for the whole step
                # here instead of one per micro-batch in the loss.
                mask = kl_mask(batch[SEGMENT_COLUMN], batch.get("position_ids"), self.im_args.im_kl_segments)
                counts.append(kl_chunk_counts(F.pad(mask, (0, 1)), self.im_args.im_loss_chunk_size))
        self._kl_counts = {}
        if counts:
            host, start = torch.cat(counts).tolist(), 0
            for batch, c in zip(batch_samples, counts):
                self._kl_counts[id(batch["input_ids"])] = host[start:start + len(c)]
                start += len(c)
        total = total.to(device=device, dtype=torch.float32)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return total

    # -- loss implementation -------------------------------------------------------------
    def _parts(self, model):
        """(unwrapped model, its transformers base model, decoder, output layer) or Nones."""
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        return unwrapped, base, decoder, head

    def _why_not_hidden(self, model, inputs) -> str | None:
        """Why the loss cannot come from hidden states for this model (None when it can)."""
        unwrapped, base, decoder, head = self._parts(model)
        if decoder is None or head is None:
            return f"{type(base).__name__} exposes no get_decoder()/get_output_embeddings()"
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return f"{type(base).__name__}.forward has no logits_to_keep"
        if self.is_fsdp_enabled:
            if not self.accelerator.is_fsdp2:
                return "FSDP1 exposes the lm_head weight only inside its own forward (use fsdp_version: 2)"
            blocker = fsdp.head_blocker(model, head)
            if blocker is not None:
                return blocker
        if is_zero3_module(head) and (blocker := zero3_blocker(head)) is not None:
            return blocker
        # The model's own logits of a few tokens against the head applied to its hidden states:
        # catches any transform after the lm_head that logit_transform() does not know about.
        transform = logit_transform(base.config)
        probe = {"input_ids": inputs["input_ids"][:1, :16]}
        try:
            with torch.no_grad(), EvalMode(unwrapped):
                self._capture.attach(decoder)
                self._capture.arm()
                logits = unwrapped(**probe, use_cache=False).logits
                hidden = self._capture.take()
                if self.is_fsdp_enabled:
                    fsdp.gather(model, head)
                with self._capture.autocast():  # the head in the dtype the model's forward used
                    ours = transform(head(hidden)) if hidden is not None else None
        except Exception as err:  # a model that needs more than input_ids (multimodal, ...)
            self._capture.take()
            return f"checking the head against the model's logits failed ({type(err).__name__}: {err})"
        if ours is None or ours.shape != logits.shape:
            return "the decoder's hook did not see the hidden states of the lm_head"
        if not torch.allclose(ours.float(), logits.float(), rtol=1e-4, atol=1e-4 * float(logits.abs().max()) + 1e-6):
            return (f"{type(base).__name__}'s logits are not transform(lm_head(hidden)) with {transform} "
                    "(an unknown post-processing of the logits)")
        return None

    def _resolve_loss_impl(self, model, inputs) -> str:
        """Choose chunked / cce / logits once, and log the choice and why."""
        a = self.im_args
        cfg = getattr(self, "axolotl_cfg", None) or {}
        requested = a.im_loss_impl
        kernels = [k for k in MEMORY_EFFICIENT_CE_OPTIONS if cfg.get(k)]
        if requested == "logits":
            impl, why = "logits", "requested"
        else:
            blocker = self._why_not_hidden(model, inputs)
            if blocker is not None:
                if requested != "auto" or kernels:
                    also = f" and {', '.join(kernels)} cannot save memory under a custom loss" if kernels else ""
                    raise ValueError(
                        f"im_loss_impl: {requested} cannot compute the loss from hidden states: {blocker}{also}; "
                        f"set im_loss_impl: logits{' and remove ' + ', '.join(kernels) if kernels else ''}"
                    )
                impl, why = "logits", f"fallback: {blocker}"
            else:
                impl, why = self._choose_hidden_impl(requested, model)
        if kernels and impl != "logits":
            why += f"; takes over {', '.join(kernels)} (its patched forward would build full logits under IM's loss)"
        LOG.info(f"im_loss_impl: {impl} ({why})")
        weights = {r: w for r, w in self.im_args.role_weight_map().items() if w > 0}
        LOG.info(f"IM loss weights {weights}; {self.im_args.weighting_summary()}")
        return impl

    def _choose_hidden_impl(self, requested: str, model) -> tuple[str, str]:
        _, base, _, head = self._parts(model)
        cce_blocker = None
        if importlib.util.find_spec("cut_cross_entropy") is None:
            cce_blocker = "cut_cross_entropy not installed"
        elif is_zero3_module(head):
            cce_blocker = "under DeepSpeed ZeRO-3 the chunked loss is the one that gathers the sharded lm_head"
        elif head.weight.device.type != "cuda":
            cce_blocker = "cut_cross_entropy needs CUDA"
        elif type(head) is not torch.nn.Linear or head.bias is not None:
            cce_blocker = f"cut_cross_entropy needs a plain bias-free nn.Linear lm_head, not {type(head).__name__}"
        elif not logit_transform(base.config).is_identity and logit_transform(base.config).softcap is None:
            cce_blocker = "cut_cross_entropy cannot scale the logits"
        if requested == "cce":
            if cce_blocker:
                raise ValueError(f"im_loss_impl: cce is not possible here ({cce_blocker}); use im_loss_impl: chunked")
            return "cce", "requested" + ("; with the KL term on, the chunked path computes CE and KL together" if self.kl_enabled else "")
        if requested == "chunked":
            return "chunked", "requested"
        if cce_blocker:
            return "chunked", cce_blocker
        return "cce", "auto: CUDA and cut_cross_entropy available" + (
            "; with the KL term on, the chunked path computes CE and KL together" if self.kl_enabled else "")

    # -- loss ---------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._return_logits = not prediction_loss_only  # metrics need real logits
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._return_logits = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._require_segments(inputs)
        inputs = dict(inputs)
        if self._loss_impl is None:
            self._loss_impl = self._resolve_loss_impl(model, inputs)
        from_hidden = self._loss_impl != "logits" and not (return_outputs and self._return_logits)
        self._batch = {
            "input_ids": inputs["input_ids"],
            "segment_ids": inputs.pop(SEGMENT_COLUMN),
            "position_ids": inputs.get("position_ids"),
            "forward": {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs},
            "meter": self._meters["train" if model.training else "eval"],
            "model": model,
            "from_hidden": from_hidden,
            "scaled": num_items_in_batch is not None,
            "kl_counts": self._kl_counts.pop(id(inputs["input_ids"]), None),
        }
        if from_hidden:
            _, _, decoder, _ = self._parts(model)
            self._capture.attach(decoder)
            self._capture.arm()
            inputs["logits_to_keep"] = 1  # the model builds the last position's logits only
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._batch = None
            self._capture.take()

    def _segment_loss(self, outputs, labels, num_items_in_batch=None):
        b = self._batch
        a = self.im_args
        scores = outputs.logits
        hidden = self._capture.take() if b["from_hidden"] else None  # before the reference's forward (same decoder)
        reference = mask = release = None
        if self.kl_enabled:
            if self.is_fsdp_enabled:  # the logits path releases a copy's units after its backward pass
                release = fsdp.gather_reference(self, b["model"], None if b["from_hidden"] else scores)
            with self._capture.autocast():  # the reference's forward as numerically as the policy's
                reference = self.kl_reference(b["forward"])
            mask = kl_mask(b["segment_ids"], b["position_ids"], a.im_kl_segments)
        if b["from_hidden"]:
            if hidden is None:
                raise RuntimeError("the decoder's forward hook saw no hidden states; set im_loss_impl: logits")
            _, base, _, head = self._parts(b["model"])
            if self.is_fsdp_enabled:
                fsdp.gather(b["model"], head)  # the root unit: gathered from its forward to its post-backward
            # ZeRO-3: the loss runs as the head's forward, the reference head gathered once inside it.
            through = zero3_through_head(head, reference) if is_zero3_module(head) else None
            scores = HiddenStates(hidden, head, logit_transform(base.config), self._loss_impl,
                                  autocast_dtype=self._capture.autocast_dtype,
                                  accum_dtype=torch.float32 if a.im_loss_accum_dtype == "float32" else None,
                                  through_head=through)
        elif reference is not None:
            gather_reference_head(reference)  # ZeRO-3: once per micro-batch, not per chunk
        ids = b["input_ids"]
        out = segment_weighted_loss(
            scores,
            ids,
            b["segment_ids"],
            self._table_on(ids.device),
            b["position_ids"],
            a.im_loss_normalization,
            normaliser=num_items_in_batch,
            kl_reference=reference,
            kl_mask=mask,
            kl_coef=a.im_kl_coef,
            kl_type=a.im_kl_type,
            chunk_size=a.im_loss_chunk_size,
            instruction_share=a.im_instruction_share or 0.0,
            kl_counts=b["kl_counts"],
            count_first_token=a.im_count_first_token,
        )
        if release is not None:  # set only with a KL reference under FSDP
            release()
        b["meter"].add(out)
        loss = out.loss
        if b["scaled"] and not self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # The normaliser is the all-rank total, so the ranks' losses sum to the global loss; DDP
            # averages gradients over ranks, so each rank's loss is scaled by their number (HF does the
            # same itself when average_tokens_across_devices is on).
            loss = loss * self.accelerator.num_processes
        return loss

    # -- metrics -------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        self._meters["eval"].reset()
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        template = self.im_args.role_weight_map()["template"] > 0  # its loss is logged when it carries loss
        if "loss" in logs:
            logs.update(self._meters["train"].means(self.accelerator, template=template))
        elif f"{self._eval_prefix}_loss" in logs:
            for key, value in self._meters["eval"].means(self.accelerator, with_counts=True, template=template).items():
                logs[f"{self._eval_prefix}_{key}"] = value
        return super().log(logs, start_time)
