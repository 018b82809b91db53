"""Hotcell: run code in microVMs (QEMU microvm here; Firecracker and libkrun where KVM works).

The seed's Rust API (``hotcell::config``, ``backend``, ``oci``), in Python, with the seed's names::

    from hotbox_jupyter.hotcell import ExecutorRegistry, RootfsBuilder, VmConfig

    builder = RootfsBuilder.open_default()
    await builder.build("hotbox/python:latest", rootfs_dir)
    backend = ExecutorRegistry.default().pick()          # the best backend this host can run
    config = VmConfig(rootfs_path=rootfs_dir, command=["python3", "-c", "print('hello from a VM')"])
    handle = await backend.prepare_rootfs(rootfs_dir, config)
    result = await backend.run(config, handle)           # VmResult: exit_code, console_output, result
"""

from __future__ import annotations

from ..errors import HotcellError
from .backend import (
    BackendProbe,
    ExecutorRegistry,
    RootfsHandle,
    RunInfo,
    VmmBackend,
    VmSession,
)
from .config import SharedDir, TsiMode, VmConfig, VmResult
from .rootfs import BuildReport, RootfsBuilder

__all__ = [
    "BackendProbe",
    "BuildReport",
    "ExecutorRegistry",
    "HotcellError",
    "RootfsBuilder",
    "RootfsHandle",
    "RunInfo",
    "SharedDir",
    "TsiMode",
    "VmConfig",
    "VmResult",
    "VmSession",
    "VmmBackend",
    "default_registry",
    "probe_backends",
]

_registry: ExecutorRegistry | None = None


def default_registry() -> ExecutorRegistry:
    """The process-wide registry of the built-in backends (probes cached in it)."""
    global _registry
    if _registry is None:
        _registry = ExecutorRegistry.default()
    return _registry


def probe_backends(*, refresh: bool = False) -> list[BackendProbe]:
    """Every backend with whether it can run here, why (not), and the accelerator it would use.

    Called by ``hotbox doctor`` and ``hotbox vm probe``. Blocking: the first call may download the
    guest kernel and boot a probe guest under KVM (a few seconds); later calls read caches.
    """
    return default_registry().probe_all(refresh=refresh)
