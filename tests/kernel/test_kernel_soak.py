"""Soak of the sandbox kernels: many cells through Hot Box Python and Hotcell Python with random interrupts.

The cells are sent in small batches, as a front end queues them: quick cells, cells that sleep and are
interrupted mid-run (a message-mode ``interrupt_request`` on the control channel), cells that raise,
cells that print a lot, cells that call ``display()``, and now and then an interrupt while the kernel
is idle. At the end:

* every ``execute_request`` got exactly one ``execute_reply``, with the status the protocol calls for:
  ``ok``; ``error`` (``KeyboardInterrupt`` for an interrupted cell); ``aborted`` for the cells queued
  behind a cell that failed (ipykernel aborts what is already queued when a cell fails);
* each cell's output is complete and in order: every cell prints a sequence of its own, its iopub
  messages lie between its ``busy`` and ``idle``, and no two cells' messages interleave;
* the kernel's state survived every interrupt: each cell that ran adds one to ``counter``, and the
  quick cells show it;
* the kernel's sandbox is billed in the project's ledger (kind ``kernel``), settled at shutdown, for
  about as long as the kernel lived;
* after shutdown nothing is left: no container, VM process, socket directory or forwarded port.

CI runs :data:`CI_CELLS` cells per kernel; ``HOTBOX_SOAK_CELLS=200`` (``make soak``) runs the full soak.
The seed of the random choices is printed, and ``HOTBOX_SOAK_SEED`` replays it.
"""

from __future__ import annotations

import os
import queue
import random
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_protocol import execute
from test_sandboxed_kernels import kernel_ledger_rows, sandboxed_kernel, vm_processes

from hotbox_jupyter.box.billing import Ledger
from hotbox_jupyter.settings import load_settings

pytestmark = [pytest.mark.kernel, pytest.mark.docker, pytest.mark.slow]

CI_CELLS = 30
CELLS = int(os.environ.get("HOTBOX_SOAK_CELLS", CI_CELLS))
KINDS = ["quick"] * 5 + ["interrupt"] * 2 + ["raise", "flood", "display"]
IDLE_INTERRUPT_P = 0.08
"""How often an interrupt is sent between batches, while no cell runs (it must change nothing)."""


@dataclass
class Cell:
    """One soak cell: what it runs, what it must print, and what happened to it."""

    n: int
    kind: str  # quick | interrupt | raise | flood | display
    lines: int = 3  # how many numbered lines it prints (flood: many, and long)
    delay: float = 0.0  # interrupt: seconds after its first output before the interrupt
    msg_id: str = ""
    sent: float = 0.0
    done: float = 0.0  # when its idle came
    replies: list[dict[str, Any]] = field(default_factory=list)
    iopub: list[dict[str, Any]] = field(default_factory=list)

    def code(self) -> str:
        head = f"counter += 1\nfor _i in range({self.lines}): print(f'c{self.n}:{{_i}}{self.pad}')\n"
        if self.kind == "quick":
            return head + f"({self.n}, counter)"
        if self.kind == "interrupt":
            return (head + f"print('c{self.n}:started', flush=True)\nimport time\n"
                    "for _ in range(1200): time.sleep(0.05)\nprint('not interrupted')")
        if self.kind == "raise":
            # the pause lets the cells queued behind it reach the guest first, so that they are aborted
            return head + f"import time\ntime.sleep(0.3)\nraise ValueError('c{self.n} raised')"
        if self.kind == "display":
            return (head + "from IPython.display import HTML, display\n"
                    f"display(HTML('<b>c{self.n}</b>'))\ndisplay({{'text/plain': 'c{self.n}:plain'}}, raw=True)")
        return head  # flood: the numbered lines are the output

    @property
    def pad(self) -> str:
        # A flood is bytes more than lines: a print costs a microVM's emulated CPU far more than its bytes.
        return " " + "x" * 100 if self.kind == "flood" else ""

    def expected_stdout(self) -> str:
        text = "".join(f"c{self.n}:{i}{self.pad}\n" for i in range(self.lines))
        return text + (f"c{self.n}:started\n" if self.kind == "interrupt" else "")


def _plan(count: int, rng: random.Random) -> list[list[Cell]]:
    """The cells in batches of one to three, sent together."""
    cells = []
    for n in range(count):
        kind = rng.choice(KINDS)
        cells.append(Cell(n, kind, lines=rng.randint(500, 1500) if kind == "flood" else rng.randint(1, 4),
                          delay=rng.uniform(0.0, 0.5) if kind == "interrupt" else 0.0))
    batches, i = [], 0
    while i < count:
        size = rng.choice([1, 1, 2, 3])
        batches.append(cells[i:i + size])
        i += size
    return batches


def _expected_statuses(batch: list[Cell]) -> list[str]:
    """ok / error per cell, and aborted for every cell behind the first failure of its batch."""
    out, failed = [], False
    for c in batch:
        if failed:
            out.append("aborted")
            continue
        failed = c.kind in ("interrupt", "raise")
        out.append("error" if failed else "ok")
    return out


class Driver:
    """Sends the batches, interrupts, and sorts every message by the cell it belongs to."""

    def __init__(self, kc: BlockingKernelClient) -> None:
        self.kc = kc
        self.by_id: dict[str, Cell] = {}
        self.order: list[str] = []  # msg_id of every iopub message of a soak cell, as received
        self.stray: list[dict[str, Any]] = []
        self.interrupts_sent = 0
        self.interrupt_replies: list[dict[str, Any]] = []

    def _pump(self, timeout: float) -> None:
        """Take whatever iopub and shell messages are there, waiting at most ``timeout`` for the first."""
        got = False
        for get, shell in ((self.kc.get_iopub_msg, False), (self.kc.get_shell_msg, True)):
            while True:
                try:
                    msg = get(timeout=0 if got else timeout / 2)
                except queue.Empty:
                    break
                got = True
                cell = self.by_id.get(msg["parent_header"].get("msg_id", ""))
                if cell is None:  # the start's kernel_info requests (several when the first was slow)
                    if msg["msg_type"] not in ("status", "kernel_info_reply"):
                        self.stray.append(msg)
                    continue
                if shell:
                    cell.replies.append(msg)
                else:
                    cell.iopub.append(msg)
                    self.order.append(cell.msg_id)
                    if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                        cell.done = time.monotonic()

    def interrupt(self) -> None:
        """A message-mode interrupt on the control channel, as JupyterLab sends it; waits for its reply."""
        msg = self.kc.session.msg("interrupt_request", {})
        self.kc.control_channel.send(msg)
        self.interrupts_sent += 1
        deadline = time.monotonic() + 60
        while True:
            reply = self.kc.get_control_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                self.interrupt_replies.append(reply)
                return

    def run_batch(self, batch: list[Cell], timeout: float = 120) -> None:
        for c in batch:
            c.msg_id = self.kc.execute(c.code())
            c.sent = time.monotonic()
            self.by_id[c.msg_id] = c
        deadline = time.monotonic() + timeout
        for c, status in zip(batch, _expected_statuses(batch), strict=True):
            if c.kind == "interrupt" and status == "error":
                while not any(m["msg_type"] == "stream" and f"c{c.n}:started" in m["content"]["text"]
                              for m in c.iopub):
                    assert time.monotonic() < deadline, f"cell {c.n} never started: {c.iopub}"
                    self._pump(0.05)
                time.sleep(c.delay)
                self.interrupt()
        while not all(c.replies and _idle(c) for c in batch):
            assert time.monotonic() < deadline, [(c.n, c.kind, len(c.replies), _idle(c)) for c in batch]
            self._pump(0.05)

    def drain(self, quiet: float = 1.0) -> None:
        """Whatever comes after the last reply (a duplicate reply would show up here)."""
        end = time.monotonic() + quiet
        while time.monotonic() < end:
            self._pump(0.05)


def _idle(c: Cell) -> bool:
    return any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in c.iopub)


def _check_cell(c: Cell, status: str, ran_before: int) -> None:
    """One cell's reply and output. ``ran_before``: cells that ran before it (so ``counter`` was that)."""
    assert len(c.replies) == 1, (c.n, c.kind, [r["content"] for r in c.replies])
    reply = c.replies[0]
    assert reply["msg_type"] == "execute_reply" and reply["content"]["status"] == status, (c.n, c.kind, reply)
    types = [m["msg_type"] for m in c.iopub]
    states = [m["content"]["execution_state"] for m in c.iopub if m["msg_type"] == "status"]
    assert types[0] == "status" and types[-1] == "status" and states == ["busy", "idle"], (c.n, types)
    stdout = "".join(m["content"]["text"] for m in c.iopub
                     if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
    if status == "aborted":
        assert types == ["status", "status"], (c.n, types)
        return
    assert stdout == c.expected_stdout(), (c.n, c.kind, stdout[-300:], c.expected_stdout()[-300:])
    errors = [m["content"] for m in c.iopub if m["msg_type"] == "error"]
    if c.kind == "interrupt":
        assert reply["content"]["ename"] == "KeyboardInterrupt" and [e["ename"] for e in errors] == [
            "KeyboardInterrupt"], (c.n, reply["content"], errors)
    elif c.kind == "raise":
        assert reply["content"]["ename"] == "ValueError" and reply["content"]["evalue"] == f"c{c.n} raised"
        assert [e["evalue"] for e in errors] == [f"c{c.n} raised"], errors
    else:
        assert not errors, (c.n, errors)
    if c.kind == "quick":
        (result,) = [m["content"] for m in c.iopub if m["msg_type"] == "execute_result"]
        assert result["data"]["text/plain"] == f"({c.n}, {ran_before + 1})", (c.n, result)  # state kept
    if c.kind == "display":
        shown = [m["content"]["data"] for m in c.iopub if m["msg_type"] == "display_data"]
        assert [d.get("text/html") for d in shown] == [f"<b>c{c.n}</b>", None], shown
        assert shown[1] == {"text/plain": f"c{c.n}:plain"}, shown


def _forwarded_ports(pid: int) -> set[int]:
    """Loopback ports the kernel's VM processes listen on (none for a container kernel)."""
    qemu = [int(line.split()[0]) for line in vm_processes(pid)]
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in listening.splitlines()
            if any(f"pid={q}," in line for q in qemu)}


def _listening(ports: set[int]) -> set[int]:
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    return ports & {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}


@pytest.mark.timeout(max(300, 240 + 3 * CELLS))
@pytest.mark.parametrize("name", [pytest.param("hotbox-python", id="box"),
                                  pytest.param("hotcell-python", id="vm", marks=pytest.mark.vm)])
def test_soak_kernel_cells_with_random_interrupts(name: str) -> None:
    seed = int(os.environ.get("HOTBOX_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    batches = _plan(CELLS, rng)
    cells = [c for b in batches for c in b]
    print(f"\nkernel soak {name}: {CELLS} cells in {len(batches)} batches, HOTBOX_SOAK_SEED={seed}")
    settings = load_settings()
    ledger = Ledger(settings.ledger_path)
    before = ledger.quota(settings.project.id, settings.plan)
    t_start = time.monotonic()
    with sandboxed_kernel(name) as (_km, kc, pid):  # on leaving: no container, VM process or socket dir
        t_ready = time.monotonic()
        driver = Driver(kc)
        setup = Cell(-1, "setup")
        setup.msg_id = kc.execute("counter = 0")
        driver.by_id[setup.msg_id] = setup
        while not (setup.replies and _idle(setup)):
            driver._pump(0.1)
        assert setup.replies[0]["content"]["status"] == "ok", setup.replies
        ports = _forwarded_ports(pid)
        assert name == "hotbox-python" or ports, "the VM kernel has no forwarded ports to check"
        t0 = time.monotonic()
        for batch in batches:
            driver.run_batch(batch)
            if rng.random() < IDLE_INTERRUPT_P:
                driver.interrupt()
        elapsed = time.monotonic() - t0
        driver.drain()
        final = Cell(CELLS, "final")
        final.msg_id = kc.execute("counter")
        driver.by_id[final.msg_id] = final
        while not (final.replies and _idle(final)):
            driver._pump(0.1)
        rows_running = kernel_ledger_rows(pid)
    t_end = time.monotonic()

    statuses = [s for b in batches for s in _expected_statuses(b)]
    took: dict[str, list[float]] = {}
    for prev, c, status in zip([setup, *cells[:-1]], cells, statuses, strict=True):  # from its turn to its idle
        took.setdefault("aborted" if status == "aborted" else c.kind, []).append(c.done - max(c.sent, prev.done))
    print(f"kernel soak {name}: mean s per cell " + ", ".join(
        f"{k} {sum(v) / len(v):.2f} (n={len(v)})" for k, v in sorted(took.items())))
    kinds = {k: sum(c.kind == k for c in cells) for k in sorted(set(KINDS))}
    interrupted = sum(c.kind == "interrupt" and s == "error" for c, s in zip(cells, statuses, strict=True))
    print(f"kernel soak {name}: ready in {t_ready - t_start:.1f} s; {CELLS} cells in {elapsed:.1f} s "
          f"({CELLS / elapsed:.2f} cells/s); {driver.interrupts_sent} interrupts sent "
          f"({interrupted} mid-cell, {driver.interrupts_sent - interrupted} while idle); "
          f"{statuses.count('aborted')} aborted; kinds {kinds}; whole test {t_end - t_start:.1f} s")

    # Exactly one reply per request with the right status, output complete and in order, state kept.
    assert not driver.stray, driver.stray[:3]
    assert [r["content"]["status"] for r in driver.interrupt_replies] == ["ok"] * driver.interrupts_sent
    ran = 0
    for c, status in zip(cells, statuses, strict=True):
        _check_cell(c, status, ran)
        ran += status != "aborted"
    (result,) = [m["content"] for m in final.iopub if m["msg_type"] == "execute_result"]
    assert result["data"]["text/plain"] == str(ran)
    seen = [driver.by_id[m].n for m in driver.order]
    assert seen == sorted(seen), "two cells' output interleaved"
    for c in cells:
        assert not any("fresh one" in m["content"].get("text", "") for m in c.iopub), (c.n, "sandbox restarted")

    # The ledger: one kernel row, running during the soak, settled at shutdown for about the kernel's life.
    assert len(rows_running) == 1 and rows_running[0][1] is None, rows_running
    deadline = time.monotonic() + 15
    while kernel_ledger_rows(pid)[0][1] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    ((task_id, ended_at, cus),) = kernel_ledger_rows(pid)
    row = ledger.row(task_id)
    assert ended_at is not None and row is not None and row.seconds is not None and cus is not None, row
    assert elapsed <= row.seconds <= t_end - t_start + 1, (row, elapsed, t_end - t_start)
    assert abs(cus - row.seconds * row[3]) < 1e-6, row  # seconds times the size's multiplier
    after = ledger.quota(settings.project.id, settings.plan)
    assert after.tasks_used - before.tasks_used == 1 and after.running == before.running
    assert abs((after.cus_used - before.cus_used) - cus) < 1e-3

    # Nothing leaked: the sandbox, its processes and socket dir (checked on leaving), and its ports.
    deadline = time.monotonic() + 15
    while _listening(ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening(ports), f"forwarded ports still listening: {_listening(ports)}"


@pytest.mark.vm
def test_the_first_interrupt_of_a_fresh_vm_kernel_keeps_its_sandbox() -> None:
    """Found by the soak: a fresh Hotcell kernel's first traceback loaded IPython's formatting (about 4 s
    under TCG), so an interrupted first cell outlasted the relay's grace and the VM, with the user's
    variables, was stopped. The launcher now formats one traceback before the snapshot point."""
    with sandboxed_kernel("hotcell-python") as (km, kc, _pid):
        assert execute(kc, "import sys\nloaded = set(sys.modules)\nkept = 'yes'")["status"] == "ok"

        def interrupt_once_started(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and "started" in msg["content"]["text"]:
                km.interrupt_kernel()  # message mode: an interrupt_request on the control channel

        r = execute(kc, "print('started', flush=True)\nimport time\nfor _ in range(1200): time.sleep(0.05)",
                    on_message=interrupt_once_started)
        assert r["status"] == "error" and r["ename"] == "KeyboardInterrupt", r
        r = execute(kc, "sorted(set(sys.modules) - loaded), kept")
        assert r["status"] == "ok", r
        (result,) = [m["content"] for _, m in r["messages"] if m["msg_type"] == "execute_result"]
        # nothing was loaded to show the traceback, and the state is the same kernel's
        assert result["data"]["text/plain"] == "([], 'yes')", result
