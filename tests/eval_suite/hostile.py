"""Hostile HumanEval completions, shared by the sandbox tests (direct and through the CLI).

Every completion is a body for HumanEval/0 (``has_close_elements(numbers, threshold) -> bool``).
"""

from __future__ import annotations

import os
import textwrap

TASK = "HumanEval/0"
CORRECT_BODY = """\
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False
"""


def body(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code), "    ")


# Each tries to be scored as passed without computing the answer. The first four are the ways the
# adversarial round forged a pass when the verdict was "exit 0 and the last line is a nonce".
FORGES = {
    "frame_walk": body("""
        import os, sys
        secrets, frame = [], sys._getframe()
        while frame is not None:
            secrets += [v for v in frame.f_locals.values() if isinstance(v, str) and len(v) == 32]
            frame = frame.f_back
        print("\\n" + "\\n".join(secrets), flush=True)
        os._exit(0)
    """),
    "proc_self_environ": body("""
        import os
        for item in open("/proc/self/environ", "rb").read().split(b"\\0"):
            if item.startswith(b"SANDBOX_NONCE="):
                print("\\n" + item.split(b"=", 1)[1].decode(), flush=True)
        os._exit(0)
    """),
    "parent_cmdline": body("""
        import json, os
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for arg in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0"):
                    if arg.startswith(b"{"):
                        print("\\n" + json.loads(arg)["nonce"], flush=True)
            except Exception:
                pass
        os._exit(0)
    """),
    "excepthook": body("""
        import os, sys
        def hook(kind, value, tb):
            secrets = []
            while tb is not None:
                frame = tb.tb_frame
                while frame is not None:
                    secrets += [v for v in frame.f_locals.values() if isinstance(v, str) and len(v) == 32]
                    frame = frame.f_back
                tb = tb.tb_next
            print("\\n" + "\\n".join(secrets), flush=True)
            os._exit(0)
        sys.excepthook = hook
        raise RuntimeError("forge")
    """),
    "always_equal": body("""
        class Anything:
            def __eq__(self, other):
                return True
            __bool__ = lambda self: True
        return Anything()
    """),
    "rigged_int_subclass": body("""
        class Yes(int):
            def __eq__(self, other):
                return True
        return Yes(1)
    """),
    "spoofed_replies": body("""
        import json, os, struct
        message = json.dumps({"return": True}).encode()
        for _ in range(200):
            os.write(4, struct.pack(">I", len(message)) + message)
        os._exit(0)
    """),
    "exit_zero": body("""
        import sys
        try:
            raise SystemExit(1)
        finally:
            sys.exit(0)
    """),
    "override_check": body("""
        import builtins, sys
        builtins.AssertionError = type("NotAnError", (Exception,), {})
        sys.modules["__main__"].check = lambda candidate: None
        return None
    """),
}

# Correct, but noisy: output after the tests and errors in destructors must not flip the verdict.
NOISY = {
    "prints_at_exit": "    import atexit\n    atexit.register(print, 'goodbye')\n" + CORRECT_BODY,
    "raising_destructor": body("""
        class Grumpy:
            def __del__(self):
                raise RuntimeError("destructor error")
        globals().setdefault("grumpy", []).append(Grumpy())
        print("chatter", flush=True)
        import sys
        print("to stderr", file=sys.stderr)
    """) + CORRECT_BODY,
    "prints_a_lot": "    print('x' * 100_000)\n" + CORRECT_BODY,
}


def unhooked(code: str, then: str = CORRECT_BODY) -> str:
    """A completion that runs ``code`` in a fresh interpreter without the audit hook.

    ``_posixsubprocess.fork_exec`` raises no audit event, so this reaches the OS layer directly (as
    the adversarial round did). The completion answers correctly only when ``code`` ran to its end,
    so a passing sample shows the hostile code really ran.
    """
    return body(f"""
        import _posixsubprocess, os, sys
        if "_hostile_status" not in globals():  # once per program, not once per test call
            errpipe_read, errpipe_write = os.pipe()
            args = [[sys.executable, "-I", "-S", "-c", {code!r}], [os.fsencode(sys.executable)], True, (), None,
                    None, -1, -1, -1, -1, -1, -1, errpipe_read, errpipe_write, True, False, -1, None, None, None, -1, None]
            try:
                pid = _posixsubprocess.fork_exec(*args, False)
            except TypeError:
                pid = _posixsubprocess.fork_exec(*args)
            os.close(errpipe_write)
            globals()["_hostile_status"] = os.waitpid(pid, 0)[1]
        if globals()["_hostile_status"] != 0:
            return None
    """) + then


def marker() -> str:
    return f"eval_suite_hostile_{os.getpid()}_{os.urandom(4).hex()}"


def leaks(mark: str, ipc_key: int) -> str:
    """Hostile code (to run unhooked) that tries to leave files, IPC objects and processes behind."""
    return textwrap.dedent(f"""
        import ctypes, os, socket, stat, time
        mark = {mark!r}
        def attempt(action):
            try:
                action()
            except Exception:
                pass
        for d in ("/run/lock", "/var/lock", "/tmp", "/var/tmp", "/dev/shm", "/run/shm"):
            attempt(lambda: open(f"{{d}}/{{mark}}", "w").write("x" * 3_000_000))
            attempt(lambda: os.mkfifo(f"{{d}}/{{mark}}_fifo"))
            attempt(lambda: os.mknod(f"{{d}}/{{mark}}_node", stat.S_IFREG | 0o644))
            attempt(lambda: os.symlink(f"/run/lock/{{mark}}_target", f"{{d}}/{{mark}}_link"))
            attempt(lambda: open(f"{{d}}/{{mark}}_link", "w").write("via symlink"))
            def with_dir_fd():
                fd = os.open(d, os.O_RDONLY)
                os.close(os.open(f"{{mark}}_dirfd", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            attempt(with_dir_fd)
            def unix_socket():
                s = socket.socket(socket.AF_UNIX)
                s.bind(f"{{d}}/{{mark}}_sock")
            attempt(unix_socket)
        for i in range(1000):
            try:
                open(f"/tmp/{{mark}}_many_{{i}}", "w").close()
            except OSError:
                break
        libc = ctypes.CDLL(None)
        shm = libc.shmget({ipc_key}, 64 << 20, 0o1666)
        if shm >= 0:
            address = libc.shmat(shm, None, 0)
        msg = libc.msgget({ipc_key + 1}, 0o1666)
        payload = ctypes.create_string_buffer(b"\\x01\\0\\0\\0\\0\\0\\0\\0" + mark.encode())
        libc.msgsnd(msg, payload, len(mark), 0)
        libc.semget({ipc_key + 2}, 1, 0o1666)
        if os.fork() == 0:  # a daemon that tries to outlive the run
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
    """)


def host_leftovers(mark: str, ipc_key: int) -> dict[str, list]:
    """What ``leaks`` managed to leave on the host: files named with ``mark``, IPC objects with the keys,
    processes whose command line holds ``mark``."""
    files = []
    for d in ("/run/lock", "/var/lock", "/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/run"):
        try:
            files += [f"{d}/{name}" for name in os.listdir(d) if mark in name]
        except OSError:
            pass
    keys = {str(k) for k in (ipc_key, ipc_key + 1, ipc_key + 2)}
    ipc = []
    for kind in ("shm", "msg", "sem"):
        try:
            lines = open(f"/proc/sysvipc/{kind}").read().splitlines()[1:]
        except OSError:
            continue
        ipc += [line for line in lines if line.split()[0] in keys]
    processes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                processes.append(int(pid))
        except OSError:
            pass
    return {"files": files, "ipc": ipc, "processes": processes}


def memory_hogs(mib: int) -> str:
    """A program of 4 processes that each touch ``mib`` MiB and hold it until all 4 have theirs; exits
    0 only when all 4 got their memory (each is under RLIMIT_AS: only a whole-tree cap stops the sum).

    The children hold their memory until the parent releases them (a second pipe), so the 4 blocks
    are held at once however slowly a loaded machine forks them: with a fixed sleep instead, a child
    could exit before the last one allocated, and the sum never reached the cap (a flaky test). A
    child counts only if it also exits normally: the cgroup's OOM killer may take one that had
    already reported, which let the last one finish under the cap.
    """
    return f"""import os, select, time
r, w = os.pipe()
release_r, release_w = os.pipe()
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        os.close(release_w)
        block = bytearray({mib} << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.write(w, b"k")
        os.read(release_r, 1)  # hold the memory until every child has its own
        os._exit(0)
    kids.append(pid)
os.close(w)
got, deadline = b"", time.monotonic() + 8
while len(got) < 4 and time.monotonic() < deadline:
    if select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(r, 8)
        if not chunk:
            break
        got += chunk
os.close(release_w)
held = sum(os.waitpid(pid, 0)[1] == 0 for pid in kids)  # a child the OOM killer took after it reported
if min(len(got), held) != 4:
    raise SystemExit(f"{{min(len(got), held)}} of 4 processes got their memory")
"""
