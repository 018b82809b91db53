"""The seed's security model, proven by boxes that try to break it on the real Docker engine."""

from __future__ import annotations

from pathlib import Path

import box_support
import pytest
from box_support import PYTHON, SHELL, run

from hotbox_jupyter import ExitReason
from hotbox_jupyter.box.engine import WRITABLE_CAPS

pytestmark = pytest.mark.docker
images, project = box_support.images, box_support.project  # fixtures

# Capability numbers (linux/capability.h) of the reduced set writable boxes keep.
_CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
             "NET_BIND_SERVICE": 10}

_RAW_SOCKET = "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\n    print('RAW OK')\n" \
              "except PermissionError as e:\n    print('RAW DENIED', e)\n"

_MOUNT = ("import ctypes, errno, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
          "rc = libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)\n"
          "print('MOUNTED' if rc == 0 else 'MOUNT DENIED ' + errno.errorcode[ctypes.get_errno()])\n")


def _status(text: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key + ":"))


# -- default (read-only) boxes --------------------------------------------------------------------

def test_default_box_runs_as_nobody_without_capabilities(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "cmd": ["sh", "-c", "id -u; id -g; cat /proc/self/status"]})
    assert result.ok, result
    uid, gid = result.stdout.splitlines()[:2]
    assert (uid, gid) == ("65534", "65534")
    assert int(_status(result.stdout, "CapEff"), 16) == 0
    assert int(_status(result.stdout, "CapBnd"), 16) == 0
    assert _status(result.stdout, "NoNewPrivs") == "1"


def test_default_box_root_filesystem_is_read_only(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "script": "touch /etc/owned"})
    assert result.exit_code == 1 and "Read-only file system" in result.stderr
    # the runtimes are mounted read-only too, even for root
    result = run({"image": SHELL, "size": "micro", "writable": True, "script": "touch /opt/hotbox/owned"})
    assert result.exit_code == 1 and "Read-only file system" in result.stderr


def test_default_box_has_no_network(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "script": "ls /sys/class/net"})
    assert result.ok and result.stdout.split() == ["lo"], result
    code = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3)\n    print('CONNECTED')\n"
            "except OSError as e:\n    print('NO ROUTE', e.errno)\n")
    result = run({"image": PYTHON, "size": "small", "cmd": ["python3", "-c", code]})
    assert result.stdout.startswith("NO ROUTE"), result


def test_internet_box_gets_a_bridge_interface(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "network": "internet", "script": "ls /sys/class/net"})
    assert result.ok and sorted(result.stdout.split()) == ["eth0", "lo"], result


def test_default_box_cannot_use_privileged_operations(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "script": "chown 0:0 /data"})
    assert result.exit_code == 1 and "Operation not permitted" in result.stderr
    result = run({"image": PYTHON, "size": "small", "cmd": ["python3", "-c", _RAW_SOCKET]})
    assert result.stdout.startswith("RAW DENIED"), result


def test_fork_bomb_hits_the_process_limit(project: Path) -> None:
    result = run({"image": SHELL, "size": "small", "script": "for i in $(seq 1 150); do sleep 30 & done; wait"})
    assert result.reason is ExitReason.PIDS, result
    assert "100 processes" in result.message
    assert result.duration < 20


# -- writable boxes -------------------------------------------------------------------------------

def test_writable_box_is_root_with_a_reduced_capability_set(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "writable": True,
                  "cmd": ["sh", "-c", "id -u; touch /etc/owned && echo WROTE; cat /proc/self/status"]})
    assert result.ok, result
    assert result.stdout.splitlines()[:2] == ["0", "WROTE"]
    expected = sum(1 << _CAP_BITS[c] for c in WRITABLE_CAPS)
    assert int(_status(result.stdout, "CapEff"), 16) == expected
    assert _status(result.stdout, "NoNewPrivs") == "1"


def test_writable_box_root_still_cannot_escape(project: Path) -> None:
    # no CAP_MKNOD: no device nodes; no CAP_SYS_ADMIN: no mounts; no CAP_NET_RAW: no raw sockets
    result = run({"image": SHELL, "size": "micro", "writable": True, "script": "mknod /tmp/mem c 1 1"})
    assert result.exit_code == 1 and "Operation not permitted" in result.stderr
    result = run({"image": PYTHON, "size": "small", "writable": True, "cmd": ["python3", "-c", _MOUNT]})
    assert result.stdout == "MOUNT DENIED EPERM\n", result
    result = run({"image": PYTHON, "size": "small", "writable": True, "cmd": ["python3", "-c", _RAW_SOCKET]})
    assert result.stdout.startswith("RAW DENIED"), result


def test_writable_box_allows_512_processes(project: Path) -> None:
    script = ("for i in $(seq 1 150); do sleep 30 & done\n"
              "echo started $(ls /proc | grep -c '^[0-9]')\n"
              "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max\n")
    result = run({"image": SHELL, "size": "small", "writable": True, "script": script})
    assert result.ok, result.console_output[-2000:]
    assert "512" in result.stdout.split()
    assert int(result.stdout.split()[1]) > 150


# -- resources ------------------------------------------------------------------------------------

def test_tmp_is_a_size_limited_tmpfs(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "tmp-size": 8,
                  "script": "stat -c %a /tmp\ndd if=/dev/zero of=/tmp/fill bs=1M count=6\n"
                            "dd if=/dev/zero of=/tmp/more bs=1M count=6\n"})
    assert result.exit_code == 1, result
    assert result.stdout.startswith("1777")
    assert "No space left on device" in result.stderr
    assert "+ dd if=/dev/zero of=/tmp/more" in result.stderr


def test_data_is_a_size_limited_disk_owned_by_the_box_user(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "disk-size": 20,
                  "script": "stat -c %u /data\ndf -k /data | tail -1\n"
                            "dd if=/dev/zero of=/data/fill bs=1M count=15\n"
                            "dd if=/dev/zero of=/data/more bs=1M count=15\n"})
    assert result.exit_code == 1, result
    owner, df = result.stdout.splitlines()[:2]
    assert owner == "65534"
    assert 15 * 1024 < int(df.split()[1]) <= 20 * 1024  # the filesystem's size is the disk-size
    assert "No space left on device" in result.stderr
    # a writable box's /data belongs to root
    result = run({"image": SHELL, "size": "micro", "writable": True, "script": "stat -c %u /data"})
    assert result.stdout == "0\n"


def test_memory_and_cpu_limits_come_from_the_size(project: Path) -> None:
    script = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
              "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    result = run({"image": SHELL, "size": "nano", "script": script})
    assert result.ok, result
    memory, quota, period = (int(x) for x in result.stdout.split())
    assert memory == 64 * 1024 * 1024
    assert quota / period == pytest.approx(0.10)
    result = run({"image": SHELL, "size": "medium", "memory": 300, "script": script})
    memory, quota, period = (int(x) for x in result.stdout.split())
    assert memory == 300 * 1024 * 1024 and quota / period == pytest.approx(0.50)


def test_runtimes_are_on_the_path(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "cmd": ["sh", "-c", "command -v hotbox; echo $PATH"]})
    assert result.ok, result
    where, path = result.stdout.splitlines()
    assert where == "/opt/hotbox/bin/hotbox"
    assert path.startswith("/opt/hotbox/bin:") and "/usr/bin" in path


def test_data_without_root_is_refused_not_unlimited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without loop mounts /data's size cannot be enforced: the disk (and so the box) is refused."""
    from hotbox_jupyter.box import storage
    from hotbox_jupyter.errors import LimitError

    monkeypatch.setattr(storage.os, "geteuid", lambda: 1000)
    disk = storage.DataDisk(tmp_path / "disk", 16, 65534, 65534)
    with pytest.raises(LimitError, match=r"/data size of 16 MB.*not running as root"):
        disk.create()
    assert not disk.enforced and not (tmp_path / "disk" / "data.img").exists()
    disk.destroy()
    assert not (tmp_path / "disk").exists()
