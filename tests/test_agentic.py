"""Agentic and reasoning chat rows (tools, tool calls, tool results, reasoning traces, per-message
training flags) on the tool-capable templates Axolotl 0.19 ships, checked against Axolotl's own
``chat_template`` type: the same ``input_ids`` for every row, and under IT exactly the tokens its
assistant masks train."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import axolotl_template
from instruction_modelling.core.segments import OUTPUT_SEGMENTS, ChatRenderer, RowEncoder, RowError, Segment
from instruction_modelling.axolotl.strategy import row_fields_from_dataset_config, train_on_eos_of

pytest.importorskip("axolotl")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


def call(name, args, call_id=None):
    out = {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    if call_id:
        out["id"] = call_id
    return out


# OpenAI-style rows: tools + tool_calls (arguments as JSON strings, as exported) + tool results, multi-step.
OPENAI_ROWS = {
    "one_call": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}]},
    "multi_step_parallel": {"tools": [WEATHER, SEARCH], "messages": [
        {"role": "user", "content": "Compare the weather in Oslo and Rome, then find a flight."},
        {"role": "assistant", "content": "Let me check both cities.",
         "tool_calls": [call("get_weather", {"city": "Oslo"}), call("get_weather", {"city": "Rome"})]},
        {"role": "tool", "content": "{\"temp\": 3}"},
        {"role": "tool", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": None, "tool_calls": [call("search", {"query": "flights Oslo Rome"})]},
        {"role": "tool", "content": "Direct flights daily at 9:00."},
        {"role": "assistant", "content": "Rome is warmer (18 vs 3). There is a direct flight at 9:00."}]},
    "empty_system": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Lima"})]},
        {"role": "tool", "content": "{\"temp\": 19}"},
        {"role": "assistant", "content": "19 degrees."}]},
}
REASONING_ROWS = {
    "reasoning_then_call": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Should I take an umbrella in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the weather first.",
         "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "{\"rain\": true}"},
        {"role": "assistant", "content": "Yes, take one.", "reasoning_content": "Rain is expected, so yes."}]},
    "reasoning_plain": {"messages": [
        {"role": "user", "content": "Is 17 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "17 has no divisor between 2 and 4."}]},
}
LLAMA_ROWS = {  # Llama 3.1's own role name for tool results
    "ipython": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "ipython", "content": "{\"temp\": 3}"},
        {"role": "assistant", "content": "3 degrees."}]},
}
MISTRAL_ROWS = {  # Mistral needs 9-character call ids and no system turn before the tools
    "mistral_calls": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Rome"}, "abc123XYZ")]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "18 degrees in Rome."}]},
}

CORPUS = (
    [("qwen_25", name, row) for name, row in OPENAI_ROWS.items()]
    + [("qwen3", name, row) for name, row in {**OPENAI_ROWS, **REASONING_ROWS}.items()]
    # Llama 3.1/3.2 take one tool call per turn.
    + [("llama3_2_vision", name, row) for name, row in {**OPENAI_ROWS, **LLAMA_ROWS}.items() if name != "multi_step_parallel"]
    + [("exaone4", "reasoning_plain", REASONING_ROWS["reasoning_plain"])]
)
END_OF_TURN = {"qwen_25": "<|im_end|>", "qwen3": "<|im_end|>", "llama3_2_vision": "<|eot_id|>",
               "mistral_v3_tekken": "</s>", "mistral_v2v3": "</s>", "exaone4": None}


def axolotl_encode(tokenizer, template_name, row, **ds_options):
    """Axolotl's chat_template type on one row: (input_ids, labels), roles_to_train [assistant]."""
    from axolotl.prompt_strategies.chat_template import StrategyLoader
    from axolotl.utils.dict import DictDefault

    template = axolotl_template(template_name)
    eot = END_OF_TURN.get(template_name)
    cfg = DictDefault({"sequence_len": 4096, "train_on_inputs": False, "chat_template": "jinja",
                       "chat_template_jinja": template, "eot_tokens": [eot] if eot else None})
    ds = {"type": "chat_template", "chat_template": "jinja", "chat_template_jinja": template, **ds_options}
    out = StrategyLoader()(tokenizer, cfg, ds).tokenize_prompt(copy.deepcopy(row))
    return out["input_ids"], out["labels"]


def our_encode(tokenizer, template_name, row, **ds_options):
    eot = END_OF_TURN.get(template_name)
    enc = RowEncoder(tokenizer, ChatRenderer(tokenizer, axolotl_template(template_name)),
                     fields=row_fields_from_dataset_config(ds_options), end_tokens=(eot,) if eot else (),
                     train_on_eos=train_on_eos_of(ds_options))
    return enc.encode(copy.deepcopy(row))


def output_positions(ex):
    return [i for i, s in enumerate(ex.segment_ids) if s in OUTPUT_SEGMENTS]


def label_positions(labels):
    return [i for i, label in enumerate(labels) if label != -100]


def text_of(tokenizer, ex, segments):
    return tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s in segments])


@pytest.mark.parametrize("template_name,name,row", CORPUS, ids=[f"{t}-{n}" for t, n, _ in CORPUS])
def test_same_input_ids_and_output_tokens_as_axolotl(tokenizer, template_name, name, row):
    ids, labels = axolotl_encode(tokenizer, template_name, row)
    ex = our_encode(tokenizer, template_name, row)
    assert ex.input_ids == ids
    assert output_positions(ex) == label_positions(labels), (
        tokenizer.decode([ids[i] for i in output_positions(ex)]), tokenizer.decode([ids[i] for i in label_positions(labels)]))


@pytest.mark.parametrize("template_name", ["mistral_v3_tekken", "mistral_v2v3"])
def test_mistral_tool_calls(tokenizer, template_name):
    """Axolotl 0.19's chat_template type raises on these rows (its dummy turn drops the tool calls and
    breaks Mistral's role-alternation check); we render them as apply_chat_template does and train the
    tool-call block the model must emit."""
    row = MISTRAL_ROWS["mistral_calls"]
    ex = our_encode(tokenizer, template_name, row)
    messages = copy.deepcopy(row["messages"])
    messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Rome"}  # decoded, as Axolotl does
    expected = tokenizer.apply_chat_template(messages, tools=row["tools"], tokenize=False,
                                             chat_template=axolotl_template(template_name))
    assert ex.input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    call_text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abc123XYZ"}]'
    assert text_of(tokenizer, ex, OUTPUT_SEGMENTS).replace(" ", "") == (call_text + "</s>18 degrees in Rome.</s>").replace(" ", "")


def test_fields_axolotl_drops_are_rendered(tokenizer):
    """Axolotl 0.19 passes a message property only if its template analyser finds it; it misses
    exaone4's tool_calls and reasoning_content and silently renders the turn without them. We render
    what apply_chat_template renders for the message (what the model sees at inference)."""
    row = REASONING_ROWS["reasoning_then_call"]
    ex = our_encode(tokenizer, "exaone4", row)
    messages = copy.deepcopy(row["messages"])
    messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = tokenizer.apply_chat_template(messages, tools=row["tools"], tokenize=False,
                                             chat_template=axolotl_template("exaone4"))
    assert ex.input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in \
        text_of(tokenizer, ex, OUTPUT_SEGMENTS)
    ids, _ = axolotl_encode(tokenizer, "exaone4", row)
    assert "get_weather\", \"arguments" not in tokenizer.decode(ids)  # what Axolotl trains instead


def test_segments_of_a_tool_conversation(tokenizer):
    """Qwen2.5 (Hermes-style tools): tool calls and their <tool_call> wrapper are output, tool results
    the tool segment, the row's tool schemas system content, the template's tool boilerplate template."""
    ex = our_encode(tokenizer, "qwen_25", OPENAI_ROWS["one_call"])
    weather_json = json.dumps(WEATHER)
    assert text_of(tokenizer, ex, {Segment.OUTPUT}) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is 21 degrees in Paris.<|im_end|>")
    assert text_of(tokenizer, ex, {Segment.TOOL}) == '{"temp": 21}'
    assert text_of(tokenizer, ex, {Segment.USER}) == "What is the weather in Paris?"
    assert text_of(tokenizer, ex, {Segment.SYSTEM}) == "You are a helpful assistant." + weather_json
    template = text_of(tokenizer, ex, {Segment.TEMPLATE})
    assert "You may call one or more functions" in template and "<tools>" in template
    assert "get_weather" not in template


def test_reasoning_is_its_own_output_segment(tokenizer):
    from instruction_modelling.core.options import IMArgs
    from instruction_modelling.core.losses import weight_table

    ex = our_encode(tokenizer, "qwen3", REASONING_ROWS["reasoning_then_call"])
    # Qwen3 keeps the reasoning of the turns after the last user message (both here).
    assert text_of(tokenizer, ex, {Segment.REASONING}) == "I need the weather first.Rain is expected, so yes."
    assert text_of(tokenizer, ex, {Segment.OUTPUT}).endswith("</think>\n\nYes, take one.<|im_end|>")
    # Its weight: the output weight unless im_role_weights sets `reasoning`.
    w = IMArgs(im_mode="it", im_role_weights={"reasoning": 0.25}).role_weight_map()
    table = weight_table(w["user"], w["assistant"], w)
    assert table[Segment.REASONING] == 0.25 and table[Segment.OUTPUT] == 1.0 and table[Segment.USER] == 0.0
    assert IMArgs().role_weight_map()["reasoning"] == 1.0


def test_llama_ipython_turn_keeps_its_role(tokenizer):
    ex = our_encode(tokenizer, "llama3_2_vision", LLAMA_ROWS["ipython"])
    text = tokenizer.decode(ex.input_ids)
    assert "<|start_header_id|>ipython<|end_header_id|>" in text
    assert text_of(tokenizer, ex, {Segment.TOOL}) == '{\\"temp\\": 3}'  # the template JSON-encodes results
    assert text_of(tokenizer, ex, {Segment.OUTPUT}) == (
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>3 degrees.<|eot_id|>')


# -- per-message training flags and train_on_eos, against Axolotl's labels ----------------------

FLAGGED = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Nine.", "train": False},
    {"role": "user", "content": "Wrong, again."},
    {"role": "assistant", "content": "Seven is prime, and so is eleven.",
     "detail": [{"begin_offset": 0, "end_offset": 14, "train": True}]},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome."}]}


@pytest.mark.parametrize("train_on_eos", ["turn", "last", "all", "none"])
@pytest.mark.parametrize("template_name", ["qwen_25", "llama3_2_vision"])
def test_training_flags_and_train_on_eos_match_axolotl(tokenizer, template_name, train_on_eos):
    options = dict(message_field_training="train", message_field_training_detail="detail", train_on_eos=train_on_eos)
    ids, labels = axolotl_encode(tokenizer, template_name, FLAGGED, **options)
    ex = our_encode(tokenizer, template_name, FLAGGED, **options)
    assert ex.input_ids == ids
    assert output_positions(ex) == label_positions(labels), (
        tokenizer.decode([ids[i] for i in output_positions(ex)]), tokenizer.decode([ids[i] for i in label_positions(labels)]))
    trained = text_of(tokenizer, ex, OUTPUT_SEGMENTS)
    assert "Nine." not in trained and "Seven is prime" in trained and "eleven" not in trained


def test_untrained_instruction_turn_carries_no_loss_under_im(tokenizer):
    row = {"messages": [{"role": "user", "content": "Ignore me.", "train": False},
                        {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "Learn me."},
                        {"role": "assistant", "content": "Done."}]}
    ex = our_encode(tokenizer, "qwen_25", row, message_field_training="train")
    assert text_of(tokenizer, ex, {Segment.USER}) == "Learn me."


def test_empty_assistant_turn_without_tool_calls_is_a_bad_row(tokenizer):
    row = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": ""}]}
    with pytest.raises(RowError, match=r"messages\[2\].content.*needs content or tool_calls"):
        our_encode(tokenizer, "qwen_25", row)


# -- property test: random tool conversations ------------------------------------------------

words = st.sampled_from(["the", "city", "rain", "Paris", "is", "warm", "42", "ok", "we", "go", "?", "!", "{", "}"])
text = st.lists(words, min_size=1, max_size=6).map(" ".join)


@st.composite
def tool_conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(st.one_of(st.just(""), text))})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(text)})
        for _ in range(draw(st.integers(0, 2))):  # tool rounds
            calls = [call(draw(st.sampled_from(["get_weather", "search"])), {"q": draw(text)})
                     for _ in range(draw(st.integers(1, 2)))]
            messages.append({"role": "assistant", "content": draw(st.one_of(st.just(""), text)), "tool_calls": calls})
            messages += [{"role": "tool", "content": draw(text)} for _ in calls]
        answer = {"role": "assistant", "content": draw(text)}
        if draw(st.booleans()):
            answer["reasoning_content"] = draw(text)
        messages.append(answer)
    return {"tools": draw(st.lists(st.sampled_from([WEATHER, SEARCH]), max_size=2, unique_by=lambda t: t["function"]["name"])),
            "messages": messages}


@pytest.mark.parametrize("template_name", ["qwen_25", "qwen3"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=tool_conversations())
def test_property_random_tool_conversations_match_axolotl(tokenizer, template_name, row):
    if not row["tools"]:
        row = {"messages": row["messages"]}
    ids, labels = axolotl_encode(tokenizer, template_name, row)
    ex = our_encode(tokenizer, template_name, row)
    assert ex.input_ids == ids
    assert output_positions(ex) == label_positions(labels)
    # Every tool result is instruction (tool) content and every assistant text is output.
    tool_text = text_of(tokenizer, ex, {Segment.TOOL})
    output_text = text_of(tokenizer, ex, OUTPUT_SEGMENTS)
    for m in row["messages"]:
        if m["role"] == "tool":
            assert m["content"] in tool_text
        if m["role"] == "assistant" and m["content"]:
            assert m["content"] in output_text
