"""``%%hotbox`` in a real ipykernel process, over the Jupyter protocol.

Streaming is judged by when the client received each stream message; the interrupt is a real
``interrupt_kernel()`` (SIGINT to the kernel process); the demo notebook is executed with nbclient.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from kernel_protocol import execute, running_kernel

from hotbox_jupyter import demo
from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_OWNER_PID

pytestmark = [pytest.mark.kernel, pytest.mark.docker]


def _kernel_containers(pid: int) -> list[str]:
    client = docker.from_env()
    try:
        found = client.containers.list(all=True, filters={"label": [LABEL_MANAGED, f"{LABEL_OWNER_PID}={pid}"]})
        return [c.name for c in found]
    finally:
        client.close()


@pytest.fixture(scope="module")
def kernel() -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km = KernelManager(kernel_name="python3")
    with running_kernel(km) as (kc, pid):
        reply = execute(kc, "%load_ext hotbox_jupyter")
        assert reply["status"] == "ok", reply
        yield km, kc
    # The kernel owns its boxes (labelled with its pid, not pytest's): check them here.
    leaked = _kernel_containers(pid)
    assert not leaked, f"containers left behind by the kernel: {leaked}"


def streams(result: dict[str, Any], name: str = "stdout") -> list[tuple[float, str]]:
    return [(t, m["content"]["text"]) for t, m in result["messages"]
            if m["msg_type"] == "stream" and m["content"]["name"] == name]


def test_each_line_arrives_in_its_own_message_while_the_box_runs(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "%%hotbox\nimport time\nfor i in range(10):\n    print(f'line {i}')\n    time.sleep(0.1)\n")
    assert r["status"] == "ok", r
    got = streams(r)
    lines = [(t, text) for t, text in got if text.startswith("line ")]
    assert [text for _, text in lines] == [f"line {i}\n" for i in range(10)], got
    stamps = [t for t, _ in lines]
    assert stamps[-1] - stamps[0] >= 0.7, "the lines arrived together: not streamed"
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert sum(g >= 0.05 for g in gaps) >= 7, gaps
    # The kernel's own timestamps agree: the messages were sent over the box's run, not at its end.
    sent = [m["header"]["date"] for _, m in r["messages"] if m["msg_type"] == "stream"
            and m["content"]["text"].startswith("line ")]
    assert (sent[-1] - sent[0]).total_seconds() >= 0.7


def test_result_is_an_execute_result_and_errors_are_error_replies(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "%%hotbox\n{'answer': 6 * 7}")
    assert r["status"] == "ok", r
    (res,) = [m for _, m in r["messages"] if m["msg_type"] == "execute_result"]
    assert res["content"]["data"]["text/plain"] == "{'answer': 42}"
    r = execute(kc, "%%hotbox hotbox/shell\nexit 3")
    assert r["status"] == "error"
    assert r["ename"] == "BoxFailedError" and "3" in r["evalue"]
    (err,) = [m for _, m in r["messages"] if m["msg_type"] == "error"]
    assert len(err["content"]["traceback"]) == 1, "a plain reason, no traceback through the magic"


def test_interrupt_stops_the_box_reports_interrupted_and_keeps_the_kernel(kernel: Any) -> None:
    km, kc = kernel
    pid = km.provisioner.process.pid

    interrupted = []

    def interrupt_when_started(msg: dict[str, Any]) -> None:
        if (msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout" and "begin" in msg["content"]["text"]
                and not interrupted):
            interrupted.append(time.monotonic())
            km.interrupt_kernel()

    t0 = time.monotonic()
    r = execute(kc, "%%hotbox hotbox/shell --out stopped\necho begin\nsleep 120\necho never",
                on_message=interrupt_when_started, timeout=60)
    elapsed = time.monotonic() - t0
    assert r["status"] == "error" and r["ename"] == "KeyboardInterrupt", r
    assert elapsed < 30, f"the interrupt took {elapsed:.1f}s"
    stderr = "".join(text for _, text in streams(r, "stderr"))
    assert "interrupted" in stderr
    assert "never" not in "".join(text for _, text in streams(r))
    assert not _kernel_containers(pid), "the box is gone"
    r = execute(kc, "print(stopped.reason, stopped.status)")
    assert r["status"] == "ok"
    assert "interrupted failed" in "".join(text for _, text in streams(r))


def test_async_output_reaches_the_widget_over_time(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "%%hotbox hotbox/shell --async --out bg\nfor i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done")
    assert r["status"] == "ok", r
    # The TaskInfo, at once, shown as its live view (and not also as its repr).
    results = [m["content"]["data"] for _, m in r["messages"] if m["msg_type"] == "execute_result"]
    assert len(results) == 1 and "application/vnd.jupyter.widget-view+json" in results[0], results
    assert "TaskInfo(" not in results[0]["text/plain"]
    # The box keeps streaming into the Output widget after the cell finished: comm updates of its
    # `outputs` carry the ticks, spread over the box's run.
    arrivals: dict[int, float] = {}
    deadline = time.monotonic() + 60
    while len(arrivals) < 5 and time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["msg_type"] != "comm_msg":
            continue
        outputs = msg["content"]["data"].get("state", {}).get("outputs")
        if not outputs:
            continue
        text = "".join(o.get("text", "") for o in outputs)
        for i in range(1, 6):
            if f"tick {i}" in text and i not in arrivals:
                arrivals[i] = time.monotonic()
    assert sorted(arrivals) == [1, 2, 3, 4, 5]
    assert arrivals[5] - arrivals[1] >= 0.6
    r = execute(kc, "from hotbox_jupyter import box\nprint(box.wait(_.id, timeout=30).status)")
    assert r["status"] == "ok", r
    assert "succeeded" in "".join(text for _, text in streams(r))


@pytest.mark.slow
def test_demo_notebook_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (notebook,) = [p for p in demo.default_notebooks() if p.name == "hotbox_magic_demo.ipynb"]
    out = tmp_path / "executed.ipynb"
    code = demo.main([str(notebook), "--save", str(out), "--out-dir", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "== ok: hotbox_magic_demo.ipynb" in printed
    assert "image/png" in printed  # the figure came back as display data
    assert "5 ticks" in printed  # the async task's output, waited for in a later cell
    assert "exited with code 3" in printed  # the failure, shown with --no-raise-error
    assert out.exists()
    # Next to the summary, an HTML copy that reads offline: the widgets in their HTML form.
    summary = (tmp_path / "demo" / "hotbox_magic_demo.txt").read_text()
    assert summary.startswith("hotbox_magic_demo.ipynb (kernel python3): ok") and "5 ticks" in summary
    page = (tmp_path / "demo" / "hotbox_magic_demo.html").read_text()
    assert "Hot Box quota" in page and "CUS Multiplier" in page
    assert "application/vnd.jupyter.widget-view+json" not in page
