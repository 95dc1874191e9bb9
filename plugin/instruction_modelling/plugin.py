"""The Axolotl plugin class: hooks only; the work is done by the modules it names."""

from __future__ import annotations

import sys

from axolotl.integrations.base import BasePlugin

DATASET_TYPE = "instruction_modelling"
_STRATEGY_ALIAS = f"axolotl.prompt_strategies.{DATASET_TYPE}"


def _is_im_dataset(ds) -> bool:
    t = ds.get("type") if hasattr(ds, "get") else None
    return isinstance(t, str) and (t == DATASET_TYPE or t.startswith(DATASET_TYPE + "."))


class InstructionModellingPlugin(BasePlugin):
    """Adds ``type: instruction_modelling`` datasets, the segment-weighted loss and its metrics."""

    def register(self, cfg):
        """Make ``type: instruction_modelling`` resolvable and put the trained roles into the
        dataset hash (Axolotl hashes ``roles_to_train`` but not plugin options)."""
        from axolotl.prompt_tokenizers import DatasetWrappingStrategy

        from . import strategy
        from .args import IMArgs, check_axolotl_options

        check_axolotl_options(cfg)

        DatasetWrappingStrategy.register(strategy.InstructionModellingStrategy)
        sys.modules.setdefault(_STRATEGY_ALIAS, strategy)
        try:
            args = IMArgs.from_cfg(cfg)
        except Exception:  # reported properly by Axolotl's validation of get_input_args()
            return
        for key in ("datasets", "test_datasets"):
            for ds in cfg.get(key) or []:
                if _is_im_dataset(ds):
                    if ds.get("roles_to_train") and list(ds["roles_to_train"]) != args.trained_roles():
                        raise ValueError(
                            f"dataset {ds.get('path')}: type instruction_modelling chooses trained roles from "
                            "im_mode / im_role_weights; remove roles_to_train"
                        )
                    ds["roles_to_train"] = args.trained_roles()

    def on_config_validation_error(self, cfg):
        sys.modules.pop(_STRATEGY_ALIAS, None)

    def get_input_args(self):
        return "instruction_modelling.args.IMArgs"

    def pre_model_load(self, cfg):
        from .strategy import REPORT

        REPORT.log()  # datasets are ready: report what preprocessing skipped before training starts

    def get_trainer_cls(self, cfg):
        from .trainer import IMTrainer

        return IMTrainer

    def get_collator_cls_and_kwargs(self, cfg, is_eval=False):
        from .collator import collator_for

        return collator_for(cfg, is_eval), {}

    def post_trainer_create(self, cfg, trainer):
        from .trainer import IMTrainer

        if not isinstance(trainer, IMTrainer):
            raise RuntimeError(
                f"another plugin's trainer ({type(trainer).__name__}) was chosen over IMTrainer; the "
                "instruction_modelling loss would not be applied. Remove the other trainer plugin."
            )
        trainer.init_kl_reference()  # a frozen copy must be taken before the first update
