"""Build a tiny Llama and a BPE tokenizer locally, in seconds, with no hub access.

Used by the quickstart, the tests and the benchmarks. The tokenizer is byte-level BPE trained on
the given texts; chat-template control tokens of ChatML and Llama-3 are registered as special
tokens, while the paper's tulu tags (``<|user|>``...) stay plain text, as they are for LLaMA-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..resources import TULU_TEMPLATE

SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

_BASE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > | ! ? , . ; : ' \" "
    "system user assistant tool <|system|> <|user|> <|assistant|> ### Instruction: ### Input: ### Response: "
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def build_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 2048,
                    chat_template: str = TULU_TEMPLATE):
    """Train a byte-level BPE tokenizer; returns a ``PreTrainedTokenizerFast`` (saved if ``out_dir``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BASE_TEXT, *texts], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = chat_template
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_model(tokenizer, out_dir: str | Path | None = None, hidden_size: int = 128, layers: int = 2,
                seed: int = 0):
    """A randomly initialised ~1M-parameter ``LlamaForCausalLM`` sized to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


def build_tiny_llama(out_dir: str | Path, texts: Iterable[str], **kwargs) -> Path:
    """Tokenizer + model saved together in ``out_dir`` (usable as Axolotl's ``base_model``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts, out_dir)
    build_model(tok, out_dir, **kwargs)
    return out_dir


def corpus_from_jsonl(*paths: str | Path) -> list[str]:
    """All message contents (or Alpaca / prompt-completion fields) of JSONL files, for tokenizer training."""
    import json

    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for m in row.get("messages") or []:
                    texts.append(str(m.get("content", "")))
                for key in ("instruction", "input", "output", "prompt", "completion"):
                    if isinstance(row.get(key), str):
                        texts.append(row[key])
    return texts
