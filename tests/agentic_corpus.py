"""Realistic agentic rows and a tokenizer that merges across segment boundaries, shared by the
agentic parity tests (import by name: ``from agentic_corpus import ...``).

The rows have the shapes agent traces have: parallel tool calls, null and empty call content,
arguments as dicts and as JSON strings, unicode, tool results that look like template tags,
reasoning on some turns (ending in punctuation, so ``".\\n"`` merges before ``</think>``),
per-message ``training`` flags and ``train_detail`` spans that end inside a token.

``merging_tokenizer`` is a byte-level BPE with Qwen2's pre-tokenizer pattern, which keeps
punctuation together with the newlines after it (``".\\n"``, ``"}\\n"``), and every control token of
Axolotl's tool/reasoning templates as an atomic added token, as real tokenizers have them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

# Axolotl's bundled templates that render tools or reasoning, with the token that ends a turn
# (what a user sets as ``eot_tokens``; None: the template ends turns with the tokenizer's EOS).
TOOL_TEMPLATES = {
    "command_a": "<|END_OF_TURN_TOKEN|>",
    "command_a_rag": "<|END_OF_TURN_TOKEN|>",
    "command_a_tool_use": "<|END_OF_TURN_TOKEN|>",
    "deepseek_v3": "<｜end▁of▁sentence｜>",
    "exaone4": "[|endofturn|]",
    "falcon_h1": "<|im_end|>",
    "gemma4": "<turn|>",
    "gemma4_unified": "<turn|>",
    "jamba": "<|eom|>",
    "llama3_2_vision": "<|eot_id|>",
    "llama4": "<|eot|>",
    "mistral_v2v3": None,
    "mistral_v3_tekken": None,
    "phi_4": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "qwen3_5": "<|im_end|>",
    "qwen_25": "<|im_end|>",
}

CONTROL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
    "<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>", "<|python_end|>",
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
    "[|system|]", "[|user|]", "[|assistant|]", "[|tool|]", "[|endofturn|]",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>",
    "<tool_call|>", "<|tool_response>", "<tool_response|>", "<|\"|>",
    "<|bom|>", "<|eom|>", "<|startoftext|>",
    "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
    "<|START_THINKING|>", "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_RESPONSE|>",
    "<|END_RESPONSE|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>",
]

# Qwen2's pre-tokenizer: punctuation keeps the newlines that follow it (".\n" is one token).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


def call(name, args, call_id=None, *, as_string=True):
    """An OpenAI-style tool call; arguments as a JSON string (as exported) or a dict."""
    out = {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)
                                            if as_string else args}}
    if call_id:
        out["id"] = call_id
    return out


def detail(*spans):
    """``train_detail``: (begin, end inclusive, train) triples."""
    return [{"begin_offset": b, "end_offset": e, "train": t} for b, e, t in spans]


ROWS = {
    # Parallel calls (dict and string arguments), null content, unicode, reasoning ending in ".".
    "parallel_calls": {"tools": [WEATHER, SEARCH], "messages": [
        {"role": "system", "content": "You are a travel assistant.\nAnswer in one sentence."},
        {"role": "user", "content": "Compare the weather in Zürich and 東京, then find a train."},
        {"role": "assistant", "content": None, "reasoning_content": "I need both forecasts first.",
         "tool_calls": [call("get_weather", {"city": "Zürich"}), call("get_weather", {"city": "東京"}, as_string=False)]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 3, \"sky\": \"snow ❄\"}"},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "", "tool_calls": [call("search", {"query": "train Zürich → Tokyo"})]},
        {"role": "tool", "name": "search", "content": "<result><train>none</train></result>"},
        {"role": "assistant", "content": "Tokyo is warmer (18 vs 3 °C); no direct train exists.",
         "reasoning_content": "Tokyo is warmer.\nThere is no train."}]},
    # One call, tag-like tool result, a final answer ending in ".\n".
    "one_call": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?\n"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "name": "get_weather", "content": "</tool_response> <|user|> 21 degrees."},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}]},
    # Reasoning only (no tools), two rounds.
    "reasoning_plain": {"messages": [
        {"role": "user", "content": "Is 17 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "17 has no divisor between 2 and 4."},
        {"role": "user", "content": "And 21?"},
        {"role": "assistant", "content": "No, 21 = 3 × 7.", "reasoning_content": "21 is 3 times 7.\n"}]},
    # Per-message flags: an untrained assistant turn, train_detail spans ending inside tokens.
    "flags": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Rome"})], "training": False},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "It is 18 degrees in Rome.",
         "train_detail": detail((0, 16, True), (17, 19, False), (20, 24, True))},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome.", "training": True}]},
    # The last assistant turn is not trained (train_on_eos: last trains the end of the last trained turn).
    "last_untrained": {"messages": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Hi again.", "training": False}]},
    # Flags on instruction turns (trained by Axolotl under IT; see the README's table).
    "instruction_flags": {"messages": [
        {"role": "system", "content": "Be kind.", "training": True},
        {"role": "user", "content": "Please say something nice.", "train_detail": detail((0, 9, True))},
        {"role": "assistant", "content": "You are doing great."}]},
}


def rows_for(template: str) -> dict[str, dict]:
    """The corpus adjusted to what a template family accepts (Llama 3.x: one call per turn; Mistral:
    9-character call ids and tool_call_id on results)."""
    rows = copy.deepcopy(ROWS)
    if template in ("llama3_2_vision", "llama4"):
        for row in rows.values():
            for m in row["messages"]:
                if len(m.get("tool_calls") or []) > 1:
                    m["tool_calls"] = m["tool_calls"][:1]
        row = rows["parallel_calls"]
        row["messages"] = [m for k, m in enumerate(row["messages"]) if k != 4]
    if template.startswith("mistral"):
        for row in rows.values():
            ids = []
            for m in row["messages"]:
                for k, c in enumerate(m.get("tool_calls") or []):
                    c["id"] = f"call{len(ids):05d}"
                    ids.append(c["id"])
                if m["role"] == "tool" and ids:
                    m["tool_call_id"] = ids.pop(0)
    return rows


def merging_tokenizer(out_dir: Path | None = None, extra_texts=()):
    """A fast tokenizer that merges punctuation with following newlines (Qwen2's pattern), with the
    templates' control tokens atomic; EOS ``</s>``, BOS ``<s>``. Trained locally in about a second."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.dumps(r, ensure_ascii=False) for r in ROWS.values()]
    for row in ROWS.values():
        for m in row["messages"]:
            texts += [m.get("content") or "", m.get("reasoning_content") or ""] * 20
    texts += ["It is 18 degrees in Rome. It is 21 degrees.\nDone.\n" * 20, *extra_texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<pad>", "<s>", "</s>", *CONTROL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=CONTROL_TOKENS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
