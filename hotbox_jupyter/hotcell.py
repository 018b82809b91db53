"""Hotcell: the seed's Rust API (``hotcell::config``, ``backend``, ``oci``), in Python.

Run code in hardware-isolated microVMs::

    from hotbox_jupyter.hotcell import ExecutorRegistry, RootfsBuilder, VmConfig

    builder = RootfsBuilder.open_default()
    await builder.build("hotbox/python:latest", rootfs_dir)
    backend = ExecutorRegistry.default().pick()          # the best backend this host can run
    config = VmConfig(rootfs_path=rootfs_dir, command=["python3", "-c", "print('hello from a VM')"])
    handle = await backend.prepare_rootfs(rootfs_dir, config)
    result = await backend.run(config, handle)           # VmResult: exit_code, console_output, result

The names are exactly the seed's; the implementation lives in :mod:`hotbox_jupyter.cell`.
"""

from __future__ import annotations

from .cell.backend import ExecutorRegistry, VmmBackend
from .cell.config import SharedDir, TsiMode, VmConfig, VmResult
from .cell.rootfs import RootfsBuilder
from .errors import HotcellError

__all__ = [
    "ExecutorRegistry",
    "HotcellError",
    "RootfsBuilder",
    "SharedDir",
    "TsiMode",
    "VmConfig",
    "VmResult",
    "VmmBackend",
]
