"""In-guest runner of one box task in the ``microvm`` isolation tier. Standard library only.

The host boots (or restores) a VM running this file; it waits in ``hotbox_warm.wait_for_start()``, so
every task starts from a snapshot with the interpreter already loaded. The start payload is the task:

    {"argv": [...], "env": {...}, "workdir": "/", "user": "65534:65534", "read_only": true,
     "tmp_mb": 128, "pids": 100, "caps": ["CHOWN", ...], "data_disk": true, "root_disk": false,
     "hot": true, "stdin": BASE64 | null}

It then shapes the guest like a box (a size-limited tmpfs /tmp, /data on the host's fresh drive of the
size's disk, the project's hot:// storage at /hot over virtio-9p, a read-only root for a default box, a pids
cgroup) and confines the task the way runc
confines a container's process: the task runs under a small init (:func:`box_init`, pid 1 of a pid
namespace of its own, so ``kill -9 -1`` reaches only the box's processes) in a mount namespace with a
fresh /proc, runc's masked and read-only /proc paths, a read-only /sys and a /dev of the harmless
devices only (and, for a writable box, a root whose writes go to a drive of the size's disk:
:func:`overlay_root`); it becomes the box's user with only the ``caps`` capabilities (bounding set
included), no ambient ones and no_new_privs (:func:`confine`). It forwards the task's output. Messages
to the host: ``{"t": "out" | "err", "b": BASE64}``, then ``{"t": "exit", "code": N, "oom": bool,
"pids": bool, "full": "root" | "data" | null}``. From the host: ``{"op": "signal", "sig": N}`` (to the
whole process group).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import fcntl
import io
import os
import runpy
import signal
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
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
BLKFLSBUF = 0x1261
DATA_SERIAL, ROOT_SERIAL = "hotbox-data", "hotbox-root"  # hotbox_jupyter.box.vmtier's
HOT_TAG = "hotbox-hot"  # hotbox_jupyter.hotcell.qemu's
STAGE = "/hotcell"  # in the box's mount namespace, a private tmpfs there holds its root drive and overlay
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
CAPS = {name: n for n, name in enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE"))}
# runc's defaults (the maskedPaths and readonlyPaths of its spec): kernel memory, keys, timers, hardware.
MASKED = ("/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
READ_ONLY = ("/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# A container's /dev: (name, char major, minor). No disks, no memory, no console, no VM channel ports.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> bool:
    """mount(2) without a mount program: no fork under TCG, and any image has libc."""
    enc = (lambda v: v.encode() if v is not None else None)
    return _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


def must(ok: bool, what: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


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


def fresh_drive(serial: str) -> str:
    """The device of the host's fresh ext4 drive ``serial``. The drive was there when the VM was saved,
    with another file behind it: its cached blocks are dropped first."""
    for dev in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{dev}/serial") as f:
                if f.read().strip() != serial:
                    continue
        except OSError:
            continue
        fd = os.open(f"/dev/{dev}", os.O_RDONLY)
        try:
            fcntl.ioctl(fd, BLKFLSBUF)
        finally:
            os.close(fd)
        return f"/dev/{dev}"
    raise OSError(f"the drive {serial} is not in this VM")


def mount_data_disk() -> None:
    """/data: the size's disk_mb drive, nosuid,nodev, as a box's /data disk."""
    node = fresh_drive(DATA_SERIAL)
    must(mount(node, "/data", "ext4", MS_NOSUID | MS_NODEV, None), f"mounting {node} at /data")
    with contextlib.suppress(OSError):
        os.rmdir("/data/lost+found")


def overlay_root() -> None:
    """In the box's mount namespace, a writable box's root: the image's root under an overlay whose upper
    layer is on the size's disk_mb drive (as a container's writable layer is on its RootDisk), with the
    runner's mounts carried over; then the box is chrooted into it."""
    node = fresh_drive(ROOT_SERIAL)
    must(mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700,size=64k"), f"mounting {STAGE}")
    disk, new = f"{STAGE}/disk", f"{STAGE}/root"
    os.mkdir(disk)
    os.mkdir(new)
    must(mount(node, disk, "ext4", MS_NODEV, None), f"mounting {node}")
    os.mkdir(f"{disk}/upper")
    os.mkdir(f"{disk}/work")
    must(mount("overlay", new, "overlay", 0, f"lowerdir=/,upperdir={disk}/upper,workdir={disk}/work"),
         "mounting the overlay root (is the overlay module loaded?)")
    for path in ("/sys", "/tmp", "/data", "/hot", "/opt/hotbox", "/.hotbox"):
        if os.path.isdir(path) and os.path.isdir(new + path):
            must(mount(path, new + path, None, MS_BIND | MS_REC, None), f"carrying {path} over")
    os.chdir(new)
    os.chroot(".")
    os.chdir("/")


def full(path: str) -> bool:
    """Whether the file system at ``path`` is (almost) full, as the host judges its own disks
    (hotbox_jupyter.box.storage.disk_full: under 2 MB or 1 % free, or under 4 inodes)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free < max(2 << 20, size // 100) or (st.f_files > 0 and st.f_favail < 4)


def shape_guest(task: dict) -> str | None:
    """/tmp, /data, the root's writability and the pids cgroup, as a box of the same size has them."""
    uid, _, gid = str(task.get("user", "0:0")).partition(":")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(task.get('tmp_mb', 64))}m,mode=1777")
    os.makedirs("/data", exist_ok=True)
    if task.get("data_disk"):
        mount_data_disk()
    else:
        os.chown("/data", int(uid), int(gid or uid))
        # /data becomes a mount of its own, so that making the root's mount read-only (not its file
        # system: MS_BIND) leaves /data writable, as the box's /data disk is.
        mount("/data", "/data", None, MS_BIND, None)
    if task.get("hot"):
        # Only now, after the restore: a VM that has 9p mounted cannot be saved. access=any: one attach,
        # so the host's proxy helper creates every file as its own uid (the storage's owner).
        os.makedirs("/hot", exist_ok=True)
        must(mount(HOT_TAG, "/hot", "9p", MS_NOSUID | MS_NODEV,
                   "trans=virtio,version=9p2000.L,access=any,msize=262144"), "mounting hot:// at /hot")
    group = make_cgroup(int(task.get("pids", 100)))
    if task.get("read_only", True):
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    return group


def confine_mounts(root_disk: bool) -> None:
    """In a new mount namespace: the box's view of /proc, /sys and /dev, as runc sets up a container's
    (and a writable box's root on its drive, ``root_disk``)."""
    must(_libc.unshare(CLONE_NEWNS) == 0, "unshare(CLONE_NEWNS)")
    must(mount(None, "/", None, MS_REC | MS_PRIVATE, None), "making the mounts private")
    if root_disk:
        overlay_root()
    locked = MS_NOSUID | MS_NODEV | MS_NOEXEC
    must(mount("proc", "/proc", "proc", locked, None), "mounting /proc")  # this pid namespace's
    must(mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k"), "mounting /dev")
    for name, major, minor in DEVICES:
        os.mknod(f"/dev/{name}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    os.makedirs("/dev/pts")
    os.makedirs("/dev/shm")
    must(mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"),
         "mounting /dev/pts")
    must(mount("shm", "/dev/shm", "tmpfs", locked, "mode=1777"), "mounting /dev/shm")
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    for path in MASKED:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | locked, "size=0")
        elif os.path.exists(path):
            must(mount("/dev/null", path, None, MS_BIND, None), f"masking {path}")
    for path in (*READ_ONLY, "/sys", CGROUP):
        if os.path.exists(path) and mount(path, path, None, MS_BIND | MS_REC, None):
            must(mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked, None), f"making {path} read-only")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def confine(caps: list[str], uid: int, gid: int) -> None:
    """Become the box's user with only ``caps`` (bounding set too), no ambient ones, and no_new_privs."""
    keep = {CAPS[c] for c in caps}
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            must(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0, f"dropping capability {cap}")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # to a user other than root: permitted and effective capabilities are gone
    data = (_CapData * 2)()
    for cap in keep if uid == 0 else ():
        data[cap // 32].effective |= 1 << (cap % 32)
        data[cap // 32].permitted |= 1 << (cap % 32)
    must(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data) == 0, "capset")  # _LINUX_CAPABILITY_VERSION_3
    must(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0, "clearing ambient capabilities")
    must(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "setting no_new_privs")


def box_init(group: str | None, start: object, root_disk: bool, report: int) -> int:
    """Pid 1 of the box's pid namespace (a container's tini): the box's mounts, then ``start()`` in a
    child, zombies reaped, its status returned (128 + N for a signal). Signals to the process group
    reach the task; this init ignores them (pid 1 without handlers), only SIGKILL ends it, and with it
    every process of the box. "root" is written to fd ``report`` when the root drive ended up full."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    if group is not None:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    confine_mounts(root_disk)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report)
            start()  # type: ignore[operator]
        except BaseException:
            traceback.print_exc()
        os._exit(126)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # the task's pipes end with the task's processes, not with this init
    os.closerange(report + 1, 1 << 16)
    while True:
        try:
            child, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 126
        if child == pid:
            code = os.waitstatus_to_exitcode(status)
            if root_disk and full("/"):  # the overlay tells its upper layer's file system
                os.write(report, b"root")
            return 128 - code if code < 0 else code


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
    """The box's init, forked, with the interface of subprocess.Popen that main() uses."""

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int, report: int) -> None:
        self.pid = pid
        self.report = report
        self.stdin = os.fdopen(stdin, "wb") if stdin is not None else None
        self.stdout = os.fdopen(stdout, "rb")
        self.stderr = os.fdopen(stderr, "rb")

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def full_disk(self) -> str | None:
        """After wait(): "root" when the box's init found the root drive full, "data" for /data, or None."""
        said = os.read(self.report, 16)
        os.close(self.report)
        return "root" if said == b"root" else "data" if full("/data") else None


def exec_program(argv: list[str], env: dict) -> None:
    """exec the task's program; when it cannot be, say so on stderr and exit as a container runtime does
    (127 for a missing program, 126 for one that cannot run)."""
    for sig in ("SIGPIPE", "SIGXFSZ"):  # what subprocess restores: a program starts with the defaults
        signal.signal(getattr(signal, sig), signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(2, f"{argv[0]}: {exc.strerror}\n".encode())
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


def start_box(argv: list[str], py: tuple[str, str, list[str], bool] | None, env: dict, workdir: str,
              want_stdin: bool, group: str | None, setup: object, root_disk: bool) -> Forked:
    """Fork the box's init (pid 1 of a new pid namespace, in a session of its own) and, under it, the
    task: ``setup()`` (user, capabilities), then a fork of this interpreter running ``py`` or ``argv``
    exec'd. Its stdin, stdout and stderr are pipes to this runner."""
    in_r, in_w = os.pipe() if want_stdin else (os.open(os.devnull, os.O_RDONLY), None)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    rep_r, rep_w = os.pipe()
    # The next child, the box's init, is pid 1 of a new pid namespace; then this runner's own children (its
    # threads included, which cannot be made while the two differ) are back in its own namespace.
    own = os.open("/proc/self/ns/pid", os.O_RDONLY)
    must(_libc.unshare(CLONE_NEWPID) == 0, "unshare(CLONE_NEWPID)")

    def task() -> None:
        setup()  # type: ignore[operator]
        os.chdir(workdir)
        if py is not None:
            os._exit(run_python(*py, env))
        exec_program(argv, env)

    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            for src, dst in ((in_r, 0), (out_w, 1), (err_w, 2), (rep_w, 3)):
                os.dup2(src, dst)
            os.closerange(4, 1 << 16)
            os._exit(box_init(group, task, root_disk, 3))
        except BaseException:
            traceback.print_exc()
            os._exit(126)
    try:
        must(_libc.setns(own, CLONE_NEWPID) == 0, "setns(CLONE_NEWPID)")
    finally:
        os.close(own)
    for fd in (in_r, out_w, err_w, rep_w):
        os.close(fd)
    return Forked(pid, in_w, out_r, err_r, rep_r)


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
    try:
        group = shape_guest(task)
    except OSError as exc:  # e.g. no /data disk: refuse rather than run a box without its limits
        said = f"hotbox: cannot set up the box: {exc}\n".encode()
        hotbox_warm.send({"t": "err", "b": base64.b64encode(said).decode()})
        hotbox_warm.send({"t": "exit", "code": 125, "oom": False, "pids": False})
        return 0
    uid, _, gid = str(task.get("user", "0:0")).partition(":")
    uid_n, gid_n = int(uid), int(gid or uid)
    caps = list(task.get("caps") or [])
    stdin = task.get("stdin")

    def child_setup() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")  # the runner and the box's init are spared by the OOM killer; the task is not
        confine(caps, uid_n, gid_n)

    before = oom_kills()
    env = task.get("env") or {}
    workdir = task.get("workdir") or "/"
    proc = start_box(task["argv"], python_target(task["argv"], env), env, workdir, stdin is not None, group,
                     child_setup, bool(task.get("root_disk")))
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
    hotbox_warm.send({"t": "exit", "code": code, "oom": oom_kills() > before, "pids": pids_hit(group),
                      "full": proc.full_disk()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
