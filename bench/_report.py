"""Shared by the bench programs (not a program itself: ``bench/run.py`` skips ``_*.py``).

A program measures a figure and its baseline in the same run and records them as rows: percentiles of
each, and the ratio figure / baseline at p50. The rows are printed as a table and, when the driver set
``HOTBOX_BENCH_OUT``, written there as ``<program>.json`` for ``bench/run.py`` to collect.
``HOTBOX_BENCH_QUICK=1`` asks a program for its short version (fewer runs, the smaller sizes).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "Row", "quick", "summary"]


def quick() -> bool:
    """Whether the driver asked for the short run."""
    return os.environ.get("HOTBOX_BENCH_QUICK", "") not in ("", "0")


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, float]:
    """p50/p95/p99, min, max, mean and n of a sample."""
    return {"p50": percentile(xs, 50), "p95": percentile(xs, 95), "p99": percentile(xs, 99),
            "min": min(xs), "max": max(xs), "mean": statistics.fmean(xs), "n": len(xs)}


@dataclass
class Row:
    """One figure next to its baseline."""

    group: str
    what: str
    unit: str
    stats: dict[str, float]
    baseline: str | None = None
    baseline_stats: dict[str, float] | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline_stats or not self.baseline_stats.get("p50"):
            return None
        return self.stats["p50"] / self.baseline_stats["p50"]


@dataclass
class Report:
    """The rows of one program, printed as a table and saved for the driver."""

    program: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, group: str, what: str, unit: str, xs: list[float], baseline: tuple[str, list[float]] | None = None,
            note: str = "") -> Row:
        row = Row(group, what, unit, summary(xs), baseline[0] if baseline else None,
                  summary(baseline[1]) if baseline else None, note)
        self.rows.append(row)
        return row

    def table(self) -> str:
        """The rows as Markdown: p50/p95/p99 of the figure, its baseline's p50, and the ratio."""
        out = [f"### {self.title}", ""]
        out.append("| group | what | p50 | p95 | p99 | n | baseline (same run) | baseline p50 | ratio |")
        out.append("|---|---|---:|---:|---:|---:|---|---:|---:|")
        for r in self.rows:
            s, b = r.stats, r.baseline_stats
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
            out.append(f"| {r.group} | {r.what}{' (' + r.note + ')' if r.note else ''} | {_fmt(s['p50'], r.unit)} | "
                       f"{_fmt(s['p95'], r.unit)} | {_fmt(s['p99'], r.unit)} | {int(s['n'])} | {r.baseline or ''} | "
                       f"{_fmt(b['p50'], r.unit) if b else ''} | {ratio} |")
        out.extend(f"\n{n}" for n in self.notes)
        return "\n".join(out) + "\n"

    def save(self) -> None:
        """Print the table; write the JSON where the driver wants it."""
        print(self.table())
        out = os.environ.get("HOTBOX_BENCH_OUT")
        if out:
            data = {"program": self.program, "title": self.title, "notes": self.notes, "context": self.context,
                    "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows]}
            Path(out, f"{self.program}.json").write_text(json.dumps(data, indent=1))
        sys.stdout.flush()


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    return f"{value:.3g} {unit}"
