"""The views: sizes table, quota, task list and the async task view, with their plain-text forms."""

from __future__ import annotations

from datetime import datetime, timezone

from hotbox_jupyter.models import SIZES, BoxSize, ExitReason, QuotaInfo, TaskInfo, TaskResult, TaskStatus
from hotbox_jupyter.notebook.widgets import QuotaView, SizesTable, TasksTable, TaskView

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _task() -> TaskInfo:
    return TaskInfo(id="box-1", stream_id="stream-1", image="hotbox/python", size=BoxSize.SMALL,
                    created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))


def test_sizes_table_is_the_seeds_table() -> None:
    table = SizesTable(list(SIZES.values()))
    text = table.text()
    assert text.splitlines()[0].split() == ["Size", "Memory", "CPU", "Tmp", "Disk", "Timeout", "CUS", "Multiplier"]
    assert "small    256 MB  25%   128 MB  1 GB    60s      1x" in text
    assert "4xlarge  8 GB    100%  4 GB    50 GB   7200s    32x" in text
    bundle = table._repr_mimebundle_()
    assert bundle["text/plain"] == text and WIDGET_MIME in bundle
    assert "<table" in table.value and "2xlarge" in table.value
    table.close()


def test_quota_view_with_and_without_limits() -> None:
    limited = QuotaInfo(plan="team", cus_limit=100.0, cus_used=25.5, cus_remaining=74.5, tasks_limit=10,
                        tasks_used=10, tasks_remaining=0, concurrent_limit=4, running=1, network_allowed=False)
    view = QuotaView(limited)
    assert view.text().splitlines() == [
        "plan team: 1/4 running, network not allowed",
        "CUS: 25.5 of 100 used, 74.5 left",
        "tasks: 10 of 10 used, 0 left",
    ]
    bars = [c.children[0] for c in view.children[1:]]
    assert [b.value for b in bars] == [25.5, 10.0]
    assert bars[1].bar_style == "danger"
    view.close()
    free = QuotaInfo(plan="dev", cus_limit=None, cus_used=3.0, cus_remaining=None, tasks_limit=None, tasks_used=2,
                     tasks_remaining=None, concurrent_limit=8, running=0, network_allowed=True)
    assert "CUS: 3 used (unlimited)" in QuotaView(free).text()


def test_tasks_table() -> None:
    table = TasksTable([_task()], {"box-1": TaskStatus.RUNNING})
    assert "box-1  hotbox/python  small  running  2026-01-02 03:04:05" in repr(table)
    assert "<td" in table._repr_html_()
    assert repr(TasksTable([])) == "no tasks"


def test_task_view_status_stop_and_finish() -> None:
    view = TaskView(_task())
    assert view.state == "pending" and "box-1" in view.status.value
    stopped = []
    view.on_stop(lambda: stopped.append(True))
    view.stop_button.click()
    assert stopped == [True] and view.state == "stopping" and view.stop_button.disabled
    view.finished(TaskResult(id="box-1", status=TaskStatus.FAILED, exit_code=143, reason=ExitReason.CANCELLED,
                             message="cancelled", console_output="", duration=1.5, cus=1.5))
    assert view.state == "failed" and "cancelled (1.5s, 1.5 CUS)" in view.detail
    text = view._repr_mimebundle_()["text/plain"]
    assert text == "task box-1 hotbox/python (small): failed cancelled (1.5s, 1.5 CUS)"
    view.close()
