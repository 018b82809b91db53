"""Notebook views of Hot Box: the quota, the size presets, the task monitor, and a running task.

Views only: they are given models (QuotaInfo, SizeProfile, TaskInfo, TaskResult) and callbacks, and
know nothing of how a box runs. The live ones (:class:`QuotaWidget`, :class:`TaskMonitor`) ask their
source again every second through one shared daemon thread, :class:`LiveTicker`, which exists only
while some live view is registered: a view leaves it when it is closed (its comm closes) or when the
front end removes its last view (the output was cleared; ipywidgets' ``_view_count``), and the thread
ends with the last one. Every view has readable ``text/plain`` and ``text/html`` forms besides its
widget view, for front ends without widget support (nbconvert, ``jupyter console``, a test reading
outputs).
"""

from __future__ import annotations

import atexit
import html
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import ipywidgets as w

from ..models import SIZES, BoxSize, ExitReason, QuotaInfo, SizeProfile, TaskInfo, TaskResult, TaskStatus

__all__ = [
    "TICKER",
    "LiveTicker",
    "QuotaWidget",
    "SizeTable",
    "TaskMonitor",
    "TaskSource",
    "TaskView",
    "format_cus",
    "format_duration",
    "format_number",
    "task_state",
]

log = logging.getLogger(__name__)

_TABLE_STYLE = "border-collapse:collapse;font-family:monospace;font-size:90%"
_CELL_STYLE = "padding:2px 10px;border-bottom:1px solid #ddd;text-align:left"
WARN_AT = 0.8
"""Fraction of a limit at which a quota bar turns to a warning (at 1.0 it is an error)."""


# -- numbers a person reads -------------------------------------------------------------------------

def format_number(x: float) -> str:
    """3 significant digits, no exponent, no trailing zeros: ``0.007756`` → ``0.00776``, ``49.9922`` → ``49.9``."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    v = float(f"{x:.3g}")
    if abs(v) >= 100:
        return f"{v:,.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_cus(x: float) -> str:
    """CUS with 3 significant digits and the unit."""
    return f"{format_number(x)} CUS"


def format_duration(seconds: float) -> str:
    """``12.34`` → ``12.3 s``, ``150`` → ``2.5 min``, ``7200`` → ``2 h``."""
    if seconds < 60:
        return f"{format_number(seconds)} s"
    if seconds < 3600:
        return f"{format_number(seconds / 60)} min"
    return f"{format_number(seconds / 3600)} h"


def _mb(mb: int) -> str:
    return f"{mb // 1024} GB" if mb >= 1024 and mb % 1024 == 0 else f"{mb} MB"


# -- task states ------------------------------------------------------------------------------------

_REASON_STATES = {
    ExitReason.TIMEOUT: "timed out",
    ExitReason.OOM: "out of memory",
    ExitReason.CANCELLED: "cancelled",
    ExitReason.INTERRUPTED: "cancelled",
    ExitReason.PIDS: "failed",
    ExitReason.ERROR: "failed",
}

STATE_COLOURS = {"pending": "#5f6368", "running": "#1a73e8", "stopping": "#b06000", "succeeded": "#188038",
                 "failed": "#c5221f", "timed out": "#c5221f", "out of memory": "#c5221f", "cancelled": "#5f6368"}
"""Colour of each state: a cancel is the user's choice, so it is grey, not red."""


def task_state(status: TaskStatus, result: TaskResult | None) -> str:
    """The state a person reads: pending, running, succeeded, failed, timed out, out of memory or cancelled."""
    if result is None:
        return status.value
    if result.reason is ExitReason.EXITED:
        return "succeeded" if result.ok else "failed"
    return _REASON_STATES[result.reason]


# -- tables -----------------------------------------------------------------------------------------

def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], highlight: int | None = None) -> str:
    head = "".join(f"<th style='{_CELL_STYLE}'>{html.escape(h)}</th>" for h in header)
    body = "".join(
        ("<tr style='background:#d2e3fc;font-weight:bold'>" if i == highlight else "<tr>")
        + "".join(f"<td style='{_CELL_STYLE}'>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table style='{_TABLE_STYLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


class _Fallbacks:
    """Mixin: ``text/plain`` and ``text/html`` forms next to the widget view.

    A front end without the widget manager (nbconvert's HTML, ``jupyter console``) shows the richest
    form it knows, so the numbers are there whatever renders the output.
    """

    def text(self) -> str:
        raise NotImplementedError

    def html(self) -> str:
        return f"<pre>{html.escape(self.text())}</pre>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle: dict[str, Any] | None = super()._repr_mimebundle_(**kwargs)  # type: ignore[misc]
        if bundle is not None:
            bundle["text/plain"] = self.text()
            bundle["text/html"] = self.html()
        return bundle


# -- the live ticker --------------------------------------------------------------------------------

class LiveTicker:
    """One daemon thread that calls every registered refresh every ``interval`` seconds.

    The thread starts with the first registration and ends (within one interval) after the last one
    is removed, so no thread outlives the views. A refresh that raises is logged and kept.
    """

    def __init__(self, interval: float = 1.0, name: str = "hotbox-live") -> None:
        self.interval = interval
        self.name = name
        self._refreshers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, key: int, refresh: Callable[[], None]) -> None:
        """Call ``refresh()`` on every tick from now on (``key`` identifies it for :meth:`remove`)."""
        with self._lock:
            self._refreshers[key] = refresh
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def remove(self, key: int) -> None:
        """Stop calling the refresh registered as ``key``; the thread ends if it was the last one."""
        with self._lock:
            self._refreshers.pop(key, None)
            if not self._refreshers:
                self._wake.set()

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._refreshers

    @property
    def thread(self) -> threading.Thread | None:
        """The ticking thread, while there is one."""
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Forget every refresh and wait for the thread to end (extension unload, tests)."""
        with self._lock:
            self._refreshers.clear()
            thread = self._thread
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._refreshers:
                    self._thread = None
                    self._wake.clear()
                    return
                refreshers = list(self._refreshers.values())
            for refresh in refreshers:
                try:
                    refresh()
                except Exception:  # one broken view must not stop the others
                    log.exception("refreshing a live hotbox view failed")
            self._wake.wait(self.interval)
            self._wake.clear()


TICKER = LiveTicker()
"""The process's ticker, shared by every live view the magics make."""
atexit.register(TICKER.stop, 2.0)  # a refresh must not be cut off halfway by interpreter teardown


class _Live:
    """Mixin for a live widget: registered with a ticker while it is open and shown (or never shown yet)."""

    _ticker: LiveTicker | None = None

    def _go_live(self, ticker: LiveTicker | None) -> None:
        self._ticker = ticker
        if ticker is None:
            return
        widget: Any = self
        # Ask the front end to count its views: 0 again after one was shown means the output was cleared.
        widget._view_count = 0
        widget.observe(self._views_changed, names="_view_count")
        if widget.comm is not None:  # the front end closing the comm closes the view here too
            widget.comm.on_close(lambda _msg: self.close())
        ticker.add(id(self), self._tick)

    @property
    def live(self) -> bool:
        """True while the ticker refreshes this view."""
        return self._ticker is not None and id(self) in self._ticker

    def _views_changed(self, change: dict[str, Any]) -> None:
        if self._ticker is None:
            return
        if change["new"] == 0 and (change["old"] or 0) > 0:
            self._ticker.remove(id(self))
        elif (change["new"] or 0) > 0 and getattr(self, "comm", None) is not None:
            self._ticker.add(id(self), self._tick)

    def _tick(self) -> None:
        if getattr(self, "comm", None) is None:  # closed behind our back (Widget.close_all)
            if self._ticker is not None:
                self._ticker.remove(id(self))
            return
        self.refresh()

    def refresh(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop refreshing, then close the widget (and its comm)."""
        if self._ticker is not None:
            self._ticker.remove(id(self))
        super().close()  # type: ignore[misc]


# -- SizeTable --------------------------------------------------------------------------------------

_ROW_COLOUR, _DEFAULT_COLOUR = "#ffffff", "#d2e3fc"


class SizeTable(_Fallbacks, w.VBox):  # type: ignore[misc]
    """The size presets: the seed's columns in the seed's order, the default highlighted, a row click
    making that size the default, and what a run of a chosen length costs at each size.

    ``on_select(size)`` is called when a row is clicked (from the kernel's comm handler: return quickly).
    ``tiers``: the isolation tiers this host can run, as ``(name, available, detail)``; None when the
    engine does not report them.
    """

    HEADER = ("Size", "Memory", "CPU", "Tmp", "Disk", "Timeout", "CUS Multiplier")

    def __init__(self, sizes: Sequence[SizeProfile], *, default: str | BoxSize = BoxSize.SMALL,
                 on_select: Callable[[str], None] | None = None, run_minutes: float = 10.0,
                 tiers: Sequence[tuple[str, bool, str]] | None = None, **kwargs: Any) -> None:
        self.sizes = list(sizes)
        self.default = str(default)
        self._callbacks: list[Callable[[str], None]] = [on_select] if on_select else []
        self.run_length = w.BoundedFloatText(value=run_minutes, min=0.0, max=24 * 60.0, step=1.0,
                                             description="Run of (min)", layout=w.Layout(width="14em"),
                                             style={"description_width": "initial"})
        self.run_length.add_class("hotbox-run-length")
        self.tiers = list(tiers) if tiers is not None else None
        header = [*self.HEADER, "Cost of run"]
        self._cells: dict[str, list[w.Button]] = {}
        grid: list[w.Widget] = [w.HTML(f"<div style='text-align:center'><b>{html.escape(h)}</b></div>",
                                       layout=w.Layout(padding="0 6px")) for h in header]
        for p, row in zip(self.sizes, self.rows(), strict=True):
            cells = []
            for text in row:
                b = w.Button(description=text, tooltip=f"make {p.name} the default size of %%hotbox cells",
                             layout=w.Layout(width="auto", margin="0", height="26px"))
                b.add_class("hotbox-size-row")
                b.add_class(f"hotbox-size-{p.name}")
                b.on_click(lambda _b, name=str(p.name): self.select(name))
                cells.append(b)
            self._cells[str(p.name)] = cells
            grid.extend(cells)
        self.grid = w.GridBox(grid, layout=w.Layout(grid_template_columns=f"repeat({len(header)}, auto)",
                                                      grid_gap="0"))
        self.caption = w.HTML()
        self.tier_line = w.HTML(self._tiers_html())
        self.run_length.observe(lambda _c: self._redraw(), names="value")
        super().__init__(children=[self.caption, self.grid, w.HBox([self.run_length]), self.tier_line], **kwargs)
        self.add_class("hotbox-sizes")
        self._redraw()

    def on_select(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(size)`` whenever a row is clicked."""
        self._callbacks.append(callback)

    def select(self, size: str | BoxSize) -> None:
        """Make ``size`` the highlighted default and tell the callbacks (what a row click does)."""
        self.show_default(size)
        for cb in self._callbacks:
            cb(self.default)

    def show_default(self, size: str | BoxSize) -> None:
        """Highlight ``size`` as the default without calling back (the default changed elsewhere)."""
        self.default = str(size)
        self._redraw()

    def cost(self, profile: SizeProfile) -> float:
        """CUS billed for a run of the chosen length at this size."""
        return float(self.run_length.value) * 60 * profile.cus_multiplier

    def rows(self) -> list[tuple[str, ...]]:
        """One row per preset: the seed's columns, then the cost of a run of the chosen length."""
        minutes = float(self.run_length.value) if hasattr(self, "run_length") else 10.0
        return [(str(p.name), _mb(p.memory_mb), f"{p.cpu:.0%}", _mb(p.tmp_mb), _mb(p.disk_mb), f"{p.timeout_s}s",
                 f"{p.cus_multiplier:g}x", format_cus(minutes * 60 * p.cus_multiplier)) for p in self.sizes]

    def _redraw(self) -> None:
        for p, row in zip(self.sizes, self.rows(), strict=True):
            is_default = str(p.name) == self.default
            for b, text in zip(self._cells[str(p.name)], row, strict=True):
                b.description = text
                b.style.button_color = _DEFAULT_COLOUR if is_default else _ROW_COLOUR
                b.style.font_weight = "bold" if is_default else "normal"
                if is_default:
                    b.add_class("hotbox-size-default")
                else:
                    b.remove_class("hotbox-size-default")
        self.caption.value = (f"Default size of <code>%%hotbox</code> cells: <b>{html.escape(self.default)}</b> "
                              f"(click a row to change it). Cost of a {format_number(float(self.run_length.value))}"
                              f" min run in the last column.")

    def _tiers_html(self) -> str:
        if self.tiers is None:
            return "<i>Isolation tiers: this engine does not report them.</i>"
        parts = [f"<b>{html.escape(n)}</b> {'available' if ok else 'not available'}"
                 + (f" ({html.escape(d)})" if d else "") for n, ok, d in self.tiers]
        return "Isolation tiers on this host: " + "; ".join(parts)

    def _tiers_text(self) -> str:
        if self.tiers is None:
            return "isolation tiers: not reported by this engine"
        return "isolation tiers: " + "; ".join(f"{n} {'available' if ok else 'not available'}"
                                               + (f" ({d})" if d else "") for n, ok, d in self.tiers)

    def _header(self) -> tuple[str, ...]:
        return (*self.HEADER, f"Cost of {format_number(float(self.run_length.value))} min")

    def text(self) -> str:
        """The table as plain text; the default size is marked with ``*``."""
        rows = [(f"{r[0]} *" if r[0] == self.default else r[0], *r[1:]) for r in self.rows()]
        return "\n".join([_text_table(self._header(), rows), f"* default size: {self.default}",
                          self._tiers_text()])

    def html(self) -> str:
        """The table as static HTML, the default row highlighted."""
        names = [str(p.name) for p in self.sizes]
        hl = names.index(self.default) if self.default in names else None
        return (_html_table(self._header(), self.rows(), highlight=hl)
                + f"<p>Default size: <b>{html.escape(self.default)}</b>. {self._tiers_html()}</p>")


# -- QuotaWidget ------------------------------------------------------------------------------------

def _level(used: float, limit: float | None, warn_at: float) -> str:
    if limit is None:
        return "ok"
    if used >= limit:
        return "error"
    return "warning" if limit > 0 and used >= warn_at * limit else "ok"


_BAR_STYLES = {"ok": "info", "warning": "warning", "error": "danger"}
_LEVEL_COLOURS = {"ok": "inherit", "warning": "#b06000", "error": "#c5221f"}


class QuotaWidget(_Live, _Fallbacks, w.VBox):  # type: ignore[misc]
    """CUS and tasks used of the plan's limits as bars, boxes running of those allowed at once, and what
    the plan allows; it asks ``source()`` again every tick and redraws when the numbers changed.

    A bar turns to a warning at ``warn_at`` of its limit and to an error at the limit.
    """

    def __init__(self, source: Callable[[], QuotaInfo], *, ticker: LiveTicker | None = TICKER,
                 warn_at: float = WARN_AT, sizes: Iterable[str | BoxSize] = tuple(SIZES), **kwargs: Any) -> None:
        self.source = source
        self.warn_at = warn_at
        self.size_names = [str(s) for s in sizes]
        self.quota: QuotaInfo = source()
        self.updates = 0
        """How many times the numbers changed since the widget was drawn."""
        self.plan_line = w.HTML()
        self.cus_bar = w.FloatProgress(min=0.0, max=1.0, description="CUS", layout=w.Layout(width="40%"))
        self.cus_label = w.HTML()
        self.tasks_bar = w.FloatProgress(min=0.0, max=1.0, description="Tasks", layout=w.Layout(width="40%"))
        self.tasks_label = w.HTML()
        self.running_bar = w.FloatProgress(min=0.0, max=1.0, description="Running", layout=w.Layout(width="40%"))
        self.running_label = w.HTML()
        self.cus_label.add_class("hotbox-quota-cus")
        self.tasks_label.add_class("hotbox-quota-tasks")
        self.running_label.add_class("hotbox-quota-running")
        super().__init__(children=[self.plan_line, w.HBox([self.cus_bar, self.cus_label]),
                                   w.HBox([self.tasks_bar, self.tasks_label]),
                                   w.HBox([self.running_bar, self.running_label])], **kwargs)
        self.add_class("hotbox-quota")
        self._draw()
        self._go_live(ticker)

    def refresh(self) -> None:
        """Ask the source again; redraw if anything changed."""
        quota = self.source()
        if quota != self.quota:
            self.quota = quota
            self.updates += 1
            self._draw()

    def levels(self) -> dict[str, str]:
        """``ok`` / ``warning`` / ``error`` of the CUS, tasks and running bars."""
        q = self.quota
        return {"cus": _level(q.cus_used, q.cus_limit, self.warn_at),
                "tasks": _level(q.tasks_used, q.tasks_limit, self.warn_at),
                "running": _level(q.running, q.concurrent_limit, self.warn_at)}

    def lines(self) -> dict[str, str]:
        """The words next to each bar, and the plan line."""
        q = self.quota

        def used(amount: float, limit: float | None, remaining: float | None, fmt: Callable[[float], str]) -> str:
            if limit is None:
                return f"{fmt(amount)} used (no limit)"
            return f"{fmt(amount)} of {fmt(limit)} used, {fmt(remaining or 0)} left"

        sizes = (f"all {len(self.size_names)} sizes ({self.size_names[0]} to {self.size_names[-1]})"
                 if self.size_names else "no sizes")
        return {
            "plan": (f"plan {q.plan}: network {'allowed' if q.network_allowed else 'not allowed'}, {sizes}, "
                     f"at most {q.concurrent_limit} boxes at once"),
            "cus": used(q.cus_used, q.cus_limit, q.cus_remaining, format_cus)
            + (f"; ≈ {format_cus(q.cus_running)} accruing, billed when the running boxes end" if q.running else ""),
            "tasks": used(q.tasks_used, q.tasks_limit, q.tasks_remaining,
                          lambda n: f"{int(n)} task" + ("" if int(n) == 1 else "s")),
            "running": f"{q.running} of {q.concurrent_limit} running",
        }

    def _draw(self) -> None:
        q, lines, levels = self.quota, self.lines(), self.levels()
        self.plan_line.value = f"<b>Hot Box quota</b> &nbsp; {html.escape(lines['plan'])}"
        for bar, label, key, used, limit in (
            (self.cus_bar, self.cus_label, "cus", q.cus_used, q.cus_limit),
            (self.tasks_bar, self.tasks_label, "tasks", float(q.tasks_used), q.tasks_limit),
            (self.running_bar, self.running_label, "running", float(q.running), float(q.concurrent_limit)),
        ):
            level = levels[key]
            bar.max = max(float(limit), 1e-9) if limit is not None else max(used, 1e-9)
            bar.value = min(used, bar.max)
            bar.bar_style = _BAR_STYLES[level]
            bar.layout.display = None if limit is not None else "none"  # no limit, no bar: the words say it
            label.value = (f"<span style='color:{_LEVEL_COLOURS[level]}' data-level='{level}'>"
                           f"{html.escape(lines[key])}</span>")
            for lv in ("ok", "warning", "error"):
                label.remove_class(f"hotbox-level-{lv}")
            label.add_class(f"hotbox-level-{level}")

    def text(self) -> str:
        """The quota as plain text."""
        lines, levels = self.lines(), self.levels()
        mark = {"ok": "", "warning": "  (warning: near the limit)", "error": "  (limit reached)"}
        return "\n".join([lines["plan"], *(f"{k}: {lines[k]}{mark[levels[k]]}" for k in ("cus", "tasks", "running"))])

    def html(self) -> str:
        """The quota as static HTML."""
        lines, levels = self.lines(), self.levels()
        rows = "".join(f"<li style='color:{_LEVEL_COLOURS[levels[k]]}'><b>{k}</b>: {html.escape(lines[k])}</li>"
                       for k in ("cus", "tasks", "running"))
        return f"<div><b>Hot Box quota</b> {html.escape(lines['plan'])}<ul>{rows}</ul></div>"


# -- TaskMonitor ------------------------------------------------------------------------------------

class TaskSource(Protocol):
    """Where the task monitor learns about tasks and stops them (``hotbox_jupyter.box`` is one)."""

    def tasks(self) -> list[TaskInfo]:
        """Tasks of this session, oldest first."""

    def status(self, task_id: str) -> TaskStatus:
        """Where the task is."""

    def result(self, task_id: str) -> TaskResult | None:
        """How it ended, or None while it runs."""

    def cancel(self, task_id: str) -> None:
        """Stop it (blocks until the box is gone)."""

    def logs(self, task_id: str) -> str:
        """Its console so far."""


class _Row:
    """The widgets of one task's row in the monitor."""

    def __init__(self, monitor: TaskMonitor, info: TaskInfo) -> None:
        self.info = info
        self.state = "pending"
        self.result: TaskResult | None = None
        self.stopping = False
        self.cells = [w.HTML() for _ in range(6)]
        self.stop = w.Button(description="Stop", icon="stop", button_style="warning", tooltip=f"cancel {info.id}",
                             layout=w.Layout(width="auto"))
        self.stop.add_class("hotbox-task-stop")
        self.stop.add_class(f"hotbox-task-{info.id}")
        self.console = w.ToggleButton(description="Console", icon="terminal", tooltip=f"show the console of {info.id}",
                                      layout=w.Layout(width="auto"))
        self.console.add_class("hotbox-task-console")
        self.stop.on_click(lambda _b: monitor.stop(info.id))
        self.console.observe(lambda c: monitor.console_toggled(info.id, c["new"]), names="value")
        self.cells[3].add_class("hotbox-task-state")
        self.cells[3].add_class(f"hotbox-state-{info.id}")

    @property
    def widgets(self) -> list[w.Widget]:
        return [*self.cells, w.HBox([self.stop, self.console])]


class TaskMonitor(_Live, _Fallbacks, w.VBox):  # type: ignore[misc]
    """This session's running and recent tasks: image, size, state, elapsed time and CUS, live; a Stop
    button per running task and a Console button that shows a task's console under the table.

    States are the truth (see :func:`task_state`): a task stopped by the user is ``cancelled``, grey.
    """

    HEADER = ("Task", "Image", "Size", "State", "Elapsed", "CUS", "")

    def __init__(self, source: TaskSource, *, ticker: LiveTicker | None = TICKER, recent: int = 20,
                 console_chars: int = 8192, **kwargs: Any) -> None:
        self.source = source
        self.recent = recent
        self.console_chars = console_chars
        self._rows: dict[str, _Row] = {}
        self._console_task: str | None = None
        # The ticker, a Stop's cancel thread and the comm handler (buttons) all redraw.
        self._lock = threading.RLock()
        self.grid = w.GridBox(layout=w.Layout(grid_template_columns="repeat(7, auto)", grid_gap="2px 12px"))
        self.empty = w.HTML("<i>no tasks yet</i>")
        self.console = w.HTML(layout=w.Layout(max_height="24em", overflow="auto"))
        self.console.add_class("hotbox-task-console-text")
        super().__init__(children=[w.HTML("<b>Hot Box tasks</b>"), self.empty, self.grid, self.console], **kwargs)
        self.add_class("hotbox-tasks")
        self.refresh()
        self._go_live(ticker)

    def states(self) -> dict[str, str]:
        """The state of each task shown, by id."""
        return {tid: r.state for tid, r in self._rows.items()}

    def stop(self, task_id: str) -> None:
        """Stop a task (what its Stop button does): cancelled in a thread, the row says ``stopping``."""
        with self._lock:
            row = self._rows.get(task_id)
            if row is not None:
                row.stopping = True
                row.stop.disabled = True
                self._draw_row(row, self.source.status(task_id), None)
        threading.Thread(target=self._cancel, args=(task_id,), daemon=True, name=f"hotbox-stop-{task_id}").start()

    def _cancel(self, task_id: str) -> None:
        try:
            self.source.cancel(task_id)
        except Exception as exc:  # the view is the only place to report to
            log.warning("could not stop task %s: %s", task_id, exc)
        self.refresh()

    def console_toggled(self, task_id: str, on: bool) -> None:
        """A Console button went on or off (off because another one went on is not a hide)."""
        if on:
            self.show_console(task_id)
        elif self._console_task == task_id:
            self.show_console(None)

    def show_console(self, task_id: str | None) -> None:
        """Show the console of ``task_id`` under the table (None hides it)."""
        with self._lock:
            self._console_task = task_id
            for tid, row in self._rows.items():
                if tid != task_id and row.console.value:
                    row.console.value = False
            self._draw_console()

    def _draw_console(self) -> None:
        tid = self._console_task
        if tid is None:
            self.console.value = ""
            return
        try:
            text = self.source.logs(tid)
        except Exception as exc:
            text = f"(console not available: {exc})"
        cut = len(text) > self.console_chars
        text = text[-self.console_chars:]
        note = f"last {self.console_chars} characters; %hotbox logs {tid} prints it all\n" if cut else ""
        self.console.value = (f"<div><b>Console of {html.escape(tid)}</b></div><pre style='margin:0;"
                              f"font-size:85%'>{html.escape(note + text)}</pre>")

    def refresh(self) -> None:
        """Ask the source for the tasks and redraw the rows that changed."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        infos = list(self.source.tasks())[-self.recent:]
        added = False
        for info in infos:
            row = self._rows.get(info.id)
            if row is None:
                row = self._rows[info.id] = _Row(self, info)
                added = True
            if row.result is None:
                self._draw_row(row, self.source.status(info.id), self.source.result(info.id))
        if added:
            keep = {i.id for i in infos}
            for tid in [t for t in self._rows if t not in keep]:
                del self._rows[tid]
            self.grid.children = [*(w.HTML(f"<b>{h}</b>") for h in self.HEADER),
                                  *(c for r in self._rows.values() for c in r.widgets)]
            self.empty.layout.display = "none"
        if self._console_task is not None and self._rows.get(self._console_task) is not None:
            self._draw_console()

    def _draw_row(self, row: _Row, status: TaskStatus, result: TaskResult | None) -> None:
        info = row.info
        row.state, row.result = task_state(status, result), result
        shown = "stopping" if row.stopping and result is None else row.state
        if result is not None:
            elapsed, cus = format_duration(result.duration), format_cus(result.cus)
        else:
            secs = max(0.0, (datetime.now(timezone.utc) - info.created_at).total_seconds())
            elapsed = format_duration(secs)
            # Billed when it ends; meanwhile what it would cost if it ended now.
            cus = ("≈ " + format_cus(secs * SIZES[info.size].cus_multiplier)
                   if status is TaskStatus.RUNNING else format_cus(0))
        colour = STATE_COLOURS.get(shown, "#5f6368")
        values = [f"<code>{html.escape(info.id)}</code>", html.escape(info.image), html.escape(str(info.size)),
                  f"<b style='color:{colour}' data-state='{html.escape(shown)}'>{html.escape(shown)}</b>",
                  elapsed, cus]
        for cell, value in zip(row.cells, values, strict=True):
            if cell.value != value:
                cell.value = value
        row.stop.disabled = result is not None or row.stopping
        if result is not None:
            row.stop.layout.visibility = "hidden"

    def rows(self) -> list[tuple[str, ...]]:
        """One row per task, as text."""
        return [(tid, row.info.image, str(row.info.size), row.state, html.unescape(row.cells[4].value),
                 html.unescape(row.cells[5].value)) for tid, row in self._rows.items()]

    def text(self) -> str:
        """The tasks as a plain-text table."""
        if not self._rows:
            return "no tasks"
        return _text_table(self.HEADER[:-1], self.rows())

    def html(self) -> str:
        """The tasks as a static HTML table."""
        if not self._rows:
            return "<i>no tasks</i>"
        return _html_table(self.HEADER[:-1], self.rows())


# -- TaskView (one --async cell) --------------------------------------------------------------------

class TaskView(_Fallbacks, w.VBox):  # type: ignore[misc]
    """A task running in the background: a status line, a Stop button, and the box's output.

    The caller feeds it: output goes to :attr:`output` (through an ``OutputWidgetSink``), state changes
    to :meth:`set_status` / :meth:`finished`; the Stop button calls the callbacks given to
    :meth:`on_stop`, from the kernel's comm handler, so they must return quickly.
    """

    def __init__(self, task: TaskInfo, **kwargs: Any) -> None:
        self.task = task
        self.state = "pending"
        self.detail = ""
        self.status = w.HTML()
        self.status.add_class("hotbox-taskview-status")
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="warning",
                                    tooltip=f"cancel task {task.id}", layout=w.Layout(width="auto"))
        self.stop_button.add_class("hotbox-taskview-stop")
        self.output = w.Output(layout=w.Layout(max_height="32em", overflow="auto"))
        self._stop_callbacks: list[Callable[[], None]] = []
        self.stop_button.on_click(lambda _b: self._stop_clicked())
        super().__init__(children=[w.HBox([self.status, self.stop_button]), self.output], **kwargs)
        self.add_class("hotbox-taskview")
        self.set_status("pending", "starting")
        self._started = time.monotonic()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the Stop button is clicked."""
        self._stop_callbacks.append(callback)

    def set_status(self, state: str, detail: str = "") -> None:
        """Show the task's state (see :data:`STATE_COLOURS`) and a detail line."""
        self.state, self.detail = state, detail
        colour = STATE_COLOURS.get(state, "#5f6368")
        t = self.task
        self.status.value = (f"<span style='font-family:monospace'><b>{html.escape(t.id)}</b> "
                             f"{html.escape(t.image)} ({html.escape(str(t.size))}) "
                             f"<b style='color:{colour}' data-state='{html.escape(state)}'>{html.escape(state)}</b> "
                             f"{html.escape(detail)}</span>")

    def finished(self, result: TaskResult) -> None:
        """The task ended: show how, and retire the Stop button."""
        state = task_state(result.status, result)
        self.set_status(state, f"{result.message} ({format_duration(result.duration)}, {format_cus(result.cus)})")
        self.stop_button.disabled = True

    def _stop_clicked(self) -> None:
        self.stop_button.disabled = True
        self.set_status("stopping", "cancelling")
        for cb in self._stop_callbacks:
            cb()

    def text(self) -> str:
        """The status line as plain text."""
        t = self.task
        return f"task {t.id} {t.image} ({t.size}): {self.state}" + (f" {self.detail}" if self.detail else "")

