"""``make bench``: run every bench program, then write the figures as JSON and a Markdown table.

    python bench/run.py [--quick] [--only box_start,magic_latency] [--out bench/results]
    make bench                       # everything
    make bench BENCH="--quick"       # the short version (fewer runs, smaller sizes; about two minutes)
    make bench BENCH="--only box_start"

Every ``bench/*.py`` but this one and ``_*.py`` is a program; each runs in its own process, one after
the other (they would disturb each other's timings otherwise). ``tiers`` runs only when named (see
:data:`STANDALONE`). The time each program took is in the results. Programs that use ``bench/_report.py``
leave their rows in a JSON file the driver collects; the text of the others is kept as they printed it.
Results: ``<out>/bench.json`` and ``<out>/bench.md``, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _report import Report, Row  # next to this file

HERE = Path(__file__).resolve().parent
# The short version of the programs that take arguments rather than HOTBOX_BENCH_QUICK.
QUICK_ARGS = {"vm_boot": ["--runs", "1", "--cells", "5"]}
# What make bench gives the programs of the other parts (VMs, kernels, swarm), whose own defaults take
# longer: enough samples for a stable median (their figures are medians and p50/p95), and all of make
# bench within 10 minutes here.
FULL_ARGS = {"vm_boot": ["--runs", "3", "--cells", "15"], "kernel_start": ["--starts", "2", "--cells", "20"],
             "swarm": ["--runs", "6", "--many-runs", "2"]}
TIMEOUT_S = 600
# Programs make bench leaves out (run them with --only), and why: make bench must fit in 10 minutes here.
STANDALONE = {"tiers": "box_start measures the same first byte per tier, cold and warm, against docker run"}


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU, memory, kernel, engine, and how busy the machine was."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    try:
        docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        docker = "unavailable"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "os": _os_name(), "python": platform.python_version(),
            "docker": docker, "load_at_start": os.getloadavg()}


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def programs(only: list[str] | None) -> list[Path]:
    """The programs to run: every one but the :data:`STANDALONE` ones, or those ``only`` names."""
    found = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    if only:
        unknown = set(only) - {p.stem for p in found}
        if unknown:
            raise SystemExit(f"--only {','.join(sorted(unknown))}: no such program; "
                             f"there are {', '.join(p.stem for p in found)}")
        return [p for p in found if p.stem in only]
    return [p for p in found if p.stem not in STANDALONE]


def run(prog: Path, quick: bool, out: Path) -> dict[str, Any]:
    """Run one program, its output shown as it comes and kept."""
    env = {**os.environ, "HOTBOX_BENCH_OUT": str(out), "HOTBOX_BENCH_QUICK": "1" if quick else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(prog), *(QUICK_ARGS if quick else FULL_ARGS).get(prog.stem, [])]
    print(f"\n=== {prog.name} {' '.join(argv[2:])}", flush=True)
    t0 = time.monotonic()
    lines: list[str] = []
    # Its own process group, so that a stop also ends what it started; read in a thread, so that neither a
    # program that goes quiet nor a child of it still holding the pipe after it exited can hold the run up.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    stdout = proc.stdout
    assert stdout is not None

    def echo() -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stdout:
                sys.stdout.write(line)
                lines.append(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        lines.append(f"(stopped after {TIMEOUT_S} s)\n")
        rc = -9
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it left running
    proc.wait()
    reader.join(5)
    if not reader.is_alive():  # else a child of it still holds the pipe: the daemon reader is left to it
        stdout.close()
    seconds = time.monotonic() - t0
    result: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1)}
    report = out / f"{prog.stem}.json"
    if report.exists():
        result.update(json.loads(report.read_text()))
    else:
        result["text"] = "".join(lines[-80:])
    return result


def markdown(results: dict[str, dict[str, Any]], info: dict[str, Any], quick: bool, total: float) -> str:
    m = info
    out = ["# hotbox-jupyter benchmarks", "",
           f"`make bench{' BENCH=--quick' if quick else ''}`, {info['date']}, {total:.0f} s in all. Machine: "
           f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']} (Linux {m['kernel']}), "
           f"Docker {m['docker']}, Python {m['python']}; load average at start "
           f"{', '.join(f'{x:.1f}' for x in m['load_at_start'])}.", "",
           "Every ratio is the figure's p50 over its baseline's p50, both measured in the same run "
           "(below 1 is faster than the baseline).", ""]
    out += ["Time per program: " + ", ".join(f"{name} {res['seconds']:.0f} s" for name, res in results.items())
            + ".", ""]
    left = [f"`{name}` ({why})" for name, why in STANDALONE.items() if name not in results]
    if left:
        out += ["Left out (run with `--only`): " + "; ".join(left) + ".", ""]
    for name, res in results.items():
        if "rows" in res:
            rep = Report(name, res["title"], [Row(**{k: v for k, v in r.items() if k != "ratio"}) for r in res["rows"]],
                         res.get("notes", []))
            out.append(rep.table())
        else:
            out += [f"### {name}", "", "```", res.get("text", "").rstrip(), "```", ""]
        if res["rc"] != 0:
            out.append(f"**{name} failed** (exit code {res['rc']}) after {res['seconds']} s.\n")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the short version of every program")
    ap.add_argument("--only", help="comma-separated program names (e.g. box_start,magic_latency)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where bench.json and bench.md go")
    args = ap.parse_args()
    only = [s.strip().removesuffix(".py") for s in args.only.split(",") if s.strip()] if args.only else None
    progs = programs(only)
    info = {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hotbox-bench-") as tmp:
        for prog in progs:
            results[prog.stem] = run(prog, args.quick, Path(tmp))
    total = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"machine": info, "quick": args.quick, "seconds": round(total),
                                                     "programs": results}, indent=1))
    (args.out / "bench.md").write_text(markdown(results, info, args.quick, total))
    print("\n" + ", ".join(f"{name} {res['seconds']:.0f} s" for name, res in results.items()))
    print(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.json'} ({total:.0f} s)")
    failed = [name for name, res in results.items() if res["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
