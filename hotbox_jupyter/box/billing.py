"""The CUS ledger: every task billed ``seconds x size multiplier``, and the plan's quota enforced.

One SQLite file (``settings.ledger_path``) shared by every process of the user, so quota holds across
notebooks, scripts and the command line at once. A task gets its row when it is admitted (inside one
``BEGIN IMMEDIATE`` transaction with the quota check, so two processes cannot both take the last
slot) and is settled when it ends. A row whose owner process died without settling it is an orphan:
whoever notices first settles it, billing the time it may have run but never more than its timeout
(the box would have been killed then; the user does not pay for our crash).

Admission is on every box's critical path (a warm box's start is little else), so it must not wait for
the disk: the file is in WAL mode with ``synchronous=NORMAL`` (a commit is durable against a crash of
any process, but the last commits may be lost if the machine itself loses power; the file is never
corrupted), and a manager holds one idle connection open (:meth:`Ledger.hold`) so that closing the
per-operation connections does not checkpoint and fsync the WAL each time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import QuotaExceededError
from ..models import QuotaInfo
from ..owner import OwnerId, owner_alive
from ..settings import Plan

__all__ = ["Ledger", "LedgerRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id      TEXT PRIMARY KEY,
    project      TEXT NOT NULL,
    kind         TEXT NOT NULL DEFAULT 'box',
    image        TEXT NOT NULL DEFAULT '',
    size         TEXT NOT NULL,
    multiplier   REAL NOT NULL,
    network      TEXT NOT NULL DEFAULT 'none',
    timeout_s    REAL NOT NULL,
    owner_pid    INTEGER NOT NULL,
    owner_start  TEXT NOT NULL,
    owner_host   TEXT NOT NULL,
    admitted_at  REAL NOT NULL,
    ended_at     REAL,
    seconds      REAL,
    cus          REAL,
    reason       TEXT
);
CREATE INDEX IF NOT EXISTS tasks_project ON tasks(project);
"""


class LedgerRow(tuple[str, str, str, float, float | None, float | None, str | None]):
    """(task id, project, size, multiplier, seconds, cus, reason) of one ledger row."""

    __slots__ = ()

    @property
    def task_id(self) -> str:
        return self[0]

    @property
    def cus(self) -> float | None:
        return self[5]

    @property
    def seconds(self) -> float | None:
        return self[4]

    @property
    def reason(self) -> str | None:
        return self[6]


class Ledger:
    """The persistent CUS ledger of one user (all projects; rows are scoped by project id).

    Methods are synchronous and short; async callers run them in a worker thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._held: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def hold(self) -> None:
        """Keep a connection open until :meth:`close`, which makes every operation cheaper (see above)."""
        with self._lock:
            if self._held is None:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA synchronous=NORMAL")
                self._held = db

    def close(self) -> None:
        """Close the held connection, if any; the ledger stays usable."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            held.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # The held connection when there is one, one caller (worker thread) at a time: opening and
        # closing a connection per operation cost ~5 ms, most of it the close's WAL checkpoint.
        # Otherwise a connection per operation.
        with self._lock:
            if self._held is not None:
                yield self._held
                return
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield db
        finally:
            db.close()

    @staticmethod
    def _settle_orphans(db: sqlite3.Connection, now: float) -> None:
        rows = db.execute(
            "SELECT task_id, multiplier, timeout_s, owner_pid, owner_start, owner_host, admitted_at "
            "FROM tasks WHERE ended_at IS NULL").fetchall()
        for task_id, mult, timeout_s, pid, start, host, admitted in rows:
            if owner_alive(pid, start, host):
                continue
            seconds = max(0.0, min(now - admitted, timeout_s))
            db.execute("UPDATE tasks SET ended_at=?, seconds=?, cus=?, reason=? WHERE task_id=?",
                       (now, seconds, seconds * mult, "error", task_id))

    @staticmethod
    def _usage(db: sqlite3.Connection, project: str) -> tuple[float, int, int]:
        cus, total, running = db.execute(
            "SELECT COALESCE(SUM(cus), 0), COUNT(*), COALESCE(SUM(ended_at IS NULL), 0) "
            "FROM tasks WHERE project=?", (project,)).fetchone()
        return float(cus), int(total), int(running)

    def admit(self, *, task_id: str, project: str, plan: Plan, size: str, multiplier: float, network: str,
              timeout_s: float, owner: OwnerId, image: str = "", kind: str = "box") -> None:
        """Check the plan and record the task as running, atomically; QuotaExceededError if refused.

        Called by TaskManager.start before anything is pulled or created, so a refusal leaves nothing behind.
        """
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._settle_orphans(db, now)
                cus_used, tasks_used, running = self._usage(db, project)
                problem = _refusal(plan, network, cus_used, tasks_used, running)
                if problem:
                    raise QuotaExceededError(problem)
                db.execute(
                    "INSERT INTO tasks (task_id, project, kind, image, size, multiplier, network, timeout_s, "
                    "owner_pid, owner_start, owner_host, admitted_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (task_id, project, kind, image, size, multiplier, network, timeout_s,
                     owner.pid, owner.start, owner.host, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def settle(self, task_id: str, seconds: float, reason: str) -> float:
        """Bill a finished task: ``seconds`` it actually ran times its multiplier. Returns the CUS billed."""
        seconds = max(0.0, seconds)
        with self._connect() as db:
            row = db.execute("SELECT multiplier FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if row is None:
                return 0.0
            cus = seconds * float(row[0])
            db.execute("UPDATE tasks SET ended_at=?, seconds=?, cus=?, reason=? WHERE task_id=?",
                       (time.time(), seconds, cus, reason, task_id))
            return cus

    def settle_orphans(self) -> None:
        """Settle the rows of owners that died without settling them (called at manager start-up)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._settle_orphans(db, time.time())
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def quota(self, project: str, plan: Plan) -> QuotaInfo:
        """The seed's ``quota()``: CUS and tasks used and remaining under ``plan``."""
        now = time.time()
        with self._connect() as db:
            cus_used, tasks_used, running = self._usage(db, project)
            # What the running tasks would cost if they ended now (never past their timeout).
            (accruing,) = db.execute(
                "SELECT COALESCE(SUM(MAX(0, MIN(? - admitted_at, timeout_s)) * multiplier), 0) FROM tasks "
                "WHERE project=? AND ended_at IS NULL", (now, project)).fetchone()
        return QuotaInfo(
            plan=plan.name,
            cus_limit=plan.cus_limit,
            cus_used=round(cus_used, 6),
            cus_remaining=None if plan.cus_limit is None else max(0.0, round(plan.cus_limit - cus_used, 6)),
            tasks_limit=plan.max_tasks,
            tasks_used=tasks_used,
            tasks_remaining=None if plan.max_tasks is None else max(0, plan.max_tasks - tasks_used),
            concurrent_limit=plan.max_concurrent,
            running=running,
            network_allowed=plan.network,
            cus_running=round(float(accruing), 6),
        )

    def row(self, task_id: str) -> LedgerRow | None:
        """One task's row, for tests and ``hotbox`` listings."""
        with self._connect() as db:
            r = db.execute("SELECT task_id, project, size, multiplier, seconds, cus, reason FROM tasks "
                           "WHERE task_id=?", (task_id,)).fetchone()
        return None if r is None else LedgerRow(r)


def _refusal(plan: Plan, network: str, cus_used: float, tasks_used: int, running: int) -> str | None:
    if network == "internet" and not plan.network:
        return (f"network='internet' is not allowed by plan {plan.name!r} (hot.plan.network = false); "
                "use network='none' or a plan that allows network access")
    if plan.cus_limit is not None and cus_used >= plan.cus_limit:
        return (f"CUS quota of plan {plan.name!r} is used up: {cus_used:.2f} of {plan.cus_limit:g} CUS used "
                "(hot.plan.cus_limit)")
    if plan.max_tasks is not None and tasks_used >= plan.max_tasks:
        return (f"task quota of plan {plan.name!r} is used up: {tasks_used} of {plan.max_tasks} tasks "
                "(hot.plan.max_tasks)")
    if running >= plan.max_concurrent:
        return (f"plan {plan.name!r} allows {plan.max_concurrent} boxes at once and {running} are running "
                "(hot.plan.max_concurrent); wait for one to finish or cancel one")
    return None
