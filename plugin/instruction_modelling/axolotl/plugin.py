"""The Axolotl plugin class: hooks only; the work is done by the modules it names."""

from __future__ import annotations

import logging
import sys

from axolotl.integrations.base import BasePlugin

LOG = logging.getLogger("axolotl.integrations.instruction_modelling")

DATASET_TYPE = "instruction_modelling"
_STRATEGY_ALIAS = f"axolotl.prompt_strategies.{DATASET_TYPE}"


def is_im_dataset(ds) -> bool:
    t = ds.get("type") if hasattr(ds, "get") else None
    return isinstance(t, str) and (t == DATASET_TYPE or t.startswith(DATASET_TYPE + "."))


def check_config(cfg, args) -> bool:
    """Refuse, before any dataset work, what the plugin cannot train; returns False when the plugin
    steps aside (``rl:`` configs without instruction_modelling datasets).

    Args:
        cfg: the raw Axolotl config (``register`` runs before validation).
        args: its ``IMArgs``.
    """
    from .strategy import check_dataset_options

    entries = [(key, ds) for key in ("datasets", "test_datasets") for ds in cfg.get(key) or []]
    im = [ds for _, ds in entries if is_im_dataset(ds)]
    if cfg.get("rl"):
        if im:
            raise ValueError(
                f"type: instruction_modelling is for supervised fine-tuning, not `rl: {cfg.get('rl')}`; "
                "remove `rl:` to train IM, or use a preference dataset type (the plugin then steps aside)"
            )
        return False
    others = [(key, ds) for key, ds in entries if not is_im_dataset(ds)]
    if others:
        key, ds = others[0]
        raise ValueError(
            f"{key}: dataset {ds.get('path')} has type {ds.get('type')!r}, but the instruction_modelling plugin "
            "trains only type: instruction_modelling datasets (it reads the same chat, Alpaca and "
            "prompt/completion rows); change its type, or remove the plugin"
        )
    weights = args.role_weight_map()
    if cfg.get("train_on_inputs") and weights["user"] <= 0:
        # The user prompt is the instruction train_on_inputs is about; name what is (not) trained.
        untrained = [r for r in ("system", "user", "tool") if weights[r] <= 0]
        trained = [r for r in ("system", "user", "tool") if weights[r] > 0]
        what = ("none of them (system, user, tool)" if not trained else
                f"no {' or '.join(untrained)} content ({' and '.join(trained)} content is trained)")
        raise ValueError(
            f"train_on_inputs: true asks for loss on the instructions, but im_mode/im weights train {what}; "
            "remove train_on_inputs (the plugin's im_mode: im is what trains instructions)"
        )
    for ds in im:
        check_dataset_options(ds, args.trained_roles())
    return True


class InstructionModellingPlugin(BasePlugin):
    """Adds ``type: instruction_modelling`` datasets, the segment-weighted loss and its metrics."""

    def register(self, cfg):
        """Make ``type: instruction_modelling`` resolvable and put the trained roles into the
        dataset hash (Axolotl hashes ``roles_to_train`` but not plugin options)."""
        from axolotl.prompt_tokenizers import DatasetWrappingStrategy

        from instruction_modelling.core.options import IMArgs, check_axolotl_options

        from . import strategy

        check_axolotl_options(cfg)
        from .fsdp import check_fsdp_options

        check_fsdp_options(cfg)

        DatasetWrappingStrategy.register(strategy.InstructionModellingStrategy)
        sys.modules.setdefault(_STRATEGY_ALIAS, strategy)
        strategy.keep_segments_aligned_on_truncation()
        try:
            args = IMArgs.from_cfg(cfg)
        except Exception:  # reported properly by Axolotl's validation of get_input_args()
            return
        if not check_config(cfg, args):
            LOG.warning(f"instruction_modelling: `rl: {cfg.get('rl')}` config; the plugin steps aside "
                        "(no IM loss, Axolotl's own trainer and collator)")
            return
        from .deepspeed import check_deepspeed_config

        check_deepspeed_config(cfg, args)
        for key in ("datasets", "test_datasets"):
            for ds in cfg.get(key) or []:
                ds["roles_to_train"] = args.trained_roles()
        # Local JSON/JSONL files are read row by row here, not by Arrow's whole-file JSON reader.
        from instruction_modelling.core.read import max_row_bytes_for

        from .raw_rows import redirect_local_files

        redirect_local_files(cfg, args.im_max_row_bytes or max_row_bytes_for(cfg.get("sequence_len")))

    def on_config_validation_error(self, cfg):
        sys.modules.pop(_STRATEGY_ALIAS, None)

    def get_input_args(self):
        return "instruction_modelling.core.options.IMArgs"

    def get_training_args(self, cfg):
        # Axolotl 0.19 has no key for it; 0.21 passes the same value itself.
        if cfg.get("logging_nan_inf_filter") is not None and not cfg.get("rl"):
            return {"logging_nan_inf_filter": bool(cfg.get("logging_nan_inf_filter"))}
        return None

    def pre_model_load(self, cfg):
        from .strategy import REPORT

        REPORT.log()  # datasets are ready: report what preprocessing skipped before training starts

    def get_trainer_cls(self, cfg):
        if cfg.get("rl"):
            return None  # steps aside: preference training is Axolotl's
        from .trainer import IMTrainer

        return IMTrainer

    def get_collator_cls_and_kwargs(self, cfg, is_eval=False):
        if cfg.get("rl"):
            return None
        from .collator import collator_for, collator_kwargs

        cls = collator_for(cfg, is_eval)
        return cls, collator_kwargs(cfg, cls, is_eval)

    def post_trainer_create(self, cfg, trainer):
        if cfg.get("rl"):
            return
        from .trainer import IMTrainer

        if not isinstance(trainer, IMTrainer):
            raise RuntimeError(
                f"another plugin's trainer ({type(trainer).__name__}) was chosen over IMTrainer; the "
                "instruction_modelling loss would not be applied. Remove the other trainer plugin."
            )
        trainer.init_kl_reference()  # a frozen copy must be taken before the first update
