"""IM under FSDP2 (``fsdp_version: 2``) through the real Axolotl CLI on CPU: two processes (torchrun,
gloo, ``fully_shard`` over decoder layers and root) take the hidden-state loss, with no
``[tokens x vocab]`` logits, and give the same losses, segment metrics, KL and final weights as one
process with gradient accumulation x2 over the same micro-batches, and as the logits path.

``tests/probes/cpu_fsdp.py`` lets Axolotl's FSDP path run on CPU (its device mesh and accelerate's
FSDP state are GPU-only) and records what each rank believes it runs. Both sides run one thread
per process (torchrun's default): the CPU kernels' rounding depends on the thread count.
Configs that IM cannot train under FSDP stop at config load, before the model is loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cli_helpers import REPO_ROOT, AxolotlRun, write_jsonl
from instruction_modelling.axolotl.configs import PLUGIN, cpu_config, write_config
from instruction_modelling.quickstart.sample_data import TRAIN_FILE

pytest.importorskip("axolotl")

PROBES = ["cpu_fsdp.CpuFsdpPlugin", "lm_head_probe.LmHeadProbePlugin"]
FSDP2 = dict(fsdp_version=2, fsdp_config=dict(auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                                               transformer_layer_cls_to_wrap="LlamaDecoderLayer",
                                               state_dict_type="FULL_STATE_DICT", reshard_after_forward=True))
LORA = dict(adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
            lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False)
CHUNK = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def probe_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT / "tests" / "probes"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _cfg(tmp_path, model_dir, name, ga, **overrides):
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:32]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    # curriculum_sampling: sequential batches, so rank r of step s sees micro-batch 2s + r, exactly the
    # micro-batches the single process accumulates. SGD: Adam would turn summation-order rounding of a
    # near-zero gradient into a visible step (see test_ddp_cli.py).
    return cpu_config(model_dir, data, tmp_path / name, mode="im", im_instruction_weight=0.3, eval_file=data,
                      plugins=[PLUGIN, *PROBES], micro_batch_size=2, gradient_accumulation_steps=ga, max_steps=3,
                      learning_rate=0.1, curriculum_sampling=True, save_strategy="steps", save_steps=3,
                      eval_strategy="steps", eval_steps=3, optimizer="sgd", lr_scheduler="constant", warmup_ratio=0.0,
                      im_kl_coef=1.0, im_loss_chunk_size=CHUNK, dataset_prepared_path=str(tmp_path / "prepared"),
                      **overrides)


def _run(tmp_path, cfg, nproc: int) -> tuple[AxolotlRun, list[str], list[tuple[int, int]]]:
    """Run the CLI (torchrun with ``nproc`` processes); returns the run, each rank's engine line and
    the (positions, training) of every lm_head call."""
    name = cfg["output_dir"].rsplit("/", 1)[-1]
    engine, heads = tmp_path / f"{name}.engine", tmp_path / f"{name}.heads"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true",
           "CPU_FSDP_PROBE": str(engine), "LM_HEAD_PROBE": str(heads)}
    path = write_config(cfg, tmp_path / f"{name}.yml")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(_free_port()), "-m", "axolotl.cli.train", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, env=env,
    )
    run = AxolotlRun(proc, cfg)
    assert run.returncode == 0, run.output[-3000:]
    calls = [tuple(int(x) for x in line.split()) for line in heads.read_text().splitlines()]
    return run, sorted(engine.read_text().splitlines()), calls


def _assert_same_training(a: AxolotlRun, b: AxolotlRun, model_dir, tmp_path):
    keys = ("loss", "instruction_loss", "output_loss", "kl", "grad_norm")
    train_a = [h for h in a.log_history() if "loss" in h]
    train_b = [h for h in b.log_history() if "loss" in h]
    assert len(train_a) == len(train_b) == 3
    for x, y in zip(train_a, train_b):
        for key in keys:
            # The KL of identical models (step 1) is fp32 rounding, ~1e-8 either sign.
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7 if key == "kl" else 0), (key, x, y)
    assert train_a[-1]["kl"] > 1e-3  # the KL term is live
    eval_a = [h for h in a.log_history() if "eval_loss" in h]
    eval_b = [h for h in b.log_history() if "eval_loss" in h]
    assert len(eval_a) == len(eval_b) == 2  # before training and at the end
    # Not eval_loss: HF's mean of per-batch means depends on how the eval batches fall on the ranks.
    for x, y in zip(eval_a, eval_b):
        for key in ("eval_instruction_loss", "eval_output_loss", "eval_kl", "eval_output_tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7 if key == "eval_kl" else 0), (key, x, y)

    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (a.cfg.get("adapter")) else "model.safetensors"
    wa = load_file(os.path.join(a.cfg["output_dir"], name))
    wb = load_file(os.path.join(b.cfg["output_dir"], name))
    assert wa.keys() == wb.keys()
    if not a.cfg.get("adapter"):
        base = load_file(model_dir / "model.safetensors")
        assert any(not torch.equal(wa[k], base[k]) for k in wa)  # the weights did move
    else:
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in wa.items())
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def _assert_fsdp2_ranks(engine_lines):
    assert len(engine_lines) == 2, engine_lines
    for rank, line in enumerate(engine_lines):
        r, world, kind, units = line.split()
        assert (int(r), int(world), kind) == (rank, 2, "FSDP"), engine_lines
        assert int(units) > 1, engine_lines  # decoder layers and root are FSDP2 units


def test_fsdp2_full_finetune_with_copy_kl_equals_one_process_and_logits(tmp_path, tiny_model_dir, probe_env):
    """Full fine-tuning with a ``copy`` KL reference (sharded like the policy)."""
    single, engine, _ = _run(tmp_path, _cfg(tmp_path, tiny_model_dir, "single", 2, im_kl_reference="copy"), 1)
    assert len(engine) == 1 and [engine[0].split()[i] for i in (0, 1, 3)] == ["0", "1", "0"]  # rank 0 of 1, no FSDP
    fsdp, engine, heads = _run(tmp_path, _cfg(tmp_path, tiny_model_dir, "fsdp", 1, im_kl_reference="copy", **FSDP2), 2)
    _assert_fsdp2_ranks(engine)
    assert "im_loss_impl: chunked" in fsdp.output and "im_loss_impl: logits" not in fsdp.output
    # The head never sees more than a chunk of positions in training: the model's forward keeps one
    # position's logits (logits_to_keep=1) and the loss applies the head chunk by chunk.
    assert max(n for n, training in heads if training) <= CHUNK, heads
    _assert_same_training(single, fsdp, tiny_model_dir, tmp_path)

    logits, engine, heads = _run(tmp_path, _cfg(tmp_path, tiny_model_dir, "logits", 1, im_kl_reference="copy",
                                               im_loss_impl="logits", **FSDP2), 2)
    _assert_fsdp2_ranks(engine)
    assert max(n for n, training in heads if training) > CHUNK  # the probe sees whole logits when they exist
    _assert_same_training(single, logits, tiny_model_dir, tmp_path)


def test_fsdp2_lora_with_adapter_kl_equals_one_process(tmp_path, tiny_model_dir, probe_env):
    """LoRA with the ``adapter`` KL reference (the policy with its adapters disabled)."""
    single, _, _ = _run(tmp_path, _cfg(tmp_path, tiny_model_dir, "single", 2, im_kl_reference="adapter", **LORA), 1)
    fsdp, engine, heads = _run(tmp_path, _cfg(tmp_path, tiny_model_dir, "fsdp", 1, im_kl_reference="adapter",
                                             **LORA, **FSDP2), 2)
    _assert_fsdp2_ranks(engine)
    assert "im_loss_impl: chunked" in fsdp.output
    assert max(n for n, training in heads if training) <= CHUNK, heads
    _assert_same_training(single, fsdp, tiny_model_dir, tmp_path)


FSDP1 = dict(fsdp_version=1, fsdp_config={k: v for k, v in FSDP2["fsdp_config"].items() if k != "reshard_after_forward"})
SIZE_WRAP = dict(fsdp_version=2, fsdp_config=dict(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=1000))


@pytest.mark.parametrize("settings, message", [
    (dict(FSDP1, im_loss_impl="chunked"),
     "im_loss_impl: chunked needs the loss from hidden states, which IM supports under FSDP2 only"),
    (dict(FSDP1, cut_cross_entropy=True),
     "cut_cross_entropy: true needs the loss from hidden states, which IM supports under FSDP2 only"),
    (dict(FSDP1, im_kl_coef=1.0),
     "im_kl_coef > 0 runs a reference forward outside the wrapped model's forward, which IM supports under FSDP2 only"),
    (dict(SIZE_WRAP, im_loss_impl="chunked"),
     "im_loss_impl: chunked needs lm_head inside the root FSDP unit, but this fsdp_config (auto_wrap_policy: "
     "SIZE_BASED_WRAP) may wrap it on its own"),
    (dict(FSDP2, im_loss_impl="cce", fsdp_config=dict(FSDP2["fsdp_config"], transformer_layer_cls_to_wrap="LlamaDecoderLayer,Linear")),
     "im_loss_impl: cce needs lm_head inside the root FSDP unit"),
], ids=["fsdp1-chunked", "fsdp1-cce-kernel", "fsdp1-kl", "size-wrap-chunked", "head-class-wrapped-cce"])
def test_impossible_fsdp_combinations_stop_at_config_load(tmp_path, tiny_model_dir, settings, message):
    """Axolotl's own config loader (what every CLI command runs first) stops: no data, no model."""
    from axolotl.cli.config import load_cfg

    cfg = cpu_config(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "out", **settings)
    with pytest.raises(ValueError) as err:
        load_cfg(str(write_config(cfg, tmp_path / "cfg.yml")))
    assert message in str(err.value)
    assert ". " not in str(err.value)  # one sentence


@pytest.mark.parametrize("key, reason", [
    ("context_parallel_size", "splits every sequence across ranks"),
    ("sequence_parallel_degree", "splits every sequence across ranks"),
    ("tensor_parallel_size", "replicates each batch on its ranks while sharding lm_head over the vocabulary"),
])
def test_model_parallel_options_are_refused_with_their_own_reason(tmp_path, tiny_model_dir, key, reason):
    from axolotl.cli.config import load_cfg

    cfg = cpu_config(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "out", **{key: 2})
    with pytest.raises(ValueError) as err:
        load_cfg(str(write_config(cfg, tmp_path / "cfg.yml")))
    assert f"{key} > 1 {reason}" in str(err.value) and f"set {key}: 1" in str(err.value)
    assert ". " not in str(err.value)  # one sentence
