"""The in-band frame decoder: frames survive any chunking, text is never lost."""

from __future__ import annotations

import random

from hotbox_jupyter.events import DisplayData, ErrorValue, ResultValue, StdoutChunk
from hotbox_jupyter.frames import FRAME_START, FrameDecoder, encode_frame


def _decode(chunks: list[bytes]) -> list[object]:
    dec = FrameDecoder()
    out: list[object] = []
    for c in chunks:
        out += dec.feed(c)
    out += dec.close()
    # Adjacent text chunks may be split differently depending on chunking: merge them.
    merged: list[object] = []
    for ev in out:
        if merged and isinstance(ev, StdoutChunk) and isinstance(merged[-1], StdoutChunk):
            merged[-1] = StdoutChunk(merged[-1].text + ev.text)
        else:
            merged.append(ev)
    return merged


STREAM = (
    "héllo\r50%\r100%\n".encode()
    + encode_frame({"t": "display", "data": {"text/html": "<b>x</b>"}, "metadata": {"a": 1}})
    + b"between \xe2\x9c\x93\n"
    + encode_frame({"t": "result", "value": {"k": [1, 2]}, "data": {"text/plain": "{'k': [1, 2]}"}})
    + encode_frame({"t": "error", "ename": "ValueError", "evalue": "bad\x1b\x07", "traceback": ["tb"]})
    + b"tail without newline"
)
EXPECTED = [
    StdoutChunk("héllo\r50%\r100%\n"),
    DisplayData({"text/html": "<b>x</b>"}, {"a": 1}),
    StdoutChunk("between ✓\n"),
    ResultValue({"k": [1, 2]}, {"text/plain": "{'k': [1, 2]}"}),
    ErrorValue("ValueError", "bad\x1b\x07", ["tb"]),
    StdoutChunk("tail without newline"),
]


def test_whole_stream() -> None:
    assert _decode([STREAM]) == EXPECTED


def test_every_split_point() -> None:
    for i in range(len(STREAM) + 1):
        assert _decode([STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_byte_by_byte_and_random_chunks() -> None:
    assert _decode([bytes([b]) for b in STREAM]) == EXPECTED
    rnd = random.Random(7)
    for _ in range(50):
        cuts = sorted(rnd.sample(range(1, len(STREAM)), 6))
        parts = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert _decode(parts) == EXPECTED


def test_malformed_frames_pass_through_as_text() -> None:
    bad = FRAME_START + b"not json\x07" + FRAME_START + b'{"t":"nope"}\x07'
    assert _decode([bad]) == [StdoutChunk(bad.decode())]


def test_unfinished_frame_comes_out_at_close() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"a" + FRAME_START + b'{"t":') == [StdoutChunk("a")]
    assert dec.close() == [StdoutChunk('\x1b]hotbox;{"t":')]
