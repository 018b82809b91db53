"""The one event loop that runs hotbox's async core for synchronous callers.

The cell magic, plain scripts and the ``hotbox`` command are synchronous; the core (TaskManager, the
VM side) is async on anyio. They meet through ONE blocking portal: an asyncio loop on a daemon thread,
started on first use and shared by every module of the package. One loop rather than one per caller
means one docker client, one set of worker threads and one place where tasks live.

The thread is a daemon so that a forgotten box never keeps the interpreter from exiting; the
``atexit`` hook of the box facade cancels running boxes while the loop is still alive (daemon
threads are only torn down after ``atexit`` handlers ran). Worker threads started from the loop
inherit the daemon flag, so a ``to_thread`` call blocked in docker-py cannot hang interpreter exit.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["get_portal", "in_portal_thread"]

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_thread: threading.Thread | None = None
_pid: int | None = None


def _serve(ready: Future[BlockingPortal]) -> None:
    async def main() -> None:
        async with BlockingPortal() as portal:
            ready.set_result(portal)
            await portal.sleep_until_stopped()

    try:
        anyio.run(main, backend="asyncio")
    except BaseException as exc:  # pragma: no cover - only if the loop itself cannot start
        if not ready.done():
            ready.set_exception(exc)


def get_portal() -> BlockingPortal:
    """The shared portal, started on first call (and again in a forked child, where the thread is gone)."""
    global _portal, _thread, _pid
    with _lock:
        if _portal is not None and _pid == os.getpid() and _thread is not None and _thread.is_alive():
            return _portal
        ready: Future[BlockingPortal] = Future()
        thread = threading.Thread(target=_serve, args=(ready,), name="hotbox-portal", daemon=True)
        thread.start()
        _portal, _thread, _pid = ready.result(), thread, os.getpid()
        return _portal


def in_portal_thread() -> bool:
    """True when called on the portal's own loop thread, where ``portal.call`` would deadlock."""
    return _thread is not None and threading.current_thread() is _thread
