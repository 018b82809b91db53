"""One real 3-engine swarm per test session (tests/swarm/cluster.py), and a project that runs its boxes there.

The lab is started the first time a swarm test asks for it and removed at the end of the session —
also when a test failed — after checking that the tests left no service and no container behind.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from cluster import SwarmLab

from hotbox_jupyter import box
from hotbox_jupyter.box.images import ensure_image
from hotbox_jupyter.owner import LABEL_MANAGED

# Only what the tests run: the shell image (50 MB; perl-base and coreutils are enough for the attacks).
# Copying hotbox/python (370 MB) in as well would cost about a minute of the test budget.
IMAGES = ("hotbox/shell",)


@pytest.fixture(scope="session")
def lab() -> Iterator[SwarmLab]:
    if os.geteuid() != 0 or shutil.which("nsenter") is None or shutil.which("dockerd") is None:
        pytest.fail("the swarm tests need root, nsenter and dockerd (scripts/setup.sh installs them)")
    local = docker.from_env()
    try:
        for ref in IMAGES:
            ensure_image(local, ref, build_missing=True)
    finally:
        local.close()
    lab = SwarmLab().start(images=IMAGES)
    try:
        yield lab
        leftovers = _leftovers(lab)
    finally:
        lab.close()
    assert not leftovers, f"the swarm tests left these behind: {leftovers}"


def _leftovers(lab: SwarmLab, timeout: float = 30) -> list[str]:
    """Hotbox services on the manager and containers on any node, once their removal had time to finish."""
    deadline = time.monotonic() + timeout
    while True:
        found = [f"service {s}" for s in lab.manager.docker("service", "ls", "-q", "--filter",
                                                            f"label={LABEL_MANAGED}").split()]
        for node in lab.nodes:
            found += [f"container {c} on {node.name}" for c in node.docker("ps", "-aq", check=False).split()]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture
def swarm_project(lab: SwarmLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh project whose boxes run on the lab's swarm (configured through the environment)."""
    proj = tmp_path / "project"
    proj.mkdir()
    monkeypatch.chdir(proj)
    monkeypatch.delenv("HOT_BOX_ENABLED", raising=False)
    monkeypatch.setenv("HOTBOX_ENGINE", "swarm")
    monkeypatch.setenv("DOCKER_HOST", lab.manager.docker_host)
    monkeypatch.setenv("HOTBOX_REGISTRY", lab.registry)
    monkeypatch.setenv("HOTBOX_SHARED_STORAGE", str(lab.shared))
    box._reset_for_tests()
    yield proj
    box._reset_for_tests()
