"""The views: size table, quota, task monitor and the async task view, with their text and HTML forms.

Fed by small stand-in sources (the seam the views are built on); the real engine behind them is tried
in test_widgets_live.py and in the browser test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from hotbox_jupyter.models import SIZES, BoxSize, ExitReason, QuotaInfo, TaskInfo, TaskResult, TaskStatus
from hotbox_jupyter.notebook.widgets import (
    LiveTicker,
    QuotaWidget,
    SizeTable,
    TaskMonitor,
    TaskView,
    format_cus,
    format_duration,
    format_number,
    task_state,
)

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _task(tid: str = "box-1") -> TaskInfo:
    return TaskInfo(id=tid, stream_id=f"stream-{tid}", image="hotbox/python", size=BoxSize.SMALL,
                    created_at=datetime.now(timezone.utc))


def _result(tid: str, reason: ExitReason, code: int | None = 0) -> TaskResult:
    ok = reason is ExitReason.EXITED and code == 0
    return TaskResult(id=tid, status=TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED, exit_code=code,
                      reason=reason, message=str(reason), console_output="", duration=1.5, cus=1.5)


def _quota(cus_used: float, tasks_used: int = 1, running: int = 0, cus_limit: float | None = 50.0) -> QuotaInfo:
    return QuotaInfo(plan="team", cus_limit=cus_limit, cus_used=cus_used,
                     cus_remaining=None if cus_limit is None else max(0.0, cus_limit - cus_used),
                     tasks_limit=10, tasks_used=tasks_used, tasks_remaining=10 - tasks_used, concurrent_limit=4,
                     running=running, network_allowed=False)


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _live_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_numbers_a_person_reads() -> None:
    assert format_number(0.007756) == "0.00776"
    assert format_number(49.9922) == "50" and format_number(49.94) == "49.9"
    assert format_number(50.0) == "50"
    assert format_number(1234.5) == "1,230"
    assert format_cus(0.25) == "0.25 CUS"
    assert format_duration(12.34) == "12.3 s" and format_duration(150) == "2.5 min"


def test_task_states_are_the_truth() -> None:
    assert task_state(TaskStatus.PENDING, None) == "pending"
    assert task_state(TaskStatus.RUNNING, None) == "running"
    assert task_state(TaskStatus.SUCCEEDED, _result("a", ExitReason.EXITED)) == "succeeded"
    assert task_state(TaskStatus.FAILED, _result("a", ExitReason.EXITED, 3)) == "failed"
    assert task_state(TaskStatus.FAILED, _result("a", ExitReason.TIMEOUT, 137)) == "timed out"
    assert task_state(TaskStatus.FAILED, _result("a", ExitReason.OOM, 137)) == "out of memory"
    assert task_state(TaskStatus.FAILED, _result("a", ExitReason.CANCELLED, 143)) == "cancelled"
    assert task_state(TaskStatus.FAILED, _result("a", ExitReason.INTERRUPTED, 130)) == "cancelled"


def test_size_table_seed_columns_default_click_and_cost() -> None:
    chosen: list[str] = []
    table = SizeTable(list(SIZES.values()), default="small", on_select=chosen.append, run_minutes=10)
    text = table.text()
    assert text.splitlines()[0].split() == ["Size", "Memory", "CPU", "Tmp", "Disk", "Timeout", "CUS", "Multiplier",
                                            "Cost", "of", "10", "min"]
    assert "small *  256 MB  25%   128 MB  1 GB    60s      1x              600 CUS" in text
    assert "4xlarge  8 GB    100%  4 GB    50 GB   7200s    32x             19,200 CUS" in text
    bundle = table._repr_mimebundle_()
    assert WIDGET_MIME in bundle and bundle["text/plain"] == text
    assert "<table" in bundle["text/html"] and "font-weight:bold'><td" in bundle["text/html"]
    # A row is clickable as a whole: every cell of it is a button that selects its size.
    medium = table._cells["medium"]
    medium[3].click()
    assert chosen == ["medium"] and table.default == "medium"
    assert all("hotbox-size-default" in b._dom_classes for b in medium)
    assert not any("hotbox-size-default" in b._dom_classes for b in table._cells["small"])
    table.run_length.value = 1.0
    assert table.rows()[0][-1] == "15 CUS"  # nano: 60 s x 0.25
    assert "isolation tiers: not reported" in table.text()
    table.close()
    tiers = SizeTable(list(SIZES.values()), tiers=[("container", True, "Docker"), ("microvm", False, "no KVM")])
    assert "container available (Docker); microvm not available (no KVM)" in tiers.text()
    tiers.close()


def test_quota_widget_is_live_and_warns_before_the_limit() -> None:
    values = [_quota(0.007756)]
    ticker = LiveTicker(interval=0.02, name="hotbox-live-test")
    view = QuotaWidget(lambda: values[-1], ticker=ticker)
    assert view.text().splitlines()[1:] == ["cus: 0.00776 CUS of 50 CUS used, 50 CUS left",
                                            "tasks: 1 task of 10 tasks used, 9 tasks left",
                                            "running: 0 of 4 running"]
    assert "network not allowed, all 8 sizes (nano to 4xlarge)" in view.text()
    assert view.cus_bar.bar_style == "info" and view.live and _live_threads("hotbox-live-test")
    values.append(_quota(41.0, tasks_used=2, running=1).model_copy(update={"cus_running": 0.123456}))
    assert _wait_for(lambda: view.quota.cus_used == 41.0)
    assert "cus: 41 CUS of 50 CUS used, 9 CUS left; ≈ 0.123 CUS accruing" in view.text()
    assert view.levels()["cus"] == "warning" and view.cus_bar.bar_style == "warning"
    assert "hotbox-level-warning" in view.cus_label._dom_classes
    values.append(_quota(50.0, tasks_used=3))
    assert _wait_for(lambda: view.levels()["cus"] == "error")
    assert view.cus_bar.bar_style == "danger" and "(limit reached)" in view.text()
    assert "<li" in view._repr_mimebundle_()["text/html"]
    # The front end removed its last view (output cleared): no more refreshes, and the thread ends.
    view._view_count = 1
    view._view_count = 0
    assert not view.live
    assert _wait_for(lambda: not _live_threads("hotbox-live-test"))
    updates = view.updates
    values.append(_quota(1.0))
    time.sleep(0.1)
    assert view.updates == updates
    view.close()
    unlimited = QuotaWidget(lambda: _quota(3.0, cus_limit=None), ticker=None)
    assert "cus: 3 CUS used (no limit)" in unlimited.text()
    unlimited.close()


def test_closing_the_last_live_view_ends_the_thread() -> None:
    ticker = LiveTicker(interval=0.02, name="hotbox-live-close")
    views = [QuotaWidget(lambda: _quota(1.0), ticker=ticker) for _ in range(2)]
    assert len(_live_threads("hotbox-live-close")) == 1  # one thread for every live view
    views[0].close()
    time.sleep(0.1)
    assert _live_threads("hotbox-live-close")
    views[1].close()
    assert _wait_for(lambda: not _live_threads("hotbox-live-close"))


class _Source:
    """A stand-in engine: two tasks, one running (cancel ends it as cancelled), one that failed."""

    def __init__(self) -> None:
        self.infos = [_task("box-run"), _task("box-bad")]
        self.results: dict[str, TaskResult] = {"box-bad": _result("box-bad", ExitReason.EXITED, 3)}
        self.cancelled: list[str] = []

    def tasks(self) -> list[TaskInfo]:
        return list(self.infos)

    def status(self, task_id: str) -> TaskStatus:
        r = self.results.get(task_id)
        return r.status if r else TaskStatus.RUNNING

    def result(self, task_id: str) -> TaskResult | None:
        return self.results.get(task_id)

    def cancel(self, task_id: str) -> None:
        self.cancelled.append(task_id)
        self.results[task_id] = _result(task_id, ExitReason.CANCELLED, 143)

    def logs(self, task_id: str) -> str:
        return f"console of {task_id}\n<b>not html</b>\n"


def test_task_monitor_states_stop_and_console() -> None:
    source = _Source()
    ticker = LiveTicker(interval=0.02, name="hotbox-live-monitor")
    monitor = TaskMonitor(source, ticker=ticker)
    assert monitor.states() == {"box-run": "running", "box-bad": "failed"}
    run = monitor._rows["box-run"]
    assert not run.stop.disabled and monitor._rows["box-bad"].stop.disabled
    run.console.value = True
    assert "console of box-run" in monitor.console.value and "&lt;b&gt;" in monitor.console.value
    monitor._rows["box-bad"].console.value = True  # another console: shown instead, the first button off
    assert "console of box-bad" in monitor.console.value and not run.console.value
    monitor._rows["box-bad"].console.value = False
    assert monitor.console.value == ""
    run.console.value = True
    run.stop.click()
    assert _wait_for(lambda: monitor.states()["box-run"] == "cancelled")
    assert source.cancelled == ["box-run"]
    assert "data-state='cancelled'" in run.cells[3].value and "#5f6368" in run.cells[3].value  # grey, not red
    source.infos.append(_task("box-new"))
    assert _wait_for(lambda: "box-new" in monitor.states())
    lines = {line.split()[0]: line.split() for line in monitor.text().splitlines()[2:]}
    assert lines["box-bad"] == ["box-bad", "hotbox/python", "small", "failed", "1.5", "s", "1.5", "CUS"]
    assert lines["box-run"][3] == "cancelled" and lines["box-new"][3] == "running"
    assert "<table" in monitor._repr_mimebundle_()["text/html"]
    monitor.close()
    assert _wait_for(lambda: not _live_threads("hotbox-live-monitor"))


@pytest.mark.parametrize(("reason", "code", "state"), [(ExitReason.CANCELLED, 143, "cancelled"),
                                                       (ExitReason.EXITED, 1, "failed"),
                                                       (ExitReason.OOM, 137, "out of memory")])
def test_task_view_status_stop_and_finish(reason: ExitReason, code: int, state: str) -> None:
    view = TaskView(_task())
    assert view.state == "pending" and "box-1" in view.status.value
    stopped = []
    view.on_stop(lambda: stopped.append(True))
    view.stop_button.click()
    assert stopped == [True] and view.state == "stopping" and view.stop_button.disabled
    view.finished(_result("box-1", reason, code))
    assert view.state == state and "(1.5 s, 1.5 CUS)" in view.detail
    bundle = view._repr_mimebundle_()
    assert bundle["text/plain"].startswith(f"task box-1 hotbox/python (small): {state} ")
    assert "text/html" in bundle
    view.close()
