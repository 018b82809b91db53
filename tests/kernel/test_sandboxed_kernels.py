"""Hot Box Python and Hotcell Python as a user meets them, over the Jupyter protocol, with real sandboxes:
IPython features from the guest, comms and widgets, interrupt and its escalation, a guest that dies,
restart, SIGKILL of the host kernel, and what is left behind (nothing).

One kernel per kind serves the module's state-keeping tests; the tests that kill things start their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernel_protocol import execute, kernelspecs, running_kernel

from hotbox_jupyter import box
from hotbox_jupyter.owner import LABEL_OWNER_PID
from hotbox_jupyter.settings import load_settings

pytestmark = [pytest.mark.kernel, pytest.mark.docker, pytest.mark.slow]

KINDS = [pytest.param("hotbox-python", id="box"),
         pytest.param("hotcell-python", id="vm", marks=pytest.mark.vm)]
READY = {"hotbox-python": 60.0, "hotcell-python": 240.0}
KINDS_NAMES = {"box": "hotbox-python", "vm": "hotcell-python"}


def kernel_containers(pid: int) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=io.hotbox.kernel",
                          "--filter", f"label={LABEL_OWNER_PID}={pid}"], capture_output=True, text=True).stdout
    return out.split()


def vm_processes(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"hotbox-owner={pid}( |\\.|$)"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def qemu_pids(pid: int) -> list[int]:
    return [int(line.split()[0]) for line in vm_processes(pid) if "qemu-system" in line.split()[1]]


def kernel_dirs(pid: int) -> list[Path]:
    root = Path(os.environ["HOTBOX_HOME"]) / "state" / "kernels"
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((d / "owner.json").read_text())["pid"] == pid:
                found.append(d)
    return found


def leftovers(pid: int) -> list[str]:
    return [*kernel_containers(pid), *vm_processes(pid), *map(str, kernel_dirs(pid))]


def clean_up(pid: int) -> None:
    """Remove what a failed test left, so that one failure does not leak sandboxes into the suite."""
    for cid in kernel_containers(pid):
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    for line in vm_processes(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@contextlib.contextmanager
def sandboxed_kernel(name: str, ksm: KernelSpecManager | None = None, ready_timeout: float | None = None,
                     ) -> Iterator[tuple[KernelManager, BlockingKernelClient, int]]:
    """A running kernel of kind ``name``; afterwards its sandbox must be gone."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm or kernelspecs())
    pid = -1
    try:
        with running_kernel(km, ready_timeout=ready_timeout or READY.get(name, 60)) as (kc, pid):
            yield km, kc, pid
        deadline = time.monotonic() + 15
        while leftovers(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers(pid), f"left behind by {name} after shutdown: {leftovers(pid)}"
    finally:
        if pid > 0:
            clean_up(pid)


@pytest.fixture(scope="module", params=KINDS)
def kernel(request: pytest.FixtureRequest) -> Iterator[tuple[str, KernelManager, BlockingKernelClient, int]]:
    with sandboxed_kernel(request.param) as (km, kc, pid):
        yield request.param, km, kc, pid


def of_type(result: dict[str, Any], msg_type: str) -> list[dict[str, Any]]:
    return [m["content"] for _, m in result["messages"] if m["msg_type"] == msg_type]


def out(result: dict[str, Any], name: str = "stdout") -> str:
    return "".join(c["text"] for c in of_type(result, "stream") if c["name"] == name)


def value(result: dict[str, Any]) -> str:
    return str(of_type(result, "execute_result")[0]["data"]["text/plain"])


def test_ipython_in_the_sandbox(kernel: Any) -> None:
    name, _km, kc, _pid = kernel
    r = execute(kc, "import os\nsandboxed_answer = 41 + 1\nprint(os.getpid(), os.uname().nodename)")
    assert r["status"] == "ok", r
    nodename = out(r).split()[1]
    assert nodename != os.uname().nodename and (name != "hotbox-python" or nodename == "hotbox")
    # completion of a name defined in an earlier cell: IPython's completer, in the guest
    reply = kc.complete("sandboxed_an", reply=True, timeout=30)["content"]
    assert "sandboxed_answer" in reply["matches"]
    r = execute(kc, "!uname -s\n%timeit -n1 -r1 sum(range(10))")
    assert r["status"] == "ok", r
    assert "Linux" in out(r) and "per loop" in out(r)
    info = kc.kernel_info(reply=True, timeout=30)["content"]
    assert info["implementation"] == "ipython" and info["language_info"]["name"] == "python"
    assert ("Hot Box Python" if name == "hotbox-python" else "Hotcell Python") in info["banner"]


def test_kernel_info_requests_asked_at_once_each_get_their_answer(kernel: Any) -> None:
    """The relay answers kernel_info requests that arrive while one is with the guest from that one's reply
    (a client polls kernel_info while a sandbox starts): each still gets its own reply, busy and idle."""
    name, _km, kc, _pid = kernel
    asked = [kc.kernel_info() for _ in range(3)]
    replies: dict[str, dict[str, Any]] = {}
    states: dict[str, list[str]] = {m: [] for m in asked}
    deadline = time.monotonic() + 60
    while (len(replies) < 3 or any(len(v) < 2 for v in states.values())) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            reply = kc.get_shell_msg(timeout=0.1)
            if reply["parent_header"].get("msg_id") in states:  # not a leftover of wait_for_ready's polling
                replies[reply["parent_header"]["msg_id"]] = reply["content"]
        with contextlib.suppress(queue.Empty):
            msg = kc.get_iopub_msg(timeout=0.1)
            if msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") in states:
                states[msg["parent_header"]["msg_id"]].append(msg["content"]["execution_state"])
    assert sorted(replies) == sorted(asked), replies
    assert all(v == ["busy", "idle"] for v in states.values()), states
    for content in replies.values():
        assert content["implementation"] == "ipython", content
        assert ("Hot Box Python" if name == "hotbox-python" else "Hotcell Python") in content["banner"]


def test_input_goes_over_the_stdin_channel(kernel: Any) -> None:
    _name, _km, kc, _pid = kernel
    msg_id = kc.execute("answer = input('your name? ')\nprint('hello', answer)", allow_stdin=True)
    req = kc.get_stdin_msg(timeout=60)
    assert req["msg_type"] == "input_request" and req["content"]["prompt"] == "your name? "
    kc.input("sandbox")
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "ok"
    assert value(execute(kc, "answer")) == "'sandbox'"


def test_comms_round_trip_and_widgets(kernel: Any) -> None:
    _name, _km, kc, _pid = kernel
    r = execute(kc, "def _echo(comm, msg):\n"
                    "    comm.on_msg(lambda m: comm.send({'echo': m['content']['data']}))\n"
                    "get_ipython().kernel.comm_manager.register_target('hotbox-echo', _echo)")
    assert r["status"] == "ok", r
    comm_id = uuid.uuid4().hex
    kc.shell_channel.send(kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "hotbox-echo",
                                                       "data": {}}))
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"n": 7}}))
    deadline = time.monotonic() + 60
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == comm_id:
            assert msg["content"]["data"] == {"echo": {"n": 7}}
            break
    # a comm the guest opens, and a widget: they reach the front end
    r = execute(kc, "import ipywidgets\nslider = ipywidgets.IntSlider(value=3)\ndisplay(slider)\n"
                    "ipywidgets.__version__")
    assert r["status"] == "ok", r
    opens = of_type(r, "comm_open")
    assert any(o["target_name"] == "jupyter.widget" and o["data"]["state"].get("value") == 3 for o in opens)
    assert any("application/vnd.jupyter.widget-view+json" in d["data"] for d in of_type(r, "display_data"))
    assert value(r).strip("'").startswith("8.")


def wait_for_output(kc: BlockingKernelClient, msg_id: str, text: str, timeout: float = 120) -> None:
    """Until the cell ``msg_id`` printed ``text``: it runs, so an interrupt now hits the cell itself."""
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                and text in msg["content"]["text"]):
            return


def interrupt_a_running_cell(km: KernelManager, kc: BlockingKernelClient) -> None:
    """Interrupt a cell once it runs; its reply must say KeyboardInterrupt."""
    msg_id = kc.execute("import time\nprint('started', flush=True)\nfor _ in range(600): time.sleep(0.1)")
    wait_for_output(kc, msg_id, "started")
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"


def test_interrupt_stops_the_cell_and_keeps_state(kernel: Any) -> None:
    _name, km, kc, _pid = kernel
    assert execute(kc, "kept = 'still here'")["status"] == "ok"
    interrupt_a_running_cell(km, kc)
    assert value(execute(kc, "kept")) == "'still here'"


def test_a_cell_that_ignores_the_interrupt_is_stopped_and_the_next_gets_a_fresh_sandbox(kernel: Any) -> None:
    _name, km, kc, _pid = kernel
    msg_id = kc.execute("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                        "print('started', flush=True)\ntime.sleep(600)")
    wait_for_output(kc, msg_id, "started")
    t0 = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=60)
    assert time.monotonic() - t0 < 30
    content = reply["content"]
    assert content["status"] == "error" and "did not stop within" in content["evalue"], content
    r = execute(kc, "1 + 1")
    assert r["status"] == "ok" and value(r) == "2"
    assert "fresh one" in out(r, "stderr")


def test_a_guest_that_runs_out_of_memory_is_said_plainly_and_the_next_cell_runs(kernel: Any) -> None:
    _name, _km, kc, _pid = kernel
    # 32 MB at a time, each written: the allocations succeed until the memory limit's OOM killer acts
    r = execute(kc, "hog = [b'x' * (32 << 20) for _ in range(128)]", timeout=240)
    assert r["status"] == "error", r
    assert "memory" in r["evalue"].lower(), r["evalue"]
    assert [e["evalue"] for e in of_type(r, "error")] == [r["evalue"]]
    r = execute(kc, "'alive'")
    assert r["status"] == "ok" and value(r) == "'alive'"


def test_a_guest_kernel_panic_is_said_plainly_and_the_next_cell_gets_a_fresh_vm(kernel: Any) -> None:
    name, _km, kc, pid = kernel
    if name != "hotcell-python":
        pytest.skip("a container shares the host's kernel: only the microVM has a kernel of its own to panic")
    (qemu,) = qemu_pids(pid)
    # root in the guest asks its kernel to crash (sysrq 'c'): a real panic, "Kernel panic" on the console
    r = execute(kc, "print('crashing', flush=True)\nopen('/proc/sysrq-trigger', 'w').write('c')", timeout=120)
    assert r["status"] == "error" and r["ename"] == "SandboxDied", r
    assert "the microVM's kernel panicked: Kernel panic" in r["evalue"] and "QEMU has exited" in r["evalue"], r
    with pytest.raises(ProcessLookupError):
        os.kill(qemu, 0)
    r = execute(kc, "'fresh'", timeout=240)
    assert r["status"] == "ok" and value(r) == "'fresh'", r
    assert "fresh one" in out(r, "stderr") and "panicked" in out(r, "stderr")
    assert qemu_pids(pid) not in ([], [qemu])


def test_the_sandbox_has_no_network(kernel: Any) -> None:
    _name, _km, kc, _pid = kernel
    r = execute(kc, "import socket\ns = socket.socket(); s.settimeout(3)\n"
                    "try:\n    s.connect(('1.1.1.1', 53)); print('CONNECTED')\n"
                    "except OSError as e:\n    print('refused', e)")
    assert r["status"] == "ok" and "refused" in out(r) and "CONNECTED" not in out(r)


@pytest.mark.parametrize("kind", ["box", pytest.param("vm", marks=pytest.mark.vm)])
def test_a_kernel_installed_with_network_internet_reaches_a_server(kind: str, tmp_path: Path) -> None:
    """The other half of the test above: ``--network internet`` lets the sandbox out, here to a server
    of this test on the Docker bridge's gateway (the host, as a box on the default bridge reaches it;
    a microVM's user networking reaches every host address)."""
    import socket
    import threading

    from hotbox_jupyter.kernel.install import install

    gateway = subprocess.run(["docker", "network", "inspect", "bridge", "--format",
                              "{{(index .IPAM.Config 0).Gateway}}"], capture_output=True, text=True,
                             check=True).stdout.strip()
    token = uuid.uuid4().hex
    with socket.create_server((gateway, 0)) as server:
        server.settimeout(240)
        port = server.getsockname()[1]

        def answer() -> None:
            with contextlib.suppress(OSError), server.accept()[0] as conn:
                conn.sendall(f"hello {token}\n".encode())

        threading.Thread(target=answer, daemon=True).start()
        name = f"{KINDS_NAMES[kind]}-internet-test"
        install(kind, prefix=str(tmp_path), network="internet", name=name)
        ksm = kernelspecs()
        ksm.kernel_dirs.append(str(tmp_path / "share/jupyter/kernels"))
        with sandboxed_kernel(name, ksm, READY[KINDS_NAMES[kind]]) as (_km, kc, _pid):
            r = execute(kc, f"import socket\nwith socket.create_connection(({gateway!r}, {port}), timeout=20) as s:\n"
                            "    print(s.recv(100).decode(), end='')")
            assert r["status"] == "ok" and out(r) == f"hello {token}\n", r
            info = kc.kernel_info(reply=True, timeout=30)["content"]
            assert "network internet" in info["banner"], info["banner"]


def test_box_sockets_are_the_owners_only(kernel: Any) -> None:
    name, _km, _kc, pid = kernel
    if name != "hotbox-python":
        pytest.skip("the microVM kernel's sockets are forwarded ports (see the port test)")
    (d,) = kernel_dirs(pid)
    assert d.stat().st_mode & 0o777 == 0o700
    socks = sorted((d / "ipc").iterdir())
    assert len(socks) == 5
    for s in socks:
        assert s.stat().st_mode & 0o077 == 0, (s, oct(s.stat().st_mode))


def test_vm_forwarded_ports_listen_on_loopback_only(kernel: Any) -> None:
    name, _km, _kc, pid = kernel
    if name != "hotcell-python":
        pytest.skip("the container kernel has no ports: ipc sockets in a 0700 directory")
    qemu = [int(line.split()[0]) for line in vm_processes(pid) if "qemu" in line]
    assert qemu
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    # the kernel's VM of the moment (an earlier one of this kernel may still be going away)
    mine = [line for line in listening.splitlines() if any(f"pid={q}," in line for q in qemu)]
    assert len(mine) >= 5, listening
    assert all(line.split()[3].startswith("127.0.0.1:") for line in mine), mine


@pytest.mark.parametrize("name", KINDS)
def test_restart_gives_a_fresh_sandbox_and_leaves_nothing(name: str) -> None:
    with sandboxed_kernel(name) as (km, kc, pid):
        assert execute(kc, "before_restart = 1")["status"] == "ok"
        km.restart_kernel(now=False)
        new_pid = km.provisioner.process.pid  # type: ignore[union-attr]
        assert new_pid != pid
        try:
            kc.wait_for_ready(timeout=READY[name])
            deadline = time.monotonic() + 15
            while leftovers(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not leftovers(pid), leftovers(pid)
            r = execute(kc, "before_restart")
            assert r["status"] == "error" and r["ename"] == "NameError"
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
            clean_up(new_pid)
            assert not leftovers(new_pid)


def kernel_ledger_rows(pid: int) -> list[tuple[str, float | None, float | None]]:
    """(task_id, ended_at, cus) of the ledger rows billed by the host kernel ``pid``."""
    with contextlib.closing(sqlite3.connect(load_settings().ledger_path)) as db:
        return db.execute("SELECT task_id, ended_at, cus FROM tasks WHERE kind='kernel' AND owner_pid=?",
                          (pid,)).fetchall()


def test_a_kernels_sandbox_is_billed_in_the_projects_ledger() -> None:
    """Kernels count against the plan like boxes: a row while the sandbox runs, settled when it stops."""
    with sandboxed_kernel("hotbox-python") as (_km, kc, pid):
        assert execute(kc, "import time; time.sleep(1)")["status"] == "ok"
        rows = kernel_ledger_rows(pid)
        assert len(rows) == 1 and rows[0][1] is None, rows  # running, not settled yet
        assert box.quota().tasks_used >= 1
    deadline = time.monotonic() + 15
    while kernel_ledger_rows(pid)[0][1] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    (task_id, ended_at, cus), = kernel_ledger_rows(pid)
    assert task_id.startswith("kernel-") and ended_at is not None
    assert cus is not None and cus > 0  # at least the second the cell slept, times the size's multiplier


@pytest.mark.parametrize("name", KINDS)
def test_sigkill_of_the_host_kernel_leaves_nothing_after_the_next_start(name: str) -> None:
    km = KernelManager(kernel_name=name, kernel_spec_manager=kernelspecs())
    with running_kernel(km, ready_timeout=READY[name]) as (kc, pid):
        assert execute(kc, "1")["status"] == "ok"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    try:
        with sandboxed_kernel(name) as (_km2, kc2, _pid2):  # its start reaps what the killed one left
            assert execute(kc2, "2")["status"] == "ok"
            deadline = time.monotonic() + 15
            while leftovers(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not leftovers(pid), leftovers(pid)
    finally:
        clean_up(pid)


def test_a_kernel_that_cannot_start_its_sandbox_says_why(tmp_path: Path) -> None:
    """An image without ipykernel: each cell fails with the reason instead of hanging."""
    from hotbox_jupyter.kernel.install import install

    ksm = kernelspecs()
    prefix = tmp_path / "p"
    install("box", prefix=str(prefix), image="hotbox/shell", name="hotbox-shell-test")
    ksm.kernel_dirs.append(str(prefix / "share/jupyter/kernels"))
    km = KernelManager(kernel_name="hotbox-shell-test", kernel_spec_manager=ksm)
    with running_kernel(km) as (kc, pid):
        r = execute(kc, "1")
        assert r["status"] == "error", r
        assert "hotbox/shell" in r["evalue"] and ("python" in r["evalue"].lower()), r["evalue"]
    clean_up(pid)


@pytest.mark.parametrize("notebook", [pytest.param("hotbox_kernel_demo.ipynb", id="box"),
                                      pytest.param("hotcell_kernel_demo.ipynb", id="vm", marks=pytest.mark.vm)])
def test_demo_notebook_runs(notebook: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hotbox_jupyter import demo

    (path,) = [p for p in demo.default_notebooks() if p.name == notebook]
    assert demo.main([str(path), "--save", str(tmp_path / "executed.ipynb")]) == 0
    text = capsys.readouterr().out
    assert "Linux" in text and "per loop" in text and "'counter'" in text and "image/png" in text
    assert "counter is still 42" in text
