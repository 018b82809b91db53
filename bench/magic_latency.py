"""``%%hotbox`` first output (cold and warm) and streaming throughput, against ``%%script`` and ``docker run``.

Through a real kernel over the Jupyter protocol, for the same code in the same run:

* **first output**: from sending the cell to the first ``stream`` message reaching the client, for
  ``%%hotbox`` with pools off (cold) and from a warm pool (refilled before each sample), next to
  ``%%script python3`` (a host process through the same kernel) and ``docker run --rm`` of the same
  image (from starting the CLI to the first byte on its stdout, no kernel);
* **throughput**: MB/s of 100-byte lines from first to last output byte, for ``%%hotbox``, for
  ``%%script``, for the kernel printing the same lines itself (the ceiling of the kernel's display
  path: what any cell magic could at best deliver), for ``box.events`` read without a kernel (what the
  engine and the journal deliver) and for ``docker run`` read from its pipe.

Usage: ``python bench/magic_latency.py [--runs N] [--mb MB]``.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _report import Report, quick
from jupyter_client.manager import KernelManager

IMAGE = "hotbox/python:latest"
LINE = "x" * 99 + "\n"
RUNNER = ["python3", "-u", "/opt/hotbox/python/cell.py"]  # the magic's Python runner: what warm pools keep ready


def program(mb: float) -> str:
    """The code all of them run: one line at once, then ``mb`` MB of 100-byte lines as fast as possible."""
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


class Kernel:
    """A real IPython kernel with the extension loaded, in a project of the bench's own."""

    def __init__(self, cwd: str, cap: str) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.run("%load_ext hotbox_jupyter\n%hotbox config --max-output " + cap)

    def run(self, code: str, timeout: float = 300) -> Sample | None:
        """Execute ``code``; time the stdout stream messages of that request as they arrive."""
        msg_id = self.kc.execute(code)
        t0 = time.perf_counter()
        first = last = None
        nbytes = 0
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
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
            return None
        return Sample(first - t0, last - first, nbytes)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def run_docker(code: str) -> Sample:
    """``docker run --rm`` of the same image and code, read from its stdout pipe."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["docker", "run", "--rm", "--network", "none", IMAGE, "python3", "-u", "-c", code],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = None
    nbytes = 0
    with proc.stdout:
        while chunk := proc.stdout.read1(65536):
            now = time.perf_counter()
            first = first if first is not None else now
            nbytes += len(chunk)
    last = time.perf_counter()
    if proc.wait() != 0 or first is None:
        raise RuntimeError("docker run failed")
    return Sample(first - t0, last - first, nbytes)


def run_box_events(code: str) -> Sample:
    """The same code through box.start + box.events in this process: engine, stream pump and journal only."""
    from hotbox_jupyter import box
    from hotbox_jupyter.events import StdoutChunk

    t0 = time.perf_counter()
    info = box.start({"image": IMAGE, "size": "small", "cmd": RUNNER, "env": {"PYTHONUNBUFFERED": "1"}},
                     stdin=code.encode())
    first = last = None
    nbytes = 0
    for ev in box.events(info.id):
        if isinstance(ev, StdoutChunk):
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            nbytes += len(ev.text)
    box.wait(info.id)
    assert first is not None and last is not None
    return Sample(first - t0, last - first, nbytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5 if quick() else 11, help="latency samples of each")
    parser.add_argument("--mb", type=float, default=4.0 if quick() else 8.0, help="MB of output for throughput")
    parser.add_argument("--tp-runs", type=int, default=1 if quick() else 2, help="throughput samples of each")
    args = parser.parse_args()
    code = program(args.mb)
    # %%script hands IPython one line at a time (~1000 lines/s here): a smaller volume gives the same rate.
    script_code = program(min(args.mb, 0.5))
    hello = "print('hi')"
    cap = f"{int(args.mb * 2) + 1}MB"  # so that the magic shows everything it is timed on
    warm_conf = repr({"image": IMAGE, "size": "small", "cmd": RUNNER, "env": {"PYTHONUNBUFFERED": "1"}})
    lat: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "script", "docker")}
    tput: dict[str, list[float]] = {k: [] for k in ("hotbox", "script", "kernel", "events", "docker")}
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as project:
        os.environ["HOTBOX_HOME"] = home
        os.chdir(project)
        Path(project, "hot.toml").write_text("[hot.plan]\nmax_concurrent = 16\n")
        k = Kernel(project, cap)
        try:
            k.run(f"%%hotbox {IMAGE}\nprint('warm-up')")
            run_docker("print('warm-up')")
            for _ in range(args.runs):
                lat["cold"].append(_latency(k.run(f"%%hotbox {IMAGE}\n{hello}")))
                lat["script"].append(_latency(k.run(f"%%script {sys.executable} -u\n{hello}")))
                lat["docker"].append(run_docker(hello).latency)
            k.run("%hotbox config --pool 1")
            for _ in range(args.runs):
                k.run(f"from hotbox_jupyter import box as _hb\n_hb.warm({warm_conf}, wait=60)\n"
                      "import time as _t\n_t.sleep(0.2)")
                lat["warm"].append(_latency(k.run(f"%%hotbox {IMAGE}\n{hello}")))
            k.run("%hotbox config --pool off")
            for _ in range(args.tp_runs):
                tput["hotbox"].append(_mbps(k.run(f"%%hotbox {IMAGE}\n{code}")))
                tput["script"].append(_mbps(k.run(f"%%script {sys.executable} -u\n{script_code}")))
                tput["kernel"].append(_mbps(k.run(code)))
                tput["docker"].append(run_docker(code).mbps)
        finally:
            k.close()
        from hotbox_jupyter import box
        from hotbox_jupyter.box.storage import unmount_storage

        try:
            for _ in range(args.tp_runs):
                tput["events"].append(run_box_events(code).mbps)
        finally:
            box._reset_for_tests()
            unmount_storage(Path(home))
            os.chdir("/")

    rep = Report("magic_latency", f"%%hotbox through a real kernel: first output of `{hello}` ({args.runs} runs) "
                                  f"and throughput of {args.mb:g} MB of 100-byte lines ({args.tp_runs} runs)")
    rep.add("first output", "%%hotbox, cold (pools off)", "s", lat["cold"], ("docker run --rm", lat["docker"]))
    rep.add("first output", "%%hotbox, cold (pools off)", "s", lat["cold"], ("%%script python3", lat["script"]))
    rep.add("first output", "%%hotbox, warm", "s", lat["warm"], ("docker run --rm", lat["docker"]))
    rep.add("first output", "%%hotbox, warm", "s", lat["warm"], ("%%script python3", lat["script"]))
    rep.add("throughput", "%%hotbox", "MB/s", tput["hotbox"], ("%%script python3", tput["script"]))
    rep.add("throughput", "%%hotbox", "MB/s", tput["hotbox"], ("the kernel printing it itself", tput["kernel"]))
    rep.add("throughput", "box.events, no kernel", "MB/s", tput["events"], ("docker run --rm pipe", tput["docker"]))
    warm_p50 = sorted(lat["warm"])[len(lat["warm"]) // 2] * 1000
    rep.notes.append(f"Warm %%hotbox first output target <= 25 ms p50: {'met' if warm_p50 <= 25 else 'NOT met'} "
                     f"({warm_p50:.0f} ms). Throughput ratios: higher is better; the kernel printing the lines "
                     "itself is the display path's ceiling, box.events without a kernel what the box side delivers.")
    rep.context = {"image": IMAGE, "runs": args.runs, "mb": args.mb, "tp_runs": args.tp_runs}
    rep.save()
    return 0


def _latency(s: Sample | None) -> float:
    if s is None:
        raise RuntimeError("the cell printed nothing")
    return s.latency


def _mbps(s: Sample | None) -> float:
    if s is None:
        raise RuntimeError("the cell printed nothing")
    return s.mbps


if __name__ == "__main__":
    sys.exit(main())
