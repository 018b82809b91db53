"""Basic Python for images without ipykernel: the host kernel speaks Jupyter for the stdlib agent.

When the guest launcher reports ``HOTBOX-NO-IPYKERNEL``, the sandbox serves the persistent agent of
``runtimes/python/agent.py`` instead (in a box: the same container, the launcher having become the agent
on its attached stdin/stdout; in a microVM: a Hotcell agent session), and :class:`BasicKernel` answers
the Jupyter requests itself on the relay's sockets:

* ``execute_request`` runs in the agent's one namespace; its events become ``stream``,
  ``display_data``, ``execute_result`` and ``error`` messages between ``busy`` and ``idle``, with
  ``execute_input`` and an ``execute_reply`` carrying the execution count. The first cell's output
  starts with one line saying that only basic Python is available in this image, and why;
* ``kernel_info``, ``is_complete`` (codeop), ``complete`` (keywords and builtins), ``inspect`` (nothing
  found), ``history`` (empty), ``comm_info`` (none) are answered here; ``interrupt_request`` becomes the
  agent's interrupt op. Shutdown, heartbeat, escalation of an ignored interrupt, death and metering stay
  the relay's, exactly as for a real ipykernel.
"""

from __future__ import annotations

import asyncio
import builtins
import codeop
import collections
import contextlib
import keyword
import re
import threading
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream

from ..events import DisplayData, ErrorValue, Exit, Progress, ResultValue, StderrChunk, StdoutChunk
from ..hotcell.backend import VmSession
from ..hotcell.session import AgentChannel, AgentSession
from ..models import ExitReason

if TYPE_CHECKING:
    from .relay import KernelRelay, _Pending

__all__ = ["BasicKernel", "BoxAgentSession", "FedStream", "notice"]

_NAME_AT_END = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_ENAMES = {ExitReason.INTERRUPTED: "KeyboardInterrupt", ExitReason.TIMEOUT: "TimeoutError",
           ExitReason.OOM: "MemoryError"}


def notice(image: str) -> str:
    """The one line the first cell of a basic kernel starts with."""
    return (f"[hotbox] only basic Python is available in {image}: it has no ipykernel (no IPython magics, "
            "input(), widgets or completion of your own names); hotbox/python has it\n")


class FedStream(ByteStream):
    """A byte stream whose incoming bytes a thread pushes (:meth:`feed`, :meth:`end`) and whose outgoing
    bytes go to ``send_blocking`` in a thread. ``receive`` is cancel-safe: nothing is lost when a
    caller's timeout cancels it."""

    def __init__(self, send_blocking: Callable[[bytes], None]) -> None:
        self._send_blocking = send_blocking
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._fed = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def _wake(self) -> None:
        with self._lock:
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
                loop.call_soon_threadsafe(event.set)

    @property
    def fed(self) -> bool:
        """Whether any bytes came yet."""
        return self._fed

    def feed(self, data: bytes) -> None:
        if data:
            self._fed = True
            with self._lock:
                self._chunks.append(data)
            self._wake()

    def end(self) -> None:
        with self._lock:
            self._eof = True
        self._wake()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with self._lock:
            if self._event is None:
                self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
            event = self._event
        while True:
            event.clear()
            with self._lock:
                if self._chunks:
                    return self._chunks.popleft()
                if self._eof:
                    raise anyio.EndOfStream
            await event.wait()

    async def send(self, item: bytes) -> None:
        await asyncio.to_thread(self._send_blocking, item)

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class BoxAgentSession(AgentSession):
    """The agent of a box kernel's container, over the container's attached stdin/stdout.

    ``dead()`` is the container's death in plain words (None while it runs); ``kill()`` removes it.
    """

    def __init__(self, stream: FedStream, *, dead: Callable[[], str | None],
                 kill: Callable[[], Awaitable[None]]) -> None:
        super().__init__(AgentChannel(stream), backend="docker", accel=None)
        self._death = dead
        self._kill_box = kill
        self._stopped = False

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._dead and self._death() is None

    async def _dead_reason(self) -> tuple[ExitReason, str] | None:
        why = self._death()
        if why is None:
            return None
        return (ExitReason.OOM if "out of memory" in why else ExitReason.ERROR), why

    async def _kill(self) -> None:
        await self._kill_box()

    async def stop(self) -> None:
        self._stopped = True
        await self._kill_box()


class BasicKernel:
    """Answers the Jupyter requests of one agent session, through the relay's sockets (see the module
    docstring). ``on_death(reason)`` is the relay's: it answers what is pending and forgets the sandbox;
    ``wait_dead()`` is the sandbox's, for why it died."""

    def __init__(self, session: VmSession, *, image: str, relay: KernelRelay,
                 on_death: Callable[[str], Awaitable[None]], wait_dead: Callable[[], Awaitable[str]],
                 banner: str) -> None:
        self.session = session
        self.image = image
        self.relay = relay
        self.on_death = on_death
        self.wait_dead = wait_dead
        self.banner = banner
        self.execution_count = 0
        self._noticed = False
        self._cells = asyncio.Lock()

    async def handle(self, channel: str, p: _Pending, content: dict[str, Any]) -> asyncio.Task[None] | None:
        """Answer one request; a cell runs in the returned task (cells run one at a time, in order)."""
        msg_type = str(p.header.get("msg_type", ""))
        if msg_type == "execute_request":
            return asyncio.ensure_future(self._execute(p, content))
        if msg_type == "interrupt_request":
            await self.session.interrupt()
            await self.relay._reply(p, "interrupt_reply", {"status": "ok"}, channel=channel)
            return None
        answer = self._local(msg_type, content)
        if answer is not None:
            await self._answer(p, msg_type.replace("_request", "_reply"), answer, channel)
        return None

    def _local(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
        if msg_type == "kernel_info_request":
            return self.relay._local_kernel_info(self.banner)
        if msg_type == "is_complete_request":
            return is_complete(str(content.get("code", "")))
        if msg_type == "complete_request":
            return complete(str(content.get("code", "")), int(content.get("cursor_pos", 0)))
        if msg_type == "inspect_request":
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        if msg_type == "history_request":
            return {"status": "ok", "history": []}
        if msg_type == "comm_info_request":
            return {"status": "ok", "comms": {}}
        return None  # comm messages and the like: nothing answers them in basic Python

    async def _answer(self, p: _Pending, reply_type: str, content: dict[str, Any], channel: str) -> None:
        self.relay.pending.pop(str(p.header.get("msg_id", "")), None)
        await self.relay._publish("status", {"execution_state": "busy"}, p.header)
        await self.relay._reply(p, reply_type, content, channel=channel)
        await self.relay._publish("status", {"execution_state": "idle"}, p.header)

    async def _execute(self, p: _Pending, content: dict[str, Any]) -> None:
        async with self._cells:
            await self._run_cell(p, content)

    async def _run_cell(self, p: _Pending, content: dict[str, Any]) -> None:
        code = str(content.get("code", ""))
        silent = bool(content.get("silent", False))
        if not silent and content.get("store_history", True):
            self.execution_count += 1
        count = self.execution_count
        header = p.header

        async def publish(msg_type: str, body: dict[str, Any]) -> None:
            if not silent:
                await self.relay._publish(msg_type, body, header)

        await self.relay._publish("status", {"execution_state": "busy"}, header)
        await publish("execute_input", {"code": code, "execution_count": count})
        if not self._noticed and not silent:
            self._noticed = True
            await publish("stream", {"name": "stderr", "text": notice(self.image)})
        error: dict[str, Any] | None = None
        end: Exit | None = None
        if code.strip():
            async for ev in self.session.exec(code):
                if isinstance(ev, StdoutChunk | StderrChunk | Progress):
                    name = "stdout" if isinstance(ev, StdoutChunk) else "stderr"
                    await publish("stream", {"name": name, "text": ev.text})
                elif isinstance(ev, DisplayData):
                    await publish("display_data", {"data": ev.data, "metadata": ev.metadata, "transient": {}})
                elif isinstance(ev, ResultValue):
                    data = ev.data or {"text/plain": repr(ev.value)}
                    await publish("execute_result", {"execution_count": count, "data": data, "metadata": {}})
                elif isinstance(ev, ErrorValue):
                    error = {"ename": ev.ename, "evalue": ev.evalue,
                             "traceback": list(ev.traceback) or [f"{ev.ename}: {ev.evalue}"]}
                    await publish("error", error)
                elif isinstance(ev, Exit):
                    end = ev
        if end is not None and (end.exit_code is None or not self.session.alive):
            # The sandbox died (OOM, a crash, killed after an ignored interrupt): the relay says why and
            # answers this cell; the next one gets a fresh sandbox.
            reason = end.message or end.reason.value
            with contextlib.suppress(asyncio.TimeoutError):  # the sandbox's own words (exit code, OOM) if it has them
                reason = await asyncio.wait_for(self.wait_dead(), 5)
            await self.on_death(reason)
            return
        if error is None and end is not None and end.exit_code not in (0, None):
            ename = _ENAMES.get(end.reason, "SystemExit")
            error = {"ename": ename, "evalue": end.message, "traceback": [f"{ename}: {end.message}"]}
            await publish("error", error)
        self.relay.pending.pop(str(header.get("msg_id", "")), None)
        reply: dict[str, Any] = ({"status": "error", "execution_count": count, **error} if error is not None else
                                 {"status": "ok", "execution_count": count, "payload": [], "user_expressions": {}})
        await self.relay._reply(p, "execute_reply", reply)
        await self.relay._publish("status", {"execution_state": "idle"}, header)


def is_complete(code: str) -> dict[str, Any]:
    """The console's own rule (codeop): complete, needs more lines (with the next indent), or invalid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compiled = codeop.compile_command(code, "<cell>", "exec")
        except (SyntaxError, OverflowError, ValueError):
            return {"status": "invalid"}
    last = code.rstrip("\n").rsplit("\n", 1)[-1]
    indent = last[: len(last) - len(last.lstrip())]
    if compiled is None:
        if last.rstrip().endswith(":"):
            indent += "    "
        return {"status": "incomplete", "indent": indent}
    if indent and "\n" in code.strip("\n") and not code.endswith("\n\n"):
        return {"status": "incomplete", "indent": indent}  # inside a block: a blank line ends it, as in IPython
    return {"status": "complete"}


def complete(code: str, cursor_pos: int) -> dict[str, Any]:
    """Keywords and builtins (the guest's own names would need IPython there)."""
    m = _NAME_AT_END.search(code[:cursor_pos])
    prefix = m.group(0) if m else ""
    matches = sorted(n for n in {*keyword.kwlist, *dir(builtins)} if prefix and n.startswith(prefix))
    return {"status": "ok", "matches": matches, "cursor_start": cursor_pos - len(prefix), "cursor_end": cursor_pos,
            "metadata": {}}
