"""Configuration options of the Instruction Modelling plugin.

Axolotl merges ``IMArgs`` into its own config schema (``get_input_args``), so every ``im_*`` key
is validated, defaulted and documented alongside Axolotl's options. The model has no Axolotl
import and is also used directly by the tests and the preview command.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from .segments import CANONICAL_ROLES


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
            "Keys: system, user, assistant, tool."
        },
    )
    im_loss_normalization: Literal["token", "sequence"] = Field(
        default="token",
        json_schema_extra={
            "description": "token: weighted mean over all trained tokens of the optimizer step (Axolotl's "
            "per-token default). sequence: mean of per-example weighted means, as the paper's "
            "batch-size-1 runs effectively did."
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

    @model_validator(mode="after")
    def _check_weights(self):
        for name in ("im_instruction_weight", "im_output_weight"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for role, value in (self.im_role_weights or {}).items():
            if role not in CANONICAL_ROLES:
                raise ValueError(
                    f"im_role_weights has unknown role '{role}'; use one of {', '.join(CANONICAL_ROLES)}"
                )
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"im_role_weights['{role}'] must be a finite number >= 0, got {value}")
        if self.im_mode == "it":
            if self.im_instruction_weight:
                raise ValueError(
                    "im_mode: it trains no instruction tokens, but im_instruction_weight is "
                    f"{self.im_instruction_weight}; remove it or use im_mode: im"
                )
            bad = [r for r, w in (self.im_role_weights or {}).items() if r != "assistant" and w > 0]
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
        weights = {"system": instruction, "user": instruction, "tool": instruction, "assistant": output}
        weights.update(self.im_role_weights or {})
        return weights

    def trained_roles(self) -> list[str]:
        """Roles whose content carries loss (used as ``roles_to_train`` for Axolotl's dataset hash)."""
        return [r for r, w in self.role_weight_map().items() if w > 0]

    @classmethod
    def from_cfg(cls, cfg) -> "IMArgs":
        """Build from an Axolotl config (a dict-like), taking only the ``im_*`` keys that are set."""
        keys = cls.model_fields
        return cls(**{k: cfg.get(k) for k in keys if cfg.get(k) is not None})
