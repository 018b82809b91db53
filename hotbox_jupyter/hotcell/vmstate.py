"""Run directories of VMs, so that a crashed host process's VMs are found and reaped.

Every VM gets ``<state_dir>/vms/<vm id>/`` holding its sockets, its per-run initramfs, the VMM's logs
and ``state.json``: the owner (pid, start time, host, from :mod:`hotbox_jupyter.owner`) and every
process started for the VM with its kernel start time. Children are started with
``PR_SET_PDEATHSIG`` (via ``setpriv --pdeathsig``), so they die with the owner; the next backend to
start removes what is left (a dead owner's processes, if any survived, and its directories).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..owner import owner_alive, process_running, process_start_time, this_owner

__all__ = ["OWNER_TOKEN", "RunDir", "close_quietly", "pdeathsig_prefix", "reap_orphans", "stop_process", "vms_dir"]

log = logging.getLogger(__name__)

# The token every VMM process carries in its argv: the test suite's leak check greps for it.
OWNER_TOKEN = "hotbox-owner"


def vms_dir(state_dir: Path) -> Path:
    return state_dir / "vms"


def pdeathsig_prefix() -> list[str]:
    """argv prefix that makes the started program die with its parent (SIGKILL), if setpriv exists."""
    exe = shutil.which("setpriv")
    return [exe, "--pdeathsig", "KILL", "--"] if exe else []


async def stop_process(proc: Any, *, grace: float = 0.0) -> None:
    """Give ``proc`` (an anyio Process, or None) ``grace`` seconds to exit, then kill it; reap it and
    release its pipes. Shielded from cancellation (it runs in cleanups); never raises."""
    if proc is None:
        return
    with anyio.CancelScope(shield=True):
        if proc.returncode is None and grace > 0:
            with anyio.move_on_after(grace):
                await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        with contextlib.suppress(Exception):
            await proc.aclose()


async def close_quietly(*resources: Any) -> None:
    """``aclose()`` every stream or listener given (None skipped), ignoring errors: for cleanups."""
    with anyio.CancelScope(shield=True):
        for r in resources:
            if r is not None:
                with contextlib.suppress(Exception):
                    await r.aclose()


@dataclass
class RunDir:
    """One VM's directory and state file."""

    path: Path
    vm_id: str
    backend: str = "?"
    procs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, state_dir: Path, backend: str) -> RunDir:
        vm_id = secrets.token_hex(6)
        path = vms_dir(state_dir) / vm_id
        path.mkdir(parents=True, mode=0o700)
        rd = cls(path=path, vm_id=vm_id, backend=backend)
        rd.save()
        return rd

    @property
    def owner_token(self) -> str:
        return f"{OWNER_TOKEN}={this_owner().pid}"

    def save(self) -> None:
        owner = this_owner()
        data = {"vm_id": self.vm_id, "backend": self.backend, "created": time.time(),
                "owner": {"pid": owner.pid, "start": owner.start, "host": owner.host}, "procs": self.procs}
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(data))
        tmp.rename(self.path / "state.json")

    def add_proc(self, pid: int, name: str) -> None:
        """Record a process started for this VM (with its start time, so a reused pid is never killed)."""
        self.procs.append({"pid": pid, "start": process_start_time(pid), "name": name})
        self.save()

    def kill_procs(self) -> None:
        _kill_recorded(self.procs)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _kill_recorded(procs: list[dict[str, Any]]) -> list[int]:
    killed = []
    for p in procs:
        pid, start = p.get("pid"), p.get("start")
        if isinstance(pid, int) and pid > 0 and start and process_running(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def reap_orphans(state_dir: Path) -> list[str]:
    """Kill the processes and remove the run directories of VMs whose owner process is gone.

    Called when a backend is created. Returns the ids of the VMs reaped. Never raises.
    """
    base = vms_dir(state_dir)
    reaped: list[str] = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return reaped
    for d in entries:
        if not d.is_dir():
            continue
        try:
            state = json.loads((d / "state.json").read_text())
            owner = state.get("owner", {})
            if owner_alive(owner.get("pid"), owner.get("start"), owner.get("host")):
                continue
            killed = _kill_recorded(state.get("procs", []))
            if killed:
                log.warning("reaped VM %s of dead process %s: killed %s", d.name, owner.get("pid"), killed)
        except (OSError, ValueError):
            # A directory without a readable state is a VM that never started; leave fresh ones alone,
            # they may be being created right now.
            try:
                if time.time() - d.stat().st_mtime < 60:
                    continue
            except OSError:
                continue
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d.name)
    return reaped
