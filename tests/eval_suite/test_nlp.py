"""The NLP suite: a small local task group through the real lm-eval, Table 1's aggregation, overrides."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, lm_eval_reported_as, run_cli

from eval_suite.nlp import bench
from eval_suite.nlp.bench import Suite, aggregate, table1
from eval_suite.protocol import DEFAULT, PAPER
from eval_suite.results import BenchmarkResult

MC_ROWS = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "seven"], "label": 0}
           for i in range(6)]
GEN_ROWS = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(4)]
MT_ROWS = [{"source": "bonjour", "target": "good morning"}, {"source": "merci", "target": "thank you"},
           {"source": "chat", "target": "cat"}]


def write_local_tasks(root: Path) -> Path:
    """A tiny lm-eval task group on local JSON: multiple choice, generation, translation (TER)."""
    data = root / "data"
    data.mkdir(parents=True)
    for name, rows in (("mc", MC_ROWS), ("gen", GEN_ROWS), ("mt", MT_ROWS)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    configs = {
        "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                    "doc_to_choice": "{{choices}}", "doc_to_target": "label",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}], "data": "mc"},
        "tiny_gen": {"output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}], "data": "gen"},
        "tiny_translate": {"output_type": "generate_until", "doc_to_text": "French: {{source}}\nEnglish:",
                           "doc_to_target": " {{target}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6},
                           "metric_list": [{"metric": "ter"}, {"metric": "bleu"}], "data": "mt"},
    }
    for name, cfg in configs.items():
        files = {"test": str(data / f"{cfg.pop('data')}.jsonl")}
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **cfg, "dataset_kwargs": {"data_files": files}}))
    (tasks / "tiny_group.yaml").write_text(yaml.safe_dump({"group": "tiny_group", "task": list(configs),
                                                          "metadata": {"version": 1.0}}))
    return tasks


TINY_SUITE = Suite(lm_eval_group="tiny_group", categories={
    "knowledge": {"label": "K", "tasks": {"MC": {"result": "tiny_mc", "metric": "acc_norm,none"},
                                          "Gen": {"result": "tiny_gen", "metric": "exact_match,none"}}},
    "language": {"label": "L", "tasks": {"Translate": {"result": "tiny_translate", "metric": "ter,none",
                                                       "higher_is_better": False, "scale": 1}}},
    "code": {"label": "C", "tasks": {"HumanEval": {"source": "humaneval", "metric": "pass@1"}}},
})


def test_local_task_group_runs_end_to_end_through_lm_eval(tiny_model_dir, tmp_path):
    tasks = write_local_tasks(tmp_path)
    humaneval = BenchmarkResult(benchmark="humaneval", model="tiny", headline=25.0, metrics={"pass@1": 0.25})
    result = bench.run(str(tiny_model_dir), tmp_path / "run", suite=TINY_SUITE, include_paths=[tasks],
                       include_defaults=False, batch_size=4, device="cpu", humaneval=humaneval)
    raw_file = json.loads((tmp_path / "run" / "nlp" / "lm_eval_results.json").read_text())["results"]
    mc, gen, ter = raw_file["tiny_mc"]["acc_norm,none"], raw_file["tiny_gen"]["exact_match,none"], raw_file["tiny_translate"]["ter,none"]
    assert 0 <= mc <= 1 and 0 <= gen <= 1 and ter >= 0
    # Table 1's arithmetic on what lm-eval reported: percent, TER flipped, categories then their mean.
    assert result.breakdown["tasks"] == pytest.approx({"MC": 100 * mc, "Gen": 100 * gen, "Translate": 100 - ter, "HumanEval": 25.0})
    categories = {"knowledge": (100 * mc + 100 * gen) / 2, "language": 100 - ter, "code": 25.0}
    assert result.breakdown["categories"] == pytest.approx(categories)
    assert result.headline == pytest.approx(statistics.fmean(categories.values()))
    assert result.config["suite"]["lm_eval_group"] == "tiny_group"


def test_limit_through_the_cli(tiny_model_dir, tmp_path):
    tasks = write_local_tasks(tmp_path)
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(TINY_SUITE.model_dump()))
    proc = run_cli("nlp", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--suite", str(suite_file),
                   "--include-path", str(tasks), "--no-builtin-tasks", "--limit", "2", "--batch-size", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # No HumanEval result in this run dir: C has none of its tasks, so there is no Mean either (not the mean
    # of K and L), and the line says what is missing.
    assert set(summary) == {"mean", "category/knowledge", "category/language", "category/code", "incomplete"}
    assert summary["category/code"] is None and summary["mean"] is None
    assert summary["category/knowledge"] is not None and summary["category/language"] is not None
    assert summary["incomplete"] == {"category/code": "C: not reported, 0 of 1 tasks have a score (missing: HumanEval)",
                                     "mean": "Mean: not reported, 2 of 3 categories are complete (incomplete: C)"}
    result = json.loads((tmp_path / "run" / "results" / "nlp.json").read_text())
    assert result["headline"] is None and result["breakdown"]["categories"]["code"] is None
    assert result["config"]["incomplete"]["mean"]["missing"] == ["C"]
    assert result["breakdown"]["partial"]["mean"] == pytest.approx(
        statistics.fmean([summary["category/knowledge"], summary["category/language"]]))
    assert any("--limit 2" in n for n in result["notes"]) and any("missing: HumanEval" in n for n in result["notes"])


def test_log_samples_passes_through_and_a_rerun_answers_from_lm_evals_cache(tiny_model_dir, tmp_path):
    tasks = write_local_tasks(tmp_path)
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(TINY_SUITE.model_dump()))
    args = ["nlp", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--suite", str(suite_file),
            "--include-path", str(tasks), "--no-builtin-tasks", "--limit", "2", "--batch-size", "2", "--device", "cpu",
            "--log-samples"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    logged = sorted(p.name for p in (tmp_path / "run" / "nlp").glob("samples_*.jsonl"))
    assert logged and all(len((tmp_path / "run" / "nlp" / n).read_text().splitlines()) == 2 for n in logged)
    again = run_cli(*args)  # a killed or repeated run: every request comes from RUN_DIR/nlp/lm_eval_cache
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"Cached requests: [1-9]\d*, Requests remaining: 0", again.stderr), again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == json.loads(first.stdout.strip().splitlines()[-1])


def test_aggregation_flips_lower_is_better_and_reports_no_incomplete_category_or_mean():
    suite = Suite(lm_eval_group="g", categories={
        "a": {"label": "A", "tasks": {"x": {"result": "x", "metric": "acc,none"}, "y": {"result": "y", "metric": "acc,none"}}},
        "b": {"label": "B", "tasks": {"ter": {"result": "t", "metric": "ter,none", "higher_is_better": False, "scale": 1}}},
    })
    tasks, categories, mean, notes = aggregate({"x": 0.5, "y": None, "ter": 80.0}, suite)
    assert tasks == {"x": 50.0, "ter": 20.0}
    # A has 1 of its 2 tasks: its 50.0 is no category score, and a Mean over B alone is no Mean.
    assert categories == {"a": None, "b": 20.0} and mean is None
    assert notes == ["A: not reported, 1 of 2 tasks have a score (missing: y); partial mean 50.00",
                     "Mean: not reported, 1 of 2 categories are complete (incomplete: A)"]
    result = table1({"x": 0.5, "y": None, "ter": 80.0}, suite)
    assert result.breakdown["partial"] == {"a": 50.0, "mean": 20.0}
    assert result.config["incomplete"]["a"]["missing"] == ["y"]
    _, categories, mean, notes = aggregate({"x": 0.5, "y": 0.7, "ter": 80.0}, suite)
    assert categories == {"a": pytest.approx(60.0), "b": 20.0} and mean == pytest.approx(40.0) and notes == []


def table1_base_row_raw(suite: Suite) -> dict[str, float]:
    """Raw lm-eval scores that give Table 1's LLaMA-2-base categories under the authors' scoring: every task
    of a category at the category's score (a fraction, as lm-eval reports accuracies), except
    Multilinguality: LAMBADA Multilingual 52.00 % and WMT's TER 71.98 as lm-eval reports it (0-100,
    lower is better), whose plain average is Table 1's 61.99."""
    categories = dict(zip(suite.categories, (63.91, 61.99, 75.86, 13.32, 38.80, 42.03)))
    raw = {name: categories[c] / 100 for c, cat in suite.categories.items() for name in cat.tasks}
    raw.update({"LAMBADA Multilingual": 0.52, "WMT 2014/2016": 71.98})
    return raw


def test_paper_protocol_reproduces_table1_from_raw_scores_and_default_does_not():
    """Table 1's LLaMA-2-base row: Mean 49.32 is the mean of the six categories, with WMT's TER averaged as
    it is (the authors' get_results_group.py). The default protocol's 100 - TER gives another Multi
    (lower by TER - 50) and Mean (lower by (TER - 50) / 6), and says so."""
    suite = Suite.load()
    assert [c.label for c in suite.categories.values()] == ["U&K", "Multi", "CR", "M&C", "BBH", "S&H"]
    assert sum(len(c.tasks) for c in suite.categories.values()) == 17  # 18 tasks, WMT14+16 as one entry
    raw = table1_base_row_raw(suite)
    _, cats, mean, _ = aggregate(raw, suite, PAPER)
    assert round(cats["multilinguality"], 2) == 61.99 and round(mean, 2) == 49.32
    assert [round(v, 2) for v in cats.values()] == [63.91, 61.99, 75.86, 13.32, 38.80, 42.03]
    tasks, cats, mean, _ = aggregate(raw, suite, DEFAULT)
    assert tasks["WMT 2014/2016"] == pytest.approx(100 - 71.98)
    assert cats["multilinguality"] == pytest.approx(61.99 - (71.98 - 50)) and round(mean, 2) == 45.66
    # The result says which scoring it used.
    paper_note = [n for n in bench.table1(raw, suite, protocol=PAPER).notes if n.startswith("WMT")]
    default_note = [n for n in bench.table1(raw, suite).notes if n.startswith("WMT")]
    assert paper_note == ["WMT 2014/2016: TER enters its category as it is (lower is better), as the authors' "
                          "get_results_group.py did; Multi and Mean are Table 1's"]
    assert "100 - TER" in default_note[0] and "--protocol paper" in default_note[0]


def test_shipped_lm_eval_yaml_resolves_to_registered_tasks():
    """Every member of the shipped groups is an lm-eval 0.4.11 task, group or tag, and every result the
    suite reads is one of them (without the hub: no dataset is loaded)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(bench.TASKS_DIR))
    known = set(tm.all_tasks)

    yaml_files = {p.stem: p for p in bench.TASKS_DIR.rglob("*.yaml")}

    def members(name):
        for entry in yaml.safe_load(yaml_files[name].read_text())["task"]:
            yield entry["task"] if isinstance(entry, dict) else entry

    seen, todo = set(), ["im_sft_eval", "im_tydiqa_goldp"]
    while todo:
        name = todo.pop()
        seen.add(name)
        for member in members(name):
            assert member in known, f"{name}: {member} is not registered in lm-eval"
            if member in yaml_files and "group" in yaml.safe_load(yaml_files[member].read_text()):
                todo.append(member)
    assert {spec.result for spec in Suite.load().lm_eval_tasks().values()} <= known
    shots = {entry["task"]: entry.get("num_fewshot") for n in seen for entry in
             yaml.safe_load(yaml_files[n].read_text())["task"] if isinstance(entry, dict)}
    assert shots == {"mmlu": 5, "piqa": 10, "hellaswag": 10, "winogrande": 5, "arc_easy": 25, "arc_challenge": 25, "coqa": 0}


def test_dataset_override_runs_a_builtin_task_from_a_local_copy(tiny_model_dir, tmp_path):
    """The documented offline route: point lm-eval's own wsc273 task (with its !function helpers) at local data."""
    rows = [{"text": "The trophy does not fit in the suitcase because it is too big.", "pronoun": "it",
             "pronoun_loc": 48, "quote": "it is too big", "quote_loc": 48, "options": ["the trophy", "the suitcase"],
             "label": 0, "source": "local"}] * 3
    data = tmp_path / "wsc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"wsc273": {"dataset_path": "json", "dataset_name": None,
                                                    "dataset_kwargs": {"data_files": {"test": str(data)}}}}))
    suite = Suite(lm_eval_group="wsc273", categories={"cr": {"label": "CR", "tasks": {
        "WSC": {"result": "wsc273", "metric": "acc,none"}}}})
    result = bench.run(str(tiny_model_dir), tmp_path / "run", suite=suite, dataset_overrides=overrides,
                       batch_size=4, device="cpu")
    assert result.breakdown["raw"]["WSC"] in (0.0, 1.0)  # the same row three times: all right or all wrong
    assert result.config["dataset_overrides"]["wsc273"]["dataset_path"] == "json"


def test_tydiqa_goldp_task_on_local_data(tiny_model_dir, tmp_path):
    rows = [{"id": f"english-{i}", "title": "t", "context": "Paris is the capital of France.",
             "question": "What is the capital of France?", "answers": {"text": ["Paris"], "answer_start": [0]}}
            for i in range(3)] + [{"id": "swahili-0", "title": "t", "context": "x", "question": "y",
                                   "answers": {"text": ["z"], "answer_start": [0]}}]
    data = tmp_path / "tydiqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"im_tydiqa_goldp_en": {
        "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(data), "validation": str(data)}}}}))
    suite = Suite(lm_eval_group="im_tydiqa_goldp_en", categories={"qa": {"label": "QA", "tasks": {
        "TyDiQA en": {"result": "im_tydiqa_goldp_en", "metric": "f1,none"}}}})
    result = bench.run(str(tiny_model_dir), tmp_path / "run", suite=suite, dataset_overrides=overrides,
                       batch_size=4, device="cpu")
    assert 0.0 <= result.breakdown["raw"]["TyDiQA en"] <= 1.0
    assert result.config["n_shot"]["im_tydiqa_goldp_en"] == 1


def test_tydiqa_metrics():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("tydiqa_goldp", bench.TASKS_DIR / "tydiqa" / "tydiqa_goldp.py")
    tydiqa = module_from_spec(spec)
    spec.loader.exec_module(tydiqa)
    doc = {"answer_texts": ["the Eiffel Tower", "Eiffel"]}
    assert tydiqa.process_results_en(doc, [" Eiffel tower!"]) == {"exact_match": 1.0, "f1": 1.0}
    assert tydiqa.process_results_en(doc, ["a tower in Paris"])["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert tydiqa.normalize("«Habari», dunia!", "sw") == ["habari", "dunia"]


@pytest.mark.parametrize("installed,ok", [("0.4.11", True), ("0.4.11.post1", True), ("0.4.10", False),
                                          ("0.4.12", False), ("0.4.13", False), ("0.5.0", False)])
def test_lm_eval_version_gate(installed, ok):
    if ok:
        bench.check_lm_eval_version(installed)
    else:
        with pytest.raises(ValueError, match=rf"lm-eval {re.escape(installed)}: pip install 'lm-eval\[hf\]>=0.4.11,<0.4.12'"):
            bench.check_lm_eval_version(installed)


def test_installed_lm_eval_passes_the_gate_and_pyproject_declares_the_same_range():
    bench.check_lm_eval_version()  # the environment the suite is tested in
    low, high = bench.LM_EVAL_RANGE
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'"lm-eval[hf]>={low},<{high}"' in pyproject


def test_an_unsupported_lm_eval_is_one_sentence_before_any_work(tiny_model_dir, tmp_path):
    """lm-eval reported as 0.4.13: the CLI stops at once and says what to install."""
    proc = run_cli("nlp", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                   env=lm_eval_reported_as("0.4.13", tmp_path))
    assert proc.returncode != 0
    assert "this environment has lm-eval 0.4.13: pip install 'lm-eval[hf]>=0.4.11,<0.4.12'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results").exists()
