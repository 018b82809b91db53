"""The live widgets against the real engine: the quota sees boxes billed by another process, a size
row click gives the next box that size's memory limit (read back from Docker), the task monitor's Stop
button stops a real box and says "cancelled", and no ticking thread outlives the views."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import docker
import pytest
from IPython.core.interactiveshell import InteractiveShell

from hotbox_jupyter import box
from hotbox_jupyter.models import SIZES, BoxSize, ExitReason, TaskStatus
from hotbox_jupyter.notebook.widgets import QuotaWidget, SizeTable, TaskMonitor
from hotbox_jupyter.owner import LABEL_TASK

pytestmark = [pytest.mark.docker]


def _wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or cond}")


def _container(client: docker.DockerClient, task_id: str) -> Any:
    found = client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
    return found[0] if found else None


def test_quota_updates_when_another_process_bills(shell: InteractiveShell) -> None:
    quota = shell.run_line_magic("hotbox", "quota")
    assert isinstance(quota, QuotaWidget) and quota.live
    before = quota.quota
    # A box run and billed by another process (as a kernel's sandbox would be), on the same ledger.
    code = ("from hotbox_jupyter import box; r = box.run({'image': 'hotbox/shell', 'size': 'nano', "
            "'script': 'sleep 0.5'}); print(r.status, r.cus)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert proc.returncode == 0 and proc.stdout.startswith("succeeded"), proc.stderr
    # Not re-run: the widget's own ticks pick the new numbers up.
    _wait_for(lambda: quota.quota.tasks_used == before.tasks_used + 1 and quota.quota.cus_used > before.cus_used,
              timeout=10, what="the quota widget to see the other process's box")
    assert quota.updates >= 1
    assert quota.tasks_label.value.count(f">{quota.quota.tasks_used} task") == 1
    quota.close()
    assert not quota.live


def test_size_row_click_sets_the_next_boxs_memory(shell: InteractiveShell, client: docker.DockerClient) -> None:
    table = shell.run_line_magic("hotbox", "sizes")
    assert isinstance(table, SizeTable) and table.default == "small"
    magics = shell.magics_manager.registry["HotboxMagics"]
    try:
        table._cells["medium"][1].click()  # the Memory cell of the medium row: the row is one target
        assert magics.session.size == "medium"
        res = shell.run_cell("%%hotbox hotbox/shell --async\necho up; sleep 30", store_history=False)
        task = res.result
        assert task.size is BoxSize.MEDIUM
        _wait_for(lambda: box.status(task.id) is not TaskStatus.PENDING, what="the box to start")
        assert box.status(task.id) is TaskStatus.RUNNING, box.result(task.id)
        container = _container(client, task.id)
        assert container.attrs["HostConfig"]["Memory"] == SIZES[BoxSize.MEDIUM].memory_mb * 1024 * 1024
        box.cancel(task.id, grace=0.5)
        # `%hotbox config --size` moves the highlight of the table too.
        shell.run_line_magic("hotbox", "config --size small")
        assert table.default == "small" and "hotbox-size-default" in table._cells["small"][0]._dom_classes
    finally:
        magics.session.size = "small"
        table.close()


def test_task_monitor_stop_button_cancels_a_real_box(shell: InteractiveShell, client: docker.DockerClient) -> None:
    res = shell.run_cell("%%hotbox hotbox/shell --async --size nano\necho started; sleep 60", store_history=False)
    task = res.result
    monitor = shell.run_line_magic("hotbox", "tasks")
    assert isinstance(monitor, TaskMonitor)
    try:
        _wait_for(lambda: monitor.states().get(task.id) == "running", what="the monitor to say running")
        row = monitor._rows[task.id]
        row.console.value = True
        _wait_for(lambda: "started" in monitor.console.value, what="the console to show the box's output")
        row.stop.click()
        assert box.wait(task.id, timeout=30).reason is ExitReason.CANCELLED
        _wait_for(lambda: monitor.states()[task.id] == "cancelled", timeout=10, what="the monitor to say cancelled")
        assert "data-state='cancelled'" in row.cells[3].value
        assert _container(client, task.id) is None
    finally:
        monitor.close()
