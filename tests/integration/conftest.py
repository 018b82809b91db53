"""Fixtures shared by the integration tests: a Docker client, an IPython shell with the extension
loaded, and the QEMU backend with the hotbox/python root filesystem for the microVM tests. Each is
module-scoped: a module that needs something else defines its own fixture of the same name."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import docker
import pytest
from IPython.core.interactiveshell import InteractiveShell
from vm_support import PYTHON_IMAGE, prepare

from hotbox_jupyter.hotcell.backend import RootfsHandle
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.notebook.widgets import TICKER


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    """A docker-py client with a long timeout: saving, committing and pushing images take a while."""
    c = docker.from_env(timeout=600)
    yield c
    c.close()


@pytest.fixture(scope="module")
def backend() -> QemuBackend:
    """The QEMU backend (constructing one also reaps the VMs of dead owners)."""
    return QemuBackend()


@pytest.fixture(scope="module")
def handle(backend: QemuBackend) -> RootfsHandle:
    """hotbox/python as the backend's root filesystem, built once and cached."""
    return prepare(backend, PYTHON_IMAGE)


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    """IPython with ``%load_ext hotbox_jupyter``; unloading it must leave no live-widget thread behind."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "hotbox_jupyter")
    yield ip
    ip.run_line_magic("unload_ext", "hotbox_jupyter")
    assert not [t for t in threading.enumerate() if t.name == TICKER.name], "the live thread outlived the extension"
