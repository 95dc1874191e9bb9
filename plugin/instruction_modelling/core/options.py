"""Configuration options of the Instruction Modelling plugin.

Axolotl merges ``IMArgs`` into its own config schema (``get_input_args``), so every ``im_*`` key
is validated, defaulted and documented alongside Axolotl's options. The model has no Axolotl
import and is also used directly by the tests and the preview command.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from .losses import FIRST_TOKEN_NORMALISATIONS, SHARE_NORMALISATIONS
from .segments import WEIGHT_KEYS


class IMArgs(BaseModel):
    """Options of ``instruction_modelling.InstructionModellingPlugin``."""

    im_mode: Literal["im", "it"] = Field(
        default="im",
        json_schema_extra={
            "description": "im: loss on instruction and output tokens, template tokens excluded (Eq. 4 of "
            "Shi et al. 2024). it: loss on output tokens only (instruction tuning, the baseline). "
            "Recipes for the two differ in this line only."
        },
    )
    im_instruction_weight: float | None = Field(
        default=None,
        json_schema_extra={
            "description": "Loss weight of instruction tokens (system, user and tool content). Default 1.0 "
            "under im_mode: im; must be unset or 0 under im_mode: it. Fractional values give Weighted "
            "Instruction Tuning."
        },
    )
    im_output_weight: float | None = Field(
        default=None,
        json_schema_extra={
            "description": "Loss weight of output tokens (assistant content and the end-of-turn token that "
            "closes it). Default 1.0. Weights are relative: the loss is their weighted mean."
        },
    )
    im_role_weights: dict[str, float] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Per-role weight overrides, e.g. {system: 0.0} to keep the loss off system prompts. "
            "Keys: system, user, assistant, tool, reasoning (an assistant turn's reasoning trace, "
            "default: the output weight) and template (BOS, role tags, separators: default 0, as the "
            "paper's Eq. 4; PLW and WIT as their authors ran them give it the instruction weight)."
        },
    )
    im_loss_normalization: Literal["token", "nonzero", "sequence", "share", "example_share"] = Field(
        default="token",
        json_schema_extra={
            "description": "token: Σ w·CE / Σ w over all trained tokens of the optimizer step (Axolotl's "
            "per-token default; PLW's weighted mean). nonzero: Σ w·CE / (number of tokens with w > 0), "
            "Weighted Instruction Tuning's definition (an output weight below 1 also scales the loss down). "
            "sequence: mean of per-example weighted means, as the paper's batch-size-1 runs effectively did. "
            "share: (1 − α)·mean output CE + α·mean instruction CE with α = im_instruction_share (GoLLIE's "
            "definition, over the whole step). example_share: GoLLIE's code as run, per example prompt "
            "weight α/(1−α)·(output tokens / prompt tokens), output weight 1, Σ w·CE / Σ w. "
            "Formulas and sources: docs/weighting.md."
        },
    )
    im_count_first_token: bool = Field(
        default=False,
        json_schema_extra={
            "description": "Count each example's first token (BOS; never predicted) where its source's "
            "training loop counts it: in the number of weighted tokens under nonzero (WIT's loop) and in "
            "the prompt length under example_share (GoLLIE's). Only with those two normalisations."
        },
    )
    im_instruction_share: float | None = Field(
        default=None,
        json_schema_extra={
            "description": "α of im_loss_normalization: share (in [0, 1]) or example_share (in [0, 1)): the "
            "prompt's share of the loss, whatever its token count (GoLLIE's prompt-loss weight). Required by "
            "those two, refused otherwise; im_instruction_weight / im_output_weight must then be unset (α "
            "sets the balance)."
        },
    )
    im_on_bad_rows: Literal["error", "skip"] = Field(
        default="error",
        json_schema_extra={
            "description": "What to do with a row that cannot be segmented (missing, empty or mistyped field, "
            "unknown role, no output token after truncation, conversation not ending with an assistant "
            "turn). error: stop with a message naming the file, row and field. skip: drop it; skips "
            "are counted and reported at the end of preprocessing."
        },
    )

    im_max_row_bytes: int | None = Field(
        default=None,
        gt=0,
        json_schema_extra={
            "description": "Most bytes one row of a local JSON/JSONL file may take; a longer row is a bad "
            "row (see im_on_bad_rows), found while reading, before it is decoded or tokenised. Default: 32 "
            "bytes per token of sequence_len, at least 1 MiB (a longer row could not be trained whole, and "
            "segmenting it takes about 250 bytes of memory per byte of the row)."
        },
    )

    im_loss_chunk_size: int = Field(
        default=256,
        json_schema_extra={
            "description": "Tokens per chunk when computing the cross-entropy (and KL): only one chunk is "
            "upcast to fp32 at a time and the backward pass recomputes it, so no fp32 copy of the whole "
            "logits is kept (lower it for very large vocabularies)."
        },
    )
    im_loss_impl: Literal["auto", "chunked", "cce", "logits"] = Field(
        default="auto",
        json_schema_extra={
            "description": "How the loss is computed. chunked: from the final hidden states and the output "
            "layer, chunk by chunk, so the [tokens x vocab] logits and their gradient never exist whole "
            "(pure PyTorch, exact). cce: the same through Cut Cross Entropy's CUDA kernels (needs "
            "cut_cross_entropy installed and a GPU; the KL term stays chunked). logits: from the model's full "
            "logits. auto: cce on CUDA when cut_cross_entropy is importable, else chunked; logits when the "
            "model's output layer cannot be reproduced from its hidden states (logged with the reason). "
            "Takes over cut_cross_entropy / liger_fused_linear_cross_entropy, whose patched forwards would "
            "build full logits under a custom loss."
        },
    )
    im_loss_accum_dtype: Literal["float32", "model"] = Field(
        default="float32",
        json_schema_extra={
            "description": "dtype in which the chunked loss sums the output layer's weight (and bias) "
            "gradient over its chunks. float32: one rounding to the model's dtype at the end, whatever the "
            "number of chunks; costs vocab x hidden x 4 bytes while the loss runs (4 GiB for 128k x 8192) "
            "instead of x 2 in bf16. model: the head's own dtype (the 2 GiB saved there), whose error grows "
            "with the square root of the number of chunks (about 8x one rounding at 128 chunks in bf16)."
        },
    )
    logging_nan_inf_filter: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Hugging Face TrainingArguments.logging_nan_inf_filter (default true), which "
            "Axolotl 0.19 does not expose (0.21 does): its check of every micro-batch's loss for nan/inf "
            "reads the loss on the host, one GPU sync per micro-batch. false removes it (a nan or inf "
            "loss is then logged as such instead of being replaced)."
        },
    )
    im_kl_coef: float = Field(
        default=0.0,
        json_schema_extra={
            "description": "λ of the KL penalty toward the base model (Eq. 5 of Shi et al. 2024): the loss "
            "gains λ·Σ_t KL(p_θ ‖ p_base) over the im_kl_segments tokens, normalised like the cross-entropy. "
            "0 turns it off (no reference forward pass)."
        },
    )
    im_kl_type: Literal["full", "target_token"] = Field(
        default="full",
        json_schema_extra={
            "description": "full: the KL over the whole vocabulary per position (Eq. 5). target_token: "
            "log p_θ(x_t) − log p_base(x_t) at the data token, as the authors' released code computed; it is "
            "not a KL estimate and at λ=1 cancels the cross-entropy gradient (kept to re-run the ablation)."
        },
    )
    im_kl_segments: Literal["output", "instruction", "all"] = Field(
        default="output",
        json_schema_extra={
            "description": "Which tokens carry the KL penalty, independently of which carry cross-entropy "
            "(the paper applied it with IT on output tokens)."
        },
    )
    im_kl_reference: Literal["auto", "adapter", "copy"] = Field(
        default="auto",
        json_schema_extra={
            "description": "adapter: the model itself with its LoRA adapters disabled (no second copy in "
            "memory). copy: a frozen copy of the base model, for full fine-tuning. auto: adapter when "
            "`adapter:` is set, else copy."
        },
    )
    @model_validator(mode="after")
    def _check_kl(self):
        if not math.isfinite(self.im_kl_coef) or self.im_kl_coef < 0:
            raise ValueError(f"im_kl_coef must be a finite number >= 0, got {self.im_kl_coef}")
        if self.im_loss_chunk_size < 1:
            raise ValueError(f"im_loss_chunk_size must be >= 1, got {self.im_loss_chunk_size}")
        # `adapter` exists once Axolotl merges this model into its config schema.
        if self.im_kl_coef > 0 and self.im_kl_reference == "adapter" and "adapter" in type(self).model_fields:
            if getattr(self, "adapter", None) not in ("lora", "qlora"):
                raise ValueError(
                    "im_kl_reference: adapter uses the model with its LoRA adapters disabled as the reference, "
                    "but no `adapter: lora` (or qlora) is set; use im_kl_reference: copy for full fine-tuning"
                )
        return self

    def kl_reference_mode(self, adapter: str | None) -> str:
        """``adapter`` or ``copy``: what ``auto`` means for a config with this ``adapter:``."""
        if self.im_kl_reference != "auto":
            return self.im_kl_reference
        return "adapter" if adapter in ("lora", "qlora") else "copy"

    @model_validator(mode="after")
    def _check_share(self):
        share = self.im_instruction_share
        norm = self.im_loss_normalization
        if self.im_count_first_token and norm not in FIRST_TOKEN_NORMALISATIONS:
            raise ValueError(f"im_count_first_token changes a count only under im_loss_normalization: "
                             f"{' or '.join(FIRST_TOKEN_NORMALISATIONS)} (WIT's and GoLLIE's loops); remove it or "
                             f"change the normalisation (now {norm})")
        if norm not in SHARE_NORMALISATIONS:
            if share is not None:
                raise ValueError(
                    "im_instruction_share is only used by im_loss_normalization: share or example_share; set one "
                    "of them or remove it"
                )
            return self
        if share is None or not math.isfinite(share) or not (0 <= share and (share <= 1 if norm == "share" else share < 1)):
            bound = "[0, 1]" if norm == "share" else "[0, 1) (at 1 no output weight is left)"
            raise ValueError(f"im_loss_normalization: {norm} needs im_instruction_share in {bound}, got {share}")
        if self.im_mode != "im":
            raise ValueError(f"im_loss_normalization: {norm} weighs instructions by im_instruction_share; use im_mode: "
                             "im (im_instruction_share: 0 gives instruction tuning)")
        for name in ("im_instruction_weight", "im_output_weight"):
            if getattr(self, name) is not None:
                raise ValueError(f"im_loss_normalization: {norm} sets the balance with im_instruction_share; "
                                 f"remove {name}")
        if self.im_kl_coef > 0:
            raise ValueError(f"KL regularisation is not defined under im_loss_normalization: {norm}; "
                             "use token or sequence with im_kl_coef")
        return self

    @model_validator(mode="after")
    def _check_weights(self):
        for name in ("im_instruction_weight", "im_output_weight"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for role, value in (self.im_role_weights or {}).items():
            if role not in WEIGHT_KEYS:
                raise ValueError(
                    f"im_role_weights has unknown role '{role}'; use one of {', '.join(WEIGHT_KEYS)}"
                )
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"im_role_weights['{role}'] must be a finite number >= 0, got {value}")
        if self.im_mode == "it":
            if self.im_instruction_weight:
                raise ValueError(
                    "im_mode: it trains no instruction tokens, but im_instruction_weight is "
                    f"{self.im_instruction_weight}; remove it or use im_mode: im"
                )
            bad = [r for r, w in (self.im_role_weights or {}).items() if r not in ("assistant", "reasoning") and w > 0]
            if bad:
                raise ValueError(
                    f"im_mode: it trains no instruction tokens, but im_role_weights gives {bad[0]} a positive "
                    "weight; use im_mode: im"
                )
        if not any(w > 0 for w in self.role_weight_map().values()):
            raise ValueError("every segment has loss weight 0, so nothing would be trained")
        return self

    def role_weight_map(self) -> dict[str, float]:
        """Resolved loss weight of each canonical role's content."""
        instruction = self.im_instruction_weight
        if instruction is None:
            instruction = 1.0 if self.im_mode == "im" else 0.0
        output = 1.0 if self.im_output_weight is None else self.im_output_weight
        weights = {"system": instruction, "user": instruction, "tool": instruction, "assistant": output,
                   "reasoning": output, "template": 0.0}
        weights.update(self.im_role_weights or {})
        return weights

    def weighting_summary(self) -> str:
        """One line for logs and ``preview``: the mode, and what differs from Eq. 4's content-only
        weighting (template weight, normalisation, first-token count)."""
        parts = [f"im_mode: {self.im_mode}"]
        template = self.role_weight_map()["template"]
        if template > 0:
            parts.append(f"template weight {template:g} (the template's tokens carry loss, unlike Eq. 4)")
        if self.im_loss_normalization != "token":
            parts.append(f"im_loss_normalization: {self.im_loss_normalization}")
        if self.im_count_first_token:
            parts.append("each example's first token counted in the normaliser")
        return ", ".join(parts)

    def trained_roles(self) -> list[str]:
        """Roles whose content carries loss (used as ``roles_to_train`` for Axolotl's dataset hash)."""
        return [r for r, w in self.role_weight_map().items() if w > 0]

    @classmethod
    def from_cfg(cls, cfg) -> "IMArgs":
        """Build from an Axolotl config (a dict-like), taking only the ``im_*`` keys that are set.

        Raises:
            ValueError: an ``im_*`` key that is no option (a misspelling would otherwise be ignored).
        """
        check_option_names(cfg)
        keys = cls.model_fields
        return cls(**{k: cfg.get(k) for k in keys if cfg.get(k) is not None})


def check_option_names(cfg) -> None:
    """Refuse a config key that starts with ``im_`` but is no option of the plugin.

    Axolotl keeps unknown keys without a word, so ``im_mdoe: it`` would train IM instead of IT; the
    prefix is the plugin's own, so every such key is a mistake.

    Raises:
        ValueError: naming the key and the closest option.
    """
    import difflib

    options = sorted(k for k in IMArgs.model_fields if k.startswith("im_"))
    for key in list(cfg.keys()) if hasattr(cfg, "keys") else []:
        if isinstance(key, str) and key.startswith("im_") and key not in options:
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"the options are {', '.join(options)}"
            raise ValueError(f"unknown instruction_modelling option '{key}': {hint}")


# Axolotl options whose memory saving the IM loss takes over (their patched forwards only skip the
# logits when `labels` reach the model, which a custom loss prevents).
MEMORY_EFFICIENT_CE_OPTIONS = ("cut_cross_entropy", "liger_fused_linear_cross_entropy", "chunked_cross_entropy")
# Axolotl options that replace the loss function, or shard one batch or the vocabulary across ranks.
_CONFLICTS = {
    "use_eaft": "use_eaft sets its own loss function, which the instruction_modelling loss replaces; remove use_eaft",
    "enable_dft_loss": "enable_dft_loss sets its own loss function, which the instruction_modelling loss replaces; "
                       "remove enable_dft_loss",
}
# Why each model-parallel option cannot be honoured exactly (docs/design.md, "Distributed training").
_SPLITS_SEQUENCES = ("splits every sequence across ranks, so a target at a slice boundary lives on the next rank and "
                     "each rank would see part of the loss normaliser")
_PARALLEL = {
    "context_parallel_size": _SPLITS_SEQUENCES,
    "sequence_parallel_degree": _SPLITS_SEQUENCES,
    "tensor_parallel_size": "replicates each batch on its ranks while sharding lm_head over the vocabulary, so the "
                            "loss would need whole-vocabulary rows and its normaliser would be summed once per replica",
}


def check_axolotl_options(cfg) -> None:
    """Refuse, in one sentence each, Axolotl options the IM loss would otherwise silently override.

    Args:
        cfg: the Axolotl config (dict-like).

    Raises:
        ValueError: naming the option and what to do.
    """
    check_option_names(cfg)
    for key, message in _CONFLICTS.items():
        if cfg.get(key):
            raise ValueError(message)
    for key, why in _PARALLEL.items():
        if (cfg.get(key) or 1) > 1:
            raise ValueError(
                f"{key} > 1 {why}, which the instruction_modelling loss does not handle; set {key}: 1 (data "
                "parallelism, DeepSpeed and FSDP2 are supported)"
            )
    if cfg.get("im_loss_impl") == "logits":
        for key in MEMORY_EFFICIENT_CE_OPTIONS:
            if cfg.get(key):
                raise ValueError(
                    f"im_loss_impl: logits builds the full logits that {key}: true is meant to avoid; use "
                    f"im_loss_impl: auto (IM computes its loss from hidden states) or remove {key}"
                )
