"""Files shipped with the package: the guest runtimes.

In a wheel they live inside the package (``_runtimes``); in a source checkout they are the top-level
``runtimes/`` directory.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["GUEST_RUNTIMES", "kernelspec_dir", "runtimes_dir"]

# Where the runtimes directory appears inside every box and VM (read-only).
GUEST_RUNTIMES = "/opt/hotbox"

_PKG = Path(__file__).resolve().parent


def _shipped(packaged: str, checkout: str) -> Path:
    for candidate in (_PKG / packaged, _PKG.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"hotbox-jupyter is installed without its {checkout}/ directory")


def runtimes_dir() -> Path:
    """Host path of the guest runtimes (python/, node/, bin/hotbox)."""
    return _shipped("_runtimes", "runtimes")


def kernelspec_dir() -> Path:
    """Host path of the shipped kernelspecs (``hotcell-python/kernel.json``)."""
    return _shipped("_kernelspec", "kernelspec")
