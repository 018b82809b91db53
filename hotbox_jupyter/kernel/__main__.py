"""``python -m hotbox_jupyter.kernel -f CONNECTION_FILE``: what the kernelspec's argv runs."""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp

from .kernel import HotcellKernel

if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=HotcellKernel)
