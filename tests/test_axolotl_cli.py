"""The plugin through the real Axolotl 0.19.0 CLI (preprocess, train) on a tiny local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import run_axolotl, write_jsonl
from instruction_modelling.axolotl.configs import cpu_config
from instruction_modelling.quickstart.sample_data import TRAIN_FILE
from instruction_modelling.core.segments import ChatRenderer, RowEncoder, Segment
from test_segments import CONVERSATIONS

pytest.importorskip("axolotl")

TRICKY_ROWS = [{"messages": m} for m in CONVERSATIONS.values()] * 3


def small_train_file(tmp_path, n=48):
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:n]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.mark.parametrize("template_name,mode", [("tulu", "im"), ("chatml", "it"), ("llama3", "im")])
def test_preprocess_writes_segments_that_match_the_core(tmp_path, tiny_model_dir, tokenizer, templates, template_name, mode):
    data = write_jsonl(tmp_path / "tricky.jsonl", TRICKY_ROWS)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", mode=mode,
                     chat_template="jinja", chat_template_jinja=templates[template_name],
                     shuffle_merged_datasets=False, dataset_num_proc=2)  # strategy pickled to 2 workers
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    ds = run.prepared_dataset()
    assert {"input_ids", "labels", "segment_ids", "attention_mask"} <= set(ds.column_names)
    assert len(ds) == len(TRICKY_ROWS)
    encoder = RowEncoder(tokenizer, ChatRenderer(tokenizer, templates[template_name]))
    trained = {Segment.SYSTEM, Segment.USER, Segment.OUTPUT} if mode == "im" else {Segment.OUTPUT}
    for row, got in zip(TRICKY_ROWS, ds):
        ex = encoder.encode(row)
        assert got["input_ids"] == ex.input_ids
        assert got["segment_ids"] == ex.segment_ids
        # Labels (for Axolotl's own tools) mirror what carries loss in this mode.
        assert got["labels"] == [t if s in trained else -100 for t, s in zip(ex.input_ids, ex.segment_ids)]


def _train_cfg(tmp_path, tiny_model_dir, name, **overrides):
    settings = dict(im_instruction_weight=0.3, max_steps=3, save_strategy="steps", save_steps=3, learning_rate=1e-2,
                    dataset_prepared_path=str(tmp_path / f"{name}_prepared"))
    settings.update(overrides)
    return cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / name, mode="im", **settings)


def test_gradient_accumulation_1_vs_4_same_loss(tmp_path, tiny_model_dir):
    runs = {}
    for name, mb, ga in (("ga1", 4, 1), ("ga4", 1, 4)):
        cfg = _train_cfg(tmp_path, tiny_model_dir, name, micro_batch_size=mb, gradient_accumulation_steps=ga)
        run = run_axolotl("train", cfg, tmp_path / f"{name}.yml")
        assert run.returncode == 0, run.output[-3000:]
        runs[name] = [h for h in run.log_history() if "loss" in h]
    assert len(runs["ga1"]) == len(runs["ga4"]) == 3
    for a, b in zip(runs["ga1"], runs["ga4"]):
        for key in ("loss", "instruction_loss", "output_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-4, abs=2e-4), (key, a, b)


def test_packing_on_and_off_give_the_same_segment_losses(tmp_path, tiny_model_dir):
    evals = {}
    data = small_train_file(tmp_path)
    for name, packing in (("unpacked", False), ("packed", True)):
        # micro_batch_size 1: Axolotl's packed eval sampler drops an incomplete last batch (drop_last=True).
        cfg = _train_cfg(tmp_path, tiny_model_dir, name, micro_batch_size=1, sample_packing=packing,
                         eval_sample_packing=packing, pad_to_sequence_len=packing, max_steps=1, save_steps=1,
                         test_datasets=[{"path": str(data), "type": "instruction_modelling", "ds_type": "json",
                                         "split": "train"}],
                         eval_strategy="steps", eval_steps=1)
        run = run_axolotl("train", cfg, tmp_path / f"{name}.yml")
        assert run.returncode == 0, run.output[-3000:]
        first_eval = next(h for h in run.log_history() if "eval_output_loss" in h)
        assert first_eval["step"] == 0
        evals[name] = first_eval
    for key in ("eval_instruction_tokens", "eval_output_tokens"):
        assert evals["packed"][key] == evals["unpacked"][key], (key, evals)
    for key in ("eval_instruction_loss", "eval_output_loss"):
        assert float(evals["packed"][key]) == pytest.approx(float(evals["unpacked"][key]), rel=1e-4), key


def test_bad_row_stops_preprocessing_naming_file_row_and_field(tmp_path, tiny_model_dir):
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:6]
    rows[3]["messages"][-1]["content"] = ""
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out")
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert f"bad.jsonl row 3 (line 4): field 'messages[{len(rows[3]['messages']) - 1}].content': is empty" in run.output


def test_skip_mode_counts_and_reports(tmp_path, tiny_model_dir):
    rows = [json.loads(line) for line in open(TRAIN_FILE, encoding="utf-8")][:8]
    rows[1]["messages"].append({"role": "user", "content": "and then?"})  # does not end with an output
    rows[5]["messages"][0]["role"] = "narrator"
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", im_on_bad_rows="skip")
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    assert "8 rows, 6 kept, 2 skipped" in run.output
    assert "bad.jsonl row 1 (line 2)" in run.output and "must end with an assistant turn" in run.output
    assert "unknown role 'narrator'" in run.output
    assert len(run.prepared_dataset()) == 6


def test_truncation_that_leaves_no_output_is_a_bad_row(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}]
    data = write_jsonl(tmp_path / "long.jsonl", rows + [json.loads(open(TRAIN_FILE).readline())])
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", excess_length_strategy="truncate", sequence_len=64)
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "long.jsonl row 0 (line 1): field 'messages': no output token left (sequence_len=64" in run.output


def test_without_the_plugin_the_type_fails_loudly(tmp_path, tiny_model_dir):
    cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / "out")
    cfg.pop("plugins")
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "unhandled prompt tokenization strategy: instruction_modelling" in run.output


def test_stock_dataset_type_is_refused_before_preprocessing(tmp_path, tiny_model_dir):
    """The plugin with a stock dataset type must not silently train with the unweighted loss."""
    cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / "out", max_steps=1)
    cfg["datasets"][0]["type"] = "chat_template"
    run = run_axolotl("train", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "has type 'chat_template', but the instruction_modelling plugin trains only type: " \
        "instruction_modelling datasets" in run.output
    assert "Tokenizing Prompts" not in run.output


def test_invalid_option_is_a_one_sentence_error(tmp_path, tiny_model_dir):
    cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / "out", mode="it", im_instruction_weight=0.5)
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "im_mode: it trains no instruction tokens, but im_instruction_weight is 0.5" in run.output


def test_preview_marks_what_carries_loss(tmp_path, tiny_model_dir):
    from instruction_modelling.axolotl.configs import write_config

    data = write_jsonl(tmp_path / "one.jsonl", [{"messages": CONVERSATIONS["single_turn"]}])
    path = write_config(cpu_config(tiny_model_dir, data, tmp_path / "out", mode="it"), tmp_path / "cfg.yml")
    proc = subprocess.run([sys.executable, "-m", "instruction_modelling.preview", str(path), "--plain"],
                          capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if "<|assistant|>" in l or "assistant" in l and "[" in l)
    prompt, answer = line.split("assistant", 1)
    assert answer.endswith("[</s>]O") and "[Y]O" in answer
    assert "[" not in prompt and "· br·" in prompt  # under IT the user's words carry no loss
