"""Training rows reach the tokenizer exactly as written, and every unreadable row is named or skipped.

Through the real Axolotl CLI: ``datasets``' JSON loader re-types a whole column when one row differs
(``"42"`` -> 42, ``"\\"Yes\\""`` -> ``Yes``); the plugin reads local files row by row instead.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _fake_hub_dataset(cache: Path, repo: str, files: dict[str, list]) -> None:
    """A hub dataset as huggingface_hub caches it (refs/main -> snapshots/<sha>/...), read offline."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    for name, rows in files.items():
        write_jsonl(root / "snapshots" / sha / name, rows)


def test_folders_data_files_and_hub_files_are_read_as_written(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """Every source datasets' JSON loader would read: a local folder, data_files beside a local folder,
    and data_files of a hub dataset. In each, one file holds an int content, which used to re-type the
    JSON-looking strings of the others ("42" -> 42, '"Yes"' -> Yes) and name a valid row as the bad one.
    A parquet file (typed by its writer, so reading cannot re-type it) keeps its strings too."""
    from datasets import Dataset

    folder = tmp_path / "folder"
    write_jsonl(folder / "a.jsonl", [_chat(a) for a in ANSWERS[:2]])
    write_jsonl(folder / "b.jsonl", [_chat(7)] + [_chat(a) for a in ANSWERS[2:]])
    other = tmp_path / "other"
    other.mkdir()
    c = write_jsonl(tmp_path / "files" / "c.jsonl", [_chat(a) for a in ANSWERS] + [_chat(8)])
    d = tmp_path / "files" / "d.json"
    d.write_text(json.dumps([_chat("12")]))
    hub_cache = tmp_path / "hub"
    _fake_hub_dataset(hub_cache, "acme/chats", {"data/part1.jsonl": [_chat(9)] + [_chat(a) for a in ANSWERS]})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    parquet = tmp_path / "typed.parquet"
    Dataset.from_list([_chat(a) for a in ANSWERS]).to_parquet(str(parquet))

    cfg = cpu_config(tiny_model_dir, folder, tmp_path / "out", im_on_bad_rows="skip", shuffle_merged_datasets=False)
    im = {"type": "instruction_modelling"}
    cfg["datasets"] = [{"path": str(folder), **im},
                       {"path": str(other), "data_files": [str(c), str(d)], **im},
                       {"path": "acme/chats", "data_files": "data/part1.jsonl", **im},
                       {"path": str(parquet), "ds_type": "parquet", **im}]
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    for bad in ("b.jsonl row 0 (line 1): field 'messages[1].content': must be a string, got int",
                "c.jsonl row 4 (line 5): field 'messages[1].content': must be a string, got int",
                "part1.jsonl row 0 (line 1): field 'messages[1].content': must be a string, got int"):
        assert bad in run.output, bad
    expected = ANSWERS + ANSWERS + ["12"] + ANSWERS + ANSWERS
    outputs = _decoded_outputs(run, tokenizer)
    assert len(outputs) == len(expected), outputs
    for answer, decoded in zip(expected, outputs):
        assert decoded.startswith(answer) and decoded[len(answer):] in ("", "</s>"), (answer, decoded)


def test_every_row_bad_under_skip_is_one_line(tmp_path, tiny_model_dir):
    """Used to end in Axolotl's `randrange` error after an empty dataset."""
    data = write_jsonl(tmp_path / "allbad.jsonl", [_chat(1), _chat(2)])
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", im_on_bad_rows="skip")
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert ("allbad.jsonl row 0 (line 1): field 'messages[1].content': must be a string, got int "
            "(all 2 rows of") in run.output and "are bad: nothing is left to train on)" in run.output
    assert "randrange" not in run.output


def test_a_json_file_holding_json_lines_is_read_like_datasets_reads_it(tmp_path):
    """datasets reads JSON Lines in a .json file; so do we (a single object stays an error naming it)."""
    lines = tmp_path / "lines.json"
    write_jsonl(lines, [_chat("a"), _chat("b")])
    assert [r["messages"][1]["content"] for r in read_local(lines).rows] == ["a", "b"]
    single = tmp_path / "single.json"
    single.write_text(json.dumps(_chat("only")))
    with pytest.raises(InputError, match="single.json: expected a JSON list of rows, got dict"):
        read_local(single)
    with pytest.raises(InputError, match="broken.json line 1: not valid JSON"):
        (tmp_path / "broken.json").write_text('{"messages": [')
        read_local(tmp_path / "broken.json")


def test_deeply_nested_rows_are_bad_rows_not_a_crash(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    data = tmp_path / "deep.jsonl"
    data.write_text(json.dumps(_chat("fine")) + "\n" + '{"messages": ' + deep + "}\n")
    with pytest.raises(InputError, match=r"deep.jsonl row 1 \(line 2\): nested too deeply for a JSON reader"):
        read_local(data)
    records = read_local(data, on_bad_rows="skip")
    assert len(records.rows) == 1 and "nested too deeply" in records.unreadable[0]
    listed = tmp_path / "deep.json"
    listed.write_text("[" + deep + "]")
    with pytest.raises(InputError, match="deep.json: nested too deeply for a JSON reader"):
        read_local(listed)
