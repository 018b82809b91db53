"""The live widgets and the console's order in a real ipykernel process, over the Jupyter protocol.

The front end's part is played by the client: it reports views shown and removed (ipywidgets'
``_view_count``, which JupyterLab updates when an output is cleared) and closes comms, as a front end
does; the kernel's threads are read from inside the kernel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from kernel_protocol import execute, running_kernel

pytestmark = [pytest.mark.kernel, pytest.mark.docker]


@pytest.fixture(scope="module")
def kc() -> Iterator[BlockingKernelClient]:
    km = KernelManager(kernel_name="python3")
    with running_kernel(km) as (client, _pid):
        assert execute(client, "%load_ext hotbox_jupyter")["status"] == "ok"
        yield client


def _printed(r: dict[str, Any]) -> str:
    return "".join(m["content"]["text"] for _, m in r["messages"]
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def _eval(kc: BlockingKernelClient, expr: str) -> Any:
    r = execute(kc, f"import json as _j\nprint(_j.dumps({expr}))")
    assert r["status"] == "ok", r
    return json.loads(_printed(r).strip().splitlines()[-1])


LIVE_THREADS = "[t.name for t in __import__('threading').enumerate() if t.name == 'hotbox-live']"


def _comm(kc: BlockingKernelClient, msg_type: str, content: dict[str, Any]) -> None:
    kc.shell_channel.send(kc.session.msg(msg_type, content))


def _until(kc: BlockingKernelClient, expr: str, want: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := _eval(kc, expr)) != want:
        assert time.monotonic() < deadline, f"{expr} is {got!r}, not {want!r}"
        time.sleep(0.2)


def test_live_views_stop_when_cleared_or_closed_by_the_front_end(kc: BlockingKernelClient) -> None:
    execute(kc, "q1 = get_ipython().run_line_magic('hotbox', 'quota')\n"
                "q2 = get_ipython().run_line_magic('hotbox', 'quota')")
    assert _eval(kc, "[q1.live, q2.live]") == [True, True]
    assert _eval(kc, LIVE_THREADS) == ["hotbox-live"]  # one thread for all live views
    q1, q2 = _eval(kc, "[q1.model_id, q2.model_id]")
    # The output holding q1 is shown, then cleared: the front end counts its views down to 0.
    for count in (1, 0):
        _comm(kc, "comm_msg", {"comm_id": q1, "data": {"method": "update", "state": {"_view_count": count},
                                                       "buffer_paths": []}})
    _until(kc, "[q1.live, q2.live]", [False, True])
    # The front end closes q2's comm: the last live view is gone, and so is the thread.
    _comm(kc, "comm_close", {"comm_id": q2, "data": {}})
    _until(kc, "[q2.live, q2.comm is None]", [False, True])
    _until(kc, LIVE_THREADS, [])


def test_stdout_and_stderr_keep_the_engines_order_and_stay_apart(kc: BlockingKernelClient) -> None:
    # Writes far enough apart for the engine to tell their order (its two pipes are read separately).
    script = "; ".join(f"echo out{i}; sleep 0.2; echo err{i} >&2; sleep 0.2" for i in range(1, 4))
    r = execute(kc, f"%%hotbox hotbox/shell --size nano\n{script}")
    assert r["status"] == "ok", r
    lines = [(m["content"]["name"], line) for _, m in r["messages"] if m["msg_type"] == "stream"
             for line in m["content"]["text"].splitlines() if line.startswith(("out", "err"))]
    assert lines == [("stdout", "out1"), ("stderr", "err1"), ("stdout", "out2"), ("stderr", "err2"),
                     ("stdout", "out3"), ("stderr", "err3")]
    # The same order in an --async cell's view (its Output widget's outputs).
    r = execute(kc, f"%%hotbox hotbox/shell --size nano --async\n{script}")
    assert r["status"] == "ok", r
    _until(kc, "_.view.state", "succeeded", timeout=60)
    outputs = _eval(kc, "[[o['name'], o['text']] for o in _.view.output.outputs if o['output_type'] == 'stream']")
    lines = [(name, line) for name, text in outputs for line in text.splitlines() if line.startswith(("out", "err"))]
    assert lines == [("stdout", "out1"), ("stderr", "err1"), ("stdout", "out2"), ("stderr", "err2"),
                     ("stdout", "out3"), ("stderr", "err3")]
