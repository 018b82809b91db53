"""Talking to a real kernel over the Jupyter protocol: the helpers both kernel test files use."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Iterator
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager


@contextlib.contextmanager
def running_kernel(km: KernelManager) -> Iterator[tuple[BlockingKernelClient, int]]:
    """Start ``km``'s kernel, yield (ready client, kernel pid); stop channels and kernel afterwards.

    The pid is what the kernel's own sandboxes are labelled with, for the caller's leak checks.
    """
    km.start_kernel(env={**os.environ, "PYTHONWARNINGS": "ignore"})
    kc = km.client()
    kc.start_channels()
    pid = km.provisioner.process.pid  # type: ignore[union-attr]
    try:
        kc.wait_for_ready(timeout=60)
        yield kc, pid
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)


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
