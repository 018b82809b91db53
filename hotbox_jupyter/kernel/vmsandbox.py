"""The Hotcell (microVM) sandbox of the "Hotcell Python" kernel.

The guest kernel runs in a QEMU microVM started through :func:`hotbox_jupyter.hotcell.snapshot.
start_warm_vm`: the first start of an (image, size) cold-boots the VM with IPython imported and the
launcher waiting in ``hotbox_warm.wait_for_start()``, and saves it there; later starts restore that
snapshot. Only then does the launcher get its payload (the session key and ports, fresh entropy, the
wall clock), so no two kernels share a key or randomness.

Transport: the guest kernel binds TCP ports in the guest; QEMU forwards each from a fresh port on
127.0.0.1 (``-netdev user,restrict=on,hostfwd=…``), and the guest can reach nothing else unless the
kernel was installed with ``--network internet``. QEMU runs with PR_SET_PDEATHSIG and an owner token,
so a host kernel killed by SIGKILL takes its VM along, and the reaper of the next start finds any rest.

An image without ipykernel: the launcher exits saying so before the snapshot point, and the kernel runs
basic Python in a Hotcell agent session of the same VM config instead (:mod:`.basic`); its start returns
that session.

``HOTBOX_KERNEL_SNAPSHOT_EXTRA`` (environment) is added to the snapshot's cache key: a new value means a
cold boot (the benchmark uses it to measure one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from ..errors import HotboxError
from .sandbox import GUEST_LAUNCHER, NO_IPYKERNEL, GuestAddresses, KernelOptions, KernelSandbox, SandboxError

if TYPE_CHECKING:
    from ..hotcell.backend import VmSession

__all__ = ["GUEST_PORTS", "VmSandbox"]

log = logging.getLogger(__name__)

GUEST_PORTS = {"shell": 5555, "iopub": 5556, "stdin": 5557, "control": 5558, "hb": 5559}
READY_TIMEOUT_S = 180.0


class VmSandbox(KernelSandbox):
    """The guest kernel in a microVM (see the module docstring)."""

    def __init__(self, options: KernelOptions) -> None:
        self.options = options
        self._warm: Any = None
        self._session: Any = None
        """The agent session of basic Python (an image without ipykernel)."""
        self._accel = "?"
        self._restored = False
        self._start_s = 0.0
        self._prepared: concurrent.futures.Future[tuple[Any, Any, Any]] | None = None

    def describe(self) -> str:
        o = self.options
        how = "restored from its snapshot" if self._restored else "cold-booted"
        return (f"Hotcell Python: a {o.size} QEMU microVM ({self._accel}) of {o.image}, network {o.network}, "
                f"{how} in {self._start_s:.2f} s")

    async def start(self, *, key: str, signature_scheme: str) -> GuestAddresses | VmSession:
        try:
            return await self._start(key, signature_scheme)
        except BaseException:
            await asyncio.shield(self.kill())
            raise

    def prestart(self, *, key: str, signature_scheme: str) -> None:
        """Find the backend and the image's root filesystem in a thread (image look-up, hashes) while the
        host kernel imports; :meth:`start` boots or restores the VM with them."""
        fut: concurrent.futures.Future[tuple[Any, Any, Any]] = concurrent.futures.Future()
        self._prepared = fut

        def run() -> None:
            try:
                fut.set_result(asyncio.run(self._prepare()))
            except BaseException as exc:
                fut.set_exception(exc)

        threading.Thread(target=run, name="hotbox-kernel-prestart", daemon=True).start()

    async def _prepare(self) -> tuple[Any, Any, Any]:
        """(backend, VmConfig, RootfsHandle) of this kernel's options."""
        from ..hotcell.backend import ExecutorRegistry
        from ..hotcell.config import VmConfig
        from ..hotcell.rootfs import RootfsBuilder

        o = self.options
        backend = ExecutorRegistry.default().pick("qemu")
        report = await RootfsBuilder.open_default().cached(o.image)
        fields: dict[str, Any] = {"command": ["python3"]}
        if o.network == "internet":
            fields["tsi"] = "internet"
        config = VmConfig.for_size(o.size, **fields)
        handle = await backend.prepare_rootfs(report.rootfs, config)
        return backend, config, handle

    async def _start(self, key: str, signature_scheme: str) -> GuestAddresses | VmSession:
        import time

        from ..paths import GUEST_RUNTIMES

        try:
            from ..hotcell.snapshot import start_warm_vm
        except ImportError as exc:  # pragma: no cover - the vm part ships it
            raise SandboxError(f"this hotbox has no warm microVMs ({exc})") from exc
        t0 = time.monotonic()
        try:
            if self._prepared is not None:
                backend, config, handle = await asyncio.wrap_future(self._prepared)
            else:
                backend, config, handle = await self._prepare()
            t_rootfs = time.monotonic()
            program = ["python3", "-u", f"{GUEST_RUNTIMES}/{GUEST_LAUNCHER}", "--warm", str(GUEST_PORTS["shell"])]
            try:
                self._warm = warm = await start_warm_vm(backend, config, handle, program=program,
                                                        guest_ports=list(GUEST_PORTS.values()),
                                                        key_extra="hotbox-kernel-1"
                                                        + os.environ.get("HOTBOX_KERNEL_SNAPSHOT_EXTRA", ""))
            except HotboxError as exc:
                if NO_IPYKERNEL not in str(exc):
                    raise
                # No ipykernel in this image: basic Python in an agent session (tracebacks only as frames).
                log.info("%s has no ipykernel (%s): starting a basic Python agent session", self.options.image, exc)
                env = [*config.env, ("HOTBOX_CELL_TRACEBACK", "frame")]
                self._session = session = await backend.start_session(config.model_copy(update={"env": env}),
                                                                      handle)
                session.default_timeout = None  # a kernel's cells run until done or interrupted
                self._accel = str(session.accel)
                self._start_s = time.monotonic() - t0
                return session  # type: ignore[no-any-return]
            self._accel, self._restored = str(warm.accel), bool(warm.restored)
            t_vm = time.monotonic()
            await warm.release({"key": key, "signature_scheme": signature_scheme})
            t_release = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_ready(), READY_TIMEOUT_S)
        except HotboxError as exc:
            raise SandboxError(f"the microVM did not start: {exc}") from exc
        self._start_s = time.monotonic() - t0
        log.info("%s (rootfs %.2f s, VM %.2f s, release %.2f s, kernel ready %.2f s)", self.describe(),
                 t_rootfs - t0, t_vm - t_rootfs, t_release - t_vm, t0 + self._start_s - t_release)
        return GuestAddresses(**{ch: f"tcp://127.0.0.1:{warm.host_ports[p]}" for ch, p in GUEST_PORTS.items()})

    async def _wait_ready(self) -> None:
        """Until the launcher says its kernel serves (it sends that on the agent channel)."""
        while True:
            msg = await self._warm.receive()
            if msg.get("t") == "kernel-ready":
                return

    async def wait_dead(self) -> str:
        if self._session is not None:
            return await self._wait_session_dead()
        while True:
            warm = self._warm
            if warm is None:
                return "the microVM was stopped"
            dead = warm.dead_reason()
            if dead is not None:
                return str(dead[1])
            await asyncio.sleep(0.25)

    async def _wait_session_dead(self) -> str:
        while True:
            session = self._session
            if session is None:
                return "the microVM was stopped"
            if not session.alive:
                dead = await session._dead_reason()
                return str(dead[1]) if dead is not None else "the microVM stopped"
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            await warm.stop()
        session, self._session = self._session, None
        if session is not None:
            await session.stop()

    async def kill(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            await warm.kill()
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):
                await session._kill()
            await session.stop()
