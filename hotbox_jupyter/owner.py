"""Who started a sandbox, so that a crashed process's leftovers can be found and reaped.

Every container carries :data:`LABEL_MANAGED` and the owner labels below; every VM process has a
state file with the same owner fields. A sandbox whose owner process is gone (the pid is dead, or was
reused by a process with another start time) is an orphan and may be reaped by anyone.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

__all__ = [
    "LABEL_MANAGED",
    "LABEL_OWNER_HOST",
    "LABEL_OWNER_PID",
    "LABEL_OWNER_START",
    "LABEL_PROJECT",
    "LABEL_TASK",
    "OwnerId",
    "owner_alive",
    "process_running",
    "process_start_time",
    "this_owner",
]

LABEL_MANAGED = "io.hotbox.managed"
LABEL_OWNER_PID = "io.hotbox.owner-pid"
LABEL_OWNER_START = "io.hotbox.owner-start"
LABEL_OWNER_HOST = "io.hotbox.owner-host"
LABEL_TASK = "io.hotbox.task-id"
LABEL_PROJECT = "io.hotbox.project"


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields resume after the last ')'.
    return stat[stat.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if no such process."""
    fields = _stat_fields(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


def process_running(pid: int, start: str) -> bool:
    """``pid`` is the process that started at ``start`` (not a reused pid) and is not a zombie."""
    fields = _stat_fields(pid)
    return (fields is not None and len(fields) > 19 and fields[19].decode() == start
            and fields[0] != b"Z")


class OwnerId(tuple[int, str, str]):
    """(pid, start time, host name) of a process."""

    __slots__ = ()

    @property
    def pid(self) -> int:
        return self[0]

    @property
    def start(self) -> str:
        return self[1]

    @property
    def host(self) -> str:
        return self[2]

    def labels(self) -> dict[str, str]:
        """The owner labels for a container started by this owner."""
        return {LABEL_MANAGED: "1", LABEL_OWNER_PID: str(self.pid), LABEL_OWNER_START: self.start,
                LABEL_OWNER_HOST: self.host}


@functools.cache
def _owner_for(pid: int) -> OwnerId:
    return OwnerId((pid, process_start_time(pid) or "0", socket.gethostname()))


def this_owner() -> OwnerId:
    """The owner id of the calling process (recomputed after a fork)."""
    return _owner_for(os.getpid())


def owner_alive(pid: int | str | None, start: str | None, host: str | None = None) -> bool:
    """True if the owning process still runs. Sandboxes of another host are never judged dead."""
    if host is not None and host != socket.gethostname():
        return True
    try:
        ipid = int(pid) if pid is not None else -1
    except ValueError:
        return False
    if ipid <= 0:
        return False
    now = process_start_time(ipid)
    return now is not None and (start is None or now == start)


def dead_owner_dirs(root: Path) -> list[Path]:
    """The directories under ``root`` whose ``owner.json`` names a process that is gone (for reapers)."""
    dead = []
    for d in root.iterdir() if root.is_dir() else []:
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if not owner_alive(owner.get("pid"), owner.get("start"), owner.get("host")):
            dead.append(d)
    return dead
