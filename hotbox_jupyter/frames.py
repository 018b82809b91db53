"""In-band frames: how guest code sends rich output and results through a plain stdout stream.

A guest runtime writes ``ESC ] hotbox; <json> BEL`` (an OSC escape sequence, as terminals use) on
stdout. Plain text around the frames stays plain text, so ``docker logs`` and a VM console stay
readable and the same decoding works for every transport that carries a byte stream. JSON never
contains a raw ESC or BEL (``json.dumps`` escapes control characters), so a frame ends at the first BEL.

Frame objects, by ``"t"``:

* ``{"t": "display", "data": {mime: payload}, "metadata": {...}}``
* ``{"t": "result", "value": <json>, "data": {mime: payload}}``
* ``{"t": "error", "ename": str, "evalue": str, "traceback": [str, ...]}``

The guest side (``runtimes/``) writes frames with the stdlib alone; this module decodes them.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from .events import DisplayData, ErrorValue, Event, ResultValue, StdoutChunk

__all__ = ["FRAME_END", "FRAME_START", "FrameDecoder", "encode_frame"]

FRAME_START = b"\x1b]hotbox;"
FRAME_END = b"\x07"
# A frame larger than this is not a frame: pass the bytes through as text instead of buffering forever.
MAX_FRAME = 64 * 1024 * 1024


def encode_frame(obj: dict[str, Any]) -> bytes:
    """Encode one frame (host-side twin of the guest runtimes' writer, used by tests and the agent)."""
    return FRAME_START + json.dumps(obj, separators=(",", ":")).encode() + FRAME_END


def _event(obj: Any) -> Event | None:
    if not isinstance(obj, dict):
        return None
    kind = obj.get("t")
    if kind == "display" and isinstance(obj.get("data"), dict):
        return DisplayData(data=obj["data"], metadata=obj.get("metadata") or {})
    if kind == "result":
        return ResultValue(value=obj.get("value"), data=obj.get("data") or {})
    if kind == "error":
        tb = obj.get("traceback") or []
        return ErrorValue(ename=str(obj.get("ename", "Error")), evalue=str(obj.get("evalue", "")),
                          traceback=[str(x) for x in tb])
    return None


class FrameDecoder:
    """Split a stdout byte stream into text chunks and frame events, across arbitrary chunk borders.

    Text is decoded as UTF-8 incrementally (a multi-byte character split over two reads is kept
    whole). A malformed frame is passed through as text rather than dropped: nothing is lost.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> list[Event]:
        """Consume the next bytes; return the events complete so far, in order."""
        self._buf += data
        out: list[Event] = []
        while self._buf:
            start = self._buf.find(FRAME_START)
            if start < 0:
                # Keep a tail that could be the beginning of a frame marker.
                keep = self._partial_marker_len(self._buf)
                text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                self._text(text, out)
                break
            if start:
                self._text(self._buf[:start], out)
                self._buf = self._buf[start:]
            end = self._buf.find(FRAME_END, len(FRAME_START))
            if end < 0:
                if len(self._buf) > MAX_FRAME:
                    self._text(self._buf[:1], out)
                    self._buf = self._buf[1:]
                    continue
                break
            body = self._buf[len(FRAME_START): end]
            raw = self._buf[: end + 1]
            self._buf = self._buf[end + 1:]
            try:
                ev = _event(json.loads(body))
            except ValueError:
                ev = None
            if ev is None:
                self._text(raw, out)
            else:
                out.append(ev)
        return out

    def close(self) -> list[Event]:
        """End of stream: whatever is buffered (an unfinished frame included) comes out as text."""
        out: list[Event] = []
        buf, self._buf = self._buf, b""
        self._text(buf, out, final=True)
        return out

    def _text(self, data: bytes, out: list[Event], final: bool = False) -> None:
        text = self._utf8.decode(data, final=final)
        if text:
            if out and isinstance(out[-1], StdoutChunk):
                out[-1] = StdoutChunk(out[-1].text + text)
            else:
                out.append(StdoutChunk(text))

    @staticmethod
    def _partial_marker_len(buf: bytes) -> int:
        for n in range(min(len(FRAME_START) - 1, len(buf)), 0, -1):
            if FRAME_START.startswith(buf[-n:]):
                return n
        return 0
