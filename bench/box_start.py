"""Time from ``box.start()`` to the first console byte, against ``docker run --rm`` of the same box.

A program, not a test: it prints figures. Both sides run the same image and command with the same
resource limits in the same run, alternating, after one warm-up each; the ratio is hotbox / CLI
(below 1.0 means hotbox is faster). Usage: ``python bench/box_start.py [--runs N] [--image IMAGE]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from hotbox_jupyter import BoxConf, box
from hotbox_jupyter.events import StderrChunk, StdoutChunk


def hotbox_first_byte(conf: BoxConf) -> float:
    t0 = time.perf_counter()
    info = box.start(conf)
    first = None
    for ev in box.events(info.id):
        if first is None and isinstance(ev, StdoutChunk | StderrChunk) and ev.text:
            first = time.perf_counter() - t0
    box.wait(info.id)
    if first is None:
        raise SystemExit(f"hotbox box printed nothing: {box.logs(info.id)!r}")
    return first


def cli_first_byte(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"docker run failed: {argv}")
    return first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--image", default="hotbox/shell")
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    cmd = ["echo", "first byte"]
    conf = BoxConf(image=args.image, cmd=cmd, size=args.size)
    lim = conf.limits()
    # The CLI gets the same security settings and limits (a tmpfs /data stands in for the disk).
    cli = ["docker", "run", "--rm", "--init", "--read-only", "--cap-drop=ALL", "--user", lim.user,
           "--pids-limit", str(lim.pids), "--security-opt", "no-new-privileges", "--network", "none",
           "--memory", f"{lim.memory_mb}m", "--memory-swap", f"{lim.memory_mb}m", "--cpus", str(lim.cpu),
           "--tmpfs", f"/tmp:rw,nosuid,nodev,size={lim.tmp_mb}m,mode=1777", args.image, *cmd]
    with tempfile.TemporaryDirectory() as home:
        os.environ.setdefault("HOTBOX_HOME", home)
        hotbox_first_byte(conf)  # warm-up: manager, docker client, page cache
        cli_first_byte(cli)
        hb, dk = [], []
        for _ in range(args.runs):
            hb.append(hotbox_first_byte(conf))
            dk.append(cli_first_byte(cli))
        box._reset_for_tests()
    h, d = statistics.median(hb), statistics.median(dk)
    print(f"start() -> first console byte, {args.image} {' '.join(cmd)!r}, size {args.size}, {args.runs} runs")
    print(f"  hotbox box.start : median {h * 1000:7.1f} ms  (min {min(hb) * 1000:.1f}, max {max(hb) * 1000:.1f})")
    print(f"  docker run --rm  : median {d * 1000:7.1f} ms  (min {min(dk) * 1000:.1f}, max {max(dk) * 1000:.1f})")
    print(f"  ratio hotbox/cli : {h / d:.2f}  ({'faster' if h < d else 'slower'} than the CLI)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
