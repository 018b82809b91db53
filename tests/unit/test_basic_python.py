"""The host-side parts of basic Python (images without ipykernel) that need no sandbox: is_complete,
completion, the notice, the attach stream's hand-over from a thread, and the panic wording of microVMs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hotbox_jupyter.hotcell.guestproto import panic_message
from hotbox_jupyter.kernel.basic import FedStream, complete, is_complete, notice


@pytest.mark.parametrize(("code", "status"), [
    ("1", "complete"), ("x = 1\ny = 2", "complete"), ("def f(x):\n  return x*2\n\n\n", "complete"),
    ("print('''hello", "incomplete"), ("def f(x):\n  x*2", "incomplete"), ("if x:", "incomplete"),
    ("import = 7q", "invalid"),
])
def test_is_complete_follows_the_console(code: str, status: str) -> None:
    assert is_complete(code)["status"] == status


def test_incomplete_says_the_next_indent() -> None:
    assert is_complete("for i in range(3):")["indent"] == "    "
    assert is_complete("def f(x):\n  x*2")["indent"] == "  "


def test_completion_of_keywords_and_builtins() -> None:
    reply = complete("x = zi", 6)
    assert reply["matches"] == ["zip"] and (reply["cursor_start"], reply["cursor_end"]) == (4, 6)
    assert complete("x = ", 4)["matches"] == []


def test_the_notice_is_one_line_naming_the_image() -> None:
    text = notice("example/img")
    assert text.count("\n") == 1 and text.endswith("\n") and "example/img" in text and "ipykernel" in text


def test_fed_stream_hands_bytes_from_a_thread_and_survives_cancelled_reads() -> None:
    async def main() -> list[bytes]:
        stream = FedStream(lambda data: None)
        stream.feed(b"early")  # before any reader: kept
        got = [await stream.receive()]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.receive(), 0.05)  # a cancelled read loses nothing
        t = threading.Thread(target=lambda: (stream.feed(b"late"), stream.end()))
        t.start()
        got.append(await stream.receive())
        t.join()
        import anyio

        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        return got

    assert asyncio.run(main()) == [b"early", b"late"]


def test_a_panic_on_the_console_is_said_plainly() -> None:
    log = "[    1.0] ok\n[   16.702649] Kernel panic - not syncing: sysrq triggered crash\n"
    assert panic_message(log) == "the microVM's kernel panicked: Kernel panic - not syncing: sysrq triggered crash"
    assert panic_message("[ 1.0] all fine\n") is None
