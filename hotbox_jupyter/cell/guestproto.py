"""The host side of hotbox's guest init (``runtimes/vm/init``): its settings file and its messages.

The host writes ``/hotbox/run.conf`` (sourced by init's busybox sh, so every value is shell-quoted
here) into the run's own initramfs archive. Init answers on the ``hotbox.out`` port: the command's
output as raw bytes with init's messages in-band as ``ESC ] hbctl;<nonce>;<message> BEL`` frames
(see the init script for the list). :class:`GuestStream` splits that byte stream again.
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["GuestMessage", "GuestStream", "new_nonce", "run_conf"]

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
             epoch: float | None = None) -> str:
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
