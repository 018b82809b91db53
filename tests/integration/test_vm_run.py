"""One-shot runs in real QEMU microVMs (TCG on the build machines): every point of the seed's
VmConfig/VmResult contract, proven by booting the hotbox/python image."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from vm_support import (
    drop_session_cache,  # noqa: F401 - the session-end cleanup of the caches
    run_dirs,
    vm_processes,
)

from hotbox_jupyter.errors import VmTimeoutError
from hotbox_jupyter.events import Event, Exit, Progress, ResultValue, StdoutChunk
from hotbox_jupyter.hotcell.backend import RootfsHandle, RunInfo
from hotbox_jupyter.hotcell.config import SharedDir, VmConfig, VmResult
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.models import ExitReason
from hotbox_jupyter.paths import runtimes_dir

pytestmark = [pytest.mark.vm, pytest.mark.docker, pytest.mark.slow]


def run(backend: QemuBackend, handle: RootfsHandle, config: VmConfig) -> VmResult:
    return anyio.run(backend.run, config, handle)


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    assert vm_processes(os.getpid()) == []
    assert run_dirs() == []


def test_exit_code_console_result_and_resources(backend: QemuBackend, handle: RootfsHandle) -> None:
    code = textwrap.dedent("""
        import json, os, sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        mem = int(open("/proc/meminfo").read().split()[1]) // 1024
        json.dump({"cpus": os.cpu_count(), "mem_mib": mem, "cwd": os.getcwd(), "env": os.environ.get("GREETING"),
                   "ifaces": sorted(os.listdir("/sys/class/net"))}, open("/hotcell/result.json", "w"))
        sys.exit(3)
    """)
    cfg = VmConfig.for_size("medium", command=["python3", "-c", code], vcpus=2, workdir="/srv/work",
                            env=[("GREETING", "hello vm")])
    result = run(backend, handle, cfg)
    assert result.exit_code == 3 and result.reason is ExitReason.EXITED
    assert "to stdout\n" in result.console_output and "to stderr\n" in result.console_output
    # Kernel messages live on their own channel: the console is the command's output alone.
    assert result.console_output.replace("to stdout\n", "").replace("to stderr\n", "") == ""
    assert result.result["cpus"] == 2
    assert cfg.memory_mib - 100 < result.result["mem_mib"] <= cfg.memory_mib
    assert result.result["cwd"] == "/srv/work" and result.result["env"] == "hello vm"
    assert result.result["ifaces"] == ["lo"]  # network is off unless asked for
    probe = QemuBackend.probe()
    assert result.accel == probe.accel and result.backend == "qemu"
    assert result.duration and result.boot_seconds and result.boot_seconds < result.duration


def test_seed_python_handler_example(backend: QemuBackend, handle: RootfsHandle, tmp_path: Path) -> None:
    """The seed's handler.py, laid out as its Dockerfile does (/opt/hotcell), run with its exact config."""
    app = tmp_path / "hotcell"
    app.mkdir()
    shutil.copy(runtimes_dir() / "python" / "wrapper.py", app / "wrapper.py")
    shutil.copy(runtimes_dir() / "python" / "examples" / "handler.py", app / "handler.py")
    cfg = VmConfig(command=["python3", "/opt/hotcell/wrapper.py"], env=[("HOTCELL_INPUT", '{"name": "hotcell"}')],
                   memory_mib=512, timeout=60, shared_dirs=[SharedDir(host_path=app, guest_path="/opt/hotcell")])
    result = run(backend, handle, cfg)
    assert result.result == {"greeting": "Hello, hotcell!"}
    assert "Processing hotcell" in result.console_output
    assert result.exit_code == 0


def test_handler_exception_is_a_structured_error(backend: QemuBackend, handle: RootfsHandle, tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("def main(ctx):\n    raise KeyError(ctx['missing'])\n")
    cfg = VmConfig(command=["python3", "/opt/hotbox/python/wrapper.py"],
                   env={"HOTCELL_INPUT": "{}", "HOTCELL_HANDLER": "/app/handler.py"},
                   shared_dirs=[SharedDir(host_path=tmp_path, guest_path="/app", read_only=True)])
    result = run(backend, handle, cfg)
    assert result.exit_code == 1
    assert "Traceback" in result.console_output and "KeyError: 'missing'" in result.console_output
    assert result.result["error"]["type"] == "KeyError"
    assert result.result["error"]["traceback"]


def test_timeout_kills_the_vm(backend: QemuBackend, handle: RootfsHandle) -> None:
    cfg = VmConfig(command=["sh", "-c", "echo started; sleep 600"], timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(VmTimeoutError, match="timeout") as info:
        run(backend, handle, cfg)
    partial = info.value.result  # type: ignore[attr-defined]
    assert partial.reason is ExitReason.TIMEOUT and partial.exit_code == 124
    assert partial.console_output == "started\n"
    assert time.monotonic() - t0 < 60


def test_guest_out_of_memory(backend: QemuBackend, handle: RootfsHandle) -> None:
    hog = "x = []\nwhile True:\n    x.append(b'x' * (8 << 20))"
    result = run(backend, handle, VmConfig(command=["python3", "-c", hog], memory_mib=160))
    assert result.exit_code != 0
    assert result.reason is ExitReason.OOM
    assert "out of memory" in result.message and "memory_mib=160" in result.message


def test_shared_dirs_read_write_and_read_only(backend: QemuBackend, handle: RootfsHandle, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "in.txt").write_text("from the host\n")
    script = ("cat /in/in.txt; echo guest > /out/made.txt && echo rw-ok; "
              "echo no > /in/new.txt || echo ro-refused; "
              "mount -o remount,rw /in 2>/dev/null; echo no > /in/new2.txt || echo still-refused")
    cfg = VmConfig(command=["sh", "-c", script],
                   shared_dirs=[SharedDir(host_path=ro, guest_path="/in", read_only=True),
                                SharedDir(host_path=rw, guest_path="/out")])
    result = run(backend, handle, cfg)
    out = result.console_output
    assert "from the host" in out and "rw-ok" in out and "ro-refused" in out
    # Read-only is enforced on the host side: remounting in the guest does not help.
    assert "still-refused" in out
    assert (rw / "made.txt").read_text() == "guest\n"
    assert sorted(p.name for p in ro.iterdir()) == ["in.txt"]


def test_network_is_off_unless_internet(backend: QemuBackend, handle: RootfsHandle) -> None:
    script = "ls /sys/class/net | tr '\\n' ' '; echo; ip route 2>/dev/null || cat /proc/net/route"
    off = run(backend, handle, VmConfig(command=["sh", "-c", script]))
    assert off.console_output.splitlines()[0].split() == ["lo"]
    on = run(backend, handle, VmConfig(command=["sh", "-c", script + "; cat /etc/resolv.conf"], tsi="inet"))
    lines = on.console_output.splitlines()
    assert lines[0].split() == ["eth0", "lo"]
    # There is no outside network on the build machines: an interface and a default route is the proof.
    assert any(("default via 10.0.2.2" in ln) or ("eth0\t00000000\t0202000A" in ln) for ln in lines[1:])
    assert "nameserver 10.0.2.3" in on.console_output


def test_run_stream_is_live(backend: QemuBackend, handle: RootfsHandle) -> None:
    arrivals: list[tuple[float, Event]] = []
    info = RunInfo()

    async def go() -> None:
        stream = backend.run_stream(VmConfig(command=["sh", "-c", "echo first; sleep 2; echo second"]), handle,
                                    info=info)
        async for ev in stream:
            arrivals.append((time.monotonic(), ev))

    anyio.run(go)
    events = [ev for _, ev in arrivals]
    assert isinstance(events[0], Progress) and info.accel in events[0].text.lower()
    first = next(t for t, ev in arrivals if isinstance(ev, StdoutChunk) and "first" in ev.text)
    second = next(t for t, ev in arrivals if isinstance(ev, StdoutChunk) and "second" in ev.text)
    assert second - first > 1.0  # the first line was delivered while the command still ran
    assert events[-1] == Exit(ExitReason.EXITED, 0, "exited with code 0")
    assert not any(isinstance(ev, ResultValue) for ev in events)


CHILD = """
import anyio, sys
from pathlib import Path
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.backend import RootfsHandle

async def main():
    backend = QemuBackend()
    handle = RootfsHandle.model_validate_json(sys.argv[1])
    async for ev in backend.run_stream(VmConfig(command=["sh", "-c", "echo guest-running; sleep 600"]), handle):
        print(type(ev).__name__, getattr(ev, "text", ""), flush=True)

anyio.run(main)
"""


def test_sigkilled_host_process_leaves_nothing(backend: QemuBackend, handle: RootfsHandle, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """QEMU dies with its owner (PR_SET_PDEATHSIG); the next backend removes the run directory."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with subprocess.Popen([sys.executable, str(script), handle.model_dump_json()], stdout=subprocess.PIPE,
                          text=True, env=os.environ.copy()) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "guest-running" in line:
                    break
            assert vm_processes(proc.pid), "the child's VM should be running"
            assert len(run_dirs()) == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    deadline = time.monotonic() + 10
    while vm_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm_processes(proc.pid) == []
    assert len(run_dirs()) == 1  # the state file stays until someone reaps it...
    QemuBackend()  # ...which the next backend does when it starts
    assert run_dirs() == []
    assert "killed" not in caplog.text  # nothing was left to kill: QEMU had died with its owner


def test_result_json_that_is_not_json_is_reported(backend: QemuBackend, handle: RootfsHandle) -> None:
    result = run(backend, handle, VmConfig(command=["sh", "-c", "echo '{broken' > /hotcell/result.json"]))
    assert result.exit_code == 0 and result.result is None
    assert "not JSON" in result.message
    ok = run(backend, handle, VmConfig(command=["sh", "-c", "echo '[1, \"two\"]' > /hotcell/result.json; exit 0"]))
    assert ok.result == [1, "two"]
    assert json.loads(ok.model_dump_json())["result"] == [1, "two"]
