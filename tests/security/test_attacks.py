"""The attack suite: a box tries what an attacker would, on every isolation tier this host has.

Each case says what must happen — **refused** (nothing starts, nothing is billed), **contained** (the
attempt fails inside the box) or **killed with a reason** — and the arena (conftest.py) checks after
each one that the host, this process and a witness box beside it are unharmed, and that no output
or ledger entry was lost.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import docker
import pytest
from IPython.core.interactiveshell import InteractiveShell
from security_support import SHELL, Arena

from hotbox_jupyter import ExitReason, box
from hotbox_jupyter.box import journal
from hotbox_jupyter.box.billing import Ledger
from hotbox_jupyter.box.storage import ProjectStorage
from hotbox_jupyter.errors import ConfigError, ImageDeniedError

pytestmark = [pytest.mark.security, pytest.mark.docker]


def _hot_toml(project: Path, text: str) -> None:
    (project / "hot.toml").write_text(text)
    box._reset_for_tests()


# -- resources: killed with a reason -----------------------------------------------------------------

def test_fork_bomb_is_killed_for_pids(arena: Arena) -> None:
    """Killed with a reason: the pids limit refuses the forks and the result says "pids"."""
    r = arena.python("import os\nwhile True:\n    os.fork()\n", size="small", timeout=30)
    assert r.reason is ExitReason.PIDS, r
    assert "processes" in r.message


def test_memory_bomb_is_killed_for_oom(arena: Arena) -> None:
    """Killed with a reason: the memory limit kills the box and the result says "oom"."""
    r = arena.python("x = []\nwhile True:\n    x.append(bytearray(8 << 20))\n", size="nano", memory=64)
    assert r.reason is ExitReason.OOM, r
    assert "64 MB" in r.message


def test_cpu_spin_past_the_timeout_is_killed(arena: Arena) -> None:
    """Killed with a reason: a spinning box is killed at its timeout and the result says "timeout"."""
    r = arena.script("while :; do :; done", timeout=2)
    assert r.reason is ExitReason.TIMEOUT and "timeout of 2 s" in r.message, r
    assert r.duration < 30


def test_tmp_fill_gets_enospc_and_says_disk(arena: Arena) -> None:
    """Contained: /tmp is a tmpfs of tmp-size; the writer gets ENOSPC and the result says "disk"."""
    r = arena.script("dd if=/dev/zero of=/tmp/fill bs=1M count=64", tmp_size=8)
    assert "No space left on device" in r.stderr
    assert r.reason is ExitReason.DISK and "disk full" in r.message, r


def test_data_fill_gets_enospc_and_says_disk(arena: Arena) -> None:
    """Contained: /data is a disk of disk-size; the writer gets ENOSPC and the result names /data."""
    r = arena.script("dd if=/dev/zero of=/data/fill bs=1M count=64", disk_size=16)
    assert "No space left on device" in r.stderr
    assert r.reason is ExitReason.DISK and "/data (16 MB" in r.message, r


def test_writable_root_fill_stops_at_the_size_disk(arena: Arena) -> None:
    """Contained: a writable root lives on a disk of the size's disk; ENOSPC there, not the host's disk."""
    r = arena.script("df -k / | tail -1\ndd if=/dev/zero of=/fill bs=1M count=200\nsync", writable=True, disk_size=32)
    assert "No space left on device" in r.stderr, r.stderr[-500:]
    total_kb = int(r.stdout.splitlines()[1].split()[1])
    assert total_kb <= 32 * 1024, r.stdout  # the root the box sees is 32 MB
    assert r.reason is ExitReason.DISK and "writable root" in r.message, r


def test_writable_root_inode_flood_is_contained(arena: Arena) -> None:
    """Contained: millions of empty files cannot exhaust the host's inodes; the root disk runs out first."""
    r = arena.script("mkdir /many && cd /many && i=0; while [ $i -lt 100000 ]; do : > f$i || exit 7; i=$((i+1)); done",
                     writable=True, disk_size=8, timeout=120)
    assert r.exit_code != 0 and "No space left on device" in r.stderr, r.stderr[-300:]
    assert r.reason is ExitReason.DISK, r


@pytest.fixture
def small_quota(project: Path) -> None:
    """A hot:// quota of 16 MB for the project (set before the arena's witness mounts the storage)."""
    _hot_toml(project, "[hot.plan]\nstorage_mb = 16\n")


def test_hot_storage_fill_stops_at_the_quota(small_quota: None, arena: Arena) -> None:
    """Contained: hot:// has a quota per project (storage_mb); ENOSPC at it, and the result names hot://."""
    r = arena.script("df -k /hot | tail -1\ndd if=/dev/zero of=/hot/fill bs=1M count=64")
    assert "No space left on device" in r.stderr
    assert int(r.stdout.splitlines()[1].split()[1]) <= 16 * 1024
    assert r.reason is ExitReason.DISK and "hot://" in r.message, r
    used = sum(e.size for e in ProjectStorage.for_settings(box.settings()).ls())
    assert used <= 16 << 20


def test_output_flood_keeps_host_memory_and_disk_bounded(arena: Arena) -> None:
    """Contained: 64 MB of output costs the host at most the spool's head + tail, and the end arrives."""
    r = arena.script("head -c 67108864 /dev/zero | tr '\\0' x; echo; echo THE END", size="medium")
    assert r.ok and r.truncated and r.stdout.endswith("x\nTHE END\n"), r.message
    assert r.console_path is not None
    kept = os.stat(r.console_path).st_blocks * 512
    assert kept <= journal.HEAD_BYTES + journal.TAIL_BYTES + journal.SLACK_BYTES + (1 << 20), kept


def test_interleaved_tiny_writes_keep_the_journal_bounded(arena: Arena) -> None:
    """Contained: alternating one-byte stdout/stderr writes cannot grow the host's in-memory journal."""
    code = ("import os\nfor i in range(150000):\n    os.write(1 + i % 2, b'x')\nos.write(1, b'\\nTHE END\\n')\n")
    r = arena.python(code, timeout=120)
    assert r.ok and r.stdout.endswith("THE END\n"), r.message  # stdout keeps its order; stderr beside it not


# -- the filesystem: contained ------------------------------------------------------------------------

def test_read_only_root_refuses_writes(arena: Arena) -> None:
    """Contained: a default box cannot write its root."""
    r = arena.script("touch /etc/owned")  # runc says EROFS, gVisor EACCES: refused either way
    assert r.exit_code == 1 and ("Read-only file system" in r.stderr or "Permission denied" in r.stderr), r


def test_runtimes_are_read_only_even_for_root(arena: Arena) -> None:
    """Contained: root in a writable box cannot change the runtimes every box shares."""
    r = arena.script("echo evil > /opt/hotbox/bin/hotbox", writable=True)
    assert r.exit_code != 0 and "Read-only file system" in r.stderr, r


def test_mount_is_denied(arena: Arena) -> None:
    """Contained: root in a writable box cannot mount anything."""
    code = ("import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "rc = libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)\n"
            "print('MOUNTED' if rc == 0 else 'DENIED ' + errno.errorcode[ctypes.get_errno()])\n")
    r = arena.python(code, writable=True)
    assert "DENIED EPERM" in r.stdout, r


def test_chroot_is_denied(arena: Arena) -> None:
    """Contained: no CAP_SYS_CHROOT, even for root in a writable box."""
    r = arena.script("chroot / true", writable=True)
    assert r.exit_code != 0 and "Operation not permitted" in r.stderr, r


def test_user_namespaces_are_denied(arena: Arena) -> None:
    """Contained: ``unshare -U`` (the door to every namespaced capability) is refused by runc's seccomp
    filter, in both modes. gVisor's own kernel implements it inside the sandbox: there root in the new
    namespace still cannot write the read-only root nor mount over it."""
    for writable in (False, True):
        r = arena.script("unshare -U -r sh -c 'touch /etc/owned-by-userns || exit 9; echo WROTE'", writable=writable)
        if arena.tier == "gvisor":
            assert "WROTE" not in r.stdout or writable, r
        else:
            assert r.exit_code != 0 and "Operation not permitted" in r.stderr, r


def test_device_nodes_cannot_be_made(arena: Arena) -> None:
    """Contained: no CAP_MKNOD: root cannot make /dev/mem or a disk's node."""
    r = arena.script("mknod /mem c 1 1", writable=True)
    assert r.exit_code != 0 and "Operation not permitted" in r.stderr, r


def test_raw_sockets_are_denied(arena: Arena) -> None:
    """Contained: no CAP_NET_RAW in either mode (no spoofed packets, no ICMP tricks)."""
    code = ("import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\n    print('RAW OK')\n"
            "except PermissionError:\n    print('RAW DENIED')\n")
    for writable in (False, True):
        r = arena.python(code, writable=writable)
        assert "RAW DENIED" in r.stdout, r


def test_no_network_under_none(arena: Arena) -> None:
    """Contained: network "none" leaves only loopback: no route out, no DNS, not even to the host's bridge."""
    code = ("import socket\nfor addr in [('1.1.1.1', 53), ('172.17.0.1', 2375), ('172.17.0.1', 22)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=2)\n        print('CONNECTED', addr)\n"
            "    except OSError as e:\n        print('NO', addr, e.errno)\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('RESOLVED')\n"
            "except OSError:\n    print('NO DNS')\n")
    code += "print('IFACES', sorted(name for _, name in socket.if_nameindex()))\n"
    r = arena.python(code)
    assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout and "NO DNS" in r.stdout, r.stdout
    assert "IFACES ['lo']" in r.stdout, r.stdout


def test_host_shadow_is_not_reachable(arena: Arena) -> None:
    """Contained: /etc/shadow in a box is the image's; the host's is nowhere in the box's view."""
    host_root = next(line for line in Path("/etc/shadow").read_text().splitlines() if line.startswith("root:"))
    r = arena.script("cat /etc/shadow; find / -xdev -name shadow 2>/dev/null | xargs cat 2>/dev/null",
                     writable=True)
    assert host_root not in r.stdout
    r = arena.script("cat /etc/shadow /etc/gshadow")
    assert r.exit_code != 0 and host_root not in r.stdout, r


def test_proc_kcore_and_sysrq_are_masked(arena: Arena) -> None:
    """Contained: /proc/kcore reads nothing, /proc/sysrq-trigger cannot be written, even by root."""
    r = arena.script("head -c 16 /proc/kcore | wc -c; echo h > /proc/sysrq-trigger && echo SYSRQ", writable=True)
    assert r.stdout.split()[1] == "0" and "SYSRQ" not in r.stdout, r


def test_sys_is_read_only(arena: Arena) -> None:
    """Contained: /sys (and the cgroup files under it) cannot be written, even by root."""
    r = arena.script("echo 1 > /sys/kernel/mm/ksm/run && echo KSM; "
                     "echo max > /sys/fs/cgroup/pids/pids.max && echo PIDS; true", writable=True)
    assert "KSM" not in r.stdout and "PIDS" not in r.stdout, r  # runc: EROFS; gVisor: not even there


def test_no_docker_socket(arena: Arena) -> None:
    """Contained: the engine's socket is nowhere in a box (it would be the host)."""
    r = arena.script("for s in /var/run/docker.sock /run/docker.sock; do [ -S $s ] && echo SOCKET $s; done; "
                     "find / -xdev -type s 2>/dev/null | grep -c docker || true", writable=True)
    assert "SOCKET" not in r.stdout and r.stdout.split()[-1] == "0", r.stdout


def test_setuid_binaries_do_not_elevate(arena: Arena) -> None:
    """Contained: no-new-privileges: a setuid-root binary run by an unprivileged user stays unprivileged."""
    r = arena.script("cp /usr/bin/id /usr/local/bin/sid && chmod 4755 /usr/local/bin/sid\n"
                     "setpriv --reuid 65534 --regid 65534 --clear-groups /usr/local/bin/sid -u", writable=True)
    assert r.stdout.split()[-1] == "65534", r
    r = arena.script("su -c 'id -u' root < /dev/null")  # a default box's setuid su cannot become root
    assert r.exit_code != 0 and "0\n" not in r.stdout.splitlines()[1:], r


def test_ptrace_of_another_box_is_impossible(arena: Arena) -> None:
    """Contained: another box's processes are not there to trace (pid namespaces), and the host's neither."""
    victim = arena.conf(image=SHELL, size="nano", script="exec sleep 31337")
    info = box.start(victim)
    arena.tasks.append(info.id)
    try:
        code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                "seen = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
                "print('VICTIM SEEN' if any(s.startswith(b'sleep') for s in seen) else 'VICTIM HIDDEN')\n"
                "for pid in range(2, 400):\n"
                "    if str(pid) not in pids and libc.ptrace(16, pid, 0, 0) == 0:\n"  # PTRACE_ATTACH
                "        print('ATTACHED', pid)\n")
        r = arena.python(code)
        assert "VICTIM HIDDEN" in r.stdout and "ATTACHED" not in r.stdout, r.stdout
    finally:
        box.cancel(info.id, grace=0.2)
        box.wait(info.id, timeout=30)


def test_boxes_do_not_see_each_others_files(arena: Arena) -> None:
    """Contained: /data and /tmp are per box; what one box writes there another cannot find."""
    r = arena.script("echo s3cret > /data/secret-7f3a; echo s3cret > /tmp/secret-7f3a\n"
                     "cat /data/secret-7f3a /tmp/secret-7f3a")
    assert r.ok and r.stdout.count("s3cret") == 2, r
    r = arena.script("find / -xdev -name 'secret-7f3a*' 2>/dev/null; find /data /tmp -name 'secret-7f3a*'",
                     writable=True)
    assert "secret-7f3a" not in r.stdout, r.stdout


def test_kill_all_reaches_only_the_box_itself(arena: Arena) -> None:
    """Contained: ``kill -9 -1`` as root ends only the box's own processes (the witness lives on)."""
    r = arena.script("sleep 5 & kill -9 -1; echo SURVIVED", writable=True)
    assert r.exit_code != 0 or "SURVIVED" in r.stdout


def test_setuid_file_planted_through_hot_is_inert_on_the_host(arena: Arena, tmp_path: Path) -> None:
    """Contained: root in a writable box leaves a setuid-root program in hot://; on the host it runs as
    whoever runs it, because the project's storage disk is mounted nosuid,nodev."""
    r = arena.script("cp /usr/bin/id /hot/sid && { chown 0:0 /hot/sid || echo CHOWN REFUSED; } "
                     "&& chmod 4755 /hot/sid", writable=True)
    assert r.ok, r
    storage = ProjectStorage.for_settings(box.settings())
    planted = storage.root / "sid"
    st = planted.lstat()
    if arena.tier == "microvm":
        # Through 9p the file is the proxy helper's (uid 65534, the storage's owner, in a user namespace
        # where root is not mapped), which cannot chown it to root: it is there, setuid, but not root's...
        assert "CHOWN REFUSED" in r.stdout and "Invalid argument" in r.stderr, r
        assert st.st_mode & stat.S_ISUID and st.st_uid == storage.root.stat().st_uid != 0
    else:
        assert "CHOWN REFUSED" not in r.stdout, r
        assert st.st_mode & stat.S_ISUID and st.st_uid == 0  # it is there, setuid root...
    flags = os.statvfs(storage.root).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV  # ...on a nosuid,nodev disk...
    assert _euid_as_nobody(planted) == "65534"  # ...so it does not make a host user root
    # The control: the same file on a plain host directory would have (the check can see elevation).
    control = tmp_path / "sid"
    shutil.copy2(planted, control)
    os.chown(control, 0, 0)
    os.chmod(control, 0o4755)
    try:
        assert _euid_as_nobody(control) == "0"
    finally:
        control.unlink()


def _euid_as_nobody(program: Path) -> str:
    """The effective uid ``program`` (``id``) reports when uid 65534 runs it, through an inherited fd
    (the file's directory need not be searchable by 65534; the mount's nosuid applies all the same)."""
    fd = os.open(program, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = subprocess.run([f"/proc/self/fd/{fd}", "-u"], pass_fds=(fd,), user=65534, group=65534,
                             extra_groups=[], capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)
    return out.stdout.strip()


def test_device_node_through_hot_cannot_be_made(arena: Arena) -> None:
    """Contained: a device node cannot be created in hot:// (and the disk is nodev if one came some other way)."""
    r = arena.script("mknod /hot/mem c 1 1 && echo MADE", writable=True)
    assert "MADE" not in r.stdout and "Operation not permitted" in r.stderr, r
    assert not (ProjectStorage.for_settings(box.settings()).root / "mem").exists()


def test_symlink_planted_in_hot_is_not_followed_by_the_host(arena: Arena) -> None:
    """Contained: hot://evil -> /etc/shadow: the host's storage reader refuses to follow it."""
    r = arena.script("ln -s /etc/shadow /hot/evil && mkdir -p /hot/d && ln -s /etc /hot/d/up", writable=True)
    assert r.ok, r
    with pytest.raises(PermissionError, match="symlink"):
        box.storage.read_text("hot://evil")
    with pytest.raises(PermissionError, match="symlink"):
        box.storage.read_text("hot://d/up/shadow")


def test_unusual_syscalls_are_filtered(arena: Arena) -> None:
    """Contained: keyctl, bpf and perf_event_open (kernel attack surface) are refused by the seccomp filter."""
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "for name, nr in (('keyctl', 250), ('bpf', 321), ('perf_event_open', 298)):\n"
            "    rc = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
            "    print(name, 'OK' if rc >= 0 else ctypes.get_errno())\n")
    r = arena.python(code, writable=True)
    assert " OK" not in r.stdout, r.stdout


# -- refused before anything starts ------------------------------------------------------------------

def _refused(arena: Arena, conf: dict[str, Any], error: type[Exception], match: str) -> None:
    """Refused: the error names the problem; no container, no ledger row, nothing billed."""
    ledger = Ledger(box.settings().ledger_path)
    before = ledger.quota(box.settings().project.id, box.settings().plan).tasks_used
    with pytest.raises(error, match=match):
        box.start(arena.conf(**conf))
    assert ledger.quota(box.settings().project.id, box.settings().plan).tasks_used == before


@pytest.mark.parametrize("image", [
    "docker:dind",                                   # by name
    "rancher/rancher:v2.8",                          # by prefix
    "docker@sha256:" + "a" * 64,                     # by digest
    "registry.example.com:5000/library/docker:dind",  # registry-qualified, library/
    "localhost:5000/docker:24-dind",                 # a local mirror
    "DOCKER.IO/Library/Docker:DinD",                 # any case
])
def test_denied_images_are_refused(arena: Arena, image: str) -> None:
    _refused(arena, {"image": image, "size": "nano"}, ImageDeniedError, "denied by the image policy")


def test_denied_image_under_a_local_id_is_refused(arena: Arena, client: docker.DockerClient) -> None:
    """Refused: a denied image reached by its image id (no name to match) is caught by its tags."""
    img = client.images.get(SHELL)
    img.tag("docker", "hotbox-security-test")
    try:
        r = arena.run(image=img.id, size="nano", script="echo RAN")
        assert "RAN" not in r.console_output and r.reason is ExitReason.ERROR, r
        assert "denied by the image policy" in r.message
    finally:
        client.images.remove("docker:hotbox-security-test", noprune=True)


@pytest.mark.parametrize(("conf", "field"), [
    ({"size": "huge"}, "size"),
    ({"timeout": -1}, "timeout"),
    ({"memory": 1}, "memory"),
    ({"network": "host"}, "network"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"disk-size": 0}, "disk"),
    ({"privileged": True}, "privileged"),
    ({"script": "true", "cmd": ["true"]}, "script"),
])
def test_malformed_boxconf_is_refused(arena: Arena, conf: dict[str, Any], field: str) -> None:
    _refused(arena, {"image": SHELL, **conf}, ConfigError, field)


@pytest.mark.parametrize(("line", "field"), [
    ("--size huge", "size"),
    ("--timeout -5", "timeout"),
    ("--memory lots", "memory"),
    ("--network host", "network"),
])
def test_malformed_magic_options_are_refused(arena: Arena, shell: InteractiveShell, line: str, field: str) -> None:
    """Refused: a bad %%hotbox option fails the cell with an error naming it; no box starts."""
    ledger = Ledger(box.settings().ledger_path)
    before = ledger.quota(box.settings().project.id, box.settings().plan).tasks_used
    res = shell.run_cell(f"%%hotbox {SHELL} {line}\necho SHOULD-NOT-RUN\n")
    err = res.error_in_exec or res.error_before_exec
    assert err is not None and field in str(err), err
    assert ledger.quota(box.settings().project.id, box.settings().plan).tasks_used == before
