"""Turn a box's events into notebook output: the one place where events become IPython display calls.

:class:`EventRenderer` consumes the shared event vocabulary (:mod:`hotbox_jupyter.events`) and writes to
an :class:`OutputSink`. Two sinks exist because a cell has two places output can go:

* :class:`ShellSink` writes into the running cell, live: every chunk is written and flushed at once, so
  a line (or a partial line, or a ``\\r`` progress update) reaches the front end while the box runs.
* :class:`OutputWidgetSink` appends to an ``ipywidgets.Output`` from a background thread, for
  ``%%hotbox --async`` whose cell has finished long before the box does.

Whatever a box prints, the notebook shows at most ``max_output`` characters of it: past that the
renderer keeps consuming (so the box is never blocked) but hides the rest, and says how much it hid and
where the full console is (``%hotbox logs ID`` or ``--out``). A browser tab holding hundreds of MB of
text is what freezes a notebook; the box's console is kept by the engine regardless.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..events import DisplayData, ErrorValue, Event, Exit, Progress, ResultValue, StderrChunk, StdoutChunk

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "LINE_HOLD",
    "BoxValue",
    "EventFeed",
    "EventRenderer",
    "OutputSink",
    "OutputWidgetSink",
    "ShellSink",
    "coalesce",
    "format_size",
]

DEFAULT_MAX_OUTPUT = 2 * 1024 * 1024
"""Characters of console output a cell shows before it hides the rest (a few MB keeps a tab responsive)."""
LINE_HOLD = 0.2
"""Seconds text of one stream may wait for the other stream's unfinished line to end (see EventRenderer)."""


def format_size(n: float) -> str:
    """``1536`` → ``"1.5 KB"``: sizes in the notes shown to users."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class OutputSink(Protocol):
    """Where rendered output goes. Called by :class:`EventRenderer` only, from one thread at a time."""

    def stdout(self, text: str) -> None:
        """Show text the box wrote to stdout (any piece of a line, ``\\r`` included)."""

    def stderr(self, text: str) -> None:
        """Show text the box wrote to stderr, or a note of hotbox's own."""

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Show a MIME bundle as rich output."""

    def flush(self) -> None:
        """Push anything buffered to the front end now."""


class ShellSink:
    """Output into the running cell: ``sys.stdout`` / ``sys.stderr`` and IPython's display publisher.

    Every write is flushed at once: ipykernel would otherwise batch a stream for up to 200 ms, and a
    box that prints a line every 100 ms must show each line as it comes.
    """

    def stdout(self, text: str) -> None:
        """Write and flush to the cell's stdout."""
        sys.stdout.write(text)
        sys.stdout.flush()

    def stderr(self, text: str) -> None:
        """Write and flush to the cell's stderr."""
        sys.stderr.write(text)
        sys.stderr.flush()

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Publish the bundle as display data of the running cell."""
        from IPython.display import publish_display_data

        publish: Any = publish_display_data
        # Text written before the figure must appear before it.
        sys.stdout.flush()
        sys.stderr.flush()
        publish(data=data, metadata=metadata)

    def flush(self) -> None:
        """Flush both streams."""
        sys.stdout.flush()
        sys.stderr.flush()


class OutputWidgetSink:
    """Output into an ``ipywidgets.Output`` (its ``outputs`` trait), from any thread.

    Assigning ``outputs`` sends the whole list to the front end, so consecutive text of one stream is
    merged into one entry and updates are sent at most every ``interval`` seconds, or every
    ``slow_interval`` once the area holds ``slow_after`` characters (each update resends all of it);
    :meth:`flush` sends what is pending (the feeder calls it when the box goes quiet).
    """

    def __init__(self, output: Any, *, interval: float = 0.1, slow_interval: float = 0.5,
                 slow_after: int = 64 * 1024) -> None:
        self._output = output
        self._interval = interval
        self._slow_interval = slow_interval
        self._slow_after = slow_after
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._last_push = 0.0
        self._chars = 0

    def stdout(self, text: str) -> None:
        """Queue stdout text; sent with the next push."""
        self._stream("stdout", text)

    def stderr(self, text: str) -> None:
        """Queue stderr text; sent with the next push."""
        self._stream("stderr", text)

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Append a display_data output (sent at once: rich outputs are rare and large)."""
        with self._lock:
            self._pending.append({"output_type": "display_data", "data": data, "metadata": metadata})
        self.flush()

    def flush(self) -> None:
        """Send pending outputs, merging text into the last entry of the same stream."""
        with self._lock:
            if not self._pending:
                return
            outputs = list(self._output.outputs)
            for item in self._pending:
                last = outputs[-1] if outputs else None
                if (item["output_type"] == "stream" and last is not None and last.get("output_type") == "stream"
                        and last.get("name") == item["name"]):
                    outputs[-1] = {**last, "text": last["text"] + item["text"]}
                else:
                    outputs.append(item)
            self._pending.clear()
            self._last_push = time.monotonic()
            self._output.outputs = tuple(outputs)

    def _stream(self, name: str, text: str) -> None:
        with self._lock:
            self._pending.append({"output_type": "stream", "name": name, "text": text})
            self._chars += len(text)
            interval = self._interval if self._chars < self._slow_after else self._slow_interval
            due = time.monotonic() - self._last_push >= interval
        if due:
            self.flush()


@dataclass
class BoxValue:
    """The value of a cell's final expression, as the box produced it: what ``Out[n]`` shows.

    ``value`` is the JSON value (None when the object had none); ``data`` the MIME bundle the box
    rendered it as (its repr, and ``_repr_html_`` and the like). Returned by the magic so that IPython
    shows it as an execute result, exactly as it would a local value.
    """

    value: Any
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        data = dict(self.data)
        data.setdefault("text/plain", repr(self.value))
        return data, dict(self.metadata)

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", repr(self.value)))


class EventRenderer:
    """Feed it a box's events in order; it shows them on a sink and remembers how the box ended.

    ``show_result``: show the final-expression value as display data (the async view) instead of
    keeping it for the caller to return as the cell's value (the synchronous magic).

    Order: events are shown in the order the engine delivered them, with one exception. The engine
    reads a box's stdout and stderr through two pipes, so writes microseconds apart can reach it in
    either order; a shell writes its ``set -x`` trace in pieces (``"+ "``, ``"echo"``, ``" line 2"``,
    newline), and the command's own output would land in the middle of that line. So while one stream's
    last line is unfinished, text of the other stream waits (at most ``hold`` seconds, or until a
    non-text event) for that line to end. Callers call :meth:`tick` now and then so that waiting text
    is shown when the line never ends.
    """

    def __init__(self, sink: OutputSink, *, task_id: str | None = None, max_output: int = DEFAULT_MAX_OUTPUT,
                 show_result: bool = False, show_progress: bool = True) -> None:
        self.sink = sink
        self.task_id = task_id
        self.max_output = max_output
        self.show_result = show_result
        self.show_progress = show_progress
        self.result: ResultValue | None = None
        self.error: ErrorValue | None = None
        self.exit: Exit | None = None
        self.shown = 0
        self.hidden = 0
        self.hidden_displays = 0
        self.events = 0
        self.hold = LINE_HOLD
        self._capped_note = False
        self._open: str | None = None  # "out" / "err": the stream whose last line is unfinished
        self._held: list[tuple[str, str]] = []  # text of the other stream, waiting for that line
        self._held_since = 0.0

    @property
    def capped(self) -> bool:
        """True once some output was hidden."""
        return self.hidden > 0 or self.hidden_displays > 0

    def feed(self, event: Event) -> None:
        """Show one event (or hide it, past the cap)."""
        self.events += 1
        if isinstance(event, StdoutChunk | StderrChunk):
            self._stream("out" if isinstance(event, StdoutChunk) else "err", event.text)
            return
        self._release()
        if isinstance(event, DisplayData):
            self._display(event.data, event.metadata)
        elif isinstance(event, ResultValue):
            self.result = event
            if self.show_result:
                self._display(BoxValue(event.value, dict(event.data))._repr_mimebundle_()[0], {})
        elif isinstance(event, ErrorValue):
            # The runtimes print the traceback on stderr as well; the error is shown again, in one
            # line, where the cell reports why the box failed.
            self.error = event
        elif isinstance(event, Progress):
            if self.show_progress:
                self.sink.stderr(f"[hotbox] {event.text}\n")
        elif isinstance(event, Exit):
            self.exit = event

    def tick(self) -> None:
        """Show text that waited ``hold`` seconds for the other stream's line to end."""
        if self._held and time.monotonic() - self._held_since >= self.hold:
            self._release()

    def _stream(self, kind: str, text: str) -> None:
        if self._open is not None and kind != self._open:
            if not self._held:
                self._held_since = time.monotonic()
            self._held.append((kind, text))
            return
        self._write(kind, text)
        if self._open is None:
            self._release()

    def _write(self, kind: str, text: str) -> None:
        self._text(text, self.sink.stdout if kind == "out" else self.sink.stderr)
        if text:
            self._open = None if text.endswith(("\n", "\r")) else kind

    def _release(self) -> None:
        held, self._held = self._held, []
        for kind, text in held:
            self._write(kind, text)

    def value(self) -> BoxValue | None:
        """The final expression's value, ready to be a cell's result; None if the box gave none."""
        if self.result is None:
            return None
        return BoxValue(self.result.value, dict(self.result.data))

    def note(self, text: str) -> None:
        """A line of hotbox's own, on stderr so that it stands apart from the box's output."""
        self._release()
        self.sink.stderr(f"[hotbox] {text}\n")
        self.sink.flush()

    def finish(self) -> None:
        """After the last event: flush, and say how much was hidden and where to find it."""
        self._release()
        if self.capped:
            parts = []
            if self.hidden:
                parts.append(f"{format_size(self.hidden)} of output")
            if self.hidden_displays:
                parts.append(f"{self.hidden_displays} rich output(s)")
            self.note(f"{' and '.join(parts)} hidden after the first {format_size(self.max_output)}; "
                      f"{self._where()}")
        self.sink.flush()

    def _where(self) -> str:
        where = "the full console is kept: "
        if self.task_id:
            where += f"%hotbox logs {self.task_id}, or "
        return where + "%%hotbox --out NAME (NAME.console_output)"

    def _text(self, text: str, write: Any) -> None:
        room = self.max_output - self.shown
        if room >= len(text):
            self.shown += len(text)
            write(text)
            return
        if room > 0:
            write(text[:room])
            self.shown += room
        self.hidden += len(text) - max(room, 0)
        self._cap_reached()

    def _display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        size = sum(len(v) if isinstance(v, str) else 64 for v in data.values())
        if self.shown + size > self.max_output:
            self.hidden_displays += 1
            self._cap_reached()
            return
        self.shown += size
        self.sink.display(data, metadata)

    def _cap_reached(self) -> None:
        if not self._capped_note:
            self._capped_note = True
            self.sink.stdout("\n")
            self.note(f"output capped at {format_size(self.max_output)}: the rest is hidden here; {self._where()}")


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge adjacent text chunks of the same stream: a backlog becomes a few writes, not thousands."""
    out: list[Event] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, StdoutChunk) and isinstance(last, StdoutChunk):
            out[-1] = StdoutChunk(last.text + ev.text)
        elif isinstance(ev, StderrChunk) and isinstance(last, StderrChunk):
            out[-1] = StderrChunk(last.text + ev.text)
        else:
            out.append(ev)
    return out


_END = object()


class EventFeed:
    """Read a blocking event iterator in a background thread; hand events out in batches.

    The consumer (the cell's main thread) then waits on a queue, which a kernel interrupt can break
    into at any moment without losing the stream: after ``KeyboardInterrupt`` the same feed keeps
    delivering the box's last words until its ``Exit``. When the consumer falls behind (a flood), the
    events waiting are handed over together so they can be merged into few writes; the bounded queue
    makes the reader wait rather than pile a flood up in memory.
    """

    def __init__(self, events: Iterable[Event], *, name: str = "hotbox-events", backlog: int = 1024) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=backlog)
        self._source = events
        self.ended = False
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._source:
                self._queue.put(ev)
        except BaseException as exc:  # handed to the consumer, who raises it in its own thread
            self._queue.put(exc)
        self._queue.put(_END)

    def batches(self, idle: float | None = None, *, deadline: float | None = None,
                max_chars: int = 256 * 1024) -> Iterator[list[Event]]:
        """Yield lists of events as they come (merged with :func:`coalesce`) until the stream ends.

        ``idle``: yield an empty list whenever nothing came for that many seconds (a cue to flush).
        ``deadline``: a ``time.monotonic()`` after which to stop waiting (and return) even without an end.
        """
        while not self.ended:
            timeout = 0.25 if idle is None else idle
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                if idle is not None:
                    yield []
                continue
            batch: list[Event] = []
            chars = 0
            item = first
            while True:
                if item is _END:
                    self.ended = True
                    break
                if isinstance(item, BaseException):
                    self.ended = True
                    if batch:
                        yield coalesce(batch)
                    raise item
                batch.append(item)
                chars += len(getattr(item, "text", "") or "")
                if chars >= max_chars:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                yield coalesce(batch)
