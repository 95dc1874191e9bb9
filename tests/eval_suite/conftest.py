"""Shared fixtures: a tiny local Llama with a chat template, the rule-based judge server, paths.

Nothing is downloaded: the tokenizer is a BPE trained in memory and the model has random weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("IM_SHARED_DIR", REPO_ROOT.parent / "shared"))  # a worktree elsewhere sets it
BENCHMARKS = SHARED / "benchmarks"
TULU_TEMPLATE = (REPO_ROOT / "eval_suite" / "templates" / "tulu.jinja").read_text()

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Question: What is two plus two? Answer: four",
    "def add(a, b):\n    return a + b\n", "Paris is the capital of France.", "The answer is 42.",
    "Write a short poem about the sea.", "Translate to French: good morning -> bonjour",
] * 20


def benchmarks_dir() -> Path:
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark fixtures not found at {BENCHMARKS} (../shared next to the repo)")
    return BENCHMARKS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~0.3M-parameter LlamaForCausalLM with a BPE tokenizer and the tulu chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_model")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = TULU_TEMPLATE
    return save_tiny_llama(tok, out, max_position_embeddings=1024, seed=0)


def save_tiny_llama(tok, out: Path, max_position_embeddings: int, seed: int) -> Path:
    """Save ``tok`` and a randomly initialised 2-layer LlamaForCausalLM for it in ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_position_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture
def judge_server():
    """The rule-based judge on a free 127.0.0.1 port, in this process (its counters are inspectable)."""
    from eval_suite.judge.server import JudgeServer

    with JudgeServer() as server:
        yield server


def lm_eval_reported_as(version: str, root: Path) -> dict:
    """An environment for ``run_cli`` in which ``importlib.metadata`` reports lm-eval ``version``: a
    dist-info folder ahead of the installed one on the path (the installed code is what still runs)."""
    dist = root / "site" / f"lm_eval-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lm_eval\nVersion: {version}\n")
    return {"PYTHONPATH": f"{root / 'site'}{os.pathsep}{REPO_ROOT}"}


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m eval_suite ...`` in a subprocess with this checkout first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "eval_suite", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO_ROOT)
