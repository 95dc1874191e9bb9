"""``im_loss_impl`` through the real Axolotl CLI: the hidden-state path logs the same losses as the
logits path, never builds the full logits, and takes over Axolotl's memory-efficient CE options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_helpers import REPO_ROOT, run_axolotl, write_jsonl
from instruction_modelling.axolotl.configs import PLUGIN, cpu_config
from instruction_modelling.quickstart.sample_data import TRAIN_FILE

pytest.importorskip("axolotl")

PROBE = "lm_head_probe.LmHeadProbePlugin"
CHUNK = 64


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """Path of the lm_head probe's record; the probe plugin becomes importable by the CLI."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT / "tests" / "probes"), os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "lm_head_calls.txt"
    monkeypatch.setenv("LM_HEAD_PROBE", str(path))
    return path


def head_calls(path: Path) -> list[tuple[int, bool]]:
    lines = path.read_text().split() if path.exists() else []
    return [(int(n), t == "1") for n, t in zip(lines[::2], lines[1::2])]


def train_cfg(tmp_path, model_dir, name, **overrides):
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:32]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    settings = dict(plugins=[PLUGIN, PROBE], im_instruction_weight=0.3, im_loss_chunk_size=CHUNK, max_steps=3,
                    micro_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="steps",
                    save_steps=3, eval_strategy="steps", eval_steps=3, dataset_prepared_path=str(tmp_path / "prepared"))
    settings.update(overrides)
    return cpu_config(model_dir, data, tmp_path / name, mode="im", eval_file=data, **settings)


def test_chunked_and_logits_log_the_same_losses_and_only_logits_builds_full_logits(tmp_path, tiny_model_dir, probe):
    history, calls = {}, {}
    for impl in ("chunked", "logits"):
        # Full fine-tuning: Axolotl 0.19's LoRA initialisation differs between two CLI runs here.
        cfg = train_cfg(tmp_path, tiny_model_dir, impl, im_loss_impl=impl, im_kl_coef=0.5, im_kl_reference="copy")
        run = run_axolotl("train", cfg, tmp_path / f"{impl}.yml")
        assert run.returncode == 0, run.output[-3000:]
        assert f"im_loss_impl: {impl} (requested)" in run.output
        history[impl] = run.log_history()
        calls[impl] = head_calls(probe)
        probe.unlink()
    train = {k: [h for h in v if "loss" in h] for k, v in history.items()}
    evals = {k: [h for h in v if "eval_loss" in h] for k, v in history.items()}
    assert len(train["chunked"]) == len(train["logits"]) == 3 and len(evals["chunked"]) == len(evals["logits"]) >= 1
    # abs: at the first step policy and reference are the same model and the KL is rounding (~1e-9,
    # the two paths multiply the reference's rows in different blocks)
    for a, b in zip(train["chunked"], train["logits"]):
        for key in ("loss", "instruction_loss", "output_loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (key, a, b)
    for a, b in zip(evals["chunked"], evals["logits"]):
        for key in ("eval_loss", "eval_instruction_loss", "eval_output_loss", "eval_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (key, a, b)
    # The logits path runs the head over whole micro-batches; the chunked path never over more than a
    # chunk (the model's own call is cut to the last position by logits_to_keep=1).
    assert max(n for n, _ in calls["logits"]) > 4 * CHUNK
    assert max(n for n, _ in calls["chunked"]) <= CHUNK, calls["chunked"]


# cut_cross_entropy is handled by the same code (args.MEMORY_EFFICIENT_CE_OPTIONS), but its Axolotl plugin
# needs Axolotl's CCE fork, which is not installable here, and without the plugin Axolotl's schema drops the key.
@pytest.mark.parametrize("option,plugin", [
    ("liger_fused_linear_cross_entropy", "axolotl.integrations.liger.LigerPlugin"),
])
def test_memory_efficient_ce_options_are_taken_over_not_lost(tmp_path, tiny_model_dir, probe, option, plugin):
    plugins = [PLUGIN, PROBE] + ([plugin] if plugin else [])
    cfg = train_cfg(tmp_path, tiny_model_dir, option, plugins=plugins, max_steps=2, eval_strategy="no",
                    eval_steps=None, save_steps=2, **{option: True})
    run = run_axolotl("train", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    line = next(line for line in run.output.splitlines() if "im_loss_impl:" in line)
    assert "im_loss_impl: chunked" in line and f"takes over {option}" in line, line
    calls = head_calls(probe)
    assert calls and max(n for n, training in calls if training) <= CHUNK, calls


def test_logits_impl_with_a_memory_efficient_ce_option_is_an_error(tmp_path, tiny_model_dir):
    cfg = train_cfg(tmp_path, tiny_model_dir, "bad", plugins=[PLUGIN], im_loss_impl="logits",
                    liger_fused_linear_cross_entropy=True)
    run = run_axolotl("train", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "im_loss_impl: logits builds the full logits that liger_fused_linear_cross_entropy: true" in run.output
