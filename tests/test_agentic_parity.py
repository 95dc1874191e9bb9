"""IT trained positions against Axolotl's ``chat_template`` labels on realistic agentic rows
(``agentic_corpus``), on every tool/reasoning template Axolotl ships, with a tokenizer that merges
punctuation with newlines: issue 22's kinds A, B, D, E, G match Axolotl; kind C is a deliberate
difference (README, "Differences from Axolotl's chat_template labels"), pinned below."""

from __future__ import annotations

import copy
import logging

import pytest

from agentic_corpus import ROWS, TOOL_TEMPLATES, detail, merging_tokenizer, rows_for
from cli_helpers import axolotl_template
from instruction_modelling.axolotl.strategy import row_fields_from_dataset_config, train_on_eos_of
from instruction_modelling.core.segments import (
    OUTPUT_SEGMENTS,
    ChatRenderer,
    RowEncoder,
    RowError,
    Segment,
    unconfigured_end_markers,
)

pytest.importorskip("axolotl")

FLAGS = dict(message_field_training="training", message_field_training_detail="train_detail")
# Kind C (flags on system/user/tool turns) is a deliberate difference, tested on its own below.
PARITY_ROWS = [name for name in ROWS if name != "instruction_flags"]


@pytest.fixture(scope="module")
def tok():
    return merging_tokenizer()


def axolotl_labels(tok, template, row, eot_tokens, **ds_options):
    from axolotl.prompt_strategies.chat_template import StrategyLoader
    from axolotl.utils.dict import DictDefault

    jinja = axolotl_template(template)
    cfg = DictDefault({"sequence_len": 8192, "train_on_inputs": False, "chat_template": "jinja",
                       "chat_template_jinja": jinja, "eot_tokens": eot_tokens})
    ds = {"type": "chat_template", "chat_template": "jinja", "chat_template_jinja": jinja, **ds_options}
    out = StrategyLoader()(tok, cfg, ds).tokenize_prompt(copy.deepcopy(row))
    return out["input_ids"], out["labels"]


def ours(tok, template, row, eot_tokens, **ds_options):
    enc = RowEncoder(tok, ChatRenderer(tok, axolotl_template(template)), fields=row_fields_from_dataset_config(ds_options),
                     end_tokens=tuple(eot_tokens or ()), train_on_eos=train_on_eos_of(ds_options))
    return enc.encode(copy.deepcopy(row))


def trained(ex):
    return [i for i, s in enumerate(ex.segment_ids) if s in OUTPUT_SEGMENTS]


def labelled(labels):
    return [i for i, label in enumerate(labels) if label != -100]


def compare(tok, template, row, eot_tokens, **options):
    """None when one side refuses the row, else (ours, Axolotl's) trained positions as token texts."""
    try:
        ids, labels = axolotl_labels(tok, template, row, eot_tokens, **options)
    except Exception:  # the template or Axolotl's turn finder rejects the row
        return None
    try:
        ex = ours(tok, template, row, eot_tokens, **options)
    except RowError:
        return None
    assert ex.input_ids == ids or template == "exaone4"  # exaone4: we render the calls Axolotl drops (README)
    if ex.input_ids != ids:
        return None
    return [(i, tok.decode([ids[i]])) for i in trained(ex)], [(i, tok.decode([ids[i]])) for i in labelled(labels)]


@pytest.mark.parametrize("template", list(TOOL_TEMPLATES))
def test_it_trains_what_axolotl_labels_on_every_row_both_accept(tok, template):
    logging.getLogger("axolotl").setLevel(logging.ERROR)
    eot = TOOL_TEMPLATES[template]
    configs = [(eos, [eot] if eot else None) for eos in ("turn", "all", "last", "none")] + [("turn", None)]
    compared, differ = 0, []
    for name in PARITY_ROWS:
        row = rows_for(template)[name]
        for train_on_eos, eot_tokens in configs:
            result = compare(tok, template, row, eot_tokens, train_on_eos=train_on_eos, **FLAGS)
            if result is None:
                continue
            compared += 1
            if result[0] != result[1]:
                differ.append((name, train_on_eos, eot_tokens, sorted(set(result[0]) ^ set(result[1]))))
    assert compared >= 5, f"{template}: only {compared} rows both accept"
    assert not differ, differ


# -- each kind on its own (these fail on 79ea07c) --------------------------------------------


def marked(tok, ex, segments=OUTPUT_SEGMENTS):
    return [(tok.decode([t]), Segment(s).name) for t, s in zip(ex.input_ids, ex.segment_ids) if s in segments]


def test_a_reasoning_last_token_merged_with_the_template_is_output_side(tok):
    row = ROWS["reasoning_plain"]
    for template in ("qwen3", "qwen3_5"):
        ex = ours(tok, template, row, ["<|im_end|>"])
        reasoning = [t for t, _ in marked(tok, ex, {Segment.REASONING})]
        # Qwen3 keeps the reasoning after the last user turn only; its "." merges with "\n</think>"'s "\n".
        assert reasoning[-1] == ".\n" and "".join(reasoning) == "21 is 3 times 7.\n", reasoning
        assert ex.straddled == 0
        assert compare(tok, template, row, ["<|im_end|>"])[0] == compare(tok, template, row, ["<|im_end|>"])[1]


def test_b_train_detail_widens_to_tokens_it_partly_covers_as_axolotl(tok):
    """'It is 18 degrees ' (0-16), not 'in ' (17-19), 'Rome.' (20-24): ' Rome' is trained (the span
    starts inside it), ' in' is not (the first span ends on its first character)."""
    row = ROWS["flags"]
    ex = ours(tok, "qwen_25", row, ["<|im_end|>"], **FLAGS)
    text = "".join(t for t, _ in marked(tok, ex))
    assert "It is 18 degrees Rome.<|im_end|>" in text
    got, want = compare(tok, "qwen_25", row, ["<|im_end|>"], **FLAGS)
    assert got == want
    # A span ending inside the content's last token (" Zürich", "e Zü" marked) widens over it too.
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "me Zürich", "train_detail": detail((1, 4, True))}]}
    got, want = compare(tok, "qwen_25", row, ["<|im_end|>"], **FLAGS)
    assert [t for _, t in got] == [" Zürich", "<|im_end|>"] and got == want


def test_d_end_token_after_a_tool_result_under_train_on_eos_all(tok):
    row = ROWS["one_call"]
    ex = ours(tok, "qwen_25", row, ["<|im_end|>"], train_on_eos="all")
    tokens = [(tok.decode([t]), s) for t, s in zip(ex.input_ids, ex.segment_ids)]
    after_result = [s for k, (t, s) in enumerate(tokens) if t == "<|im_end|>" and "</tool_response>" in
                    "".join(x for x, _ in tokens[k - 3:k])]
    assert after_result == [Segment.OUTPUT]
    got, want = compare(tok, "qwen_25", row, ["<|im_end|>"], train_on_eos="all")
    assert got == want


def test_e_train_on_eos_last_trains_the_end_of_the_last_trained_turn(tok):
    row = ROWS["last_untrained"]
    ex = ours(tok, "qwen_25", row, ["<|im_end|>"], train_on_eos="last", **FLAGS)
    assert "".join(t for t, _ in marked(tok, ex)) == "Hi.<|im_end|>"
    got, want = compare(tok, "qwen_25", row, ["<|im_end|>"], train_on_eos="last", **FLAGS)
    assert got == want


def test_g_only_eos_and_eot_tokens_are_end_tokens(tok):
    """A base model's tokenizer (EOS </s>) with ChatML and no eot_tokens: <|im_end|> is not trained, as
    in Axolotl; listing it in eot_tokens trains it. The plugin warns about the unconfigured marker."""
    row = ROWS["one_call"]
    plain = "".join(t for t, _ in marked(tok, ours(tok, "qwen_25", row, None)))
    assert "<|im_end|>" not in plain
    got, want = compare(tok, "qwen_25", row, None)
    assert got == want
    configured = "".join(t for t, _ in marked(tok, ours(tok, "qwen_25", row, ["<|im_end|>"])))
    assert configured.endswith("Paris.<|im_end|>")
    assert unconfigured_end_markers(axolotl_template("qwen_25"), tok) == ["<|im_end|>"]
    assert unconfigured_end_markers(axolotl_template("qwen_25"), tok, ["<|im_end|>"]) == []


def test_c_flags_on_instruction_turns_follow_the_segment_weights(tok):
    """Deliberate difference: `training: true` or `train_detail` on a system/user/tool turn selects
    which of its tokens may carry loss; the weight is the role's (0 under `it`). Axolotl trains them
    (and their end token) whatever `roles_to_train` says."""
    row = ROWS["instruction_flags"]
    ex = ours(tok, "qwen_25", row, ["<|im_end|>"], **FLAGS)
    assert "".join(t for t, _ in marked(tok, ex)) == "You are doing great.<|im_end|>"  # what IT trains
    assert "".join(t for t, _ in marked(tok, ex, {Segment.SYSTEM})) == "Be kind."  # IM: instruction weight
    assert "".join(t for t, _ in marked(tok, ex, {Segment.USER})) == "Please say"  # widened like an output span
    ids, labels = axolotl_labels(tok, "qwen_25", row, ["<|im_end|>"], **FLAGS)
    axolotl = tok.decode([ids[i] for i in labelled(labels)])
    assert axolotl.startswith("Be kind.<|im_end|>Please say<|im_end|>")


def test_train_detail_is_placed_on_the_content_where_axolotl_is_one_token_early(tok):
    """Deliberate difference: Llama 4 writes <|python_start|> before a tool-calling turn's content;
    Axolotl counts the content's token positions from the turn's start and trains "<|python_start|>Let
    me" for the span "Let me check "; we train the marked characters."""
    from agentic_corpus import WEATHER, call, detail

    row = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "Let me check the weather.", "tool_calls": [call("get_weather", {"city": "Rome"})],
         "train_detail": detail((0, 12, True))},
        {"role": "tool", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "It is 18 degrees."}]}
    ex = ours(tok, "llama4", row, ["<|eot|>"], **FLAGS)
    assert "".join(t for t, _ in marked(tok, ex)) == "Let me check<|eot|>It is 18 degrees.<|eot|>"
    ids, labels = axolotl_labels(tok, "llama4", row, ["<|eot|>"], **FLAGS)
    assert ids == ex.input_ids
    assert tok.decode([ids[i] for i in labelled(labels)]) == "<|python_start|>Let me<|eot|>It is 18 degrees.<|eot|>"


def test_preview_shows_the_reasoning_end_and_end_tokens_as_trained(tmp_path, tiny_model_dir, tok):
    """`im preview --plain` on a Qwen3 reasoning row under IT: the reasoning's last token (".\\n" merged
    with the template's "\\n</think>") and <|im_end|> carry loss; without eot_tokens it says why
    <|im_end|> does not."""
    import os
    import subprocess
    import sys

    from cli_helpers import write_jsonl
    from instruction_modelling.axolotl.configs import cpu_config, write_config

    tok.save_pretrained(str(tmp_path / "tok"))
    data = write_jsonl(tmp_path / "rows.jsonl", [ROWS["reasoning_plain"]])
    outputs = {}
    for name, eot in (("eot", ["<|im_end|>"]), ("no_eot", None)):
        cfg = cpu_config(tiny_model_dir, data, tmp_path / name, mode="it", tokenizer_config=str(tmp_path / "tok"),
                         chat_template="jinja", chat_template_jinja=axolotl_template("qwen3"),
                         **({"eot_tokens": eot} if eot else {}))
        path = write_config(cfg, tmp_path / f"{name}.yml")
        proc = subprocess.run([sys.executable, "-m", "instruction_modelling.preview", str(path), "--plain", "--rows", "1"],
                              capture_output=True, text=True, env={**os.environ}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[name] = proc.stdout + proc.stderr
    line = next(l for l in outputs["eot"].splitlines() if "<think>" in l)
    assert "[7]R[.\\n]R[</think>]O" in line and line.endswith("[<|im_end|>]O·\\n·")
    assert "ends turns with <|im_end|>" in outputs["no_eot"] and "set eot_tokens" in outputs["no_eot"]
    line = next(l for l in outputs["no_eot"].splitlines() if "<think>" in l)
    assert "[<|im_end|>]" not in line and "[.\\n]R" in line


def random_agent_row(rng, template):
    """A random agent trace: system or not, 1-2 rounds of user, 0-2 tool-calling turns (parallel calls,
    null/empty content, dict or string arguments, reasoning, `training: false`), tool results, and an
    answer with reasoning, `train_detail` or `training: false` at random."""
    from agentic_corpus import SEARCH, WEATHER, call

    words = ["Paris", "is", "warm", "today.", "It", "rains.\n", "Zürich", "東京", "ok", "18", "degrees", "?", "done.",
             "<b>", "x=1;", "\n\n", "Let", "me", "check."]

    def text(n=None):
        return " ".join(rng.choice(words) for _ in range(n or rng.randint(1, 7)))

    messages = [{"role": "system", "content": text()}] if rng.random() < .5 else []
    for _ in range(rng.randint(1, 2)):
        messages.append({"role": "user", "content": text()})
        for _ in range(rng.randint(0, 2)):
            n = 1 if template.startswith("llama") else rng.randint(1, 2)
            calls = [call(rng.choice(["get_weather", "search"]), {"city": text(1)}, as_string=rng.random() < .5)
                     for _ in range(n)]
            turn = {"role": "assistant", "content": rng.choice([None, "", text()]), "tool_calls": calls}
            if rng.random() < .4:
                turn["reasoning_content"] = text()
            if rng.random() < .2:
                turn["training"] = False
            messages.append(turn)
            messages += [{"role": "tool", "name": "get_weather",
                          "content": rng.choice([text(), "{\"t\": 3}", "<tool_response>x</tool_response>"])} for _ in calls]
        answer = {"role": "assistant", "content": text()}
        if rng.random() < .5:
            answer["reasoning_content"] = text()
        if rng.random() < .3:
            b = rng.randint(0, len(answer["content"]) - 1)
            answer["train_detail"] = detail((b, rng.randint(b, len(answer["content"]) - 1), True))
        elif rng.random() < .2:
            answer["training"] = False
        messages.append(answer)
    if template.startswith("mistral"):  # 9-character ids, results answer them in order
        ids = []
        for m in messages:
            for c in m.get("tool_calls") or []:
                c["id"] = f"call{len(ids):05d}"
                ids.append(c["id"])
            if m["role"] == "tool" and ids:
                m["tool_call_id"] = ids.pop(0)
    return {"tools": [WEATHER, SEARCH], "messages": messages}


@pytest.mark.slow
@pytest.mark.parametrize("template", [t for t in TOOL_TEMPLATES if not t.startswith("command_a")])  # kind F: other half
def test_random_agent_rows_match_axolotl(tok, template):
    """The full-size check: 15 random agent rows per template × train_on_eos turn/all/last."""
    import random

    logging.getLogger("axolotl").setLevel(logging.ERROR)
    rng = random.Random(0)
    eot = TOOL_TEMPLATES[template]
    differ = []
    for _ in range(15):
        row = random_agent_row(rng, template)
        if template == "jamba" and any("train_detail" in m for m in row["messages"]):
            continue  # Axolotl places Jamba's train_detail one token early (README: differences)
        for train_on_eos in ("turn", "all", "last"):
            result = compare(tok, template, row, [eot] if eot else None, train_on_eos=train_on_eos, **FLAGS)
            if result is not None and result[0] != result[1]:
                differ.append((row, train_on_eos, sorted(set(result[0]) ^ set(result[1]))))
    assert not differ, differ[:2]
