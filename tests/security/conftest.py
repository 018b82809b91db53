"""The attack suite's arena: every case runs against every isolation tier this host has, next to a
witness box, and ends by checking that the host, this process (the kernel's side) and the witness
came through unharmed and that no output or ledger entry was lost.

The box helpers and fixtures are the integration tests' (``tests/integration/box_support.py`` and its
``conftest.py``), shared rather than copied.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_INTEGRATION = Path(__file__).resolve().parent.parent / "integration"
sys.path.insert(0, str(_INTEGRATION))

import box_support  # noqa: E402
from security_support import (  # noqa: E402
    HOST_DISK_SLACK,
    HOST_FILES,
    HOST_RSS_SLACK,
    KNOWN_HOLES,
    SHELL,
    Arena,
    allocated,
    digest,
    host_tiers,
    rss,
)

from hotbox_jupyter import box  # noqa: E402
from hotbox_jupyter.models import BoxConf, TaskStatus  # noqa: E402

_spec = importlib.util.spec_from_file_location("integration_conftest", _INTEGRATION / "conftest.py")
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)

images, project = box_support.images, box_support.project  # fixtures
shell, client = _integration.shell, _integration.client  # fixtures


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tier" in metafunc.fixturenames:
        metafunc.parametrize("tier", host_tiers())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        tier = callspec.params.get("tier") if callspec is not None else None
        hole = KNOWN_HOLES.get((getattr(item, "originalname", item.name), str(tier)))
        if hole is not None:
            item.add_marker(pytest.mark.xfail(strict=hole[1], reason=f"known hole in the {tier} tier: {hole[0]}"))


@pytest.fixture
def arena(tier: str, project: Path) -> Iterator[Arena]:
    """The case's arena, with a witness box running beside the attack (a container: the cheapest
    neighbour, and the one that shares the host's kernel).

    Afterwards: the witness is still running and its heartbeat has no gap (nothing lost), the host's
    files are unchanged, the host disk and this process's memory did not grow past a small slack,
    the engine answers and no box of the case is left.
    """
    digests = {p: digest(p) for p in HOST_FILES}
    disk_before = allocated(box_support.hotbox_home())
    rss_before = rss()
    witness_script = "i=0; while [ $i -lt 2000 ]; do echo beat $i; i=$((i+1)); sleep 0.1; done"
    arena = Arena(tier=tier, project=project)
    witness = box.start(BoxConf(image=SHELL, size="nano", script=witness_script, timeout=300))
    box_support.wait_running(witness.id)
    deadline = time.monotonic() + 30
    while "beat 0" not in box.logs(witness.id):  # it runs and speaks before the attack starts
        assert time.monotonic() < deadline, "the witness did not start beating"
        time.sleep(0.05)
    yield arena
    assert box.status(witness.id) is TaskStatus.RUNNING, box.result(witness.id)
    box.cancel(witness.id, grace=0.5)
    w = box.wait(witness.id, timeout=30)
    beats = [int(line.split()[1]) for line in w.stdout.splitlines() if line.startswith("beat ")]
    assert beats and beats == list(range(len(beats))), f"the witness lost output: {w.stdout[-300:]}"
    assert {p: digest(p) for p in HOST_FILES} == digests, "a host file changed"
    grown = allocated(box_support.hotbox_home()) - disk_before
    assert grown < HOST_DISK_SLACK, f"the host disk grew by {grown >> 20} MB"
    assert rss() - rss_before < HOST_RSS_SLACK, f"this process grew by {(rss() - rss_before) >> 20} MB"
    import docker

    c = docker.from_env()
    try:
        assert c.ping()
        deadline = time.monotonic() + 10
        while box_support.containers(c, project_id=box.settings().project.id):
            assert time.monotonic() < deadline, "the case left boxes behind"
            time.sleep(0.1)
    finally:
        c.close()
    assert os.path.isdir(box_support.hotbox_home())
