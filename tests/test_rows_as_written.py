"""Training rows reach the tokenizer exactly as written, and every unreadable row is named or skipped.

Through the real Axolotl CLI: ``datasets``' JSON loader re-types a whole column when one row differs
(``"42"`` -> 42, ``"\\"Yes\\""`` -> ``Yes``); the plugin reads local files row by row instead.
"""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_axolotl, write_jsonl
from instruction_modelling.core.read import InputError, read_local
from instruction_modelling.axolotl.configs import cpu_config

pytest.importorskip("axolotl")

ANSWERS = ["42", '"Yes"', '{"answer": 3}', "null"]  # JSON-looking strings that must stay strings


def _chat(answer):
    return {"messages": [{"role": "user", "content": "Answer, please."}, {"role": "assistant", "content": answer}]}


def _decoded_outputs(run, tokenizer):
    ds = run.prepared_dataset()
    return [tokenizer.decode([t for t, s in zip(r["input_ids"], r["segment_ids"]) if s == 3]) for r in ds]


def test_one_int_content_does_not_retype_the_others(tmp_path, tiny_model_dir, tokenizer):
    rows = [_chat(a) for a in ANSWERS] + [_chat(7)]  # the last row's content is an int: a bad row
    data = write_jsonl(tmp_path / "typed.jsonl", rows)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", im_on_bad_rows="skip", shuffle_merged_datasets=False)
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    assert "5 rows, 4 kept, 1 skipped" in run.output
    assert "typed.jsonl row 4 (line 5): field 'messages[1].content': must be a string, got int" in run.output
    outputs = _decoded_outputs(run, tokenizer)
    assert len(outputs) == len(ANSWERS)
    for answer, decoded in zip(ANSWERS, outputs):
        assert decoded.startswith(answer) and decoded[len(answer):] in ("", "</s>"), (answer, decoded)


def test_mixed_formats_in_one_file(tmp_path, tiny_model_dir):
    rows = [{"instruction": "Add 2 and 2.", "input": "", "output": "4"},
            {"prompt": "Capital of France?", "completion": "Paris"},
            _chat("Hello there.")]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    run = run_axolotl("preprocess", cpu_config(tiny_model_dir, data, tmp_path / "out"), tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    assert len(run.prepared_dataset()) == 3


BROKEN_LINES = {
    "invalid_utf8": (b'{"prompt": "caf\xe9", "completion": "ok"}', "not UTF-8 text"),
    "bare_string": (b'"just a string"', "must be a JSON object, got str"),
    "bare_number": (b"3", "must be a JSON object, got int"),
    "not_json": (b'{"prompt": "a", ', "not valid JSON"),
    "huge": (json.dumps({"prompt": "x" * 3000, "completion": "y"}).encode(), "longer than 2048 bytes"),
}


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_broken_rows_are_named_or_counted(tmp_path, tiny_model_dir, on_bad_rows):
    good = json.dumps(_chat("Fine.")).encode()
    lines = [good] + [line for line, _ in BROKEN_LINES.values()] + [good]
    data = tmp_path / "broken.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", im_on_bad_rows=on_bad_rows, im_max_row_bytes=2048)
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    if on_bad_rows == "error":
        assert run.returncode != 0
        assert "broken.jsonl row 1 (line 2): field '<row>': not UTF-8 text" in run.output
        assert f"({len(BROKEN_LINES) - 1} more bad rows" in run.output
        return
    assert run.returncode == 0, run.output[-3000:]
    assert f"{len(lines)} rows, 2 kept, {len(BROKEN_LINES)} skipped" in run.output
    for i, (_, message) in enumerate(BROKEN_LINES.values(), start=1):
        assert f"broken.jsonl row {i} (line {i + 1}): field '<row>': {message}" in run.output
    assert len(run.prepared_dataset()) == 2


def test_empty_file_is_a_named_error(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_bytes(b"\n\n")
    run = run_axolotl("preprocess", cpu_config(tiny_model_dir, data, tmp_path / "out"), tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "empty.jsonl: no rows (the file is empty or blank)" in run.output


def test_reader_bounds_a_50_mb_row(tmp_path):
    """The reader drops an over-long line while reading it in bounded pieces (no 50 MB string)."""
    import tracemalloc

    data = tmp_path / "big.jsonl"
    with open(data, "wb") as f:
        f.write(b'{"prompt": "' + b"x" * 50_000_000 + b'", "completion": "y"}\n')
    tracemalloc.start()
    with pytest.raises(InputError, match=r"big.jsonl row 0 \(line 1\): longer than 1048576 bytes"):
        read_local(data, max_row_bytes=2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak
