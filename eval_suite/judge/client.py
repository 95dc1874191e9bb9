"""The one judge client behind AlpacaEval and MT-Bench.

It speaks the OpenAI chat-completions protocol (OpenAI itself, or any compatible server such as
``vllm serve`` or :mod:`eval_suite.judge.server`), retries transient failures with exponential
backoff (honouring ``Retry-After``), bounds each request by a total deadline, limits concurrency,
and keeps every answer in a persistent SQLite cache keyed by (judge endpoint, the model that
answered as the server named it in that answer, request: model, messages, decoding settings). A
cached answer is used only while the same model answers: before the first cached answer of a run is
used, one 1-token probe asks the server which model answers now (``preflight`` does it for
``eval-suite all``), so another model behind the same URL and name is asked again, never handed the
old judge's scores. An answer is cached only once the caller's parser accepts it; an
answer that never parses (an HTML page, no choices, no message, a rating off the scale) is asked
again a bounded number of times, then returned as a failed reply that the benchmark counts. An
interrupted run that is started again asks the judge only what it has not answered yet, and runs
sharing one cache claim each request first, so no paid call is repeated.

The API key is read from an environment variable at construction and handed to the HTTP client;
it is never part of a cache key, a cache row, a log line or a results file.

Example:
    >>> client = JudgeClient(JudgeEndpoint(base_url="http://127.0.0.1:8000/v1"), cache_path="run/judge_cache.sqlite")  # doctest: +SKIP
    >>> client.complete(JudgeRequest(model="gpt-4", messages=[{"role": "user", "content": "Rate: [[5]]"}])).text  # doctest: +SKIP
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

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
    parse_retries: int = Field(2, ge=0, description="Times an answer the parser rejects is asked again.")
    backoff_seconds: float = Field(2.0, ge=0, description="First retry delay; doubles each retry, with jitter.")
    max_backoff_seconds: float = Field(120.0, ge=0, description="Cap on one retry delay, Retry-After included.")
    timeout_seconds: float = Field(300.0, gt=0, description="Deadline of one HTTP request, start to last byte.")
    max_reply_bytes: int = Field(4 * 2**20, gt=0, description="Largest answer body read; a longer one is a failed "
                                 "answer (a judgment with logprobs is a few KB).")

    def identity(self) -> str:
        """The judge as the cache keys it: scheme, host, port and path of the base URL."""
        url = urlsplit(self.base_url or "https://api.openai.com/v1")
        port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        return f"{url.scheme}://{(url.hostname or '').lower()}:{port}{url.path.rstrip('/')}"


@dataclass(frozen=True)
class JudgeRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int = 2048
    temperature: float = 0.0
    logprobs: bool = False
    top_logprobs: int | None = None

    def cache_key(self, judge: str = "") -> str:
        """Hash of the judge endpoint (``JudgeEndpoint.identity``) and everything sent: model, prompt, decoding."""
        return hashlib.sha256(json.dumps({"judge": judge, **asdict(self)}, sort_keys=True).encode()).hexdigest()


@dataclass
class JudgeReply:
    text: str
    logprobs: dict[str, Any] | None = None  # OpenAI's choice.logprobs, e.g. {"content": [{"token", "top_logprobs"}]}
    total_tokens: int = 0
    cached: bool = field(default=False, compare=False)
    model: str | None = None  # the model the server says answered
    error: str | None = None  # set on a failed reply: why no usable answer came back

    @property
    def failed(self) -> bool:
        return self.error is not None


# The caller's parser: raises ValueError (or any exception) when a reply is unusable.
ReplyParser = Callable[[JudgeReply], Any]


class JudgeError(RuntimeError):
    """The judge refused the request or stayed unreachable after every retry; the message says which."""


class JudgeCacheError(ValueError):
    """A cache file that SQLite cannot use; the message names the file to delete."""


PROBE_MESSAGES = [{"role": "user", "content": "Say OK."}]  # the 1-token request that asks which model answers


class JudgeCache:
    """(judge endpoint, request) x answering model -> reply, in SQLite, shared safely by threads and processes.

    Rows live in table ``answers``; the ``replies`` table of older versions (keyed without the
    answering model) is never read, so their answers are asked for again once.

    Each answer is committed as soon as it is accepted. ``claim`` lets concurrent runs on one
    file agree on who asks the judge: the first run to claim a request asks, the others wait for
    its answer. A claim is a lease the owner renews while it runs; others take over when it lapses
    (the owner died on another machine) or at once when the owner was a process of this machine
    that is gone (killed). The file is private (0600).
    """

    def __init__(self, path: str | Path, lease_seconds: float = 30.0):
        self.path = Path(path)
        if self.path.is_dir():
            raise JudgeCacheError(f"judge cache {self.path} is a directory; give --judge-cache a file path "
                                  f"(e.g. {self.path / 'judge_cache.sqlite'})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # SQLite gives -wal/-shm the same mode
        os.chmod(self.path, 0o600)
        self.lease_seconds = lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._closed = threading.Event()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (request_key TEXT, answering TEXT, model TEXT, "
                             "request TEXT, reply TEXT, PRIMARY KEY (request_key, answering))")
            self._db.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT, expires REAL)")
            self._db.execute("SELECT request_key, reply FROM answers LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise self._unusable(e) from None
        threading.Thread(target=self._renew_leases, daemon=True).start()

    def _renew_leases(self) -> None:
        while not self._closed.wait(self.lease_seconds / 3):
            try:
                self._query("UPDATE claims SET expires = ? WHERE owner = ?", (time.time() + self.lease_seconds, self.owner))
            except (JudgeCacheError, sqlite3.ProgrammingError):  # closed meanwhile
                return

    @staticmethod
    def _owner_gone(owner: str) -> bool:
        """True when ``owner`` was a process of this machine that no longer runs."""
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _unusable(self, e: Exception) -> JudgeCacheError:
        return JudgeCacheError(f"judge cache {self.path} is not a usable SQLite cache ({e}); delete it (and any "
                               f"{self.path.name}-wal / -shm beside it) and run again: the judge is asked again")

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise self._unusable(e) from None

    def has(self, key: str) -> bool:
        """Whether any model's answer to the request ``key`` is stored."""
        return bool(self._query("SELECT 1 FROM answers WHERE request_key = ? LIMIT 1", (key,)))

    def get(self, key: str, answering: str) -> JudgeReply | None:
        """The answer ``answering`` gave to the request ``key``, or None."""
        rows = self._query("SELECT reply FROM answers WHERE request_key = ? AND answering = ?", (key, answering))
        if not rows:
            return None
        try:
            return JudgeReply(**json.loads(rows[0][0]), cached=True)
        except (TypeError, ValueError, RecursionError) as e:
            raise self._unusable(e) from None

    def put(self, key: str, answering: str, request: JudgeRequest, reply: JudgeReply) -> None:
        payload = json.dumps({"text": reply.text, "logprobs": reply.logprobs, "total_tokens": reply.total_tokens,
                              "model": reply.model})
        self._query("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                    (key, answering, request.model, json.dumps(asdict(request)), payload))

    def claim(self, key: str) -> bool:
        """True when this client may ask the judge for ``key`` (no live claim by another client)."""
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute("SELECT owner, expires FROM claims WHERE key = ?", (key,)).fetchone()
                    mine = row is None or row[0] == self.owner or row[1] < now or self._owner_gone(row[0])
                    if mine:
                        self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)",
                                         (key, self.owner, now + self.lease_seconds))
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise self._unusable(e) from None
        return mine

    def release(self, key: str) -> None:
        self._query("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM answers")[0][0]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            try:
                self._db.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
            except sqlite3.DatabaseError:
                pass  # nothing to give back in a file SQLite cannot use
            self._db.close()


class JudgeClient:
    """OpenAI-compatible judge with retries, a deadline, a concurrency limit and a persistent cache."""

    def __init__(self, endpoint: JudgeEndpoint, cache_path: str | Path | None = None):
        self.endpoint = endpoint
        api_key = os.environ.get(endpoint.api_key_env)
        if not api_key:
            if endpoint.base_url is None:
                raise ValueError(f"the OpenAI judge needs an API key: set the {endpoint.api_key_env} environment "
                                 "variable, or pass --judge-base-url for a local OpenAI-compatible server")
            api_key = "EMPTY"  # local servers (vLLM without --api-key, eval_suite.judge.server) accept anything
        self._secret = api_key
        # The read timeout is the whole deadline: a stalled server is given up on by then; a trickling
        # one is cut off by the deadline in _call_once.
        self._openai = openai.OpenAI(api_key=api_key, base_url=endpoint.base_url, max_retries=0,
                                     timeout=endpoint.timeout_seconds)
        self.cache = JudgeCache(cache_path) if cache_path else None
        self.calls = 0  # requests that reached the judge (retries included)
        self.cache_hits = 0
        self.failures = 0  # requests that ended without a usable answer
        self.reported_models: set[str] = set()  # the model names the server put in its answers
        self.probes = 0  # 1-token requests asking which model answers (not judge calls)
        self._answering: dict[str, str] = {}  # requested model -> the model that answers it now
        self._count_lock = threading.Lock()
        self._probe_lock = threading.Lock()

    def reported_model(self) -> str | None:
        """The judge model as the server named it in its answers (several names joined by ', ')."""
        return ", ".join(sorted(self.reported_models)) or None

    def answering(self, requested: str) -> str:
        """The model that answers requests for ``requested`` now: learned from live answers, else probed."""
        with self._probe_lock:
            if requested not in self._answering:
                reply = self._call_with_retries(JudgeRequest(model=requested, messages=PROBE_MESSAGES, max_tokens=1),
                                                count=False)
                with self._count_lock:
                    self.probes += 1
                self._answering[requested] = reply.model or requested
            return self._answering[requested]

    def expect(self, requested: str, answering: str | None) -> None:
        """Record what a probe made elsewhere (preflight) found answering ``requested``."""
        with self._probe_lock:
            self._answering[requested] = answering or requested

    def complete(self, request: JudgeRequest, parse: ReplyParser | None = None) -> JudgeReply:
        """The judge's answer to ``request``: from the cache, or asked and cached once ``parse`` accepts it.

        Args:
            request: what to send.
            parse: the benchmark's parser; it raises on an unusable reply. Without it any reply is usable.

        Returns:
            The reply; ``reply.failed`` when no usable answer came within the retries (counted in
            ``failures``, never cached).

        Raises:
            JudgeError: the judge refuses the request (bad key, unknown model) or is unreachable
                after ``max_retries`` retries.
            JudgeCacheError: the cache file is unusable.
        """
        key = request.cache_key(self.endpoint.identity())
        if self.cache is not None:
            reply = self._cached_or_claim(key, request.model, parse)
            if reply is not None:
                return reply
        try:
            reply = self._ask(request, parse)
            if not reply.failed:
                answering = reply.model or request.model
                with self._probe_lock:
                    if self._answering.get(request.model, answering) != answering:
                        log.warning("judge: requests for %s are now answered by %s, not %s", request.model, answering,
                                    self._answering[request.model])
                    self._answering[request.model] = answering
                if self.cache is not None:
                    self.cache.put(key, answering, request, reply)
        finally:
            if self.cache is not None:
                self.cache.release(key)
        with self._count_lock:
            if reply.failed:
                self.failures += 1
            elif reply.model:
                self.reported_models.add(reply.model)
        return reply

    def _cached_or_claim(self, key: str, requested: str, parse: ReplyParser | None) -> JudgeReply | None:
        """A usable cached reply of the model that answers now, or None once this client holds the claim to ask."""
        while True:
            reply = self._cached(key, requested, parse)
            if reply is not None:
                return reply
            if self.cache.claim(key):
                # The run that held the claim may have cached its answer just before letting go.
                reply = self._cached(key, requested, parse)
                if reply is not None:
                    self.cache.release(key)
                    return reply
                return None
            time.sleep(0.05 + 0.05 * random.random())  # another run is asking: wait for its answer

    def _cached(self, key: str, requested: str, parse: ReplyParser | None) -> JudgeReply | None:
        if not self.cache.has(key):  # nothing stored: no need to ask which model answers
            return None
        reply = self.cache.get(key, self.answering(requested))
        if reply is None:
            return None
        problem = reply.error or _usable(reply, parse)
        if problem:  # a row the client never writes (a failure, or an answer the parser rejects): ask again
            log.warning("judge cache %s: a stored answer is unusable (%s); asking the judge again", self.cache.path,
                        str(problem)[:200])
            return None
        with self._count_lock:
            self.cache_hits += 1
            if reply.model:
                self.reported_models.add(reply.model)
        return reply

    def _ask(self, request: JudgeRequest, parse: ReplyParser | None) -> JudgeReply:
        problem = ""
        for attempt in range(self.endpoint.parse_retries + 1):
            reply = self._call_with_retries(request)
            problem = reply.error or _usable(reply, parse) or ""
            if not problem:
                return reply
            log.warning("judge %s: unusable answer (%s); %s", request.model, problem,
                        f"asking again ({attempt + 1}/{self.endpoint.parse_retries})"
                        if attempt < self.endpoint.parse_retries else "recorded as a failure")
        return JudgeReply(text="", error=f"no usable answer after {self.endpoint.parse_retries + 1} tries: {problem}")

    def complete_many(self, requests: list[JudgeRequest], desc: str = "judging",
                      parse: ReplyParser | None = None) -> list[JudgeReply]:
        """Answer all requests, ``concurrency`` at a time, in order, with a progress bar."""
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency) as pool:
            return list(tqdm(pool.map(lambda r: self.complete(r, parse), requests), total=len(requests), desc=desc))

    def _call_with_retries(self, request: JudgeRequest, count: bool = True) -> JudgeReply:
        """One answer from the server (retrying transport failures), possibly malformed (``error`` set)."""
        kwargs: dict[str, Any] = dict(model=request.model, messages=request.messages,
                                      max_tokens=request.max_tokens, temperature=request.temperature)
        if request.logprobs:
            kwargs.update(logprobs=True, top_logprobs=request.top_logprobs)
        for attempt in range(self.endpoint.max_retries + 1):
            with self._count_lock:
                self.calls += count
            try:
                return self._call_once(kwargs)
            except (*RETRYABLE_ERRORS, _DeadlineExceeded) as e:
                if attempt == self.endpoint.max_retries:
                    raise JudgeError(f"judge {request.model} at {self._where()} still failing after "
                                       f"{attempt + 1} attempts: {type(e).__name__}: {self._scrub(str(e))}") from None
                delay = self.endpoint.backoff_seconds * 2**attempt * (1 + random.random())
                server_delay = _retry_after(e)
                if server_delay is not None:
                    delay = server_delay
                delay = min(delay, self.endpoint.max_backoff_seconds)
                log.warning("judge %s: %s; retry %d/%d in %.1f s%s", request.model, type(e).__name__,
                            attempt + 1, self.endpoint.max_retries, delay,
                            " (Retry-After)" if server_delay is not None else "")
                time.sleep(delay)
            except openai.APIStatusError as e:
                raise JudgeError(f"judge {request.model} at {self._where()} refused the request "
                                   f"(HTTP {e.status_code}): {self._scrub(e.message)}") from None
        raise AssertionError("unreachable")

    def _call_once(self, kwargs: dict[str, Any]) -> JudgeReply:
        """One HTTP request, given up after ``timeout_seconds`` in all (not per read).

        The body is read in pieces, at most ``max_reply_bytes`` of it, and reading stops at the
        deadline: a trickling or endless answer neither outlives the deadline nor fills memory. The
        request runs on a daemon thread, so a read that blocks is left behind at the deadline (its
        read timeout ends it) and counts as a timed-out attempt.
        """
        outcome: dict[str, Any] = {}
        deadline = time.monotonic() + self.endpoint.timeout_seconds
        cap = self.endpoint.max_reply_bytes

        def call():
            try:
                with self._openai.chat.completions.with_streaming_response.create(**kwargs) as response:
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > cap:
                            outcome["reply"] = JudgeReply(text="", error=f"the answer is larger than {cap} bytes "
                                                                         "(--judge-max-reply-bytes)")
                            return
                        if time.monotonic() > deadline:
                            return  # the caller has given up: stop reading
                outcome["reply"] = _reply_from(bytes(body), bool(kwargs.get("logprobs")))
            except BaseException as e:  # handed to the caller
                outcome["error"] = e

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive() or not outcome:
            raise _DeadlineExceeded(f"no complete answer within {self.endpoint.timeout_seconds:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["reply"]

    def _scrub(self, message: str) -> str:
        """Servers may echo the key back in an error message; never pass it on."""
        return message.replace(self._secret, "***") if self._secret != "EMPTY" else message

    def _where(self) -> str:
        return self.endpoint.base_url or "api.openai.com"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self._openai.close()


class _DeadlineExceeded(Exception):
    """A request that did not finish within the endpoint's deadline."""


def _reply_from(body: bytes, want_logprobs: bool) -> JudgeReply:
    """A reply from a chat-completions body; a malformed one becomes a reply with ``error`` set."""
    try:
        response = json.loads(body)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past the parser's depth
        return JudgeReply(text="", error=f"not a chat completion ({type(e).__name__}: {body[:80]!r})")
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list):
        return JudgeReply(text="", error=f"not a chat completion ({type(response).__name__}: {str(response)[:80]!r})")
    if not choices:
        return JudgeReply(text="", error="the answer has no choices")
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        return JudgeReply(text="", error="the answer has no message content")
    logprobs = choice.get("logprobs") if want_logprobs else None
    if logprobs is not None and not (isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list)
                                     and all(isinstance(t, dict) for t in logprobs["content"])):
        return JudgeReply(text="", error=f"logprobs is not an object with a content list ({str(logprobs)[:80]!r})")
    usage = response.get("usage")
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    model = response.get("model")
    return JudgeReply(text=message["content"], logprobs=logprobs,
                      total_tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0,
                      model=model if isinstance(model, str) else None)


def _usable(reply: JudgeReply, parse: ReplyParser | None) -> str | None:
    """None when ``parse`` accepts the reply, else why not."""
    if parse is None:
        return None
    try:
        parse(reply)
    except Exception as e:  # the parser's own error says what was wrong
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def _retry_after(error: Exception) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date; ``retry-after-ms``)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None
