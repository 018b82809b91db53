"""The in-box cell runners (runtimes/python/cell.py, runtimes/node/cell.js), run in the real images.

They run here without the engine, as the engine runs them: the runtimes directory mounted read-only at
/opt/hotbox, a read-only root, user nobody, a tmpfs /tmp. What they print is decoded with the host's
FrameDecoder, so these tests pin the frame protocol from both ends.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest

from hotbox_jupyter.events import DisplayData, ErrorValue, Event, ResultValue, StdoutChunk
from hotbox_jupyter.frames import FrameDecoder
from hotbox_jupyter.owner import this_owner
from hotbox_jupyter.paths import GUEST_RUNTIMES, runtimes_dir

pytestmark = [pytest.mark.docker]

PYTHON_IMAGE = "hotbox/python:latest"
NODE_IMAGE = "hotbox/node:latest"


@dataclass
class Ran:
    exit_code: int
    events: list[Event]
    stderr: str

    @property
    def stdout_text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, StdoutChunk))

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker.from_env()
    for image in (PYTHON_IMAGE, NODE_IMAGE):
        try:
            c.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{image} is missing: scripts/setup.sh builds it (hotbox images build --missing)")
    yield c
    c.close()


def run_cell(client: docker.DockerClient, image: str, runner: list[str], code: str,
             ctx: dict | None = None) -> Ran:  # type: ignore[type-arg]
    env = {"CELL_CODE": code}
    if ctx is not None:
        env["HOTCELL_INPUT"] = json.dumps(ctx)
    argv = " ".join(runner)
    container = client.containers.run(
        image, ["sh", "-c", f'printf %s "$CELL_CODE" | {argv}'], environment=env, detach=True,
        volumes={str(runtimes_dir()): {"bind": GUEST_RUNTIMES, "mode": "ro"}}, read_only=True,
        user="65534:65534", tmpfs={"/tmp": "size=64m"}, network_mode="none", labels=this_owner().labels(),
    )
    try:
        code_ = container.wait(timeout=120)["StatusCode"]
        out = container.logs(stdout=True, stderr=False)
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    dec = FrameDecoder()
    events = dec.feed(out) + dec.close()
    return Ran(code_, events, err)


PY = ["python3", "-u", f"{GUEST_RUNTIMES}/python/cell.py"]
NODE = ["node", f"{GUEST_RUNTIMES}/node/cell.js"]


def test_python_cell_values_rich_output_and_figures(client: docker.DockerClient) -> None:
    code = """
import sys
print("ctx:", ctx["n"], ctx["names"])
from IPython.display import HTML, display as show
show(HTML("<b>bold</b>"))
display({"text/markdown": "*md*", "text/plain": "md"})
class Card:
    def _repr_html_(self):
        return "<div>card</div>"
display(Card())
import matplotlib.pyplot as plt
plt.plot([1, 2, 3])
plt.show()
print("between figures")
plt.figure(); plt.bar([1, 2], [3, 4])
import numpy as np
np.arange(ctx["n"]) * 2
"""
    ran = run_cell(client, PYTHON_IMAGE, PY, code, ctx={"n": 4, "names": ["a", "b"]})
    assert ran.exit_code == 0, ran.stderr
    assert "ctx: 4 ['a', 'b']" in ran.stdout_text
    displays = ran.of(DisplayData)
    assert displays[0].data["text/html"] == "<b>bold</b>"
    assert displays[1].data == {"text/markdown": "*md*", "text/plain": "md"}
    assert displays[2].data["text/html"] == "<div>card</div>"
    pngs = [d for d in displays if "image/png" in d.data]
    assert len(pngs) == 2, "plt.show() and the figure left open at the end each show once"
    assert base64.b64decode(pngs[0].data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    # plt.show() output comes before what was printed after it.
    kinds = [type(e).__name__ for e in ran.events]
    first_png = ran.events.index(pngs[0])
    assert any(isinstance(e, StdoutChunk) and "between figures" in e.text for e in ran.events[first_png:])
    (result,) = ran.of(ResultValue)
    assert result.value == [0, 2, 4, 6]
    assert result.data["text/plain"] == "array([0, 2, 4, 6])"
    assert kinds[-1] == "ResultValue"


def test_python_cell_error_traceback_and_exit_code(client: docker.DockerClient) -> None:
    ran = run_cell(client, PYTHON_IMAGE, PY, "x = 1\nprint('before')\ndef f():\n    return 1 / 0\nf()\n")
    assert ran.exit_code == 1
    (err,) = ran.of(ErrorValue)
    assert (err.ename, err.evalue) == ("ZeroDivisionError", "division by zero")
    assert 'File "<cell>", line 5' in ran.stderr and "return 1 / 0" in ran.stderr
    assert "cell.py" not in ran.stderr, "the runner's own frames are hidden"
    assert not ran.of(ResultValue)
    assert "before" in ran.stdout_text


@pytest.mark.parametrize(("code", "exit_code", "value"), [
    ("import sys\nsys.exit(3)\n", 3, None),
    ("41 + 1;\n", 0, None),                          # a trailing ';' silences the value, as in IPython
    ("import asyncio\nawait asyncio.sleep(0.01)\n{'ok': True}\n", 0, {"ok": True}),
    ("def broken(:\n", 1, None),
])
def test_python_cell_exit_codes_and_values(client: docker.DockerClient, code: str, exit_code: int,
                                           value: object) -> None:
    ran = run_cell(client, PYTHON_IMAGE, PY, code)
    assert ran.exit_code == exit_code, ran.stderr
    results = ran.of(ResultValue)
    assert [r.value for r in results] == ([value] if value is not None else [])
    if "broken" in code:
        assert ran.of(ErrorValue)[0].ename == "SyntaxError"


def test_node_cell_value_ctx_display_and_errors(client: docker.DockerClient) -> None:
    ran = run_cell(client, NODE_IMAGE, NODE,
                   'console.log("n is", ctx.n);\ndisplay({"text/html": "<i>hi</i>"});\n'
                   'const doubled = [1, 2].map(x => x * ctx.n);\n({doubled, label: "x"})\n', ctx={"n": 3})
    assert ran.exit_code == 0, ran.stderr
    assert "n is 3" in ran.stdout_text
    assert ran.of(DisplayData)[0].data == {"text/html": "<i>hi</i>"}
    (result,) = ran.of(ResultValue)
    assert result.value == {"doubled": [3, 6], "label": "x"}
    assert "doubled" in result.data["text/plain"]

    ran = run_cell(client, NODE_IMAGE, NODE, "await new Promise(r => setTimeout(r, 10));\nresult({late: 1});\n")
    assert ran.exit_code == 0, ran.stderr
    assert [r.value for r in ran.of(ResultValue)] == [{"late": 1}]

    ran = run_cell(client, NODE_IMAGE, NODE, 'function f() { throw new TypeError("bad input"); }\nf();\n')
    assert ran.exit_code == 1
    (err,) = ran.of(ErrorValue)
    assert (err.ename, err.evalue) == ("TypeError", "bad input")
    assert "<cell>:2" in ran.stderr and "cell.js" not in ran.stderr
