"""An fp32 output layer on bf16 hidden states (QLoRA's prepare_model_for_kbit_training, Gemma-style
norms) through Axolotl's own pipeline with ``bf16: true``: the model's forward runs under
accelerate's autocast, the loss after it. It crashed at step 1 ("expected m1 and m2 to have the same
dtype"); now the head is applied as the autocast applied it, for the loss and the KL reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import REPO_ROOT, write_jsonl
from instruction_modelling.axolotl.configs import PLUGIN, cpu_config
from instruction_modelling.quickstart.sample_data import TRAIN_FILE

pytest.importorskip("axolotl")

LORA = dict(adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
            lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False)


def test_fp32_head_on_a_bf16_model_trains_with_the_chunked_loss_and_kl(tmp_path, tiny_model_dir, monkeypatch):
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train

    from instruction_modelling.axolotl.configs import write_config

    monkeypatch.syspath_prepend(str(REPO_ROOT / "tests" / "probes"))
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:16]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg_dict = cpu_config(tiny_model_dir, data, tmp_path / "out", mode="im", plugins=[PLUGIN, "fp32_head.Fp32HeadPlugin"],
                          bf16=True, im_loss_impl="chunked", im_loss_chunk_size=64, im_kl_coef=0.5,
                          im_kl_reference="adapter", max_steps=2, micro_batch_size=4, learning_rate=1e-3,
                          dataset_prepared_path=str(tmp_path / "prepared"), **LORA)
    cfg = load_cfg(str(write_config(cfg_dict, tmp_path / "cfg.yml")))
    _, _, trainer = train(cfg=cfg, dataset_meta=load_datasets(cfg=cfg))

    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.get_base_model().get_output_embeddings().weight.dtype == torch.float32
    assert model.get_base_model().model.norm.weight.dtype == torch.bfloat16
    assert trainer._loss_impl == "chunked" and trainer._capture.autocast_dtype == torch.bfloat16
    steps = [h for h in trainer.state.log_history if "loss" in h and "kl" in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps), steps
    # Step 1: LoRA's B starts at 0, so policy and reference are the same model, run the same way
    # (the reference's forward under the policy's autocast): the KL is bf16 noise at most.
    assert abs(steps[0]["kl"]) < 1e-3, steps
