"""Which isolation tiers this host can run, why not, and what each costs to start.

``BoxConf.isolation`` picks one of three tiers for the same box:

* ``container`` — runc, the Docker engine's default runtime (namespaces, cgroups, seccomp, no capabilities);
* ``gvisor`` — Docker with gVisor's ``runsc`` (a user-space kernel between the code and the host's);
* ``microvm`` — a Hotcell VM (QEMU, KVM where it works, TCG otherwise) with the size's memory and vCPUs.

:func:`isolation_tiers` is what ``hotbox doctor``, the size table and the attack suite read
(:func:`available_tiers` for the names alone). Start costs are figures measured on the 2-core build
machine (first output of ``print('hi')`` in ``hotbox/python``, through ``box.start``); ``probe=True``
measures them here instead, by starting one box per available tier.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from typing import TYPE_CHECKING

from pydantic import Field

from ..errors import HotboxError
from ..models import ISOLATION_TIERS, HotModel

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["TierInfo", "available_tiers", "isolation_tiers", "unavailable_reason"]

#: First output of a trivial box per tier on the 2-core TCG build machine (see bench/box_start.py and
#: bench/vm_boot.py): container ~0.2 s, gvisor ~0.45 s, microvm restored from its snapshot ~0.9 s.
TYPICAL_START_S = {"container": 0.2, "gvisor": 0.45, "microvm": 0.9}


class TierInfo(HotModel):
    """One isolation tier on this host."""

    name: str = Field(description="container, gvisor or microvm")
    available: bool = Field(description="True when boxes of this tier can start here")
    reason: str = Field(description="What was found, or what is missing and how to get it")
    start_s: float | None = Field(default=None, description="Start to first output of a trivial box, seconds")
    measured: bool = Field(default=False, description="start_s was measured on this host just now")


def _engine_runtimes() -> tuple[list[str] | None, str]:
    from .engine import Engine

    try:
        engine = Engine()
    except HotboxError as exc:
        return None, str(exc)
    try:
        return engine.runtimes(), "the Docker engine answers"
    except HotboxError as exc:
        return None, str(exc)
    finally:
        engine.close()


def _microvm() -> tuple[bool, str]:
    from ..hotcell.qemu import QemuBackend, find_qemu_img

    probe = QemuBackend.probe()
    if not probe.available:
        return False, probe.reason
    snap = ("snapshots on (qemu-img found)" if find_qemu_img() else
            "no qemu-img (apt-get install qemu-utils): every microvm box cold-boots")
    return True, f"QEMU under {str(probe.accel).upper()}; {snap}"


def isolation_tiers(*, probe: bool = False) -> list[TierInfo]:
    """Every tier with whether this host can run it and why (blocking: asks the engine and QEMU).

    ``probe=True`` also starts one trivial box per available tier and reports its measured start time
    (a few seconds; a microvm's first box also builds its snapshot).
    """
    runtimes, engine_reason = _engine_runtimes()
    tiers: list[TierInfo] = []
    for name in ISOLATION_TIERS:
        if name == "microvm":
            ok, reason = _microvm()
            if ok and runtimes is None:
                ok, reason = False, f"images come from the Docker engine, which is unavailable: {engine_reason}"
        elif runtimes is None:
            ok, reason = False, engine_reason
        elif name == "container":
            ok, reason = "runc" in runtimes, f"runtimes: {', '.join(runtimes)}"
        else:
            runsc = shutil.which("runsc")
            if "runsc" in runtimes and "runsc-hostnet" in runtimes:
                ok, reason = True, f"runsc registered with dockerd ({runsc or 'binary not on PATH'})"
            elif runsc is None:
                ok, reason = False, "runsc is not installed (apt-get install runsc; scripts/setup.sh does it)"
            else:
                ok, reason = False, (f"{runsc} is installed but dockerd does not know it: run scripts/setup.sh as "
                                     "root (writes /etc/docker/daemon.json and reloads dockerd)")
        tiers.append(TierInfo(name=name, available=ok, reason=reason, start_s=TYPICAL_START_S[name] if ok else None))
    if probe:
        tiers = [_measure(t) if t.available else t for t in tiers]
    return tiers


def unavailable_reason(engine: Engine, name: str) -> str | None:
    """Why a box of tier ``name`` cannot start on this engine and host, or None when it can (blocking;
    what TaskManager.start asks before it admits a box)."""
    if name == "container":
        return None
    if engine.only_tiers is not None and name not in engine.only_tiers:
        return f"the {type(engine).__name__} runs only {', '.join(engine.only_tiers)} boxes"
    if name == "gvisor":
        runtimes = engine.runtimes()
        if "runsc" in runtimes and "runsc-hostnet" in runtimes:
            return None
        return (f"dockerd has no runsc runtime (it has {', '.join(runtimes)}); run scripts/setup.sh as root "
                "(installs runsc, registers it in /etc/docker/daemon.json and reloads dockerd)")
    ok, reason = _microvm()
    return None if ok else reason


def available_tiers() -> list[str]:
    """The names of the tiers this host can run, weakest first."""
    return [t.name for t in isolation_tiers() if t.available]


def _measure(tier: TierInfo) -> TierInfo:
    from .. import box
    from ..events import StderrChunk, StdoutChunk
    from ..models import BoxConf

    conf = BoxConf.model_validate({"image": "hotbox/python", "cmd": ["python3", "-c", "print('hi')"], "size": "nano",
                                   "isolation": tier.name})
    best: float | None = None
    with contextlib.suppress(HotboxError):
        for _ in range(2 if tier.name == "microvm" else 1):  # a microvm's first box may build the snapshot
            t0 = time.monotonic()
            info = box.start(conf)
            first = None
            for ev in box.events(info.stream_id):
                if first is None and isinstance(ev, (StdoutChunk, StderrChunk)):
                    first = time.monotonic() - t0
            if first is not None and box.wait(info.id).ok:
                best = first
    if best is None:
        return tier.model_copy(update={"reason": tier.reason + f"; a trivial {tier.name} box failed to run",
                                       "available": False})
    return tier.model_copy(update={"start_s": round(best, 3), "measured": True})
