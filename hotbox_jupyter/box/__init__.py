"""Hot Box: run Docker/OCI containers as tasks, from plain scripts, IPython or the kernel.

The seed's "Useful Functions", synchronous and thread-safe::

    from hotbox_jupyter import box, BoxConf

    task = box.start(BoxConf(image="hotbox/python", cmd=["python3", "-c", "print('Hello')"], size="nano"))
    result = box.wait(task.id)          # TaskResult: status, exit_code, reason, console_output, cus...
    for event in box.events(task.stream_id): ...   # replay, then live, until Exit
    box.sizes(); box.quota(); box.enabled(); box.image_policy()
    box.pool(enabled=True); box.warm(conf, wait=30)   # warm pools (box/pools.py), off by default

Every call goes to the process's one :class:`~hotbox_jupyter.box.manager.TaskManager`, which lives on the
shared portal loop (:mod:`hotbox_jupyter.portal`) and is created on first use. Do not call the blocking
functions from that loop itself (async code there uses the TaskManager directly); from any other event
loop use :func:`aevents`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from ..events import Event
from ..models import (
    SIZES,
    BoxConf,
    ExitReason,
    ImagePolicyInfo,
    QuotaInfo,
    SizeProfile,
    TaskInfo,
    TaskResult,
    TaskStatus,
)
from ..portal import get_portal, in_portal_thread
from ..settings import Settings, load_settings
from . import policy, storage

if TYPE_CHECKING:
    from .manager import TaskManager
    from .tiers import TierInfo

__all__ = [
    "aevents",
    "available_tiers",
    "cancel",
    "enabled",
    "events",
    "image_policy",
    "isolation_tiers",
    "logs",
    "pool",
    "quota",
    "result",
    "run",
    "settings",
    "sizes",
    "start",
    "status",
    "storage",
    "tasks",
    "wait",
    "warm",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.RLock()
_settings: Settings | None = None
_manager: TaskManager | None = None
_manager_pid: int | None = None
_atexit_registered = False


def settings() -> Settings:
    """The settings this process's boxes use (read once from hot.toml and the environment)."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = load_settings()
        return _settings


def _get_manager() -> TaskManager:
    global _manager, _manager_pid, _atexit_registered
    with _lock:
        if _manager is not None and _manager_pid == os.getpid():
            return _manager
        from .manager import TaskManager  # deferred: keeps `import hotbox_jupyter` free of docker-py

        if in_portal_thread():
            raise RuntimeError("hotbox_jupyter.box's blocking API was called on the portal loop; "
                               "use the TaskManager's async methods there")
        portal = get_portal()
        conf = settings()
        manager = portal.call(TaskManager, conf)  # anyio primitives must be made on their loop
        portal.start_task(manager.serve)
        _manager, _manager_pid = manager, os.getpid()
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
        return manager


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    if in_portal_thread():
        raise RuntimeError("hotbox_jupyter.box's blocking API was called on the portal loop; "
                           "use the TaskManager's async methods there")
    return get_portal().call(functools.partial(fn, *args, **kwargs))


def _at_exit() -> None:
    """Cancel this process's running boxes at interpreter exit (the portal's daemon thread still runs)."""
    manager = _manager
    if manager is None or _manager_pid != os.getpid():
        return
    try:
        get_portal().start_task_soon(manager.close, 0.5).result(timeout=60)
    except Exception as exc:  # at exit there is nobody left to raise to
        log.warning("could not cancel running boxes at exit: %s", exc)


def _reset_for_tests() -> None:
    """Stop the manager (cancelling its boxes) and forget settings, so the next call re-reads the environment."""
    global _manager, _settings
    with _lock:
        manager, _manager = _manager, None
        _settings = None
        if manager is not None and _manager_pid == os.getpid():
            get_portal().call(manager.close)


def start(conf: BoxConf | dict[str, Any], *, stdin: bytes | None = None,
          labels: dict[str, str] | None = None) -> TaskInfo:
    """Start a box and return its TaskInfo at once; the container is created and run in the background.

    Refused before anything is pulled, created or billed with ConfigError, BoxDisabledError, ImageDeniedError,
    LimitError, EngineUnavailableError or QuotaExceededError. ``stdin`` is written to the process's stdin,
    then closed.
    """
    manager = _get_manager()
    info: TaskInfo = _call(manager.start, conf, stdin=stdin, labels=labels)
    return info


def wait(task_id: str, timeout: float | None = None) -> TaskResult:
    """Block until the task ends and return its TaskResult; TimeoutError after ``timeout`` seconds."""
    manager = _get_manager()
    res: TaskResult = _call(manager.wait, task_id, timeout)
    return res


def run(conf: BoxConf | dict[str, Any], *, stdin: bytes | None = None) -> TaskResult:
    """Start a box and wait for it: ``start`` then ``wait``."""
    return wait(start(conf, stdin=stdin).id)


def cancel(task_id: str, *, reason: ExitReason = ExitReason.CANCELLED, grace: float = 2.0) -> None:
    """Stop a box and return once its container is gone.

    INTERRUPTED: SIGINT, ``grace`` s, SIGTERM, ``grace`` s, SIGKILL. CANCELLED: SIGTERM, ``grace`` s, SIGKILL.
    Its TaskResult then carries that reason, and bills only the seconds it ran.
    """
    manager = _get_manager()
    _call(manager.cancel, task_id, reason=reason, grace=grace)


def events(task_or_stream_id: str) -> Iterator[Event]:
    """A blocking iterator over the task's events: from the start, then live; the last one is Exit."""
    from .manager import Cursor

    manager = _get_manager()
    manager.status(task_or_stream_id)  # TaskNotFoundError now, not at the first next()

    def gen() -> Iterator[Event]:
        cursor = Cursor()
        while True:
            batch, cursor, done = _call(manager.next_events, task_or_stream_id, cursor)
            yield from batch
            if done:
                return

    return gen()


async def _await_future(fut: concurrent.futures.Future[T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend: park a worker thread on the future instead
        return await anyio.to_thread.run_sync(fut.result, abandon_on_cancel=True)
    return await asyncio.wrap_future(fut)


def aevents(task_or_stream_id: str) -> AsyncIterator[Event]:
    """The same as :func:`events`, as an async iterator usable on any event loop (the kernel's, a widget's)."""
    from .manager import Cursor

    manager = _get_manager()
    manager.status(task_or_stream_id)

    async def gen() -> AsyncIterator[Event]:
        if in_portal_thread():
            async for ev in manager.events(task_or_stream_id):
                yield ev
            return
        portal = get_portal()
        cursor = Cursor()
        while True:
            fut = portal.start_task_soon(manager.next_events, task_or_stream_id, cursor)
            batch, cursor, done = await _await_future(fut)
            for ev in batch:
                yield ev
            if done:
                return

    return gen()


def logs(task_id: str) -> str:
    """The task's whole console so far: stdout and stderr interleaved as they arrived."""
    return _get_manager().logs(task_id)


def status(task_id: str) -> TaskStatus:
    """Where the task is: pending, running, succeeded or failed."""
    return _get_manager().status(task_id)


def result(task_id: str) -> TaskResult | None:
    """The TaskResult if the task ended, else None (does not wait)."""
    return _get_manager().result(task_id)


def tasks() -> list[TaskInfo]:
    """The tasks started by this process, oldest first."""
    return _get_manager().tasks()


def sizes() -> list[SizeProfile]:
    """The seed's size presets with their resources, smallest first."""
    return list(SIZES.values())


def quota() -> QuotaInfo:
    """CUS and tasks used and remaining under the project's plan."""
    from .billing import Ledger

    s = settings()
    return Ledger(s.ledger_path).quota(s.project.id, s.plan)


def enabled() -> bool:
    """Whether Hot Box is enabled (hot.box.enabled in hot.toml, overridden by HOT_BOX_ENABLED)."""
    return settings().enabled


def pool(*, enabled: bool | None = None, size: int | None = None, max_total: int | None = None) -> dict[str, Any]:
    """The warm pools: change any of their settings for this process, then return their status (settings,
    and per pool the boxes ready and being made). Turning them off destroys the warm boxes."""
    manager = _get_manager()
    if enabled is not None or size is not None or max_total is not None:
        _call(_configure_pool, manager, enabled, size, max_total)
    status: dict[str, Any] = _call(_pool_status, manager)
    return status


async def _configure_pool(manager: TaskManager, enabled: bool | None, size: int | None,
                          max_total: int | None) -> None:
    manager.pool.configure(enabled=enabled, size=size, max_total=max_total)


async def _pool_status(manager: TaskManager) -> dict[str, Any]:
    return manager.pool.status()


def warm(conf: BoxConf | dict[str, Any], *, wait: float | None = None) -> int:
    """Fill the warm pool that boxes like ``conf`` come from (pools must be on); with ``wait``, wait up to
    that many seconds for a ready box. Returns the ready boxes of that pool."""
    from .manager import _as_conf

    manager = _get_manager()
    ready: int = _call(manager.pool.warm, _as_conf(conf), wait=wait)
    return ready


def isolation_tiers(*, probe: bool = False) -> list[TierInfo]:
    """Every isolation tier (container, gvisor, microvm) with whether this host runs it, why not, and its
    start cost; ``probe=True`` measures that by starting one trivial box per tier (seconds)."""
    from .tiers import isolation_tiers as tiers

    return tiers(probe=probe)


def available_tiers() -> list[str]:
    """The isolation tiers this host can run, weakest first (what the attack suite runs against)."""
    from .tiers import available_tiers as names

    return names()


def image_policy() -> ImagePolicyInfo:
    """The image policy: "open", with denied names and denied prefixes."""
    return policy.image_policy()
