"""The sandboxed Jupyter kernels: "Hot Box Python" (a container) and "Hotcell Python" (a microVM).

Each is a thin host-side relay (:mod:`.relay`) in front of a real ipykernel running inside the sandbox
(:mod:`.sandbox`, :mod:`.vmsandbox`); the host process runs no user code.
``python -m hotbox_jupyter.kernel --sandbox box|vm -f CONNECTION_FILE`` starts one (the kernelspecs do);
``hotbox kernel install`` installs both kernelspecs.
"""

from __future__ import annotations

__all__ = ["BOX_KERNEL_NAME", "KERNEL_NAME", "KERNEL_NAMES", "VM_KERNEL_NAME"]

VM_KERNEL_NAME = "hotcell-python"
BOX_KERNEL_NAME = "hotbox-python"
KERNEL_NAMES = {"vm": VM_KERNEL_NAME, "box": BOX_KERNEL_NAME}
KERNEL_NAME = VM_KERNEL_NAME
"""The microVM kernel's name (kept for callers that knew only it)."""
