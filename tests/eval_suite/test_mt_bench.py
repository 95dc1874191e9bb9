"""MT-Bench: FastChat's data and rules, end to end against the local judge server."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

from eval_suite.judge import JudgeClient, JudgeEndpoint
from eval_suite.mtbench import bench


def test_shipped_data_is_complete():
    questions = bench.load_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    refs = bench.load_references()
    assert {q["question_id"] for q in questions if q["category"] in bench.CONFIG["need_ref_categories"]} <= set(refs)
    assert {n for pair in bench.CONFIG["prompts"].values() for n in pair} <= set(bench.load_judge_prompts())


def test_constants_match_the_installed_fastchat():
    """Our copies of FastChat's judge constants equal fastchat/llm_judge/common.py (read, not imported:
    importing it needs openai<1 and anthropic)."""
    source = Path(importlib.util.find_spec("fastchat").submodule_search_locations[0], "llm_judge", "common.py").read_text()
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("NEED_REF_CATS", "temperature_config"):
                values[name] = ast.literal_eval(node.value)
            elif name in ("one_score_pattern", "one_score_pattern_backup"):
                values[name] = ast.literal_eval(node.value.args[0])
    assert values["NEED_REF_CATS"] == bench.CONFIG["need_ref_categories"]
    assert values["temperature_config"] == bench.CONFIG["temperature_config"]
    assert values["one_score_pattern"] == bench.CONFIG["one_score_pattern"]
    assert values["one_score_pattern_backup"] == bench.CONFIG["one_score_pattern_backup"]


@pytest.mark.parametrize("judgment, score", [("Rating: [[7]]", 7.0), ("I give [[8.5]].", 8.5), ("score [6]", 6.0),
                                             ("no rating here", -1.0)])
def test_rating_parser(judgment, score):
    assert bench.parse_rating(judgment) == score


def test_judging_uses_fastchat_prompts_and_reference_answers(judge_server, tmp_path):
    questions = bench.load_questions()
    # Answers with a known number of words, so the rule judge's rating (1 + words // 5) is known.
    answers = {q["question_id"]: [" ".join(["w"] * (q["question_id"] % 30)), "a b c d e f g h i j"] for q in questions}
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url), tmp_path / "cache.sqlite")
    result = bench.judge(questions, answers, client, tmp_path, "fixed-answers")
    turn1 = [min(10, 1 + (q["question_id"] % 30) // 5) for q in questions]
    assert result.metrics["turn_1"] == pytest.approx(sum(turn1) / 80)
    assert result.metrics["turn_2"] == pytest.approx(3.0)
    assert result.headline == pytest.approx((sum(turn1) + 3 * 80) / 160)
    judgments = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 160
    math_turn2 = next(j for j in judgments if j["category"] == "math" and j["turn"] == 2)
    assert math_turn2["judge"] == ["gpt-4", "single-math-v1-multi-turn"]
    qid = math_turn2["question_id"]
    assert bench.load_references()[qid][1] in math_turn2["user_prompt"]
    writing = [q for q in questions if q["category"] == "writing"]
    assert result.breakdown["categories"]["writing"] == pytest.approx(
        (sum(min(10, 1 + (q["question_id"] % 30) // 5) for q in writing) + 3 * len(writing)) / (2 * len(writing)))


def test_generate_and_judge_through_the_cli(tiny_model_dir, judge_server, tmp_path):
    proc = run_cli("mt-bench", "run", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path), "--limit", "3",
                   "--max-new-tokens", "8", "--judge-base-url", judge_server.url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "mt_bench" / "model_answer.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["n_unparsed"] == 0 and 1 <= summary["average"] <= 10
    assert judge_server.state.answered == 1 + 6  # the 1-token reachability probe, then 3 questions x 2 turns


def test_bad_answer_file_names_the_row_and_field(tmp_path, judge_server):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 81, "choices": [{"turns": ["a", "b"]}]}\n{"question_id": 82, "choices": [{"turns": ["only one"]}]}\n')
    proc = run_cli("mt-bench", "judge", "--run-dir", str(tmp_path), "--answers", str(answers), "--limit", "2",
                   "--judge-base-url", judge_server.url)
    assert proc.returncode != 0
    assert re.search(rf"{re.escape(str(answers))}: row 2: field 'choices\[0\]\.turns'", proc.stderr)


PAPER_MODEL_PATH = "/checkpoints/llama2_7b_alpagasus_dolly_3k_im"  # a path like the authors'; FastChat: one_shot


def test_fastchat_format_equals_fastchat_get_conversation_template(tiny_model_dir):
    """--mt-bench-format fastchat feeds what FastChat's gen_model_answer.py builds, turn by turn, for the
    paper's kind of model path (its one_shot template), as the same token ids."""
    from fastchat.model.model_adapter import get_conversation_template
    from transformers import AutoTokenizer

    from eval_suite.generation import Generator

    question = bench.load_questions(limit=1)[0]
    answers = ["First answer.", "Second answer."]
    conv = get_conversation_template(PAPER_MODEL_PATH)  # FastChat's own loop (gen_model_answer.get_model_answers)
    assert conv.name == "one_shot"
    expected = []
    for j, turn in enumerate(question["turns"]):
        conv.append_message(conv.roles[0], turn)
        conv.append_message(conv.roles[1], None)
        expected.append(conv.get_prompt())
        conv.update_last_message(answers[j])
    ours = [bench.fastchat_prompt(PAPER_MODEL_PATH, question["turns"][:1], []),
            bench.fastchat_prompt(PAPER_MODEL_PATH, question["turns"], answers[:1])]
    assert ours == expected
    assert "### Human: " + question["turns"][1] in ours[1] and ours[1].endswith("### Assistant:")
    assert bench.fastchat_stops(PAPER_MODEL_PATH) == ("###",)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # FastChat tokenises with tokenizer([prompt])
    gen = Generator(str(tiny_model_dir), load_model=False)
    assert [gen.prompt_ids(p) for p in ours] == tokenizer(ours).input_ids


def test_fastchat_format_generates_and_resumes(tiny_model_dir, tmp_path):
    from eval_suite.generation import Generator
    from eval_suite.records import SampleStore

    gen = Generator(str(tiny_model_dir))
    questions = bench.load_questions(limit=2)
    store = SampleStore(tmp_path / "generations.jsonl")
    rows = bench.generate(gen, questions, "m", 8, "fastchat", PAPER_MODEL_PATH, store=store)
    assert [len(r["choices"][0]["turns"]) for r in rows] == [2, 2] and gen.generated == 4
    again = bench.generate(gen, questions, "m", 8, "fastchat", PAPER_MODEL_PATH, store=store)
    assert gen.generated == 4 and gen.reused == 4  # nothing generated a second time
    assert [r["choices"] for r in again] == [r["choices"] for r in rows]
