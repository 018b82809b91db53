"""Latency and streaming throughput of ``%%hotbox``, against ``%%script`` on the host and ``docker run``.

Prints, for the same code in the same run:

* latency: from sending the cell to the first output message reaching the client (Jupyter protocol,
  a real kernel), or for ``docker run --rm`` from starting the CLI to the first byte on its stdout;
* throughput: MB/s of output lines delivered, first to last output byte.

Three ways to run it: ``%%hotbox hotbox/python`` (a box, through the kernel), ``%%script python3`` (a
host process, through the kernel: the floor for any kernel-side streaming) and ``docker run --rm`` of
the same image (a container without the kernel: the floor for any container). Ratios are printed
against both baselines. Usage: ``python bench/magic_latency.py [--runs N] [--mb MB]``.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from jupyter_client.manager import KernelManager

IMAGE = "hotbox/python:latest"
LINE = "x" * 99 + "\n"


def program(mb: float) -> str:
    """The code all three run: one line at once, then ``mb`` MB of 100-byte lines as fast as possible."""
    lines = int(mb * 1024 * 1024 / len(LINE))
    return (
        "import sys\n"
        "print('first', flush=True)\n"
        f"block = ({LINE!r} * 1000)\n"
        f"for _ in range({lines // 1000}):\n"
        "    sys.stdout.write(block)\n"
        "sys.stdout.flush()\n"
    )


@dataclass
class Sample:
    latency: float  # seconds to the first output
    seconds: float  # first to last output
    nbytes: int

    @property
    def mbps(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9) / 1024 / 1024


def run_in_kernel(km_client: object, code: str, timeout: float = 300) -> Sample:
    """Execute ``code`` in the kernel; time the stream messages of that request as they arrive."""
    kc = km_client
    msg_id = kc.execute(code)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    first = last = None
    nbytes = 0
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=timeout)  # type: ignore[attr-defined]
        except queue.Empty:
            raise RuntimeError("kernel went quiet") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream" and msg["content"]["name"] == "stdout":
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            nbytes += len(msg["content"]["text"])
        elif kind == "error":
            raise RuntimeError(f"cell failed: {msg['content']['ename']}: {msg['content']['evalue']}")
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            break
    if first is None or last is None:
        raise RuntimeError("no output")
    return Sample(first - t0, last - first, nbytes)


def run_docker(code: str) -> Sample:
    """``docker run --rm`` of the same image and code, read from its stdout pipe."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["docker", "run", "--rm", "--network", "none", IMAGE, "python3", "-u", "-c", code],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = None
    nbytes = 0
    while chunk := proc.stdout.read1(65536):  # type: ignore[attr-defined]
        now = time.perf_counter()
        first = first if first is not None else now
        nbytes += len(chunk)
    last = time.perf_counter()
    if proc.wait() != 0 or first is None:
        raise RuntimeError("docker run failed")
    return Sample(first - t0, last - first, nbytes)


def median(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.latency for s in samples), statistics.median(s.seconds for s in samples),
                  int(statistics.median(s.nbytes for s in samples)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each (median reported; default 3)")
    parser.add_argument("--mb", type=float, default=4.0, help="MB of output for the throughput part (default 4)")
    args = parser.parse_args()
    code = program(args.mb)
    cap = f"{int(args.mb * 2) + 1}MB"  # so that the magic shows everything it is timed on

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "PYTHONWARNINGS": "ignore"})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        run_in_kernel(kc, "%load_ext hotbox_jupyter\n%hotbox config --max-output " + cap)
        rows: dict[str, list[Sample]] = {"%%hotbox": [], "%%script python3": [], "docker run --rm": []}
        # Warm-up: first container start, page cache, imports in the kernel.
        run_in_kernel(kc, f"%%hotbox {IMAGE}\nprint('warm')")
        run_docker("print('warm')")
        for i in range(args.runs):
            rows["%%hotbox"].append(run_in_kernel(kc, f"%%hotbox {IMAGE}\n{code}"))
            rows["%%script python3"].append(run_in_kernel(kc, f"%%script {sys.executable} -u\n{code}"))
            rows["docker run --rm"].append(run_docker(code))
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    med = {name: median(samples) for name, samples in rows.items()}
    print(f"\n%%hotbox latency and streaming ({args.runs} runs, median; {args.mb:g} MB of 100-byte lines)\n")
    print(f"{'':20} {'first output':>14} {'throughput':>14} {'bytes seen':>12}")
    for name, s in med.items():
        print(f"{name:20} {s.latency * 1000:11.0f} ms {s.mbps:10.1f} MB/s {s.nbytes:12d}")
    hb = med["%%hotbox"]
    for base in ("%%script python3", "docker run --rm"):
        b = med[base]
        print(f"\n%%hotbox vs {base}: latency x{hb.latency / b.latency:.2f}, throughput x{hb.mbps / b.mbps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
