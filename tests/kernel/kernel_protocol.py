"""Talking to a real kernel over the Jupyter protocol: the helpers both kernel test files use."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Iterator
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

_SPECS: dict[str, str] = {}


def kernelspecs() -> KernelSpecManager:
    """hotbox-python and hotcell-python as ``hotbox kernel install --prefix`` writes them, plus the stock
    python3, in a directory of the test run's own (made once per run)."""
    if "dir" not in _SPECS:
        import atexit
        import shutil
        import tempfile

        from ipykernel.kernelspec import write_kernel_spec

        from hotbox_jupyter.kernel.install import install

        prefix = tempfile.mkdtemp(prefix="hotbox-kernelspecs-")
        atexit.register(shutil.rmtree, prefix, True)
        ksm = KernelSpecManager(kernel_dirs=[f"{prefix}/share/jupyter/kernels"])
        install("box", prefix=prefix, ksm=ksm)
        install("vm", prefix=prefix, ksm=ksm)
        write_kernel_spec(f"{prefix}/share/jupyter/kernels/python3")
        _SPECS["dir"] = f"{prefix}/share/jupyter/kernels"
    return KernelSpecManager(kernel_dirs=[_SPECS["dir"]])


@contextlib.contextmanager
def running_kernel(km: KernelManager, *, ready_timeout: float = 60) -> Iterator[tuple[BlockingKernelClient, int]]:
    """Start ``km``'s kernel, yield (ready client, kernel pid); stop channels and kernel afterwards.

    The pid is what the kernel's own sandboxes are labelled with, for the caller's leak checks.
    """
    km.start_kernel(env={**os.environ, "PYTHONWARNINGS": "ignore"})
    kc = km.client()
    kc.start_channels()
    pid = km.provisioner.process.pid  # type: ignore[union-attr]
    try:
        kc.wait_for_ready(timeout=ready_timeout)
        yield kc, pid
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)
        else:  # it died: its context would otherwise be collected unclosed (a ResourceWarning)
            km.cleanup_resources()


def execute(kc: BlockingKernelClient, code: str, *, timeout: float = 150,
            on_message: Any = None) -> dict[str, Any]:
    """Run ``code``; the reply content plus ``messages``: (receive time, iopub message) of this request."""
    msg_id = kc.execute(code)
    messages: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no idle within {timeout}s; got {[m['msg_type'] for _, m in messages]}") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append((time.monotonic(), msg))
        if on_message is not None:
            on_message(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=30)
    return {**reply["content"], "messages": messages}
