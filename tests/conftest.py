"""Suite-wide fixtures: the suite ends by asserting that nothing it started leaked."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotbox_jupyter.box.storage import unmount_storage
from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_OWNER_PID
from hotbox_jupyter.settings import hotbox_home as hotbox_home_dir


@pytest.fixture(scope="session", autouse=True)
def hotbox_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test run gets its own HOTBOX_HOME (ledger, storage, state), shared by the session.

    Caches that are expensive to rebuild (VM kernels, rootfs images) are shared across runs through
    HOTBOX_CACHE, which the suite leaves pointing at the user's cache.
    """
    home = tmp_path_factory.mktemp("hotbox-home")
    old = os.environ.get("HOTBOX_HOME")
    # Without this the caches would follow HOTBOX_HOME into the temporary directory and every run
    # would rebuild image roots and VM kernels from scratch.
    cache_set = "HOTBOX_CACHE" in os.environ
    if not cache_set:
        os.environ["HOTBOX_CACHE"] = str(hotbox_home_dir() / "cache")
    os.environ["HOTBOX_HOME"] = str(home)
    yield home
    from hotbox_jupyter import box

    box._reset_for_tests()  # the manager's spare /data disks go with it
    unmount_storage(home)  # projects' hot:// disks stay mounted by design; the run's home goes away
    left = _mounts_under(home)
    assert not left, f"disks left mounted by the test suite: {left}"
    if not cache_set:
        os.environ.pop("HOTBOX_CACHE", None)
    if old is None:
        os.environ.pop("HOTBOX_HOME", None)
    else:
        os.environ["HOTBOX_HOME"] = old


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def _our_containers() -> list[str]:
    try:
        out = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={LABEL_MANAGED}",
             "--filter", f"label={LABEL_OWNER_PID}={os.getpid()}"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def _our_vm_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"hotbox-owner={os.getpid()}"], capture_output=True, text=True).stdout
    return out.split()


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    """After the last test: no labelled container and no VM process of this test process remain."""
    yield
    leaked = _our_containers()
    vms = _our_vm_processes()
    assert not leaked, f"containers leaked by the test suite: {leaked}"
    assert not vms, f"VM processes leaked by the test suite: {vms}"
