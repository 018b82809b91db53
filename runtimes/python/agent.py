"""The persistent in-guest agent of a Hotcell session: many cells, one Python namespace.

Started once per session (``python3 -u /opt/hotbox/python/agent.py``) inside a microVM, or inside a
Docker box with ``AGENT_PORT=stdio``. Standard library only, plus ``cell.py`` next to this file, whose
rich-output machinery (display(), results, figures, error frames) every cell reuses, so a cell behaves
the same in a one-shot box and in a session.

Channel (``AGENT_PORT``): ``stdio`` (the agent's own stdin/stdout), ``virtio:<name>`` (the virtio-serial
port of that name, found in /sys/class/virtio-ports), ``vsock:<port>`` (a vsock connection to the host),
or a device/file path. One JSON object per line:

* host -> agent: ``{"op": "exec", "id": ID, "code": CODE}``, ``{"op": "interrupt"}``, ``{"op": "shutdown"}``
* agent -> host: ``{"t": "ready", "pid", "python"}``; ``{"t": "stdout" | "stderr", "b": BASE64}``;
  ``{"t": "done", "id": ID, "status": N}`` (0 ok, 1 exception, 130 interrupted, or the sys.exit code).

The cell's file descriptors 1 and 2 are pipes read by two threads, so output of subprocesses and C
code is captured too and streams while the cell runs. Rich output travels inside stdout as the in-band
frames of ``cell.py`` (``ESC ] hotbox; <json> BEL``), decoded on the host exactly as for a box.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import secrets
import signal
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from hotbox_warm import find_port  # noqa: E402 - importable once HERE is on sys.path


class Channel:
    """The line-framed JSON channel to the host."""

    def __init__(self, spec: str) -> None:
        self._sock = None
        if spec == "stdio":
            self.rfd, self.wfd = os.dup(0), os.dup(1)
        elif spec.startswith("vsock:"):
            import socket

            # Firecracker and libkrun: the host listens on the vsock port (CID 2 is the host).
            self._sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            self._sock.connect((socket.VMADDR_CID_HOST, int(spec[len("vsock:"):])))
            self.rfd = self.wfd = self._sock.fileno()
        else:
            path = spec
            if spec.startswith("virtio:"):
                path = find_port(spec[len("virtio:"):])
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            self.rfd, self.wfd = fd, fd
        for fd in {self.rfd, self.wfd}:
            os.set_inheritable(fd, False)
        self._lock = threading.Lock()
        self._buf = b""

    def send(self, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self._lock:
            view = memoryview(data)
            while view:
                n = os.write(self.wfd, view)
                view = view[n:]

    def receive(self) -> dict | None:
        """The next message, or None at end of stream."""
        while b"\n" not in self._buf:
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            return {"op": "invalid", "line": line[:200].decode("utf-8", "replace")}
        return msg if isinstance(msg, dict) else {"op": "invalid"}


class Pump(threading.Thread):
    """Forwards one of the cell's output pipes to the host, and answers sync markers.

    A marker written into the pipe after a cell comes out of it only after everything the cell wrote
    before: when the pump sees it, the cell's output has been sent and ``done`` may follow.
    """

    def __init__(self, fd: int, kind: str, channel: Channel, marker: bytes) -> None:
        super().__init__(name=f"agent-{kind}", daemon=True)
        self.fd, self.kind, self.channel, self.marker = fd, kind, channel, marker
        self.synced = threading.Event()

    def _send(self, data: bytes) -> None:
        if data:
            self.channel.send({"t": self.kind, "b": base64.b64encode(data).decode("ascii")})

    def run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                self._send(buf)
                return
            buf += chunk
            while True:
                i = buf.find(self.marker)
                if i < 0:
                    break
                self._send(buf[:i])
                buf = buf[i + len(self.marker):]
                self.synced.set()
            keep = 0
            for n in range(min(len(self.marker) - 1, len(buf)), 0, -1):
                if self.marker.startswith(buf[-n:]):
                    keep = n
                    break
            self._send(buf[: len(buf) - keep])
            buf = buf[len(buf) - keep:]


class Agent:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.requests: queue.Queue[dict | None] = queue.Queue()
        self.running = threading.Event()
        self.main_ident = threading.get_ident()
        self.count = 0
        self.marker = b"\x1b]hbsync;" + secrets.token_hex(8).encode() + b"\x07"
        self._redirect_output()
        import cell  # the one-shot runner: display(), frames, figures, IPython stand-in

        self.cell = cell
        cell.prepare_environment()
        self.module = cell.main_module()

    def _redirect_output(self) -> None:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        self.pumps = []
        for fd, kind in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            pump = Pump(r, kind, self.channel, self.marker)
            pump.start()
            self.pumps.append(pump)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, io.UnsupportedOperation):
                stream.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]

    def sync_output(self) -> None:
        """Return once everything the cell wrote to fd 1 and 2 has been sent to the host."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for pump, fd in zip(self.pumps, (1, 2), strict=True):
            pump.synced.clear()
            os.write(fd, self.marker)
        for pump in self.pumps:
            pump.synced.wait(10)

    def reader(self) -> None:
        """Host messages: exec requests queue up; an interrupt hits the running cell at once."""
        while True:
            msg = self.channel.receive()
            op = None if msg is None else msg.get("op")
            if msg is None or op == "shutdown":
                self.requests.put(None)
                return
            if op == "exec":
                self.requests.put(msg)
            elif op == "interrupt" and self.running.is_set():
                signal.pthread_kill(self.main_ident, signal.SIGINT)

    def run_cell(self, code: str) -> int:
        """Run one cell in the session's namespace; its status as ``cell.run_cell`` reports it."""
        self.count += 1
        # A distinct file name per cell, so a traceback shows the line from the cell it came from.
        return self.cell.run_cell(code, self.module.__dict__, filename=f"<cell-{self.count}>")

    def serve(self) -> int:
        threading.Thread(target=self.reader, name="agent-reader", daemon=True).start()
        self.channel.send({"t": "ready", "pid": os.getpid(), "python": sys.version.split()[0]})
        while True:
            try:
                req = self.requests.get()
            except KeyboardInterrupt:  # an interrupt that arrived just after its cell ended
                continue
            if req is None:
                break
            status = 130
            try:
                self.running.set()
                try:
                    status = self.run_cell(str(req.get("code", "")))
                finally:
                    self.running.clear()
                self.sync_output()
            except KeyboardInterrupt:
                self.sync_output()
            self.channel.send({"t": "done", "id": req.get("id"), "status": status})
        self.sync_output()
        return 0


def main() -> int:
    # SIGINT may have been ignored by whoever started us; an interrupt must reach the cell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    channel = Channel(os.environ.get("AGENT_PORT", "stdio"))
    return Agent(channel).serve()


if __name__ == "__main__":
    sys.exit(main())
