"""Fixtures shared by the integration tests: a Docker client, and the QEMU backend with the
hotbox/python root filesystem for the microVM tests. Each is module-scoped: a module that needs
something else defines its own fixture of the same name."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest
from vm_support import PYTHON_IMAGE, prepare

from hotbox_jupyter.hotcell.backend import RootfsHandle
from hotbox_jupyter.hotcell.qemu import QemuBackend


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
