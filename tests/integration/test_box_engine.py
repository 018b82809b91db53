"""The Hot Box engine on the real Docker engine: the seed's examples, streaming, limits and reasons,
cancel, billing and hot:// storage."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import box_support
import docker
import pytest
from box_support import NODE, PYTHON, SHELL, containers, hotbox_home, mounts_under, run, wait_running

from hotbox_jupyter import BoxConf, ExitReason, TaskStatus, box
from hotbox_jupyter.box import journal
from hotbox_jupyter.box.billing import Ledger
from hotbox_jupyter.box.storage import ProjectStorage
from hotbox_jupyter.errors import ConfigError, TaskNotFoundError
from hotbox_jupyter.events import DisplayData, Exit, ResultValue, StderrChunk, StdoutChunk
from hotbox_jupyter.frames import encode_frame

pytestmark = pytest.mark.docker
images, project = box_support.images, box_support.project  # fixtures


def _text(events: list[Any], kind: type = StdoutChunk) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def _merged(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for ev in events:
        if out and isinstance(ev, StdoutChunk | StderrChunk) and type(out[-1]) is type(ev):
            out[-1] = type(ev)(out[-1].text + ev.text)
        else:
            out.append(ev)
    return out


# -- the seed's three examples --------------------------------------------------------------------

def test_seed_example_hello_returns_at_once_and_bills_nano(project: Path) -> None:
    t0 = time.monotonic()
    task = box.start(BoxConf(image=PYTHON, cmd=["python3", "-c", "print('Hello')"], size="nano"))
    assert time.monotonic() - t0 < 5.0, "start() must return before the box has run"
    assert task.id and task.stream_id and task.id != task.stream_id
    assert task.model_dump(by_alias=True)["stream-id"] == task.stream_id
    assert box.status(task.id) in (TaskStatus.PENDING, TaskStatus.RUNNING)
    result = box.wait(task.id, timeout=60)
    assert result.ok, result
    assert result.console_output == "Hello\n"
    assert result.reason is ExitReason.EXITED and result.exit_code == 0
    assert result.duration > 0
    assert result.cus == pytest.approx(result.duration * 0.25, abs=1e-3)
    assert box.status(task.id) is TaskStatus.SUCCEEDED
    assert task in box.tasks()


def test_seed_example_script_writes_data_and_hot_storage(project: Path, client: docker.DockerClient) -> None:
    result = run(BoxConf(image=SHELL, script="echo 'hello from hot box' > /data/test.txt\n"
                                              "hotbox cp /data/test.txt hot://output/test.txt\n",
                         size="nano", writable=True))
    assert result.ok, result
    assert "+ hotbox cp /data/test.txt hot://output/test.txt" in result.stderr  # set -x traces
    assert box.storage.read_text("hot://output/test.txt") == "hello from hot box\n"
    assert [str(e) for e in box.storage.ls("hot://output")] == ["test.txt"]
    # the box and its /data disk are gone
    assert containers(client, task_id=result.id) == []
    assert mounts_under(hotbox_home() / "state" / "tasks") == []  # (a spare disk may wait in state/spare)


def test_seed_example_node_env_internet(project: Path) -> None:
    result = run(BoxConf(image=NODE, cmd=["node", "-e", "console.log(process.env.NAME)"], env={"NAME": "Hot"},
                         size="medium", network="internet"))
    assert result.ok, result
    assert result.stdout == "Hot\n"
    assert result.cus == pytest.approx(result.duration * 2.0, abs=1e-3)


# -- command forms --------------------------------------------------------------------------------

def test_script_runs_with_set_ex(project: Path) -> None:
    result = run({"image": SHELL, "script": "echo one\nfalse\necho two\n", "size": "micro"})
    assert result.status is TaskStatus.FAILED and result.exit_code == 1
    assert result.stdout == "one\n"
    assert "+ echo one" in result.stderr and "+ false" in result.stderr
    assert "exited with code 1" in result.message


def test_hyphenated_fields_and_entrypoint(project: Path) -> None:
    result = run({"image": SHELL, "entrypoint": ["/bin/sh", "-c"], "cmd": ["echo $0 $HOTBOX_TASK_ID", "arg0"],
                  "tmp-size": 8, "disk-size": 16, "size": "micro"})
    assert result.ok, result
    assert result.stdout.startswith("arg0 box-")


def test_exit_codes_in_plain_words(project: Path) -> None:
    result = run({"image": SHELL, "cmd": ["no-such-program"], "size": "micro"})
    assert result.exit_code == 127 and "command not found" in result.message
    result = run({"image": SHELL, "cmd": ["sh", "-c", "kill -SEGV $$"], "size": "micro"})
    assert result.exit_code == 139 and "SIGSEGV" in result.message


def test_stdin_is_written_then_closed(project: Path) -> None:
    result = run({"image": SHELL, "cmd": ["sh", "-c", "cat; echo; echo EOF"], "size": "micro"},
                 stdin=b"line one\nline two")
    assert result.ok, result
    assert result.stdout == "line one\nline two\nEOF\n"


# -- events ---------------------------------------------------------------------------------------

_TICKER = "for i in 1 2 3; do echo out $i; echo err $i >&2; sleep 0.3; done"


def test_events_live_then_replayed(project: Path) -> None:
    task = box.start({"image": SHELL, "cmd": ["sh", "-c", _TICKER], "size": "micro"})
    live: list[tuple[float, Any]] = []
    for ev in box.events(task.stream_id):
        live.append((time.monotonic(), ev))
    assert isinstance(live[-1][1], Exit) and live[-1][1].exit_code == 0
    outs = [(t, e) for t, e in live if isinstance(e, StdoutChunk)]
    assert _text([e for _, e in live]) == "out 1\nout 2\nout 3\n"
    assert _text([e for _, e in live], StderrChunk) == "err 1\nerr 2\nerr 3\n"
    assert outs[-1][0] - outs[0][0] > 0.4, "chunks must arrive as they are written, not at the end"
    # a second subscriber, after the end, gets the same story from the start (by task id too), in
    # chunks that may be coalesced differently but in the same order
    replay = list(box.events(task.id))
    assert _merged([e for _, e in live]) == _merged(replay)
    assert box.logs(task.id).count("\n") == 6


def test_live_subscriber_follows_a_single_growing_stream(project: Path) -> None:
    """Consecutive writes to one stream are merged in the journal; a live reader must still get each."""
    task = box.start({"image": SHELL, "cmd": ["sh", "-c", "for i in 1 2 3 4; do echo $i; sleep 0.25; done"],
                      "size": "micro"})
    seen: list[tuple[float, str]] = [(time.monotonic(), e.text) for e in box.events(task.id)
                                     if isinstance(e, StdoutChunk)]
    assert "".join(t for _, t in seen) == "1\n2\n3\n4\n"
    assert len(seen) >= 3 and seen[-1][0] - seen[0][0] > 0.4


def test_aevents_on_a_foreign_event_loop(project: Path) -> None:
    task = box.start({"image": SHELL, "cmd": ["sh", "-c", _TICKER], "size": "micro"})

    async def consume() -> list[Any]:
        return [ev async for ev in box.aevents(task.stream_id)]

    events = asyncio.run(consume())
    assert isinstance(events[-1], Exit)
    assert _text(events) == "out 1\nout 2\nout 3\n"


def test_frames_become_display_and_result_events(project: Path) -> None:
    display = encode_frame({"t": "display", "data": {"text/plain": "a figure", "image/png": "iVBOR"}})
    result_frame = encode_frame({"t": "result", "value": {"answer": 42}, "data": {"text/plain": "42"}})
    payload = b"before " + display + b"between\n" + result_frame + b"after\n"
    result = run({"image": SHELL, "cmd": ["cat"], "size": "micro"}, stdin=payload)
    assert result.ok, result
    events = list(box.events(result.id))
    assert DisplayData(data={"text/plain": "a figure", "image/png": "iVBOR"}) in events
    assert ResultValue(value={"answer": 42}, data={"text/plain": "42"}) in events
    assert result.result == {"answer": 42}
    assert result.stdout == "before between\nafter\n"


def test_unknown_ids_and_wait_timeout(project: Path) -> None:
    with pytest.raises(TaskNotFoundError):
        box.wait("box-nope")
    with pytest.raises(TaskNotFoundError):
        box.events("stream-nope")
    with pytest.raises(TaskNotFoundError):
        box.logs("box-nope")
    task = box.start({"image": SHELL, "cmd": ["sleep", "30"], "size": "micro"})
    with pytest.raises(TimeoutError):
        box.wait(task.id, timeout=0.2)
    box.cancel(task.id, grace=0.5)
    assert box.wait(task.id, timeout=5).reason is ExitReason.CANCELLED


def test_flood_is_spooled_to_disk_not_memory(project: Path) -> None:
    """300 MB of output: the spool keeps its head and tail (bounded disk), memory stays flat, the result is capped."""
    size = 300 * 1024 * 1024

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    before = rss()
    task = box.start({"image": SHELL, "size": "xlarge",
                      "cmd": ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo; echo THE END"]})
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = box.wait(task.id, timeout=240)
    finally:
        stop.set()
        sampler.join()
    assert result.ok, result.message
    assert result.console_path and os.path.getsize(result.console_path) == size + len("\nTHE END\n")
    kept = os.stat(result.console_path).st_blocks * 512  # the dropped middle is punched out of the file
    assert kept <= journal.HEAD_BYTES + journal.TAIL_BYTES + journal.SLACK_BYTES + (1 << 20), kept
    assert result.truncated and len(result.console_output) <= 1024 * 1024
    assert result.console_output.endswith("x\nTHE END\n")
    assert peak - before < 120 * 1024 * 1024, f"memory grew by {(peak - before) >> 20} MB during a 300 MB flood"
    # a late subscriber replays the head, a line saying what was dropped, and the tail, in coalesced chunks
    events = list(box.events(task.id))
    chunks = [e for e in events if isinstance(e, StdoutChunk)]
    notes = [e.text for e in events if isinstance(e, StderrChunk) and "dropped" in e.text]
    kept_text = sum(len(c.text) for c in chunks)
    assert len(notes) == 1 and f"{size + 9 - kept_text} bytes of output dropped" in notes[0], notes
    assert journal.HEAD_BYTES + journal.TAIL_BYTES <= kept_text <= kept + (1 << 20)
    assert chunks[-1].text.endswith("x\nTHE END\n") and chunks[0].text.startswith("xxx")
    assert len(chunks) < 1000


# -- limits and reasons ---------------------------------------------------------------------------

def test_timeout_kills_and_says_so(project: Path, client: docker.DockerClient) -> None:
    t0 = time.monotonic()
    result = run({"image": SHELL, "cmd": ["sleep", "60"], "timeout": 2, "size": "micro"})
    assert result.reason is ExitReason.TIMEOUT and result.status is TaskStatus.FAILED
    assert "timeout of 2 s" in result.message
    assert 1.5 < result.duration < 6 and time.monotonic() - t0 < 15
    assert containers(client, task_id=result.id) == []


def test_out_of_memory_names_the_limit(project: Path) -> None:
    result = run({"image": PYTHON, "size": "nano",
                  "cmd": ["python3", "-c", "x = bytearray(300 * 1024 * 1024); print(len(x))"]})
    assert result.reason is ExitReason.OOM, result
    assert "64 MB" in result.message and "memory" in result.message


def test_memory_override(project: Path) -> None:
    code = "x = bytearray(100 * 1024 * 1024); x[::4096] = b'y' * len(x[::4096]); print('ok')"
    assert run({"image": PYTHON, "size": "nano", "cmd": ["python3", "-c", code]}).reason is ExitReason.OOM
    result = run({"image": PYTHON, "size": "nano", "memory": 256, "cmd": ["python3", "-c", code]})
    assert result.ok and result.stdout == "ok\n", result


def test_cancel_stops_the_box_and_bills_what_ran(project: Path, client: docker.DockerClient) -> None:
    task = box.start({"image": SHELL, "cmd": ["sleep", "60"], "size": "medium"})
    wait_running(task.id)
    time.sleep(0.5)
    t0 = time.monotonic()
    box.cancel(task.id, grace=1.0)
    assert time.monotonic() - t0 < 5
    assert containers(client, task_id=task.id) == [], "cancel() returns once the container is gone"
    result = box.wait(task.id, timeout=1)
    assert result.reason is ExitReason.CANCELLED and result.status is TaskStatus.FAILED
    assert 0.3 < result.duration < 5
    assert result.cus == pytest.approx(result.duration * 2.0, abs=1e-3)
    settings = box.settings()
    row = Ledger(settings.ledger_path).row(task.id)
    assert row is not None and row.reason == "cancelled" and row.cus == pytest.approx(result.cus, abs=1e-3)


def test_interrupt_sends_sigint_first(project: Path) -> None:
    code = ("import signal, sys, time\n"
            "def h(*a):\n    print('got SIGINT', flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGINT, h)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    task = box.start({"image": PYTHON, "cmd": ["python3", "-c", code], "size": "small"})
    for ev in box.events(task.id):
        if isinstance(ev, StdoutChunk) and "ready" in ev.text:
            break
    box.cancel(task.id, reason=ExitReason.INTERRUPTED, grace=5)
    result = box.wait(task.id, timeout=1)
    assert result.reason is ExitReason.INTERRUPTED
    assert "got SIGINT" in result.stdout and result.exit_code == 0
    assert result.duration < 5


def test_cancel_before_the_box_runs(project: Path, client: docker.DockerClient) -> None:
    task = box.start({"image": SHELL, "cmd": ["sleep", "60"], "size": "micro"})
    box.cancel(task.id, grace=0.2)
    result = box.wait(task.id, timeout=5)
    assert result.reason is ExitReason.CANCELLED
    assert containers(client, task_id=task.id) == []
    box.cancel(task.id)  # cancelling an ended task is harmless
    with pytest.raises(ConfigError):
        box.cancel(task.id, reason=ExitReason.OOM)


def test_quota_reports_usage(project: Path) -> None:
    q0 = box.quota()
    result = run({"image": SHELL, "cmd": ["true"], "size": "large"})
    q1 = box.quota()
    assert q1.tasks_used == q0.tasks_used + 1 and q1.running == 0
    assert q1.cus_used == pytest.approx(q0.cus_used + result.cus, abs=1e-3)
    assert q1.cus_limit is None and q1.cus_remaining is None
    assert box.enabled() is True
    assert [s.name.value for s in box.sizes()] == ["nano", "micro", "small", "medium", "large", "xlarge",
                                                    "2xlarge", "4xlarge"]
    assert "docker:dind" in box.image_policy().denied


# -- hot:// storage -------------------------------------------------------------------------------

def test_hot_storage_round_trip_as_nobody(project: Path) -> None:
    store = ProjectStorage.for_settings(box.settings())
    store.write_bytes("hot://in/words.txt", b"hot box\n")
    result = run({"image": SHELL, "size": "micro", "script": (
        "hotbox ls hot://in\n"
        "hotbox cp hot://in/words.txt /data/w.txt\n"
        "tr a-z A-Z < /data/w.txt > /tmp/W.txt\n"
        "hotbox cp /tmp/W.txt hot://out/deep/W.txt\n"
        "hotbox cat hot://out/deep/W.txt\n")})
    assert result.ok, result.console_output
    assert result.stdout == "words.txt\nHOT BOX\n"
    assert box.storage.read_bytes("hot://out/deep/W.txt") == b"HOT BOX\n"
    # a root (writable) box can replace what a nobody box stored, and the other way round
    assert run({"image": SHELL, "size": "micro", "writable": True,
                "script": "echo root > /tmp/r; hotbox cp /tmp/r hot://out/deep/W.txt"}).ok
    assert run({"image": SHELL, "size": "micro",
                "script": "echo nobody > /tmp/n; hotbox cp /tmp/n hot://out/deep/W.txt"}).ok
    assert box.storage.read_text("hot://out/deep/W.txt") == "nobody\n"
    # `hotbox storage unmount` lets go of the project's disk; its data is there when a box mounts it again
    cli = subprocess.run([sys.executable, "-m", "hotbox_jupyter.cli", "storage", "unmount"], capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and f"unmounted {store.root}" in cli.stdout, cli
    assert not store.mounted
    assert run({"image": SHELL, "size": "micro", "cmd": ["hotbox", "cat", "hot://out/deep/W.txt"]}).stdout == "nobody\n"


def test_hot_paths_cannot_escape(project: Path) -> None:
    result = run({"image": SHELL, "size": "micro", "cmd": ["hotbox", "cp", "/etc/hostname", "hot://../escape"]})
    assert result.exit_code == 1 and "'..'" in result.stderr
    # a box plants a symlink to a host file; the host refuses to follow it
    result = run({"image": SHELL, "size": "micro", "script": "ln -s /etc/passwd /hot/evil; ln -s / /hot/root"})
    assert result.ok, result
    names = {e.name: e for e in box.storage.ls("hot://")}
    assert {"evil", "root"} <= names.keys() and not names["root"].is_dir
    with pytest.raises(PermissionError):
        box.storage.read_bytes("hot://evil")
    with pytest.raises(PermissionError):
        box.storage.read_bytes("hot://root/etc/passwd")
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        box.storage.read_bytes("hot://a/../../etc/passwd")


def test_concurrent_starts_from_threads(project: Path, client: docker.DockerClient) -> None:
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = run({"image": SHELL, "cmd": ["sh", "-c", f"sleep 0.5; echo box {i}"], "size": "micro"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"box {i}\n" for i in range(4)}
    assert len({r.id for r in results.values()}) == 4
    assert containers(client, project_id=box.settings().project.id) == []


def test_missing_image_ends_the_task_with_a_reason(project: Path, client: docker.DockerClient) -> None:
    task = box.start({"image": "hotbox/no-such-image", "cmd": ["true"]})
    result = box.wait(task.id, timeout=60)
    assert result.reason is ExitReason.ERROR and result.exit_code is None
    assert "hotbox/no-such-image" in result.message
    events = list(box.events(task.id))
    assert isinstance(events[-1], Exit) and events[-1].message == result.message
    assert result.cus == 0
    assert containers(client, task_id=task.id) == []
    assert mounts_under(hotbox_home() / "state" / "tasks") == []


# -- the command line -----------------------------------------------------------------------------

def test_hotbox_run_streams_and_exits_with_the_box_code(project: Path) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "hotbox_jupyter.cli", "run"]
    out = subprocess.run([*cli, "--size", "micro", "-e", "WHO=cli", SHELL, "--", "sh", "-c",
                          "echo hello $WHO; echo oops >&2; exit 3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert out.stdout == "hello cli\n"
    assert "oops" in out.stderr and "exited with code 3" in out.stderr
    out = subprocess.run([*cli, "--size", "micro", "--writable", "--script",
                          "echo from-cli > /data/x; hotbox cp /data/x hot://cli/x", SHELL],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert box.storage.read_text("hot://cli/x") == "from-cli\n"
    out = subprocess.run([*cli, "--timeout", "1", "--size", "micro", SHELL, "--", "sleep", "30"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 124 and "timed out" in out.stderr
    out = subprocess.run([*cli, "-i", "--size", "micro", SHELL, "--", "wc", "-c"], input="12345",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "5"
