"""The quickstart notebook in real JupyterLab, driven by Playwright with Debian's chromium.

JupyterLab listens on 127.0.0.1 only; the browser is the system's ``chromium`` (Playwright's own browser
download never runs). Everything is checked from the page, as a person would see it: each widget
rendered, the quota's numbers moving without its cell being run again, a size row click reaching the
next box, streamed lines arriving in order before the cell finished, the Stop button and the monitor's
"cancelled". Screenshots of each step go to build/screenshots/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import nbformat
import pytest

from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_OWNER_PID

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.kernel, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
SHOTS = ROOT / "build" / "screenshots"


def chromium_path() -> str | None:
    """Debian's chromium binary (the real one, not the /usr/bin wrapper script, when it is there)."""
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _containers_of(pids: list[int]) -> list[str]:
    client = docker.from_env()
    try:
        return [c.name for pid in pids for c in client.containers.list(
            all=True, filters={"label": [LABEL_MANAGED, f"{LABEL_OWNER_PID}={pid}"]})]
    finally:
        client.close()


@contextlib.contextmanager
def jupyterlab(root: Path, jupyter_path: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """JupyterLab on 127.0.0.1 serving ``root``; yields (notebook URL template with token, server process).

    Its config, runtime, workspace and settings directories are private to the run, so nothing of a
    user's JupyterLab (or of an earlier run) is read or changed. Stopped with SIGTERM (Jupyter's clean
    shutdown, which shuts its kernels down), then killed if it lingers.
    """
    port, token = _free_port(), secrets.token_hex(16)
    private = root / ".jupyter-private"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(private / "config"), "JUPYTER_RUNTIME_DIR": str(private / "run"),
           "PYTHONWARNINGS": "ignore"}
    if jupyter_path is not None:  # kernelspecs installed for this run only
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(jupyter_path), os.environ.get("JUPYTER_PATH")]))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--allow-root", f"--LabApp.workspaces_dir={private / 'workspaces'}",
           f"--LabApp.user_settings_dir={private / 'settings'}", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    # Every cell in the DOM (no windowing): the test reads cells that are scrolled out of view.
    tracker = private / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none"}')
    notification = private / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    # No build check: the page would ask the server to scan the lab's build on every load.
    page_config = private / "config" / "labconfig" / "page_config.json"
    page_config.parent.mkdir(parents=True)
    page_config.write_text('{"buildCheck": false, "buildAvailable": false}')
    log = (root / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "jupyterlab.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.2)
        # A workspace per notebook, reset on open: each page shows its notebook and nothing else.
        yield f"{base}/lab/workspaces/{{0}}/tree/{{0}}.ipynb?reset&token={token}", proc
    finally:
        t0 = time.monotonic()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        print(f"JupyterLab stopped in {time.monotonic() - t0:.1f}s")
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


class Lab:
    """The notebook page, cell by cell, as a person drives it."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.shot = 0
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def cells(self) -> Any:
        return self.page.locator(".jp-Notebook .jp-CodeCell")

    def cell(self, i: int) -> Any:
        return self.cells().nth(i)

    def index_of(self, source_start: str) -> int:
        texts = self.cells().locator(".jp-InputArea-editor").all_inner_texts()
        for i, t in enumerate(texts):
            if t.strip().startswith(source_start):
                return i
        raise AssertionError(f"no cell starts with {source_start!r}: {[t[:30] for t in texts]}")

    def prompt(self, i: int) -> str:
        return str(self.cell(i).locator(".jp-InputPrompt").inner_text()).strip()

    def start(self, i: int) -> None:
        """Run cell ``i`` (click into it, Shift+Enter) without waiting for it to finish.

        A cell run before the page's kernel connection is ready is silently not run (its prompt stays
        ``[ ]``), so the keys are pressed again then; a cell that started shows ``[*]`` at once.
        """
        cell = self.cell(i)
        for _attempt in range(5):
            cell.locator(".jp-InputArea-editor").click()
            # Keys go where the focus is: wait until the cell's editor has it.
            self.wait(lambda: cell.locator(".cm-editor.cm-focused").count() == 1, 10, f"cell {i}'s editor to focus")
            self.page.keyboard.press("Shift+Enter")
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if self.prompt(i) != "[ ]:":
                    return
                self.page.wait_for_timeout(50)
        self.screenshot(f"cell-{i}-never-started")
        raise AssertionError(f"cell {i} did not start")

    def run(self, i: int, timeout: float = 60) -> str:
        """Run cell ``i`` and wait until it finished; its output text."""
        self.start(i)
        self.wait(lambda: re.fullmatch(r"\[\d+\]:", self.prompt(i)), timeout, f"cell {i} to finish")
        return self.output(i)

    def output(self, i: int) -> str:
        return str(self.cell(i).locator(".jp-Cell-outputArea").inner_text())

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                self.screenshot(f"timeout-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self.page.wait_for_timeout(50)

    def run_new_cell(self, code: str, timeout: float = 30) -> str:
        """Add a code cell at the end of the notebook, type ``code`` into it, run it; its output."""
        last = self.cells().count() - 1
        self.cell(last).locator(".jp-InputPrompt").click()  # select it, in command mode
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("b")
        self.wait(lambda: self.cells().count() == last + 2, 10, "the new cell")
        self.cell(last + 1).locator(".jp-InputArea-editor").click()
        self.page.keyboard.insert_text(code)
        return self.run(last + 1, timeout)

    def clear_all_outputs(self) -> None:
        """Edit > Clear Outputs of All Cells, as a person would."""
        self.page.get_by_role("menuitem", name="Edit", exact=True).click()
        self.page.get_by_role("menuitem", name="Clear Outputs of All Cells").click()
        self.wait(lambda: self.page.locator(".jp-Notebook .jp-OutputArea-output").count() == 0, 10,
                  "every output to be cleared")

    def screenshot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.shot += 1
        self.page.screenshot(path=str(SHOTS / f"{self.shot:02d}-{name}.png"), full_page=True)


KERNEL_CELL = "import time\nfor i in range(1, 6):\n    print(f'guest line {i}', flush=True)\n    time.sleep(0.4)"


def _kernels() -> dict[str, str]:
    """The sandboxed kernels on this tree, by sandbox kind: ``vm`` (Hotcell Python), ``box`` (Hot Box Python)."""
    from hotbox_jupyter import kernel

    return dict(getattr(kernel, "KERNEL_NAMES", {"vm": kernel.KERNEL_NAME}))


KERNELS = _kernels()


def _install_kernel(name: str, prefix: Path) -> None:
    """Install kernelspec ``name`` under ``prefix`` for this run only."""
    from hotbox_jupyter.kernel.install import install

    sandbox = next(kind for kind, n in KERNELS.items() if n == name)
    if sandbox == "vm":
        install(prefix=str(prefix))
    else:
        install(sandbox, prefix=str(prefix))  # type: ignore[call-arg]


class Server:
    """A JupyterLab server and a chromium for the module, and the kernels they started."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], browser: Any) -> None:
        self.url, self.process, self.browser = url, process, browser
        self.kernels: set[int] = set()

    def open(self, notebook: str, code_cells: int) -> Lab:
        """A new page on ``notebook``, once every cell is there and its kernel is idle."""
        page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(self.url.format(notebook.removesuffix(".ipynb")))
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        self.kernels.update(_children(self.process.pid))
        lab = Lab(page)
        lab.wait(lambda: lab.cells().count() == code_cells, 30, "every cell")
        return lab


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """JupyterLab with the quickstart notebook and a Hotcell kernel notebook, and Debian's chromium;
    afterwards no server, browser, kernel, box or VM is left."""
    executable = chromium_path()
    if executable is None:
        pytest.fail("Debian's chromium is not installed (scripts/setup.sh installs it with apt)")
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("lab")
    shutil.copy(QUICKSTART, root / QUICKSTART.name)
    prefix = root / ".kernels"
    for name in KERNELS.values():
        _install_kernel(name, prefix)
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(KERNEL_CELL)], metadata={
            "kernelspec": {"name": name, "display_name": name, "language": "python"}})
        nbformat.write(nb, root / f"{name}.ipynb")
    with jupyterlab(root, prefix / "share" / "jupyter") as (url, process), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        srv = Server(url, process, browser)
        try:
            yield srv
        finally:
            browser.close()
    assert process.poll() is not None, "the JupyterLab server is still running"
    assert not [p for p in srv.kernels if Path(f"/proc/{p}").exists()], "a kernel outlived the server"
    assert not _containers_of(sorted(srv.kernels)), "a kernel left boxes behind"
    vms = [p for k in srv.kernels for p in subprocess.run(["pgrep", "-f", f"hotbox-owner={k}"], capture_output=True,
                                                            text=True).stdout.split()]
    assert not vms, f"a kernel left VM processes behind: {vms}"


@pytest.fixture
def lab(server: Server) -> Iterator[Lab]:
    """The quickstart notebook, open in its own page."""
    lab = server.open(QUICKSTART.name, QUICKSTART.read_text().count('"cell_type": "code"'))
    try:
        yield lab
    except BaseException:
        lab.screenshot("failed")
        raise
    finally:
        lab.page.close()


def test_quickstart_in_jupyterlab(lab: Lab) -> None:
    page = lab.page
    lab.run(lab.index_of("%load_ext hotbox_jupyter"))

    # The quota widget: rendered, and its numbers as they were before any box ran.
    quota_cell = lab.index_of("%hotbox quota")
    lab.run(quota_cell)
    quota = page.locator(".hotbox-quota")
    quota.wait_for()
    tasks_before = page.locator(".hotbox-quota-tasks").inner_text()
    cus_before = page.locator(".hotbox-quota-cus").inner_text()
    quota_prompt = lab.prompt(quota_cell)
    assert "CUS" in cus_before and "used" in tasks_before

    # The size table: click the micro row, and the next box gets micro's memory.
    lab.run(lab.index_of("%hotbox sizes"))
    page.locator(".hotbox-sizes").wait_for()
    assert page.locator(".hotbox-size-small.hotbox-size-default").count() == 8  # the row, highlighted
    page.locator(".hotbox-size-row.hotbox-size-micro").nth(2).click()  # the CPU cell of the micro row
    lab.wait(lambda: (page.locator(".hotbox-size-micro.hotbox-size-default").count() == 8
                      and page.locator(".hotbox-size-small.hotbox-size-default").count() == 0), 10,
             "the micro row to be highlighted instead of the small one")
    lab.screenshot("sizes-micro-chosen")
    memory = lab.run(lab.index_of("%%hotbox hotbox/shell\nlimit="))
    assert "memory limit: 128 MB" in memory, memory

    # Streamed lines: seen while the cell still runs, in order, stdout and the trace apart.
    stream_cell = lab.index_of('%%hotbox hotbox/shell\nfor i in 1 2 3 4 5; do echo "line $i"')
    lab.start(stream_cell)
    early = lab.wait(lambda: (lab.prompt(stream_cell) == "[*]:" and "line 2" in (t := lab.output(stream_cell))
                              and "line 5" not in t and t), 30, "line 2 while the cell runs")
    assert "line 1" in early
    lab.wait(lambda: re.fullmatch(r"\[\d+\]:", lab.prompt(stream_cell)), 30, "the streaming cell to finish")
    cell = lab.cell(stream_cell)
    stdout = "".join(cell.locator("[data-mime-type='application/vnd.jupyter.stdout']").all_inner_texts())
    stderr = "".join(cell.locator("[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts())
    assert re.findall(r"line \d", stdout) == [f"line {i}" for i in range(1, 6)], stdout
    assert "+ echo" not in stdout and re.findall(r"\+ echo line (\d)", stderr) == list("12345"), stderr
    lab.screenshot("streamed")

    assert "285" in lab.run(lab.index_of("%%hotbox hotbox/python"))
    assert "[ 10, 20, 30 ]" in lab.run(lab.index_of("%%hotbox hotbox/node"))
    lab.run(lab.index_of("params ="))
    lab.run(lab.index_of("%%hotbox --in params --out run"))
    assert "succeeded exited" in lab.run(lab.index_of("print(run.status"))

    # The quota moved by itself: its cell was not run again.
    lab.wait(lambda: page.locator(".hotbox-quota-tasks").inner_text() != tasks_before, 10,
             "the quota's task count to change")
    assert page.locator(".hotbox-quota-cus").inner_text() != cus_before
    assert lab.prompt(quota_cell) == quota_prompt

    # A task in the background, stopped from the task monitor.
    async_cell = lab.index_of("%%hotbox hotbox/shell --async")
    lab.run(async_cell)
    view = lab.cell(async_cell).locator(".hotbox-taskview")
    lab.wait(lambda: "tick 2" in view.inner_text(), 30, "the async task's ticks")
    assert "TaskInfo(" not in lab.output(async_cell)
    lab.run(lab.index_of("%hotbox tasks"))
    monitor = page.locator(".hotbox-tasks")
    stop = monitor.locator(".hotbox-task-stop:not([disabled])")
    lab.wait(lambda: stop.count() == 1, 10, "one Stop button enabled in the monitor")
    lab.screenshot("monitor-running")
    stop.click()
    lab.wait(lambda: "cancelled" in view.locator(".hotbox-taskview-status").inner_text(), 30,
             "the task's view to say cancelled")
    lab.wait(lambda: monitor.locator("[data-state='cancelled']").count() == 1, 10, "the monitor to say cancelled")
    assert monitor.locator("[data-state='failed']").count() == 0
    monitor.locator(".hotbox-task-console").first.click()
    lab.wait(lambda: "memory limit" in monitor.locator(".hotbox-task-console-text").inner_text(), 10,
             "the first task's console")
    lab.screenshot("monitor-cancelled")

    # Failure reasons, and the monitor's states follow.
    assert "exited with code 3" in lab.run(lab.index_of("%%hotbox hotbox/shell --no-raise-error"))
    assert "timed out" in lab.run(lab.index_of("%%hotbox hotbox/shell --timeout 1"))
    assert "out of memory" in lab.run(lab.index_of("%%hotbox hotbox/python --size nano"))
    for state in ("timed out", "out of memory"):
        lab.wait(lambda s=state: monitor.locator(f"[data-state='{s}']").count() == 1, 10, f"the monitor: {state}")
    lab.screenshot("done")

    assert page.get_by_text("Loading widget").count() == 0
    assert page.get_by_text("Error displaying widget").count() == 0
    assert not lab.errors, lab.errors

    # Cleared outputs: the front end removes the views, and the kernel's live thread stops.
    lab.clear_all_outputs()
    shown = lab.run_new_cell("import threading, time\ntime.sleep(2.5)\n"
                             "print('live:', [t.name for t in threading.enumerate() if t.name == 'hotbox-live'])")
    assert "live: []" in shown, shown


@pytest.mark.parametrize("sandbox", [pytest.param("vm", marks=pytest.mark.vm), "box"])
def test_kernel_cell_streams_in_jupyterlab(server: Server, sandbox: str) -> None:
    """A cell of the Hotcell Python (vm) or Hot Box Python (box) kernel: its lines arrive while it runs,
    in order (the sandbox starts first)."""
    if sandbox not in KERNELS:
        pytest.skip(f"no {sandbox!r} kernel on this tree: the Hot Box Python kernel (issue 7) has no kernelspec "
                    "on main yet")
    lab = server.open(f"{KERNELS[sandbox]}.ipynb", 1)
    try:
        lab.start(0)
        # The first line, or the cell's end (a sandbox that cannot start ends it with the reason).
        early = lab.wait(lambda: ("guest line 2" in (t := lab.output(0)) and lab.prompt(0) == "[*]:" and t)
                         or (lab.prompt(0) != "[*]:" and "ended: " + lab.output(0)), 180,
                         "guest line 2 while the cell runs")
        assert not early.startswith("ended: "), f"the cell ended before streaming: {early}"
        assert "guest line 1" in early and "guest line 5" not in early, early
        lab.wait(lambda: re.fullmatch(r"\[\d+\]:", lab.prompt(0)), 60, "the kernel's cell to finish")
        assert re.findall(r"guest line \d", lab.output(0)) == [f"guest line {i}" for i in range(1, 6)]
        lab.screenshot(f"kernel-{sandbox}")
        assert not lab.errors, lab.errors
    finally:
        lab.page.close()
