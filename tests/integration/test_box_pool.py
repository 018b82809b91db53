"""Warm pools on the real engine: a pooled box is a cold box that started early, used once, billed from hand-out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import box_support
import docker
import pytest
from box_support import PYTHON, SHELL, containers, hot_toml, hotbox_home, run
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from hotbox_jupyter import box
from hotbox_jupyter.box.billing import Ledger
from hotbox_jupyter.box.manager import TaskManager
from hotbox_jupyter.box.pools import LABEL_POOL, PYTHON_CELL
from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.owner import LABEL_OWNER_PID
from hotbox_jupyter.settings import load_settings

pytestmark = pytest.mark.docker
images, project = box_support.images, box_support.project  # fixtures

# What a box tells about itself: who it is, what it may do, where it can write, its memory limit, and
# its first process (the waiter's name there is how a test knows the box came from a pool).
PROBE = ("id -u; id -g; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ls /sys/class/net; "
         "touch /etc/x 2>&1 || true; cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
         "echo 'PID 1:'; tr '\\0' ' ' < /proc/1/cmdline")


@pytest.fixture
def client() -> docker.DockerClient:
    c = docker.from_env()
    yield c
    c.close()


def _pool_on(project: Path, *, size: int = 1, max_total: int = 4, max_concurrent: int = 8) -> None:
    hot_toml(project, f"[hot.pool]\nenabled = true\nsize = {size}\nmax_total = {max_total}\n"
                      f"[hot.plan]\nmax_concurrent = {max_concurrent}\n")


def _warm_containers(client: docker.DockerClient) -> list[str]:
    """Warm boxes of this process that are still waiting (their task has not given them a command)."""
    found = client.api.containers(all=True, filters={"label": [LABEL_POOL, f"{LABEL_OWNER_PID}={os.getpid()}"]})
    return [c["Id"] for c in found if "wait.sh" in c["Command"] or "pool_waiter" in c["Command"]]


def _lines_but_first_process(text: str) -> list[str]:
    return text.split("PID 1:")[0].strip().splitlines()


@pytest.mark.parametrize("writable", [False, True])
def test_pooled_box_has_the_security_model_and_limits_of_a_cold_one(project: Path, writable: bool) -> None:
    conf = {"image": SHELL, "size": "micro", "script": PROBE, "writable": writable}
    cold = run(conf)
    _pool_on(project)
    assert box.warm(conf, wait=60) == 1
    warm = run(conf)
    assert cold.ok and warm.ok, (cold, warm)
    assert "/opt/hotbox/pool/wait.sh" in warm.stdout.split("PID 1:")[1], warm.stdout  # it came from the pool
    assert "wait.sh" not in cold.stdout
    # uid/gid 65534, no capabilities, no-new-privileges, only lo, read-only root, 128 MB: as cold, line for line
    assert _lines_but_first_process(warm.stdout) == _lines_but_first_process(cold.stdout)
    lines = _lines_but_first_process(warm.stdout)
    assert "lo" in lines and str(128 * 1024 * 1024) in lines
    if writable:  # root with the reduced capability set, and a root filesystem it may write
        assert lines[:2] == ["0", "0"] and "CapEff:\t00000000000004fb" in lines
        assert "Read-only file system" not in warm.stdout
    else:
        assert lines[:2] == ["65534", "65534"] and "CapEff:\t0000000000000000" in lines
        assert "Read-only file system" in warm.stdout


def test_pooled_python_cell_runs_in_the_waiting_interpreter(project: Path) -> None:
    _pool_on(project)
    conf = {"image": PYTHON, "size": "nano", "cmd": PYTHON_CELL,
            "env": {"PYTHONUNBUFFERED": "1", "GREETING": "it's\nme"}}
    box.warm(conf, wait=60)
    code = b"import os, sys\nprint(os.environ['GREETING'], os.getuid(), sys.argv)\n{'answer': 6 * 7}"
    result = run(conf, stdin=code)
    assert result.ok, result
    assert result.stdout.startswith("it's\nme 65534 ['/opt/hotbox/python/cell.py']"), result.stdout
    assert result.result == {"answer": 42}
    # A failing cell fails the same way it does cold: traceback, exit code 1.
    failed = run(conf, stdin=b"1/0")
    assert failed.exit_code == 1 and "ZeroDivisionError" in failed.stderr


def test_pooled_box_is_used_once_destroyed_after_and_refilled(project: Path, client: docker.DockerClient) -> None:
    _pool_on(project, size=2)
    conf = {"image": SHELL, "size": "nano", "cmd": ["cat"]}
    assert box.warm(conf, wait=60) >= 1
    seen: set[str] = set()
    for i in range(3):
        box.warm(conf, wait=60)
        info = box.start(conf, stdin=f"job {i}".encode())
        result = box.wait(info.id, timeout=60)
        assert result.ok and result.stdout == f"job {i}", result  # stdin after the job is the program's
        assert info.id not in seen
        seen.add(info.id)
        assert containers(client, task_id=info.id) == [], "a used warm box must be removed"
        assert not (hotbox_home() / "state" / "tasks" / info.id / "disk").exists()  # its /data disk is gone too
    deadline = time.monotonic() + 60
    while box.pool()["pools"][0]["ready"] < 2:
        assert time.monotonic() < deadline, box.pool()
        time.sleep(0.1)
    assert len(_warm_containers(client)) == 2
    box._reset_for_tests()  # closing the manager destroys its warm boxes
    assert _warm_containers(client) == []


def test_pools_stay_within_their_bounds_and_the_plans_concurrency(project: Path, client: docker.DockerClient) -> None:
    # 3 pools of 2 would be 6 boxes; max_total 4 and max_concurrent 3 allow 3.
    _pool_on(project, size=2, max_total=4, max_concurrent=3)
    confs = [{"image": SHELL, "size": size, "cmd": ["true"]} for size in ("nano", "micro", "small")]
    for conf in confs:
        box.warm(conf)
    deadline = time.monotonic() + 60
    while sum(p["ready"] for p in box.pool()["pools"]) < 3:
        assert time.monotonic() < deadline, box.pool()
        time.sleep(0.1)
    time.sleep(1)  # give the fillers the chance to overshoot
    assert sum(p["ready"] + p["filling"] for p in box.pool()["pools"]) == 3
    assert len(_warm_containers(client)) == 3
    # A cold box of another kind takes a slot: a warm box gives it back.
    long = box.start({"image": PYTHON, "size": "nano", "cmd": ["sleep", "30"]})
    try:
        box_support.wait_running(long.id)
        deadline = time.monotonic() + 30
        while len(_warm_containers(client)) > 2:
            assert time.monotonic() < deadline, box.pool()
            time.sleep(0.1)
        time.sleep(1)  # and no pool, the new one of this cold box included, takes it back
        assert sum(p["ready"] + p["filling"] for p in box.pool()["pools"]) == 2
        assert len(_warm_containers(client)) == 2
    finally:
        box.cancel(long.id, grace=0)


def test_billing_starts_when_a_cell_gets_the_box(project: Path) -> None:
    _pool_on(project)
    conf = {"image": SHELL, "size": "nano", "script": "sleep 0.5"}
    box.warm(conf, wait=60)
    time.sleep(3)  # the box waits, unbilled
    info = box.start(conf)
    result = box.wait(info.id, timeout=60)
    assert result.ok, result
    row = Ledger(box.settings().ledger_path).row(info.id)
    assert row is not None and row.seconds is not None
    assert 0.5 <= row.seconds < 3.0, row  # the cell's time: with the 3 s the box waited it would be 3.5 s
    assert result.cus == pytest.approx(row.seconds * 0.25, rel=1e-2)  # nano bills 0.25 CUS per second
    assert box.quota().running == 0


_CRASHER = """
import os, sys, time
os.chdir(sys.argv[1])
from hotbox_jupyter import box
box.warm({"image": "hotbox/shell", "size": "nano", "cmd": ["true"]}, wait=60)
print("warm", flush=True)
time.sleep(600)
"""


def test_a_crashed_process_leaves_only_what_the_reaper_finds(project: Path, client: docker.DockerClient) -> None:
    _pool_on(project, size=2)
    child = subprocess.Popen([sys.executable, "-c", _CRASHER, str(project)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert child.stdout is not None and child.stdout.readline() == b"warm\n"
        time.sleep(1)  # let the second box be made as well
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    left = client.containers.list(all=True, filters={"label": [LABEL_POOL, f"{LABEL_OWNER_PID}={child.pid}"]})
    assert left, "the child made warm boxes"
    dirs = [d for d in (hotbox_home() / "state" / "tasks").iterdir()
            if json.loads((d / "owner.json").read_text())["pid"] == child.pid]
    assert dirs

    async def reap() -> None:
        manager = TaskManager(load_settings())
        async with anyio.create_task_group() as tg:
            await tg.start(manager.serve)  # serving starts with reaping what dead owners left
            await manager.close()

    anyio.run(reap)
    assert client.containers.list(all=True, filters={"label": f"{LABEL_OWNER_PID}={child.pid}"}) == []
    assert not any(d.exists() for d in dirs)


def test_pools_are_off_unless_turned_on(project: Path, client: docker.DockerClient) -> None:
    assert box.pool()["enabled"] is False
    assert run({"image": SHELL, "size": "nano", "cmd": ["true"]}).ok
    time.sleep(0.5)
    assert _warm_containers(client) == [] and box.pool()["pools"] == []
    box.pool(enabled=True, size=1)  # what %hotbox config --pool 1 does
    assert box.warm({"image": SHELL, "size": "nano", "cmd": ["true"]}, wait=60) == 1
    box.pool(enabled=False)
    deadline = time.monotonic() + 30
    while _warm_containers(client):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_hotbox_config_pool_turns_warm_cells_on_for_the_magic(project: Path, shell: InteractiveShell) -> None:
    probe = "%%hotbox hotbox/python --size nano\nimport sys\nprint('in the warm interpreter:', 'cell' in sys.modules)"
    with capture_output() as cold:
        shell.run_cell(probe)
    assert "in the warm interpreter: False" in cold.stdout, cold.stdout + cold.stderr
    try:
        with capture_output() as said:
            shell.run_line_magic("hotbox", "config --pool 1")
        assert "pool: on, 1 warm boxes per kind of cell" in said.stdout
        conf = {"image": "hotbox/python", "size": "nano", "cmd": PYTHON_CELL, "env": {"PYTHONUNBUFFERED": "1"}}
        assert box.warm(conf, wait=60) == 1  # the pool of that cell's kind, filling since the cold cell ran
        with capture_output() as warm:
            shell.run_cell(probe)
        assert "in the warm interpreter: True" in warm.stdout, warm.stdout + warm.stderr
        with pytest.raises(ConfigError, match="--pool"):
            shell.run_line_magic("hotbox", "config --pool lots")
    finally:
        shell.run_line_magic("hotbox", "config --pool off")
    assert box.pool()["enabled"] is False


def test_a_warm_box_that_died_while_waiting_is_not_handed_out(project: Path, client: docker.DockerClient) -> None:
    _pool_on(project)
    conf = {"image": SHELL, "size": "nano", "cmd": ["echo", "fine"]}
    box.warm(conf, wait=60)
    (cid,) = _warm_containers(client)
    client.api.kill(cid)
    client.api.wait(cid, timeout=30)
    result = run(conf)
    assert result.ok and result.stdout == "fine\n", result
    deadline = time.monotonic() + 30
    while client.api.containers(all=True, filters={"id": cid}):
        assert time.monotonic() < deadline, "the dead warm box was not removed"
        time.sleep(0.1)
