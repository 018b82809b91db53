"""32 and 64 nano boxes at once, against as many concurrent ``docker run --rm`` in the same run.

For N boxes started together (``box.start()`` N times, then waiting for all; and N ``docker run --rm``
processes of the same locked-down box spawned together): the wall time until the last one ended, and
each one's time from the start of the batch to its first byte (p50/p95/p99 over the N boxes).
Usage: ``python bench/concurrency.py [--n 32,64] [--image hotbox/shell]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _report import Report, quick

from hotbox_jupyter import BoxConf, box
from hotbox_jupyter.box.storage import unmount_storage
from hotbox_jupyter.events import StderrChunk, StdoutChunk

CMD = ["echo", "hi"]


def hotbox_batch(conf: BoxConf, n: int) -> tuple[float, list[float]]:
    """Wall time of the batch, and each box's first byte counted from the batch's start."""
    firsts: list[float] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    infos = [box.start(conf) for _ in range(n)]

    def follow(task_id: str) -> None:
        for ev in box.events(task_id):
            if isinstance(ev, StdoutChunk | StderrChunk) and ev.text:
                with lock:
                    firsts.append(time.perf_counter() - t0)
                break

    threads = [threading.Thread(target=follow, args=(i.id,)) for i in infos]
    for t in threads:
        t.start()
    results = [box.wait(i.id, timeout=600) for i in infos]
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} of {n} boxes failed, e.g. {failed[0].message}")
    return wall, firsts


def docker_batch(argv: list[str], n: int) -> tuple[float, list[float]]:
    firsts: list[float] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(n)]

    def follow(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            if proc.stdout.read(1):
                with lock:
                    firsts.append(time.perf_counter() - t0)
            proc.stdout.read()

    threads = [threading.Thread(target=follow, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    if any(codes):
        raise SystemExit(f"{sum(1 for c in codes if c)} of {n} docker run failed")
    return wall, firsts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="32" if quick() else "32,64", help="batch sizes, comma-separated")
    ap.add_argument("--image", default="hotbox/shell")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    conf = BoxConf(image=args.image, size="nano", cmd=CMD)
    lim = conf.limits()
    cli = ["docker", "run", "--rm", "--init", "--read-only", "--cap-drop=ALL", "--user", lim.user,
           "--pids-limit", str(lim.pids), "--security-opt", "no-new-privileges", "--network", "none",
           "--memory", f"{lim.memory_mb}m", "--memory-swap", f"{lim.memory_mb}m", "--cpus", str(lim.cpu),
           "--tmpfs", f"/tmp:rw,nosuid,nodev,size={lim.tmp_mb}m,mode=1777", args.image, *CMD]
    rep = Report("concurrency", f"Concurrent nano boxes (`{' '.join(CMD)}` in {args.image}), started together")
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as project:
        os.environ["HOTBOX_HOME"] = home
        os.chdir(project)
        Path(project, "hot.toml").write_text(f"[hot.plan]\nmax_concurrent = {max(sizes)}\n")
        box._reset_for_tests()
        try:
            box.wait(box.start(conf).id)  # warm-up
            for n in sizes:
                hb_wall, hb_first = hotbox_batch(conf, n)
                dk_wall, dk_first = docker_batch(cli, n)
                rep.add(f"{n} boxes", "box.start() x N: first byte of each", "s", hb_first,
                        ("docker run --rm x N", dk_first))
                rep.add(f"{n} boxes", "box.start() x N: until the last ended", "s", [hb_wall],
                        ("docker run --rm x N", [dk_wall]))
        finally:
            box._reset_for_tests()
            unmount_storage(Path(home))
            os.chdir("/")
    rep.context = {"image": args.image, "cmd": CMD, "sizes": sizes}
    rep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
