"""The one judge client behind AlpacaEval and MT-Bench.

It speaks the OpenAI chat-completions protocol (OpenAI itself, or any compatible server such as
``vllm serve`` or :mod:`eval_suite.judge.server`), retries transient failures with exponential
backoff, limits concurrency, and keeps every answer in a persistent SQLite cache keyed by
(judge model, request). An interrupted run that is started again asks the judge only what it has
not answered yet, so no paid call is repeated.

The API key is read from an environment variable at construction and handed to the HTTP client;
it is never part of a cache key, a cache row, a log line or a results file.

Example:
    >>> client = JudgeClient(JudgeEndpoint(base_url="http://127.0.0.1:8000/v1"), cache_path="run/judge_cache.sqlite")  # doctest: +SKIP
    >>> client.complete(JudgeRequest(model="gpt-4", messages=[{"role": "user", "content": "Rate: [[5]]"}])).text  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# HTTP statuses worth retrying: rate limits and server-side failures. Anything else (bad request,
# bad key, unknown model) will not get better by waiting.
RETRYABLE_ERRORS = (openai.RateLimitError, openai.APIConnectionError, openai.APITimeoutError,
                    openai.InternalServerError, openai.ConflictError)


class JudgeEndpoint(BaseModel):
    """Where the judge lives and how hard to push it."""

    base_url: str | None = Field(None, description="OpenAI-compatible base URL ending in /v1; None means OpenAI.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(6, ge=0, description="Retries of a rate-limited or failed request.")
    backoff_seconds: float = Field(2.0, ge=0, description="First retry delay; doubles each retry, with jitter.")
    timeout_seconds: float = Field(300.0, gt=0, description="Per-request timeout.")


@dataclass(frozen=True)
class JudgeRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int = 2048
    temperature: float = 0.0
    logprobs: bool = False
    top_logprobs: int | None = None

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class JudgeReply:
    text: str
    logprobs: dict[str, Any] | None = None  # OpenAI's choice.logprobs, e.g. {"content": [{"token", "top_logprobs"}]}
    total_tokens: int = 0
    cached: bool = field(default=False, compare=False)


class JudgeCache:
    """(judge model, request) -> reply, in SQLite; each answer is committed as soon as it arrives."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, request TEXT, reply TEXT)")

    def get(self, request: JudgeRequest) -> JudgeReply | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (request.cache_key(),)).fetchone()
        return JudgeReply(**json.loads(row[0]), cached=True) if row else None

    def put(self, request: JudgeRequest, reply: JudgeReply) -> None:
        payload = json.dumps({"text": reply.text, "logprobs": reply.logprobs, "total_tokens": reply.total_tokens})
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                             (request.cache_key(), request.model, json.dumps(asdict(request)), payload))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JudgeClient:
    """OpenAI-compatible judge with retries, a concurrency limit and a persistent cache."""

    def __init__(self, endpoint: JudgeEndpoint, cache_path: str | Path | None = None):
        self.endpoint = endpoint
        api_key = os.environ.get(endpoint.api_key_env)
        if not api_key:
            if endpoint.base_url is None:
                raise ValueError(f"the OpenAI judge needs an API key: set the {endpoint.api_key_env} environment "
                                 "variable, or pass --judge-base-url for a local OpenAI-compatible server")
            api_key = "EMPTY"  # local servers (vLLM without --api-key, eval_suite.judge.server) accept anything
        self._secret = api_key
        self._openai = openai.OpenAI(api_key=api_key, base_url=endpoint.base_url, max_retries=0,
                                     timeout=endpoint.timeout_seconds)
        self.cache = JudgeCache(cache_path) if cache_path else None
        self.calls = 0  # requests that reached the judge (retries included)
        self.cache_hits = 0
        self._count_lock = threading.Lock()

    def complete(self, request: JudgeRequest) -> JudgeReply:
        if self.cache is not None and (reply := self.cache.get(request)) is not None:
            with self._count_lock:
                self.cache_hits += 1
            return reply
        reply = self._call_with_retries(request)
        if self.cache is not None:
            self.cache.put(request, reply)
        return reply

    def complete_many(self, requests: list[JudgeRequest], desc: str = "judging") -> list[JudgeReply]:
        """Answer all requests, ``concurrency`` at a time, in order, with a progress bar."""
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency) as pool:
            return list(tqdm(pool.map(self.complete, requests), total=len(requests), desc=desc))

    def _call_with_retries(self, request: JudgeRequest) -> JudgeReply:
        kwargs: dict[str, Any] = dict(model=request.model, messages=request.messages,
                                      max_tokens=request.max_tokens, temperature=request.temperature)
        if request.logprobs:
            kwargs.update(logprobs=True, top_logprobs=request.top_logprobs)
        for attempt in range(self.endpoint.max_retries + 1):
            with self._count_lock:
                self.calls += 1
            try:
                response = self._openai.chat.completions.create(**kwargs)
                break
            except RETRYABLE_ERRORS as e:
                if attempt == self.endpoint.max_retries:
                    raise RuntimeError(f"judge {request.model} at {self._where()} still failing after "
                                       f"{attempt + 1} attempts: {type(e).__name__}: {self._scrub(str(e))}") from None
                delay = self.endpoint.backoff_seconds * 2**attempt * (1 + random.random())
                log.warning("judge %s: %s; retry %d/%d in %.1f s", request.model, type(e).__name__,
                            attempt + 1, self.endpoint.max_retries, delay)
                time.sleep(delay)
            except openai.APIStatusError as e:
                raise RuntimeError(f"judge {request.model} at {self._where()} refused the request "
                                   f"(HTTP {e.status_code}): {self._scrub(e.message)}") from None
        choice = response.choices[0]
        logprobs = choice.logprobs.model_dump() if request.logprobs and choice.logprobs else None
        usage = response.usage.total_tokens if response.usage else 0
        return JudgeReply(text=choice.message.content or "", logprobs=logprobs, total_tokens=usage)

    def _scrub(self, message: str) -> str:
        """Servers may echo the key back in an error message; never pass it on."""
        return message.replace(self._secret, "***") if self._secret != "EMPTY" else message

    def _where(self) -> str:
        return self.endpoint.base_url or "api.openai.com"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self._openai.close()
