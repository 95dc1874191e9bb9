"""Segmentation on real chat templates (the paper's tulu format, Axolotl's ChatML and Llama-3),
Alpaca and prompt/completion rows: what carries loss is exactly the contents (plus the
end-of-turn token of each output) under IM, and exactly the outputs under IT."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruction_modelling.core.segments import (
    ChatRenderer,
    INSTRUCTION_SEGMENTS,
    RowEncoder,
    RowError,
    RowFields,
    Segment,
    TemplateError,
    end_of_turn_ids,
)

from cli_helpers import axolotl_template

TEMPLATES = ("tulu", "chatml", "llama3")


# The templates' end-of-turn tokens, configured as a user configures Axolotl's `eot_tokens` (only EOS
# and these are trained, as in Axolotl).
END_TOKENS = ("<|im_end|>", "<|eot_id|>")


def encoder(tokenizer, template):
    return RowEncoder(tokenizer, ChatRenderer(tokenizer, template), end_tokens=END_TOKENS)


def runs(ex, trained):
    """Maximal runs of consecutive tokens whose segment is in ``trained``: [(segment, ids)]."""
    grouped, cur = [], None
    for tok, seg in zip(ex.input_ids, ex.segment_ids):
        if seg not in trained:
            cur = None
            continue
        if cur is None or cur[0] != seg:
            cur = (seg, [])
            grouped.append(cur)
        cur[1].append(tok)
    return grouped


def check_runs(tokenizer, ex, messages, trained_roles):
    """Each trained run is one message's content (stripped compare), outputs end with end-of-turn."""
    role_seg = {"system": Segment.SYSTEM, "user": Segment.USER, "assistant": Segment.OUTPUT, "tool": Segment.TOOL}
    expected = [m for m in messages if m["role"] in trained_roles]
    got = runs(ex, {role_seg[r] for r in trained_roles})
    assert len(got) == len(expected), (got, expected)
    end_ids = end_of_turn_ids(tokenizer, END_TOKENS)
    for (seg, ids), msg in zip(got, expected):
        assert seg == role_seg[msg["role"]]
        if seg == Segment.OUTPUT:
            assert ids[-1] in end_ids, f"output run does not end with an end-of-turn token: {tokenizer.decode(ids)!r}"
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        assert text.strip() == msg["content"].strip()
        if msg["content"] == msg["content"].strip():
            assert text == msg["content"]  # exact when no whitespace sits at the boundary


CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "Can brain cells move?"},
                    {"role": "assistant", "content": "Yes, some do."}],
    "system_multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Can brain cells move?"},
        {"role": "assistant", "content": "Yes, some do."},
        {"role": "user", "content": "Which ones?"},
        {"role": "assistant", "content": "Neural stem cells."},
    ],
    "template_like_content": [
        {"role": "user", "content": "Explain <|user|> and <|assistant|>\n tags and '### Response:'."},
        {"role": "assistant", "content": "They are <|im_start|>role tags<|im_end|>; also </s> and <s>."},
    ],
    "unicode_and_whitespace": [
        {"role": "system", "content": "  Réponds en français.\t"},
        {"role": "user", "content": "\n\n漢字 😀 naïve   café\n"},
        {"role": "assistant", "content": " Très bien — ✓\n\n"},
    ],
}


@pytest.mark.parametrize("template_name", TEMPLATES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("mode", ["im", "it"])
def test_trained_tokens_are_contents(tokenizer, templates, template_name, conversation, mode):
    messages = CONVERSATIONS[conversation]
    ex = encoder(tokenizer, templates[template_name]).encode({"messages": messages})
    trained_roles = ("system", "user", "assistant") if mode == "im" else ("assistant",)
    check_runs(tokenizer, ex, messages, trained_roles)
    # Template tokens carry no loss by default (Eq. 4): everything outside contents is segment 0.
    assert ex.labels().count(-100) == ex.segment_ids.count(Segment.TEMPLATE)


def test_end_of_turn_after_instructions_is_template(tokenizer, templates):
    """ChatML closes every turn with <|im_end|>: only the assistant's joins the output."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ex = encoder(tokenizer, templates["chatml"]).encode({"messages": CONVERSATIONS["system_multi_turn"]})
    segs = [s for t, s in zip(ex.input_ids, ex.segment_ids) if t == im_end]
    assert segs == [Segment.TEMPLATE, Segment.TEMPLATE, Segment.OUTPUT, Segment.TEMPLATE, Segment.OUTPUT]


def test_rendered_tokens_match_apply_chat_template(tokenizer, templates):
    """We tokenise exactly what the model sees at inference (apply_chat_template)."""
    for name in TEMPLATES:
        messages = CONVERSATIONS["system_multi_turn"]
        ex = encoder(tokenizer, templates[name]).encode({"messages": messages})
        ref = tokenizer.apply_chat_template(messages, chat_template=templates[name], tokenize=True,
                                            return_dict=False)
        assert ex.input_ids == list(ref), name


_pieces = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co")), min_size=1, max_size=12),
    st.sampled_from(["\n", "\t", " ", "  ", "<|user|>", "<|im_start|>", "<|eot_id|>", "### Input:", "é", "漢", "😀"]),
)
content = st.lists(_pieces, min_size=1, max_size=6).map("".join).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(content)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(content)})
        msgs.append({"role": "assistant", "content": draw(content)})
    return msgs


@pytest.mark.parametrize("template_name", TEMPLATES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_property_im_and_it(tokenizer, templates, template_name, messages):
    enc = encoder(tokenizer, templates[template_name])
    ex = enc.encode({"messages": messages})
    assert len(ex.input_ids) == len(ex.segment_ids)
    check_runs(tokenizer, ex, messages, ("system", "user", "assistant"))
    check_runs(tokenizer, ex, messages, ("assistant",))


def _axolotl_template_names():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("axolotl")
    if spec is None:
        return []
    return sorted(p.stem for p in (Path(spec.origin).parent / "utils/chat_templates/templates").glob("*.jinja"))


# These render the system prompt only before a final user turn (or not at all).
SYSTEM_DROPPED = {"gemma", "mistral_v2v3", "mistral_v3_tekken", "pixtral"}


@pytest.mark.parametrize("name", _axolotl_template_names())
def test_every_template_axolotl_ships(tokenizer, name):
    """Contents are found in every template Axolotl 0.19.0 ships (end-of-turn tokens that this tiny
    vocabulary lacks, such as <end_of_turn>, are checked by the three templates above)."""
    enc = encoder(tokenizer, axolotl_template(name))
    end_ids = end_of_turn_ids(tokenizer, END_TOKENS)
    for conversation in ("single_turn", "system_multi_turn"):
        messages = CONVERSATIONS[conversation]
        if conversation == "system_multi_turn" and name in SYSTEM_DROPPED:
            with pytest.raises(TemplateError, match="messages\\[0\\].content|rejected"):
                enc.encode({"messages": messages})
            continue
        ex = enc.encode({"messages": messages})
        got = [(seg, [t for t in ids if t not in end_ids]) for seg, ids in runs(ex, {1, 2, 3})]
        expected = [({"system": 1, "user": 2, "assistant": 3}[m["role"]], m["content"]) for m in messages]
        assert [(seg, tokenizer.decode(ids).strip()) for seg, ids in got] == expected, name


# -- Alpaca and prompt/completion -------------------------------------------------------------


def test_alpaca_with_and_without_input(tokenizer):
    enc = RowEncoder(tokenizer, None)
    ex = enc.encode({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    text = {seg: tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s == seg]) for seg in Segment}
    assert text[Segment.USER] == "Add the numbers.2 and 3"
    assert text[Segment.OUTPUT] == "5" + tokenizer.eos_token
    assert "### Instruction:" in text[Segment.TEMPLATE] and "### Input:" in text[Segment.TEMPLATE]
    # BOS follows the tokenizer's own behaviour, as Axolotl's alpaca type tokenises (this one adds none).
    assert tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ex.input_ids
    forced = RowEncoder(tokenizer, None, add_bos_to_plain=True).encode({"instruction": "Add.", "output": "5"})
    assert forced.input_ids[0] == tokenizer.bos_token_id and forced.segment_ids[0] == Segment.TEMPLATE

    ex = enc.encode({"instruction": "Say hi.", "input": "", "output": "hi"})
    template = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s == Segment.TEMPLATE])
    assert "### Input:" not in template


def test_alpaca_system_field_is_instruction(tokenizer):
    ex = RowEncoder(tokenizer, None).encode({"system": "Be exact.", "instruction": "Add.", "output": "5"})
    system = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s == Segment.SYSTEM])
    assert system == "Be exact."


def test_prompt_completion(tokenizer):
    ex = RowEncoder(tokenizer, None).encode({"prompt": "Q: what is 2+2?", "completion": "4"})
    out = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s == Segment.OUTPUT])
    instr = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s in INSTRUCTION_SEGMENTS])
    # The joining space is glued to the completion's first token, as the tokenizer merges it.
    assert out == " 4" + tokenizer.eos_token
    assert instr == "Q: what is 2+2?"


def test_whitespace_glue_but_not_template_text(tokenizer):
    """A token merging template *text* with content is masked and counted; whitespace glue is not."""
    from instruction_modelling.core.segments import Piece, encode_pieces

    end_ids = end_of_turn_ids(tokenizer)
    # A word that is one token, split so that template text and content merge into it.
    word = next(w for w in ("boxes", "river", "apple", "candle", "garden")
                if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1)
    ex = encode_pieces([Piece("Q: " + word[:2], Segment.TEMPLATE), Piece(word[2:] + " here", Segment.USER),
                        Piece(" A:", Segment.TEMPLATE), Piece(" yes", Segment.OUTPUT)], tokenizer, end_ids)
    assert ex.straddled == 1
    trained = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s != Segment.TEMPLATE])
    assert trained == " here yes"  # the merged word is masked; " yes" is glued to its space


# -- errors ----------------------------------------------------------------------------------

BAD_ROWS = [
    ({"messages": None}, "messages", "missing"),
    ({"text": "hi"}, "messages", "missing"),
    ({"messages": "hello"}, "messages", "must be a list"),
    ({"messages": []}, "messages", "is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "messages[1].content", "is empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "missing"),
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[0].role", "missing"),
    ({"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[0].role", "unknown role 'narrator'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}]}, "messages[2].role", "must end with an assistant turn"),
    ({"instruction": "Do it.", "output": ""}, "output", "is empty"),
    ({"instruction": ["Do it."], "output": "ok"}, "instruction", "must be a string"),
    ({"prompt": "Q?"}, "completion", "missing"),
]


@pytest.mark.parametrize("row,field,message", BAD_ROWS)
def test_bad_rows_name_the_field(tokenizer, templates, row, field, message):
    with pytest.raises(RowError) as info:
        encoder(tokenizer, templates["chatml"]).encode(row)
    assert info.value.field == field
    assert message in str(info.value)


def test_custom_field_names_and_role_aliases(tokenizer, templates):
    fields = RowFields(messages="conversations", role="from", content="value",
                       role_aliases={"human": "user", "gpt": "assistant"})
    enc = RowEncoder(tokenizer, ChatRenderer(tokenizer, templates["chatml"]), fields=fields)
    ex = enc.encode({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]})
    assert tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment_ids) if s == Segment.USER]) == "Hi?"


def test_template_that_drops_content_is_an_error(tokenizer):
    dropping = "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    with pytest.raises(TemplateError, match="does not render"):
        encoder(tokenizer, dropping).encode({"messages": CONVERSATIONS["system_multi_turn"]})


def test_template_exception_is_a_row_error(tokenizer):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system allowed') }}{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="no system allowed"):
        encoder(tokenizer, strict).encode({"messages": CONVERSATIONS["system_multi_turn"]})


def test_slow_tokenizer_is_refused(tokenizer):
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        RowEncoder(Slow(), None)


def test_template_that_moves_the_system_prompt(tokenizer):
    """Contents may appear out of message order (here the system prompt after the first user turn)."""
    moved = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}"
             "{% if loop.index0 == 1 %}\nS: {{ messages[0]['content'] }}{% endif %}\n"
             "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}</s>\n{% endif %}{% endfor %}")
    ex = encoder(tokenizer, moved).encode({"messages": CONVERSATIONS["system_multi_turn"]})
    got = [(int(seg), tokenizer.decode(ids).strip()) for seg, ids in runs(ex, {1, 2, 3})]  # " Which": glue
    assert got == [(2, "Can brain cells move?"), (1, "Be brief."), (3, "Yes, some do.</s>"),
                   (2, "Which ones?"), (3, "Neural stem cells.</s>")]


def test_dropped_system_prompt_error_suggests_drop_system_message(tokenizer):
    with pytest.raises(TemplateError, match="drop_system_message: true"):
        encoder(tokenizer, axolotl_template("mistral_v2v3")).encode({"messages": CONVERSATIONS["system_multi_turn"]})


def test_batched_encoding_equals_row_by_row(tokenizer, templates):
    enc = encoder(tokenizer, templates["tulu"])
    rows = [{"messages": m} for m in CONVERSATIONS.values()] + [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"prompt": "Q?", "completion": "A"},
        {"messages": []}]
    batched = enc.encode_rows(rows)
    for row, got in zip(rows[:-1], batched[:-1]):
        ex = enc.encode(row)
        assert (got.input_ids, got.segment_ids) == (ex.input_ids, ex.segment_ids)
    assert isinstance(batched[-1], RowError) and batched[-1].field == "messages"
