"""Events → notebook output: the renderer, its cap, the batching feed and the two sinks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import ipywidgets
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from hotbox_jupyter.events import (
    DisplayData,
    ErrorValue,
    Event,
    Exit,
    Progress,
    ResultValue,
    StderrChunk,
    StdoutChunk,
)
from hotbox_jupyter.models import ExitReason
from hotbox_jupyter.notebook.render import (
    BoxValue,
    EventFeed,
    EventRenderer,
    OutputWidgetSink,
    ShellSink,
    coalesce,
    format_size,
)


class RecordingSink:
    """The unit seam: what the renderer asked to show, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def stdout(self, text: str) -> None:
        self.calls.append(("stdout", text))

    def stderr(self, text: str) -> None:
        self.calls.append(("stderr", text))

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.calls.append(("display", data))

    def flush(self) -> None:
        self.calls.append(("flush", None))

    def text(self, name: str) -> str:
        return "".join(v for k, v in self.calls if k == name)


def test_events_are_shown_in_order_with_streams_apart() -> None:
    sink = RecordingSink()
    r = EventRenderer(sink, task_id="t1")
    for ev in [StdoutChunk("a\rb\n"), StderrChunk("warn\n"), StdoutChunk("partial"),
               DisplayData({"text/html": "<b>x</b>", "text/plain": "x"}), StdoutChunk(" line\n"),
               Exit(ExitReason.EXITED, 0, "exited with code 0")]:
        r.feed(ev)
    r.finish()
    kinds = [k for k, _ in sink.calls if k != "flush"]
    assert kinds == ["stdout", "stderr", "stdout", "display", "stdout"]
    assert sink.text("stdout") == "a\rb\npartial line\n"
    assert sink.text("stderr") == "warn\n"
    assert r.exit is not None and r.exit.exit_code == 0
    assert not r.capped


def test_an_unfinished_line_is_not_split_by_the_other_stream() -> None:
    # A shell writes its trace in pieces; the engine may deliver the command's output among them.
    sink = RecordingSink()
    r = EventRenderer(sink)
    for ev in [StderrChunk("+ "), StdoutChunk("line 1\n"), StderrChunk("echo"), StderrChunk(" line 1\n"),
               StdoutChunk("line 2\n"), StderrChunk("+ sleep 1\n")]:
        r.feed(ev)
    r.finish()
    shown = [(k, v) for k, v in sink.calls if k != "flush"]
    assert shown == [("stderr", "+ "), ("stderr", "echo"), ("stderr", " line 1\n"), ("stdout", "line 1\n"),
                     ("stdout", "line 2\n"), ("stderr", "+ sleep 1\n")]


def test_held_text_is_shown_when_the_line_never_ends() -> None:
    sink = RecordingSink()
    r = EventRenderer(sink)
    r.hold = 0.05
    r.feed(StderrChunk("Password: "))
    r.feed(StdoutChunk("out\n"))
    r.tick()
    assert sink.text("stdout") == ""
    time.sleep(0.06)
    r.tick()
    assert sink.text("stdout") == "out\n"
    r.feed(StderrChunk("more"))  # stdout's line ended: stderr is shown at once
    assert sink.text("stderr") == "Password: more"


def test_result_is_kept_for_the_cell_or_shown_when_asked() -> None:
    result = ResultValue(value=[1, 2], data={"text/plain": "array([1, 2])", "text/html": "<i>1 2</i>"})
    sink = RecordingSink()
    r = EventRenderer(sink)
    r.feed(result)
    assert [k for k, _ in sink.calls] == []
    value = r.value()
    assert isinstance(value, BoxValue) and value.value == [1, 2]
    assert repr(value) == "array([1, 2])"
    data, _meta = value._repr_mimebundle_()
    assert data["text/html"] == "<i>1 2</i>"

    shown = RecordingSink()
    r2 = EventRenderer(shown, show_result=True)
    r2.feed(result)
    assert shown.calls == [("display", {"text/plain": "array([1, 2])", "text/html": "<i>1 2</i>"})]


def test_box_value_without_a_bundle_shows_the_json_value() -> None:
    assert BoxValue({"a": 1})._repr_mimebundle_()[0] == {"text/plain": "{'a': 1}"}


def test_error_is_remembered_not_printed_twice() -> None:
    sink = RecordingSink()
    r = EventRenderer(sink)
    r.feed(ErrorValue("ZeroDivisionError", "division by zero", ["Traceback...", "ZeroDivisionError"]))
    assert sink.calls == []
    assert r.error is not None and r.error.ename == "ZeroDivisionError"


def test_progress_is_a_note_on_stderr() -> None:
    sink = RecordingSink()
    EventRenderer(sink).feed(Progress("pulling python:3.13"))
    assert sink.calls == [("stderr", "[hotbox] pulling python:3.13\n")]


def test_flood_is_capped_with_a_note_saying_how_much_and_where() -> None:
    sink = RecordingSink()
    r = EventRenderer(sink, task_id="task-9", max_output=10_000)
    chunk = "x" * 999 + "\n"
    for _ in range(100):  # 100 KB against a 10 KB cap
        r.feed(StdoutChunk(chunk))
    r.feed(DisplayData({"image/png": "A" * 100}))
    r.finish()
    shown = sink.text("stdout")
    assert shown.count("x") == 10_000 - 10  # exactly the cap, newlines included
    notes = sink.text("stderr")
    assert "output capped at 9.8 KB" in notes
    assert "%hotbox logs task-9" in notes and "--out" in notes
    assert f"{format_size(90_000)} of output" in notes and "1 rich output(s)" in notes
    assert r.capped and r.hidden == 90_000 and r.hidden_displays == 1
    # One note when the cap is reached and one summary at the end: the flood adds nothing else.
    assert len([c for c in sink.calls if c[0] == "stderr"]) == 2


def test_format_size() -> None:
    assert format_size(10) == "10 bytes"
    assert format_size(1536) == "1.5 KB"
    assert format_size(3 * 1024 * 1024) == "3.0 MB"


def test_coalesce_merges_only_adjacent_text_of_one_stream() -> None:
    d = DisplayData({"text/plain": "d"})
    got = coalesce([StdoutChunk("a"), StdoutChunk("b"), StderrChunk("c"), StderrChunk("d"), d, StdoutChunk("e")])
    assert got == [StdoutChunk("ab"), StderrChunk("cd"), d, StdoutChunk("e")]


def _slow_source(n: int, gap: float) -> Iterator[Event]:
    for i in range(n):
        time.sleep(gap)
        yield StdoutChunk(f"{i}\n")
    yield Exit(ExitReason.EXITED, 0, "ok")


def test_feed_delivers_live_events_one_by_one() -> None:
    feed = EventFeed(_slow_source(5, 0.05))
    arrivals = []
    for batch in feed.batches():
        arrivals.append((time.monotonic(), batch))
    texts = [b for _, b in arrivals]
    # Each line in its own batch (the Exit right behind the last line may share its batch).
    assert texts[:4] == [[StdoutChunk(f"{i}\n")] for i in range(4)]
    assert texts[4][0] == StdoutChunk("4\n")
    assert isinstance(texts[-1][-1], Exit)
    assert arrivals[4][0] - arrivals[0][0] >= 0.15
    assert feed.ended


def test_feed_merges_a_backlog() -> None:
    def burst() -> Iterator[Event]:
        yield from (StdoutChunk("x") for _ in range(500))
        yield Exit(ExitReason.EXITED, 0, "ok")

    feed = EventFeed(burst())
    time.sleep(0.2)  # let the backlog build up
    batches = list(feed.batches())
    assert sum(len(b) for b in batches) <= 3
    assert "".join(e.text for b in batches for e in b if isinstance(e, StdoutChunk)) == "x" * 500


def test_feed_idle_ticks_and_deadline() -> None:
    gate = threading.Event()

    def stalled() -> Iterator[Event]:
        yield StdoutChunk("first")
        gate.wait(5)
        yield Exit(ExitReason.EXITED, 0, "ok")

    feed = EventFeed(stalled())
    ticks = 0
    for batch in feed.batches(idle=0.05):
        if not batch:
            ticks += 1
            if ticks == 3:
                break
    assert ticks == 3
    t0 = time.monotonic()
    assert list(feed.batches(deadline=t0 + 0.2)) == []
    assert 0.15 <= time.monotonic() - t0 < 2
    gate.set()
    assert [type(e) for b in feed.batches() for e in b] == [Exit]


def test_feed_raises_the_sources_error_in_the_consumer() -> None:
    def broken() -> Iterator[Event]:
        yield StdoutChunk("before")
        raise RuntimeError("engine lost")

    feed = EventFeed(broken())
    seen: list[Event] = []
    with pytest.raises(RuntimeError, match="engine lost"):
        for batch in feed.batches():
            seen.extend(batch)
    assert seen == [StdoutChunk("before")]


def test_shell_sink_writes_streams_and_display_data() -> None:
    InteractiveShell.instance()  # display data goes through the shell's display publisher
    with capture_output() as cap:
        sink = ShellSink()
        sink.stdout("out\n")
        sink.stderr("err\n")
        sink.display({"text/plain": "plain", "text/html": "<b>rich</b>"}, {})
    assert cap.stdout == "out\n" and cap.stderr == "err\n"
    assert cap.outputs[0].data["text/html"] == "<b>rich</b>"


def test_widget_sink_merges_stream_text_and_appends_displays() -> None:
    out = ipywidgets.Output()
    sink = OutputWidgetSink(out, interval=3600)
    sink.stdout("a")
    sink.stdout("b")
    sink.stderr("e")
    sink.flush()
    sink.stdout("c")
    sink.display({"text/plain": "d"}, {})
    sink.stdout("f")
    sink.flush()
    assert out.outputs == (
        {"output_type": "stream", "name": "stdout", "text": "ab"},
        {"output_type": "stream", "name": "stderr", "text": "e"},
        {"output_type": "stream", "name": "stdout", "text": "c"},
        {"output_type": "display_data", "data": {"text/plain": "d"}, "metadata": {}},
        {"output_type": "stream", "name": "stdout", "text": "f"},
    )
    out.close()


def test_widget_sink_throttles_updates() -> None:
    out = ipywidgets.Output()
    pushes = []
    out.observe(lambda change: pushes.append(change), names="outputs")
    sink = OutputWidgetSink(out, interval=0.2)
    for _ in range(200):
        sink.stdout("x")
    sink.flush()
    assert 1 <= len(pushes) <= 3
    assert out.outputs[-1]["text"] == "x" * 200
    out.close()


def test_widget_sink_slows_down_once_the_area_is_large() -> None:
    out = ipywidgets.Output()
    pushes = []
    out.observe(lambda change: pushes.append(change), names="outputs")
    sink = OutputWidgetSink(out, interval=0.0, slow_interval=3600, slow_after=100)
    for _ in range(50):
        sink.stdout("x" * 10)  # each write goes out at once until the area reaches 100 characters
    assert len(pushes) == 9
    sink.flush()
    assert out.outputs[-1]["text"] == "x" * 500
    out.close()
