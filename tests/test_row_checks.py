"""Rows and options that would train the wrong thing without a word are refused in one line.

Each case here was trained silently before: a misspelt ``im_*`` option was ignored, a
``training_detail`` span with ``"train": "false"`` or an offset past the content was trained (or
trained nothing but the end token), overlapping spans depended on their order, and a tool call
without a function name was trained as ``{"name": ""...}``.
"""

from __future__ import annotations

import pytest

from cli_helpers import run_axolotl
from instruction_modelling.axolotl.configs import cpu_config
from instruction_modelling.core.options import IMArgs, check_axolotl_options
from instruction_modelling.core.segments import OUTPUT_SEGMENTS, RowError
from test_agentic import call, our_encode, text_of
from test_axolotl_cli import small_train_file

DETAIL = dict(message_field_training_detail="detail")
ANSWER = "It is 18 degrees in Rome."


def _detailed(*spans):
    return {"messages": [{"role": "user", "content": "Weather in Rome?"},
                         {"role": "assistant", "content": ANSWER, "detail": list(spans)}]}


def _span(begin, end, train):
    return {"begin_offset": begin, "end_offset": end, "train": train}


# -- misspelt options ------------------------------------------------------------------------

@pytest.mark.parametrize("key,hint", [("im_mdoe", "did you mean im_mode?"),
                                      ("im_instruction_weigth", "did you mean im_instruction_weight?"),
                                      ("im_kl_coeff", "did you mean im_kl_coef?")])
def test_a_misspelt_option_is_an_error_naming_the_closest(key, hint):
    for check in (IMArgs.from_cfg, check_axolotl_options):
        with pytest.raises(ValueError, match=f"unknown instruction_modelling option '{key}': {hint}"):
            check({key: "it", "learning_rate": 1e-5})


def test_a_misspelt_option_stops_the_cli_before_preprocessing(tmp_path, tiny_model_dir):
    cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / "out")
    cfg.pop("im_mode", None)
    cfg["im_mdoe"] = "it"
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "unknown instruction_modelling option 'im_mdoe': did you mean im_mode?" in run.output
    assert "segmenting" not in run.output


# -- training_detail ---------------------------------------------------------------------------

@pytest.mark.parametrize("span,field,message", [
    (_span(0, 5, "false"), "detail[0].train", "must be true or false, got 'false'"),
    (_span(0, 5, "no"), "detail[0].train", "must be true or false, got 'no'"),
    (_span(0, 5, 1), "detail[0].train", "must be true or false, got 1"),
    ({"begin_offset": 0, "end_offset": 5}, "detail[0].train", "must be true or false, missing"),
    (_span(True, 5, True), "detail[0].begin_offset", "must be an integer character offset, got True"),
    (_span(0, 5.0, True), "detail[0].end_offset", "must be an integer character offset, got 5.0"),
    (_span(3, 400, True), "detail[0]", "offsets 3..400 (end inclusive) are not inside the content (characters 0..24)"),
    (_span(9, 2, True), "detail[0]", "offsets 9..2 (end inclusive) are not inside the content"),
    (_span(-1, 2, True), "detail[0]", "offsets -1..2 (end inclusive) are not inside the content"),
    ("0-5", "detail", "must be a list of {begin_offset, end_offset, train}, got str"),
])
def test_a_bad_training_detail_span_is_a_bad_row(tokenizer, span, field, message):
    row = _detailed(span) if not isinstance(span, str) else {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER, "detail": span}]}
    with pytest.raises(RowError) as err:
        our_encode(tokenizer, "qwen_25", row, **DETAIL)
    assert err.value.field == f"messages[1].{field}"
    assert message in str(err.value)


def test_overlapping_spans_do_not_depend_on_their_order(tokenizer):
    """Documented rule: a character any span marks train: false is not trained."""
    whole, hole = _span(0, len(ANSWER) - 1, True), _span(6, 15, False)  # "18 degrees" untrained
    first = our_encode(tokenizer, "qwen_25", _detailed(whole, hole), **DETAIL)
    second = our_encode(tokenizer, "qwen_25", _detailed(hole, whole), **DETAIL)
    assert first.segment_ids == second.segment_ids
    trained = text_of(tokenizer, second, OUTPUT_SEGMENTS)
    assert "degrees" not in trained and "Rome" in trained


# -- tool calls --------------------------------------------------------------------------------

def _with_calls(calls):
    return {"messages": [{"role": "user", "content": "Weather in Rome?"},
                         {"role": "assistant", "content": "", "tool_calls": calls},
                         {"role": "tool", "content": "{\"temp\": 18}"},
                         {"role": "assistant", "content": "18 degrees."}]}


@pytest.mark.parametrize("calls,field,message", [
    ([{"type": "function", "function": {"arguments": "{}"}}], "tool_calls[0].function.name", "missing"),
    ([{"type": "function", "function": {"name": "", "arguments": "{}"}}], "tool_calls[0].function.name", "got ''"),
    ([{"type": "function", "function": {"name": 42, "arguments": "{}"}}], "tool_calls[0].function.name", "got 42"),
    ([call("get_weather", {"city": "Rome"}), {"function": {"name": None}}], "tool_calls[1].function.name", "missing"),
    ([{"arguments": {"city": "Rome"}}], "tool_calls[0].name", "missing"),
    (["get_weather(Rome)"], "tool_calls[0]", "must be an object, got str"),
    ({"function": {"name": "get_weather"}}, "tool_calls", "must be a list of tool calls, got dict"),
])
def test_a_tool_call_without_a_function_name_is_a_bad_row(tokenizer, calls, field, message):
    with pytest.raises(RowError) as err:
        our_encode(tokenizer, "qwen_25", _with_calls(calls))
    assert err.value.field == f"messages[1].{field}"
    assert message in str(err.value)


def test_a_named_call_in_either_shape_is_accepted(tokenizer):
    for calls in ([call("get_weather", {"city": "Rome"})], [{"name": "get_weather", "arguments": {"city": "Rome"}}]):
        ex = our_encode(tokenizer, "qwen_25", _with_calls(calls))
        assert "get_weather" in text_of(tokenizer, ex, OUTPUT_SEGMENTS)


# -- text the tokenizer cannot take, JSON too deep to read ---------------------------------------

def test_a_lone_surrogate_is_a_bad_row_and_the_batch_still_encodes(tokenizer):
    """Used to fail the whole batch with the tokenizer's TypeError."""
    import json

    from instruction_modelling.core.segments import ChatRenderer, RowEncoder
    from cli_helpers import axolotl_template

    enc = RowEncoder(tokenizer, ChatRenderer(tokenizer, axolotl_template("qwen_25")))
    broken = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": json.loads('"caf\\ud800e"')}]}
    results = enc.encode_rows([_with_calls([call("get_weather", {"city": "Rome"})]), broken, _detailed()])
    assert isinstance(results[1], RowError) and results[1].field == "messages[1].content"
    assert "lone surrogate" in str(results[1])
    assert [r.input_ids for r in (results[0], results[2])] == [enc.encode(r).input_ids for r in
                                                              (_with_calls([call("get_weather", {"city": "Rome"})]),
                                                               _detailed())]


def test_tool_call_arguments_nested_too_deeply_are_a_bad_row(tokenizer):
    deep = "[" * 100_000 + "]" * 100_000
    row = _with_calls([{"type": "function", "function": {"name": "get_weather", "arguments": deep}}])
    with pytest.raises(RowError) as err:
        our_encode(tokenizer, "qwen_25", row)
    assert err.value.field == "messages[1].tool_calls[0].function.arguments"
    assert "nested too deeply" in str(err.value)


# -- memory per row ------------------------------------------------------------------------------

def test_the_default_row_cap_follows_sequence_len():
    from instruction_modelling.core.read import max_row_bytes_for

    assert max_row_bytes_for(2048) == 2**20 and max_row_bytes_for(32768) == 2**20
    assert max_row_bytes_for(131072) == 4 * 2**20 and max_row_bytes_for(None) == 2**20


def test_long_rows_reach_the_tokenizer_in_bounded_calls_and_keep_sequence_len_tokens(tokenizer):
    """Before: one tokenizer call for a whole batch (three 7.5 MB rows: 4.2 GB), and every token of an
    over-long row kept until Axolotl's filter dropped it."""
    from instruction_modelling.axolotl.strategy import InstructionModellingStrategy
    from instruction_modelling.core import segments
    from instruction_modelling.core.segments import ChatRenderer, RowEncoder
    from cli_helpers import axolotl_template

    calls = []

    class Recording:  # the real tokenizer, with the characters of each call recorded
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, texts, **kwargs):
            calls.append(sum(map(len, texts)))
            return self.inner(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    encoder = RowEncoder(tokenizer, ChatRenderer(tokenizer, axolotl_template("chatml")))
    rows = [{"messages": [{"role": "user", "content": "Say it."},
                          {"role": "assistant", "content": "the city is warm " * n}]} for n in (40_000, 40_000, 2)]
    expected = [encoder.encode(r).input_ids for r in rows]
    encoder.tokenizer = Recording(tokenizer)
    limit = segments.TOKENIZER_CALL_CHARS
    segments.TOKENIZER_CALL_CHARS = 700_000  # two long rows (680k characters each) cannot share a call
    try:
        assert [e.input_ids for e in encoder.encode_rows(rows)] == expected
    finally:
        segments.TOKENIZER_CALL_CHARS = limit
    assert len(calls) == 2 and max(calls) < 700_000, calls  # the short row joins the second call

    strategy = InstructionModellingStrategy(encoder, path="long.jsonl", sequence_len=64, truncate=False,
                                            on_bad_rows="error", trained_roles=["assistant"])
    encoder.tokenizer = tokenizer
    out = strategy.encode_batch({"messages": [r["messages"] for r in rows]})
    assert [len(ids) for ids in out["input_ids"]] == [65, 65, len(expected[2])]  # still over 64: Axolotl drops them
    assert out["input_ids"][0] == expected[0][:65]
