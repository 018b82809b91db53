"""The one place where Hotcell events become Jupyter messages.

The kernel hands every event of a cell to :class:`CellPublisher`, which publishes it on IOPub at once
(one ``stream`` message per chunk, so output reaches the notebook while the cell runs) and remembers how
the cell ended, so the kernel can build its ``execute_reply`` from :meth:`CellPublisher.reply`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..events import DisplayData, ErrorValue, Event, Exit, Progress, ResultValue, StderrChunk, StdoutChunk
from ..models import ExitReason

__all__ = ["CellPublisher", "Publish", "error_content"]

# publish(msg_type, content): sends one IOPub message in reply to the current request.
Publish = Callable[[str, dict[str, Any]], None]

# What a cell that ended without an exception of its own is reported as, by how it ended.
_ENAMES = {
    ExitReason.INTERRUPTED: "KeyboardInterrupt",
    ExitReason.TIMEOUT: "TimeoutError",
    ExitReason.OOM: "MemoryError",
    ExitReason.DISK: "OSError",
}


def error_content(ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
    """An ``error`` message's content; a front end shows only the traceback, so it is never empty."""
    return {"ename": ename, "evalue": evalue, "traceback": traceback or [f"{ename}: {evalue}"]}


class CellPublisher:
    """Publishes one cell's events and works out its reply.

    ``silent`` cells (a front end's own requests) publish nothing, as the protocol asks; their reply
    still says whether they failed.
    """

    def __init__(self, publish: Publish, execution_count: int, *, silent: bool = False) -> None:
        self._publish = publish
        self._count = execution_count
        self._silent = silent
        self.error: dict[str, Any] | None = None
        self.exit: Exit | None = None

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        if not self._silent:
            self._publish(msg_type, content)

    def stream(self, name: str, text: str) -> None:
        self._send("stream", {"name": name, "text": text})

    def fail(self, ename: str, evalue: str, traceback: list[str] | None = None) -> None:
        """The cell failed before or outside the guest's code (e.g. the VM did not boot)."""
        self.error = error_content(ename, evalue, traceback)
        self._send("error", self.error)

    def feed(self, ev: Event) -> None:
        match ev:
            case StdoutChunk(text=text):
                self.stream("stdout", text)
            case StderrChunk(text=text):
                self.stream("stderr", text)
            case Progress(text=text):
                self.stream("stderr", text if text.endswith("\n") else text + "\n")
            case DisplayData(data=data, metadata=metadata):
                self._send("display_data", {"data": data, "metadata": metadata, "transient": {}})
            case ResultValue(value=value, data=data):
                bundle = data or {"text/plain": repr(value)}
                self._send("execute_result", {"execution_count": self._count, "data": bundle, "metadata": {}})
            case ErrorValue(ename=ename, evalue=evalue, traceback=tb):
                self.fail(ename, evalue, list(tb))
            case Exit():
                self.exit = ev
                self._finish(ev)

    def _finish(self, ev: Exit) -> None:
        """A cell that failed without raising (interrupted, timed out, its VM died, ``sys.exit(3)``)
        still gets an error message, so the front end marks it failed and stops a run-all."""
        if self.error is not None:
            return
        if ev.reason is ExitReason.EXITED:
            if ev.exit_code in (0, None):
                return
            self.fail("SystemExit", f"the cell exited with status {ev.exit_code}")
            return
        ename = _ENAMES.get(ev.reason, "HotcellError")
        self.fail(ename, ev.message or ev.reason.value)

    def reply(self) -> dict[str, Any]:
        """The ``execute_reply`` content."""
        if self.error is not None:
            return {"status": "error", "execution_count": self._count, **self.error}
        return {"status": "ok", "execution_count": self._count, "payload": [], "user_expressions": {}}
