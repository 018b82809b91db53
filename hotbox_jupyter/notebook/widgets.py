"""Notebook views of Hot Box: the quota, the size presets, the task list, and a running task.

Views only: they are given models (QuotaInfo, SizeProfile, TaskInfo, TaskResult) and callbacks, and
know nothing of how a box runs. Each has a readable ``text/plain`` form besides its widget view, for
front ends without widget support (nbconvert, a terminal, a test reading outputs).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w

from ..models import QuotaInfo, SizeProfile, TaskInfo, TaskResult, TaskStatus

__all__ = ["QuotaView", "SizesTable", "TaskView", "TasksTable"]

_TABLE_STYLE = "border-collapse:collapse;font-family:monospace;font-size:90%"
_CELL_STYLE = "padding:2px 10px;border-bottom:1px solid #ddd;text-align:left"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th style='{_CELL_STYLE}'>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td style='{_CELL_STYLE}'>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table style='{_TABLE_STYLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def _mb(mb: int) -> str:
    return f"{mb // 1024} GB" if mb >= 1024 and mb % 1024 == 0 else f"{mb} MB"


class _TextFallback:
    """Mixin: the widget's ``text/plain`` is a readable summary rather than the widget's repr."""

    def text(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle: dict[str, Any] | None = super()._repr_mimebundle_(**kwargs)  # type: ignore[misc]
        if bundle is not None:
            bundle["text/plain"] = self.text()
        return bundle


class SizesTable(_TextFallback, w.HTML):  # type: ignore[misc]
    """The size presets as a table, the seed's columns in the seed's order."""

    HEADER = ("Size", "Memory", "CPU", "Tmp", "Disk", "Timeout", "CUS Multiplier")

    def __init__(self, sizes: Sequence[SizeProfile], **kwargs: Any) -> None:
        self.sizes = list(sizes)
        super().__init__(value=_html_table(self.HEADER, self.rows()), **kwargs)

    def rows(self) -> list[tuple[str, ...]]:
        """One row per preset, formatted as the seed's table."""
        return [(str(p.name), _mb(p.memory_mb), f"{p.cpu:.0%}", _mb(p.tmp_mb), _mb(p.disk_mb), f"{p.timeout_s}s",
                 f"{p.cus_multiplier:g}x") for p in self.sizes]

    def text(self) -> str:
        """The table as plain text."""
        return _text_table(self.HEADER, self.rows())


class QuotaView(_TextFallback, w.VBox):  # type: ignore[misc]
    """Remaining CUS and tasks of the plan, with bars for the limited ones."""

    def __init__(self, quota: QuotaInfo, **kwargs: Any) -> None:
        self.quota = quota
        q = quota
        children: list[w.Widget] = [w.HTML(f"<b>Plan</b> {html.escape(q.plan)} &nbsp; "
                                           f"<b>running</b> {q.running}/{q.concurrent_limit} &nbsp; "
                                           f"<b>network</b> {'allowed' if q.network_allowed else 'not allowed'}")]
        children.append(self._bar("CUS", q.cus_used, q.cus_limit, q.cus_remaining))
        children.append(self._bar("Tasks", q.tasks_used, q.tasks_limit, q.tasks_remaining))
        super().__init__(children=children, **kwargs)

    @staticmethod
    def _bar(label: str, used: float, limit: float | None, remaining: float | None) -> w.Widget:
        if limit is None:
            return w.HTML(f"<b>{label}</b> {used:g} used (unlimited)")
        return w.HBox([
            w.FloatProgress(value=min(used, limit), min=0.0, max=max(float(limit), 1e-9), description=label,
                            bar_style="danger" if remaining is not None and remaining <= 0 else ""),
            w.HTML(f"{used:g} of {limit:g} used, {remaining if remaining is not None else 0:g} left"),
        ])

    def text(self) -> str:
        """The quota as plain text."""
        q = self.quota

        def line(label: str, used: float, limit: float | None, remaining: float | None) -> str:
            if limit is None:
                return f"{label}: {used:g} used (unlimited)"
            return f"{label}: {used:g} of {limit:g} used, {remaining if remaining is not None else 0:g} left"

        return "\n".join([
            f"plan {q.plan}: {q.running}/{q.concurrent_limit} running, "
            f"network {'allowed' if q.network_allowed else 'not allowed'}",
            line("CUS", q.cus_used, q.cus_limit, q.cus_remaining),
            line("tasks", q.tasks_used, q.tasks_limit, q.tasks_remaining),
        ])


class TasksTable:
    """The tasks of this session with their status (``%hotbox tasks``); a plain rich display, no widget."""

    HEADER = ("Task", "Image", "Size", "Status", "Created")

    def __init__(self, tasks: Sequence[TaskInfo], statuses: dict[str, TaskStatus | str] | None = None) -> None:
        self.tasks = list(tasks)
        self.statuses = statuses or {}

    def rows(self) -> list[tuple[str, ...]]:
        """One row per task."""
        return [(t.id, t.image, str(t.size), str(self.statuses.get(t.id, "")),
                 t.created_at.strftime("%Y-%m-%d %H:%M:%S")) for t in self.tasks]

    def _repr_html_(self) -> str:
        if not self.tasks:
            return "<i>no tasks</i>"
        return _html_table(self.HEADER, self.rows())

    def __repr__(self) -> str:
        return _text_table(self.HEADER, self.rows()) if self.tasks else "no tasks"


_STATE_COLOURS = {"pending": "#777", "running": "#1a73e8", "succeeded": "#188038", "failed": "#c5221f",
                  "stopping": "#e37400"}


class TaskView(_TextFallback, w.VBox):  # type: ignore[misc]
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
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="warning",
                                    tooltip=f"cancel task {task.id}", layout=w.Layout(width="auto"))
        self.output = w.Output(layout=w.Layout(max_height="32em", overflow="auto"))
        self._stop_callbacks: list[Callable[[], None]] = []
        self.stop_button.on_click(lambda _b: self._stop_clicked())
        super().__init__(children=[w.HBox([self.status, self.stop_button]), self.output], **kwargs)
        self.set_status("pending", "starting")

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the Stop button is clicked."""
        self._stop_callbacks.append(callback)

    def set_status(self, state: str, detail: str = "") -> None:
        """Show the task's state (pending, running, stopping, succeeded, failed) and a detail line."""
        self.state, self.detail = state, detail
        colour = _STATE_COLOURS.get(state, "#777")
        t = self.task
        self.status.value = (f"<span style='font-family:monospace'><b>{html.escape(t.id)}</b> "
                             f"{html.escape(t.image)} ({html.escape(str(t.size))}) "
                             f"<b style='color:{colour}'>{html.escape(state)}</b> {html.escape(detail)}</span>")

    def finished(self, result: TaskResult) -> None:
        """The task ended: show how, and retire the Stop button."""
        state = "succeeded" if result.ok else "failed"
        self.set_status(state, f"{result.message} ({result.duration:.1f}s, {result.cus:g} CUS)")
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
