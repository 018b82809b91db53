"""Sessions: the persistent agent in a real microVM (what the Hotcell kernel will use), and the same
agent in a Docker box over stdio."""

from __future__ import annotations

import os

import anyio
import pytest
from vm_support import (
    PYTHON_IMAGE,
    docker_labels,
    drop_session_cache,  # noqa: F401 - the session-end cleanup of the caches
    run_dirs,
    vm_processes,
)

from hotbox_jupyter.events import DisplayData, ErrorValue, Event, Exit, ResultValue, StderrChunk, StdoutChunk
from hotbox_jupyter.hotcell.backend import RootfsHandle, VmSession
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.session import ProcessAgentSession
from hotbox_jupyter.models import ExitReason
from hotbox_jupyter.paths import GUEST_RUNTIMES, runtimes_dir

pytestmark = [pytest.mark.docker, pytest.mark.slow]


async def collect(session: VmSession, code: str, **kw: object) -> list[Event]:
    return [ev async for ev in session.exec(code, **kw)]  # type: ignore[arg-type]


def out(events: list[Event]) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, StdoutChunk))


async def exercise(session: VmSession) -> None:
    """The kernel's use of a session: state across cells, live output, errors, rich output, interrupts."""
    assert (await collect(session, "import os\ncounter = 41"))[-1] == Exit(ExitReason.EXITED, 0, "ok")
    assert ResultValue(value=42, data={"text/plain": "42"}) in await collect(session, "counter + 1")
    evs = await collect(session, "import sys\nprint('hello'); print('oops', file=sys.stderr)")
    assert out(evs) == "hello\n" and StderrChunk("oops\n") in evs
    evs = await collect(session, "display({'text/html': '<i>rich</i>', 'text/plain': 'rich'})")
    assert DisplayData(data={"text/html": "<i>rich</i>", "text/plain": "rich"}) in evs
    evs = await collect(session, "undefined_name")
    assert any(isinstance(ev, ErrorValue) and ev.ename == "NameError" for ev in evs)
    assert evs[-1] == Exit(ExitReason.EXITED, 1, "cell failed (status 1)")

    seen: list[Event] = []

    async def cell() -> None:
        async for ev in session.exec("import time\nfor i in range(100):\n    print(i, flush=True); time.sleep(0.1)"):
            seen.append(ev)

    async with anyio.create_task_group() as tg:
        tg.start_soon(cell)
        with anyio.fail_after(30):
            while "3\n" not in out(seen):  # output streams while the cell still runs
                await anyio.sleep(0.05)
        await session.interrupt()
    assert seen[-1].reason is ExitReason.INTERRUPTED  # type: ignore[union-attr]
    assert "99\n" not in out(seen)
    evs = await collect(session, "import time; time.sleep(600)", timeout=1.0)
    assert evs[-1].reason is ExitReason.TIMEOUT  # type: ignore[union-attr]
    assert ResultValue(value=41, data={"text/plain": "41"}) in await collect(session, "counter")


@pytest.mark.vm
def test_session_in_a_microvm(backend: QemuBackend, handle: RootfsHandle) -> None:
    async def go() -> None:
        session = await backend.start_session(VmConfig(command=["unused"], memory_mib=384), handle)
        async with session:
            assert session.alive and session.accel == QemuBackend.probe().accel
            await exercise(session)
            # The guest is a real machine of its own.
            evs = await collect(session, "open('/proc/cmdline').read()")
            assert "hotbox-owner=" in next(ev.value for ev in evs if isinstance(ev, ResultValue))
        assert not session.alive

    anyio.run(go)
    assert vm_processes(os.getpid()) == []
    assert run_dirs() == []


@pytest.mark.vm
def test_session_agent_dies_of_oom(backend: QemuBackend, handle: RootfsHandle) -> None:
    async def go() -> None:
        async with await backend.start_session(VmConfig(command=["unused"], memory_mib=160), handle) as session:
            evs = await collect(session, "hog = []\nwhile True:\n    hog.append(b'x' * (8 << 20))", timeout=120)
            assert evs[-1].reason is ExitReason.OOM, evs[-1]  # type: ignore[union-attr]
            assert not session.alive

    anyio.run(go)
    assert vm_processes(os.getpid()) == []


def test_same_agent_in_a_docker_box_over_stdio() -> None:
    argv = ["docker", "run", "-i", "--rm", "--network=none", *docker_labels(),
            "-v", f"{runtimes_dir()}:{GUEST_RUNTIMES}:ro", PYTHON_IMAGE,
            "python3", "-u", f"{GUEST_RUNTIMES}/python/agent.py"]

    async def go() -> None:
        async with await ProcessAgentSession.start(argv, backend="docker", ready_timeout=120) as session:
            await exercise(session)

    anyio.run(go)
