"""Exact normalisation across data-parallel ranks, through the real Axolotl CLI on CPU: two
processes (torchrun, DDP over gloo) against one process with gradient accumulation x2 over the same
micro-batches give the same logged losses and the same weights. Axolotl sets
``average_tokens_across_devices: false``, so this holds only because IMTrainer sums the window's
normaliser over ranks itself and scales each rank's loss for DDP's gradient mean."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from cli_helpers import REPO_ROOT, run_axolotl, write_jsonl
from instruction_modelling.axolotl.configs import PLUGIN, cpu_config, write_config
from instruction_modelling.quickstart.sample_data import TRAIN_FILE

pytest.importorskip("axolotl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_accumulation(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT / "tests" / "probes"), os.environ.get("PYTHONPATH", "")]))
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:32]
    data = write_jsonl(tmp_path / "train.jsonl", rows)

    def cfg(name, ga):
        # curriculum_sampling: sequential batches, so rank r of step s sees micro-batch s·2 + r, exactly the
        # micro-batches the single process accumulates. Different lengths and weights 0.3/1 make the ranks' token
        # counts and weights differ.
        return cpu_config(tiny_model_dir, data, tmp_path / name, mode="im", im_instruction_weight=0.3,
                          plugins=[PLUGIN, "cpu_ddp.CpuDdpPlugin"], micro_batch_size=2, gradient_accumulation_steps=ga,
                          max_steps=3, learning_rate=0.1, curriculum_sampling=True, save_strategy="steps", save_steps=3,
                          # SGD: Adam's update of a weight whose gradient is ~0 turns summation-order
                          # rounding (all-reduce vs accumulation, ~1e-7) into a visible step.
                          optimizer="sgd", lr_scheduler="constant", warmup_ratio=0.0,
                          dataset_prepared_path=str(tmp_path / "prepared"))

    single = run_axolotl("train", cfg("single", 2), tmp_path / "single.yml")
    assert single.returncode == 0, single.output[-3000:]

    ddp_cfg = cfg("ddp", 1)
    write_config(ddp_cfg, tmp_path / "ddp.yml")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "axolotl.cli.train", str(tmp_path / "ddp.yml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true"},  # accelerate: MULTI_CPU, gloo
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[RANK:1]" in proc.stdout  # really two ranks
    ddp = type(single)(proc, ddp_cfg)

    a = [h for h in single.log_history() if "loss" in h]
    b = [h for h in ddp.log_history() if "loss" in h]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "instruction_loss", "output_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x, y)

    from safetensors.torch import load_file

    wa = load_file(tmp_path / "single" / "model.safetensors")
    wb = load_file(tmp_path / "ddp" / "model.safetensors")
    assert wa.keys() == wb.keys()
    import torch

    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(wa[k], base[k]) for k in wa)  # the weights did move
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
