"""The judge client against a real HTTP server on 127.0.0.1: retries, concurrency, cache, secrets."""

from __future__ import annotations

import logging

import pytest

from eval_suite.judge import JudgeClient, JudgeEndpoint, JudgeRequest
from eval_suite.judge.server import JudgeServer, ServerState

RATING_PROMPT = ("[[rating]]\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")


def request(answer: str, model: str = "gpt-4") -> JudgeRequest:
    return JudgeRequest(model=model, messages=[{"role": "user", "content": RATING_PROMPT.format(answer=answer)}])


def test_retries_server_errors_and_rate_limits_with_backoff(judge_server, tmp_path):
    judge_server.state.fail_first, judge_server.state.rate_limit_first = 2, 1
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, backoff_seconds=0.01), tmp_path / "c.sqlite")
    reply = client.complete(request("one two three four five six"))
    assert reply.text.endswith("Rating: [[2]]")
    assert (judge_server.state.requests, judge_server.state.failed, client.calls) == (4, 3, 4)


def test_gives_up_after_max_retries(judge_server, tmp_path):
    judge_server.state.fail_first = 10
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, max_retries=2, backoff_seconds=0.01))
    with pytest.raises(RuntimeError, match="still failing after 3 attempts"):
        client.complete(request("x"))
    assert judge_server.state.requests == 3


def test_cache_answers_repeats_without_calling_the_judge(judge_server, tmp_path):
    cache = tmp_path / "cache.sqlite"
    first = JudgeClient(JudgeEndpoint(base_url=judge_server.url), cache)
    replies = first.complete_many([request(f"answer {i}") for i in range(5)])
    first.close()
    # A new client (a new process would be the same) on the same cache file, and a different judge model.
    again = JudgeClient(JudgeEndpoint(base_url=judge_server.url), cache)
    assert again.complete_many([request(f"answer {i}") for i in range(5)]) == replies
    # one 1-token probe asks which model answers now; no judge call is repeated
    assert (again.calls, again.probes, again.cache_hits, judge_server.state.answered) == (0, 1, 5, 6)
    again.complete(request("answer 0", model="another-judge"))
    assert judge_server.state.answered == 7  # the key includes the judge model


def test_concurrency_limit_holds(judge_server):
    judge_server.state.delay_seconds = 0.2
    client = JudgeClient(JudgeEndpoint(base_url=judge_server.url, concurrency=2))
    client.complete_many([request(f"a{i}") for i in range(6)])
    assert judge_server.state.max_in_flight == 2


def test_api_key_is_sent_but_never_logged_or_cached(tmp_path, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef-secret"
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with JudgeServer(state=ServerState(api_key=secret)) as server:
        client = JudgeClient(JudgeEndpoint(base_url=server.url, api_key_env="MY_JUDGE_KEY"), tmp_path / "c.sqlite")
        assert client.complete(request("some answer")).text.startswith("The answer")
        client.close()
        # a wrong key is refused, and the error names the problem without any key in it
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-wrong-key-value")
        wrong = JudgeClient(JudgeEndpoint(base_url=server.url, api_key_env="MY_JUDGE_KEY"))
        with pytest.raises(RuntimeError, match="HTTP 401") as refused:
            wrong.complete(request("other answer"))
    assert "sk-wrong-key-value" not in str(refused.value)
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text and "sk-wrong-key-value" not in caplog.text


def test_openai_judge_without_a_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        JudgeClient(JudgeEndpoint())


def test_hf_backend_serves_a_local_model(tiny_model_dir):
    """The same endpoint with a real (tiny, random) causal LM behind it: transport, not quality."""
    from eval_suite.judge.server import HFJudge

    with JudgeServer(HFJudge(str(tiny_model_dir), max_new_tokens=8)) as server:
        client = JudgeClient(JudgeEndpoint(base_url=server.url))
        reply = client.complete(JudgeRequest(model="local", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=8, logprobs=True, top_logprobs=3))
    assert isinstance(reply.text, str) and reply.total_tokens > 0
    top = reply.logprobs["content"][0]["top_logprobs"]
    assert len(top) == 3 and all(t["logprob"] <= 0 for t in top)
