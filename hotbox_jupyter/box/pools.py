"""Warm pools: boxes created, attached and started before a cell asks for one.

A cold box pays the engine's create, attach and start (most of it runc setting up namespaces, mounts
and cgroups) before its first byte. A warm box has paid all of that already: it is a container made
from the very same :class:`~hotbox_jupyter.box.engine.BoxSpec` as a cold box of the same conf (same
image, limits, user, read-only root, capabilities, network, mounts), whose first process is a tiny
*waiter* from ``runtimes/``, blocked on its stdin. Handing it out is one write on the attach connection
that is already open: the job (the command and environment the cell needs), then the cell's stdin.

* ``runtimes/pool/wait.sh`` (POSIX sh, any image): reads ``N`` then N lines of shell (``export``\\s and
  an ``exec``) and evaluates them, so the program replaces the waiter under tini.
* ``runtimes/python/pool_waiter.py``, for boxes whose command is the Python cell runner: the interpreter
  is up and the runner imported, so the cell runs at once (anything else is ``execvpe``'d).

A pool is keyed by :class:`PoolKey` (image, limits, network, isolation, waiter). Pools are filled in the
background after a cell of that kind ran cold (or when :meth:`WarmPools.warm` asks), refilled after each
hand-out (once the box handed out showed output), bounded per pool (``size``) and in total
(``max_total``, and never more than the plan's ``max_concurrent`` minus the boxes running in the
project, so warm boxes only take free slots and give them back when a cold box needs one). A warm box is
used once: its task removes it like any box. Billing starts at hand-out (the ledger admits the task
then; a waiting box is not a task). Warm boxes carry the owner labels and a task directory with
``owner.json``, so the reaper of the next process finds what a crashed one left. Off by default:
``[hot.pool] enabled = true``, ``HOTBOX_POOL=on|N``, or ``%hotbox config --pool on``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import select
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import ConfigError, HotboxError
from ..models import BoxConf, Limits
from ..owner import this_owner
from ..paths import GUEST_RUNTIMES, runtimes_dir
from ..settings import MAX_POOL_SIZE, MAX_POOL_TOTAL, PoolSettings
from .engine import AttachedStream, BoxSpec, Engine, task_labels
from .storage import DataDisk

if TYPE_CHECKING:
    from .manager import TaskManager

__all__ = ["PYTHON_CELL", "PoolKey", "WarmBox", "WarmPools", "after_start", "resolve_argv", "runs_in_place"]

log = logging.getLogger(__name__)

# The Python cell runner's command (the %%hotbox magic's): boxes running it get the Python waiter.
PYTHON_CELL = ["python3", "-u", f"{GUEST_RUNTIMES}/python/cell.py"]
SH_WAITER = ["/bin/sh", f"{GUEST_RUNTIMES}/pool/wait.sh"]
PYTHON_WAITER = ["python3", "-u", f"{GUEST_RUNTIMES}/python/pool_waiter.py"]
READY = b"hotbox-pool-ready\n"
READY_TIMEOUT_S = 30.0
# After a pool failed to make a box, it waits this long before trying again.
BACKOFF_S = 30.0
# Work that would compete with a box's start (a pool's refill, a spare /data disk) waits for the box's
# first output or end, but no longer than this.
AFTER_START_S = 1.0
LABEL_POOL = "io.hotbox.pool"
_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


async def after_start(settled: anyio.Event) -> None:
    """Wait until a box showed its first output or ended (``settled``), at most :data:`AFTER_START_S`."""
    with anyio.move_on_after(AFTER_START_S):
        await settled.wait()


def runs_in_place(env: dict[str, str]) -> bool:
    """Whether the Python waiter runs the cell runner with ``env`` in its own interpreter: nothing in it
    changes how an interpreter starts (the waiter makes the same check, ``pool_waiter._same_start``)."""
    return all(not (k.startswith("PYTHON") or k in ("LANG", "LC_ALL", "LC_CTYPE"))
               or (k == "PYTHONUNBUFFERED" and v) for k, v in env.items())


def resolve_argv(entrypoint: list[str] | None, cmd: list[str] | None, image_entrypoint: list[str] | None,
                 image_cmd: list[str] | None) -> list[str]:
    """The argv a container of this entrypoint and cmd would run, by dockerd's rules: an entrypoint left
    out takes the image's and so does a cmd left out with it; ``[""]`` clears the entrypoint."""
    if not entrypoint:
        if not cmd:
            cmd = image_cmd
        if entrypoint is None:
            entrypoint = image_entrypoint
    entry = [] if entrypoint == [""] else list(entrypoint or [])
    return [*entry, *(cmd or [])]


@dataclass(frozen=True)
class PoolKey:
    """What makes two boxes interchangeable before their command is known."""

    image: str
    limits: tuple[Any, ...]
    network: str
    isolation: str
    waiter: str  # "sh" or "python"
    limits_writable: bool = False  # a writable root has a disk of its own to unmount when the box goes

    def label(self) -> str:
        """A short stable name, put on the containers of this pool."""
        return f"{self.image}|{self.waiter}|" + "|".join(map(str, self.limits))


@dataclass
class WarmBox:
    """One started container waiting for its job."""

    key: PoolKey
    task_id: str
    dir: Path
    disk: DataDisk
    labels: dict[str, str]
    env: dict[str, str]
    container_id: str | None = None
    stream: AttachedStream | None = None
    made_at: float = field(default_factory=time.monotonic)

    def waiting(self) -> bool:
        """Whether the waiter still waits: its attach stream has nothing to read (no output, no end)."""
        if self.stream is None:
            return False
        try:
            readable, _, _ = select.select([self.stream.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def job(self, argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> bytes:
        """The bytes that turn the waiter into ``argv`` with ``env`` and give it ``stdin`` (see the module
        docstring). A cell the Python waiter runs in place gets its code inside the job, so that it starts
        at once rather than after the end of stdin (which travels through dockerd and containerd)."""
        if self.key.waiter == "python":
            job: dict[str, Any] = {"argv": argv, "env": env}
            if stdin and argv == PYTHON_CELL and runs_in_place(env):
                job["stdin"] = base64.b64encode(stdin).decode()
                stdin = None
            body = json.dumps(job).encode()
            return b"%d\n" % len(body) + body + (stdin or b"")
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
        text = "\n".join(lines) + "\n"
        return f"{text.count(chr(10))}\n{text}".encode() + (stdin or b"")


@dataclass
class _Pool:
    base: BoxConf  # the conf without command and env: what the containers are made from
    limits: Limits
    ready: list[WarmBox] = field(default_factory=list)
    filling: int = 0  # boxes being made now
    filler: bool = False  # one filler per pool at a time
    failed_until: float = 0.0
    changed: anyio.Event = field(default_factory=anyio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class WarmPools:
    """The warm pools of one TaskManager (which owns the engine, the task group and the ledger)."""

    def __init__(self, manager: TaskManager, conf: PoolSettings) -> None:
        self._m = manager
        self.enabled = conf.enabled
        self.size = conf.size
        self.max_total = conf.max_total
        self._pools: dict[PoolKey, _Pool] = {}
        self._image_cfg: dict[str, dict[str, Any]] = {}
        self._boxes: dict[str, WarmBox] = {}  # every warm box that exists, ready or being made
        self._closing = False
        self._busy = 0

    # -- settings -----------------------------------------------------------------------------------

    def configure(self, *, enabled: bool | None = None, size: int | None = None,
                  max_total: int | None = None) -> None:
        """Change the pools at run time (``%hotbox config --pool``); turning them off empties them."""
        if size is not None and not (isinstance(size, int) and 1 <= size <= MAX_POOL_SIZE):
            raise ConfigError.invalid("pool size", size, f"warm boxes per pool, 1..{MAX_POOL_SIZE}")
        if max_total is not None and not (isinstance(max_total, int) and 1 <= max_total <= MAX_POOL_TOTAL):
            raise ConfigError.invalid("pool max_total", max_total, f"warm boxes in all, 1..{MAX_POOL_TOTAL}")
        if enabled is not None:
            self.enabled = bool(enabled)
        self.size = size or self.size
        self.max_total = max_total or self.max_total
        self._spawn(self.trim)
        if self.enabled:
            for key in list(self._pools):
                self._spawn(self._fill, key)

    def status(self) -> dict[str, Any]:
        """Settings and, per pool, the boxes ready and being made."""
        return {"enabled": self.enabled, "size": self.size, "max_total": self.max_total,
                "pools": [{"image": k.image, "waiter": k.waiter, "network": k.network, "isolation": k.isolation,
                           "size": p.limits.size.value, "ready": len(p.ready), "filling": p.filling}
                          for k, p in self._pools.items()]}

    def warm_total(self) -> int:
        """Warm boxes that exist now (ready or being made)."""
        return len(self._boxes)

    # -- which pool a conf belongs to ---------------------------------------------------------------

    def _argv(self, conf: BoxConf) -> list[str] | None:
        cfg = self._image_cfg.get(conf.image)
        if cfg is None:
            return None
        entrypoint, cmd = BoxSpec(task_id="", conf=conf, limits=conf.limits(), image_env=[], runtimes=Path(),
                                  storage=Path(), data=Path(), state_dir=Path(), labels={}).command()
        return resolve_argv(entrypoint, cmd, cfg.get("Entrypoint"), cfg.get("Cmd")) or None

    @staticmethod
    def key(conf: BoxConf, limits: Limits, argv: list[str]) -> PoolKey | None:
        """The pool of a box running ``argv``, or None if such a box cannot come from a pool."""
        isolation = str(getattr(conf.isolation, "value", conf.isolation))
        if isolation == "microvm":
            return None
        waiter = "python" if argv == PYTHON_CELL else "sh"
        if waiter == "sh" and not all(_SH_NAME.match(k) for k in conf.env):
            return None  # sh cannot export such a name; a cold box can still have it
        lim = limits.model_dump(exclude={"timeout_s", "cus_multiplier", "size"})
        return PoolKey(conf.image, tuple(sorted((k, str(v)) for k, v in lim.items())), conf.network,
                       isolation, waiter, not limits.read_only)

    # -- hand-out -----------------------------------------------------------------------------------

    def take(self, conf: BoxConf, limits: Limits,
             settled: anyio.Event | None = None) -> tuple[WarmBox, list[str]] | None:
        """A ready warm box for ``conf`` and the argv to give it, or None (the box then starts cold).

        Either way the pool of ``conf`` is (re)filled in the background. After a hand-out the refill
        waits until ``settled`` is set (the caller's box showed its first output or ended), at most
        :data:`AFTER_START_S`: making a box is a few hundred ms of dockerd, containerd and runc work,
        which on a small machine would otherwise compete with the cell it was handed to.
        """
        handed = False
        if not self.enabled or self._closing or not self._local():
            return None
        argv = self._argv(conf)
        if argv is None:
            if conf.image not in self._image_cfg:
                self._spawn(self._learn, conf, limits)
            return None
        key = self.key(conf, limits, argv)
        if key is None:
            return None
        pool = self._pool(key, conf, limits)
        try:
            while pool.ready:
                box = pool.ready.pop(0)
                del self._boxes[box.task_id]
                if box.waiting():
                    handed = True
                    return box, argv
                log.warning("warm pool %s: box %s ended while it waited; removing it", key.image, box.task_id)
                self._spawn(self._destroy, box)
            return None
        finally:
            pool.notify()
            if handed and settled is not None:
                self._spawn(self._fill_after, key, settled)
            else:
                self._spawn(self._fill, key)

    def give_back(self, box: WarmBox) -> None:
        """A box taken but not used (its task was refused): ready again, at the front."""
        self._boxes[box.task_id] = box  # so that close() finds it, even if it is closing now
        pool = self._pools.get(box.key)
        if pool is None or self._closing:
            self._spawn(self._destroy, box)
            return
        pool.ready.insert(0, box)
        pool.notify()

    async def warm(self, conf: BoxConf, *, wait: float | None = None) -> int:
        """Make sure the pool of ``conf`` exists and is filling; with ``wait``, wait up to that many seconds
        until it holds a ready box. Returns the boxes ready in it."""
        if not self.enabled:
            raise ConfigError.invalid("pool", "off", "turned on first: [hot.pool] enabled = true, HOTBOX_POOL=on, "
                                                     "or %hotbox config --pool on")
        limits = conf.limits()
        await self._m.engine()
        if not self._local():
            raise ConfigError.invalid("hot.cluster.engine", "swarm", "local: warm pools need the local Docker engine")
        await self._learn(conf, limits)
        argv = self._argv(conf)
        key = self.key(conf, limits, argv) if argv else None
        if key is None:
            raise ConfigError.invalid("conf", conf.image, "a container box with a command (microvm boxes and "
                                                          "commands the image does not define are not pooled)")
        pool = self._pool(key, conf, limits)
        self._spawn(self._fill, key)
        if wait is not None:
            with anyio.move_on_after(wait):
                while not pool.ready:
                    await pool.changed.wait()
        return len(pool.ready)

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn`` in the manager's task group, where an exception would stop every box: log it instead."""

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception as exc:
                log.warning("warm pools: %s", exc, exc_info=not isinstance(exc, HotboxError))

        self._m.spawn(guarded)

    def _local(self) -> bool:
        """Pools need the local engine: a swarm cannot attach to a box, nor make its /data here."""
        engine = self._m.engine_or_none()
        return engine is not None and engine.local_data

    def _pool(self, key: PoolKey, conf: BoxConf, limits: Limits) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            base = conf.model_copy(update={"script": None, "cmd": None, "entrypoint": None, "env": {}})
            pool = self._pools[key] = _Pool(base, limits)
        return pool

    async def _learn(self, conf: BoxConf, limits: Limits) -> None:
        """Look up the image's entrypoint and cmd, then start filling the pool ``conf`` belongs to."""
        if conf.image not in self._image_cfg:
            engine = await self._m.engine()
            cfg = await self._m.thread(engine.image_config, conf.image)
            if cfg is None:
                return  # not here yet: the cold box pulls it, the next cell fills the pool
            self._image_cfg[conf.image] = cfg
        argv = self._argv(conf)
        key = self.key(conf, limits, argv) if argv else None
        if key is not None and self.enabled:
            self._pool(key, conf, limits)
            await self._fill(key)

    # -- filling ------------------------------------------------------------------------------------

    async def _allowed_total(self) -> int:
        """How many warm boxes may exist: max_total, and only the plan's free concurrency slots."""
        settings = self._m.settings
        quota = await self._m.thread(self._m.ledger.quota, settings.project.id, settings.plan)
        return max(0, min(self.max_total, settings.plan.max_concurrent - quota.running))

    async def _fill_after(self, key: PoolKey, settled: anyio.Event) -> None:
        await after_start(settled)
        await self._fill(key)

    async def _fill(self, key: PoolKey) -> None:
        pool = self._pools.get(key)
        if pool is None or pool.filler:
            return
        pool.filler = True
        self._busy += 1
        try:
            while self.enabled and not self._closing and time.monotonic() >= pool.failed_until:
                allowed = await self._allowed_total()
                # Nothing awaits between this check and _make registering its box: fillers cannot overshoot.
                if len(pool.ready) >= self.size or self.warm_total() >= allowed:
                    break
                pool.filling = 1
                try:
                    box = await self._make(key, pool)
                finally:
                    pool.filling = 0
                if box is None:
                    pool.failed_until = time.monotonic() + BACKOFF_S
                    break
                if self._closing or not self.enabled:
                    await self._destroy(box)
                    break
                pool.ready.append(box)
                pool.notify()
        finally:
            pool.filler = False
            self._busy -= 1

    async def _make(self, key: PoolKey, pool: _Pool) -> WarmBox | None:
        """Create, attach, start one box and wait for its waiter to say it is ready; None if that failed."""
        m = self._m
        limits = pool.limits
        hexid = uuid.uuid4().hex[:12]
        task_id = f"box-{hexid}"
        owner = this_owner()
        task_dir = m.settings.state_dir / "tasks" / task_id
        uid, _, gid = limits.user.partition(":")
        box = WarmBox(key=key, task_id=task_id, dir=task_dir,
                      disk=DataDisk(task_dir / "disk", limits.disk_mb, int(uid), int(gid or uid)),
                      labels=task_labels(owner.labels(), task_id, m.settings.project.id, {LABEL_POOL: key.label()}),
                      env={})
        self._boxes[task_id] = box
        try:
            engine = await m.engine()
            with anyio.CancelScope(shield=True):  # a container made must be recorded, or it would leak
                await m.thread(self._make_blocking, engine, box, pool, owner)
            return box
        except (HotboxError, OSError) as exc:
            log.warning("warm pool %s: could not make a box: %s (trying again in %d s)", key.image, exc, BACKOFF_S)
        except Exception as exc:
            log.error("warm pool %s: could not make a box", key.image, exc_info=exc)
        with anyio.CancelScope(shield=True):
            await self._destroy(box)
        return None

    def _make_blocking(self, engine: Engine, box: WarmBox, pool: _Pool, owner: Any) -> None:
        m = self._m
        box.dir.mkdir(parents=True)
        (box.dir / "owner.json").write_text(json.dumps(
            {"pid": owner.pid, "start": owner.start, "host": owner.host, "task": box.task_id}))
        if not m.take_spare(box.disk):
            box.disk.create()
        m.storage.ensure()
        image_env = list(self._image_cfg.get(box.key.image, {}).get("Env") or [])
        spec = BoxSpec(task_id=box.task_id, conf=pool.base, limits=pool.limits, image_env=image_env,
                       runtimes=runtimes_dir(), storage=m.storage.root, data=box.disk.path, state_dir=box.dir,
                       labels=box.labels, stdin=True,
                       extra_env={"TINI_KILL_PROCESS_GROUP": "1", "HOTBOX_TASK_ID": box.task_id},
                       waiter=PYTHON_WAITER if box.key.waiter == "python" else SH_WAITER)
        box.env = spec.environment()
        box.container_id = engine.create(spec)
        box.stream = engine.attach(box.container_id, True)
        engine.start(box.container_id)
        box.stream.sock.settimeout(READY_TIMEOUT_S)
        try:
            frames = box.stream.read_frames()
        finally:
            with contextlib.suppress(OSError):
                box.stream.sock.settimeout(None)
        said = b"".join(data for _, data in frames or [])
        if said != READY:
            raise HotboxError(f"its waiter did not start: it said {said[:300]!r}")

    # -- emptying -----------------------------------------------------------------------------------

    async def trim(self) -> None:
        """Destroy warm boxes past the bounds (after a cold box took a concurrency slot, or a smaller size)."""
        if not self._boxes:
            return
        allowed = await self._allowed_total() if self.enabled else 0
        extra: list[WarmBox] = []
        for pool in self._pools.values():
            while len(pool.ready) > (self.size if self.enabled else 0):
                extra.append(pool.ready.pop())
        ready = sorted((b for p in self._pools.values() for b in p.ready), key=lambda b: b.made_at)
        while ready and self.warm_total() - len(extra) > allowed:
            box = ready.pop(0)
            self._pools[box.key].ready.remove(box)
            extra.append(box)
        for box in extra:
            self._boxes.pop(box.task_id, None)
            await self._destroy(box)

    async def close(self) -> None:
        """Destroy every warm box (waiting for those being made); the pools make no more."""
        self._closing = True
        while self._busy:
            await anyio.sleep(0.01)
        for pool in self._pools.values():
            pool.ready.clear()
        for box in list(self._boxes.values()):
            await self._destroy(box)
        self._boxes.clear()

    async def _destroy(self, box: WarmBox) -> None:
        self._boxes.pop(box.task_id, None)
        engine = self._m.engine_or_none()
        with anyio.CancelScope(shield=True):
            if box.stream is not None:
                box.stream.close()
            if box.container_id is not None and engine is not None:
                cid, writable = box.container_id, box.key.limits_writable
                with contextlib.suppress(HotboxError):
                    await self._m.thread(lambda: engine.remove(cid, root_disk=writable))
            await self._m.thread(self._m.remove_owned_dir, box.dir)
