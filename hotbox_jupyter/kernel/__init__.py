"""The "Hotcell Python" Jupyter kernel: every cell runs in a persistent microVM.

``python -m hotbox_jupyter.kernel -f CONNECTION_FILE`` starts it (the kernelspec does);
``hotbox kernel install`` installs the kernelspec.
"""

from __future__ import annotations

__all__ = ["KERNEL_NAME"]

KERNEL_NAME = "hotcell-python"
