"""The host side of the sandboxed kernels: a relay of the Jupyter wire protocol, and nothing more.

The host kernel binds the five sockets of its connection file and forwards raw multipart frames to a
real ipykernel inside a sandbox (:class:`~.sandbox.KernelSandbox`), which uses the same session key,
so signatures pass through unchanged:

* shell, control, stdin: one DEALER per front-end ROUTER identity, carrying that identity as its own
  routing id, so the guest routes ``input_request`` (sent to the shell identity on the stdin socket)
  and replies to several clients exactly as if they were connected directly;
* iopub: guest → front end as is; heartbeat: answered here (guest death is detected and reported by
  the relay itself, so the front end never needs to restart the kernel for it).

Headers are parsed only where the relay has a job of its own: it remembers the shell requests in
flight (to answer them if the sandbox dies), escalates an ``interrupt_request`` the cell ignores,
turns ``shutdown_request`` into stopping the sandbox, and adds a line about the sandbox to the
``kernel_info_reply`` banner (re-signed with the same key).

A sandbox that dies (OOM, a panic, the container exiting) ends the cell with an ``error`` saying why in
plain words; the next request starts a fresh sandbox.

An image without ipykernel gets basic Python: the sandbox serves the stdlib agent instead, and
:class:`~.basic.BasicKernel` answers the requests the guest kernel would (same sockets, heartbeat,
escalation, death and metering as here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from .metering import KernelMeter
from .sandbox import GuestAddresses, KernelSandbox, SandboxError

if TYPE_CHECKING:
    from .basic import BasicKernel

__all__ = ["KernelRelay"]

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
CHANNELS = ("shell", "control", "stdin")
INTERRUPT_GRACE_S = 5.0
"""How long a cell may ignore an interrupt before its sandbox is stopped."""
SHUTDOWN_GRACE_S = 3.0

LANGUAGE_INFO = {"name": "python", "mimetype": "text/x-python", "file_extension": ".py",
                 "pygments_lexer": "ipython3", "codemirror_mode": {"name": "ipython", "version": 3},
                 "nbconvert_exporter": "python"}


def _split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(routing idents, [signature, header, parent, metadata, content, *buffers])."""
    i = frames.index(DELIM)
    return frames[:i], frames[i + 1:]


def _msg_type(frames: list[bytes]) -> str:
    """The message type of a raw message (for debug logs only)."""
    try:
        return str(json.loads(_split(frames)[1][1]).get("msg_type", "?"))
    except (ValueError, IndexError, AttributeError):
        return "?"


def _routing_id(ident: bytes) -> bytes:
    # libzmq refuses routing ids that start with a zero byte (those are its own generated ones).
    return ident if ident and ident[0] != 0 else b"hb-" + ident


@dataclass
class _Pending:
    """A shell request forwarded to the guest and not answered yet."""

    idents: list[bytes]
    header: dict[str, Any]


@dataclass
class _Guest:
    """One running sandbox and the relay's sockets to its kernel."""

    sandbox: KernelSandbox
    addresses: GuestAddresses | None
    basic: BasicKernel | None = None
    """Set when the image has no ipykernel: basic Python through the stdlib agent."""
    dealers: dict[tuple[str, bytes], zmq.asyncio.Socket] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    iopub: zmq.asyncio.Socket | None = None


class KernelRelay:
    """Relays one front end's connection file to a kernel in a sandbox made by ``make_sandbox``."""

    def __init__(self, connection: dict[str, Any], make_sandbox: Callable[[], KernelSandbox], *,
                 first: KernelSandbox | None = None, interrupt_grace: float = INTERRUPT_GRACE_S,
                 meter: KernelMeter | None = None) -> None:
        """``first``: a sandbox already :meth:`~.sandbox.KernelSandbox.prestart`-ed with this key (and, with
        ``meter``, already admitted); ``meter`` bills every sandbox in the project's ledger."""
        self.connection = connection
        self.make_sandbox = make_sandbox
        self.meter = meter
        self._first = first
        self.interrupt_grace = interrupt_grace
        key = str(connection.get("key", "")).encode()
        self.session = Session(key=key, signature_scheme=str(connection.get("signature_scheme", "hmac-sha256")),
                               username="hotbox")
        self.ctx = zmq.asyncio.Context()
        self.front: dict[str, zmq.asyncio.Socket] = {}
        self.pending: dict[str, _Pending] = {}
        # kernel_info_requests that arrived while another was with the guest: they get its answer.
        self._info_asked: str | None = None
        self._info_copies: list[_Pending] = []
        self.guest: _Guest | None = None
        self._starting: asyncio.Task[_Guest] | None = None
        self._last_death: str | None = None
        self._start_error: Exception | None = None
        self._shutdown_replied: asyncio.Event | None = None
        self._done = asyncio.Event()
        self._escalation: asyncio.Task[None] | None = None
        self._escalation_target: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life ----------------------------------------------------------------------------------------

    def _bind(self) -> None:
        c = self.connection
        transport, ip = c.get("transport", "tcp"), c.get("ip", "127.0.0.1")

        def url(port: int) -> str:
            return f"tcp://{ip}:{port}" if transport == "tcp" else f"ipc://{ip}-{port}"

        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.PUB, "hb": zmq.REP}
        for name, kind in kinds.items():
            sock = self.ctx.socket(kind)
            sock.linger = 1000
            if kind == zmq.ROUTER:
                sock.router_handover = 1  # a client reconnecting with its identity takes it over
            sock.bind(url(int(c[f"{name}_port"])))
            self.front[name] = sock

    async def run(self) -> None:
        """Bind, start the sandbox, relay until a shutdown_request or SIGTERM; always stop the sandbox."""
        self._bind()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, self._done.set)
            loop.add_signal_handler(signal.SIGINT, lambda: None)  # interrupts come as messages
        self._spawn(self._heartbeat())
        for ch in CHANNELS:
            self._spawn(self._front_reader(ch))
        self._starting = asyncio.ensure_future(self._start_guest())
        try:
            await self._done.wait()
        finally:
            await self._stop_guest(graceful=False)
            for t in list(self._tasks):
                t.cancel()
            for sock in self.front.values():
                sock.close(linger=200)
            self.ctx.term()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("relay task failed", exc_info=t.exception())

    async def _heartbeat(self) -> None:
        hb = self.front["hb"]
        while True:
            await hb.send_multipart(await hb.recv_multipart())

    # -- the sandbox ---------------------------------------------------------------------------------

    def _settle(self, reason: str) -> None:
        if self.meter is not None:
            self.meter.settle(reason)

    async def _start_guest(self) -> _Guest:
        if self.meter is not None and not self.meter.running:
            await asyncio.to_thread(self.meter.admit)  # a refusal (quota) creates nothing
        sandbox, self._first = self._first or self.make_sandbox(), None
        c = self.connection
        try:
            addresses = await sandbox.start(key=str(c.get("key", "")),
                                            signature_scheme=str(c.get("signature_scheme", "hmac-sha256")))
        except BaseException:
            self._settle("error")
            raise
        if not isinstance(addresses, GuestAddresses):
            return self._basic_guest(sandbox, addresses)
        guest = _Guest(sandbox, addresses)
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.reconnect_ivl = 10
        sub.connect(addresses.iopub)
        guest.iopub = sub
        guest.tasks.append(asyncio.ensure_future(self._iopub_reader(sub)))
        guest.tasks.append(asyncio.ensure_future(self._watch(guest)))
        self.guest = guest
        log.info("sandbox ready: %s", sandbox.describe())
        return guest

    def _basic_guest(self, sandbox: KernelSandbox, session: Any) -> _Guest:
        from .basic import BasicKernel

        guest = _Guest(sandbox, None)
        image = str(getattr(getattr(sandbox, "options", None), "image", "this image"))
        guest.basic = BasicKernel(session, image=image, relay=self,
                                  on_death=lambda reason: self._guest_died(guest, reason), wait_dead=sandbox.wait_dead,
                                  banner=f"Python (basic: {image} has no ipykernel)\n{sandbox.describe()}\n")
        guest.tasks.append(asyncio.ensure_future(self._watch(guest)))
        self.guest = guest
        log.info("sandbox ready (basic Python, no ipykernel): %s", sandbox.describe())
        return guest

    async def _ensure_guest(self, *, retry: bool) -> _Guest:
        """The running sandbox, waiting for one being started, or starting a fresh one. After a failed
        start only ``retry`` (a cell) tries again; other requests get the same error at once."""
        if self.guest is not None:
            return self.guest
        if self._start_error is not None and not retry:
            raise self._start_error
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_guest())
        try:
            guest = await asyncio.shield(self._starting)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._starting = None
            self._start_error = exc
            raise
        self._start_error = None
        return guest

    async def _watch(self, guest: _Guest) -> None:
        reason = await guest.sandbox.wait_dead()
        if self.guest is guest:
            await self._guest_died(guest, reason)

    async def _guest_died(self, guest: _Guest, reason: str) -> None:
        """Answer every request the dead guest owed, in plain words, then forget the guest."""
        if self.guest is not guest:
            return  # already answered (a basic kernel's cell and the watcher may both see the death)
        log.warning("sandbox died: %s", reason)
        self.guest = None
        self._starting = None
        self._last_death = reason
        await self._close_guest_sockets(guest, keep_task=asyncio.current_task())
        pending, self.pending = list(self.pending.values()), {}
        self._info_asked, self._info_copies = None, []
        first_execute = True
        for p in pending:
            if p.header.get("msg_type") == "execute_request" and first_execute:
                first_execute = False
                await self._fail(p, "SandboxDied", reason)
            else:
                await self._fail(p, "SandboxDied", reason, aborted=p.header.get("msg_type") == "execute_request")
        await guest.sandbox.kill()
        self._settle("error")

    async def _close_guest_sockets(self, guest: _Guest, keep_task: asyncio.Task[Any] | None = None) -> None:
        for t in guest.tasks:
            if t is not keep_task:
                t.cancel()
        for sock in guest.dealers.values():
            sock.close(linger=0)
        guest.dealers.clear()
        if guest.iopub is not None:
            guest.iopub.close(linger=0)
            guest.iopub = None

    async def _stop_guest(self, *, graceful: bool) -> None:
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        guest, self.guest = self.guest, None
        if guest is not None:
            await self._release(guest, graceful=graceful)

    async def _release(self, guest: _Guest, *, graceful: bool) -> None:
        """Close the relay's sockets to ``guest``, stop (or kill) its sandbox and settle its bill."""
        await self._close_guest_sockets(guest)
        with contextlib.suppress(Exception):
            await (guest.sandbox.stop() if graceful else guest.sandbox.kill())
        self._settle("exited")

    def _dealer(self, guest: _Guest, channel: str, ident: bytes) -> zmq.asyncio.Socket:
        sock = guest.dealers.get((channel, ident))
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.routing_id = _routing_id(ident)
            sock.linger = 0
            sock.reconnect_ivl = 10
            sock.connect(getattr(guest.addresses, channel))
            guest.dealers[(channel, ident)] = sock
            guest.tasks.append(asyncio.ensure_future(self._guest_reader(channel, ident, sock)))
            if channel == "shell":  # the guest's input_request goes to this identity on its stdin socket
                self._dealer(guest, "stdin", ident)
        return sock

    # -- front end → guest ---------------------------------------------------------------------------

    async def _front_reader(self, channel: str) -> None:
        sock = self.front[channel]
        while True:
            frames = await sock.recv_multipart(copy=True)
            try:
                await self._from_front(channel, frames)
            except Exception:
                log.exception("relaying a %s message failed", channel)

    async def _from_front(self, channel: str, frames: list[bytes]) -> None:
        idents, rest = _split(frames)
        if not idents or len(rest) < 5:
            return
        header: dict[str, Any] = json.loads(rest[1])
        msg_type = header.get("msg_type", "")
        log.debug("front %s: %s", channel, msg_type)
        if channel == "control" and msg_type == "shutdown_request":
            await self._shutdown(idents, header, frames)
            return
        if channel == "shell" and msg_type.endswith("_request"):  # comm messages get no reply
            self.pending[header.get("msg_id", "")] = _Pending(idents, header)
        if channel == "shell" and msg_type == "kernel_info_request":
            # A client polls kernel_info until one is answered (jupyter_client: every second), so a slow
            # sandbox start piles them up; the guest answers one, which costs a TCG guest 0.1 s or more.
            if self._info_asked in self.pending:  # asked and not answered yet
                self._info_copies.append(self.pending[header.get("msg_id", "")])
                return
            self._info_asked = header.get("msg_id", "")
        try:
            guest = await self._ensure_guest(retry=msg_type == "execute_request")
        except Exception as exc:
            await self._no_guest(channel, idents, header, exc)
            return
        if channel == "shell" and msg_type == "execute_request" and self._last_death is not None:
            reason, self._last_death = self._last_death, None
            await self._publish("stream", {"name": "stderr", "text": (
                f"[hotbox] the previous sandbox is gone ({reason}); this cell runs in a fresh one, "
                "so earlier variables and imports are lost\n")}, header)
        if channel == "control" and msg_type == "interrupt_request":
            self._arm_escalation(guest)
        if guest.basic is not None:
            if channel != "stdin":
                content = json.loads(rest[4]) if len(rest) > 4 else {}
                task = await guest.basic.handle(channel, _Pending(idents, header), content)
                if task is not None:
                    guest.tasks[:] = [t for t in guest.tasks if not t.done()] + [task]
            return
        await self._dealer(guest, channel, idents[0]).send_multipart(frames[1:], copy=True)
        log.debug("to guest %s: %s", channel, msg_type)

    async def _no_guest(self, channel: str, idents: list[bytes], header: dict[str, Any], exc: Exception) -> None:
        """No sandbox could be started: every request still gets an answer saying why."""
        why = str(exc) if isinstance(exc, SandboxError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, SandboxError):
            log.error("starting the sandbox failed", exc_info=exc)
        self._starting = None
        p = self.pending.pop(header.get("msg_id", ""), None) or _Pending(idents, header)
        msg_type = header.get("msg_type", "")
        if not msg_type.endswith("_request"):
            return  # comm messages: nobody waits for an answer
        if msg_type == "kernel_info_request":  # with busy/idle: clients check that iopub works too
            self._info_asked = None
            info = self._local_kernel_info(f"the sandbox did not start: {why}")
            await self._publish("status", {"execution_state": "busy"}, header)
            await self._reply(p, "kernel_info_reply", info, channel=channel)
            await self._publish("status", {"execution_state": "idle"}, header)
            await self._answer_info_copies(info)
        elif msg_type == "interrupt_request":
            await self._reply(p, "interrupt_reply", {"status": "ok"}, channel=channel)
        else:
            await self._fail(p, "SandboxUnavailable", f"the sandbox could not be started: {why}", channel=channel)

    def _arm_escalation(self, guest: _Guest) -> None:
        running = [p for p in self.pending.values() if p.header.get("msg_type") == "execute_request"]
        if not running:
            return
        target = running[0].header.get("msg_id")
        if self._escalation is not None and not self._escalation.done():
            if self._escalation_target == target:
                return  # a second interrupt of the same cell does not restart the clock
            self._escalation.cancel()
        self._escalation_target = target
        self._escalation = asyncio.ensure_future(self._escalate(guest, target))

    async def _escalate(self, guest: _Guest, msg_id: Any) -> None:
        """The cell ignores the interrupt: stop its sandbox, say so, and let the next cell get a fresh one."""
        await asyncio.sleep(self.interrupt_grace)
        if self.guest is not guest or msg_id not in self.pending:
            return
        await self._guest_died(guest, f"the cell did not stop within {self.interrupt_grace:g} s of the interrupt, "
                                      "so its sandbox was stopped")

    async def _shutdown(self, idents: list[bytes], header: dict[str, Any], frames: list[bytes]) -> None:
        guest, self.guest = self.guest, None  # from here on its exit is a shutdown, not a death
        content: dict[str, Any] = {"status": "ok", "restart": False}
        with contextlib.suppress(json.JSONDecodeError, IndexError):
            content["restart"] = bool(json.loads(_split(frames)[1][4]).get("restart", False))
        ipykernel = guest is not None and guest.basic is None
        if ipykernel:
            # The guest answers (its reader forwards the shutdown_reply) and ends its kernel; the front end
            # kills this process a few seconds after asking, so the sandbox goes at once after the reply.
            assert guest is not None
            self._shutdown_replied = asyncio.Event()
            dealer = self._dealer(guest, "control", idents[0])
            await dealer.send_multipart(frames[1:], copy=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._shutdown_replied.wait(), SHUTDOWN_GRACE_S)
        if guest is not None:
            await self._release(guest, graceful=False)
        if not ipykernel:  # no guest kernel to answer: basic Python, or no sandbox
            await self._reply(_Pending(idents, header), "shutdown_reply", content, channel="control")
        await self._stop_guest(graceful=False)
        self._done.set()

    # -- guest → front end ---------------------------------------------------------------------------

    async def _guest_reader(self, channel: str, ident: bytes, sock: zmq.asyncio.Socket) -> None:
        front = self.front[channel]
        while True:
            frames = await sock.recv_multipart(copy=True)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("from guest %s: %s", channel, _msg_type(frames))
            info = None
            if channel == "shell":
                frames, info = self._note_reply(frames)
            await front.send_multipart([ident, *frames], copy=True)
            if info is not None:
                await self._answer_info_copies(info)
            if channel == "control" and self._shutdown_replied is not None:
                self._shutdown_replied.set()

    def _note_reply(self, frames: list[bytes]) -> tuple[list[bytes], dict[str, Any] | None]:
        """The reply to pass on (a kernel_info_reply's banner gets a line about the sandbox), and the
        kernel_info content when it answers the request that others wait for."""
        try:
            idents, rest = _split(frames)
            parent = json.loads(rest[2])
            msg_id = parent.get("msg_id", "")
            self.pending.pop(msg_id, None)
            if json.loads(rest[1]).get("msg_type") != "kernel_info_reply":
                return frames, None
            content = json.loads(rest[4])
            if self.guest is not None:
                content["banner"] = f"{content.get('banner', '')}\n{self.guest.sandbox.describe()}\n".lstrip("\n")
            new = [rest[1], rest[2], rest[3], json.dumps(content).encode()]
            first = msg_id == self._info_asked
            if first:
                self._info_asked = None
            return [*idents, DELIM, self.session.sign(new), *new, *rest[5:]], content if first else None
        except (ValueError, IndexError, AttributeError):
            return frames, None

    async def _answer_info_copies(self, content: dict[str, Any]) -> None:
        """Answer the kernel_info_requests that waited for the one the guest answered (busy/idle around
        each, as a kernel does: clients check that iopub works with them)."""
        copies, self._info_copies = self._info_copies, []
        for p in copies:
            if self.pending.pop(p.header.get("msg_id", ""), None) is None:
                continue  # answered meanwhile (the guest died)
            await self._publish("status", {"execution_state": "busy"}, p.header)
            await self._reply(p, "kernel_info_reply", content)
            await self._publish("status", {"execution_state": "idle"}, p.header)

    async def _iopub_reader(self, sub: zmq.asyncio.Socket) -> None:
        pub = self.front["iopub"]
        while True:
            frames = await sub.recv_multipart(copy=True)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("from guest iopub: %s", _msg_type(frames))
            await pub.send_multipart(frames, copy=True)

    # -- messages of the relay's own -----------------------------------------------------------------

    async def _send(self, sock: zmq.asyncio.Socket, msg_type: str, content: dict[str, Any],
                    parent: dict[str, Any] | None, idents: list[bytes] | None = None) -> None:
        msg = self.session.msg(msg_type, content, parent={"header": parent} if parent else None)
        await sock.send_multipart(self.session.serialize(msg, ident=idents), copy=True)

    async def _publish(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None) -> None:
        await self._send(self.front["iopub"], msg_type, content, parent, [f"kernel.hotbox.{msg_type}".encode()])

    async def _reply(self, p: _Pending, msg_type: str, content: dict[str, Any], *, channel: str = "shell") -> None:
        await self._send(self.front[channel], msg_type, content, p.header, p.idents)

    async def _fail(self, p: _Pending, ename: str, evalue: str, *, aborted: bool = False,
                    channel: str = "shell") -> None:
        """Answer a request the guest cannot: an ``error`` for a cell (with busy/idle around it)."""
        msg_type = str(p.header.get("msg_type", "execute_request"))
        reply_type = msg_type.replace("_request", "_reply")
        if msg_type != "execute_request":
            await self._reply(p, reply_type, {"status": "error", "ename": ename, "evalue": evalue, "traceback": []},
                              channel=channel)
            return
        await self._publish("status", {"execution_state": "busy"}, p.header)
        if aborted:
            await self._reply(p, "execute_reply", {"status": "aborted", "execution_count": None}, channel=channel)
        else:
            error = {"ename": ename, "evalue": evalue, "traceback": [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]}
            await self._publish("error", error, p.header)
            await self._reply(p, "execute_reply", {"status": "error", "execution_count": None, **error},
                              channel=channel)
        await self._publish("status", {"execution_state": "idle"}, p.header)

    def _local_kernel_info(self, banner: str) -> dict[str, Any]:
        from .. import __version__

        return {"status": "ok", "protocol_version": "5.3", "implementation": "hotbox",
                "implementation_version": __version__, "language_info": LANGUAGE_INFO, "banner": banner,
                "help_links": []}
