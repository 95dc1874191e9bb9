"""Axolotl's chat_template dataset options through the real CLI: each is honoured (the prepared
dataset equals Axolotl's own chat_template labels under IT) or refused before preprocessing in
one sentence; ``rl:`` configs, mixed dataset types and ``eval_sequence_len`` truncation."""

from __future__ import annotations

import copy

import pytest

from cli_helpers import run_axolotl, write_jsonl
from instruction_modelling.axolotl.configs import cpu_config
from instruction_modelling.core.segments import OUTPUT_SEGMENTS, Segment
from test_agentic import FLAGGED, OPENAI_ROWS, axolotl_encode
from test_axolotl_cli import small_train_file

pytest.importorskip("axolotl")

ROWS = [FLAGGED, OPENAI_ROWS["one_call"], OPENAI_ROWS["multi_step_parallel"], OPENAI_ROWS["empty_system"],
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi there."},
                      {"role": "assistant", "content": "Hello."}]}]
OPTION_SETS = [dict(message_field_training="train", message_field_training_detail="detail", train_on_eos=value)
               for value in ("turn", "last", "all", "none")]


def test_training_flags_train_on_eos_tools_and_empty_system_match_axolotl(tmp_path, tiny_model_dir, tokenizer):
    """One preprocess run with a dataset entry per train_on_eos value (all with message_field_training
    and message_field_training_detail) over tool rows and rows with an empty system prompt. Today's code
    trains the turn marked train: false, ignores train_on_eos, drops the tools and rejects the empty
    system prompt."""
    data = write_jsonl(tmp_path / "agentic.jsonl", ROWS)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", mode="it", chat_template="qwen_25",
                     eot_tokens=["<|im_end|>"], shuffle_merged_datasets=False, sequence_len=2048)
    cfg["datasets"] = [{"path": str(data), "type": "instruction_modelling", "ds_type": "json", **options}
                       for options in OPTION_SETS]
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    ds = run.prepared_dataset()
    assert len(ds) == len(ROWS) * len(OPTION_SETS)
    for k, options in enumerate(OPTION_SETS):
        for j, row in enumerate(ROWS):
            got = ds[k * len(ROWS) + j]
            ids, labels = axolotl_encode(tokenizer, "qwen_25", copy.deepcopy(row), **options)
            assert got["input_ids"] == ids, (options, j)
            ours = [i for i, s in enumerate(got["segment_ids"]) if s in OUTPUT_SEGMENTS]
            assert ours == [i for i, label in enumerate(labels) if label != -100], (options, j)
            assert got["labels"] == [t if i in set(ours) else -100 for i, t in enumerate(ids)]
    tools_row = ds[1]
    system = tokenizer.decode([t for t, s in zip(tools_row["input_ids"], tools_row["segment_ids"]) if s == Segment.SYSTEM])
    assert '"name": "get_weather"' in system


def test_train_on_inputs_true_with_it_is_refused(tmp_path, tiny_model_dir):
    cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / "out", mode="it", train_on_inputs=True)
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "train_on_inputs: true asks for loss on the instructions, but im_mode/im weights train none" in run.output


@pytest.mark.parametrize("option,value,message", [
    ("split_thinking", True, "does not support `split_thinking`: put the reasoning into each message's "
                             "reasoning_content field"),
    ("train_on_eos", "turn", None),  # honoured: no error (eot differs below)
])
def test_unsupported_dataset_option_is_refused_before_preprocessing(tmp_path, tiny_model_dir, option, value, message):
    cfg = cpu_config(tiny_model_dir, small_train_file(tmp_path), tmp_path / "out")
    cfg["datasets"][0][option] = value
    if message is None:
        cfg["datasets"][0]["train_on_eot"] = "none"
        message = "set train_on_eos and train_on_eot to the same value (got 'turn' and 'none')"
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert message in run.output
    assert "Tokenizing Prompts" not in run.output and "segmenting" not in run.output


def test_mixed_dataset_types_are_refused_before_preprocessing(tmp_path, tiny_model_dir):
    data = small_train_file(tmp_path)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out")
    cfg["datasets"].append({"path": str(data), "type": "chat_template", "ds_type": "json"})
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "datasets: dataset" in run.output and "has type 'chat_template', but the instruction_modelling plugin " \
        "trains only type: instruction_modelling datasets" in run.output
    assert "segmenting" not in run.output


def _dpo_config(tmp_path, tiny_model_dir):
    rows = [{"prompt": "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
             "chosen": "Blue.<|im_end|>", "rejected": "Seven.<|im_end|>"}] * 8
    data = write_jsonl(tmp_path / "dpo.jsonl", rows)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", max_steps=2, micro_batch_size=2)
    cfg["rl"] = "dpo"
    cfg["datasets"] = [{"path": str(data), "type": "chatml.default", "ds_type": "json", "split": "train"}]
    return cfg


def test_rl_dpo_with_the_plugin_listed_trains_with_axolotls_trainer(tmp_path, tiny_model_dir):
    """Today: 'Trainer requires either a model or model_init argument'."""
    run = run_axolotl("train", _dpo_config(tmp_path, tiny_model_dir), tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    assert "`rl: dpo` config; the plugin steps aside" in run.output


def test_rl_with_an_instruction_modelling_dataset_is_one_sentence(tmp_path, tiny_model_dir):
    cfg = _dpo_config(tmp_path, tiny_model_dir)
    cfg["datasets"] = [{"path": str(small_train_file(tmp_path)), "type": "instruction_modelling", "ds_type": "json"}]
    run = run_axolotl("preprocess", cfg, tmp_path / "cfg.yml")
    assert run.returncode != 0
    assert "type: instruction_modelling is for supervised fine-tuning, not `rl: dpo`" in run.output


def test_eval_sequence_len_shorter_than_sequence_len_keeps_segments_aligned(tmp_path, tiny_model_dir):
    """Today the first evaluation crashes: segment_ids are not cut with the rest (63 vs 255)."""
    data = small_train_file(tmp_path, n=16)
    cfg = cpu_config(tiny_model_dir, data, tmp_path / "out", eval_file=data, max_steps=1, micro_batch_size=4,
                     excess_length_strategy="truncate", eval_sequence_len=48, eval_strategy="steps", eval_steps=1,
                     save_strategy="steps", save_steps=1)
    run = run_axolotl("train", cfg, tmp_path / "cfg.yml")
    assert run.returncode == 0, run.output[-3000:]
    evals = [h for h in run.log_history() if "eval_loss" in h]
    assert evals and evals[0]["eval_output_tokens"] > 0
