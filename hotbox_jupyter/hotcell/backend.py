"""The VMM backend contract, the session contract, and the registry that picks a backend.

A backend turns a root filesystem directory into something its VMM can boot (``prepare_rootfs``), then
runs a command in a fresh VM (``run`` / ``run_stream``) or keeps one VM up to run many code cells in it
(``start_session``). Every backend speaks the shared event vocabulary of :mod:`hotbox_jupyter.events`,
so the CLI, the magic and the kernel do not care which VMM ran the code.

Who calls what:

* :class:`ExecutorRegistry` — ``hotbox vm``, ``hotbox doctor`` and the kernel ask it for a backend by
  name (``get``) or for the best one this host can run (``pick``), and for every backend's probe.
* :meth:`VmmBackend.prepare_rootfs` — once per root filesystem, before ``run``/``start_session``.
* :meth:`VmmBackend.run` — the seed's one-shot call; :meth:`VmmBackend.run_stream` for a live console.
* :meth:`VmmBackend.start_session` — the Hotcell kernel, once per kernel start; it then calls
  :meth:`VmSession.exec` per cell, :meth:`VmSession.interrupt` on a Jupyter interrupt and
  :meth:`VmSession.stop` on shutdown.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal

from pydantic import Field

from ..errors import ConfigError, HotcellError, VmmUnavailableError, VmTimeoutError
from ..events import Event, Exit, Progress, ResultValue, StderrChunk, StdoutChunk
from ..models import ExitReason, HotModel
from .config import VmConfig, VmResult

__all__ = [
    "Accel",
    "BackendProbe",
    "ExecutorRegistry",
    "RootfsHandle",
    "RunInfo",
    "VmSession",
    "VmmBackend",
]

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]


class BackendProbe(HotModel):
    """Whether a backend can run on this host, and if not, exactly why (shown by ``hotbox doctor``)."""

    name: str = Field(description="Backend name: qemu, firecracker, libkrun")
    available: bool = Field(description="True when the backend can boot a VM here")
    reason: str = Field(description="What was found, or what is missing and how to get it")
    accel: Accel | None = Field(default=None, description="How guests would run: kvm, tcg, or None")


class RootfsHandle(HotModel):
    """A root filesystem made ready for one backend by :meth:`VmmBackend.prepare_rootfs`."""

    backend: str = Field(description="Backend that prepared it")
    source: Path = Field(description="The root filesystem directory it was made from")
    path: Path = Field(description="What the VMM boots: an ext4 image, or the directory itself")
    format: Literal["ext4", "dir"]
    digest: str = Field(description="Content fingerprint of the source tree (the cache key)")
    size_bytes: int
    cache_hit: bool = Field(default=False, description="The image came from the cache, not from mkfs")


@dataclass
class RunInfo:
    """Facts a backend learns while running (filled in by ``run_stream``, read by ``run``)."""

    accel: Accel | None = None
    started: float | None = None      # monotonic time the VMM process started
    ready: float | None = None        # ... the guest command started
    ended: float | None = None        # ... the guest command ended
    oom: bool = False

    @property
    def boot_seconds(self) -> float | None:
        return None if self.started is None or self.ready is None else self.ready - self.started

    @property
    def duration(self) -> float | None:
        return None if self.started is None or self.ended is None else self.ended - self.started


class VmSession(abc.ABC):
    """One VM kept running with the persistent agent, so that many cells share one Python namespace.

    Created by :meth:`VmmBackend.start_session` (the guest is booted and the agent answered when it
    returns). Use it as an async context manager, or call :meth:`stop` yourself.
    """

    backend: str
    accel: Accel | None

    @abc.abstractmethod
    def exec(self, code: str, *, timeout: float | None = None) -> AsyncIterator[Event]:
        """Run ``code`` in the agent's namespace and yield its output as it arrives.

        Called by the kernel once per cell, one at a time (a second call while one runs raises
        HotcellError). Yields StdoutChunk / StderrChunk / DisplayData / ResultValue / ErrorValue and
        always ends with one :class:`~hotbox_jupyter.events.Exit`: ``exited`` (exit_code 0, or 1 when
        the code raised), ``interrupted`` after :meth:`interrupt`, ``timeout`` when ``timeout`` seconds
        passed (the code is interrupted first; a VM that does not come back is killed), or ``error``
        when the VM died (the session is then unusable). May raise HotcellError if the session is
        already stopped.
        """

    @abc.abstractmethod
    async def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the running cell (Jupyter's interrupt). Called from another task
        than the one iterating :meth:`exec`; does nothing when no cell runs. Never raises for a dead VM."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Shut the VM down and remove everything it left on the host. Idempotent; never raises."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the VM runs and the agent answers."""

    async def __aenter__(self) -> VmSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class VmmBackend(abc.ABC):
    """A pluggable VMM (the seed's ``VmmBackend`` trait): QEMU microvm, Firecracker, libkrun."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> BackendProbe:
        """Whether this host can run the backend, checked for real (not only by file existence).

        Called by :class:`ExecutorRegistry` and ``hotbox doctor``; blocking (it may boot a tiny guest
        once, then answers from a cache). Never raises: problems are the probe's ``reason``.
        """

    @classmethod
    def require_available(cls) -> BackendProbe:
        """The probe, or VmmUnavailableError with its reason: what a KVM-only backend's constructor
        calls first, so that a backend that cannot run is never handed out."""
        probe = cls.probe()
        if not probe.available:
            raise VmmUnavailableError(f"backend {cls.name!r} cannot run on this host: {probe.reason}")
        return probe

    @classmethod
    def _kvm_only_probe(cls, find_parts: Callable[[], str], *, needs_kvm: str) -> BackendProbe:
        """The probe of a backend that runs on KVM only (Firecracker, libkrun): ``find_parts`` finds (and
        tries) its programs and says what it found, or raises VmmUnavailableError; then KVM must work.
        Either way the reason says what KVM's state is, so that installing the VMM is not the whole fix
        where KVM is broken too. ``needs_kvm`` opens the reason when only KVM is missing; ``{found}`` in
        it stands for what ``find_parts`` found."""
        from .qemu import kvm_status

        try:
            found = find_parts()
        except VmmUnavailableError as exc:
            ok, why = kvm_status()
            kvm = "" if ok else f"; and KVM is unusable here: {why}"
            return BackendProbe(name=cls.name, available=False, reason=f"{exc}{kvm}")
        ok, why = kvm_status()
        if not ok:
            return BackendProbe(name=cls.name, available=False, reason=f"{needs_kvm.format(found=found)}: {why}")
        return BackendProbe(name=cls.name, available=True, accel="kvm", reason=f"{found}; {why}")

    @abc.abstractmethod
    async def prepare_rootfs(self, rootfs: Path, config: VmConfig) -> RootfsHandle:
        """Turn a root filesystem directory into what this VMM boots (an ext4 image for QEMU and
        Firecracker, the directory itself for libkrun), from a content-addressed cache when it can.

        Called once per root filesystem before :meth:`run` or :meth:`start_session`; the handle may be
        reused for any number of runs. Raises RootfsError when the directory is missing or the image
        cannot be made, VmmUnavailableError when the backend cannot run here.
        """

    @abc.abstractmethod
    def run_stream(self, config: VmConfig, handle: RootfsHandle, *,
                   info: RunInfo | None = None) -> AsyncIterator[Event]:
        """Boot a VM, run ``config.command`` and yield what happens, live.

        Called by ``hotbox vm run`` for its console and by :meth:`run`. Yields Progress (booting, which
        accelerator), StdoutChunk (the command's stdout and stderr, mixed), a ResultValue when the
        guest wrote /hotcell/result.json, and finally one Exit with the command's exit code and a
        reason (exited, timeout, oom). ``info`` is filled in with the accelerator and timings.
        Raises VmBootError when the guest does not come up, VmmUnavailableError when the backend
        cannot run here. Leaving the iteration early (or cancelling) kills the VM; everything it
        created on the host is removed in every case.
        """

    async def run(self, config: VmConfig, handle: RootfsHandle) -> VmResult:
        """Run ``config.command`` in a fresh VM and return its exit code, console and result.

        The seed's ``backend.run(&config, &handle)``. Raises VmTimeoutError (with the partial
        VmResult as ``.result``) when the command outlives ``config.timeout``; VmBootError and
        VmmUnavailableError as :meth:`run_stream`. A guest OOM is not an error: the VmResult has a
        non-zero exit code and reason ``oom``.
        """
        info = RunInfo()
        console: list[str] = []
        result: object | None = None
        end: Exit | None = None
        stream = self.run_stream(config, handle, info=info)
        try:
            async for ev in stream:
                if isinstance(ev, (StdoutChunk, StderrChunk)):
                    console.append(ev.text)
                elif isinstance(ev, ResultValue):
                    result = ev.value
                elif isinstance(ev, Exit):
                    end = ev
                elif isinstance(ev, Progress):
                    log.debug("%s: %s", self.name, ev.text)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if end is None:  # pragma: no cover - every backend ends its stream with Exit
            raise HotcellError(f"{self.name}: the VM's event stream ended without an exit")
        vm_result = VmResult(
            exit_code=end.exit_code if end.exit_code is not None else -1,
            console_output="".join(console), result=result, accel=info.accel, backend=self.name,
            duration=info.duration, boot_seconds=info.boot_seconds, reason=end.reason, message=end.message,
        )
        if end.reason is ExitReason.TIMEOUT:
            err = VmTimeoutError(end.message)
            err.result = vm_result  # type: ignore[attr-defined]
            raise err
        return vm_result

    @abc.abstractmethod
    async def start_session(self, config: VmConfig, handle: RootfsHandle) -> VmSession:
        """Boot a VM running the persistent agent (``runtimes/python/agent.py``) and return its session.

        Called by the Hotcell kernel at start. ``config.command`` is ignored (the agent is the command;
        the image needs ``python3``); ``config.timeout`` bounds each cell unless ``exec`` says
        otherwise. Returns once the agent answered. Raises VmBootError when the guest or the agent
        does not come up, VmmUnavailableError when the backend cannot run here.
        """


BackendFactory = Callable[[], VmmBackend]


@dataclass
class _Entry:
    factory: BackendFactory
    probe: Callable[[], BackendProbe]
    rank: int


class ExecutorRegistry:
    """Backends by name, and the choice of the best one this host can run (the seed's ExecutorRegistry).

    Probes are cached for the registry's life (a backend's own probe also caches across processes).
    """

    PROBE_TTL = 300.0

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._probes: dict[str, tuple[float, BackendProbe]] = {}
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> ExecutorRegistry:
        """A registry with every built-in backend, best first: libkrun, firecracker, qemu.

        libkrun and Firecracker need working KVM and boot fastest; QEMU runs everywhere (TCG without KVM).
        """
        from .firecracker import FirecrackerBackend
        from .libkrun import LibkrunBackend
        from .qemu import QemuBackend

        reg = cls()
        reg.register(LibkrunBackend.name, LibkrunBackend, probe=LibkrunBackend.probe, rank=10)
        reg.register(FirecrackerBackend.name, FirecrackerBackend, probe=FirecrackerBackend.probe, rank=20)
        reg.register(QemuBackend.name, QemuBackend, probe=QemuBackend.probe, rank=30)
        return reg

    def register(self, name: str, factory: BackendFactory, *, probe: Callable[[], BackendProbe] | None = None,
                 rank: int = 100) -> None:
        """Add (or replace) a backend. ``rank``: lower is preferred by :meth:`pick`."""
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError.invalid("backend name", name, "letters, digits, '-' and '_'")

        def default_probe() -> BackendProbe:
            return BackendProbe(name=name, available=True, reason="registered without a probe")

        with self._lock:
            self._entries[name] = _Entry(factory, probe or default_probe, rank)
            self._probes.pop(name, None)

    def names(self) -> list[str]:
        """Registered backend names, best first."""
        return [n for n, _ in sorted(self._entries.items(), key=lambda kv: kv[1].rank)]

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError.invalid("backend", name, f"one of {', '.join(self.names()) or '(none registered)'}") \
                from None

    def probe(self, name: str, *, refresh: bool = False) -> BackendProbe:
        """The (cached) probe of one backend; blocking."""
        entry = self._entry(name)
        now = time.monotonic()
        with self._lock:
            cached = self._probes.get(name)
            if cached and not refresh and now - cached[0] < self.PROBE_TTL:
                return cached[1]
        try:
            result = entry.probe()
        except Exception as exc:  # a probe must never take the registry down
            result = BackendProbe(name=name, available=False, reason=f"probe failed: {exc!r}")
        with self._lock:
            self._probes[name] = (now, result)
        return result

    def probe_all(self, *, refresh: bool = False) -> list[BackendProbe]:
        """Every backend's probe, best first."""
        return [self.probe(n, refresh=refresh) for n in self.names()]

    def get(self, name: str) -> VmmBackend:
        """The backend called ``name``. Raises ConfigError for an unknown name, VmmUnavailableError
        (with the probe's reason) when this host cannot run it: a missing VMM never looks like success."""
        entry = self._entry(name)
        p = self.probe(name)
        if not p.available:
            raise VmmUnavailableError(f"backend {name!r} cannot run on this host: {p.reason}")
        return entry.factory()

    def pick(self, name: str | None = None) -> VmmBackend:
        """``get(name)`` when a name is given, else the best available backend.

        Raises VmmUnavailableError listing every backend's reason when none can run here.
        """
        if name:
            return self.get(name)
        reasons = []
        for n in self.names():
            p = self.probe(n)
            if p.available:
                return self._entries[n].factory()
            reasons.append(f"{n}: {p.reason}")
        raise VmmUnavailableError("no microVM backend can run on this host:\n  " + "\n  ".join(reasons))
