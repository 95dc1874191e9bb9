"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU with two gloo processes (``deepspeed.initialize``, DeepSpeed from the
registry's sdist without ops): the IM loss (chunked from hidden states, and the full-logits path) and
its KL to an adapter or a sharded copy reference, against a float64 brute force written from the
formulas (docs/weighting.md, Eq. 5), not from the package's coefficient code. Also: under ZeRO-3 the
chunked loss builds no ``[tokens × vocab]`` tensor and the reference head is gathered once per
micro-batch; and what cannot run is refused at config load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cli_helpers import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "probes" / "zero_worker.py"
sys.path.insert(0, str(WORKER.parent))
from zero_worker import CHUNK, D, V, TinyLM, make_batch  # noqa: E402

USER, OUTPUT = 2, 3
WEIGHTS = {0: 0.0, USER: 0.5, OUTPUT: 1.0}  # weight_table(0.5, 1.0): template 0, instructions 0.5, outputs 1
KL_COEF, KL_SHIFT = 0.7, 0.3
CASES = [f"{stage}-{kl}-{impl}" for stage in (2, 3) for kl in ("none", "adapter", "copy") for impl in ("chunked", "logits")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    """Every case's per-rank results, from one 2-process launch."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "plugin"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(WORKER), str(out), *CASES],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return {case: [json.loads((out / f"{case}.{rank}.json").read_text()) for rank in (0, 1)] for case in CASES}


def brute_force(initial: dict, kl: str):
    """Global loss, summed KL and gradients in float64 over both ranks' batches, from the formulas:
    loss = (Σ_t w_t·CE_t + λ Σ_{t ∈ output targets} KL(p_t ‖ q_t)) / Σ_t w_t over every target of both ranks."""
    model = TinyLM().double()
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in initial.items()})
    numerator = torch.zeros((), dtype=torch.float64)
    total_weight = 0.0
    kl_total = torch.zeros((), dtype=torch.float64)
    for rank in (0, 1):
        ids, segs = make_batch(seed=rank)
        logits = model(ids)
        with torch.no_grad():
            ref_logits = model.lm_head(torch.tanh(model.mix(model.embed(ids)) + KL_SHIFT))
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                target, seg = int(ids[b, t + 1]), int(segs[b, t + 1])
                logp = torch.log_softmax(logits[b, t], -1)
                w = WEIGHTS[seg]
                numerator = numerator - w * logp[target]
                total_weight += w
                if kl != "none" and seg == OUTPUT:
                    logq = torch.log_softmax(ref_logits[b, t], -1)
                    term = (logp.exp() * (logp - logq)).sum()
                    numerator = numerator + KL_COEF * term
                    kl_total = kl_total + term.detach()
    loss = numerator / total_weight
    loss.backward()
    return loss.item(), kl_total.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_loss_kl_and_gradients_match_float64_brute_force(zero_results, case):
    stage, kl, impl = case.split("-")
    ranks = zero_results[case]
    assert [r["world"] for r in ranks] == [2, 2]  # two real ranks, not two single-process runs
    assert [r["zero3"] for r in ranks] == [stage == "3"] * 2  # the head really is partitioned (or not)
    loss, kl_sum, grads = brute_force(ranks[0]["initial"], kl)
    for r in ranks:
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["kl_sum"] == pytest.approx(kl_sum, rel=1e-5, abs=1e-9)
        for name, grad in grads.items():
            ours = torch.tensor(r["grads"][name], dtype=torch.float64)
            torch.testing.assert_close(ours, grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("kl", ["none", "adapter", "copy"])
def test_zero3_chunked_builds_no_logits_and_gathers_reference_head_once(zero_results, kl):
    chunked, logits = zero_results[f"3-{kl}-chunked"], zero_results[f"3-{kl}-logits"]
    for r in chunked:
        # Nothing of [tokens x vocab] (a chunk is CHUNK x V, the gathered head V x D).
        assert r["largest"] < r["tokens"] * V
        assert r["largest"] >= max(CHUNK, D) * V  # the probe saw the head-sized tensors
        # The policy head once (its forward runs the loss); a copy reference's head once more; an adapter
        # reference shares the policy head's gathered weights. Per chunk would be 2 x (80 / 16) more.
        assert r["forward_gathers"] == {"none": 1, "adapter": 1, "copy": 2}[kl]
    for r in logits:
        # The model's own lm_head call, then the reference head once for the whole micro-batch.
        assert r["forward_gathers"] == {"none": 1, "adapter": 2, "copy": 2}[kl]
    for r in zero_results[f"2-{kl}-chunked"]:
        assert r["largest"] < r["tokens"] * V and r["forward_gathers"] == 0


# -- config load -------------------------------------------------------------------------

def test_zero_stage_is_read_from_a_path_or_a_dict(tmp_path):
    from instruction_modelling.axolotl.deepspeed import config_zero_stage

    assert config_zero_stage({}) is None
    assert config_zero_stage({"deepspeed": {"zero_optimization": {"stage": 2}}}) == 2
    assert config_zero_stage({"deepspeed": str(REPO_ROOT / "recipes" / "deepspeed_configs" / "zero3_bf16.json")}) == 3
    with pytest.raises(ValueError, match="cannot read the DeepSpeed config .*nope.json"):
        config_zero_stage({"deepspeed": str(tmp_path / "nope.json")})


@pytest.mark.parametrize("setting, message", [
    (dict(im_loss_impl="cce", deepspeed="ZERO3_FILE"),
     "im_loss_impl: cce cannot run under DeepSpeed ZeRO-3, whose sharded lm_head only the chunked loss gathers for "
     "itself; use im_loss_impl: chunked (or auto)"),
    (dict(im_loss_impl="chunked", deepspeed={"zero_optimization": {"stage": 3}}, adapter="lora", lora_r=4,
          lora_alpha=8, lora_target_modules=["q_proj", "lm_head"]),
     "im_loss_impl: chunked needs a plain lm_head under DeepSpeed ZeRO-3, but lora_target_modules adapts it; remove "
     "the output layer from lora_target_modules, or set im_loss_impl: logits"),
])
def test_impossible_zero3_combinations_stop_at_config_load(tmp_path, tiny_model_dir, setting, message):
    """Through the real CLI: one sentence, before any dataset or model work."""
    pytest.importorskip("axolotl")
    from cli_helpers import run_axolotl, write_jsonl
    from instruction_modelling.axolotl.configs import cpu_config

    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": "Hello"}]}] * 4)
    if setting.get("deepspeed") == "ZERO3_FILE":
        setting = {**setting, "deepspeed": str(REPO_ROOT / "recipes" / "deepspeed_configs" / "zero3_bf16.json")}
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", max_steps=1, **setting)
    run = run_axolotl("train", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert message in run.output
    assert "Tokenizing Prompts" not in run.output and "Loading model" not in run.output


# -- the real Axolotl CLI ----------------------------------------------------------------

def test_axolotl_zero3_two_ranks_equal_one_process_with_accumulation(tmp_path, tiny_model_dir, monkeypatch):
    """ZeRO-3 over two CPU ranks (DeepSpeed engine, gloo) through ``axolotl.cli.train``, chunked loss with
    the KL to a sharded copy reference, against one plain process with gradient accumulation x2 over
    the same micro-batches: the same logged losses, segment losses, KL and final weights."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("axolotl")
    from cli_helpers import AxolotlRun, run_axolotl, write_jsonl
    from instruction_modelling.axolotl.configs import PLUGIN, cpu_config, write_config
    from instruction_modelling.quickstart.sample_data import TRAIN_FILE

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT / "tests" / "probes"), os.environ.get("PYTHONPATH", "")]))
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:24]
    data = write_jsonl(tmp_path / "train.jsonl", rows)

    def cfg(name, ga, **extra):
        # As tests/test_ddp_cli.py: sequential batches (rank r of step s sees micro-batch 2s + r), SGD.
        return cpu_config(tiny_model_dir, data, tmp_path / name, mode="im", im_instruction_weight=0.3,
                          micro_batch_size=2, gradient_accumulation_steps=ga, max_steps=3, learning_rate=0.1,
                          curriculum_sampling=True, save_strategy="steps", save_steps=3, optimizer="sgd",
                          lr_scheduler="constant", warmup_ratio=0.0, im_kl_coef=0.5, im_kl_reference="copy",
                          im_loss_chunk_size=32, dataset_prepared_path=str(tmp_path / "prepared"), **extra)

    single = run_axolotl("train", cfg("single", 2), tmp_path / "single.yml")
    assert single.returncode == 0, single.output[-3000:]

    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                   "stage3_gather_16bit_weights_on_model_save": True},
             "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    ds_cfg = cfg("zero3", 1, deepspeed=zero3, plugins=[PLUGIN, "cpu_ddp.CpuDdpPlugin", "cpu_zero.CpuZeroPlugin"])
    write_config(ds_cfg, tmp_path / "zero3.yml")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "axolotl.cli.train", str(tmp_path / "zero3.yml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    for rank in (0, 1):  # what each rank's trainer thinks it runs
        assert f"[cpu_zero] rank {rank} world_size 2 distributed_type DistributedType.DEEPSPEED zero_stage 3 " \
               "deepspeed True" in proc.stdout
    assert "im_loss_impl: chunked (under DeepSpeed ZeRO-3" in proc.stdout
    ds = AxolotlRun(proc, ds_cfg)

    a = [h for h in single.log_history() if "loss" in h]
    b = [h for h in ds.log_history() if "loss" in h]
    assert len(a) == len(b) == 3
    assert a[-1]["kl"] > 0
    for x, y in zip(a, b):
        for key in ("loss", "instruction_loss", "output_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x, y)
        # The KL (~0.01) is a difference of log-probabilities of size ~7: fp32 rounding is ~1e-6 absolute.
        assert y["kl"] == pytest.approx(x["kl"], abs=1e-6), (x, y)

    from safetensors.torch import load_file

    wa = load_file(tmp_path / "single" / "model.safetensors")
    wb = load_file(tmp_path / "zero3" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
