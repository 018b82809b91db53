"""In-guest runner of one box task in the ``microvm`` isolation tier. Standard library only.

The host boots (or restores) a VM running this file; it waits in ``hotbox_warm.wait_for_start()``, so
every task starts from a snapshot with the interpreter already loaded. The start payload is the task:

    {"argv": [...], "env": {...}, "workdir": "/", "user": "65534:65534", "read_only": true,
     "tmp_mb": 128, "pids": 100, "stdin": BASE64 | null}

It then shapes the guest like a box (a size-limited tmpfs /tmp, /data, a read-only root for a default
box, the box's user, a pids cgroup), runs ``argv`` in its own session and forwards its output. Messages
to the host: ``{"t": "out" | "err", "b": BASE64}``, then ``{"t": "exit", "code": N, "oom": bool,
"pids": bool}``. From the host: ``{"op": "signal", "sig": N}`` (to the whole process group).
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import io
import os
import runpy
import signal
import subprocess
import sys
import threading
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import hotbox_warm  # noqa: E402 - importable once HERE is on sys.path

# What the notebook runner (cell.py) imports: loaded before the snapshot, so a forked task has them.
for _mod in ("ast", "builtins", "contextlib", "json", "linecache", "types", "pprint", "importlib.util"):
    __import__(_mod)

CGROUP = "/sys/fs/cgroup"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> bool:
    """mount(2) without a mount program: no fork under TCG, and any image has libc."""
    enc = (lambda v: v.encode() if v is not None else None)
    return _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


def oom_kills() -> int:
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def make_cgroup(pids: int) -> str | None:
    """A cgroup v2 group with the box's process limit; None when the guest kernel has none."""
    try:
        if not os.path.exists(os.path.join(CGROUP, "cgroup.controllers")):
            os.makedirs(CGROUP, exist_ok=True)
            if not mount("cgroup2", CGROUP, "cgroup2", 0, None):
                return None
        with open(os.path.join(CGROUP, "cgroup.subtree_control"), "w") as f:
            f.write("+pids")
        group = os.path.join(CGROUP, "box")
        os.makedirs(group, exist_ok=True)
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write(str(pids))
        return group
    except OSError:
        return None


def pids_hit(group: str | None) -> bool:
    if group is None:
        return False
    try:
        with open(os.path.join(group, "pids.events")) as f:
            return any(line.split() and line.split()[0] == "max" and line.split()[1] != "0" for line in f)
    except (OSError, IndexError):
        return False


def shape_guest(task: dict) -> str | None:
    """/tmp, /data, the root's writability and the pids cgroup, as a box of the same size has them."""
    uid, _, gid = str(task.get("user", "0:0")).partition(":")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(task.get('tmp_mb', 64))}m,mode=1777")
    os.makedirs("/data", exist_ok=True)
    os.chown("/data", int(uid), int(gid or uid))
    group = make_cgroup(int(task.get("pids", 100)))
    if task.get("read_only", True):
        # /data becomes a mount of its own, so that making the root's mount read-only (not its file
        # system: MS_BIND) leaves /data writable, as the box's /data disk is.
        mount("/data", "/data", None, MS_BIND, None)
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    return group


def python_target(argv: list[str], env: dict) -> tuple[str, str, list[str], bool] | None:
    """("c", code, args, unbuffered) or ("script", path, args, unbuffered) when ``argv`` is this very
    interpreter running a script or ``-c`` with at most ``-u``: such a task runs in a fork of this
    process, whose imports are already done (a fresh interpreter costs seconds under TCG). None: exec it."""
    exe = argv[0]
    if "/" not in exe:
        for d in env.get("PATH", "").split(":"):
            if d and os.access(os.path.join(d, exe), os.X_OK):
                exe = os.path.join(d, exe)
                break
    if os.path.realpath(exe) != os.path.realpath(sys.executable):
        return None
    if any(k in env for k in ("PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONHOME", "PYTHONOPTIMIZE", "PYTHONDEVMODE",
                              "PYTHONWARNINGS", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONHASHSEED")):
        return None
    i, unbuffered = 1, bool(env.get("PYTHONUNBUFFERED"))
    while i < len(argv) and argv[i] == "-u":
        unbuffered, i = True, i + 1
    if i >= len(argv) or argv[i] == "-" or (argv[i].startswith("-") and argv[i] != "-c"):
        return None
    if argv[i] == "-c":
        return ("c", argv[i + 1], argv[i + 2:], unbuffered) if i + 1 < len(argv) else None
    return "script", argv[i], argv[i + 1:], unbuffered


def print_user_traceback(exc: BaseException) -> None:
    """The traceback as the interpreter prints it: the program's frames only, not this runner's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def run_python(kind: str, target: str, args: list[str], unbuffered: bool, env: dict) -> int:
    """In the forked child: become a fresh ``python3 [-u] target args`` as far as the program can tell."""
    os.environ.clear()
    os.environ.update(env)
    first = "" if kind == "c" else os.path.dirname(os.path.abspath(target))
    extra = [p for p in env.get("PYTHONPATH", "").split(":") if p]
    sys.path[:] = [first, *extra, *[p for p in sys.path if p and p != HERE]]
    sys.argv = ["-c" if kind == "c" else target, *args]
    enc = "utf-8"
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=enc)
    out = io.FileIO(1, "w", closefd=False)
    err = io.FileIO(2, "w", closefd=False)
    if unbuffered:
        sys.stdout = io.TextIOWrapper(out, encoding=enc, write_through=True)
    else:
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(out), encoding=enc)
    sys.stderr = io.TextIOWrapper(err if unbuffered else io.BufferedWriter(err), encoding=enc,
                                  errors="backslashreplace", line_buffering=True, write_through=unbuffered)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    try:
        if kind == "c":
            import builtins
            import types

            main = types.ModuleType("__main__")  # this runner is __main__ itself: leave its globals be
            main.__dict__.update({"__builtins__": builtins, "__spec__": None, "__loader__": None})
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as exc:
        print_user_traceback(exc)
        code = 128 + signal.SIGINT
    except BaseException as exc:
        print_user_traceback(exc)
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter does at exit
        import atexit

        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
    return code & 0xFF


class Forked:
    """A forked task with the interface of subprocess.Popen that main() uses."""

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdin = os.fdopen(stdin, "wb") if stdin is not None else None
        self.stdout = os.fdopen(stdout, "rb")
        self.stderr = os.fdopen(stderr, "rb")

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def fork_python(py: tuple[str, str, list[str], bool], env: dict, workdir: str, want_stdin: bool,
                setup: object) -> Forked:
    in_r, in_w = os.pipe() if want_stdin else (os.open(os.devnull, os.O_RDONLY), None)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            setup()  # type: ignore[operator]
            for src, dst in ((in_r, 0), (out_w, 1), (err_w, 2)):
                os.dup2(src, dst)
            os.closerange(3, 1 << 16)
            os.chdir(workdir)
            os._exit(run_python(*py, env))
        except BaseException:
            traceback.print_exc()
            os._exit(126)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    return Forked(pid, in_w, out_r, err_r)


def spawn(argv: list[str], env: dict, workdir: str, stdin: object, setup: object) -> subprocess.Popen | None:
    """exec the task's program; None (after telling the host) when it cannot be started."""
    try:
        return subprocess.Popen(argv, env=env, cwd=workdir,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=setup,  # type: ignore[arg-type]
                                start_new_session=True)
    except OSError as exc:
        # What a container runtime says for a missing or unrunnable program, with its exit code.
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        hotbox_warm.send({"t": "err", "b": base64.b64encode(f"{argv[0]}: {exc.strerror}\n".encode()).decode()})
        hotbox_warm.send({"t": "exit", "code": code, "oom": False, "pids": False})
        return None


def pump(fd: int, kind: str) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            return
        hotbox_warm.send({"t": kind, "b": base64.b64encode(data).decode()})


def main() -> int:
    # A box's big allocation succeeds and is OOM-killed once touched (the host overcommits); the guest's
    # heuristic would refuse it outright (MemoryError) in a VM of the box's size. Behave like the box.
    for path, value in (("/proc/self/oom_score_adj", "-1000"), ("/proc/sys/vm/overcommit_memory", "1")):
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            pass
    task = hotbox_warm.wait_for_start()
    group = shape_guest(task)
    uid, _, gid = str(task.get("user", "0:0")).partition(":")
    uid_n, gid_n = int(uid), int(gid or uid)
    stdin = task.get("stdin")

    def child_setup() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")  # the runner itself is spared by the OOM killer; the task is not
        if group is not None:
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if gid_n or uid_n:
            os.setgroups([])
            os.setgid(gid_n)
            os.setuid(uid_n)

    before = oom_kills()
    env = task.get("env") or {}
    workdir = task.get("workdir") or "/"
    py = python_target(task["argv"], env)
    if py is not None:
        proc: Forked | subprocess.Popen = fork_python(py, env, workdir, stdin is not None, child_setup)
    else:
        proc = spawn(task["argv"], env, workdir, stdin, child_setup)
        if proc is None:
            return 0
    pumps = [threading.Thread(target=pump, args=(proc.stdout.fileno(), "out"), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr.fileno(), "err"), daemon=True)]
    for t in pumps:
        t.start()
    if stdin is not None and proc.stdin is not None:
        def feed() -> None:
            try:
                proc.stdin.write(base64.b64decode(stdin))  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        threading.Thread(target=feed, daemon=True).start()

    def control() -> None:
        while True:
            msg = hotbox_warm.receive()
            if msg.get("op") == "signal":
                try:
                    os.killpg(proc.pid, int(msg.get("sig", signal.SIGTERM)))
                except (OSError, ValueError):
                    pass

    threading.Thread(target=control, daemon=True).start()
    code = proc.wait()
    # Like a container: when the main process ends, whatever it left running ends too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    for t in pumps:
        t.join(timeout=5)
    if code < 0:
        code = 128 - code
    hotbox_warm.send({"t": "exit", "code": code, "oom": oom_kills() > before, "pids": pids_hit(group)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
