"""Axolotl configs that train a tiny local model on CPU (quickstart, tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PLUGIN = "instruction_modelling.InstructionModellingPlugin"


def cpu_config(base_model: str | Path, train_file: str | Path, output_dir: str | Path, *,
               mode: str = "im", eval_file: str | Path | None = None, **overrides: Any) -> dict:
    """An Axolotl config for a CPU run of the plugin.

    CPU needs ``bf16: false`` *and* ``fp16: false`` (Axolotl's auto dtype picks fp16 otherwise),
    no flash attention, and sdpa attention when packing (see docs/design.md).
    """
    output_dir = Path(output_dir)
    cfg: dict[str, Any] = {
        "base_model": str(base_model),
        "plugins": [PLUGIN],
        "datasets": [{"path": str(train_file), "type": "instruction_modelling", "ds_type": "json"}],
        "chat_template": "tokenizer_default",
        "im_mode": mode,
        "dataset_prepared_path": str(output_dir / "prepared"),
        "output_dir": str(output_dir),
        "sequence_len": 256,
        "sample_packing": False,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "learning_rate": 3e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        "dataset_num_proc": 1,
        "use_tensorboard": False,
    }
    if eval_file is not None:
        cfg["test_datasets"] = [{"path": str(eval_file), "type": "instruction_modelling", "ds_type": "json", "split": "train"}]
        cfg["eval_strategy"] = "epoch"
    else:
        cfg["val_set_size"] = 0.0
    cfg.update(overrides)
    return cfg


def write_config(cfg: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
