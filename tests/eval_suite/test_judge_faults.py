"""Judge faults end cleanly, against a real server on 127.0.0.1 and through the real CLI.

Malformed answers are asked again a bounded number of times, then counted as failures (never cached,
never a traceback); the cache is keyed by the judge; Retry-After and the total deadline hold; two runs
sharing a cache pay for each prompt once; a corrupt cache is one sentence; the cache file is private;
the test server's admin endpoints need its key.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_cli

from eval_suite.judge import JudgeClient, JudgeEndpoint, JudgeError, JudgeRequest
from eval_suite.judge.server import MALFORMED, JudgeServer
from eval_suite.mtbench import bench as mt

RATING_PROMPT = "[[rating]]\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"


def request(answer: str) -> JudgeRequest:
    return JudgeRequest(model="gpt-4", messages=[{"role": "user", "content": RATING_PROMPT.format(answer=answer)}])


def cached_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def mt_answers(tmp_path: Path, n: int) -> Path:
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "model_id": "m",
                                           "choices": [{"index": 0, "turns": ["a first answer", "a second one"]}]}) + "\n"
                               for q in mt.load_questions(limit=n)))
    return answers


def mt_judge(run_dir: Path, answers: Path, n: int, url: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("mt-bench", "judge", "--run-dir", str(run_dir), "--answers", str(answers), "--limit", str(n),
                   "--judge-base-url", url, "--judge-parse-retries", "1", *extra, timeout=300)


def result_of(run_dir: Path) -> dict:
    return json.loads(next((run_dir / "results").glob("mt_bench*.json")).read_text())


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_answers_are_counted_failures_and_never_cached(tmp_path, kind):
    answers, run_dir = mt_answers(tmp_path, 2), tmp_path / "run"
    with JudgeServer() as server:
        server.state.malformed_first, server.state.malformed_kind = 2, kind  # the first judgment's two tries
        proc = mt_judge(run_dir, answers, 2, server.url, "--judge-concurrency", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        result = result_of(run_dir)
        assert result["config"]["judge_failures"] == 1 and result["metrics"]["n_judge_failures"] == 1
        assert result["metrics"]["n_unparsed"] == 1 and result["metrics"]["n_judgments"] == 4
        assert 1 <= result["headline"] <= 10  # the three good judgments, nothing off the scale averaged
        assert cached_rows(run_dir / "judge_cache.sqlite") == 3  # the failed one is not cached
        judgments = [json.loads(line) for line in (run_dir / "mt_bench" / "judgments.jsonl").read_text().splitlines()]
        assert sum("judge_error" in j for j in judgments) == 1
        assert server.state.malformed == 2 and server.state.answered == 3

        # A rerun against the same judge asks only for the failed judgment, and this time gets it.
        proc = mt_judge(run_dir, answers, 2, server.url, "--judge-concurrency", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert server.state.answered - server.state.probes == 4 and server.state.stats()["repeated_answers"] == 0
    assert result_of(run_dir)["metrics"]["n_unparsed"] == 0 and cached_rows(run_dir / "judge_cache.sqlite") == 4


def test_off_scale_rating_is_not_averaged():
    assert mt.parse_rating("Rating: [[100]]") == -1.0 and mt.parse_rating("Rating: [[7]]") == 7.0
    assert mt.parse_rating("Rating: [0]") == -1.0 and mt.parse_rating("[[10]]") == 10.0


def test_alpaca_eval_counts_failures_and_exits_cleanly_when_none_parse(tmp_path):
    from conftest import benchmarks_dir

    ae = benchmarks_dir() / "alpaca_eval"
    args = ["alpaca-eval", "judge", "--version", "alpaca_eval_1", "--limit", "4", "--judge-parse-retries", "0",
            "--model-outputs", str(ae / "alpaca-7b_outputs.json"),
            "--reference-outputs", str(ae / "text_davinci_003_outputs.json"), "--judge-concurrency", "1"]
    with JudgeServer() as server:
        server.state.malformed_first, server.state.malformed_kind = 1, "huge_rating"
        proc = run_cli(*args, "--run-dir", str(tmp_path / "some"), "--judge-base-url", server.url, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "some" / "results").glob("*.json")).read_text())
    assert result["config"]["judge_failures"] == 1 and result["metrics"]["n_judge_failures"] == 1
    assert any("1 of 4 instructions had no usable judge answer" in n for n in result["notes"])

    with JudgeServer() as server:
        server.state.malformed_first, server.state.malformed_kind = 100, "html"
        proc = run_cli(*args, "--run-dir", str(tmp_path / "none"), "--judge-base-url", server.url, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the judge gave no usable answer for any of the 4 instructions (4 failures" in proc.stderr
    assert cached_rows(tmp_path / "none" / "judge_cache.sqlite") == 0


def test_switching_the_judge_url_judges_again(tmp_path):
    answers, run_dir = mt_answers(tmp_path, 1), tmp_path / "run"
    with JudgeServer() as first:
        assert mt_judge(run_dir, answers, 1, first.url).returncode == 0
        assert first.state.answered == 2
        again = mt_judge(run_dir, answers, 1, first.url)  # same judge: all from the cache, after a 1-token probe
        assert again.returncode == 0 and first.state.answered == 3 and first.state.probes == 1
    with JudgeServer() as second:
        proc = mt_judge(run_dir, answers, 1, second.url)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert second.state.answered == 2
    result = result_of(run_dir)
    # results record the judge's scheme://host:port only (issue 12: no path, where servers may take a token)
    assert second.url.startswith(result["config"]["judge_base_url"] + "/")
    assert result["config"]["judge_cache_hits"] == 0


def test_retry_after_is_honoured(judge_server, tmp_path):
    judge_server.state.rate_limit_first, judge_server.state.retry_after = 1, "1"
    # The exponential backoff alone would wait 30-60 s; the server asked for 1 s.
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, backoff_seconds=30), tmp_path / "c.sqlite")
    start = time.monotonic()
    assert not client.complete(request("a short answer")).failed
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 10, elapsed
    assert (judge_server.state.requests, client.calls) == (2, 2)


@pytest.mark.parametrize("fault", ["stall", "trickle"])
def test_deadline_is_for_the_whole_request(judge_server, fault):
    if fault == "stall":
        judge_server.state.delay_seconds = 20
    else:
        judge_server.state.trickle_seconds = 20  # every read gets a byte well within any read timeout
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, timeout_seconds=1.5, max_retries=1,
                                       backoff_seconds=0.1))
    start = time.monotonic()
    with pytest.raises(JudgeError, match="still failing after 2 attempts"):
        client.complete(request("an answer"))
    assert time.monotonic() - start < 6  # two 1.5 s attempts and a short backoff, not 2 x 20 s


def test_the_cli_deadline_option_ends_the_run_in_one_line(judge_server, tmp_path):
    judge_server.state.trickle_seconds = 30
    proc = mt_judge(tmp_path / "run", mt_answers(tmp_path, 1), 1, judge_server.url, "--judge-timeout", "1",
                    "--judge-max-retries", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "still failing after 1 attempts: _DeadlineExceeded: no complete answer within 1 s" in proc.stderr


def test_two_concurrent_runs_on_one_cache_pay_each_prompt_once(tmp_path):
    n = 4
    answers, cache = mt_answers(tmp_path, n), tmp_path / "shared_cache.sqlite"
    env = {"PYTHONPATH": str(REPO_ROOT)}
    with JudgeServer() as server:
        server.state.delay_seconds = 0.3
        runs = [subprocess.Popen([sys.executable, "-m", "eval_suite", "mt-bench", "judge", "--run-dir",
                                  str(tmp_path / f"run{i}"), "--answers", str(answers), "--limit", str(n),
                                  "--judge-base-url", server.url, "--judge-cache", str(cache),
                                  "--judge-concurrency", "2"], env={**__import__("os").environ, **env},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [r.communicate(timeout=300) for r in runs]
        stats = server.state.stats()
    for r, (_, err) in zip(runs, outs):
        assert r.returncode == 0, err[-3000:]
    assert stats["distinct_requests"] == 2 * n and stats["repeated_answers"] == 0
    assert stats["answered"] - stats["probes"] == 2 * n  # a run finding cached answers probes which model answers
    results = [result_of(tmp_path / f"run{i}") for i in range(2)]
    assert sum(r["config"]["judge_calls"] for r in results) == 2 * n
    assert results[0]["headline"] == results[1]["headline"]


def test_corrupt_cache_is_one_sentence_naming_the_file(tmp_path, judge_server):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "judge_cache.sqlite").write_bytes(b"this is not a database" * 100)
    proc = mt_judge(run_dir, mt_answers(tmp_path, 1), 1, judge_server.url)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"judge cache {run_dir / 'judge_cache.sqlite'} is not a usable SQLite cache" in proc.stderr
    assert "delete it" in proc.stderr and judge_server.state.requests == 0


def test_cache_files_are_private(tmp_path, judge_server):
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url), tmp_path / "c.sqlite")
    client.complete(request("an answer"))
    files = list(tmp_path.glob("c.sqlite*"))
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    client.close()


def test_server_admin_needs_its_key(judge_server):
    def call(path, key=None, body=None):
        req = urllib.request.Request(judge_server.url.rsplit("/v1", 1)[0] + path, method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert call("/admin/settings", body={"fail_first": 5}) == 401
    assert call("/admin/settings", key="guess", body={"fail_first": 5}) == 401
    assert call("/stats") == 401
    assert judge_server.state.fail_first == 0
    assert call("/admin/settings", key=judge_server.state.admin_key, body={"fail_first": 5}) == 200
    assert judge_server.state.fail_first == 5 and call("/stats", key=judge_server.state.admin_key) == 200


def test_a_lapsed_claim_of_another_machine_is_taken_over(judge_server, tmp_path):
    """A run on another machine that died leaves a claim: it stops blocking once its lease lapses."""
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url), tmp_path / "c.sqlite")
    key = request("an answer").cache_key(client.endpoint.identity())
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("INSERT INTO claims VALUES (?, ?, ?)", (key, "another-host:1:x", time.time() + 1.0))
    start = time.monotonic()
    assert not client.complete(request("an answer")).failed
    assert 1.0 <= time.monotonic() - start < 10 and judge_server.state.answered == 1
    client.close()


def test_reported_model_is_what_the_server_named(judge_server, tmp_path):
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url), tmp_path / "c.sqlite")
    assert client.reported_model() is None
    client.complete(request("an answer"))
    # the rule server names itself (a real server names the model that answered), not the requested "gpt-4"
    from eval_suite.judge.server import rule_judge

    assert client.reported_model() == rule_judge.served_name != "gpt-4"
    again = JudgeClient(JudgeEndpoint(base_url=judge_server.url), tmp_path / "c.sqlite")
    again.complete(request("an answer"))  # from the cache: the name was kept with the answer
    assert again.cache_hits == 1 and again.reported_model() == rule_judge.served_name


def test_an_endless_answer_stops_at_the_cap_and_the_deadline(judge_server, tmp_path):
    """Used to read and cache a 120 MB answer, and to keep downloading after the deadline."""
    import threading

    judge_server.state.malformed_first, judge_server.state.malformed_kind = 100, "oversized"
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, max_reply_bytes=2**20, parse_retries=0),
                         tmp_path / "c.sqlite")
    reply = client.complete(request("an answer"))
    assert reply.failed and "larger than 1048576 bytes" in reply.error
    assert cached_rows(tmp_path / "c.sqlite") == 0 and client.failures == 1

    # A trickled answer: once the deadline has passed, the reading thread stops too.
    judge_server.state.malformed_first, judge_server.state.trickle_seconds = 0, 30
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, timeout_seconds=1.0, max_retries=0))
    before = threading.active_count()
    with pytest.raises(JudgeError, match="no complete answer within 1 s"):
        client.complete(request("an answer"))
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= before  # the reader is gone within a read's wait, not after 30 s


def test_logprobs_that_are_not_an_object_are_a_failed_answer():
    from eval_suite.judge.client import _reply_from

    base = {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "m"}}]}
    for logprobs in ("x", [1, 2], {"content": "x"}, {"content": [3]}):
        body = json.dumps({**base, "choices": [{**base["choices"][0], "logprobs": logprobs}]}).encode()
        reply = _reply_from(body, want_logprobs=True)
        assert reply.failed and "logprobs is not an object" in reply.error, logprobs
    good = {"content": [{"token": "m", "logprob": -0.1, "top_logprobs": [{"token": "m", "logprob": -0.1}]}]}
    body = json.dumps({**base, "choices": [{**base["choices"][0], "logprobs": good}]}).encode()
    assert _reply_from(body, want_logprobs=True).logprobs == good


@pytest.mark.parametrize("payload", [b"{not json", b"[1]", json.dumps({"model": "m", "messages": "hi"}).encode(),
                                     json.dumps({"model": "m", "messages": [{"role": "user", "content": 3}]}).encode()])
def test_the_test_server_answers_a_malformed_request_with_400(judge_server, payload):
    """It used to close the connection without an answer."""
    req = urllib.request.Request(judge_server.url + "/chat/completions", data=payload,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    assert "message" in json.loads(err.value.read())["error"]


def test_a_cache_path_that_is_a_directory_is_one_sentence(tmp_path, judge_server):
    from eval_suite.judge import JudgeCacheError

    with pytest.raises(JudgeCacheError, match="is a directory; give --judge-cache a file path"):
        JudgeClient(JudgeEndpoint(base_url=judge_server.url), tmp_path)
