"""Host side of the persistent agent (``runtimes/python/agent.py``): cells in, events out.

The transport is any anyio byte stream: a virtio-serial port's socket for a microVM, or the stdin and
stdout of ``docker run -i`` for a box started with ``AGENT_PORT=stdio``. :class:`AgentSession`
implements :class:`~hotbox_jupyter.hotcell.backend.VmSession` on top of it; a backend subclasses it to
say how the VM is stopped and how a dead VM is told apart from a quiet one.
"""

from __future__ import annotations

import abc
import base64
import codecs
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
from anyio.abc import ByteStream

from ..errors import HotcellError, VmBootError
from ..events import ErrorValue, Event, Exit, StderrChunk
from ..frames import FrameDecoder
from ..models import ExitReason
from .backend import Accel, VmSession
from .config import VmConfig
from .guestproto import GuestOutcome, GuestStream, GuestVm, panic_message
from .vmstate import stop_process

__all__ = ["AgentChannel", "AgentGone", "AgentSession", "GuestAgentSession", "ProcessAgentSession", "SessionVm"]

log = logging.getLogger(__name__)

# How long an interrupted cell may take to come back before the session is declared stuck.
INTERRUPT_GRACE = 5.0
# While a cell is quiet the session checks this often whether the VM is still alive.
IDLE_POLL = 0.5
MAX_LINE = 64 * 1024 * 1024


class AgentGone(HotcellError):
    """The agent's channel closed: the VM or the agent process is gone."""


class AgentChannel:
    """One JSON object per line over a byte stream."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._buf = b""
        self._send_lock = anyio.Lock()

    async def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        async with self._send_lock:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise AgentGone(f"the agent's channel is closed: {exc!r}") from exc

    async def receive(self) -> dict[str, Any]:
        """The next message; raises AgentGone at end of stream. Cancel-safe: a partial line is kept."""
        while b"\n" not in self._buf:
            try:
                chunk = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise AgentGone("the agent's channel closed") from exc
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise AgentGone("the agent sent a line longer than 64 MiB")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise AgentGone(f"the agent sent something that is not JSON: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise AgentGone(f"the agent sent a non-object: {line[:200]!r}")
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()


class AgentSession(VmSession):
    """A VmSession speaking to the agent; subclasses provide ``stop``, ``alive`` and ``_dead_reason``."""

    def __init__(self, channel: AgentChannel, *, backend: str, accel: Accel | None,
                 default_timeout: float | None = None) -> None:
        self.channel = channel
        self.backend = backend
        self.accel = accel
        self.default_timeout = default_timeout
        self._ids = itertools.count(1)
        self._busy = False
        self._running_id: int | None = None
        self._abandoned: set[int] = set()
        self._dead: str | None = None

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the agent's ``ready``; raises AgentGone or TimeoutError."""
        with anyio.fail_after(timeout):
            while True:
                msg = await self.channel.receive()
                if msg.get("t") == "ready":
                    return msg

    @abc.abstractmethod
    async def _dead_reason(self) -> tuple[ExitReason, str] | None:
        """Called while a cell is quiet: (reason, message) when the VM is gone, else None."""

    @abc.abstractmethod
    async def _kill(self) -> None:
        """Kill the VM at once (a cell that does not come back after its interrupt)."""

    async def interrupt(self) -> None:
        if self._running_id is None or self._dead:
            return
        with contextlib.suppress(AgentGone):
            await self.channel.send({"op": "interrupt"})

    async def exec(self, code: str, *, timeout: float | None = None) -> AsyncIterator[Event]:
        if self._dead:
            raise HotcellError(f"the session's VM is gone: {self._dead}")
        if self._busy:
            raise HotcellError("a cell is already running in this session; exec() runs one cell at a time")
        self._busy = True
        cell_id = next(self._ids)
        timeout = timeout if timeout is not None else self.default_timeout
        deadline = time.monotonic() + timeout if timeout else None
        interrupted_at: float | None = None
        timed_out = False
        stdout = FrameDecoder()
        stderr = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finished = False
        try:
            await self.channel.send({"op": "exec", "id": cell_id, "code": code})
            self._running_id = cell_id
            while True:
                now = time.monotonic()
                wait = IDLE_POLL
                if deadline is not None and interrupted_at is None:
                    wait = min(wait, max(0.0, deadline - now))
                msg: dict[str, Any] | None = None
                gone: AgentGone | None = None
                with anyio.move_on_after(wait):
                    try:
                        msg = await self.channel.receive()
                    except AgentGone as exc:
                        gone = exc
                if gone is not None:
                    reason = await self._dead_reason() or (ExitReason.ERROR, f"the VM stopped: {gone}")
                    self._dead = reason[1]
                    finished = True
                    for ev in stdout.close():
                        yield ev
                    yield Exit(reason=reason[0], exit_code=None, message=reason[1])
                    return
                if msg is None:
                    now = time.monotonic()
                    if deadline is not None and interrupted_at is None and now >= deadline:
                        timed_out = True
                        interrupted_at = now
                        await self.interrupt()
                    elif interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                        await self._kill()
                        self._dead = "killed: the cell did not stop after its interrupt"
                        finished = True
                        why = f"cell ran past its {timeout:g} s timeout and" if timed_out else "cell"
                        yield Exit(reason=ExitReason.TIMEOUT if timed_out else ExitReason.INTERRUPTED,
                                   exit_code=None, message=f"{why} did not stop when interrupted: the VM was killed")
                        return
                    else:
                        dead = await self._dead_reason()
                        if dead is not None:
                            self._dead = dead[1]
                            finished = True
                            yield Exit(reason=dead[0], exit_code=None, message=dead[1])
                            return
                    continue
                kind = msg.get("t")
                if kind in ("stdout", "stderr"):
                    data = base64.b64decode(msg.get("b", ""))
                    if kind == "stdout":
                        for ev in stdout.feed(data):
                            yield ev
                    else:
                        text = stderr.decode(data)
                        if text:
                            yield StderrChunk(text)
                elif kind == "done":
                    done_id = msg.get("id")
                    if done_id != cell_id:
                        self._abandoned.discard(done_id)
                        continue
                    finished = True
                    for ev in stdout.close():
                        yield ev
                    tail = stderr.decode(b"", final=True)
                    if tail:
                        yield StderrChunk(tail)
                    status = int(msg.get("status", 1))
                    if timed_out:
                        yield Exit(reason=ExitReason.TIMEOUT, exit_code=status,
                                   message=f"cell ran past its {timeout:g} s timeout and was interrupted")
                    elif status == 130:
                        yield Exit(reason=ExitReason.INTERRUPTED, exit_code=status, message="interrupted")
                    else:
                        yield Exit(reason=ExitReason.EXITED, exit_code=status,
                                   message="ok" if status == 0 else f"cell failed (status {status})")
                    return
                else:
                    log.debug("agent: ignoring %r", msg)
        except AgentGone as exc:
            self._dead = str(exc)
            finished = True
            yield ErrorValue(ename="HotcellError", evalue=str(exc))
            yield Exit(reason=ExitReason.ERROR, exit_code=None, message=str(exc))
        finally:
            self._running_id = None
            self._busy = False
            if not finished and not self._dead:
                # The caller stopped listening mid-cell: stop the cell so the next one starts clean.
                self._abandoned.add(cell_id)
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(AgentGone):
                        await self.channel.send({"op": "interrupt"})


class SessionVm(GuestVm, Protocol):
    """What a GuestAgentSession needs of its VM beyond a one-shot run's needs."""

    config: VmConfig

    @property
    def running(self) -> bool:
        """The VMM process still runs."""

    async def close(self, *, graceful: bool = True) -> None:
        """Stop the VMM and remove what it left on the host."""


class GuestAgentSession(AgentSession):
    """A session whose agent runs in a VM started by hotbox's guest init (QEMU, Firecracker).

    Besides the agent's channel it watches init's stream, which says when the agent process died
    (its exit code, an OOM) while the VM still runs.
    """

    def __init__(self, vm: SessionVm, channel: AgentChannel, *, backend: str,
                 default_timeout: float | None) -> None:
        super().__init__(channel, backend=backend, accel=vm.accel, default_timeout=default_timeout)
        self._vm = vm
        self._stream = GuestStream(vm.nonce)
        self._outcome = GuestOutcome()
        self._console = bytearray()
        self._stopped = False

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._dead and self._vm.running

    @property
    def console(self) -> str:
        """What the agent process itself wrote outside cells (its crash message, if any)."""
        return self._console.decode(errors="replace")

    async def _pump_out(self, wait: float) -> bool:
        """Read what init sent on hotbox.out within ``wait`` s; False at end of stream."""
        with anyio.move_on_after(wait):
            data = await self._vm.receive()
            if not data:
                return False
            for m in self._stream.feed(data):
                if m.kind == "ctl":
                    self._outcome.apply(m.text)
                elif m.kind == "data":
                    self._console += m.data[-65536:]
        return True

    async def wait_guest_ready(self, deadline: float) -> None:
        """Until init says the agent was started; VmBootError if the guest fails or is too slow."""
        while not self._outcome.ready:
            if self._outcome.error:
                raise VmBootError(f"the guest's init failed: {self._outcome.error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmBootError(f"the VM did not boot within the deadline; {self._vm.diagnostics()}")
            if not await self._pump_out(min(remaining, 1.0)):
                raise VmBootError(f"the VM stopped while booting; {self._vm.diagnostics()}")

    async def wait_agent(self, timeout: float) -> None:
        """Until the agent says ready, watching init for the agent's early death."""
        async def watch_init() -> None:
            while self._outcome.exit_code is None:
                if not await self._pump_out(1.0):
                    break
            raise VmBootError(f"the session agent exited ({self._outcome.exit_code}) before it was ready: "
                              f"{self.console.strip()[-800:] or '(no output)'}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_init)
            try:
                await self.wait_ready(timeout)
            except TimeoutError:
                raise VmBootError(f"the session agent did not answer within {timeout:g} s; "
                                  f"{self._vm.diagnostics()}") from None
            except AgentGone as exc:
                raise VmBootError(f"the session agent's channel closed: {exc}; {self._vm.diagnostics()}") from exc
            tg.cancel_scope.cancel()

    async def _dead_reason(self) -> tuple[ExitReason, str] | None:
        await self._pump_out(0.01)
        if self._outcome.exit_code is not None:
            with anyio.move_on_after(3):  # init's last words (result, end) follow at once
                while not self._outcome.end and await self._pump_out(1.0):
                    pass
            code = self._outcome.exit_code
            if self._outcome.oom:
                return ExitReason.OOM, (f"the guest ran out of memory (memory_mib={self._vm.config.memory_mib}): "
                                        f"the OOM killer ended the session agent")
            return ExitReason.ERROR, f"the session agent exited with code {code}: {self.console.strip()[-500:]}"
        if not self._vm.running:
            panic = panic_message(self._vm.kernel_log())
            if panic is not None:
                return ExitReason.ERROR, f"{panic}; QEMU has exited"
            return ExitReason.ERROR, f"the VM stopped; {self._vm.diagnostics()}"
        return None

    async def _kill(self) -> None:
        await self._vm.kill()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with anyio.CancelScope(shield=True):
            graceful = False
            if self._vm.running:
                try:
                    with anyio.move_on_after(5):
                        await self.channel.send({"op": "shutdown"})
                        while not self._outcome.end:
                            if not await self._pump_out(1.0):
                                break
                        if self._outcome.end:
                            await self._vm.send_bye()
                            graceful = self._vm.said_bye
                except (AgentGone, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            await self._vm.close(graceful=graceful)


class ProcessAgentSession(AgentSession):
    """The agent as a child process speaking over its stdin/stdout (``AGENT_PORT=stdio``).

    ``argv`` is whatever starts it: ``python3 -u agent.py`` for a local agent, or
    ``docker run -i --rm ... python3 -u /opt/hotbox/python/agent.py`` for one in a Docker box.
    """

    def __init__(self, proc: Any, channel: AgentChannel, *, backend: str, default_timeout: float | None) -> None:
        super().__init__(channel, backend=backend, accel=None, default_timeout=default_timeout)
        self._proc = proc
        self._stopped = False

    @classmethod
    async def start(cls, argv: list[str], *, env: dict[str, str] | None = None, backend: str = "process",
                    default_timeout: float | None = None, ready_timeout: float = 60.0) -> ProcessAgentSession:
        """Start the agent and wait for its ``ready``; VmBootError if it does not answer."""
        import os
        import subprocess

        from anyio.streams.stapled import StapledByteStream

        full_env = {**os.environ, **(env or {}), "AGENT_PORT": "stdio"}
        proc = await anyio.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                        env=full_env, start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        session = cls(proc, AgentChannel(StapledByteStream(proc.stdin, proc.stdout)), backend=backend,
                      default_timeout=default_timeout)
        try:
            await session.wait_ready(ready_timeout)
        except (AgentGone, TimeoutError) as exc:
            await session._kill()
            await session.stop()
            raise VmBootError(f"the agent ({' '.join(argv)}) did not answer: {exc!r}") from exc
        return session

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._dead and self._proc.returncode is None

    async def _dead_reason(self) -> tuple[ExitReason, str] | None:
        if self._proc.returncode is None:
            return None
        return ExitReason.ERROR, f"the agent process exited with code {self._proc.returncode}"

    async def _kill(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with anyio.CancelScope(shield=True):
            if self._proc.returncode is None:
                with contextlib.suppress(AgentGone), anyio.move_on_after(5):
                    await self.channel.send({"op": "shutdown"})
                    await self._proc.wait()
            await stop_process(self._proc)
