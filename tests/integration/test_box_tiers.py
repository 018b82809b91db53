"""Isolation tiers: the same cell through box.start in every tier this host runs (container, gvisor,
microvm), with the same events, exit reasons, billing, cancel and timeouts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import box_support
import pytest
from box_support import PYTHON, run, wait_running

from hotbox_jupyter import BoxConf, ExitReason, TaskStatus, box
from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.events import DisplayData, Exit, ResultValue, StderrChunk, StdoutChunk
from hotbox_jupyter.notebook.magics import RUNNERS

pytestmark = [pytest.mark.docker, pytest.mark.vm, pytest.mark.slow]
images, project = box_support.images, box_support.project  # fixtures

TIERS = box.available_tiers()
CELL = b"""
import os, sys
print("out", os.getuid())
print("err", file=sys.stderr)
display({"text/html": "<b>rich</b>", "text/plain": "rich"}, raw=True)
open("/tmp/scratch", "w").write("tmp is writable")
try:
    open("/etc/written", "w")
    root = "writable"
except OSError:
    root = "read-only"
print("root", root, "data", os.access("/data", os.W_OK))
21 * 2
"""


def test_this_host_runs_every_tier() -> None:
    tiers = {t.name: t for t in box.isolation_tiers()}
    assert list(tiers) == ["container", "gvisor", "microvm"]
    missing = {n: t.reason for n, t in tiers.items() if not t.available}
    assert not missing, f"the build machine should run all three tiers: {missing}"
    assert all(t.start_s for t in tiers.values())


def events_of(conf: BoxConf, stdin: bytes | None = None) -> tuple[list[Any], Any, float]:
    t0 = time.monotonic()
    info = box.start(conf, stdin=stdin)
    first = None
    evs = []
    for ev in box.events(info.stream_id):
        if first is None and isinstance(ev, StdoutChunk | StderrChunk):
            first = time.monotonic() - t0
        evs.append(ev)
    return evs, box.wait(info.id, timeout=60), first or -1.0


def test_the_same_cell_gives_the_same_events_in_every_tier(project: Path) -> None:
    seen = {}
    for tier in TIERS:
        conf = BoxConf(image=PYTHON, cmd=list(RUNNERS["python"]), size="nano", isolation=tier)
        evs, result, first = events_of(conf, CELL)
        out = "".join(e.text for e in evs if isinstance(e, StdoutChunk))
        err = "".join(e.text for e in evs if isinstance(e, StderrChunk))
        rich = [e.data for e in evs if isinstance(e, DisplayData)]
        results = [e.value for e in evs if isinstance(e, ResultValue)]
        assert result.ok and result.reason is ExitReason.EXITED, (tier, result)
        assert isinstance(evs[-1], Exit) and evs[-1].exit_code == 0
        assert result.cus > 0 and result.duration > 0
        seen[tier] = (out, err, rich, results)
        print(f"\n{tier}: first output {first:.2f} s, total {result.duration:.2f} s")
    expected = ("out 65534\nroot read-only data True\n", "err\n", [{"text/html": "<b>rich</b>", "text/plain": "rich"}],
                [42])
    for tier, got in seen.items():
        assert got == expected, tier


@pytest.mark.parametrize("tier", TIERS)
def test_exit_codes_and_timeouts_are_the_same(project: Path, tier: str) -> None:
    failed = run(BoxConf(image=PYTHON, cmd=["python3", "-c", "import sys; print('bye'); sys.exit(3)"], size="nano",
                         isolation=tier))
    assert failed.status is TaskStatus.FAILED and failed.exit_code == 3 and failed.reason is ExitReason.EXITED
    assert failed.console_output == "bye\n"
    sleeper = "import time; print('sleeping', flush=True); time.sleep(60)"
    # 8 s: on a loaded 2-core host gVisor or a VM may take seconds to print; the output so far is kept.
    slow = run(BoxConf(image=PYTHON, cmd=["python3", "-c", sleeper], size="nano", timeout=8, isolation=tier))
    assert slow.reason is ExitReason.TIMEOUT, slow
    assert "sleeping" in slow.console_output
    assert 7.5 < slow.duration < 30


@pytest.mark.parametrize("tier", TIERS)
def test_cancel_and_memory_are_the_same(project: Path, tier: str) -> None:
    info = box.start(BoxConf(image=PYTHON, cmd=["python3", "-c", "import time; time.sleep(60)"], size="nano",
                             isolation=tier))
    wait_running(info.id, timeout=60)
    box.cancel(info.id, grace=2)
    cancelled = box.wait(info.id, timeout=30)
    assert cancelled.reason is ExitReason.CANCELLED and cancelled.status is TaskStatus.FAILED
    hog = run(BoxConf(image=PYTHON, cmd=["python3", "-c", "b = b'x' * (400 << 20); print(len(b))"], size="nano",
                      isolation=tier))
    assert hog.reason is ExitReason.OOM, hog


def test_an_unknown_tier_is_refused_before_anything_starts(project: Path) -> None:
    with pytest.raises(ConfigError, match="isolation 'firecracker' is not a tier; allowed: 'container'"):
        BoxConf(image=PYTHON, isolation="firecracker")  # type: ignore[arg-type]
    assert box.tasks() == []


@pytest.mark.skipif("microvm" not in TIERS, reason="no microvm tier here")
def test_a_microvm_box_starts_from_its_snapshot(project: Path) -> None:
    conf = BoxConf(image=PYTHON, cmd=["python3", "-c", "print('hi')"], size="nano", isolation="microvm")
    run(conf)  # builds the tier's snapshot if this cache has none
    evs, result, first = events_of(conf)
    assert result.ok and result.console_output == "hi\n"
    progress = " ".join(getattr(e, "text", "") for e in evs if type(e).__name__ == "Progress")
    assert "restored from a snapshot" in progress, progress
    print(f"\nmicrovm box from a snapshot: first output {first:.2f} s (target <= 1.5 s under TCG)")
