"""hotbox-jupyter: run notebook code in locked-down sandboxes.

``%%hotbox`` sends a cell into a Docker/OCI container (a Hot Box); the "Hotcell Python" kernel runs
every cell inside a microVM (a Hotcell).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import box  # the Hot Box facade; docker-py is only imported when a box is started
from .errors import (
    BoxDisabledError,
    BoxFailedError,
    ConfigError,
    EngineUnavailableError,
    HotboxError,
    HotcellError,
    ImageDeniedError,
    ImageError,
    LimitError,
    PolicyError,
    QuotaExceededError,
    TaskNotFoundError,
)
from .models import SIZES, BoxConf, BoxSize, ExitReason, SizeProfile, TaskInfo, TaskResult, TaskStatus

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__version__ = "0.1.0"

__all__ = [
    "SIZES",
    "BoxConf",
    "BoxDisabledError",
    "BoxFailedError",
    "BoxSize",
    "ConfigError",
    "EngineUnavailableError",
    "ExitReason",
    "HotboxError",
    "HotcellError",
    "ImageDeniedError",
    "ImageError",
    "LimitError",
    "PolicyError",
    "QuotaExceededError",
    "SizeProfile",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskResult",
    "TaskStatus",
    "__version__",
    "box",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext hotbox_jupyter``: register ``%%hotbox`` and ``%hotbox`` (IPython is imported only now)."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """``%unload_ext hotbox_jupyter``: stop followed async boxes and remove the magics."""
    from .notebook.magics import unload_ipython_extension as unload

    unload(ipython)
