"""MT-Bench: two-turn answers with the model's chat template, single-answer grading by a judge.

The procedure is FastChat's ``llm_judge`` (fschat 0.2.36): the 80 questions, per-category sampling
temperatures, the ``single-v1`` / ``single-math-v1`` judge prompts (with GPT-4 reference answers for
math, reasoning and coding) and the ``[[rating]]`` regexes. Answers and judgments are written in
FastChat's JSONL formats. The one change: the judge call goes through
:class:`eval_suite.judge.JudgeClient`, because FastChat's own call uses the openai 0.x API, which
cannot be installed next to alpaca-eval (``research/eval.md`` §4).
"""

from __future__ import annotations

import ast
import re
import statistics
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eval_suite.generation import SamplingConfig
from eval_suite.judge import JudgeClient, JudgeRequest
from eval_suite.records import RecordError, read_records, write_jsonl
from eval_suite.results import BenchmarkResult

DATA_DIR = Path(__file__).parent / "data"
CONFIG: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "config.yaml").read_text())
ONE_SCORE = re.compile(CONFIG["one_score_pattern"])
ONE_SCORE_BACKUP = re.compile(CONFIG["one_score_pattern_backup"])


def load_questions(path: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    path = path or DATA_DIR / "question.jsonl"
    rows = read_records(path, {"question_id": int, "category": str, "turns": list})
    for i, row in enumerate(rows, 1):
        if len(row["turns"]) != 2 or not all(isinstance(t, str) for t in row["turns"]):
            raise RecordError(f"{path}: row {i}: field 'turns' should be a list of two strings")
    return rows[:limit] if limit else rows


def load_answers(path: str | Path) -> dict[int, list[str]]:
    """question_id -> [turn 1 answer, turn 2 answer], from FastChat's model_answer JSONL."""
    answers = {}
    for i, row in enumerate(read_records(path, {"question_id": int, "choices": list}), 1):
        turns = row["choices"][0].get("turns") if row["choices"] and isinstance(row["choices"][0], dict) else None
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)):
            raise RecordError(f"{path}: row {i}: field 'choices[0].turns' should be a list of two strings")
        answers[row["question_id"]] = turns
    return answers


def load_references(path: str | Path | None = None) -> dict[int, list[str]]:
    return load_answers(path or DATA_DIR / "reference_answer_gpt-4.jsonl")


def load_judge_prompts(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    fields = {"name": str, "system_prompt": str, "prompt_template": str, "output_format": str}
    return {row["name"]: row for row in read_records(path or DATA_DIR / "judge_prompts.jsonl", fields)}


FORMATS = ("chat-template", "fastchat")


def fastchat_template(model_id: str, name: str | None = None):
    """FastChat's conversation template called ``name``, else the one ``gen_model_answer.py`` picks for a model id.

    FastChat chooses by substrings of the id (e.g. ``tulu``, ``vicuna``); any other id, such as
    the paper's fine-tuned LLaMA-2 run names, gets ``one_shot`` (``### Human:``/``### Assistant:``
    after a one-shot example). ``--protocol paper`` names ``one_shot``, so a folder called e.g.
    ``Llama-2-7b-hf`` or ``tulu-im`` still gets the authors' template.
    """
    if name is not None:
        from fastchat.conversation import get_conv_template

        return get_conv_template(name)
    from fastchat.model.model_adapter import get_conversation_template

    return get_conversation_template(model_id)


def fastchat_prompt(model_id: str, user_turns: list[str], assistant_turns: list[str], name: str | None = None) -> str:
    """The prompt FastChat's ``gen_model_answer.py`` feeds for the last of ``user_turns``."""
    conv = fastchat_template(model_id, name)
    for i, user in enumerate(user_turns):
        conv.append_message(conv.roles[0], user)
        conv.append_message(conv.roles[1], assistant_turns[i] if i < len(user_turns) - 1 else None)
    return conv.get_prompt()


def fastchat_stops(model_id: str, name: str | None = None) -> tuple[str, ...]:
    stop = fastchat_template(model_id, name).stop_str
    return tuple(stop) if isinstance(stop, list) else (stop,) if stop else ()


def generate(generator, questions: list[dict], model_id: str, max_new_tokens: int | None = None,
             prompt_format: str = "chat-template", fastchat_model_path: str | None = None,
             top_k: int | None = None, store=None, fastchat_template_name: str | None = None) -> list[dict]:
    """Both turns for every question, FastChat's temperature per category, in FastChat's answer format.

    Args:
        prompt_format: ``chat-template`` (the model's own) or ``fastchat`` (FastChat's conversation
            template for ``fastchat_model_path``, as the authors' FastChat run rendered it).
        store: a :class:`eval_suite.records.SampleStore`; turns already in it are not generated again.
        fastchat_template_name: with ``fastchat``, FastChat's template by name (``one_shot`` under
            ``--protocol paper``) instead of the one picked by ``fastchat_model_path``.
    """
    if prompt_format not in FORMATS:
        raise ValueError(f"--mt-bench-format {prompt_format!r}: choose one of {', '.join(FORMATS)}")
    max_new_tokens = max_new_tokens or CONFIG["max_new_tokens"]
    fastchat_model_path = fastchat_model_path or generator.model_dir
    stop = fastchat_stops(fastchat_model_path, fastchat_template_name) if prompt_format == "fastchat" else ()
    by_temperature: dict[float, list[dict]] = defaultdict(list)
    for q in questions:
        by_temperature[CONFIG["temperature_config"].get(q["category"], 0.7)].append(q)
    answers: dict[int, list[str]] = {q["question_id"]: [] for q in questions}
    for turn in range(2):
        for temperature, group in sorted(by_temperature.items()):
            sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature if temperature >= 1e-4 else 0.0,
                                      top_k=top_k, stop=stop)
            keys = [f"q{q['question_id']}/turn{turn + 1}" for q in group]
            desc = f"MT-Bench turn {turn + 1}, T={temperature}"
            if prompt_format == "fastchat":
                prompts = [fastchat_prompt(fastchat_model_path, q["turns"][: turn + 1], answers[q["question_id"]],
                                           fastchat_template_name) for q in group]
                replies = [s[0] for s in generator.complete(prompts, sampling, desc, store=store, keys=keys)]
            else:
                conversations = [_conversation(q["turns"][: turn + 1], answers[q["question_id"]]) for q in group]
                replies = generator.chat(conversations, sampling, desc=desc, store=store, keys=keys)
            for q, reply in zip(group, replies):
                answers[q["question_id"]].append(reply.strip())
    return [{"question_id": qid, "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()} for qid, turns in answers.items()]


def _conversation(user_turns: list[str], assistant_turns: list[str]) -> list[dict[str, str]]:
    messages = []
    for i, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        if i < len(user_turns) - 1:
            messages.append({"role": "assistant", "content": assistant_turns[i]})
    return messages


@dataclass(frozen=True)
class Match:
    question: dict[str, Any]
    turn: int  # 1 or 2
    prompt_name: str
    request: JudgeRequest


def make_matches(questions: list[dict], answers: dict[int, list[str]], judge_model: str,
                 prompts: dict[str, dict] | None = None, references: dict[int, list[str]] | None = None) -> list[Match]:
    """One judge request per question and turn, as FastChat's ``run_judge_single`` formats it."""
    prompts = prompts or load_judge_prompts()
    references = references if references is not None else load_references()
    matches = []
    for q in questions:
        qid = q["question_id"]
        if qid not in answers:
            raise RecordError(f"model answers: no answer for question_id {qid}")
        a1, a2 = answers[qid]
        needs_ref = q["category"] in CONFIG["need_ref_categories"]
        if needs_ref and qid not in references:
            raise RecordError(f"reference answers: question_id {qid} ({q['category']}) needs a reference answer")
        ref = dict(ref_answer_1=references[qid][0], ref_answer_2=references[qid][1]) if needs_ref else {}
        names = CONFIG["prompts"]["with_reference" if needs_ref else "general"]
        fills = [dict(question=q["turns"][0], answer=a1, **{k: v for k, v in ref.items() if k == "ref_answer_1"}),
                 dict(question_1=q["turns"][0], question_2=q["turns"][1], answer_1=a1, answer_2=a2, **ref)]
        for turn, (name, fill) in enumerate(zip(names, fills), 1):
            template = prompts[name]
            messages = [{"role": "system", "content": template["system_prompt"]},
                        {"role": "user", "content": template["prompt_template"].format(**fill)}]
            request = JudgeRequest(model=judge_model, messages=messages, max_tokens=CONFIG["judge_max_tokens"],
                                   temperature=CONFIG["judge_temperature"])
            matches.append(Match(q, turn, name, request))
    return matches


RATING_SCALE = (1.0, 10.0)  # single-v1 asks for "a number from 1 to 10"


def parse_rating(judgment: str) -> float:
    """FastChat's rule: ``[[x]]``, else ``[x]``, else -1 (unparsed, left out of the averages).

    A rating off the 1-10 scale (``[[100]]``) is unparsed too: FastChat would average it.
    """
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return -1.0
    value = float(ast.literal_eval(match.groups()[0]))
    return value if RATING_SCALE[0] <= value <= RATING_SCALE[1] else -1.0


def check_rating(reply) -> float:
    """The judge client's parser: the rating, or ValueError (the reply is asked again, then counted)."""
    value = parse_rating(reply.text)
    if value == -1.0:
        raise ValueError(f"no [[rating]] from 1 to 10 in {reply.text[-80:]!r}")
    return value


def judge(questions: list[dict], answers: dict[int, list[str]], client: JudgeClient, out_dir: Path, model_id: str,
          judge_model: str | None = None) -> BenchmarkResult:
    """Grade every answer and write FastChat-format judgments plus the results record."""
    judge_model = judge_model or CONFIG["judge_model"]
    start = time.monotonic()
    matches = make_matches(questions, answers, judge_model)
    replies = client.complete_many([m.request for m in matches], desc="MT-Bench judge", parse=check_rating)
    judgments = [{"question_id": m.question["question_id"], "model": model_id, "judge": [judge_model, m.prompt_name],
                  "user_prompt": m.request.messages[1]["content"], "judgment": r.text, "score": -1.0 if r.failed else parse_rating(r.text),  # a failure is never a score
                  "turn": m.turn, "category": m.question["category"], "tstamp": time.time(),
                  **({"judge_error": r.error} if r.failed else {})}
                 for m, r in zip(matches, replies)]
    write_jsonl(out_dir / "judgments.jsonl", judgments)
    result = summarise(judgments, model_id)
    result.duration_seconds = time.monotonic() - start
    result.config.update(judge_model=judge_model, judge_calls=client.calls, judge_cache_hits=client.cache_hits,
                         judge_failures=client.failures)
    return result


def summarise(judgments: list[dict], model_id: str) -> BenchmarkResult:
    """Average score overall, per turn and per category, leaving out unparsed ratings as FastChat does."""
    valid = [j for j in judgments if j["score"] != -1]

    def mean(rows):
        return statistics.fmean(j["score"] for j in rows) if rows else None

    categories = sorted({j["category"] for j in judgments})
    failed = sum("judge_error" in j for j in judgments)
    notes = [f"{len(judgments) - len(valid)} of {len(judgments)} judgments had no [[rating]] from 1 to 10 and are "
             f"left out ({failed} of them: no usable judge answer after retries)"] if len(valid) < len(judgments) else []
    return BenchmarkResult(
        benchmark="mt_bench", model=model_id, headline=mean(valid),
        metrics={"turn_1": mean([j for j in valid if j["turn"] == 1]), "turn_2": mean([j for j in valid if j["turn"] == 2]),
                 "n_judgments": float(len(judgments)), "n_unparsed": float(len(judgments) - len(valid)),
                 "n_judge_failures": float(failed),
                 "average": mean(valid)},
        breakdown={"categories": {c: mean([j for j in valid if j["category"] == c]) for c in categories},
                   "stderr": {"headline": statistics.stdev(j["score"] for j in valid) / len(valid) ** 0.5
                              if len(valid) > 1 else None}},
        notes=notes,
    )
