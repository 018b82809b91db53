"""hotbox-jupyter: run notebook code in locked-down sandboxes.

``%%hotbox`` sends a cell into a Docker/OCI container (a Hot Box); the "Hotcell Python" kernel runs
every cell inside a microVM (a Hotcell).
"""

from __future__ import annotations

from .errors import (
    BoxDisabledError,
    BoxFailedError,
    ConfigError,
    EngineUnavailableError,
    HotboxError,
    HotcellError,
    ImageDeniedError,
    ImageError,
    PolicyError,
    QuotaExceededError,
    TaskNotFoundError,
)
from .models import SIZES, BoxConf, BoxSize, ExitReason, SizeProfile, TaskInfo, TaskResult, TaskStatus

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
    "PolicyError",
    "QuotaExceededError",
    "SizeProfile",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskResult",
    "TaskStatus",
    "__version__",
]
