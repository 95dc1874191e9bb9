"""Recipes: generated from the table, valid for Axolotl 0.19.0, trainable (2 CPU steps per family)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # before anything imports Axolotl

import pytest

from instruction_modelling.core.options import IMArgs
from instruction_modelling.axolotl.configs import write_config
from instruction_modelling.quickstart.sample_data import TRAIN_FILE
from instruction_modelling.quickstart.tiny import build_tiny_llama, corpus_from_jsonl
from instruction_modelling.commands.recipes import (
    check, for_cpu_smoke_test, generate, load_recipe)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ALL_RECIPES = sorted(RECIPES.rglob("*.yml"))
WIT_RECIPES = sorted((RECIPES / "wit").glob("*.yml"))
PLW_RECIPES = sorted((RECIPES / "plw").glob("*.yml"))
PAPER_RECIPES = [p for p in ALL_RECIPES if p not in WIT_RECIPES and p not in PLW_RECIPES]
WIT_GRID = [(p, r) for r in (0.6, 1.0) for p in (0.0, 0.01, 0.1, 0.4, 1.0)]
PLW_VALUES = (0.0, 0.01, 0.1, 0.5, 1.0)
KL_KEYS = ("im_kl_coef", "im_kl_type", "im_kl_segments", "im_kl_reference")
KL_MISSING = [k for k in KL_KEYS if k not in IMArgs.model_fields]
KL_SKIP_REASON = (f"IMArgs does not declare {KL_MISSING} yet (KL options: issue 3, another branch); Axolotl would "
                  "silently drop them and it_kl would train as plain IT")
# A GPU node like the paper's (2 x A100-80G): validation then runs Axolotl's capability checks too.
A100X2 = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 2, "compute_capability": "sm_80"}


# --- one source of truth ---------------------------------------------------------------------------

def test_the_paper_grid_is_committed():
    names = {p.relative_to(RECIPES).as_posix() for p in ALL_RECIPES}
    for dataset in ("lima", "alpagasus_dolly_3k", "alpagasus_dolly_9k", "alpagasus_alpaca_5k", "less_tydiqa",
                    "less_mmlu_chat", "less_bbh_icl"):
        for variant in ("it", "im", "im_neftune", "it_neftune", "it_kl"):
            assert f"{dataset}_{variant}.yml" in names
        for folder in ("llama2_13b", "opt_6.7b", "lora"):
            assert {f"{folder}/{dataset}_it.yml", f"{folder}/{dataset}_im.yml"} <= names
    as_run = [(p, r) for p, r in WIT_GRID if p > 0]  # at λp 0 as run and content-only are the same
    assert len(names) == 35 + 3 * 14 + 2 * (len(WIT_GRID) + len(as_run)) + len(PLW_VALUES)


def test_wit_grid_on_lima_and_dolly_3k():
    """WIT's λp × λr grid with its reference run (instruction_tuner_fsdp.sh: lr 2e-5, 1 epoch, 4096 tokens,
    grad-accum 8 on 8 GPUs, λp 0.4 / λr 0.6), the loss divided by the count of non-zero-weight tokens."""
    for dataset in ("lima", "alpagasus_dolly_3k"):
        for lp, lr in WIT_GRID:
            name = f"{dataset}_wit_p{lp:g}_r{lr:g}.yml"
            cfg = load_recipe(RECIPES / "wit" / name)
            weights = IMArgs.from_cfg(cfg).role_weight_map()
            assert (weights["user"], weights["assistant"]) == (lp, lr), name
            assert cfg["im_loss_normalization"] == "nonzero"
            assert (cfg["learning_rate"], cfg["num_epochs"], cfg["sequence_len"], cfg["gradient_accumulation_steps"],
                    cfg["micro_batch_size"], cfg["lr_scheduler"], cfg["weight_decay"]) == \
                (2e-5, 1, 4096, 8, 1, "cosine", 0.1), name
            assert cfg["datasets"][0]["path"] == f"data/prepared/{dataset}.jsonl"
        header = (RECIPES / "wit" / f"{dataset}_wit_p0.4_r0.6.yml").read_text().split("\n\n", 1)[0]
        assert "WIT's reference run" in header and "8 GPUs, as WIT" in header


def test_wit_as_run_recipes_weight_the_template_and_count_the_first_token():
    """``wit_asrun_p*``: WIT's loss as its code runs it (docs/weighting.md): the template weighted λp
    like the prompt, each example's first token counted, everything else as the content-only file."""
    for dataset in ("lima", "alpagasus_dolly_3k"):
        for lp, lr in WIT_GRID:
            if lp == 0:
                assert not (RECIPES / "wit" / f"{dataset}_wit_asrun_p0_r{lr:g}.yml").exists()
                continue
            as_run = load_recipe(RECIPES / "wit" / f"{dataset}_wit_asrun_p{lp:g}_r{lr:g}.yml")
            content = load_recipe(RECIPES / "wit" / f"{dataset}_wit_p{lp:g}_r{lr:g}.yml")
            args = IMArgs.from_cfg(as_run)
            weights = args.role_weight_map()
            assert (weights["user"], weights["assistant"], weights["template"]) == (lp, lr, lp)
            assert args.im_count_first_token and args.im_loss_normalization == "nonzero"
            differ = {k for k in as_run.keys() | content.keys() if as_run.get(k) != content.get(k)}
            assert differ == {"im_role_weights", "im_count_first_token", "output_dir", "dataset_prepared_path"}, differ


def test_plw_recipes_run_stanford_alpacas_settings_with_the_prompt_weighted():
    """PLW as run (docs/weighting.md): LLaMA-2-7B with Stanford Alpaca's train.py settings (README:
    lr 2e-5, 3 epochs, 512 tokens, batch 4 x 8 accumulation x 4 GPUs = 128, cosine, 3% warm-up, no
    weight decay) and prompt; the whole prompt, template included, weighted PLW under ``token``."""
    assert [load_recipe(p).get("im_instruction_weight", 0.0)
            for p in sorted(PLW_RECIPES, key=lambda p: float(p.stem.rsplit("_", 1)[1]))] == list(PLW_VALUES)
    for path in PLW_RECIPES:
        cfg = load_recipe(path)
        args = IMArgs.from_cfg(cfg)
        plw = float(path.stem.rsplit("_", 1)[1])
        weights = args.role_weight_map()
        assert (weights["user"], weights["system"], weights["template"], weights["assistant"]) == (plw, plw, plw, 1.0)
        assert args.im_mode == ("it" if plw == 0 else "im") and args.im_loss_normalization == "token"
        assert (cfg["base_model"], cfg["learning_rate"], cfg["num_epochs"], cfg["sequence_len"], cfg["micro_batch_size"],
                cfg["gradient_accumulation_steps"], cfg["lr_scheduler"], cfg["warmup_ratio"], cfg["weight_decay"]) == \
            ("meta-llama/Llama-2-7b-hf", 2e-5, 3, 512, 4, 8, "cosine", 0.03, 0.0), path
        assert cfg["chat_template_jinja"].startswith("{{ bos_token }}") and "### Response:' }}" in cfg["chat_template_jinja"]


def test_committed_recipes_are_what_the_table_generates():
    assert check(RECIPES) == [], "run `python -m instruction_modelling.recipes generate` and commit"


def test_every_committed_recipe_file_is_declared_for_the_wheel():
    """pyproject's data-files globs must cover each file under recipes/ (a new sub-folder needs its own
    line): otherwise `pip install` ships a wheel without it, which only the CI wheel step would see."""
    import fnmatch
    import tomllib
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    globs = [g for patterns in declared.values() for g in patterns]
    files = [p.relative_to(REPO).as_posix() for p in RECIPES.rglob("*") if p.is_file()]
    undeclared = [f for f in files
                  if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert files and undeclared == [], (
        f"recipes not listed under [tool.setuptools.data-files] in pyproject.toml: {undeclared}")


def test_check_catches_a_hand_edit_and_a_stray_recipe(tmp_path):
    copy = tmp_path / "recipes"
    shutil.copytree(RECIPES, copy)
    edited = copy / "lima_im.yml"
    edited.write_text(edited.read_text().replace("learning_rate: 2.0e-05", "learning_rate: 1.0e-05"))
    (copy / "my_own.yml").write_text("base_model: x\n")
    problems = check(copy)
    assert any("lima_im.yml: differs" in p for p in problems)
    assert any("my_own.yml: not generated" in p for p in problems)
    generate(copy)  # regenerating repairs the edit; the stray file stays reported
    assert [p for p in check(copy) if "lima_im.yml" in p] == []


def test_variants_differ_only_in_their_method_lines():
    im, it = load_recipe(RECIPES / "less_tydiqa_im.yml"), load_recipe(RECIPES / "less_tydiqa_it.yml")
    diff = {k for k in im.keys() | it.keys() if im.get(k) != it.get(k)}
    assert diff == {"im_mode", "output_dir", "dataset_prepared_path"}
    neft = load_recipe(RECIPES / "less_tydiqa_it_neftune.yml")
    assert {k for k in neft.keys() | it.keys() if neft.get(k) != it.get(k)} == \
        {"neftune_noise_alpha", "output_dir", "dataset_prepared_path"}


def test_recipes_carry_the_papers_settings():
    for path in PAPER_RECIPES:
        cfg = load_recipe(path)
        lora = cfg.get("adapter") == "lora"
        gpus = 1 if lora else 2
        assert cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"] * gpus == 128, path
        assert (cfg["num_epochs"], cfg["sequence_len"], cfg["lr_scheduler"], cfg["warmup_ratio"],
                cfg["weight_decay"], cfg["bf16"]) == (2, 2048, "linear", 0.03, 0.0, True), path
        assert cfg["learning_rate"] == (1e-4 if lora else 2e-5), path
        assert cfg["attn_implementation"] == "flash_attention_2" and cfg["sample_packing"] is False
        assert cfg["plugins"] == ["instruction_modelling.InstructionModellingPlugin"]
        assert cfg["datasets"][0]["type"] == "instruction_modelling"
        dataset = path.stem.rsplit("_", 2 if path.stem.endswith(("_neftune", "_kl")) else 1)[0]
        assert cfg["datasets"][0]["path"] == f"data/prepared/{dataset}.jsonl", path
        assert cfg["chat_template_jinja"].startswith("{{ bos_token }}") and "<|assistant|>" in cfg["chat_template_jinja"]
        if path.stem.endswith("neftune"):
            assert cfg["neftune_noise_alpha"] == 5
        header = path.read_text().split("\n\n", 1)[0]
        assert "Reproduces:" in header and f"recipes/{path.relative_to(RECIPES).as_posix()}" in header
    lima_im = (RECIPES / "lima_im.yml").read_text()
    assert "18-task NLP mean 49.60, MT-Bench 4.83, AlpacaEval 1.0 32.94%, AlpacaEval 2.0 2.47%" in lima_im
    kl = load_recipe(RECIPES / "alpagasus_dolly_9k_it_kl.yml")
    assert {k: kl[k] for k in KL_KEYS} == {"im_kl_coef": 1.0, "im_kl_type": "full", "im_kl_segments": "output",
                                           "im_kl_reference": "copy"}
    assert "18-task NLP mean 49.31, AlpacaEval 2.0 0.04%" in (RECIPES / "alpagasus_dolly_9k_it_kl.yml").read_text()


def test_deepspeed_config_is_zero3_bf16_without_offload():
    for path in ALL_RECIPES:
        cfg = load_recipe(path)
        if cfg.get("adapter") == "lora":
            assert "deepspeed" not in cfg
            continue
        ds = json.loads((REPO / cfg["deepspeed"]).read_text())  # relative to the repo root
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
        assert not any("offload" in k for k in ds["zero_optimization"])


# --- Axolotl 0.19.0's own validation -------------------------------------------------------------------

@pytest.fixture(scope="module")
def axolotl_validate():
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    def validate(path: Path):
        cfg = DictDefault(load_recipe(path))
        prepare_plugins(cfg)
        return validate_config(cfg, capabilities=A100X2, env_capabilities={"torch_version": "2.13.0"})

    cwd = os.getcwd()
    os.chdir(REPO)  # recipes use repo-relative paths
    yield validate
    os.chdir(cwd)


def test_every_recipe_passes_axolotl_validation_and_keeps_its_plugin_options(axolotl_validate):
    for path in ALL_RECIPES:
        raw = load_recipe(path)
        cfg = axolotl_validate(path)
        # Axolotl silently drops keys its merged schema does not declare: check ours survived.
        for key, value in raw.items():
            if key.startswith("im_") and key not in KL_KEYS:
                assert cfg.get(key) == value, f"{path}: {key} lost in validation"
        for key in ("learning_rate", "num_epochs", "gradient_accumulation_steps", "neftune_noise_alpha",
                    "lr_scheduler", "warmup_ratio", "adapter", "lora_r", "deepspeed", "excess_length_strategy"):
            assert cfg.get(key) == raw.get(key), f"{path}: {key} changed in validation"
        assert cfg["datasets"][0]["type"] == "instruction_modelling"


@pytest.mark.skipif(bool(KL_MISSING), reason=KL_SKIP_REASON)
def test_kl_options_survive_validation(axolotl_validate):
    for path in sorted(RECIPES.glob("*_it_kl.yml")):
        raw, cfg = load_recipe(path), axolotl_validate(path)
        assert {k: cfg.get(k) for k in KL_KEYS} == {k: raw[k] for k in KL_KEYS}, path


# --- 2 training steps on CPU per variant family ---------------------------------------------------------

def test_cpu_swap_keeps_the_method_and_removes_gpu_settings(tmp_path):
    recipe = load_recipe(RECIPES / "lora" / "lima_im.yml")
    cfg = for_cpu_smoke_test(recipe, tmp_path / "model", tmp_path / "rows.jsonl", tmp_path / "out")
    kept = ("im_mode", "im_loss_normalization", "chat_template", "chat_template_jinja", "adapter", "lora_r",
            "lora_alpha", "learning_rate", "lr_scheduler", "warmup_ratio", "optimizer", "num_epochs", "plugins")
    assert {k: cfg[k] for k in kept} == {k: recipe[k] for k in kept}
    assert (cfg["bf16"], cfg["fp16"], cfg["attn_implementation"], cfg["max_steps"]) == (False, False, "sdpa", 2)
    assert "deepspeed" not in cfg and "gradient_checkpointing" not in cfg and cfg["lora_mlp_kernel"] is False
    assert cfg["base_model"] == str(tmp_path / "model") and cfg["datasets"][0]["path"] == str(tmp_path / "rows.jsonl")
    assert recipe["bf16"] is True  # the recipe itself is not modified


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_llama(out, corpus_from_jsonl(TRAIN_FILE))


# ~30 s each on 2 shared CPU cores: one family in the default run, the rest with `make test-slow`.
FAMILIES = [
    "lima_im.yml",
    pytest.param("lima_it.yml", marks=pytest.mark.slow),
    pytest.param("lima_im_neftune.yml", marks=pytest.mark.slow),
    pytest.param("lima_it_neftune.yml", marks=pytest.mark.slow),
    pytest.param("lima_it_kl.yml", marks=pytest.mark.slow),
    pytest.param("lora/lima_im.yml", marks=pytest.mark.slow),
    pytest.param("wit/lima_wit_p0.4_r0.6.yml", marks=pytest.mark.slow),
    pytest.param("wit/lima_wit_asrun_p0.4_r0.6.yml", marks=pytest.mark.slow),
    pytest.param("plw/alpagasus_alpaca_5k_plw_0.1.yml", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("recipe", FAMILIES)
def test_each_variant_family_trains_two_steps_on_cpu(recipe, tiny_model, tmp_path):
    if recipe.endswith("_it_kl.yml") and KL_MISSING:
        pytest.skip(KL_SKIP_REASON)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(TRAIN_FILE.read_text().splitlines(keepends=True)[:16]))
    cfg = for_cpu_smoke_test(load_recipe(RECIPES / recipe), tiny_model, rows, tmp_path / "out")
    path = write_config(cfg, tmp_path / "smoke.yml")
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "'instruction_loss'" in log and "'output_loss'" in log  # the plugin's trainer ran
    assert "2/2 [" in log  # exactly max_steps optimizer steps
    # The validated config Axolotl prints still carries the recipe's method.
    assert f'"im_mode": "{cfg["im_mode"]}"' in log
    for key in ("neftune_noise_alpha", "adapter", "im_loss_normalization", "im_instruction_weight", "im_output_weight",
                "im_role_weights", "im_count_first_token", *KL_KEYS):
        if key in cfg and isinstance(cfg[key], dict):  # printed indented: each item on its own line
            assert f'"{key}": {{' in log and all(f'"{k}": {json.dumps(v)}' in log for k, v in cfg[key].items())
        elif key in cfg:
            assert f'"{key}": {json.dumps(cfg[key])}' in log.replace('"neftune_noise_alpha": 5.0', '"neftune_noise_alpha": 5')
    saved = list((tmp_path / "out").glob("*.safetensors"))
    assert saved, f"no weights written to {tmp_path / 'out'}"
