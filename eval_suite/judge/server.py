"""A small OpenAI-compatible judge server: rule-based for tests and demos, or a local HF model.

``python -m eval_suite judge-server --backend rule`` answers every judge prompt this suite sends in
the format the prompt asks for, deterministically and in milliseconds, by preferring the longer
answer:

- AlpacaEval 1.0 ranking prompts (``alpaca_eval_gpt4``): a Python list of ``{'model', 'rank'}``;
- AlpacaEval 2.0 classifier prompts (``weighted_alpaca_eval_gpt4_turbo``): ``m`` or ``M`` with ``top_logprobs``;
- MT-Bench single-answer grading: ``Rating: [[k]]``; pairwise: ``[[A]]`` / ``[[B]]``.

It is *not* a judge of quality; it exists so the real client stacks (openai, alpaca_eval's parsers,
FastChat's prompts and regexes) run end to end offline. ``--backend hf --model DIR`` puts a local
causal LM behind the same endpoint (chat template, greedy or sampled, ``top_logprobs`` from the
first step), for a real model on a GPU box; for serious judging prefer ``vllm serve``.

For tests it also counts requests (``GET /stats``) and can inject faults (``POST /admin/settings``):
HTTP 500s, 429s with a ``Retry-After``, malformed answers (an HTML page, no choices, a null message,
a rating off the scale, no rating), a slow start, an answer trickled byte by byte, or no answer at
all; that is how the tests prove retries, deadlines and "no judge call is repeated". Both endpoints
need the server's key (``--api-key-env``) as ``Authorization: Bearer``; without one they are
closed to HTTP clients (in-process tests set ``server.state`` directly).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from eval_suite.judge.client import PROBE_MESSAGES

log = logging.getLogger(__name__)

# (pattern that identifies the prompt, pattern that captures each answer in it)
AE1_RANKING = (re.compile(r"'rank'"), re.compile(r'"answer": """(.*?)"""\n', re.S))
AE2_CLASSIFIER = (re.compile(r'"model_identifier": "M"'), re.compile(r'"output": """(.*?)"""\n', re.S))
MT_SINGLE = re.compile(r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.S)
MT_MULTI_TURN = re.compile(r"### Assistant A:\n(.*?)\n\n(?:### User|<\|The End)", re.S)
MT_PAIR = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


@dataclass
class Completion:
    text: str
    top_logprobs: list[tuple[str, float]] = field(default_factory=list)  # for the first token


def rule_judge(messages: list[dict[str, Any]], max_tokens: int, temperature: float) -> Completion:
    """Answer a judge prompt in the format it asks for, preferring the longer answer."""
    prompt = "\n".join(str(m.get("content", "")) for m in messages)
    if AE2_CLASSIFIER[0].search(prompt):
        first, second = _two(AE2_CLASSIFIER[1].findall(prompt))
        best, other = ("m", "M") if len(first) >= len(second) else ("M", "m")
        return Completion(best, [(best, math.log(0.8)), (other, math.log(0.2))])
    if AE1_RANKING[0].search(prompt):
        first, second = _two(AE1_RANKING[1].findall(prompt))
        best, other = ("model_1", "model_2") if len(first) >= len(second) else ("model_2", "model_1")
        return Completion(f"[{{'model': '{best}', 'rank': 1}}, {{'model': '{other}', 'rank': 2}}]")
    if "[[A]]" in prompt:
        answers = dict(MT_PAIR.findall(prompt)) or dict(zip("AB", MT_MULTI_TURN.findall(prompt)[-2:]))
        a, b = len(answers.get("A", "")), len(answers.get("B", ""))
        return Completion("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")
    if "[[rating]]" in prompt:
        answers = MT_SINGLE.findall(prompt) or MT_MULTI_TURN.findall(prompt)
        words = len(answers[-1].split()) if answers else 0
        return Completion(f"The answer has {words} words. Rating: [[{min(10, 1 + words // 5)}]]")
    return Completion("OK")



rule_judge.served_name = "eval-suite-rule-judge"  # reported as the answering model: results show a rule judge

def _two(found: list[str]) -> tuple[str, str]:
    return (found + ["", ""])[0], (found + ["", ""])[1]


class HFJudge:
    """A local causal LM behind the endpoint (one request at a time)."""

    def __init__(self, model_dir: str, max_new_tokens: int = 256):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float) -> Completion:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        with self.lock, self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=min(max_tokens, self.max_new_tokens),
                                      output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **sampling)
        new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
        first = self.torch.log_softmax(out.scores[0][0].float(), dim=-1).topk(5)
        top = [(self.tokenizer.decode([i]), float(v)) for v, i in zip(first.values, first.indices)]
        return Completion(self.tokenizer.decode(new_tokens, skip_special_tokens=True), top)


@dataclass
class ServerState:
    """Counters and fault injection, shared by all request threads."""

    api_key: str | None = None
    delay_seconds: float = 0.0  # wait this long before answering (a stalled judge)
    fail_first: int = 0  # answer the first N requests with HTTP 500
    rate_limit_first: int = 0  # then the next N with HTTP 429
    retry_after: str | None = None  # the Retry-After header of those 429s (seconds or an HTTP date)
    malformed_first: int = 0  # then answer the next N with a malformed answer of this kind:
    malformed_kind: str = "html"  # one of MALFORMED
    trickle_seconds: float = 0.0  # send each answer's body byte by byte over this long
    hang_after: int | None = None  # stop answering once this many requests were let through
    requests: int = 0
    probes: int = 0  # 1-token "which model answers?" probes (answered, but not judge calls)
    failed: int = 0
    malformed: int = 0
    answered: int = 0
    admitted: int = 0
    in_flight: int = 0
    max_in_flight: int = 0  # most requests being answered at once (checks a client's concurrency limit)
    answered_by_request: dict[str, int] = field(default_factory=dict)
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))  # for /admin when api_key is unset
    cond: threading.Condition = field(default_factory=threading.Condition)

    SETTINGS = ("delay_seconds", "fail_first", "rate_limit_first", "retry_after", "malformed_first",
                "malformed_kind", "trickle_seconds", "hang_after")

    def stats(self) -> dict[str, Any]:
        with self.cond:
            counts = self.answered_by_request.values()
            return {"requests": self.requests, "failed": self.failed, "malformed": self.malformed,
                    "answered": self.answered, "probes": self.probes,
                    "distinct_requests": len(counts), "repeated_answers": sum(c - 1 for c in counts),
                    "max_in_flight": self.max_in_flight}


# Malformed answers, each with HTTP 200: what a proxy, an overloaded server or a confused model sends.
MALFORMED: dict[str, Callable[[dict[str, Any]], tuple[str, bytes]]] = {
    "html": lambda body: ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "empty_choices": lambda body: ("application/json", json.dumps(
        {**_response(body, Completion("")), "choices": []}).encode()),
    "null_message": lambda body: ("application/json", json.dumps(
        {**_response(body, Completion("")), "choices": [{"index": 0, "finish_reason": "stop", "message": None}]}).encode()),
    "huge_rating": lambda body: ("application/json", json.dumps(_response(body, Completion(
        "Rating: [[100]]" if "[[rating]]" in json.dumps(body["messages"]) else "[{'model': 'model_3', 'rank': 7}]",
        [("x", 0.0)]))).encode()),
    "no_rating": lambda body: ("application/json", json.dumps(_response(body, Completion(
        "I cannot judge this.", [("x", 0.0)]))).encode()),
    # JSON nested past any parser's depth, JSON that is not an object, and an answer of 5 MiB.
    "deep_json": lambda body: ("application/json", b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "json_list": lambda body: ("application/json", b"[1, 2, 3]"),
    "oversized": lambda body: ("application/json", json.dumps(
        {**_response(body, Completion("Rating: [[5]]")), "padding": "x" * 5 * 2**20}).encode()),
}


def make_handler(judge: Callable[..., Completion], state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep test output quiet; never logs headers
            log.debug("judge server: " + fmt, *args)

        def _admin_allowed(self) -> bool:
            key = state.api_key or state.admin_key
            given = self.headers.get("Authorization") or ""
            return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

        def do_GET(self):
            if self.path == "/stats":
                if not self._admin_allowed():
                    return self._send(401, {"error": {"message": "GET /stats needs the server's key"}})
                return self._send(200, state.stats())
            if self.path.rstrip("/").endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) or b"{}")
            except (ValueError, RecursionError) as e:
                return self._send(400, {"error": {"message": f"the request body is not JSON ({type(e).__name__})",
                                                  "type": "invalid_request_error"}})
            if not isinstance(body, dict):
                return self._send(400, {"error": {"message": "the request body must be a JSON object",
                                                  "type": "invalid_request_error"}})
            if self.path.startswith("/admin/"):
                if not self._admin_allowed():
                    return self._send(401, {"error": {"message": "admin endpoints need the server's key"}})
                if self.path != "/admin/settings":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with state.cond:
                    for key in ServerState.SETTINGS:
                        if key in body:
                            setattr(state, key, body[key])
                    state.cond.notify_all()
                return self._send(200, state.stats())
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            messages = body.get("messages")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
                return self._send(400, {"error": {"message": "messages must be a non-empty list of {role, content} "
                                                             "objects with string content",
                                                  "type": "invalid_request_error"}})
            with state.cond:
                state.requests += 1
                n = state.requests
                if n <= state.fail_first + state.rate_limit_first:
                    state.failed += 1
                    code = 500 if n <= state.fail_first else 429
                    headers = {"Retry-After": state.retry_after} if code == 429 and state.retry_after else {}
                    return self._send(code, {"error": {"message": "injected failure", "type": "server_error"}}, headers)
                if n <= state.fail_first + state.rate_limit_first + state.malformed_first:
                    state.malformed += 1
                    content_type, data = MALFORMED[state.malformed_kind](body)
                    return self._send_bytes(200, content_type, data)
                # Admission is counted, not answers: two requests waiting at once must not both slip through.
                state.cond.wait_for(lambda: state.hang_after is None or state.admitted < state.hang_after)
                state.admitted += 1
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            time.sleep(state.delay_seconds)
            completion = judge(body["messages"], body.get("max_tokens") or 2048, body.get("temperature") or 0.0)
            key = hashlib.sha256(json.dumps([body.get("model"), body["messages"]], sort_keys=True).encode()).hexdigest()
            self._send(200, _response(body, completion, getattr(judge, "served_name", None)), trickle_seconds=state.trickle_seconds)
            with state.cond:
                state.in_flight -= 1
                state.answered += 1
                if body.get("max_tokens") == 1 and body["messages"] == PROBE_MESSAGES:
                    state.probes += 1  # not a judge call: kept out of the per-request counts
                else:
                    state.answered_by_request[key] = state.answered_by_request.get(key, 0) + 1
                state.cond.notify_all()

        def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None,
                  trickle_seconds: float = 0.0) -> None:
            self._send_bytes(code, "application/json", json.dumps(payload).encode(), headers, trickle_seconds)

        def _send_bytes(self, code: int, content_type: str, data: bytes, headers: dict[str, str] | None = None,
                        trickle_seconds: float = 0.0) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if not trickle_seconds:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):  # a judge that keeps every read alive but never finishes in time
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(trickle_seconds / len(data))
            except OSError:  # the client gave up (its deadline passed)
                self.close_connection = True

    return Handler


def _response(body: dict[str, Any], completion: Completion, served_name: str | None = None) -> dict[str, Any]:
    logprobs = None
    if body.get("logprobs"):
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in
               completion.top_logprobs[: body.get("top_logprobs") or 1]]
        first = top[0] if top else {"token": completion.text[:1], "logprob": 0.0, "bytes": []}
        logprobs = {"content": [{**first, "top_logprobs": top}]}
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    completion_tokens = len(completion.text.split())
    return {
        "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
        "model": served_name or body.get("model", "judge"),  # what answered, as real servers report it
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                     "message": {"role": "assistant", "content": completion.text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class JudgeServer:
    """The server on a background thread; ``url`` is the base URL to give the judge client."""

    def __init__(self, judge: Callable[..., Completion] = rule_judge, host: str = "127.0.0.1", port: int = 0,
                 state: ServerState | None = None):
        self.state = state or ServerState()
        self.httpd = ThreadingHTTPServer((host, port), make_handler(judge, self.state))
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.state.cond:  # release any request held by hang_after
            self.state.hang_after = None
            self.state.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["rule", "hf"], default="rule", help="rule-based judge, or a local HF model")
    parser.add_argument("--model", help="model directory for --backend hf")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens (hf backend)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key-env", help="require the key held in this environment variable")


def main(args: argparse.Namespace) -> None:
    import os

    if args.backend == "hf" and not args.model:
        raise SystemExit("judge-server: --backend hf needs --model DIR")
    judge = HFJudge(args.model, args.max_new_tokens) if args.backend == "hf" else rule_judge
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    with JudgeServer(judge, args.host, args.port, ServerState(api_key=api_key)) as server:
        print(f"judge server ({args.backend}) listening on {server.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
