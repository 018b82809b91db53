"""Benchmark: the same trivial box in every isolation tier this host runs, against ``docker run --rm``.

    python bench/tiers.py [--runs N] [--size nano]

For each tier (container, gvisor, microvm): ``box.start`` -> first output of ``print('hi')`` in
``hotbox/python`` and the whole run, median/min/max of N runs (one unmeasured run first, which for a
microvm may build its snapshot), and the ratio to ``docker run --rm --network=none`` of the same image
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from hotbox_jupyter import box
from hotbox_jupyter.events import StderrChunk, StdoutChunk
from hotbox_jupyter.models import BoxConf
from hotbox_jupyter.owner import LABEL_MANAGED, LABEL_OWNER_PID, this_owner

IMAGE = "hotbox/python"
CMD = ["python3", "-c", "print('hi')"]


def one_box(tier: str, size: str) -> tuple[float, float]:
    t0 = time.monotonic()
    info = box.start(BoxConf.model_validate({"image": IMAGE, "cmd": CMD, "size": size, "isolation": tier}))
    first = None
    for ev in box.events(info.stream_id):
        if first is None and isinstance(ev, StdoutChunk | StderrChunk):
            first = time.monotonic() - t0
    result = box.wait(info.id)
    assert result.ok and first is not None, result
    return first, time.monotonic() - t0


def docker_run() -> tuple[float, float]:
    argv = ["docker", "run", "--rm", "--network=none", "--label", f"{LABEL_MANAGED}=1",
            "--label", f"{LABEL_OWNER_PID}={this_owner().pid}", IMAGE, *CMD]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    first = time.monotonic() - t0
    proc.wait()
    return first, time.monotonic() - t0


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="nano")
    args = ap.parse_args()
    tiers = box.isolation_tiers()
    for t in tiers:
        if not t.available:
            print(f"{t.name}: not available here: {t.reason}")
    rows: dict[str, list[tuple[float, float]]] = {"docker run --rm": []}
    names = [t.name for t in tiers if t.available]
    for name in names:
        one_box(name, args.size)  # warm-up (a microvm's may build the snapshot)
        rows[name] = []
    docker_run()
    for _ in range(args.runs):  # interleaved, so that load changes hit every variant alike
        rows["docker run --rm"].append(docker_run())
        for name in names:
            rows[name].append(one_box(name, args.size))
    base = statistics.median(f for f, _ in rows["docker run --rm"])
    print(f"\n{args.runs} runs each, size {args.size}, image {IMAGE}, {CMD!r}")
    print(f"{'':18} {'first output':34} {'whole run':34} first/docker")
    for name, xs in rows.items():
        firsts, totals = [f for f, _ in xs], [t for _, t in xs]
        print(f"{name:18} {fmt(firsts):34} {fmt(totals):34} x{statistics.median(firsts) / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
