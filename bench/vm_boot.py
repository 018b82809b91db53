"""Benchmark: microVM boot-to-first-output and per-cell time, against ``docker run --rm`` in the same run.

    python bench/vm_boot.py [--runs N] [--cells N] [--image hotbox/python:latest]

Prints, for the QEMU backend (TCG on the build machines, KVM where the probe says it works):

* one-shot: VMM start -> the first line of ``python3 -c 'print(...)'`` on the host, and the whole run;
* session: start -> agent ready, then the per-cell round trip of a trivial cell and of a loop;
* warm VM (hotcell.snapshot): start -> the guest program's first answer, cold boot (+ save) against
  restores of that snapshot, with the ratio;

and the same figures for a Docker container of the same image (``docker run --rm --network=none`` via
docker-py; the session agent over ``docker run -i``), with the VM/Docker ratios. When KVM is usable the
QEMU figures are measured again under KVM; when it is not, the probe's reason is printed instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import anyio

from hotbox_jupyter.events import Event, StdoutChunk
from hotbox_jupyter.hotcell.backend import RunInfo
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.rootfs import RootfsBuilder
from hotbox_jupyter.hotcell.session import ProcessAgentSession
from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_OWNER_PID, this_owner
from hotbox_jupyter.paths import GUEST_RUNTIMES, runtimes_dir

ONE_SHOT = ["python3", "-c", "print('RESULT', 1 + 1)"]
LOOP = "sum(range(10**6))"


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} ms (min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f}, n={len(xs)})"


async def vm_one_shot(backend: QemuBackend, handle: Any, runs: int) -> tuple[list[float], list[float]]:
    first, total = [], []
    for _ in range(runs):
        info = RunInfo()
        seen: float | None = None
        t0 = time.monotonic()
        stream = backend.run_stream(VmConfig(command=ONE_SHOT), handle, info=info)
        async for ev in stream:
            if isinstance(ev, StdoutChunk) and "RESULT" in ev.text and seen is None:
                seen = time.monotonic()
        assert seen is not None and info.started is not None
        first.append(seen - info.started)
        total.append(time.monotonic() - t0)
    return first, total


async def cells(session: Any, n: int) -> tuple[float, list[float], list[float]]:
    async def one(code: str) -> float:
        t = time.monotonic()
        evs: list[Event] = [ev async for ev in session.exec(code)]
        assert evs[-1].exit_code == 0, evs  # type: ignore[union-attr]
        return time.monotonic() - t

    await one("1 + 1")  # the first cell pays for the translation cache (TCG) and imports
    trivial = [await one("1 + 1") for _ in range(n)]
    loop = [await one(LOOP) for _ in range(max(3, n // 10))]
    return 0.0, trivial, loop


async def vm_session(backend: QemuBackend, handle: Any, n: int) -> tuple[float, list[float], list[float]]:
    t0 = time.monotonic()
    session = await backend.start_session(VmConfig(command=["unused"], memory_mib=384), handle)
    ready = time.monotonic() - t0
    async with session:
        _, trivial, loop = await cells(session, n)
    return ready, trivial, loop


WARM_PROGRAM = ["python3", "-u", "-c", "import hotbox_warm\nhotbox_warm.wait_for_start()\n"
                "hotbox_warm.send({'t': 'hi'})\nhotbox_warm.receive()\n"]


async def vm_warm(backend: QemuBackend, handle: Any, runs: int) -> tuple[float, list[float]]:
    """(cold boot + save, [restores]): start_warm_vm -> release -> the program's first message."""
    import secrets

    from hotbox_jupyter.hotcell.snapshot import start_warm_vm

    key = secrets.token_hex(4)  # a fresh key: the first start really boots
    times = []
    for i in range(runs + 1):
        t0 = time.monotonic()
        warm = await start_warm_vm(backend, VmConfig(command=["unused"], memory_mib=256), handle,
                                   program=WARM_PROGRAM, guest_ports=[], key_extra=key)
        try:
            await warm.release({})
            await warm.receive()
            times.append(time.monotonic() - t0)
            assert warm.restored == (i > 0)
        finally:
            await warm.stop()
    return times[0], times[1:]


def docker_one_shot(image: str, runs: int) -> tuple[list[float], list[float]]:
    import docker

    client = docker.from_env()
    labels = {LABEL_MANAGED: "1", LABEL_OWNER_PID: str(this_owner().pid)}
    first, total = [], []
    for _ in range(runs):
        t0 = time.monotonic()
        c = client.containers.run(image, ONE_SHOT, detach=True, network_mode="none", labels=labels)
        try:
            seen = None
            for chunk in c.logs(stream=True, follow=True):
                if b"RESULT" in chunk and seen is None:
                    seen = time.monotonic()
            c.wait()
        finally:
            c.remove(force=True)
        assert seen is not None
        first.append(seen - t0)
        total.append(time.monotonic() - t0)
    client.close()
    return first, total


async def docker_session(image: str, n: int) -> tuple[float, list[float], list[float]]:
    argv = ["docker", "run", "-i", "--rm", "--network=none", "--label", f"{LABEL_MANAGED}=1",
            "--label", f"{LABEL_OWNER_PID}={this_owner().pid}", "-v", f"{runtimes_dir()}:{GUEST_RUNTIMES}:ro",
            image, "python3", "-u", f"{GUEST_RUNTIMES}/python/agent.py"]
    t0 = time.monotonic()
    session = await ProcessAgentSession.start(argv, backend="docker")
    ready = time.monotonic() - t0
    async with session:
        _, trivial, loop = await cells(session, n)
    return ready, trivial, loop


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="one-shot runs per variant (default 5)")
    ap.add_argument("--cells", type=int, default=30, help="trivial cells per session (default 30)")
    ap.add_argument("--image", default="hotbox/python:latest")
    args = ap.parse_args()

    probe = QemuBackend.probe()
    print(f"QEMU backend: {probe.reason}\n")
    report = await RootfsBuilder.open_default().cached(args.image)
    tcg = QemuBackend(accel="tcg")
    handle = await tcg.prepare_rootfs(report.rootfs, VmConfig(command=["true"]))
    print(f"image {args.image}: rootfs {'cached' if report.cache_hit else 'built'} in {report.seconds:.1f} s, "
          f"ext4 {handle.size_bytes / 2**20:.0f} MiB ({'cached' if handle.cache_hit else 'made'})\n")

    variants: list[tuple[str, QemuBackend]] = [("qemu/tcg", tcg)]
    if probe.accel == "kvm":
        variants.append(("qemu/kvm", QemuBackend(accel="kvm")))

    rows: dict[str, dict[str, Any]] = {}
    for label, backend in variants:
        first, total = await vm_one_shot(backend, handle, args.runs)
        ready, trivial, loop = await vm_session(backend, handle, args.cells)
        rows[label] = {"first": first, "total": total, "ready": ready, "trivial": trivial, "loop": loop}
        cold, restores = await vm_warm(backend, handle, args.runs)
        rows[label]["warm"] = (cold, restores)
    first, total = await anyio.to_thread.run_sync(docker_one_shot, args.image, args.runs)
    ready, trivial, loop = await docker_session(args.image, args.cells)
    rows["docker"] = {"first": first, "total": total, "ready": ready, "trivial": trivial, "loop": loop}

    base = rows["docker"]
    for label, r in rows.items():
        print(f"== {label}")
        print(f"  one-shot start -> first output  {med(r['first'])}")
        print(f"  one-shot whole run              {med(r['total'])}")
        print(f"  session start -> agent ready    {r['ready'] * 1000:8.1f} ms")
        print(f"  cell '1 + 1'                    {med(r['trivial'])}")
        print(f"  cell '{LOOP}'           {med(r['loop'])}")
        if label != "docker":
            ratio = {k: statistics.median(r[k]) / statistics.median(base[k]) for k in ("first", "trivial", "loop")}
            print(f"  vs docker run --rm: first output x{ratio['first']:.1f}, session start "
                  f"x{r['ready'] / base['ready']:.1f}, trivial cell x{ratio['trivial']:.1f}, "
                  f"loop x{ratio['loop']:.1f}")
        if "warm" in r:
            cold, restores = r["warm"]
            print(f"  warm VM, cold boot + save       {cold * 1000:8.1f} ms")
            print(f"  warm VM, restore                {med(restores)}")
            print(f"  cold boot / restore             x{cold / statistics.median(restores):.1f}")
        print()
    if probe.accel != "kvm":
        print(f"KVM: not measured on this host: {probe.reason.split(': ', 1)[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
