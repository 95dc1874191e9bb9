"""Run untrusted Python programs (model-written code) in a sandboxed subprocess.

Each program runs in its own process tree, started through :mod:`sandbox_child`, with

- a wall-clock limit (the parent kills the whole tree) and RLIMIT_CPU,
- RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC (processes), RLIMIT_NOFILE,
- a private, empty working directory and a scrubbed environment (no API keys),
- no network.

How strong the isolation is depends on the machine, and :func:`isolation_mode` says which one is used:

``namespaces`` (running as root, Linux): a fresh network namespace (no usable interface) and mount
namespace (private tmpfs over /tmp, /var/tmp, /dev/shm); the program runs under an unprivileged uid
reserved for its worker slot, so RLIMIT_NPROC holds and root-owned files are read-only; the program is pid 1 of its own pid
namespace, so everything it started dies with it.

``basic`` (any other user): the same rlimits, process-group kill on timeout, and a Python audit hook
that refuses sockets, process creation, ctypes and writes outside the working directory. The hook
runs inside the untrusted interpreter, so code that reaches C directly can get past it; use a
container or VM when that matters.

Example:
    >>> r = run_program("assert 1 + 1 == 2")  # doctest: +SKIP
    >>> r.passed, r.status
    (True, 'passed')
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from eval_suite.humaneval import sandbox_child

log = logging.getLogger(__name__)

CHILD = Path(sandbox_child.__file__)
# uids/gids reserved for sandbox slots when running as root: one per concurrent worker, so a fork
# bomb in one slot cannot exhaust another slot's RLIMIT_NPROC.
FIRST_SLOT_UID = 61000


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program. Defaults suit HumanEval (programs run in well under a second)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 1 << 20
    max_processes: int = 16
    max_open_files: int = 64


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timeout | setup_error
    detail: str  # last line of the program's output, e.g. "AssertionError"


_mode_lock = threading.Lock()


def isolation_mode() -> str:
    """``namespaces`` when this process may create them (root on Linux and the probe works), else ``basic``."""
    # Decide once, before any worker starts: the probe itself runs a program in slot 0.
    with _mode_lock:
        return _probe_isolation_mode()


@functools.cache
def _probe_isolation_mode() -> str:
    if os.name != "posix" or os.geteuid() != 0:
        return "basic"
    probe = _run("pass", SandboxLimits(), mode="namespaces", slot=0, audit_hook=True)
    if probe.status == "setup_error":
        log.warning("sandbox: namespaces unavailable (%s); falling back to basic isolation", probe.detail)
        return "basic"
    return "namespaces"


class SlotPool:
    """Hands out worker slots (and so sandbox uids) to concurrent executions."""

    def __init__(self, n: int):
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._free.put(i)

    def run(self, program: str, limits: SandboxLimits = SandboxLimits(), **kwargs) -> ExecutionResult:
        slot = self._free.get()
        try:
            return run_program(program, limits, slot=slot, **kwargs)
        finally:
            self._free.put(slot)


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), *, slot: int = 0,
                mode: str | None = None, audit_hook: bool = True) -> ExecutionResult:
    """Run ``program`` (Python source) sandboxed; it passes if it returns normally.

    Args:
        program: the full program, e.g. HumanEval prompt + completion + tests + ``check(...)``.
        limits: resource limits.
        slot: worker slot; concurrent calls must use distinct slots (see :class:`SlotPool`).
        mode: ``namespaces`` or ``basic``; default :func:`isolation_mode`.
        audit_hook: keep the in-interpreter audit hook; turned off only by tests that check the OS layer alone.
    """
    mode = mode or isolation_mode()
    if not audit_hook and mode != "namespaces":
        raise ValueError("audit_hook=False is only allowed with namespaces isolation (the OS layer must hold)")
    return _run(program, limits, mode=mode, slot=slot, audit_hook=audit_hook)


def _run(program: str, limits: SandboxLimits, *, mode: str, slot: int, audit_hook: bool) -> ExecutionResult:
    uid = FIRST_SLOT_UID + slot if mode == "namespaces" else None
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="eval_suite_sandbox_") as tmp:
        workdir = Path(tmp, "work")
        workdir.mkdir()
        config = {"namespaces": mode == "namespaces", "workdir": str(workdir), "uid": uid, "nonce": nonce,
                  "limits": asdict(limits) | {"wall_seconds": None}, "audit_hook": audit_hook,
                  # The base interpreter, not a venv: the program gets the standard library only.
                  "interpreter": os.path.realpath(sys.executable), "interpreter_prefix": sys.base_prefix}
        with open(Path(tmp, "output"), "w+b") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CHILD), json.dumps(config)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=tmp, env={"PATH": "/usr/bin:/bin"},
            )
            timed_out = False
            try:
                proc.communicate(program.encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_tree(proc)
            out.seek(max(0, out.seek(0, os.SEEK_END) - 4096))
            tail = out.read().decode(errors="replace").strip()
    last = tail.splitlines()[-1] if tail else ""
    if timed_out:
        return ExecutionResult(False, "timeout", f"timed out after {limits.wall_seconds:g} s")
    if proc.returncode == sandbox_child.EXIT_SETUP_FAILED:
        return ExecutionResult(False, "setup_error", last)
    passed = proc.returncode == 0 and (last == nonce or not audit_hook)
    if passed:
        return ExecutionResult(True, "passed", "")
    # A signal death shows as a negative code, or as 128 + signal when relayed by the namespace launcher.
    signum = -proc.returncode if proc.returncode < 0 else proc.returncode - 128 if mode == "namespaces" else 0
    if signum in signal.valid_signals():
        last = f"killed by {signal.Signals(signum).name}"
    return ExecutionResult(False, "failed", last[-300:])


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop the program and everything it started.

    With namespaces the launcher kills the pid namespace's init on SIGTERM, and the kernel then
    kills and reaps every process in it; in basic mode the program is the process group leader.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def leftover_processes(slots: int = 1) -> list[int]:
    """Pids still running under the sandbox uids of the first ``slots`` slots (for tests and checks)."""
    uids = {str(FIRST_SLOT_UID + s) for s in range(slots)}
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if uid_line.split()[1] in uids:
                pids.append(int(d.name))
    return pids

