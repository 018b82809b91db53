"""Boxes on a real 3-engine Docker Swarm against the local engine, in the same run (issue 10, item 7).

A program, not a test: it builds the lab swarm of tests/swarm/cluster.py (three dockerd engines in
network namespaces, a registry, hotbox/shell pushed), then, with one warm task manager per engine on
the same event loop, in rounds that alternate the engines:

* **one box**: ``start()`` → first console byte, and ``start()`` → complete (``wait()`` returns);
* **live console**: a line the box prints mid-run (its ``date +%s.%N``) → received here;
* **32 nano boxes** started at once: ``start()`` of the first → the last one complete, and where the
  swarm placed them (read in each box from /proc/self/cgroup: every lab engine has its own cgroup parent).

Ratios are swarm / local at p50. Usage: ``python bench/swarm.py [--runs N] [--boxes N]`` (needs root).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
from _report import Report, quick

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "swarm"))

from cluster import SwarmLab  # noqa: E402 - tests/swarm is put on the path just above

from hotbox_jupyter.box.manager import TaskManager  # noqa: E402
from hotbox_jupyter.box.storage import unmount_storage  # noqa: E402
from hotbox_jupyter.events import StderrChunk, StdoutChunk  # noqa: E402
from hotbox_jupyter.settings import Cluster, Plan, load_settings  # noqa: E402

IMAGE = "hotbox/shell"
ONE = {"image": IMAGE, "size": "nano", "cmd": ["sh", "-c", "echo hi"]}


async def one_box(manager: TaskManager) -> tuple[float, float]:
    """(start → first console byte, start → complete) of one box, in seconds."""
    t0 = time.perf_counter()
    info = await manager.start(ONE)
    first = None
    async for ev in manager.events(info.id):
        if first is None and isinstance(ev, StdoutChunk | StderrChunk) and ev.text:
            first = time.perf_counter() - t0
    result = await manager.wait(info.id)
    done = time.perf_counter() - t0
    if first is None or not result.ok:
        raise SystemExit(f"the box failed: {result.message}: {result.console_output!r}")
    return first, done


async def line_latency(manager: TaskManager, lines: int = 10) -> list[float]:
    """For lines printed while a box runs: seconds from the box's clock at print to this process receiving it
    (one machine, one clock)."""
    conf = {"image": IMAGE, "size": "nano",
            "cmd": ["sh", "-c", f"for i in $(seq {lines}); do date +%s.%N; sleep 0.2; done"]}
    info = await manager.start(conf)
    out: list[float] = []
    buf = ""
    async for ev in manager.events(info.id):
        if isinstance(ev, StdoutChunk):
            now = time.time()
            buf += ev.text
            *done, buf = buf.split("\n")
            out += [now - float(t) for t in done if t.strip()]
    await manager.wait(info.id)
    return out


async def many_boxes(manager: TaskManager, n: int, lab: SwarmLab) -> tuple[float, dict[str, int]]:
    """Seconds from the first start() to the last box complete, and how many boxes ran on each node."""
    conf = {"image": IMAGE, "size": "nano", "script": "grep -m1 pids /proc/self/cgroup; sleep 1"}
    t0 = time.perf_counter()
    infos = [await manager.start(conf) for _ in range(n)]
    results = [await manager.wait(i.id) for i in infos]
    took = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} of {n} boxes failed, e.g. {bad[0].message}")
    spread: collections.Counter[str] = collections.Counter()
    for r in results:
        node = lab.node_of_cgroup(r.stdout)
        spread[node.name if node else "local"] += 1
    return took, dict(sorted(spread.items()))


async def bench(lab: SwarmLab, args: argparse.Namespace, rep: Report) -> None:
    base = load_settings()
    plan = Plan(max_concurrent=max(64, args.boxes * 2))
    local_settings = base.model_copy(update={"plan": plan})
    swarm_settings = base.model_copy(update={"plan": plan, "cluster": Cluster(
        engine="swarm", manager=lab.manager.docker_host, registry=lab.registry, storage=lab.shared)})
    local, swarm = TaskManager(local_settings), TaskManager(swarm_settings)
    async with anyio.create_task_group() as tg:
        await tg.start(local.serve)
        await tg.start(swarm.serve)
        try:
            for m in (local, swarm):  # warm-up: clients, image pulls on the nodes, spare disks
                for _ in range(3):
                    await one_box(m)
            first = {"local": [], "swarm": []}  # type: dict[str, list[float]]
            done = {"local": [], "swarm": []}  # type: dict[str, list[float]]
            for i in range(args.runs):
                order = [("local", local), ("swarm", swarm)] if i % 2 == 0 else [("swarm", swarm), ("local", local)]
                for name, m in order:
                    f, d = await one_box(m)
                    first[name].append(f)
                    done[name].append(d)
            rep.add("one box", "start → first console byte (swarm)", "s", first["swarm"],
                    ("local engine", first["local"]), note="through the manager's service logs")
            rep.add("one box", "start → complete (swarm)", "s", done["swarm"], ("local engine", done["local"]))
            live = {"local": [], "swarm": []}  # type: dict[str, list[float]]
            for _ in range(max(1, args.runs // 3)):
                for name, m in (("local", local), ("swarm", swarm)):
                    live[name] += await line_latency(m)
            rep.add("live console", "a line printed mid-run → received (swarm)", "s", live["swarm"],
                    ("local engine", live["local"]), note="box clock vs host clock, same machine")
            many = {"local": [], "swarm": []}  # type: dict[str, list[float]]
            spreads = []
            for i in range(args.many_runs):
                order = [("local", local), ("swarm", swarm)] if i % 2 == 0 else [("swarm", swarm), ("local", local)]
                for name, m in order:
                    took, spread = await many_boxes(m, args.boxes, lab)
                    many[name].append(took)
                    if name == "swarm":
                        spreads.append(spread)
            rep.add(f"{args.boxes} nano boxes at once", "first start → last complete (swarm)", "s", many["swarm"],
                    ("local engine", many["local"]), note="boxes per node: " + "; ".join(
                        ", ".join(f"{k} {v}" for k, v in s.items()) for s in spreads))
        finally:
            await local.close()
            await swarm.close()
            tg.cancel_scope.cancel()


def _clean_home(home: Path) -> None:
    """Unmount the run's hot:// disks (they stay mounted after their boxes by design) and remove its home."""
    unmount_storage(home)
    with open("/proc/self/mounts") as f:
        still = [line.split()[1] for line in f if line.split()[1].startswith(f"{home}/")]
    if still:
        print(f"bench/swarm.py: still mounted, left in place: {still}", file=sys.stderr)
        return
    shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3 if quick() else 10, help="one-box samples per engine")
    p.add_argument("--boxes", type=int, default=32, help="boxes started at once")
    p.add_argument("--many-runs", type=int, default=1 if quick() else 3, help="samples of the many-box run")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/swarm.py builds a swarm of dockerd engines in network namespaces: run it as root")
    home = tempfile.mkdtemp(prefix="hotbox-bench-swarm-")
    os.environ.setdefault("HOTBOX_CACHE", str(Path(os.environ.get("HOTBOX_HOME", home)) / "cache"))
    os.environ["HOTBOX_HOME"] = home
    os.chdir(home)
    rep = Report("swarm", "Boxes on a 3-engine Docker Swarm (namespaces on this machine) vs the local engine")
    t0 = time.perf_counter()
    lab = SwarmLab().start(images=(IMAGE,))
    try:
        rep.notes.append(f"lab swarm up (3 engines, registry, {IMAGE} pushed) in {time.perf_counter() - t0:.1f} s")
        anyio.run(bench, lab, args, rep)
    finally:
        lab.close()
        _clean_home(Path(home))
    rep.notes.append("all three engines share this machine's 2 cores: the swarm's scale-out is not measured here, "
                     "only its overhead")
    rep.save()


if __name__ == "__main__":
    main()
