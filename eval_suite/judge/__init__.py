"""Judging: one OpenAI-compatible client (:mod:`.client`) and a local test/demo server (:mod:`.server`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval_suite.arguments import at_least, positive
from eval_suite.judge.client import JudgeCacheError, JudgeClient, JudgeEndpoint, JudgeError, JudgeReply, JudgeRequest

__all__ = ["JudgeCacheError", "JudgeClient", "JudgeError", "JudgeEndpoint", "JudgeReply", "JudgeRequest", "add_judge_arguments",
           "client_from_args"]

CACHE_FILE = "judge_cache.sqlite"


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The judge options shared by AlpacaEval and MT-Bench."""
    g = parser.add_argument_group("judge")
    g.add_argument("--judge-model", help="judge model name sent to the server (default: the paper's judge for "
                   "each benchmark, e.g. gpt-4)")
    g.add_argument("--judge-base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                   "(default: OpenAI)")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    g.add_argument("--judge-concurrency", type=positive(int), default=4, help="requests in flight at once")
    g.add_argument("--judge-max-retries", type=at_least(int, 0), default=6,
                   help="retries of a failed or rate-limited request (Retry-After is honoured)")
    g.add_argument("--judge-parse-retries", type=at_least(int, 0), default=2,
                   help="times an answer that does not parse is asked again before it counts as a failure")
    g.add_argument("--judge-timeout", type=positive(float), default=300.0,
                   help="seconds one judge request may take in all, first byte to last (default: %(default)s)")
    g.add_argument("--judge-max-reply-bytes", type=positive(int), default=4 * 2**20,
                   help="largest answer read; a longer one counts as a failed answer (default: %(default)s)")
    g.add_argument("--judge-cache", type=Path, help=f"cache file (default: RUN_DIR/{CACHE_FILE}), keyed by judge "
                   "URL, model, prompt, decoding settings and the model that answered; a rerun asks the judge only "
                   "what it has not answered")


def client_from_args(args: argparse.Namespace) -> JudgeClient:
    endpoint = JudgeEndpoint(base_url=args.judge_base_url, api_key_env=args.judge_api_key_env,
                             concurrency=args.judge_concurrency, max_retries=args.judge_max_retries,
                             parse_retries=args.judge_parse_retries, timeout_seconds=args.judge_timeout,
                             max_reply_bytes=args.judge_max_reply_bytes)
    return JudgeClient(endpoint, cache_path=args.judge_cache or Path(args.run_dir) / CACHE_FILE)


def judge_config(args: argparse.Namespace, model: str) -> dict:
    """What to record about the judge in a results file: the model, and the URL's scheme/host/port only
    (no key, not even its variable's value; no path or query, where some servers take a token)."""
    from eval_suite.preflight import judge_host

    return {"judge_model": model, "judge_base_url": judge_host(args.judge_base_url)}
