"""The console journal of one task: its events in order, its text on disk, bounded in both.

Text is appended to ``<state>/tasks/<id>/console.log`` and only its byte ranges are kept in memory,
next to the few structured events (display data, results, progress, the final Exit). A subscriber
walks the journal with a :class:`Cursor`, so it replays from the start, then follows live, and reads
big ranges at once when it falls behind: a slow subscriber gets fewer, larger chunks rather than an
ever-growing queue.

A box decides how much it writes, so the journal is bounded: it keeps the first :data:`HEAD_BYTES` and
the last :data:`TAIL_BYTES` of the console (and at most :data:`MAX_ENTRIES` entries and
:data:`MAX_EVENT_BYTES` of structured events at each end). What lies between is dropped as the box
goes: its entries leave memory and its bytes are punched out of the file (``fallocate``), so a flood
of any size costs at most ``HEAD_BYTES + TAIL_BYTES + SLACK_BYTES`` of host disk. A subscriber that
was further behind than the tail is told, in a stderr line, how much it missed; one that keeps up
misses nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from ..events import DisplayData, Event, Exit, ResultValue, StderrChunk, StdoutChunk

__all__ = ["HEAD_BYTES", "MAX_ENTRIES", "MAX_EVENT_BYTES", "SLACK_BYTES", "TAIL_BYTES", "Cursor", "Journal"]

log = logging.getLogger(__name__)

HEAD_BYTES = 8 << 20
TAIL_BYTES = 8 << 20
# Dropping happens in steps: the spool may exceed HEAD + TAIL by this much before it is cut back.
SLACK_BYTES = 8 << 20
MAX_ENTRIES = 50_000
MAX_EVENT_BYTES = 32 << 20
# Largest chunk handed to a subscriber at once.
READ_CAP = 1 << 20
# What a result holds of each stream in memory (its tail).
TAIL_CAP = 1 << 20

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_BLOCK = 4096


@dataclass(frozen=True)
class Cursor:
    """A subscriber's position in a journal: entry index, and bytes already read of a text entry."""

    index: int = 0
    offset: int = 0


def _event_cost(ev: Event) -> int:
    if isinstance(ev, DisplayData | ResultValue):
        return 64 + sum(len(str(v)) for v in ev.data.values()) + (len(str(ev.value)) if isinstance(ev, ResultValue)
                                                                  else 0)
    return 64 + len(str(ev))


def _punch(fd: int, start: int, end: int) -> bool:
    """Free the file's blocks in [start, end) (rounded inwards to whole blocks); False if unsupported."""
    start = -(-start // _BLOCK) * _BLOCK
    end = end // _BLOCK * _BLOCK
    if end <= start:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, start, end - start) != 0:
        log.warning("cannot free dropped console output: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _utf8_cut(raw: bytes) -> int:
    """The length of the longest prefix of ``raw`` that ends on a UTF-8 character boundary."""
    cut = len(raw)
    while cut > 0 and (raw[cut - 1] & 0xC0) == 0x80:  # continuation bytes are 0b10xxxxxx
        cut -= 1
    if cut > 0 and raw[cut - 1] >= 0xC0:
        cut -= 1
    return cut or len(raw)


class Journal:
    """The event log of one task (see the module docstring).

    Entries are ``("out"|"err", start, end)`` byte ranges of the file or ``("ev", event, position,
    cost)``. Their indices are logical and stable: once the head is frozen (``head_n`` entries), the
    ``dropped_n`` entries after it are gone, and logical index ``i >= head_n + dropped_n`` lives at
    ``entries[i - dropped_n]``. Bytes in ``[drop_lo, drop_hi)`` of the file are gone too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = 0
        self.entries: list[tuple[Any, ...]] = []
        self.closed = False
        self._changed = anyio.Event()
        self.out_tail = bytearray()
        self.err_tail = bytearray()
        self.out_total = 0
        self.err_total = 0
        self.head_n: int | None = None
        self.dropped_n = 0
        self.drop_lo = 0
        self.drop_hi = 0
        self.dropped_events = 0
        self._event_bytes = 0  # of the structured events in the head, then in the tail

    @property
    def size(self) -> int:
        """Bytes of text journaled so far (dropped ones included)."""
        return self._size

    @property
    def dropped_bytes(self) -> int:
        return self.drop_hi - self.drop_lo

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def text(self, kind: Literal["out", "err"], text: str) -> None:
        if not text or self.closed:
            return
        data = text.encode()
        os.write(self._fd, data)
        start, self._size = self._size, self._size + len(data)
        last = self.entries[-1] if self.entries else None
        if last is not None and last[0] == kind and last[2] == start and len(self.entries) != self.head_n:
            self.entries[-1] = (kind, last[1], self._size)
        else:
            self.entries.append((kind, start, self._size))
        tail = self.out_tail if kind == "out" else self.err_tail
        tail += data
        if len(tail) > 2 * TAIL_CAP:
            del tail[: len(tail) - TAIL_CAP]
        if kind == "out":
            self.out_total += len(data)
        else:
            self.err_total += len(data)
        self._bound()
        self._notify()

    def event(self, ev: Event) -> None:
        if self.closed:
            return
        cost = _event_cost(ev)
        self.entries.append(("ev", ev, self._size, cost))
        self._event_bytes += cost
        if isinstance(ev, Exit):
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
        else:
            self._bound()
        self._notify()

    # -- the bound ------------------------------------------------------------------------------------

    def _bound(self) -> None:
        if self.head_n is None:
            if self._size >= HEAD_BYTES or len(self.entries) >= MAX_ENTRIES or self._event_bytes >= MAX_EVENT_BYTES:
                self.head_n = len(self.entries)
                self.drop_lo = self.drop_hi = self._size
                self._event_bytes = 0
            return
        tail_n = len(self.entries) - self.head_n
        if (self._size - self.drop_hi <= TAIL_BYTES + SLACK_BYTES and tail_n <= MAX_ENTRIES + MAX_ENTRIES // 4
                and self._event_bytes <= MAX_EVENT_BYTES + MAX_EVENT_BYTES // 4):
            return
        target = max(self.drop_hi, self._size - TAIL_BYTES)
        cut = self.head_n
        while cut < len(self.entries) - 1:  # the newest entry always stays
            entry = self.entries[cut]
            over = len(self.entries) - cut > MAX_ENTRIES or self._event_bytes > MAX_EVENT_BYTES
            if entry[0] == "ev":
                if entry[2] >= target and not over:
                    break
                self._event_bytes -= entry[3]
                self.dropped_events += 1
            else:
                if entry[2] > target and not over:
                    break  # this one keeps its bytes from target on
                target = max(target, entry[2])
            cut += 1
        del self.entries[self.head_n:cut]
        self.dropped_n += cut - self.head_n
        if target > self.drop_hi:
            self.drop_hi = target
            _punch(self._fd, self.drop_lo, self.drop_hi)

    def _note(self, skipped: int) -> StderrChunk:
        return StderrChunk(f"\n[hotbox: {skipped} bytes of output dropped here: a task's console keeps its first "
                           f"{HEAD_BYTES >> 20} MB and its last {TAIL_BYTES >> 20} MB]\n")

    # -- reading --------------------------------------------------------------------------------------

    def _entry(self, index: int) -> tuple[Any, ...] | None:
        """The entry at a logical index (None past the end); indices in the dropped gap are not asked for."""
        phys = index if self.head_n is None or index < self.head_n else index - self.dropped_n
        return self.entries[phys] if phys < len(self.entries) else None

    def _logical_len(self) -> int:
        return len(self.entries) + self.dropped_n

    def _in_gap(self, index: int) -> bool:
        return self.head_n is not None and self.head_n <= index < self.head_n + self.dropped_n

    def _read_raw(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    async def next(self, cur: Cursor) -> tuple[list[Event], Cursor, bool]:
        """Events after ``cur`` (waiting until there is one), the new cursor, and whether the end was reached."""
        while self._caught_up(cur) and not self.closed:
            await self._changed.wait()
        out: list[Event] = []
        budget = READ_CAP
        idx, off = cur.index, cur.offset
        while idx < self._logical_len() and budget > 0:
            if self._in_gap(idx):
                assert self.head_n is not None
                out.append(self._note(self.dropped_bytes))
                idx = self.head_n + self.dropped_n
                entry = self._entry(idx)
                off = max(0, self.drop_hi - entry[1]) if entry is not None and entry[0] != "ev" else 0
                continue
            entry = self._entry(idx)
            assert entry is not None
            if entry[0] == "ev":
                out.append(entry[1])
                idx, off = idx + 1, 0
                continue
            kind, start, end = entry
            begin = start + off
            if self.head_n is not None and idx >= self.head_n and begin < self.drop_hi:
                # The front of this entry was dropped while the reader was behind.
                out.append(self._note(self.drop_hi - begin))
                off, begin = self.drop_hi - start, self.drop_hi
            stop = min(end, begin + budget)
            if stop < end:
                raw = self._read_raw(begin, stop)
                cut = _utf8_cut(raw)
                text = raw[:cut].decode(errors="replace")
                off += cut
                budget -= cut
            else:
                text = self._read_raw(begin, end).decode(errors="replace")
                budget -= end - begin
                if idx == self._logical_len() - 1 and not self.closed:
                    # The last text entry grows in place (text() merges adjacent writes): keep the
                    # reader's place inside it, or what is appended to it would be skipped.
                    off = end - start
                    if text:
                        out.append(StdoutChunk(text) if kind == "out" else StderrChunk(text))
                    break
                idx, off = idx + 1, 0
            if text:
                out.append(StdoutChunk(text) if kind == "out" else StderrChunk(text))
        done = self.closed and idx >= self._logical_len()
        return out, Cursor(idx, off), done

    def _caught_up(self, cur: Cursor) -> bool:
        """True when nothing after ``cur`` has been journaled yet."""
        n = self._logical_len()
        if cur.index >= n:
            return True
        if self._in_gap(cur.index):
            return False
        last = self.entries[-1]
        return cur.index == n - 1 and last[0] != "ev" and last[1] + cur.offset >= last[2]

    def console_tail(self, cap: int = TAIL_CAP) -> tuple[str, bool]:
        """The last ``cap`` bytes of the console (at most the kept tail), and whether that is less than all."""
        begin = max(0, self._size - cap, self.drop_hi if self.head_n is not None else 0)
        data = self._read_raw(begin, self._size)
        if begin > 0:
            i = 0
            while i < len(data) and (data[i] & 0xC0) == 0x80:  # drop a partial character at the start
                i += 1
            data = data[i:]
        return data.decode(errors="replace"), begin > 0

    def console(self) -> str:
        """The whole console kept: the head, a line saying what was dropped, the tail."""
        if self.head_n is None or self.drop_hi == self.drop_lo:
            return self._read_raw(0, self._size).decode(errors="replace")
        head = self._read_raw(0, self.drop_lo).decode(errors="replace")
        tail = self._read_raw(self.drop_hi, self._size).decode(errors="replace")
        return head + self._note(self.drop_hi - self.drop_lo).text + tail
