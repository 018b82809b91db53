"""Refusals before anything starts (config, denylist, quota, disabled, no engine) and reaping of the
boxes of a process that died, on the real Docker engine."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import box_support
import docker
import pytest
from box_support import SHELL, containers, hot_toml, hotbox_home, mounts_under, run, wait_running

from hotbox_jupyter import ExitReason, box
from hotbox_jupyter.box.billing import Ledger
from hotbox_jupyter.errors import (
    BoxDisabledError,
    ConfigError,
    EngineUnavailableError,
    ImageDeniedError,
    QuotaExceededError,
)
from hotbox_jupyter.owner import LABEL_TASK

pytestmark = pytest.mark.docker
images, project = box_support.images, box_support.project  # fixtures


def _nothing_started(client: docker.DockerClient) -> None:
    """No container and no ledger row for the current project."""
    s = box.settings()
    assert containers(client, project_id=s.project.id) == []
    assert box.quota().tasks_used == 0
    assert box.tasks() == []


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("conf", "field", "words"), [
    ({"image": SHELL, "size": "huge"}, "size", "nano, micro, small, medium, large, xlarge, 2xlarge, 4xlarge"),
    ({"image": SHELL, "timeout": 90000}, "timeout", "1..86400"),
    ({"image": SHELL, "network": "host"}, "network", "'internet'"),
    ({"image": SHELL, "tmp-size": 0}, "tmp_size", "1..1048576"),
    ({"image": SHELL, "script": "true", "cmd": ["true"]}, "(input)", "mutually exclusive"),
    ({"image": SHELL, "bogus": 1}, "bogus", "unknown field"),
    ({"image": " "}, "image", "non-empty"),
])
def test_bad_config_names_field_value_and_allowed(project: Path, client: docker.DockerClient, conf: dict[str, object],
                                                  field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        box.start(conf)
    assert words in str(err.value)
    assert any(p[0] == field or p[0].replace("-", "_") == field for p in err.value.problems), err.value.problems
    _nothing_started(client)


def test_bad_arguments_are_config_errors(project: Path, client: docker.DockerClient) -> None:
    with pytest.raises(ConfigError, match="BoxConf"):
        box.start("hotbox/shell")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="stdin"):
        box.start({"image": SHELL}, stdin="text")  # type: ignore[arg-type]
    _nothing_started(client)


# -- image policy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("image", ["docker:dind", "docker.io/library/docker:24-cli", "rancher/k3s:latest",
                                   "docker"])
def test_denied_image_is_refused_before_anything_happens(project: Path, client: docker.DockerClient,
                                                         image: str) -> None:
    images_before = {i.id for i in client.images.list()}
    with pytest.raises(ImageDeniedError, match="denied by the image policy"):
        box.start({"image": image, "cmd": ["true"]})
    _nothing_started(client)
    assert {i.id for i in client.images.list()} == images_before  # nothing pulled


# -- quota ----------------------------------------------------------------------------------------

def test_cus_quota_used_up(project: Path, client: docker.DockerClient) -> None:
    hot_toml(project, "[hot.plan]\nname = 'tiny'\ncus_limit = 0\n")
    with pytest.raises(QuotaExceededError, match=r"CUS quota of plan 'tiny' is used up"):
        box.start({"image": SHELL, "cmd": ["true"]})
    _nothing_started(client)
    q = box.quota()
    assert q.plan == "tiny" and q.cus_limit == 0 and q.cus_remaining == 0


def test_task_quota(project: Path, client: docker.DockerClient) -> None:
    hot_toml(project, "[hot.plan]\nmax_tasks = 1\n")
    assert run({"image": SHELL, "cmd": ["true"], "size": "micro"}).ok
    assert box.quota().tasks_remaining == 0
    with pytest.raises(QuotaExceededError, match=r"1 of 1 tasks"):
        box.start({"image": SHELL, "cmd": ["true"]})
    assert len(box.tasks()) == 1


def test_concurrency_quota(project: Path, client: docker.DockerClient) -> None:
    hot_toml(project, "[hot.plan]\nmax_concurrent = 1\n")
    first = box.start({"image": SHELL, "cmd": ["sleep", "30"], "size": "micro"})
    wait_running(first.id)
    assert box.quota().running == 1
    with pytest.raises(QuotaExceededError, match="1 boxes at once"):
        box.start({"image": SHELL, "cmd": ["true"]})
    assert len(containers(client, project_id=box.settings().project.id)) == 1
    box.cancel(first.id, grace=0.5)
    assert run({"image": SHELL, "cmd": ["true"], "size": "micro"}).ok


def test_network_forbidden_by_plan(project: Path, client: docker.DockerClient) -> None:
    hot_toml(project, "[hot.plan]\nnetwork = false\n")
    with pytest.raises(QuotaExceededError, match="network='internet' is not allowed"):
        box.start({"image": SHELL, "cmd": ["true"], "network": "internet"})
    _nothing_started(client)
    assert box.quota().network_allowed is False
    assert run({"image": SHELL, "cmd": ["true"], "size": "micro"}).ok


# -- enabled / engine -----------------------------------------------------------------------------

def test_disabled_by_environment(project: Path, client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOT_BOX_ENABLED", "false")
    box._reset_for_tests()
    assert box.enabled() is False
    with pytest.raises(BoxDisabledError, match="HOT_BOX_ENABLED"):
        box.start({"image": SHELL, "cmd": ["true"]})
    _nothing_started(client)


def test_disabled_by_project_config(project: Path, client: docker.DockerClient) -> None:
    hot_toml(project, "[hot.box]\nenabled = false\n")
    assert box.enabled() is False
    with pytest.raises(BoxDisabledError, match=r"hot\.toml"):
        box.start({"image": SHELL, "cmd": ["true"]})
    _nothing_started(client)


def test_engine_unavailable_warns_once_and_says_how_to_fix(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{project}/no-docker.sock")
    box._reset_for_tests()
    with caplog.at_level(logging.WARNING, logger="hotbox_jupyter"):
        for _ in range(2):
            with pytest.raises(EngineUnavailableError) as err:
                box.start({"image": SHELL, "cmd": ["true"]})
            assert "scripts/setup.sh" in str(err.value) and "Docker Desktop" in str(err.value)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Docker engine" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert box.quota().tasks_used == 0
    assert box.enabled() is True  # configuration questions still work without an engine



def test_disabled_box_does_not_warn_about_a_missing_engine(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{project}/no-docker.sock")
    monkeypatch.setenv("HOT_BOX_ENABLED", "false")
    box._reset_for_tests()
    with caplog.at_level(logging.WARNING, logger="hotbox_jupyter"), pytest.raises(BoxDisabledError):
        box.start({"image": SHELL, "cmd": ["true"]})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

# -- leaks ----------------------------------------------------------------------------------------

_ORPHAN = """
import sys, time
from hotbox_jupyter import box
info = box.start({"image": "hotbox/shell", "cmd": ["sleep", "300"], "size": "micro"})
while box.status(info.id).value == "pending":
    time.sleep(0.02)
print(info.id, flush=True)
time.sleep(600)
"""


def test_boxes_of_a_killed_process_are_reaped(project: Path, client: docker.DockerClient) -> None:
    with subprocess.Popen([sys.executable, "-c", _ORPHAN], cwd=project, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            task_id = proc.stdout.readline().strip()
            assert task_id.startswith("box-"), task_id
            (orphan,) = containers(client, task_id=task_id)
            assert orphan.status == "running"
            task_dir = hotbox_home() / "state" / "tasks" / task_id
            assert mounts_under(task_dir), "the orphan's /data disk is mounted"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.2)
    assert len(containers(client, task_id=task_id)) == 1, "a SIGKILLed process cannot clean up"
    # the next manager to start (here: this process's) reaps what the dead process left
    box._reset_for_tests()
    box.tasks()
    assert containers(client, task_id=task_id) == []
    assert mounts_under(task_dir) == [] and not task_dir.exists()
    spare_root = hotbox_home() / "state" / "spare"
    spares = [json.loads((d / "owner.json").read_text()).get("pid") for d in spare_root.iterdir()
              if (d / "owner.json").exists()]
    assert proc.pid not in spares
    row = Ledger(box.settings().ledger_path).row(task_id)
    assert row is not None and row.reason == "error" and row.seconds is not None and row.seconds < 120


def test_running_boxes_are_cancelled_at_exit(project: Path, client: docker.DockerClient) -> None:
    code = ("from hotbox_jupyter import box\n"
            "info = box.start({'image': 'hotbox/shell', 'cmd': ['sleep', '300'], 'size': 'micro'})\n"
            "import time\nwhile box.status(info.id).value == 'pending': time.sleep(0.02)\n"
            "print(info.id, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=60)
    task_id = out.stdout.strip()
    assert task_id.startswith("box-"), out.stderr
    assert client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"}) == []
    assert mounts_under(hotbox_home() / "state" / "tasks" / task_id) == []
    row = Ledger(box.settings().ledger_path).row(task_id)
    assert row is not None and row.reason == ExitReason.CANCELLED.value
