"""Plugin options: defaults are the paper's, bad combinations are one-sentence errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from instruction_modelling.core.options import IMArgs


def test_defaults_are_im():
    args = IMArgs()
    assert args.role_weight_map() == {"system": 1.0, "user": 1.0, "tool": 1.0, "assistant": 1.0, "reasoning": 1.0,
                                      "template": 0.0}
    assert args.trained_roles() == ["system", "user", "tool", "assistant", "reasoning"]


def test_it_trains_outputs_only():
    args = IMArgs(im_mode="it")
    assert args.role_weight_map() == {"system": 0.0, "user": 0.0, "tool": 0.0, "assistant": 1.0, "reasoning": 1.0,
                                      "template": 0.0}
    assert args.trained_roles() == ["assistant", "reasoning"]


def test_weighted_and_role_overrides():
    args = IMArgs(im_instruction_weight=0.3, im_output_weight=2.0, im_role_weights={"system": 0.0})
    assert args.role_weight_map() == {"system": 0.0, "user": 0.3, "tool": 0.3, "assistant": 2.0, "reasoning": 2.0,
                                      "template": 0.0}
    assert args.trained_roles() == ["user", "tool", "assistant", "reasoning"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"im_mode": "it", "im_instruction_weight": 0.5}, "im_mode: it trains no instruction tokens, but im_instruction_weight is 0.5"),
        ({"im_mode": "it", "im_role_weights": {"user": 1.0}}, "gives user a positive weight"),
        ({"im_instruction_weight": -1}, "im_instruction_weight must be a finite number >= 0"),
        ({"im_output_weight": float("nan")}, "im_output_weight must be a finite number >= 0"),
        ({"im_role_weights": {"narrator": 1.0}}, "unknown role 'narrator'"),
        ({"im_instruction_weight": 0.0, "im_output_weight": 0.0}, "nothing would be trained"),
        ({"im_mode": "pretrain"}, "im_mode"),
        ({"im_loss_normalization": "batch"}, "im_loss_normalization"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        IMArgs(**kwargs)


def test_every_option_is_described():
    for name, field in IMArgs.model_fields.items():
        extra = field.json_schema_extra or {}
        assert len(extra.get("description", "")) > 20, name


def test_from_cfg_ignores_unset_keys():
    assert IMArgs.from_cfg({"im_mode": "it", "im_output_weight": None, "other": 1}).im_mode == "it"


@pytest.mark.parametrize("kwargs,message", [
    ({"im_mode": "it"}, "train none of them (system, user, tool)"),
    ({"im_role_weights": {"user": 0.0}}, "train no user content (system and tool content is trained)"),
    ({"im_role_weights": {"user": 0.0, "tool": 0.0}}, "train no user or tool content (system content is trained)"),
])
def test_train_on_inputs_refusal_says_what_is_trained(kwargs, message):
    """train_on_inputs: true with the user weight at 0 is refused; the message names the instruction
    roles that still carry loss instead of claiming that none do."""
    pytest.importorskip("axolotl")
    from instruction_modelling.axolotl.plugin import check_config

    cfg = {"train_on_inputs": True, "datasets": [{"path": "x.jsonl", "type": "instruction_modelling"}]}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(cfg, IMArgs(**kwargs))
