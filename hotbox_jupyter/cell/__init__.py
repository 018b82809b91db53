"""Hotcell: run code in microVMs (QEMU microvm here; Firecracker and libkrun where KVM works).

The public names are re-exported by :mod:`hotbox_jupyter.hotcell` exactly as the seed spells them.
"""

from __future__ import annotations

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
