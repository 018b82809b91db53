"""Helpers of the microVM tests (test_vm_*.py): backends, prepared root filesystems, a tiny layered
image, a registry on loopback, and the leak checks of VM processes.

Root filesystems come from the local Docker engine through RootfsBuilder, so they are cached under the
session's HOTBOX_HOME (or HOTBOX_CACHE when it points at a persistent cache): the first module pays
for docker save, extraction and mkfs, the others find everything in the cache.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from hotbox_jupyter.hotcell.backend import RootfsHandle
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.rootfs import RootfsBuilder
from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_OWNER_PID

PYTHON_IMAGE = "hotbox/python:latest"
NODE_IMAGE = "hotbox/node:latest"
TINY_IMAGE = "hotbox-test/tiny-layers:latest"


@pytest.fixture(scope="session", autouse=True)
def drop_session_cache() -> Iterator[None]:
    """At the end of the session, drop the caches of root filesystems and ext4 images (gigabytes) when
    they live in the session's own HOTBOX_HOME; a cache named by HOTBOX_CACHE is the user's to keep."""
    yield
    if os.environ.get("HOTBOX_CACHE"):
        return
    from hotbox_jupyter.settings import load_settings

    cache = load_settings().cache_dir
    for sub in (cache / "rootfs", cache / "vm" / "images", cache / "vm" / "snapshots"):
        shutil.rmtree(sub, ignore_errors=True)


def prepare(backend: QemuBackend, image: str) -> RootfsHandle:
    """The image's cached tree, turned into the backend's (cached) ext4 image."""

    async def go() -> RootfsHandle:
        report = await RootfsBuilder.open_default().cached(image)
        return await backend.prepare_rootfs(report.rootfs, VmConfig(command=["true"]))

    return anyio.run(go)


def vm_processes(owner_pid: int) -> list[str]:
    """Processes carrying ``hotbox-owner=<owner_pid>`` in their argv (QEMU, virtiofsd)."""
    out = subprocess.run(["pgrep", "-af", f"hotbox-owner={owner_pid}( |\\.|$)"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def run_dirs() -> list[Path]:
    from hotbox_jupyter.settings import load_settings

    base = load_settings().state_dir / "vms"
    return sorted(base.iterdir()) if base.is_dir() else []


def docker_labels() -> list[str]:
    """``docker run`` flags that make a test container visible to the suite's leak check."""
    return ["--label", f"{LABEL_MANAGED}=1", "--label", f"{LABEL_OWNER_PID}={os.getpid()}"]


def build_tiny_image(client: Any, tag: str = TINY_IMAGE) -> Any:
    """A two-layer busybox image whose second layer deletes, replaces and hard-links files, so that the
    layer tar carries whiteouts (``.wh.delete-me``, ``.wh.gone``) and an opaque directory (``opq``)."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    dockerfile = b"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin /etc /opq/sub /gone && \\
/bin/busybox --install -s && echo keep > /etc/keep && echo x > /etc/delete-me && echo old > /opq/old && \\
echo s > /opq/sub/f && echo g > /gone/g"]
RUN rm /etc/delete-me && rm -rf /opq && mkdir /opq && echo new > /opq/new && rm -rf /gone && \\
    ln -s /etc/keep /link && echo hard > /h1 && ln /h1 /h2
"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, mode in (("Dockerfile", dockerfile, 0o644), ("busybox", busybox, 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True)
    return image


def check_tiny_tree(root: Path) -> None:
    """What the tiny image's layers add up to, whiteouts applied."""
    assert (root / "etc" / "keep").read_text() == "keep\n"
    assert not (root / "etc" / "delete-me").exists()
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["new"]
    assert not (root / "gone").exists()
    assert os.readlink(root / "link") == "/etc/keep"
    assert (root / "h1").stat().st_ino == (root / "h2").stat().st_ino
    assert (root / "bin" / "busybox").stat().st_mode & 0o111
