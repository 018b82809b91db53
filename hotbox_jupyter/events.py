"""The shared vocabulary between backends and front ends.

Backends (Docker boxes, microVMs) emit these events; the magic, the kernel and the widgets consume
them. Nothing else crosses that seam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .models import ExitReason

__all__ = [
    "DisplayData",
    "ErrorValue",
    "Event",
    "Exit",
    "Progress",
    "ResultValue",
    "StderrChunk",
    "StdoutChunk",
]


@dataclass(frozen=True, slots=True)
class StdoutChunk:
    """Text the sandboxed code wrote to stdout; may be a partial line or carry ``\\r``."""

    text: str


@dataclass(frozen=True, slots=True)
class StderrChunk:
    """Text the sandboxed code wrote to stderr."""

    text: str


@dataclass(frozen=True, slots=True)
class DisplayData:
    """A rich output (a MIME bundle) such as a figure, HTML or SVG."""

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResultValue:
    """The structured result: ``value`` is JSON; ``data`` an optional MIME bundle to render it."""

    value: Any
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorValue:
    """An exception raised by the sandboxed code, structured as Jupyter's error message."""

    ename: str
    evalue: str
    traceback: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Progress:
    """Something the host is doing before the code runs (pulling an image, booting a VM)."""

    text: str


@dataclass(frozen=True, slots=True)
class Exit:
    """The end of a run: always the last event of a stream."""

    reason: ExitReason
    exit_code: int | None
    message: str


Event = StdoutChunk | StderrChunk | DisplayData | ResultValue | ErrorValue | Progress | Exit
