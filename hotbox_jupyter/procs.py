"""Stopping child processes started with :mod:`subprocess` (image builds, helper servers in tests).

The anyio processes of the VM backends have their own, async, ``cell.vmstate.stop_process``.
"""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ["stop_popen"]


def stop_popen(proc: subprocess.Popen[Any], *, grace: float = 10.0) -> None:
    """Ask ``proc`` to stop (SIGTERM), give it ``grace`` seconds, then kill it; either way it is reaped,
    so that no zombie and no process outlives the cleanup that calls this."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
