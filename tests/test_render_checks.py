"""What the render leaves out or adds is never trained silently: Command-A's end-of-turn and
tool-call tokens as Axolotl trains them, template text that appears only because a content is
empty, tool calls and schemas a template does not render, and schemas written without ``tojson``.

The tokenizer merges across every boundary (byte-level BPE without the pre-tokenizer's split, so
``".\\n"`` and ``"\\n]"`` are single tokens) and has Command-A's control tokens as added tokens, as
the real one does."""

from __future__ import annotations

import copy
import json

import pytest

from cli_helpers import axolotl_template
from instruction_modelling.core.segments import (
    OUTPUT_SEGMENTS, ChatRenderer, RowEncoder, RowError, Segment, TemplateError)

pytest.importorskip("axolotl")

COMMAND_A_TOKENS = [
    "<BOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>",
    "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "</s>"]


@pytest.fixture(scope="module")
def merging_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["It is sunny.\nYes.\n", "Paris is warm.\n\nRome.\n", "The city is Lima.\n", '{"city": "Lima"}\n]'] * 50
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=COMMAND_A_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
                                   pad_token="<PAD>", additional_special_tokens=COMMAND_A_TOKENS)
    pieces = fast.tokenize("sunny.\n<|END_RESPONSE|>")
    assert pieces[-1] == "<|END_RESPONSE|>" and len(pieces[-2]) > 2 and pieces[-2].endswith(".Ċ")  # merges ".\n"
    return fast


def call(name, args, call_id):
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": json.dumps(args)}}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": 'Current weather in a "city".',
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": 'City name, e.g. "Paris"'}},
                   "required": ["city"]}}}
PLAIN = {"messages": [{"role": "user", "content": "Is it sunny?"}, {"role": "assistant", "content": "It is sunny."}]}
SYSTEM = {"messages": [{"role": "system", "content": "Be brief."}, *PLAIN["messages"]]}
EMPTY_SYSTEM = {"messages": [{"role": "system", "content": ""}, *PLAIN["messages"]]}
# Command-A numbers the calls a tool result answers by its tool_call_id; results without one render
# the same with and without the call, so both Axolotl and we can locate each turn.
TOOL_CALLS = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": ""}, {"role": "user", "content": "Weather in Lima?"},
    {"role": "assistant", "content": "", "tool_plan": "I will check.\n", "tool_calls": [call("get_weather", {"city": "Lima"}, "c1")]},
    {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]}
COMMAND_A_ROWS = [(t, n, r) for t in ("command_a", "command_a_rag", "command_a_tool_use")
                  for n, r in (("plain", PLAIN), ("system", SYSTEM), ("empty_system", EMPTY_SYSTEM))]
COMMAND_A_ROWS.append(("command_a_tool_use", "tool_calls", TOOL_CALLS))


def encoder(tokenizer, template_name, **kwargs):
    return RowEncoder(tokenizer, ChatRenderer(tokenizer, axolotl_template(template_name), name=template_name), **kwargs)


def axolotl_labels(tokenizer, template_name, row):
    from axolotl.prompt_strategies.chat_template import StrategyLoader
    from axolotl.utils.dict import DictDefault

    template = axolotl_template(template_name)
    cfg = DictDefault({"sequence_len": 4096, "train_on_inputs": False, "chat_template": "jinja",
                       "chat_template_jinja": template})
    ds = {"type": "chat_template", "chat_template": "jinja", "chat_template_jinja": template}
    out = StrategyLoader()(tokenizer, cfg, ds).tokenize_prompt(copy.deepcopy(row))
    return out["input_ids"], out["labels"]


def text_of(tokenizer, ex, segments):
    return tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s in segments])


@pytest.mark.parametrize("template_name,name,row", COMMAND_A_ROWS, ids=[f"{t}-{n}" for t, n, _ in COMMAND_A_ROWS])
def test_command_a_trains_what_axolotl_trains(merging_tokenizer, template_name, name, row):
    """<|END_OF_TURN_TOKEN|> follows <|END_RESPONSE|>, not the answer: it is found within 3 tokens after
    the turn (Axolotl's rule). <|START_THINKING|> and <|END_ACTION|> share "<|START_" / "|>" with the
    dummy turn's tokens, so the located turn starts and ends inside them: as added tokens they are
    whole, and belong to the turn."""
    tok = merging_tokenizer
    ids, labels = axolotl_labels(tok, template_name, row)
    ex = encoder(tok, template_name).encode(copy.deepcopy(row))
    assert ex.input_ids == ids
    ours = [i for i, s in enumerate(ex.segment_ids) if s in OUTPUT_SEGMENTS]
    assert ours == [i for i, label in enumerate(labels) if label != -100], (
        tok.decode([ids[i] for i in ours]), tok.decode([ids[i] for i, label in enumerate(labels) if label != -100]))
    trained = text_of(tok, ex, OUTPUT_SEGMENTS)
    assert trained.endswith("It is sunny.<|END_OF_TURN_TOKEN|>")
    if name == "tool_calls":
        assert trained.startswith("<|START_THINKING|>I will check.\n<|END_THINKING|><|START_ACTION|>")
        assert "]<|END_ACTION|><|END_OF_TURN_TOKEN|>It is sunny." in trained


@pytest.mark.parametrize("template_name,row", [
    ("command_a", EMPTY_SYSTEM), ("command_a_rag", EMPTY_SYSTEM), ("command_a_tool_use", EMPTY_SYSTEM),
    ("command_a_tool_use", TOOL_CALLS), ("qwen_25", EMPTY_SYSTEM), ("llama3_2_vision", EMPTY_SYSTEM),
    ("chatml", {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                             {"role": "assistant", "content": "Nothing to answer."}]}),
])
def test_template_text_of_an_empty_content_stays_template(merging_tokenizer, template_name, row):
    """Command-A writes its system preamble when the system prompt is non-empty and opens a separate,
    empty system turn when it is empty: under IM that turn's tags must not carry system weight."""
    ex = encoder(merging_tokenizer, template_name).encode(copy.deepcopy(row))
    system = text_of(merging_tokenizer, ex, {Segment.SYSTEM})
    assert "<|" not in system and "im_start" not in system
    if "tools" not in row:
        assert system == "" and text_of(merging_tokenizer, ex, {Segment.USER}) == next(
            m["content"] for m in row["messages"] if m["role"] == "user")


DROPPED = [  # (template, row, field the error names)
    ("falcon_h1", TOOL_CALLS["messages"][1:], "messages[1].tool_calls"),  # renders schemas, not calls
    ("chatml", TOOL_CALLS["messages"][1:], "tools"),
    ("llama3", TOOL_CALLS["messages"][1:], "tools"),
    ("command_a", TOOL_CALLS["messages"][1:], "tools"),  # tools only with documents
    ("command_a_rag", TOOL_CALLS["messages"][1:], "tools"),
]


@pytest.mark.parametrize("template_name,messages,field", DROPPED, ids=[d[0] for d in DROPPED])
def test_tool_calls_or_schemas_the_template_drops_are_refused(merging_tokenizer, template_name, messages, field):
    row = {"tools": [WEATHER], "messages": copy.deepcopy(messages)}
    with pytest.raises(TemplateError) as err:
        encoder(merging_tokenizer, template_name).encode(row)
    assert err.value.field == field
    assert f"the chat template ({template_name}) does not render" in str(err.value)


def test_calls_without_schemas_are_refused_too(merging_tokenizer):
    """llama3 renders neither: a row with tool calls but no `tools` field is caught at the call."""
    row = {"messages": copy.deepcopy(TOOL_CALLS["messages"][1:])}
    with pytest.raises(TemplateError, match=r"field 'messages\[1\].tool_calls': the chat template \(llama3\) "
                                            r"does not render tool calls"):
        encoder(merging_tokenizer, "llama3").encode(row)


def test_dropped_tool_calls_are_bad_rows_counted_by_the_strategy(merging_tokenizer):
    """Through the dataset strategy: `error` names file, row and field in one line; `skip` drops and
    counts the row."""
    from datasets import Dataset

    from instruction_modelling.axolotl.strategy import REPORT, BadRowsError, load

    good = {"messages": json.dumps(PLAIN["messages"]), "tools": None}
    bad = {"messages": json.dumps(TOOL_CALLS["messages"][1:]), "tools": json.dumps([WEATHER])}
    rows = Dataset.from_list([good, bad, good])
    rows = rows.map(lambda r: {"messages": json.loads(r["messages"])})  # messages as Axolotl loads them
    cfg = {"sequence_len": 4096, "chat_template": "falcon_h1"}
    ds = {"type": "instruction_modelling", "path": "agentic.jsonl"}
    with pytest.raises(BadRowsError, match=r"^agentic.jsonl row 1 \(line 2\): field 'messages\[1\].tool_calls': "
                                           r"the chat template \(falcon_h1\) does not render tool calls"):
        load(merging_tokenizer, cfg, ds).wrap_dataset(rows)
    REPORT.entries.clear()
    kept = load(merging_tokenizer, {**cfg, "im_on_bad_rows": "skip"}, ds).wrap_dataset(rows)
    assert len(kept) == 2
    (_, total, skipped, _, _), = REPORT.entries
    REPORT.entries.clear()
    assert total == 3 and [where for where, _ in skipped] == ["agentic.jsonl row 1 (line 2)"]


@pytest.mark.parametrize("template_name", ["mistral_v3_tekken", "mistral_v2v3", "gemma4", "gemma4_unified",
                                           "command_a_tool_use"])
def test_schema_text_written_without_tojson_is_system_content(merging_tokenizer, template_name):
    """Mistral writes string values as '"' + value + '"' (a description's quotes unescaped), gemma4
    writes descriptions between <|"|> marks: names and descriptions are located as written and weighted
    as system content; the template's syntax around them stays template."""
    row = {"tools": [WEATHER], "messages": copy.deepcopy(PLAIN["messages"])}
    ex = encoder(merging_tokenizer, template_name).encode(row)
    system = text_of(merging_tokenizer, ex, {Segment.SYSTEM})
    template = text_of(merging_tokenizer, ex, {Segment.TEMPLATE})
    for text in ("get_weather", 'Current weather in a "city".', 'City name, e.g. "Paris"'):
        assert text in system or json.dumps(text)[1:-1] in system, text
        assert text not in template
    if template_name.startswith("gemma4"):
        assert "declaration:" in template and "description:" in template and "<|\"|>" not in system


REWRITING_TEMPLATE = (  # writes each tool's name, and its description upper-cased, not its parameters
    "{% for t in tools or [] %}Tool {{ t.function.name }}: {{ t.function.description | upper }}\n{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")


def test_schema_text_the_template_rewrites_is_counted_in_the_report(merging_tokenizer):
    from datasets import Dataset

    from instruction_modelling.axolotl.strategy import REPORT, load

    row = {"tools": [WEATHER], "messages": copy.deepcopy(PLAIN["messages"])}
    ex = RowEncoder(merging_tokenizer, ChatRenderer(merging_tokenizer, REWRITING_TEMPLATE)).encode(copy.deepcopy(row))
    assert text_of(merging_tokenizer, ex, {Segment.SYSTEM}) == "get_weather"
    rewritten = len('Current weather in a "city".') + len('City name, e.g. "Paris"')
    assert ex.meta["unweighted_schema_chars"] == rewritten
    REPORT.entries.clear()
    rows = Dataset.from_list([{"messages": PLAIN["messages"], "tools": json.dumps([WEATHER])}] * 2)
    cfg = {"sequence_len": 4096, "chat_template": "jinja", "chat_template_jinja": REWRITING_TEMPLATE}
    load(merging_tokenizer, cfg, {"type": "instruction_modelling", "path": "tools.jsonl"}).wrap_dataset(rows)
    summary = REPORT.summary()
    REPORT.entries.clear()
    assert (f"tools.jsonl: 2 rows, 2 kept, 0 skipped, 0 tokens straddled a template/content boundary (no loss), "
            f"{2 * rewritten} characters of tool names/descriptions that the chat template rewrites or leaves out "
            "(no loss)") in summary


def test_command_a_tool_results_numbered_by_their_call_are_refused(merging_tokenizer):
    """command_a_tool_use writes each tool result's number from the call with its tool_call_id, so the
    call's turn, diffed without its calls, reaches into the result's turn; Axolotl trains the result's
    header as the call's output. We refuse the row in one line (a kept difference, README table)."""
    row = copy.deepcopy(TOOL_CALLS)
    row["messages"][3]["tool_call_id"] = "c1"
    _, labels = axolotl_labels(merging_tokenizer, "command_a_tool_use", row)
    axolotl_trained = merging_tokenizer.decode([t for t in labels if t != -100])
    assert "<|START_TOOL_RESULT|>" in axolotl_trained
    with pytest.raises(TemplateError, match=r"field 'messages\[3\]': the chat template interleaves this message with "
                                            r"message 2"):
        encoder(merging_tokenizer, "command_a_tool_use").encode(row)
