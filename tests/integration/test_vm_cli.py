"""``hotbox vm run | handler | probe`` as a user runs them: a real process, a real microVM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vm_support import (
    NODE_IMAGE,
    PYTHON_IMAGE,
    drop_session_cache,  # noqa: F401 - the session-end cleanup of the caches
    run_dirs,
    vm_processes,
)

from hotbox_jupyter.paths import runtimes_dir

pytestmark = [pytest.mark.vm, pytest.mark.docker, pytest.mark.slow]


def hotbox(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hotbox_jupyter.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def test_vm_run_streams_the_console_and_exits_with_the_guest_code() -> None:
    script = "import time, sys\nprint('line one', flush=True)\ntime.sleep(1.5)\nprint('line two')\nsys.exit(5)"
    t0 = time.monotonic()
    with subprocess.Popen([sys.executable, "-m", "hotbox_jupyter.cli", "vm", "run", "--size", "micro", PYTHON_IMAGE,
                           "--", "python3", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        first_at = time.monotonic()
        rest = proc.stdout.read()
        rest_at = time.monotonic()
        err = proc.stderr.read()
        code = proc.wait(timeout=300)
    assert first == "line one\n" and rest == "line two\n"
    assert rest_at - first_at > 1.0  # the first line came while the guest still ran
    assert code == 5
    assert "accel tcg" in err or "accel kvm" in err
    assert "backend qemu" in err and "exited with code 5" in err
    assert time.monotonic() - t0 < 300


def test_vm_run_timeout_and_unknown_backend() -> None:
    proc = hotbox("vm", "run", "--timeout", "1", "-q", PYTHON_IMAGE, "--", "sleep", "600")
    assert proc.returncode == 124
    assert "timeout" in proc.stderr
    proc = hotbox("vm", "run", "--backend", "firecracker", PYTHON_IMAGE, "--", "true")
    assert proc.returncode == 2
    assert "firecracker" in proc.stderr and "cannot run on this host" in proc.stderr
    proc = hotbox("vm", "run", "--memory", "8", PYTHON_IMAGE, "--", "true")
    assert proc.returncode == 2 and "memory-mib 8 is out of range" in proc.stderr


@pytest.mark.parametrize(("image", "handler"), [(PYTHON_IMAGE, "python/examples/handler.py"),
                                                (NODE_IMAGE, "node/examples/handler.js")])
def test_vm_handler_prints_the_vm_result(image: str, handler: str) -> None:
    proc = hotbox("vm", "handler", image, str(runtimes_dir() / handler), "--input", '{"name": "hotcell"}')
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["result"] == {"greeting": "Hello, hotcell!"}
    assert "Processing hotcell" in result["console_output"]
    assert result["exit_code"] == 0 and result["backend"] == "qemu" and result["accel"] in ("kvm", "tcg")


def test_vm_handler_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("")
    proc = hotbox("vm", "handler", PYTHON_IMAGE, str(tmp_path / "h.txt"))
    assert proc.returncode == 2 and "--lang" in proc.stderr
    proc = hotbox("vm", "handler", "--lang", "python", PYTHON_IMAGE, str(tmp_path / "h.txt"), "--input", "{oops")
    assert proc.returncode == 2 and "--input" in proc.stderr


def test_vm_probe_lists_every_backend_with_a_reason() -> None:
    proc = hotbox("vm", "probe", "--json")
    assert proc.returncode == 0
    probes = {p["name"]: p for p in json.loads(proc.stdout)}
    assert set(probes) == {"qemu", "firecracker", "libkrun"}
    assert probes["qemu"]["available"] and probes["qemu"]["accel"] in ("kvm", "tcg")
    for p in probes.values():
        assert p["reason"]
    text = hotbox("vm", "probe")
    assert "qemu" in text.stdout and "available" in text.stdout


def test_nothing_left_behind() -> None:
    assert vm_processes(os.getpid()) == []
    assert run_dirs() == []
