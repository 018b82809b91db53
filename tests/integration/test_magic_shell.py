"""``%%hotbox`` and ``%hotbox`` driven through a real IPython shell against the real Docker engine.

One test (or a few) per numbered point of issue #3. Output is recorded with a timestamp per write, so
streaming is judged by when text arrived, not by the final text.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from typing import Any

import docker
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from hotbox_jupyter import box
from hotbox_jupyter.errors import BoxFailedError, ConfigError, ImageDeniedError
from hotbox_jupyter.models import ExitReason, TaskInfo, TaskResult, TaskStatus
from hotbox_jupyter.notebook.render import BoxValue
from hotbox_jupyter.notebook.widgets import QuotaWidget, SizeTable, TaskMonitor, TaskView
from hotbox_jupyter.owner import LABEL_TASK

pytestmark = [pytest.mark.docker]


class Recorder(io.TextIOBase):
    """A stdout/stderr stand-in that keeps every write with the time it happened."""

    def __init__(self, on_write: Any = None) -> None:
        self.writes: list[tuple[float, str]] = []
        self.on_write = on_write

    def write(self, s: str) -> int:
        self.writes.append((time.monotonic(), s))
        if self.on_write is not None:
            self.on_write(s)
        return len(s)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(s for _, s in self.writes)


@pytest.fixture
def run(shell: InteractiveShell) -> Any:
    """Run a cell; return (ExecutionResult, stdout Recorder, stderr Recorder, displayed outputs)."""

    def _run(source: str, on_stdout: Any = None) -> tuple[Any, Recorder, Recorder, list[Any]]:
        out, err = Recorder(on_stdout), Recorder()
        with capture_output(stdout=False, stderr=False) as cap:
            old = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
            try:
                res = shell.run_cell(source, store_history=False)
            finally:
                sys.stdout, sys.stderr = old
        return res, out, err, cap.outputs

    return _run


def _containers_of(task_id: str) -> list[str]:
    client = docker.from_env()
    try:
        return [c.id for c in client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})]
    finally:
        client.close()


# 1. the extension ------------------------------------------------------------------------------------

def test_load_ext_registers_the_magics(shell: InteractiveShell) -> None:
    magics = shell.magics_manager.magics
    assert "hotbox" in magics["cell"] and "hotbox" in magics["line"]
    doc = magics["cell"]["hotbox"].__doc__
    assert "--in" in doc and "--no-raise-error" in doc and "--async" in doc


# 2. options and languages ----------------------------------------------------------------------------

def test_sh_body_runs_with_set_ex_and_options_reach_the_box(run: Any) -> None:
    res, out, err, _ = run(
        "%%hotbox hotbox/shell --size nano --env GREETING=hi --env EMPTY= --timeout 30 --memory 96\n"
        'echo "$GREETING from $(id -u)"\n'
        'cat /sys/fs/cgroup/memory/memory.limit_in_bytes\n'
        'test -z "$EMPTY" && echo empty-ok\n'
    )
    assert res.success, err.text
    assert "hi from 65534" in out.text
    assert str(96 * 1024 * 1024) in out.text
    assert "empty-ok" in out.text
    assert "+ echo" in err.text, "set -x traces each command on stderr"


def test_language_follows_the_image_and_lang_overrides(run: Any) -> None:
    res, out, err, _ = run("%%hotbox hotbox/node\nconsole.log('node says', 6 * 7)")
    assert res.success, err.text
    assert "node says 42" in out.text
    res, out, err, _ = run("%%hotbox hotbox/python --lang sh\necho shell in a python image: $0")
    assert res.success, err.text
    assert "shell in a python image" in out.text


def test_session_defaults(shell: InteractiveShell, run: Any) -> None:
    try:
        shell.run_line_magic("hotbox", "config --image hotbox/shell --size micro")
        res, out, err, _ = run("%%hotbox\necho default image")
        assert res.success, err.text
        assert "default image" in out.text
        (task,) = [t for t in box.tasks() if t.image == "hotbox/shell" and t.size.value == "micro"][-1:]
        assert task.size.value == "micro"
    finally:
        shell.run_line_magic("hotbox", "config --image hotbox/python --size small")


def test_bad_options_raise_config_error_and_start_nothing(shell: InteractiveShell, run: Any) -> None:
    before = len(box.tasks())
    for line, field in [("--size huge", "size"), ("--network lan", "network"), ("--timeout abc", "timeout"),
                        ("--env NOEQUALS", "--env"), ("--in missing_var", "--in"), ("--out 1bad", "--out")]:
        res, _, _, _ = run(f"%%hotbox hotbox/shell {line}\necho never")
        assert isinstance(res.error_in_exec, ConfigError), line
        assert field in str(res.error_in_exec), (line, str(res.error_in_exec))
    with pytest.raises(ConfigError, match="size"):
        shell.run_line_magic("hotbox", "config --size enormous")
    assert len(box.tasks()) == before


# 3. live streaming, stderr apart, flood cap ----------------------------------------------------------

def test_lines_stream_live_as_they_are_printed(run: Any) -> None:
    res, out, err, _ = run(
        "%%hotbox\nimport time, sys\n"
        "for i in range(8):\n    print(f'line {i}')\n    time.sleep(0.1)\n"
        "print('to stderr', file=sys.stderr)\n"
        "for i in range(3):\n    print(f'\\rprogress {i}', end='')\n    time.sleep(0.1)\n"
        "print()\n"
    )
    assert res.success, err.text
    times = {}
    for t, s in out.writes:
        for i in range(8):
            if f"line {i}\n" in s:
                times[i] = t
    assert sorted(times) == list(range(8)), out.text
    spread = times[7] - times[0]
    assert spread >= 0.5, f"lines arrived together ({spread:.2f}s apart): not streamed"
    gaps = [times[i + 1] - times[i] for i in range(7)]
    assert sum(g > 0.05 for g in gaps) >= 5, gaps
    assert "\rprogress 0" in out.text and "\rprogress 2" in out.text
    assert "to stderr" in err.text and "to stderr" not in out.text


def test_flood_is_capped_and_the_full_console_kept(shell: InteractiveShell, run: Any) -> None:
    shell.run_line_magic("hotbox", "config --max-output 256KB")
    try:
        t0 = time.monotonic()
        res, out, err, _ = run(
            "%%hotbox --size medium --out flood\nimport sys\n"
            "block = 'y' * 1023 + '\\n'\nfor _ in range(60 * 1024):\n    sys.stdout.write(block)\n"
            "print('THE END')\n"
        )
        elapsed = time.monotonic() - t0
        result: TaskResult = shell.user_ns["flood"]
        _, logs_out, logs_err, _ = run(f"%hotbox logs {result.id}")
    finally:
        shell.run_line_magic("hotbox", "config --max-output 2MB")
    assert res.success, err.text
    assert out.text.count("y") <= 256 * 1024
    assert "output capped at 256.0 KB" in err.text
    assert "of output hidden" in err.text and "%hotbox logs" in err.text
    assert result.ok
    assert len(result.console_output) > 1024 * 1024 or result.truncated
    full = box.logs(result.id)
    # the spool keeps the head and the tail of a 60 MB flood, and says what it dropped between them
    assert "bytes of output dropped here" in full and full.endswith("THE END\n")
    assert 16 * 1024 * 1024 <= len(full) < 60 * 1024 * 1024
    # %hotbox logs of a flood: the end of it, capped like a cell, and where the whole console is.
    assert logs_out.text.endswith("THE END\n") and len(logs_out.text) == 256 * 1024
    assert "showing its last 256.0 KB" in logs_err.text
    assert elapsed < 120


# 4. values in and out --------------------------------------------------------------------------------

def test_in_and_out_and_the_final_expression(shell: InteractiveShell, run: Any) -> None:
    shell.user_ns.update(numbers=[1, 2, 3], opts={"scale": 10})
    res, out, err, _ = run("%%hotbox --in numbers,opts --out squared\n"
                           "print('got', ctx['numbers'])\n"
                           "{'scaled': [n * ctx['opts']['scale'] for n in ctx['numbers']]}\n")
    assert res.success, err.text
    assert isinstance(res.result, BoxValue)
    assert res.result.value == {"scaled": [10, 20, 30]}
    result: TaskResult = shell.user_ns["squared"]
    assert result.status is TaskStatus.SUCCEEDED and result.exit_code == 0 and result.reason is ExitReason.EXITED
    assert "got [1, 2, 3]" in result.console_output
    assert result.result == {"scaled": [10, 20, 30]}

    res, out, err, _ = run("%%hotbox hotbox/shell --in numbers\necho \"$HOTCELL_INPUT\"")
    assert res.success, err.text
    assert '{"numbers":[1,2,3]}' in out.text

    res, out, err, _ = run("%%hotbox hotbox/node --in opts\nctx.opts.scale * 2")
    assert res.success, err.text
    assert res.result.value == 20

    shell.user_ns["handle"] = open(os.devnull)  # noqa: SIM115
    try:
        res, _, _, _ = run("%%hotbox --in handle\nctx")
        assert isinstance(res.error_in_exec, ConfigError)
        assert "handle" in str(res.error_in_exec) and "JSON" in str(res.error_in_exec)
    finally:
        shell.user_ns.pop("handle").close()


# 5. rich output ----------------------------------------------------------------------------------------

def test_figures_and_html_are_display_data(run: Any) -> None:
    res, out, err, outputs = run(
        "%%hotbox --size xlarge\nimport matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\n"
        "from IPython.display import HTML, SVG\ndisplay(HTML('<b>bold</b>'))\n"
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"4\" height=\"4\"/>'))\n"
    )
    assert res.success, err.text
    mimes = [set(o.data) for o in outputs]
    assert any("text/html" in m for m in mimes)
    assert any("image/svg+xml" in m for m in mimes)
    pngs = [o.data["image/png"] for o in outputs if "image/png" in o.data]
    assert len(pngs) == 1 and len(pngs[0]) > 1000
    assert "/tmp" not in out.text


# 6. async and the line magics ------------------------------------------------------------------------

def test_async_returns_at_once_and_streams_into_its_view(shell: InteractiveShell, run: Any) -> None:
    t0 = time.monotonic()
    res, _, err, _outputs = run("%%hotbox hotbox/shell --async --out bg\n"
                               "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.3; done")
    assert time.monotonic() - t0 < 5
    assert res.success, err.text
    task = res.result
    assert isinstance(task, TaskInfo)
    view = _view(shell, task.id)
    # The cell shows the view once, not the view and then the TaskInfo's repr.
    shown = shell.display_formatter.format(task)[0]
    assert "application/vnd.jupyter.widget-view+json" in shown and "TaskInfo(" not in shown["text/plain"]
    # Other cells run meanwhile.
    _res2, out2, _, _ = run("print('meanwhile', 1 + 1)")
    assert "meanwhile 2" in out2.text
    seen_early = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and view.state not in ("succeeded", "failed"):
        text = "".join(o.get("text", "") for o in view.output.outputs)
        if "tick 2" in text and "tick 6" not in text:
            seen_early = text
        time.sleep(0.05)
    assert view.state == "succeeded", view.detail
    assert seen_early, "output should appear in the view while the box is still running"
    text = "".join(o.get("text", "") for o in view.output.outputs)
    assert all(f"tick {i}" in text for i in range(1, 7))
    assert shell.user_ns["bg"].ok
    assert view.stop_button.disabled


def _view(shell: InteractiveShell, task_id: str) -> TaskView:
    return shell.magics_manager.registry["HotboxMagics"].views[task_id]


def test_async_stop_button_cancels(shell: InteractiveShell, run: Any) -> None:
    res, _, _err, _ = run("%%hotbox hotbox/shell --async\necho started; sleep 60")
    task = res.result
    view = _view(shell, task.id)
    deadline = time.monotonic() + 30
    while "started" not in "".join(o.get("text", "") for o in view.output.outputs):
        assert time.monotonic() < deadline, "the box never printed"
        time.sleep(0.05)
    view.stop_button.click()
    result = box.wait(task.id, timeout=30)
    assert result.reason is ExitReason.CANCELLED
    deadline = time.monotonic() + 10
    while view.state != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert view.state == "cancelled"  # a cancel is not a failure
    assert not _containers_of(task.id)


def test_line_magics(shell: InteractiveShell, run: Any) -> None:
    res, _, _, _ = run("%%hotbox hotbox/shell --out quick\necho logged-line")
    task_id = shell.user_ns["quick"].id
    shown = shell.display_formatter.format(shell.user_ns["quick"])[0]["text/plain"]
    assert shown.startswith(f"TaskResult(id={task_id!r}, status='succeeded'") and "console_output=<" in shown
    tasks = shell.run_line_magic("hotbox", "tasks")
    assert isinstance(tasks, TaskMonitor) and task_id in tasks.text()
    assert tasks.states()[task_id] == "succeeded"
    tasks.close()
    with capture_output() as cap:
        shell.run_line_magic("hotbox", f"logs {task_id}")
    assert "logged-line" in cap.stdout
    sizes = shell.run_line_magic("hotbox", "sizes")
    assert isinstance(sizes, SizeTable) and "2xlarge" in sizes.text() and "256 MB" in sizes.text()
    sizes.close()
    quota = shell.run_line_magic("hotbox", "quota")
    assert isinstance(quota, QuotaWidget) and "CUS" in quota.text()
    quota.close()

    res, _, _, _ = run("%%hotbox hotbox/shell --async\nsleep 60")
    with capture_output() as cap:
        shell.run_line_magic("hotbox", f"cancel {res.result.id}")
    assert "cancelled" in cap.stdout
    assert box.wait(res.result.id, timeout=30).reason is ExitReason.CANCELLED
    assert not _containers_of(res.result.id)


# 7. interrupt --------------------------------------------------------------------------------------------

def test_interrupt_stops_the_box_and_reports_it(shell: InteractiveShell, run: Any) -> None:
    timers: list[threading.Timer] = []

    def interrupt_once_started(text: str) -> None:
        # As a user would: the box is visibly running, then Ctrl-C (SIGINT to the process).
        if "begin" in text and not timers:
            timers.append(threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT)))
            timers[0].start()

    res, out, err, _ = run("%%hotbox hotbox/shell --out stopped\necho begin; sleep 120; echo never",
                           on_stdout=interrupt_once_started)
    assert timers, "the box never printed"
    elapsed = time.monotonic() - timers[0].interval - out.writes[0][0]
    assert isinstance(res.error_in_exec, KeyboardInterrupt)
    assert elapsed < 15, f"stopping took {elapsed:.1f}s"
    assert "begin" in out.text
    assert "interrupted" in err.text
    assert "KeyboardInterrupt: task" in out.text and "Traceback" not in out.text
    result: TaskResult = shell.user_ns["stopped"]
    assert "never" not in result.console_output
    assert result.reason is ExitReason.INTERRUPTED
    assert result.duration < 20
    assert result.cus <= result.duration * 1.0 + 0.01  # small: 1 CUS a second, for the seconds it ran
    assert not _containers_of(result.id)


# 8. failures -------------------------------------------------------------------------------------------

def test_failure_raises_with_the_reason_in_plain_words(shell: InteractiveShell, run: Any) -> None:
    res, _, err, _ = run("%%hotbox hotbox/shell --out failed\necho about to fail\nexit 3")
    exc = res.error_in_exec
    assert isinstance(exc, BoxFailedError)
    assert "3" in str(exc)
    assert exc.result.exit_code == 3
    assert exc._render_traceback_() == [f"BoxFailedError: {exc}"]  # no traceback through the magic
    # run-all stops: the next cell of a run_cell batch would not run; --no-raise-error goes on.
    res, _, err, _ = run("%%hotbox hotbox/shell --no-raise-error\nexit 4")
    assert res.success
    assert "4" in err.text


def test_python_exception_names_the_error(run: Any) -> None:
    res, _, err, _ = run("%%hotbox\ndef f():\n    raise ValueError('bad value')\nf()")
    exc = res.error_in_exec
    assert isinstance(exc, BoxFailedError)
    assert "ValueError: bad value" in str(exc)
    assert "line 3" in err.text, "the box's own traceback was shown on stderr"


def test_timeout_and_oom_are_named(run: Any) -> None:
    res, _, _, _ = run("%%hotbox hotbox/shell --timeout 2\nsleep 30")
    assert isinstance(res.error_in_exec, BoxFailedError)
    assert res.error_in_exec.result.reason is ExitReason.TIMEOUT
    assert "time" in str(res.error_in_exec).lower()
    res, _, _, _ = run("%%hotbox --memory 32 --size small\nblob = bytearray(256 * 1024 * 1024)\nlen(blob)")
    assert isinstance(res.error_in_exec, BoxFailedError)
    assert res.error_in_exec.result.reason is ExitReason.OOM
    assert "memory" in str(res.error_in_exec).lower()


def test_denied_image_is_refused_before_anything_starts(run: Any) -> None:
    before = len(box.tasks())
    res, _, err, _ = run("%%hotbox docker:dind\necho never")
    assert isinstance(res.error_in_exec, ImageDeniedError)
    assert "docker:dind" in str(res.error_in_exec)
    res, _, err, _ = run("%%hotbox docker:dind --no-raise-error\necho never")
    assert res.success and "denied" in err.text.lower()
    assert len(box.tasks()) == before
