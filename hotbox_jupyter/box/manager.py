"""The async core of Hot Box: one TaskManager per process runs every box as an anyio task.

``start()`` does every check that can refuse a box (config, enabled, image policy, engine, quota) and
returns a TaskInfo at once; the box is then created, streamed, timed, billed and removed by a
background task in the manager's task group. docker-py blocks, so each of its calls runs in a worker
thread (:mod:`hotbox_jupyter.box.engine`); everything else happens on the manager's event loop, which
for synchronous callers is the shared portal loop (:mod:`hotbox_jupyter.portal`).

Console output is a journal per task (:mod:`hotbox_jupyter.box.journal`), on disk and bounded: a
flood of any size costs a few MB of disk and little memory, and subscribers replay, then follow live.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from anyio.abc import TaskStatus as StartedStatus

from ..errors import (
    BoxDisabledError,
    ConfigError,
    EngineUnavailableError,
    HotboxError,
    ImageError,
    LimitError,
    TaskNotFoundError,
)
from ..events import Event, Exit, Progress, ResultValue, StdoutChunk
from ..frames import FrameDecoder
from ..models import BoxConf, ExitReason, Limits, TaskInfo, TaskResult, TaskStatus
from ..owner import (
    LABEL_OWNER_HOST,
    LABEL_OWNER_PID,
    LABEL_OWNER_START,
    LABEL_TASK,
    dead_owner_dirs,
    owner_alive,
    this_owner,
)
from ..paths import runtimes_dir
from ..settings import Settings
from . import policy
from .billing import Ledger
from .engine import LABEL_ROOT_DISK, LABEL_STATE_DIR, AttachedStream, BoxSpec, Engine, connect_engine, task_labels
from .journal import TAIL_CAP, Cursor, Journal
from .pools import WarmBox, WarmPools, after_start
from .storage import DataDisk, ProjectStorage, destroy_disk_dir, disk_full, disk_limits_unenforceable

__all__ = ["Cursor", "TaskManager", "describe_exit"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a TaskResult holds in memory of the console (its tail); the kept console stays in console_path.
RESULT_CAP = TAIL_CAP
MAX_SPARES = 4
STDOUT, STDERR = 1, 2
_FORK_FAILED = ("fork: Resource temporarily unavailable", "Cannot fork", "can't fork", "fork failed",
                "BlockingIOError: [Errno 11] Resource temporarily unavailable")

_SIGNALS = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE",
            9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}


def describe_exit(code: int) -> str:
    """An exit code in plain words."""
    if code == 0:
        return "exited with code 0 (success)"
    if code == 126:
        return "exited with code 126: the command could not be executed (not executable or permission denied)"
    if code == 127:
        return "exited with code 127: command not found"
    if code > 128 and code - 128 in _SIGNALS:
        sig = code - 128
        return f"exited with code {code}: killed by signal {sig} ({_SIGNALS[sig]})"
    return f"exited with code {code} (failure)"


class _Task:
    """One box: its conf, its life so far, and its journal."""

    def __init__(self, info: TaskInfo, conf: BoxConf, limits: Limits, task_dir: Path,
                 stdin: bytes | None, labels: dict[str, str], settled: anyio.Event | None = None) -> None:
        self.info = info
        self.conf = conf
        self.limits = limits
        self.dir = task_dir
        self.stdin = stdin
        self.labels = labels
        self.status = TaskStatus.PENDING
        self.result: TaskResult | None = None
        self.done = anyio.Event()
        self.journal = Journal(task_dir / "console.log")
        self.container_id: str | None = None
        self.vm_signal: Callable[[str], Awaitable[None]] | None = None  # a microvm box's kill()
        self.cancel_reason: ExitReason | None = None
        self.pending_scope: anyio.CancelScope | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.result_value: Any = None
        self.pids_hit = False
        self.warm: tuple[WarmBox, list[str]] | None = None  # a warm box and its argv, when one was taken
        # Set at the first output or the end (a warm pool refills after it: see WarmPools.take).
        self.settled = settled or anyio.Event()
        self._out = FrameDecoder()
        self._err = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, kind: int, data: bytes) -> None:
        self.settled.set()
        if kind == STDERR:
            self.journal.text("err", self._err.decode(data))
            return
        self._emit(self._out.feed(data))

    def feed_eof(self) -> None:
        self.settled.set()
        self._emit(self._out.close())
        self.journal.text("err", self._err.decode(b"", final=True))

    def _emit(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, StdoutChunk):
                self.journal.text("out", ev.text)
            else:
                if isinstance(ev, ResultValue):
                    self.result_value = ev.value
                self.journal.event(ev)

    def progress(self, text: str) -> None:
        self.journal.event(Progress(text))


class TaskManager:
    """Runs boxes for one process. Create it on an anyio loop, then ``await tg.start(manager.serve)``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage = ProjectStorage.for_settings(settings)
        self.ledger = Ledger(settings.ledger_path)
        self._tasks: dict[str, _Task] = {}
        self._streams: dict[str, _Task] = {}
        self._engine: Engine | None = None
        self._engine_error: str | None = None
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()
        # docker-py calls block a thread each (two per running box); keep them off anyio's shared default limiter.
        self._limiter = anyio.CapacityLimiter(256)
        # Image Env by reference: saves an inspect per box; refreshed if the image disappears.
        self._image_env: dict[str, list[str]] = {}
        # Ready /data disks by (size MB, uid, gid), made after a box took one (see _take_spare).
        self._spares: dict[tuple[int, int, int], Path] = {}
        self._spare_busy: set[tuple[int, int, int]] = set()
        self._tiers_ok: set[str] = set()
        self.pool = WarmPools(self, settings.pool)
        """The warm pools (off unless settings.pool.enabled or ``pool.configure(enabled=True)``)."""

    async def _thread(self, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=abandon)

    # -- life of the manager ------------------------------------------------------------------------

    async def serve(self, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect to the engine, reap leftovers of dead processes, then run boxes until :meth:`close`."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            # Warned (when Hot Box is enabled: a disabled box has no use for an engine); start() says how to fix it.
            with contextlib.suppress(EngineUnavailableError):
                await self._connect(warn=self.settings.enabled)
            if self._engine is not None:
                try:
                    await self._thread(self.reap)
                except HotboxError as exc:
                    log.warning("could not reap boxes of dead processes: %s", exc)
            with contextlib.suppress(Exception):
                await self._thread(self._reap_state_dirs)
                await self._thread(self.ledger.settle_orphans)
            with contextlib.suppress(Exception):
                await self._thread(self.ledger.hold)
            task_status.started()
            await self._stop.wait()
        self.ledger.close()
        if self._engine is not None:
            self._engine.close()

    async def close(self, grace: float = 1.0) -> None:
        """Cancel every running box (waiting until each is gone), forget this process's tasks, stop serving."""
        self._stop.set()
        await self.pool.close()
        await self.shutdown(grace)
        for task in list(self._tasks.values()):
            await self._thread(shutil.rmtree, task.dir, True)
        while self._spare_busy:
            await anyio.sleep(0.01)
        for spare in list(self._spares.values()):
            await self._thread(_remove_owned_dir, spare)
        self._spares.clear()

    async def shutdown(self, grace: float = 1.0) -> None:
        """Cancel every box still running, concurrently; returns once all are gone (used at exit)."""
        async with anyio.create_task_group() as tg:
            for task in list(self._tasks.values()):
                if not task.done.is_set():
                    tg.start_soon(self._cancel, task, ExitReason.CANCELLED, grace)

    async def _connect(self, *, warn: bool) -> Engine:
        if self._engine is not None:
            return self._engine
        try:
            self._engine = await self._thread(connect_engine, self.settings)
            self._engine_error = None
        except EngineUnavailableError as exc:
            if warn:
                log.warning("Hot Box: %s", exc)
            self._engine_error = str(exc)
            raise
        return self._engine

    # -- starting a box -----------------------------------------------------------------------------

    async def start(self, conf: BoxConf | dict[str, Any], *, stdin: bytes | None = None,
                    labels: dict[str, str] | None = None) -> TaskInfo:
        """Check everything that could refuse the box, then start it in the background and return its TaskInfo.

        Raises ConfigError, BoxDisabledError, ImageDeniedError, LimitError, EngineUnavailableError or
        QuotaExceededError; nothing is pulled, created or billed when it does.
        """
        conf = _as_conf(conf)
        if stdin is not None and not isinstance(stdin, bytes | bytearray):
            raise ConfigError.invalid("stdin", type(stdin).__name__, "bytes or None")
        for k, v in (labels or {}).items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise ConfigError.invalid(f"labels[{k!r}]", v, "non-empty string keys with string values")
        if not self.settings.enabled:
            src = self.settings.enabled_source
            how = "HOT_BOX_ENABLED=false" if src == "HOT_BOX_ENABLED" else "hot.box.enabled = false"
            raise BoxDisabledError(f"Hot Box is disabled by {src} ({how}); enable it there to start boxes")
        policy.check_image(conf.image)
        unenforceable = disk_limits_unenforceable()
        if unenforceable is not None:
            raise LimitError(f"the box's disk limits (/data, the hot:// quota, a writable root) cannot be enforced "
                             f"on this host: {unenforceable}; the box is refused rather than run without them")
        if self._tg is None:
            raise HotboxError("the task manager is not serving; start it with `await tg.start(manager.serve)`")
        engine = await self._connect(warn=False)
        if conf.isolation != "container":
            await self._check_tier(engine, conf.isolation)
        limits = conf.limits()
        # A warm box carries its own labels, made before the caller's were known.
        settled = anyio.Event()
        warm = self.pool.take(conf, limits, settled) if labels is None else None
        task_id = warm[0].task_id if warm is not None else f"box-{uuid.uuid4().hex[:12]}"
        hexid = task_id.removeprefix("box-")
        owner = this_owner()
        try:  # billed from here: a warm box's waiting time is not the task's
            await self._thread(lambda: self.ledger.admit(
                task_id=task_id, project=self.settings.project.id, plan=self.settings.plan, size=conf.size.value,
                multiplier=limits.cus_multiplier, network=conf.network, timeout_s=limits.timeout_s, owner=owner,
                image=conf.image))
        except BaseException:
            if warm is not None:
                self.pool.give_back(warm[0])
            raise
        if warm is None and self.pool.warm_total():  # this box takes a concurrency slot a warm one may hold
            self._tg.start_soon(self.pool.trim)
        task_dir = self.settings.state_dir / "tasks" / task_id
        try:
            if warm is None:  # a warm box's directory (owner.json, /data disk) exists already
                task_dir.mkdir(parents=True)
                (task_dir / "owner.json").write_text(json.dumps(
                    {"pid": owner.pid, "start": owner.start, "host": owner.host, "task": task_id}))
            info = TaskInfo(id=task_id, stream_id=f"stream-{hexid}", image=conf.image, size=conf.size,
                            created_at=datetime.now(timezone.utc))
            task = _Task(info, conf, limits, task_dir, bytes(stdin) if stdin is not None else None,
                         task_labels(owner.labels(), task_id, self.settings.project.id, labels), settled)
        except BaseException:
            await self._thread(self.ledger.settle, task_id, 0.0, ExitReason.ERROR.value)
            if warm is not None:
                self.pool.give_back(warm[0])
            else:
                shutil.rmtree(task_dir, ignore_errors=True)
            raise
        task.warm = warm
        self._tasks[task_id] = task
        self._streams[info.stream_id] = task
        if warm is not None:
            self._hand_out(task)
        self._tg.start_soon(self._run_vm if conf.isolation == "microvm" else self._run, task)
        return info

    async def _check_tier(self, engine: Engine, isolation: str) -> None:
        """ConfigError when this host cannot run ``isolation`` (asked once per manager and tier)."""
        from .tiers import unavailable_reason

        if isolation not in self._tiers_ok:
            problem = await self._thread(unavailable_reason, engine, isolation)
            if problem is not None:
                raise ConfigError.invalid("isolation", isolation, f"a tier this host can run ({problem})")
            self._tiers_ok.add(isolation)

    # -- running a box ------------------------------------------------------------------------------

    async def _run(self, task: _Task) -> None:
        engine = self._engine
        assert engine is not None
        disk = (task.warm[0].disk if task.warm is not None
                else DataDisk(task.dir / "disk", task.limits.disk_mb, *_uid_gid(task.limits.user)))
        timed_out = False
        exit_code: int | None = None
        state: dict[str, Any] | None = None
        error: str | None = None
        full: str | None = None
        pumped = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as pending:
                    task.pending_scope = pending
                    if task.warm is not None:
                        assert task.warm[0].stream is not None
                        tg.start_soon(self._pump, task, task.warm[0].stream, pumped)
                        tg.start_soon(self._watch_pids, task)
                    else:
                        await self._prepare(engine, task, disk, tg, pumped)
                task.pending_scope = None
                if task.status is not TaskStatus.RUNNING:  # cancelled before the box ran
                    tg.cancel_scope.cancel()
                else:
                    exit_code, timed_out = await self._supervise(engine, task)
                    # The stream ends when the container's last writer is gone; normally at once.
                    with anyio.move_on_after(10):
                        await pumped.wait()
                    tg.cancel_scope.cancel()
        except Exception as exc:
            error = _failure(task, exc)
        finally:
            with anyio.CancelScope(shield=True):
                task.ended = task.ended or time.monotonic()
                info: dict[str, Any] = {}
                if task.container_id is not None:
                    with contextlib.suppress(HotboxError):
                        inspected = await self._thread(engine.inspect, task.container_id)
                        info = inspected or {}
                        state = info.get("State")
                        # A swarm box's wrapper that would not run it on its node says why (box/swarm.py).
                        error = error or (state or {}).get("Refused")
                full = await self._thread(self._full_disk, engine, task, disk, info)
                if task.container_id is not None:
                    with contextlib.suppress(HotboxError):
                        await self._thread(lambda: engine.remove(task.container_id or "",
                                                                 root_disk=not task.limits.read_only))
                await self._thread(disk.destroy)
                await self._finish(task, exit_code, timed_out, state, error, full)

    def _full_disk(self, engine: Engine, task: _Task, disk: DataDisk, info: dict[str, Any]) -> str | None:
        """Which of the box's disks is full as it ends (checked before they are unmounted), if any."""
        lim = task.limits
        if not lim.read_only and info and engine.root_disk_full(info):
            return _full_message("root", lim)
        if disk_full(disk.path):
            return _full_message("data", lim)
        return self._full_storage()

    def _full_storage(self) -> str | None:
        if disk_full(self.storage.root):
            return f"the project's hot:// storage (/hot, {self.storage.quota_mb} MB, storage_mb in hot.toml)"
        return None

    async def _run_vm(self, task: _Task) -> None:
        """A ``microvm`` box: the same life as :meth:`_run` (cancel, timeout, events, billing) in a Hotcell VM."""
        from .vmtier import prepare_vm_box

        engine = self._engine
        assert engine is not None
        exit_code: int | None = None
        timed_out = False
        state: dict[str, Any] | None = None
        error: str | None = None
        vm = None
        try:
            with anyio.CancelScope() as pending:
                task.pending_scope = pending
                await self._thread(self.storage.ensure)
                vm = await prepare_vm_box(engine, task.conf, task.limits, task.info.id, task.stdin, task.progress,
                                          hot=self.storage.root)
            task.pending_scope = None
            if vm is not None and task.cancel_reason is None:
                task.vm_signal = vm.signal

                def started() -> None:
                    task.started = time.monotonic()
                    task.status = TaskStatus.RUNNING

                exit_code, timed_out, state = await vm.run(task.limits, task.feed, started)
                task.pids_hit = bool(state.get("Pids"))
        except Exception as exc:
            error = _failure(task, exc)
        finally:
            with anyio.CancelScope(shield=True):
                task.ended = task.ended or time.monotonic()
                if vm is not None:
                    await vm.close()
                task.feed_eof()
                full = _full_message(str(state.get("DiskFull")), task.limits) if state else None
                if full is None and vm is not None:
                    full = await self._thread(self._full_storage)
                await self._finish(task, exit_code, timed_out, state, error, full)

    async def _prepare(self, engine: Engine, task: _Task, disk: DataDisk, tg: TaskGroup, pumped: anyio.Event) -> None:
        """Image, /data disk, container, attached stream; then start it. Cancellable until the container runs."""
        conf = task.conf

        async def image_env(*, fresh: bool = False) -> list[str]:
            cached = None if fresh else self._image_env.get(conf.image)
            if cached is not None:
                return cached
            env = await self._thread(engine.image_env, conf.image)
            if env is None:  # not present locally: pull it, telling the subscribers how it goes

                def report(line: str) -> None:
                    anyio.from_thread.run_sync(task.progress, line)

                await self._thread(engine.pull, conf.image, report, abandon=True)
                env = await self._thread(engine.image_env, conf.image) or []
            self._image_env[conf.image] = env
            return env

        streams: list[AttachedStream] = []

        async def create(env: list[str]) -> str:
            spec = BoxSpec(task_id=task.info.id, conf=conf, limits=task.limits, image_env=env,
                           runtimes=runtimes_dir(), storage=self.storage.root, data=disk.path, state_dir=task.dir,
                           labels=task.labels, stdin=task.stdin is not None, stdin_data=task.stdin,
                           extra_env={"TINI_KILL_PROCESS_GROUP": "1", "HOTBOX_TASK_ID": task.info.id})
            with anyio.CancelScope(shield=True):  # a created container must be recorded, or it would leak
                cid = await self._thread(engine.create, spec)
                task.container_id = cid
            return cid

        async def container() -> None:
            try:
                cid = await create(await image_env())
            except ImageError:
                if conf.image not in self._image_env:
                    raise
                # The image went away since we last looked (the Env cache saved a round trip): look again.
                self._image_env.pop(conf.image, None)
                cid = await create(await image_env(fresh=True))
            streams.append(await self._thread(engine.attach, cid, task.stdin is not None))
            tg.start_soon(self._pump, task, streams[0], pumped)

        async def make_disk() -> None:
            if not await self._thread(self._take_spare, disk):
                await self._thread(disk.create)

        # The container only needs the disk's mount point to exist; the disk itself must be mounted
        # there before start. So image look-up, create and attach run alongside mkfs and mount.
        await self._thread(disk.path.mkdir, 0o755, True, True)
        async with anyio.create_task_group() as prep:
            prep.start_soon(container)
            if engine.local_data:
                prep.start_soon(make_disk)
            prep.start_soon(self._thread, self.storage.ensure)
        assert task.container_id is not None
        stream = streams[0]
        with anyio.CancelScope(shield=True):
            await self._thread(engine.start, task.container_id)
            task.started = time.monotonic()
            task.status = TaskStatus.RUNNING
        if disk.enforced:  # the next box of this size will find its disk ready (made off its critical path,
            # once this one showed its first output: mkfs and mount would compete with its start)
            self._tg_start(self._make_spare, disk.size_mb, disk.uid, disk.gid, task.settled)
        if task.stdin is not None:
            tg.start_soon(self._thread, stream.write_stdin, task.stdin)
        tg.start_soon(self._watch_pids, task)

    def _hand_out(self, task: _Task) -> None:
        """Give a warm box its job, from start() itself: no engine call, no thread, one write on the attach
        connection it already has (what the socket does not take at once goes on from a worker thread)."""
        assert task.warm is not None
        box, argv = task.warm
        assert box.container_id is not None and box.stream is not None
        # The box's environment already holds the image's and ours; the job adds the conf's on top.
        job = box.job(argv, dict(task.conf.env), task.stdin)
        task.container_id = box.container_id
        task.started = time.monotonic()
        task.status = TaskStatus.RUNNING
        sent = box.stream.send_now(job)
        if sent < len(job) or not box.stream.pollable:
            assert self._tg is not None
            self._tg.start_soon(self._thread, box.stream.write_stdin, job[sent:])
        else:
            box.stream.write_stdin(b"")  # closes its stdin: no data left, so it does not block

    async def _pump(self, task: _Task, stream: AttachedStream, pumped: anyio.Event) -> None:
        """Feed the box's output to its task as it comes: woken by the event loop when the socket is
        readable (no worker thread and no thread hop per read), or from a worker thread for a stream
        the loop cannot wait on (a swarm service's log)."""
        try:
            while True:
                if stream.pollable:
                    await anyio.wait_readable(stream.sock)
                    frames = stream.read_ready()
                else:
                    frames = await self._thread(stream.read_frames, abandon=True)
                if frames is None:
                    break
                for kind, data in frames:
                    task.feed(kind, data)
        finally:
            stream.close()
            task.feed_eof()
            pumped.set()

    async def _watch_pids(self, task: _Task) -> None:
        """Best effort: notice the pids cgroup refusing a fork (the cgroup is gone once the box stops)."""
        cid = task.container_id
        candidates = [Path(f"/sys/fs/cgroup/pids/docker/{cid}/pids.events"),
                      Path(f"/sys/fs/cgroup/docker/{cid}/pids.events"),
                      Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/pids.events")]
        path = next((p for p in candidates if p.exists()), None)
        while path is not None and not task.pids_hit:
            try:
                text = path.read_text()
            except OSError:
                return
            task.pids_hit = any(line.split()[:1] == ["max"] and line.split()[1] != "0"
                                for line in text.splitlines() if len(line.split()) == 2)
            await anyio.sleep(0.1)

    async def _supervise(self, engine: Engine, task: _Task) -> tuple[int | None, bool]:
        """Wait for the box to end, killing it at its timeout. Returns (exit code, timed out)."""
        cid = task.container_id
        assert cid is not None
        timed_out = False
        code: int | None = None
        with anyio.move_on_after(task.limits.timeout_s):
            # Asked once the box showed output or ended: building the wait's HTTP request is a few ms of
            # Python in a worker thread, which would hold up the event loop reading the first byte (GIL).
            await task.settled.wait()
            code = await self._thread(engine.wait, cid, abandon=True)
        if code is None:
            if task.cancel_reason is None:
                timed_out = True
            await self._thread(engine.kill, cid, "SIGKILL")
            code = await self._thread(engine.wait, cid)
        task.ended = time.monotonic()
        return code, timed_out

    async def _finish(self, task: _Task, exit_code: int | None, timed_out: bool, state: dict[str, Any] | None,
                      error: str | None, full: str | None = None) -> None:
        lim = task.limits
        duration = (task.ended - task.started) if (task.started and task.ended) else 0.0
        err_tail = bytes(task.journal.err_tail[-4096:]).decode(errors="replace")
        if task.cancel_reason is not None:
            reason = task.cancel_reason
            message = ("interrupted: the box got SIGINT (then SIGTERM/SIGKILL if it did not stop)"
                       if reason is ExitReason.INTERRUPTED else "cancelled: the box was stopped by cancel()")
            if exit_code is None:
                message += " before it started"
        elif error is not None:
            reason, message = ExitReason.ERROR, error
        elif state and state.get("NodeLost"):
            reason, exit_code = ExitReason.NODE_LOST, None
            message = (f"node lost: the cluster node running the box went down (node {state.get('NodeID')}); "
                       "its output up to then is kept")
        elif timed_out:
            reason = ExitReason.TIMEOUT
            message = f"timed out: killed after its timeout of {lim.timeout_s} s (timeout={lim.timeout_s})"
        elif state and state.get("OOMKilled"):
            reason = ExitReason.OOM
            message = (f"out of memory: the box hit its memory limit of {lim.memory_mb} MB and was killed "
                       "(give it more with memory=... or a bigger size)")
        elif exit_code not in (None, 0) and (full is not None or "No space left on device" in err_tail):
            reason = ExitReason.DISK
            where = full or f"a disk (/tmp is {lim.tmp_mb} MB, /data {lim.disk_mb} MB)"
            message = (f"disk full: the box filled {where} and got 'No space left on device'; "
                       f"{describe_exit(exit_code)}")
        elif exit_code not in (None, 0) and (task.pids_hit or any(s in err_tail for s in _FORK_FAILED)):
            reason = ExitReason.PIDS
            message = (f"process limit reached: the box may run at most {lim.pids} processes and a fork failed; "
                       f"{describe_exit(exit_code)}")
        else:
            reason = ExitReason.EXITED
            message = describe_exit(exit_code) if exit_code is not None else "the box ended without an exit code"
        cus = await self._thread(self.ledger.settle, task.info.id, duration, reason.value)
        console, truncated = await self._thread(task.journal.console_tail)
        j = task.journal
        task.result = TaskResult(
            id=task.info.id,
            status=TaskStatus.SUCCEEDED if reason is ExitReason.EXITED and exit_code == 0 else TaskStatus.FAILED,
            exit_code=exit_code,
            reason=reason,
            message=message,
            console_output=console,
            stdout=bytes(j.out_tail[-RESULT_CAP:]).decode(errors="replace"),
            stderr=bytes(j.err_tail[-RESULT_CAP:]).decode(errors="replace"),
            result=task.result_value,
            duration=round(duration, 3),
            cus=round(cus, 6),
            truncated=truncated or j.out_total > RESULT_CAP or j.err_total > RESULT_CAP,
            console_path=str(j.path),
        )
        task.status = task.result.status
        j.out_tail, j.err_tail = bytearray(), bytearray()  # the result holds what is kept now
        task.journal.event(Exit(reason=reason, exit_code=exit_code, message=message))
        task.done.set()

    # -- spare /data disks --------------------------------------------------------------------------

    def _tg_start(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._tg is not None and not self._stop.is_set():
            self._tg.start_soon(fn, *args)

    # What the warm pools (box/pools.py) use of the manager: its task group, engine, threads and disks.
    spawn = _tg_start

    async def engine(self) -> Engine:
        """The engine, connecting first if need be (EngineUnavailableError if it does not answer)."""
        return await self._connect(warn=False)

    def engine_or_none(self) -> Engine | None:
        return self._engine

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in a worker thread of the manager's own limiter."""
        return await self._thread(fn, *args)

    def take_spare(self, disk: DataDisk) -> bool:
        return self._take_spare(disk)

    @staticmethod
    def remove_owned_dir(d: Path) -> None:
        _remove_owned_dir(d)

    def _take_spare(self, disk: DataDisk) -> bool:
        """Move a ready spare disk of the same size and owner into place; False if there is none.

        A box's critical path then has no mkfs and no mount in it. Renaming the directory that holds
        the mount point carries the mount along.
        """
        spare = self._spares.pop((disk.size_mb, disk.uid, disk.gid), None)
        if spare is None:
            return False
        for empty in (disk.path, disk.task_dir):  # the mount point made for the container's create
            with contextlib.suppress(OSError):
                empty.rmdir()
        try:
            os.rename(spare / "disk", disk.task_dir)
        except OSError as exc:
            log.debug("spare disk %s not usable: %s", spare, exc)
            _remove_owned_dir(spare)
            disk.path.mkdir(parents=True, exist_ok=True)
            return False
        shutil.rmtree(spare, ignore_errors=True)
        disk.enforced = True
        return True

    async def _make_spare(self, size_mb: int, uid: int, gid: int, after: anyio.Event | None = None) -> None:
        key = (size_mb, uid, gid)
        if key in self._spares or key in self._spare_busy:
            return
        self._spare_busy.add(key)
        try:
            if after is not None:  # made once the box that used the last one showed output
                await after_start(after)
            spare = self.settings.state_dir / "spare" / uuid.uuid4().hex[:12]

            def make() -> bool:
                spare.mkdir(parents=True)
                owner = this_owner()
                (spare / "owner.json").write_text(json.dumps({"pid": owner.pid, "start": owner.start,
                                                              "host": owner.host}))
                d = DataDisk(spare / "disk", size_mb, uid, gid)
                d.create()
                if not d.enforced:
                    _remove_owned_dir(spare)
                return d.enforced

            with anyio.CancelScope(shield=True):
                try:
                    ok = await self._thread(make)
                except HotboxError as exc:  # a spare is an optimisation: the box itself says what failed
                    log.debug("no spare disk: %s", exc)
                    ok = False
            if ok:
                if self._stop.is_set():
                    await self._thread(_remove_owned_dir, spare)
                    return
                self._spares[key] = spare
                while len(self._spares) > MAX_SPARES:  # a few sizes in use at once is plenty
                    oldest = next(iter(self._spares))
                    await self._thread(_remove_owned_dir, self._spares.pop(oldest))
        except OSError as exc:
            log.debug("no spare disk: %s", exc)
        finally:
            self._spare_busy.discard(key)

    # -- cancelling ---------------------------------------------------------------------------------

    async def cancel(self, task_id: str, *, reason: ExitReason = ExitReason.CANCELLED, grace: float = 2.0) -> None:
        """Stop a box and return once it is gone.

        INTERRUPTED: SIGINT, ``grace`` s, SIGTERM, ``grace`` s, SIGKILL. CANCELLED: SIGTERM, ``grace`` s, SIGKILL.
        A box that already ended is left as it was.
        """
        if reason not in (ExitReason.CANCELLED, ExitReason.INTERRUPTED):
            raise ConfigError.invalid("reason", reason, "ExitReason.CANCELLED or ExitReason.INTERRUPTED")
        if grace < 0:
            raise ConfigError.invalid("grace", grace, "seconds >= 0")
        await self._cancel(self._task(task_id), reason, grace)

    async def _cancel(self, task: _Task, reason: ExitReason, grace: float) -> None:
        if task.done.is_set():
            return
        if task.cancel_reason is None:
            task.cancel_reason = reason
        if task.pending_scope is not None:
            task.pending_scope.cancel()
        engine = self._engine
        signals = ["SIGINT", "SIGTERM"] if reason is ExitReason.INTERRUPTED else ["SIGTERM"]
        for sig in [*signals, "SIGKILL"]:
            # The container may still be being created: wait for it, briefly, rather than miss it.
            with anyio.move_on_after(grace if sig != "SIGKILL" else 0):
                while task.container_id is None and task.vm_signal is None and not task.done.is_set():
                    await anyio.sleep(0.02)
            if task.done.is_set():
                return
            if task.vm_signal is not None and task.status is TaskStatus.RUNNING:
                await task.vm_signal(sig)
            elif task.container_id is not None and engine is not None and task.status is TaskStatus.RUNNING:
                with contextlib.suppress(HotboxError):
                    await self._thread(engine.kill, task.container_id, sig)
            if sig == "SIGKILL":
                break
            with anyio.move_on_after(grace):
                await task.done.wait()
            if task.done.is_set():
                return
        await task.done.wait()

    # -- queries ------------------------------------------------------------------------------------

    def _task(self, task_or_stream_id: str) -> _Task:
        task = self._tasks.get(task_or_stream_id) or self._streams.get(task_or_stream_id)
        if task is None:
            raise TaskNotFoundError(f"no task or stream {task_or_stream_id!r} in this process")
        return task

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """The task's result once it ended; TimeoutError if that takes longer than ``timeout`` seconds."""
        task = self._task(task_id)
        if timeout is None:
            await task.done.wait()
        else:
            try:
                with anyio.fail_after(timeout):
                    await task.done.wait()
            except TimeoutError:
                raise TimeoutError(f"task {task_id} did not end within {timeout} s") from None
        assert task.result is not None
        return task.result

    async def next_events(self, task_or_stream_id: str, cursor: Cursor) -> tuple[list[Event], Cursor, bool]:
        """The events after ``cursor`` (waiting for at least one); the last batch ends with Exit and True."""
        return await self._task(task_or_stream_id).journal.next(cursor)

    async def events(self, task_or_stream_id: str) -> AsyncIterator[Event]:
        """Every event of a task from the start, then live, ending with Exit (for callers on this loop)."""
        cursor = Cursor()
        while True:
            batch, cursor, done = await self.next_events(task_or_stream_id, cursor)
            for ev in batch:
                yield ev
            if done:
                return

    def logs(self, task_id: str) -> str:
        """The whole console so far (stdout and stderr interleaved as they arrived); safe from any thread."""
        task = self._task(task_id)
        try:
            return task.journal.console()
        except FileNotFoundError:
            return ""

    def status(self, task_id: str) -> TaskStatus:
        return self._task(task_id).status

    def result(self, task_id: str) -> TaskResult | None:
        return self._task(task_id).result

    def tasks(self) -> list[TaskInfo]:
        return [t.info for t in self._tasks.values()]

    # -- leaks --------------------------------------------------------------------------------------

    def reap(self) -> list[str]:
        """Remove boxes (and their /data disks) whose owner process is dead; returns the task ids reaped.

        Blocking: runs in a worker thread at start-up. Any process may reap any dead owner's boxes.
        """
        engine = self._engine
        if engine is None:
            return []
        reaped = []
        for c in engine.managed():
            labels = c.get("Labels") or {}
            if owner_alive(labels.get(LABEL_OWNER_PID), labels.get(LABEL_OWNER_START), labels.get(LABEL_OWNER_HOST)):
                continue
            task_id = labels.get(LABEL_TASK, "")
            log.info("reaping box %s (task %s) of dead process %s", c["Id"][:12], task_id,
                     labels.get(LABEL_OWNER_PID))
            engine.remove(c["Id"], root_disk=LABEL_ROOT_DISK in labels)
            state = labels.get(LABEL_STATE_DIR)
            if state and task_id:
                _remove_task_dir(Path(state), task_id)
            reaped.append(task_id)
        return reaped

    def _reap_state_dirs(self) -> None:
        """Remove task and spare directories (unmounting their disks) of dead processes."""
        for kind in ("tasks", "spare"):
            for d in dead_owner_dirs(self.settings.state_dir / kind):
                _remove_owned_dir(d)


def _remove_owned_dir(d: Path) -> None:
    """Unmount the disk a task or spare directory holds, then delete the directory."""
    destroy_disk_dir(d / "disk")
    shutil.rmtree(d, ignore_errors=True)


def _remove_task_dir(task_dir: Path, task_id: str) -> None:
    # The path comes from a container label: only touch what looks like one of our task directories.
    if task_dir.name != task_id or task_dir.parent.name != "tasks" or not (task_dir / "owner.json").is_file():
        return
    destroy_disk_dir(task_dir / "disk")
    shutil.rmtree(task_dir, ignore_errors=True)


def _as_conf(conf: Any) -> BoxConf:
    if isinstance(conf, BoxConf):
        return conf
    if not isinstance(conf, dict):
        raise ConfigError.invalid("conf", type(conf).__name__, "a BoxConf or a dict of BoxConf fields")
    parsed: BoxConf = BoxConf.model_validate(conf)
    return parsed


def _full_message(which: str, lim: Limits) -> str | None:
    """What a full disk of a box is called in its result: ``which`` is "root" or "data" (else None)."""
    return {"root": f"its writable root filesystem ({lim.disk_mb} MB, the size's disk)",
            "data": f"/data ({lim.disk_mb} MB, disk-size)"}.get(which)


def _failure(task: _Task, exc: Exception) -> str:
    """The error message of a task that failed with ``exc`` (a bug is logged with its traceback)."""
    leaf = _leaf(exc)
    if isinstance(leaf, HotboxError):
        log.info("task %s failed: %s", task.info.id, leaf)
        return str(leaf)
    # A bug must not leave the box behind nor hang its waiters.
    log.error("task %s crashed", task.info.id, exc_info=exc)
    return f"internal error: {leaf!r}"


def _leaf(exc: BaseException) -> BaseException:
    """The exception that matters inside task-group wrapping: the first HotboxError, else the first leaf."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_leaf(e) for e in exc.exceptions]
        return next((e for e in leaves if isinstance(e, HotboxError)), leaves[0] if leaves else exc)
    return exc


def _uid_gid(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)

