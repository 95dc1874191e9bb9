"""Shared fixtures: a tiny local Llama + tokenizer and Axolotl's chat templates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_helpers import axolotl_template

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~1M-parameter Llama and BPE tokenizer trained on the quickstart data, built once."""
    from instruction_modelling.quickstart.sample_data import HELDOUT_FILE, TRAIN_FILE
    from instruction_modelling.quickstart.tiny import build_tiny_llama, corpus_from_jsonl

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", corpus_from_jsonl(TRAIN_FILE, HELDOUT_FILE))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def templates():
    from instruction_modelling.quickstart.tiny import TULU_TEMPLATE

    return {"tulu": TULU_TEMPLATE, "chatml": axolotl_template("chatml"), "llama3": axolotl_template("llama3")}
