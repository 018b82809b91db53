"""The persistent agent and the handler wrappers, as real processes on the host (no VM: fast).

The same agent runs in the microVM (tests/integration/test_vm_session.py); here it talks over stdio,
the way it runs in a Docker box.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from hotbox_jupyter.events import DisplayData, ErrorValue, Event, Exit, ResultValue, StderrChunk, StdoutChunk
from hotbox_jupyter.hotcell.session import ProcessAgentSession
from hotbox_jupyter.models import ExitReason
from hotbox_jupyter.paths import runtimes_dir

AGENT = runtimes_dir() / "python" / "agent.py"

# The seed's handler examples, shipped next to the wrappers.
SEED_PY_HANDLER = (runtimes_dir() / "python" / "examples" / "handler.py").read_text()
SEED_JS_HANDLER = (runtimes_dir() / "node" / "examples" / "handler.js").read_text()


async def collect(session: ProcessAgentSession, code: str, **kw: Any) -> list[Event]:
    return [ev async for ev in session.exec(code, **kw)]


def text(events: list[Event], kind: type) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, kind))  # type: ignore[attr-defined]


def test_agent_keeps_state_streams_and_reports_errors(tmp_path: Path) -> None:
    async def go() -> None:
        session = await ProcessAgentSession.start([sys.executable, "-u", str(AGENT)], env={"HOME": str(tmp_path)},
                                                  default_timeout=30)
        async with session:
            assert session.alive
            assert (await collect(session, "x = 41"))[-1] == Exit(ExitReason.EXITED, 0, "ok")
            evs = await collect(session, "x + 1")
            assert ResultValue(value=42, data={"text/plain": "42"}) in evs
            evs = await collect(session, "import os, sys\nprint('out'); print('err', file=sys.stderr)\n"
                                         "os.system('echo from-a-subprocess')")
            assert text(evs, StdoutChunk) == "out\nfrom-a-subprocess\n" and text(evs, StderrChunk) == "err\n"
            evs = await collect(session, "display({'text/html': '<b>hi</b>'})")
            assert DisplayData(data={"text/html": "<b>hi</b>"}) in evs
            evs = await collect(session, "1/0")
            err = next(ev for ev in evs if isinstance(ev, ErrorValue))
            assert err.ename == "ZeroDivisionError" and "<cell-" in "\n".join(err.traceback)
            assert evs[-1].exit_code == 1  # type: ignore[union-attr]
            evs = await collect(session, "import sys; sys.exit(3)")
            assert evs[-1] == Exit(ExitReason.EXITED, 3, "cell failed (status 3)")
            assert ResultValue(value=41, data={"text/plain": "41"}) in await collect(session, "x")
        assert not session.alive

    anyio.run(go)


def test_agent_interrupt_and_timeout_keep_the_namespace(tmp_path: Path) -> None:
    async def go() -> None:
        session = await ProcessAgentSession.start([sys.executable, "-u", str(AGENT)], env={"HOME": str(tmp_path)})
        async with session:
            await collect(session, "kept = 'yes'")
            events: list[Event] = []

            async def run() -> None:
                async for ev in session.exec("import time\nprint('started', flush=True)\ntime.sleep(60)"):
                    events.append(ev)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                with anyio.fail_after(10):
                    while "started" not in text(events, StdoutChunk):
                        await anyio.sleep(0.05)
                await session.interrupt()
            assert events[-1].reason is ExitReason.INTERRUPTED  # type: ignore[union-attr]
            assert any(isinstance(ev, ErrorValue) and ev.ename == "KeyboardInterrupt" for ev in events)
            evs = await collect(session, "import time; time.sleep(60)", timeout=0.5)
            assert evs[-1].reason is ExitReason.TIMEOUT  # type: ignore[union-attr]
            assert ResultValue(value="yes", data={"text/plain": "'yes'"}) in await collect(session, "kept")

    anyio.run(go)


def test_agent_runs_cells_through_the_public_surface_of_cell_py() -> None:
    """The agent reuses the one-shot runner through its ``__all__`` only, so that the runner's insides
    can change without breaking sessions; the surface itself is pinned here."""
    cell_tree = ast.parse((AGENT.parent / "cell.py").read_text())
    public = next(ast.literal_eval(node.value) for node in cell_tree.body
                  if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"])
    assert sorted(public) == ["CELL_FILE", "display", "main", "main_module", "prepare_environment", "run_cell",
                              "show_figures"]

    def is_cell(node: ast.expr) -> bool:  # `cell` or `self.cell`
        return (isinstance(node, ast.Name) and node.id == "cell") or (isinstance(node, ast.Attribute)
                                                                      and node.attr == "cell")

    used = {node.attr for node in ast.walk(ast.parse(AGENT.read_text()))
            if isinstance(node, ast.Attribute) and is_cell(node.value)}
    assert used and used <= set(public), used - set(public)


def _wrapper_env(tmp_path: Path, handler: Path, payload: str | None) -> dict[str, str]:
    env = {**os.environ, "HOTCELL_HANDLER": str(handler), "HOTCELL_RESULT": str(tmp_path / "out" / "result.json")}
    env.pop("HOTCELL_INPUT", None)
    if payload is not None:
        env["HOTCELL_INPUT"] = payload
    return env


def test_python_wrapper_runs_the_seed_handler(tmp_path: Path) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text(SEED_PY_HANDLER)
    wrapper = runtimes_dir() / "python" / "wrapper.py"
    proc = subprocess.run([sys.executable, str(wrapper)], env=_wrapper_env(tmp_path, handler, '{"name": "hotcell"}'),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "Processing hotcell\n"
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"greeting": "Hello, hotcell!"}
    # stdin is the fallback when HOTCELL_INPUT is unset
    proc = subprocess.run([sys.executable, str(wrapper)], env=_wrapper_env(tmp_path, handler, None),
                          input='{"name": "stdin"}', capture_output=True, text=True, timeout=60)
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"greeting": "Hello, stdin!"}
    handler.write_text("async def main():\n    raise ValueError('boom')\n")
    proc = subprocess.run([sys.executable, str(wrapper)], env=_wrapper_env(tmp_path, handler, "{}"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ValueError: boom" in proc.stderr and "wrapper.py" not in proc.stderr
    error = json.loads((tmp_path / "out" / "result.json").read_text())["error"]
    assert error["type"] == "ValueError" and error["message"] == "boom" and error["traceback"]
    proc = subprocess.run([sys.executable, str(wrapper)], env=_wrapper_env(tmp_path, handler, "{not json"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "InputError" in proc.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed on the host")
def test_node_wrapper_runs_the_seed_handler(tmp_path: Path) -> None:
    handler = tmp_path / "handler.js"
    handler.write_text(SEED_JS_HANDLER)
    wrapper = runtimes_dir() / "node" / "wrapper.js"
    proc = subprocess.run(["node", str(wrapper)], env=_wrapper_env(tmp_path, handler, '{"name": "hotcell"}'),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "Processing hotcell\n"
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"greeting": "Hello, hotcell!"}
    handler.write_text("exports.main = () => { throw new TypeError('bad'); };\n")
    proc = subprocess.run(["node", str(wrapper)], env=_wrapper_env(tmp_path, handler, "{}"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "TypeError: bad" in proc.stderr
    assert json.loads((tmp_path / "out" / "result.json").read_text())["error"]["type"] == "TypeError"
