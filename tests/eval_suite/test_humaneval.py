"""HumanEval: re-scoring sample files through the CLI, the estimator, the opt-in, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from eval_suite.humaneval import bench


@pytest.fixture(scope="module")
def problems():
    return bench.load_problems()


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path, problems):
    canonical = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    wrong = [{"task_id": t, "completion": "    return None\n"} for t in problems]
    for rows, expected in ((canonical, 1.0), (wrong, 0.0)):
        samples = write_samples(tmp_path / f"samples_{expected}.jsonl", rows)
        proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution", "--k", "1")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary == {"pass@1": expected}
    per_sample = [json.loads(line) for line in open(str(tmp_path / "samples_1.0.jsonl") + "_results.jsonl")]
    assert len(per_sample) == 164 and all(r["passed"] for r in per_sample)


def test_pass_at_k_per_temperature_and_best_of_temperatures(tmp_path, problems):
    """Two problems, 4 samples each: unbiased pass@k per temperature; the headline is the better one."""
    ids = list(problems)[:2]
    good = {t: problems[t]["canonical_solution"] for t in ids}
    rows = []
    for temperature, n_correct in ((0.1, 1), (0.7, 3)):
        for t in ids:
            rows += [{"task_id": t, "completion": good[t] if i < n_correct else "    return None\n",
                      "temperature": temperature} for i in range(4)]
    result, _ = bench.score(rows, problems, allow_code_execution=True, ks=(1, 2))
    # pass@1 = c/n; pass@2 = 1 - C(n-c, 2)/C(n, 2)
    assert result.breakdown["T=0.1"] == pytest.approx({"pass@1": 0.25, "pass@2": 0.5})
    assert result.breakdown["T=0.7"] == pytest.approx({"pass@1": 0.75, "pass@2": 1.0})
    assert result.metrics == pytest.approx({"pass@1": 0.75, "pass@2": 1.0})
    assert result.headline == pytest.approx(75.0)


def test_hostile_samples_are_reported_as_failures(tmp_path, problems):
    task = "HumanEval/0"
    hostile = {
        "loop": "    while True:\n        pass\n",
        "fork_bomb": "    import os\n    while True:\n        os.fork()\n",
        "allocation": "    return bytearray(50 * 1024**3)\n",
        "escape": f"    open({str(tmp_path / 'escaped.txt')!r}, 'w').write('x')\n    return True\n",
        "socket": "    import socket\n    socket.create_connection(('127.0.0.1', 80), timeout=1)\n    return True\n",
    }
    samples = write_samples(tmp_path / "hostile.jsonl", [{"task_id": task, "completion": c} for c in hostile.values()]
                            + [{"task_id": task, "completion": problems[task]["canonical_solution"]}])
    proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution", "--k", "1",
                   "--timeout", "3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"pass@1": pytest.approx(1 / 6)}
    results = [json.loads(line) for line in open(str(samples) + "_results.jsonl")]
    assert [r["passed"] for r in results] == [False] * 5 + [True]
    assert results[0]["result"].startswith("timeout")
    assert not (tmp_path / "escaped.txt").exists()


def test_scoring_refuses_without_the_opt_in(tmp_path, problems):
    samples = write_samples(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    return True\n"}])
    proc = run_cli("humaneval", "score", "--samples", str(samples))
    assert proc.returncode != 0 and "--allow-code-execution" in proc.stderr
    with pytest.raises(PermissionError, match="--allow-code-execution"):
        bench.execute([{"task_id": "HumanEval/0", "completion": ""}], problems, allow_code_execution=False)


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "HumanEval/0"}', "row 2: missing field 'completion'"),
    ('{"task_id": "HumanEval/999", "completion": ""}', "row 2: field 'task_id' is 'HumanEval/999'"),
    ('{"task_id": "HumanEval/0", "completion": 3}', "row 2: field 'completion' should be str"),
    ("not json", "row 2: not valid JSON"),
])
def test_bad_sample_files_name_the_file_row_and_field(tmp_path, line, message):
    samples = tmp_path / "bad.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": ""}\n' + line + "\n")
    proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution")
    assert proc.returncode != 0
    assert str(samples) in proc.stderr and message in proc.stderr


def test_sampling_with_a_tiny_model(tiny_model_dir, problems):
    """n samples per problem and temperature, cut at the paper's stop sequences."""
    from eval_suite.generation import Generator

    rows = bench.sample(Generator(str(tiny_model_dir), batch_size=4), problems, temperatures=(0.1, 0.7), n=3,
                        limit=2, max_new_tokens=24)
    assert len(rows) == 2 * 2 * 3
    assert {(r["task_id"], r["temperature"]) for r in rows} == {(t, T) for t in list(problems)[:2] for T in (0.1, 0.7)}
    assert not any(stop in r["completion"] for r in rows for stop in bench.PAPER_SAMPLING["stop"])


def _forged(problems, extra):
    """20 wrong samples of one problem at the run's temperature, plus ``extra`` rows."""
    task = "HumanEval/0"
    return [{"task_id": task, "completion": "    return None\n", "temperature": 0.1} for _ in range(20)] + [
        {"task_id": task, "completion": problems[task]["canonical_solution"], **row} for row in extra]


@pytest.mark.parametrize("extra, message", [
    ([{"temperature": 0.3}], "HumanEval/0 has 1 at T=0.3 and HumanEval/0 has 20 at T=0.1"),
    ([{"temperature": float("nan")}], "field 'temperature' is nan; it must be a finite number >= 0"),
    ([{"temperature": -1}], "field 'temperature' is -1; it must be a finite number >= 0"),
])
def test_one_correct_row_at_an_extra_temperature_cannot_set_the_headline(tmp_path, problems, extra, message):
    """Used to score 100%: each temperature averaged only its own problems, and the best one was the headline."""
    samples = write_samples(tmp_path / "forged.jsonl", _forged(problems, extra))
    proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution", "--k", "1")
    assert proc.returncode != 0, proc.stdout
    assert str(samples) in proc.stderr and message in proc.stderr, proc.stderr
    with pytest.raises(bench.RecordError):
        bench.score(_forged(problems, extra), problems, allow_code_execution=True, ks=(1,))


def test_temperatures_must_cover_the_same_problems_and_be_the_runs_own(tmp_path, problems):
    ids = list(problems)[:2]
    rows = [{"task_id": t, "completion": "    return None\n", "temperature": T} for T in (0.1, 0.7) for t in ids]
    with pytest.raises(bench.RecordError, match="temperatures 0.1 and 0.7 cover different problems"):
        bench.check_coverage(rows[:-1], "s.jsonl")
    bench.check_coverage(rows, "s.jsonl", temperatures=[0.7, 0.1])
    samples = write_samples(tmp_path / "s.jsonl", rows)
    proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution", "--k", "1",
                   "--temperatures", "0.1")
    assert proc.returncode != 0
    assert "samples at temperatures [0.1, 0.7], but the run samples at [0.1]" in proc.stderr


def test_a_correct_20_mb_completion_passes(problems):
    """It used to fail as a sandbox 'setup error': the program did not fit the sandbox's 16 MiB tmpfs."""
    task = "HumanEval/0"
    padded = problems[task]["canonical_solution"] + "    # " + "x" * 20_000_000 + "\n"
    result, executed = bench.score([{"task_id": task, "completion": padded}], problems, allow_code_execution=True,
                                   ks=(1,))
    assert executed[0]["passed"], executed[0]["result"]


def test_an_invalid_utf8_samples_file_names_the_file_and_row(tmp_path, problems):
    samples = tmp_path / "latin1.jsonl"
    samples.write_bytes(b'{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "HumanEval/0", "completion": "caf\xe9"}\n')
    with pytest.raises(bench.RecordError, match=r"latin1.jsonl: row 2: not UTF-8 text"):
        bench.read_samples(samples, problems)
