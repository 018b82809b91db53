"""The host side of hotbox's guest init (``runtimes/vm/init``): its settings file and its messages.

The host writes ``/hotbox/run.conf`` (sourced by init's busybox sh, so every value is shell-quoted
here) into the run's own initramfs archive. Init answers on the ``hotbox.out`` port: the command's
output as raw bytes with init's messages in-band as ``ESC ] hbctl;<nonce>;<message> BEL`` frames
(see the init script for the list). :class:`GuestStream` splits that byte stream again.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ..errors import VmBootError
from ..events import Event, Exit, Progress, ResultValue, StdoutChunk
from ..models import ExitReason

if TYPE_CHECKING:
    from .backend import Accel, RunInfo
    from .config import VmConfig

__all__ = ["GuestMessage", "GuestOutcome", "GuestStream", "GuestVm", "guest_run_events", "new_nonce", "run_conf"]

_CTL_START = b"\x1b]hbctl;"
_CTL_END = b"\x07"
_MAX_CTL = 4096
_MAX_RESULT = 64 * 1024 * 1024


def new_nonce() -> str:
    """A fresh secret for one run: the command never sees it, so it cannot forge init's messages."""
    return secrets.token_hex(12)


@dataclass(frozen=True)
class GuestMessage:
    """One item of the guest's stream: ``kind`` is "data" (command output), "ctl" or "result"."""

    kind: str
    data: bytes = b""
    text: str = ""


class GuestStream:
    """Incremental splitter of the ``hotbox.out`` byte stream into output, messages and the result."""

    def __init__(self, nonce: str) -> None:
        self._prefix = _CTL_START + nonce.encode() + b";"
        self._buf = b""
        self._result_left: int | None = None
        self._result = bytearray()

    def feed(self, data: bytes) -> list[GuestMessage]:
        """Consume the next bytes; return the complete items, in order."""
        self._buf += data
        out: list[GuestMessage] = []
        while self._buf:
            if self._result_left is not None:
                take = self._buf[: self._result_left]
                self._buf = self._buf[len(take):]
                self._result += take
                self._result_left -= len(take)
                if self._result_left:
                    break
                out.append(GuestMessage("result", bytes(self._result)))
                self._result_left = None
                self._result = bytearray()
                continue
            start = self._buf.find(self._prefix)
            if start < 0:
                keep = self._partial(self._buf)
                if len(self._buf) > keep:
                    out.append(GuestMessage("data", self._buf[: len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep:]
                break
            if start:
                out.append(GuestMessage("data", self._buf[:start]))
                self._buf = self._buf[start:]
            end = self._buf.find(_CTL_END, len(self._prefix))
            if end < 0:
                if len(self._buf) > _MAX_CTL:  # not a message after all: pass it on as output
                    out.append(GuestMessage("data", self._buf[:1]))
                    self._buf = self._buf[1:]
                    continue
                break
            msg = self._buf[len(self._prefix): end].decode("utf-8", "replace")
            self._buf = self._buf[end + 1:]
            if msg.startswith("result "):
                try:
                    n = int(msg.split()[1])
                except (IndexError, ValueError):
                    n = -1
                if 0 <= n <= _MAX_RESULT:
                    self._result_left = n
                    if n == 0:
                        self._result_left = None
                        out.append(GuestMessage("result", b""))
                    continue
            out.append(GuestMessage("ctl", text=msg))
        return out

    def flush(self) -> list[GuestMessage]:
        """End of stream: what is buffered is output."""
        buf, self._buf = self._buf, b""
        return [GuestMessage("data", buf)] if buf and self._result_left is None else []

    def _partial(self, buf: bytes) -> int:
        for n in range(min(len(self._prefix) - 1, len(buf)), 0, -1):
            if self._prefix.startswith(buf[-n:]):
                return n
        return 0


def _q(s: str) -> str:
    return shlex.quote(s)


def run_conf(*, nonce: str, modules: Iterable[str], command: Sequence[str], env: dict[str, str],
             workdir: str, net: bool, shares: Iterable[tuple[str, str, bool]],
             epoch: float | None = None, port_dev: str = "", halt: str = "poweroff", root_ro: bool = False,
             net_addr: tuple[str, str, str] | None = None) -> str:
    """The shell settings init sources: modules to load, shares ``(tag, guest path, read_only)``,
    networking, and ``hb_exec``, which runs the command chrooted into the image with exactly ``env``.

    The command runs through the initramfs' static busybox (bind-mounted at /.hotbox) only to change
    into ``workdir``; ``exec`` then replaces it, so the command's exit code is init's ``$?``.
    """
    lines = [
        f"HB_NONCE={_q(nonce)}",
        f"HB_MODULES={_q(' '.join(modules))}",
        f"HB_NET={1 if net else 0}",
        f"HB_WORKDIR={_q(workdir)}",
        f"HB_EPOCH={int(epoch if epoch is not None else time.time())}",
        f"HB_PORT_DEV={_q(port_dev)}",
        f"HB_HALT={_q(halt)}",
        f"HB_ROOT_RO={1 if root_ro else 0}",
        *([f"HB_NET_ADDR={_q(net_addr[0])}", f"HB_NET_GW={_q(net_addr[1])}", f"HB_NET_DNS={_q(net_addr[2])}"]
          if net_addr else []),
        "hb_shares() {",
        "    :",
    ]
    for tag, guest, ro in shares:
        lines.append(f"    hb_share {_q(tag)} {_q(guest)} {'ro' if ro else 'rw'}")
    lines.append("}")
    env_words = " ".join(_q(f"{k}={v}") for k, v in env.items())
    helper = 'cd -- "$1" || exit 126; shift; unset OLDPWD SHLVL; exec "$@"'
    argv = " ".join(_q(a) for a in command)
    lines += [
        "hb_exec() {",
        f"    env -i {env_words} /bin/chroot /newroot /.hotbox/busybox sh -c {_q(helper)} hotcell "
        f"{_q(workdir)} {argv}",
        "}",
    ]
    return "\n".join(lines) + "\n"


# --- one run, whatever the VMM ------------------------------------------------------------------------

class GuestVm(Protocol):
    """What :func:`guest_run_events` needs of a started VM (QEMU's and Firecracker's runs provide it)."""

    nonce: str
    accel: Accel
    started: float
    said_bye: bool

    async def receive(self) -> bytes:
        """The next bytes of the guest's stream; b"" once it ended (the VMM exited)."""

    async def send_bye(self) -> None:
        """Answer init's ``end``: it may power off now."""

    async def kill(self) -> None:
        """Kill the VMM at once."""

    def diagnostics(self) -> str:
        """Tails of the VMM's and the guest kernel's logs, for error messages."""

    def kernel_log(self) -> str:
        """What the guest kernel printed (panics), to tell an out-of-memory death from a crash."""


def panic_message(kernel_log: str) -> str | None:
    """"the microVM's kernel panicked: <its panic line>" when the guest kernel's console has one."""
    for line in kernel_log.splitlines():
        at = line.find("Kernel panic")
        if at >= 0:
            return f"the microVM's kernel panicked: {line[at:].strip()[:300]}"
    return None


class GuestOutcome:
    """What init reported about the command."""

    def __init__(self) -> None:
        self.ready = False
        self.exit_code: int | None = None
        self.oom = False
        self.result: Any = None
        self.has_result = False
        self.result_note = ""
        self.error: str | None = None
        self.end = False
        self.guest_uptime: float | None = None  # the guest kernel's uptime when the command started

    def apply(self, text: str) -> None:
        word, _, rest = text.partition(" ")
        if word == "ready":
            self.ready = True
            with contextlib.suppress(ValueError):
                self.guest_uptime = float(rest)
        elif word == "exit":
            with contextlib.suppress(ValueError):
                self.exit_code = int(rest)
        elif word == "oom":
            self.oom = True
        elif word == "error":
            self.error = rest
        elif word == "end":
            self.end = True

    def set_result(self, raw: bytes) -> None:
        try:
            self.result, self.has_result = json.loads(raw), True
        except ValueError as exc:
            self.result_note = f"/hotcell/result.json is not JSON ({exc}); it was ignored"

    def exit_event(self, config: VmConfig) -> Exit:
        code = self.exit_code if self.exit_code is not None else -1
        if self.oom and code != 0:
            return Exit(reason=ExitReason.OOM, exit_code=code,
                        message=f"the guest ran out of memory (memory_mib={config.memory_mib}); the kernel's OOM "
                                f"killer ended the command (exit code {code})")
        note = f"; {self.result_note}" if self.result_note else ""
        return Exit(reason=ExitReason.EXITED, exit_code=code, message=f"exited with code {code}{note}")


async def guest_run_events(vm: GuestVm, config: VmConfig, info: RunInfo, boot_timeout: float) -> AsyncIterator[Event]:
    """The events of one run, read from the guest's stream until init's ``end`` (or the VMM's exit).

    The boot deadline runs from the VMM's start to init's ``ready``, the command's timeout from
    there. Raises VmBootError when the guest does not get the command started. The caller owns the VM
    and closes it afterwards (gracefully when ``vm.said_bye``).
    """
    yield Progress(f"booting a microVM under {vm.accel.upper()} ({config.vcpus} vCPU, {config.memory_mib} MiB)")
    stream = GuestStream(vm.nonce)
    outcome = GuestOutcome()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    boot_deadline = vm.started + boot_timeout
    run_deadline: float | None = None
    eof = False
    while not outcome.end and not eof:
        deadline = run_deadline if run_deadline is not None else boot_deadline
        data: bytes | None = None
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            data = await vm.receive()
        if data is None:
            if run_deadline is None:
                raise VmBootError(f"the VM did not start the command within {boot_timeout:g} s; {vm.diagnostics()}")
            await vm.kill()
            info.ended = time.monotonic()
            tail = decoder.decode(b"", True)
            if tail:
                yield StdoutChunk(tail)
            yield Exit(reason=ExitReason.TIMEOUT, exit_code=124,
                       message=f"the command ran past its {config.timeout:g} s timeout; the VM was killed")
            return
        eof = not data
        events: list[Event] = []
        for m in [*stream.feed(data), *(stream.flush() if eof else [])]:
            if m.kind == "data":
                text = decoder.decode(m.data)
                if text:
                    events.append(StdoutChunk(text))
            elif m.kind == "result":
                outcome.set_result(m.data)
            else:
                was_ready = outcome.ready
                outcome.apply(m.text)
                if outcome.error:
                    raise VmBootError(f"the guest's init failed: {outcome.error}; {vm.diagnostics()}")
                if outcome.ready and not was_ready:
                    info.ready = time.monotonic()
                    run_deadline = info.ready + config.timeout
                    inside = f", {outcome.guest_uptime:.2f} s of it in the guest" if outcome.guest_uptime else ""
                    events.append(Progress(f"guest up in {info.ready - vm.started:.2f} s{inside}; command started"))
                if outcome.exit_code is not None and info.ended is None:
                    info.ended = time.monotonic()
        for ev in events:
            yield ev
    tail = decoder.decode(b"", True)
    if tail:
        yield StdoutChunk(tail)
    if not outcome.ready:
        raise VmBootError(f"the VM stopped before the command started; {vm.diagnostics()}")
    if outcome.end:
        await vm.send_bye()
    if outcome.exit_code is None:
        info.ended = time.monotonic()
        klog = vm.kernel_log()
        if "out of memory" in klog.lower():
            yield Exit(reason=ExitReason.OOM, exit_code=137,
                       message=f"the guest ran out of memory (memory_mib={config.memory_mib}) and stopped")
        else:
            yield Exit(reason=ExitReason.ERROR, exit_code=255,
                       message=f"the VM stopped before the command's end was reported; {vm.diagnostics()}")
        return
    info.oom = outcome.oom
    if outcome.has_result:
        yield ResultValue(value=outcome.result)
    yield outcome.exit_event(config)
