"""Guest side of a warm start (host side: ``hotbox_jupyter/hotcell/snapshot.py``). Standard library only.

A guest program that wants to be snapshotted once it is ready (imports done, servers bound) calls::

    import hotbox_warm
    payload = hotbox_warm.wait_for_start()   # blocks; the VM may be saved and restored many times here
    ...                                      # hotbox_warm.send({...}) / hotbox_warm.receive() afterwards

``wait_for_start`` tells the host "waiting" on the agent port (``AGENT_PORT=virtio:<name>``, found in
/sys/class/virtio-ports) and blocks until the host's start frame. Every VM restored from one snapshot
wakes up with the same memory, so before returning it makes this copy different from its siblings: the
host's fresh entropy goes into the kernel's pool (RNDADDENTROPY, then RNDRESEEDCRNG so that the very next
``os.urandom`` already depends on it; a plain write to /dev/urandom when those are refused), the wall
clock is set to the host's (the saved one is stale), and ``random`` is reseeded from the new pool.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import struct
import threading
import time

__all__ = ["find_port", "receive", "send", "wait_for_start"]

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07)

_channel = None


class _Channel:
    """One JSON object per line over the virtio-serial port."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._buf = b""
        self._lock = threading.Lock()

    def send(self, obj: dict) -> None:
        view = memoryview((json.dumps(obj, separators=(",", ":")) + "\n").encode())
        with self._lock:
            while view:
                view = view[os.write(self.fd, view):]

    def receive(self) -> dict:
        while b"\n" not in self._buf:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                # The host side is between two QEMU processes (a save or a restore): wait for it.
                time.sleep(0.02)
                continue
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        return msg if isinstance(msg, dict) else {"op": "invalid"}


def find_port(name: str) -> str:
    """The /dev path of the virtio-serial port called ``name``."""
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)):
        try:
            with open(os.path.join(base, entry, "name")) as f:
                if f.read().strip() == name:
                    return "/dev/" + entry
        except OSError:
            continue
    raise SystemExit(f"hotbox: no virtio port named {name!r}")


def _get() -> _Channel:
    global _channel
    if _channel is None:
        spec = os.environ.get("AGENT_PORT", "virtio:hotbox.agent")
        _channel = _Channel(find_port(spec[len("virtio:"):]) if spec.startswith("virtio:") else spec)
    return _channel


def send(obj: dict) -> None:
    """Send one JSON object to the host (from any thread)."""
    _get().send(obj)


def receive() -> dict:
    """The host's next JSON object (blocks)."""
    return _get().receive()


def _mix_entropy(seed: bytes) -> str:
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"no /dev/urandom: {exc}"
    try:
        words = (len(seed) + 3) // 4
        info = struct.pack("ii", len(seed) * 8, len(seed)) + seed.ljust(words * 4, b"\0")
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, info)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
            return "reseeded"
        except OSError:
            # Not root: mixed in, but used only at the kernel's next own reseed.
            os.write(fd, seed)
            return "written"
    finally:
        os.close(fd)


def _set_clock(when: float) -> str:
    try:
        time.clock_settime(time.CLOCK_REALTIME, when)
        return "set"
    except (OSError, AttributeError) as exc:
        return f"not set: {exc}"


def wait_for_start() -> dict:
    """Say "waiting", block until the host's start frame, make this copy unique; return its payload."""
    ch = _get()
    ch.send({"t": "waiting"})
    while True:
        msg = ch.receive()
        if msg.get("op") == "start":
            break
    entropy = _mix_entropy(base64.b64decode(msg.get("entropy", "")))
    clock = _set_clock(float(msg["time"])) if "time" in msg else "not sent"
    random.seed()
    ch.send({"t": "started", "entropy": entropy, "clock": clock})
    payload = msg.get("payload")
    return payload if isinstance(payload, dict) else {}
