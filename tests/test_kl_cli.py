"""KL regularisation through the real Axolotl CLI and training pipeline on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import run_axolotl, write_jsonl
from instruction_modelling.axolotl.configs import cpu_config
from instruction_modelling.quickstart.sample_data import HELDOUT_FILE, TRAIN_FILE

pytest.importorskip("axolotl")

LORA_CPU = dict(adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
                lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False)


def kl_cfg(tmp_path, model_dir, name, coef, **overrides):
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:32]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    settings = dict(im_kl_coef=coef, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=4,
                    learning_rate=1e-2, micro_batch_size=4, eval_strategy="steps", eval_steps=4,
                    dataset_prepared_path=str(tmp_path / "prepared"))
    settings.update(overrides)
    return cpu_config(model_dir, data, tmp_path / name, mode="it", eval_file=data, **settings)


def kl_history(run):
    assert run.returncode == 0, run.output[-3000:]
    history = run.log_history()
    return [h["kl"] for h in history if "kl" in h], [h["eval_kl"] for h in history if "eval_kl" in h]


@pytest.mark.parametrize("setup", ["lora_adapter", "full_copy"])
def test_kl_is_zero_before_the_first_update_and_positive_after(tmp_path, tiny_model_dir, setup):
    extra = dict(LORA_CPU, im_kl_reference="adapter") if setup == "lora_adapter" else dict(im_kl_reference="copy")
    run = run_axolotl("train", kl_cfg(tmp_path, tiny_model_dir, setup, 1.0, **extra), tmp_path / "cfg.yml")
    train_kl, eval_kl = kl_history(run)
    assert len(train_kl) == 4 and len(eval_kl) == 2
    assert abs(train_kl[0]) < 1e-6  # step 1's forward sees the unchanged model
    assert eval_kl[0] == 0.0 or abs(eval_kl[0]) < 1e-6  # evaluation before training
    assert all(k > 1e-4 for k in train_kl[1:]), train_kl
    assert eval_kl[-1] > 1e-4


def _model_kl_to_base(model_dir, base_dir, rows) -> float:
    """Mean per-token full KL(trained ‖ base) over the output tokens of ``rows``, measured here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instruction_modelling.core.kl import kl_mask, naive_token_kl
    from instruction_modelling.core.segments import ChatRenderer, RowEncoder

    tok = AutoTokenizer.from_pretrained(base_dir)
    enc = RowEncoder(tok, ChatRenderer(tok, tok.chat_template))
    trained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ex = enc.encode(row)
            ids = torch.tensor([ex.input_ids])
            segs = torch.tensor([ex.segment_ids])
            kl = naive_token_kl(trained(ids).logits, base(ids).logits, ids)
            mask = kl_mask(segs, None, "output")
            total += float((kl * mask).sum())
            count += int(mask.sum())
    return total / count


def test_large_lambda_keeps_the_model_closer_to_base(tmp_path, tiny_model_dir):
    from instruction_modelling.core.evaluation import read_rows

    held_out = read_rows(HELDOUT_FILE)[:20]
    kls = {}
    for coef in (0.0, 20.0):
        name = f"coef{coef:g}"
        cfg = kl_cfg(tmp_path, tiny_model_dir, name, coef, max_steps=8, save_steps=8, eval_steps=8,
                     im_kl_reference="copy")
        run = run_axolotl("train", cfg, tmp_path / f"{name}.yml")
        assert run.returncode == 0, run.output[-3000:]
        kls[coef] = _model_kl_to_base(tmp_path / name, tiny_model_dir, held_out)
    assert kls[20.0] < 0.5 * kls[0.0], kls


@pytest.mark.parametrize("setup", ["lora_adapter", "full_copy"])
def test_reference_is_bit_identical_after_training(tmp_path, tiny_model_dir, setup, monkeypatch):
    """Train through Axolotl's own pipeline (what the CLI runs) and inspect the trainer's reference.
    Also: every micro-batch gets its KL rows per chunk counted with the step's (no host sync of its
    own), and ``logging_nan_inf_filter`` reaches HF's arguments (Axolotl 0.19 has no key)."""
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train
    from safetensors.torch import load_file

    from instruction_modelling.axolotl.configs import write_config
    from instruction_modelling.core import losses

    counted = []
    original = losses._kl_rows
    monkeypatch.setattr(losses, "_kl_rows", lambda rows, chunk, per_chunk=None: (
        counted.append(per_chunk is not None), original(rows, chunk, per_chunk))[1])
    extra = dict(LORA_CPU) if setup == "lora_adapter" else {}
    cfg_dict = kl_cfg(tmp_path, tiny_model_dir, setup, 1.0, max_steps=3, save_steps=3, eval_steps=3,
                      logging_nan_inf_filter=False, **extra)
    cfg = load_cfg(str(write_config(cfg_dict, tmp_path / "cfg.yml")))
    model, _, trainer = train(cfg=cfg, dataset_meta=load_datasets(cfg=cfg))
    assert trainer.args.logging_nan_inf_filter is False
    # 3 training micro-batches and 2 evaluations of 8 batches (HF counts each evaluation batch alone)
    assert len(counted) == 19 and all(counted), counted
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    ref = trainer.kl_reference
    assert ref.mode == ("adapter" if setup == "lora_adapter" else "copy")
    ref_model = ref.model.get_base_model() if setup == "lora_adapter" else ref.model
    ref_state = {k.replace("base_layer.", ""): v for k, v in ref_model.state_dict().items() if "lora_" not in k}
    assert set(base) <= set(ref_state)
    for name, tensor in base.items():
        assert torch.equal(ref_state[name], tensor), name
        assert not ref_state[name].requires_grad
    # ... while the policy did move.
    policy = {k.replace("base_layer.", ""): v for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    if setup == "full_copy":
        assert any(not torch.equal(policy[n], t) for n, t in base.items())
    else:
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in policy.items())


def test_adapter_reference_without_adapter_is_an_error(tmp_path, tiny_model_dir):
    run = run_axolotl("preprocess", kl_cfg(tmp_path, tiny_model_dir, "x", 1.0, im_kl_reference="adapter"),
                      tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "im_kl_reference: adapter uses the model with its LoRA adapters disabled" in run.output


def test_negative_lambda_is_an_error(tmp_path, tiny_model_dir):
    run = run_axolotl("preprocess", kl_cfg(tmp_path, tiny_model_dir, "x", -0.5), tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "im_kl_coef must be a finite number >= 0, got -0.5" in run.output
