"""Hostile programs are contained: each is reported as a failure and leaves no trace on the host.

Where the machine allows namespaces (root on Linux) the OS layer is also tested on its own, with
the in-interpreter audit hook switched off, to show that it holds without the hook.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from eval_suite.humaneval.sandbox import SandboxLimits, isolation_mode, leftover_processes, run_program

FAST = SandboxLimits(wall_seconds=3, cpu_seconds=3)
NAMESPACES = pytest.mark.skipif(isolation_mode() != "namespaces", reason="namespaces need root on Linux")
LAYERS = [pytest.param(True, id="os+audit-hook"), pytest.param(False, id="os-layer-only", marks=NAMESPACES)]


def test_correct_and_wrong_programs():
    assert run_program("assert sum([1, 2]) == 3").passed
    wrong = run_program("assert sum([1, 2]) == 4")
    assert (wrong.passed, wrong.status, wrong.detail) == (False, "failed", "AssertionError")


def test_exiting_early_with_status_zero_is_not_a_pass():
    # `os._exit(0)` before the tests run must not count as passing them.
    result = run_program("import os\nos._exit(0)\nassert False")
    assert not result.passed


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
    if isolation_mode() == "namespaces":
        assert leftover_processes(slots=1) == []


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


def test_os_layer_only_mode_is_refused_without_namespaces():
    with pytest.raises(ValueError, match="namespaces"):
        run_program("pass", mode="basic", audit_hook=False)


def test_basic_mode_blocks_the_same_hostile_actions():
    """The fallback used when namespaces are unavailable (non-root): rlimits and the audit hook."""
    hostile = {"fork": "import os\nos.fork()", "socket": "import socket\nsocket.socket()",
               "write": f"open('/tmp/eval_suite_escape_{os.getpid()}', 'w')", "subprocess": "import subprocess\nsubprocess.run(['true'])"}
    for name, program in hostile.items():
        result = run_program(program, FAST, mode="basic")
        assert not result.passed and "sandbox:" in result.detail, (name, result)
    assert not Path(f"/tmp/eval_suite_escape_{os.getpid()}").exists()
