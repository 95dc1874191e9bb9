"""Sandbox launcher: runs as the first process of one sandboxed execution.

Started by :mod:`eval_suite.humaneval.sandbox` as ``python -I -S sandbox_child.py CONFIG_JSON`` with the
program on stdin. It sets up isolation *before* any untrusted code runs, then ``exec``s a fresh
interpreter on the program, so nothing of this file survives into the untrusted process:

1. ``namespaces`` isolation (root only): ``unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)``;
   the new network namespace has only a loopback device that is down, so no socket reaches
   anything; fresh tmpfs mounts over /tmp, /var/tmp and /dev/shm, so the only world-writable places
   are private and vanish with the process; the program runs as pid 1 of its own pid namespace, so
   everything it starts dies with it.
2. resource limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0.
3. when running as root: drop to an unprivileged uid/gid reserved for this sandbox slot, so that
   RLIMIT_NPROC is enforced (root ignores it) and files owned by root are read-only.
4. the program runs under a Python audit hook (:data:`PRELUDE`) that refuses writes outside the
   working directory, sockets, process creation and ctypes. It is a second layer, not a security
   boundary on its own (a C extension can bypass it); the OS layers above are the boundary.

Only the standard library is used: ``-I`` isolates this interpreter from the environment.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# Exit codes the parent reads (see sandbox.py); above any code a Python program exits with by itself.
EXIT_SETUP_FAILED = 97

# Runs inside the untrusted interpreter. argv: [-c, program_path]; env SANDBOX_NONCE is read once and
# removed, and printed only after the program returned normally, so `os._exit(0)` is not a pass.
PRELUDE = r"""
import os, sys
def _sandbox_main():
    nonce = os.environ.pop("SANDBOX_NONCE")
    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
              "os.system", "os.kill", "os.killpg", "ctypes.", "pty.", "os.setuid", "os.chroot")
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                   "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree"}
    def inside(path):
        return isinstance(path, int) or os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (flags or 0) & write_flags or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox is not allowed")
        elif event in path_events and args and not inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")
        elif event.startswith(denied):
            raise PermissionError(f"sandbox: {event} is not allowed")
    path = sys.argv[1]
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    sys.addaudithook(hook)
    exec(code, {"__name__": "__main__"})
    sys.stdout.flush()
    print("\n" + nonce, flush=True)
_sandbox_main()
"""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


def enter_namespaces() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare(NEWNS|NEWNET|NEWPID)")
    # Make our mounts invisible to the host before adding any.
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    for d in PRIVATE_TMP_DIRS:
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777"),
                   f"mount tmpfs {d}")


def expose_interpreter(prefix: str) -> None:
    """Make the interpreter's install prefix reachable for the unprivileged sandbox uid.

    When an ancestor of ``prefix`` is not world-traversable (e.g. a pyenv Python under /root, mode
    700), cover that ancestor with an empty tmpfs and bind-mount only ``prefix`` back at its own
    path: the interpreter works unchanged (its rpath and stdlib paths stay valid) while the rest of
    the ancestor, such as root's home, is hidden from the sandbox.
    """
    blocked = next((a for a in _ancestors(prefix) if not os.stat(a).st_mode & 0o001), None)
    if blocked is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    stage = "/tmp/.interpreter"  # already a private tmpfs
    os.mkdir(stage)
    _check(libc.mount(prefix.encode(), stage.encode(), None, MS_BIND | MS_REC, None), f"bind {prefix}")
    _check(libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755"),
           f"mount tmpfs {blocked}")
    os.makedirs(prefix)
    _check(libc.mount(stage.encode(), prefix.encode(), None, MS_BIND | MS_REC, None), f"bind back {prefix}")


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def set_limits(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, key in (("RLIMIT_AS", "memory_bytes"), ("RLIMIT_FSIZE", "file_size_bytes"),
                      ("RLIMIT_NPROC", "max_processes"), ("RLIMIT_NOFILE", "max_open_files")):
        resource.setrlimit(getattr(resource, name), (limits[key], limits[key]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main() -> None:
    config = json.loads(sys.argv[1])
    program = sys.stdin.buffer.read()
    if not config["namespaces"]:
        run_program(config, program, config["workdir"])
    try:
        enter_namespaces()
        expose_interpreter(config["interpreter_prefix"])
    except OSError as e:
        _setup_failed(e)
    # The forked child is pid 1 of the new pid namespace: when it exits or is killed, the kernel kills
    # and reaps every process it left behind, so a fork bomb leaves nothing (not even zombies) behind.
    pid = os.fork()
    if pid == 0:
        workdir = "/tmp/sandbox"  # inside the private tmpfs
        os.mkdir(workdir, 0o700)
        run_program(config, program, workdir)
    # The parent asks for a stop with SIGTERM (wall-time limit); killing pid 1 tears the namespace
    # down, and waiting here reaps it, so no zombie is left for the host's init.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def run_program(config: dict, program: bytes, workdir: str) -> None:
    """Write the program into ``workdir``, apply limits, drop privileges and exec the interpreter on it."""
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "wb") as f:
            f.write(program)
        uid = config["uid"]
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(program_path, uid, uid)
        set_limits(config["limits"])
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            # Changing credentials clears the parent-death signal, so set it afterwards.
            libc = ctypes.CDLL(None, use_errno=True)
            _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")
        os.chdir(workdir)
    except OSError as e:
        _setup_failed(e)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    python = config["interpreter"]
    if config["audit_hook"]:
        argv = [python, "-I", "-B", "-S", "-c", PRELUDE, program_path]
        env["SANDBOX_NONCE"] = config["nonce"]
    else:  # only used to test the OS layers on their own
        argv = [python, "-I", "-B", "-S", program_path]
    os.execve(python, argv, env)


def _setup_failed(error: OSError) -> None:
    print(f"sandbox setup failed: {error}", file=sys.stderr, flush=True)
    os._exit(EXIT_SETUP_FAILED)


if __name__ == "__main__":
    main()
