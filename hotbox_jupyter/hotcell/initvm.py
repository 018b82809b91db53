"""Backends whose guests run hotbox's own init (QEMU, Firecracker): one run loop, one session flow.

Such a backend only says how to make a VM object for a config (``_new_vm``) and how long a boot may
take; starting, streaming a run, booting a session and cleaning up are the same for all of them.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
from anyio.abc import ByteStream

from ..errors import HotcellError
from ..events import Event
from .backend import RootfsHandle, RunInfo, VmmBackend
from .config import VmConfig
from .guestproto import guest_run_events
from .session import AgentChannel, GuestAgentSession, SessionVm

__all__ = ["InitBackend", "InitVm"]

AGENT_READY_TIMEOUT = 60.0


class InitVm(SessionVm, Protocol):
    """A VM object of an InitBackend: started once, then read (run) or talked to (session)."""

    @property
    def agent_stream(self) -> ByteStream | None:
        """The agent's channel (session VMs only)."""

    async def start(self, info: RunInfo) -> None:
        """Start the VMM (and its helpers); on failure everything started is removed again."""


class InitBackend(VmmBackend):
    """Shared ``run_stream`` and ``start_session`` of the backends that boot hotbox's init."""

    @abc.abstractmethod
    def _new_vm(self, config: VmConfig, handle: RootfsHandle, *, agent: bool) -> InitVm:
        """A not yet started VM for ``config``; ``agent`` makes it a session VM."""

    @property
    @abc.abstractmethod
    def boot_timeout(self) -> float:
        """Seconds from the VMM's start to the command's start before the boot counts as failed."""

    def _check_handle(self, handle: RootfsHandle) -> None:
        if handle.format != "ext4" or not handle.path.is_file():
            raise HotcellError(f"rootfs handle {handle.path} is not an ext4 image prepared by the {self.name} "
                               "backend; call its prepare_rootfs()")

    async def run_stream(self, config: VmConfig, handle: RootfsHandle, *,
                         info: RunInfo | None = None) -> AsyncIterator[Event]:
        self._check_handle(handle)
        info = info if info is not None else RunInfo()
        vm = self._new_vm(config, handle, agent=False)
        await vm.start(info)
        try:
            async for ev in guest_run_events(vm, config, info, self.boot_timeout):
                yield ev
        finally:
            await vm.close(graceful=vm.said_bye)

    async def start_session(self, config: VmConfig, handle: RootfsHandle) -> GuestAgentSession:
        self._check_handle(handle)
        vm = self._new_vm(config, handle, agent=True)
        await vm.start(RunInfo())
        try:
            assert vm.agent_stream is not None
            session = GuestAgentSession(vm, AgentChannel(vm.agent_stream), backend=self.name,
                                        default_timeout=config.timeout)
            await session.wait_guest_ready(vm.started + self.boot_timeout)
            await session.wait_agent(AGENT_READY_TIMEOUT)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await vm.close(graceful=False)
            raise
        return session
