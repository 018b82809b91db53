"""Kernel start -> first cell result, and trivial-cell round trips: stock ipykernel, Hot Box Python and
Hotcell Python (cold boot and snapshot restore), in one run, with ratios against the stock ipykernel.

A program, not a test: it prints figures. Every kernel is started from an installed kernelspec by
jupyter_client's KernelManager, as a notebook server would; "start" is ``start_kernel()`` until the
``execute_result`` of ``1+1`` arrived; a round trip is ``execute('pass')`` until its reply and idle.
Kinds alternate run by run so that machine noise hits them alike.
Usage: ``python bench/kernel_start.py [--starts N] [--cells N] [--no-vm]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from hotbox_jupyter.kernel.install import install


def wait_idle(kc: BlockingKernelClient, msg_id: str, *, want_result: bool = False) -> None:
    got_result, idle = not want_result, False
    while not (got_result and idle):
        msg = kc.get_iopub_msg(timeout=300)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "execute_result":
            got_result = True
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    reply = kc.get_shell_msg(timeout=300)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=300)
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"cell failed: {reply['content']}")


def start_and_first_result(ksm: KernelSpecManager, name: str, env: dict[str, str]) -> tuple[float, KernelManager,
                                                                                            BlockingKernelClient]:
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    t0 = time.perf_counter()
    km.start_kernel(env={**os.environ, **env})
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=600)
        wait_idle(kc, kc.execute("1+1"), want_result=True)
    except BaseException:  # a kernel that did not answer is stopped, not left running after the program
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    return time.perf_counter() - t0, km, kc


def stop(km: KernelManager, kc: BlockingKernelClient) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def round_trips(kc: BlockingKernelClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        wait_idle(kc, kc.execute("pass"))
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3, help="starts per kind (the VM cold boot: once)")
    ap.add_argument("--cells", type=int, default=40, help="trivial cells per kind")
    ap.add_argument("--no-vm", action="store_true", help="skip Hotcell Python")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotbox-bench-kernels-", ignore_cleanup_errors=True) as tmp:
        os.environ.setdefault("HOTBOX_HOME", os.path.join(tmp, "home"))
        try:
            return measure(args, tmp)
        finally:  # the box kernels mounted hot:// (a disk) under HOTBOX_HOME
            from hotbox_jupyter.box.storage import ProjectStorage
            from hotbox_jupyter.settings import load_settings

            ProjectStorage.for_settings(load_settings()).unmount()


def measure(args: argparse.Namespace, tmp: str) -> int:
    """Start and time every kind; print the figures."""
    ksm = KernelSpecManager(kernel_dirs=[f"{tmp}/share/jupyter/kernels"])
    install("box", prefix=tmp, ksm=ksm)
    install("vm", prefix=tmp, ksm=ksm)
    write_kernel_spec(f"{tmp}/share/jupyter/kernels/python3")
    kinds = {"stock ipykernel": ("python3", {}), "Hot Box Python": ("hotbox-python", {})}
    if not args.no_vm:
        kinds["Hotcell Python (restore)"] = ("hotcell-python", {})
    starts: dict[str, list[float]] = {k: [] for k in kinds}
    trips: dict[str, list[float]] = {}
    if not args.no_vm:  # the first VM start makes the snapshot the restores use; not counted
        stop(*start_and_first_result(ksm, "hotcell-python", {})[1:])
    for i in range(args.starts):
        for label, (name, env) in kinds.items():
            seconds, km, kc = start_and_first_result(ksm, name, env)
            starts[label].append(seconds)
            if i == 0:
                round_trips(kc, 5)  # warm-up
                trips[label] = round_trips(kc, args.cells)
            stop(km, kc)
    if not args.no_vm:  # a snapshot key of its own: this start boots the VM from scratch
        seconds, km, kc = start_and_first_result(
            ksm, "hotcell-python", {"HOTBOX_KERNEL_SNAPSHOT_EXTRA": uuid.uuid4().hex})
        starts["Hotcell Python (cold boot)"] = [seconds]
        stop(km, kc)
    base_start = statistics.median(starts["stock ipykernel"])
    base_trip = pct(trips["stock ipykernel"], 0.5)
    print(f"kernel start -> first result of 1+1 ({args.starts} starts each; ratio = median / stock median)")
    for label, xs in starts.items():
        m = statistics.median(xs)
        print(f"  {label:28s} median {m:6.2f} s  (min {min(xs):.2f}, max {max(xs):.2f})  ratio {m / base_start:5.2f}")
    print(f"trivial cell round trip, execute('pass') -> reply + idle ({args.cells} cells each; ratio of p50s)")
    for label, xs in trips.items():
        p50, p95 = pct(xs, 0.5), pct(xs, 0.95)
        print(f"  {label:28s} p50 {p50 * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  ratio {p50 / base_trip:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
