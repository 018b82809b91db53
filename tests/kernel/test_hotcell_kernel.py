"""The "Hotcell Python" kernel in a real kernel process, over the Jupyter protocol, with a real microVM.

One kernel serves the module (its first cell boots the VM); the last test shuts it down and checks that
no QEMU of the kernel's is left. The VMs carry the kernel's pid, not pytest's, so the suite's own leak
check cannot see them: the fixture checks them itself.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernel_protocol import execute, running_kernel

from hotbox_jupyter import demo
from hotbox_jupyter.kernel import KERNEL_NAME
from hotbox_jupyter.kernel.install import install

pytestmark = [pytest.mark.kernel, pytest.mark.vm, pytest.mark.docker]


def vm_processes(pid: int) -> list[str]:
    """Processes whose argv says they belong to ``pid`` (QEMU, virtiofsd)."""
    out = subprocess.run(["pgrep", "-af", f"hotbox-owner={pid}( |\\.|$)"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """The kernelspec as ``hotbox kernel install --prefix`` writes it, in a directory of the test's own."""
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    ksm = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    dest = install(prefix=str(prefix), ksm=ksm)
    assert dest == prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME
    return ksm


@pytest.fixture(scope="module")
def kernel(kernelspecs: KernelSpecManager) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernelspecs)
    assert km.kernel_spec is not None and km.kernel_spec.display_name == "Hotcell Python"
    pid = -1
    try:
        with running_kernel(km) as (kc, pid):
            yield km, kc
    finally:
        leaked = vm_processes(pid) if pid > 0 else []
        for line in leaked:  # kill what the assertion below reports, so one failure does not leak VMs
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        assert not leaked, f"VM processes left behind by the kernel: {leaked}"


def of_type(result: dict[str, Any], msg_type: str) -> list[dict[str, Any]]:
    return [m["content"] for _, m in result["messages"] if m["msg_type"] == msg_type]


def text(result: dict[str, Any], name: str = "stdout") -> str:
    return "".join(c["text"] for c in of_type(result, "stream") if c["name"] == name)


def test_first_cell_boots_the_vm_and_state_persists(kernel: Any) -> None:
    _km, kc = kernel
    info = kc.kernel_info(reply=True, timeout=30)["content"]
    assert info["language_info"]["name"] == "python" and info["implementation"] == "hotcell"
    r = execute(kc, "import os\nsecret = 41\nprint('pid', os.getpid())")
    assert r["status"] == "ok", r
    assert "booting microVM" in text(r, "stderr")
    assert "pid " in text(r)
    r = execute(kc, "secret += 1\nprint(open('/proc/cmdline').read())")
    assert r["status"] == "ok", r
    assert "booting" not in text(r, "stderr"), "the second cell reuses the VM"
    assert "hotbox-owner=" in text(r), "the cell ran in the guest, not in the kernel process"


def test_stream_messages_arrive_live_and_separately(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "import time\nfor i in range(5):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.2)")
    assert r["status"] == "ok", r
    ticks = [(t, m["content"]["text"]) for t, m in r["messages"]
             if m["msg_type"] == "stream" and m["content"]["text"].startswith("tick")]
    assert [s for _, s in ticks] == [f"tick {i}\n" for i in range(5)], ticks
    stamps = [t for t, _ in ticks]
    assert stamps[-1] - stamps[0] >= 0.6, "the ticks arrived together: not streamed"
    assert sum(b - a >= 0.1 for a, b in itertools.pairwise(stamps)) >= 3


def test_last_expression_is_an_execute_result(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "secret")
    assert r["status"] == "ok", r
    (res,) = of_type(r, "execute_result")
    assert res["data"]["text/plain"] == "42"
    assert res["execution_count"] == r["execution_count"]


def test_rich_objects_are_display_data(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "class Rich:\n    def _repr_html_(self):\n        return '<b>rich</b>'\n"
                    "display(Rich())\n"
                    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert r["status"] == "ok", r
    bundles = [c["data"] for c in of_type(r, "display_data")]
    assert any(b.get("text/html") == "<b>rich</b>" for b in bundles), bundles
    assert any("image/png" in b for b in bundles), [list(b) for b in bundles]


def test_an_exception_is_an_error_and_the_next_cell_works(kernel: Any) -> None:
    _km, kc = kernel
    r = execute(kc, "1 / 0")
    assert r["status"] == "error" and r["ename"] == "ZeroDivisionError", r
    (err,) = of_type(r, "error")
    assert err["ename"] == "ZeroDivisionError" and err["traceback"]
    r = execute(kc, "print(secret * 2)")
    assert r["status"] == "ok" and text(r) == "84\n", r


def test_interrupt_stops_the_cell_and_state_survives(kernel: Any) -> None:
    km, kc = kernel
    sent: list[float] = []

    def interrupt_once_started(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"] and not sent:
            sent.append(time.monotonic())
            km.interrupt_kernel()

    r = execute(kc, "import time\nbefore = 'kept'\nprint('sleeping', flush=True)\ntime.sleep(60)\nprint('never')",
                on_message=interrupt_once_started, timeout=60)
    assert sent, "the cell never started"
    assert time.monotonic() - sent[0] < 15, "the interrupt was not prompt"
    assert r["status"] == "error" and r["ename"] == "KeyboardInterrupt", r
    assert "never" not in text(r)
    r = execute(kc, "print(before, secret)")
    assert r["status"] == "ok" and text(r) == "kept 42\n", r


def shell_reply(kc: BlockingKernelClient, msg_id: str) -> dict[str, Any]:
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=30)
    return reply["content"]  # type: ignore[no-any-return]


def test_is_complete_and_complete(kernel: Any) -> None:
    _km, kc = kernel
    assert shell_reply(kc, kc.is_complete("x = 1"))["status"] == "complete"
    reply = shell_reply(kc, kc.is_complete("for i in range(3):"))
    assert reply["status"] == "incomplete" and reply["indent"] == "    "
    assert shell_reply(kc, kc.is_complete("x = = 1"))["status"] == "invalid"
    assert "print" in shell_reply(kc, kc.complete("pri"))["matches"]


def test_shutdown_stops_the_vm(kernel: Any) -> None:
    km, _kc = kernel
    pid = km.provisioner.process.pid
    assert vm_processes(pid), "the kernel's VM is running"
    km.shutdown_kernel(now=False)
    deadline = time.monotonic() + 20
    while vm_processes(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not vm_processes(pid)


def test_a_vm_that_cannot_boot_makes_each_cell_an_error(tmp_path: Path) -> None:
    # A spec whose env asks for a size that does not exist, as `hotbox kernel install --size` would write
    # it without the CLI's check: the kernel starts, and each cell says what is wrong.
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    install(prefix=str(tmp_path), ksm=ksm, env={"HOTCELL_SIZE": "gigantic"})
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.start_kernel(env={**os.environ, "PYTHONWARNINGS": "ignore"})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        for _ in range(2):
            r = execute(kc, "print('hi')", timeout=60)
            assert r["status"] == "error" and r["ename"] == "ConfigError", r
            assert "HOTCELL_SIZE" in r["evalue"] and "gigantic" in r["evalue"]
            assert of_type(r, "error")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


@pytest.mark.slow
def test_demo_notebook_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (notebook,) = [p for p in demo.default_notebooks() if p.name == "hotcell_kernel_demo.ipynb"]
    code = demo.main([str(notebook), "--save", str(tmp_path / "executed.ipynb")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "(kernel hotcell-python)" in printed and "booting microVM" in printed
    assert "image/png" in printed and "counter is still 42" in printed
