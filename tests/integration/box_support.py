"""Shared helpers of the Hot Box engine tests (tests/integration/test_box_*.py).

Each test gets its own project (a fresh working directory, so its own hot:// storage, ledger rows
and hot.toml) and a fresh TaskManager; the session's HOTBOX_HOME comes from tests/conftest.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from hotbox_jupyter import box
from hotbox_jupyter.box.images import ensure_image
from hotbox_jupyter.box.storage import ProjectStorage
from hotbox_jupyter.models import BoxConf, TaskResult, TaskStatus
from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_PROJECT, LABEL_TASK

SHELL = "hotbox/shell"
PYTHON = "hotbox/python"
NODE = "hotbox/node"


@pytest.fixture(scope="module")
def images() -> None:
    """The local images the tests run (built from Debian packages if missing, as setup.sh does)."""
    c = docker.from_env()
    try:
        for ref in (SHELL, PYTHON, NODE):
            ensure_image(c, ref, build_missing=True)
    finally:
        c.close()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: None) -> Iterator[Path]:
    """A fresh project directory as the working directory, and a fresh task manager reading it."""
    proj = tmp_path / "project"
    proj.mkdir()
    monkeypatch.chdir(proj)
    monkeypatch.delenv("HOT_BOX_ENABLED", raising=False)
    box._reset_for_tests()
    yield proj
    storage_dir = box.settings().storage_dir
    box._reset_for_tests()
    ProjectStorage(storage_dir).unmount()  # its hot:// disk: mounted on first use and left mounted by design


def hot_toml(project: Path, text: str) -> None:
    """Write the project's hot.toml and make the facade read it."""
    (project / "hot.toml").write_text(text)
    box._reset_for_tests()


def run(conf: BoxConf | dict[str, Any], *, stdin: bytes | None = None, timeout: float = 120) -> TaskResult:
    """start + wait, with a bound so a hung box fails the test instead of the 300 s guard."""
    info = box.start(conf, stdin=stdin)
    return box.wait(info.id, timeout=timeout)


def wait_running(task_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while box.status(task_id) is TaskStatus.PENDING:
        assert time.monotonic() < deadline, f"task {task_id} did not start within {timeout} s"
        time.sleep(0.02)


def containers(client: docker.DockerClient, *, task_id: str | None = None, project_id: str | None = None) -> list[Any]:
    """Containers hotbox labelled, of one task or one project, in any state."""
    labels = [LABEL_MANAGED]
    if task_id:
        labels.append(f"{LABEL_TASK}={task_id}")
    if project_id:
        labels.append(f"{LABEL_PROJECT}={project_id}")
    return list(client.containers.list(all=True, filters={"label": labels}))


def mounts_under(path: Path) -> list[str]:
    """Mount points below ``path`` (a /data disk left mounted would show here)."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def hotbox_home() -> Path:
    return Path(os.environ["HOTBOX_HOME"])
