"""The CUS ledger: billing, quota refusals, persistence and orphans (real SQLite, real processes)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hotbox_jupyter.box.billing import Ledger
from hotbox_jupyter.errors import QuotaExceededError
from hotbox_jupyter.owner import OwnerId, this_owner
from hotbox_jupyter.settings import Plan


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def _admit(ledger: Ledger, task_id: str, plan: Plan | None = None, *, project: str = "p", size: str = "small",
           multiplier: float = 1.0, network: str = "none", owner: OwnerId | None = None,
           timeout_s: float = 60) -> None:
    ledger.admit(task_id=task_id, project=project, plan=plan or Plan(), size=size, multiplier=multiplier,
                 network=network, timeout_s=timeout_s, owner=owner or this_owner())


def test_seconds_times_multiplier(ledger: Ledger) -> None:
    _admit(ledger, "t1", size="medium", multiplier=2.0)
    assert ledger.quota("p", Plan()).running == 1
    assert ledger.settle("t1", 3.5, "exited") == pytest.approx(7.0)
    row = ledger.row("t1")
    assert row is not None and row.seconds == pytest.approx(3.5) and row.cus == pytest.approx(7.0)
    assert row.reason == "exited"
    q = ledger.quota("p", Plan(cus_limit=10, max_tasks=5))
    assert (q.cus_used, q.cus_remaining, q.tasks_used, q.tasks_remaining, q.running) == (7.0, 3.0, 1, 4, 0)


def test_running_tasks_accrue_until_their_timeout(ledger: Ledger) -> None:
    _admit(ledger, "t1", multiplier=4.0, timeout_s=0.05)
    _admit(ledger, "t2", multiplier=0.5, timeout_s=60)
    time.sleep(0.2)
    q = ledger.quota("p", Plan())
    # t1 stopped accruing at its timeout (0.05 s x 4); t2 goes on (>= 0.2 s x 0.5); neither is billed yet.
    assert q.cus_used == 0 and q.running == 2
    assert 0.2 + 0.1 <= q.cus_running < 0.2 + 0.5 * 30
    ledger.settle("t1", 0.05, "timeout")
    ledger.settle("t2", 0.2, "exited")
    assert ledger.quota("p", Plan()).cus_running == 0


def test_ledger_persists_and_is_scoped_by_project(tmp_path: Path, ledger: Ledger) -> None:
    _admit(ledger, "a1", project="a")
    ledger.settle("a1", 10, "exited")
    again = Ledger(tmp_path / "ledger.sqlite3")
    assert again.quota("a", Plan()).cus_used == 10
    assert again.quota("b", Plan()).cus_used == 0


def test_refusals_name_the_limit(ledger: Ledger) -> None:
    with pytest.raises(QuotaExceededError, match="network='internet' is not allowed by plan 'free'"):
        _admit(ledger, "n", Plan(name="free", network=False), network="internet")
    _admit(ledger, "n2", Plan(name="free", network=False), network="none")
    ledger.settle("n2", 5, "exited")
    with pytest.raises(QuotaExceededError, match=r"CUS quota .* 5.00 of 5 CUS"):
        _admit(ledger, "c", Plan(cus_limit=5))
    with pytest.raises(QuotaExceededError, match="1 of 1 tasks"):
        _admit(ledger, "t", Plan(max_tasks=1))
    _admit(ledger, "r1", Plan(max_concurrent=1))
    with pytest.raises(QuotaExceededError, match="1 boxes at once"):
        _admit(ledger, "r2", Plan(max_concurrent=1))
    assert ledger.row("r2") is None and ledger.row("c") is None  # a refusal records nothing


def test_admission_is_atomic_across_threads(ledger: Ledger) -> None:
    plan = Plan(max_tasks=5)
    admitted: list[str] = []
    refused: list[str] = []

    def go(i: int) -> None:
        try:
            _admit(ledger, f"x{i}", plan)
            admitted.append(f"x{i}")
        except QuotaExceededError:
            refused.append(f"x{i}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5 and len(refused) == 15


def test_orphans_are_billed_at_most_their_timeout(ledger: Ledger) -> None:
    # a real process that exits: its pid and start time identify a dead owner
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = OwnerId((int(proc.stdout), "1", this_owner().host))
    _admit(ledger, "orphan", owner=dead, timeout_s=0.5, multiplier=4.0)
    assert ledger.quota("p", Plan()).running == 1
    ledger.settle_orphans()
    row = ledger.row("orphan")
    assert row is not None and row.reason == "error"
    assert row.seconds is not None and row.seconds <= 0.5 and row.cus == pytest.approx(row.seconds * 4.0)
    assert ledger.quota("p", Plan(max_concurrent=1)).running == 0
    _admit(ledger, "live", Plan(max_concurrent=1))  # the orphan no longer holds the only slot
