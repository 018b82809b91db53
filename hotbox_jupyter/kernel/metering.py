"""A kernel's sandbox is billed like a box: one row of the project's CUS ledger per sandbox.

It is admitted before the sandbox starts, so the plan's limits (CUS, tasks, boxes at once, network)
hold for kernels too and a refusal creates nothing; it is settled when the sandbox stops or dies. The
row's ``kind`` is ``kernel``. A kernel has no timeout, so a host kernel that is killed before it settles
is billed up to the moment the next ledger user notices it is gone (the ledger's orphan rule).
"""

from __future__ import annotations

import time
import uuid

from ..box.billing import Ledger
from ..models import SIZES, BoxSize
from ..owner import this_owner
from ..settings import load_settings

__all__ = ["KernelMeter"]

NO_TIMEOUT_S = 86400.0
"""The ledger caps what an orphaned row can cost at its timeout; a kernel's is the longest a box may have."""


class KernelMeter:
    """Admits and settles the ledger rows of one host kernel's sandboxes, one at a time."""

    def __init__(self, *, image: str, size: str, network: str) -> None:
        self.image = image
        self.size = BoxSize(size)
        self.network = network
        self._settings = load_settings()
        self._ledger = Ledger(self._settings.ledger_path)
        self._task: str | None = None
        self._since = 0.0

    def admit(self) -> None:
        """Record a new sandbox as running; QuotaExceededError (nothing recorded) when the plan refuses it."""
        self.settle("exited")
        task_id = f"kernel-{uuid.uuid4().hex[:12]}"
        self._ledger.admit(task_id=task_id, project=self._settings.project.id, plan=self._settings.plan,
                           size=self.size.value, multiplier=SIZES[self.size].cus_multiplier, network=self.network,
                           timeout_s=NO_TIMEOUT_S, owner=this_owner(), image=self.image, kind="kernel")
        self._task, self._since = task_id, time.monotonic()

    def settle(self, reason: str) -> None:
        """Bill the current sandbox for the time it ran (idempotent: a second call bills nothing)."""
        task, self._task = self._task, None
        if task is not None:
            self._ledger.settle(task, time.monotonic() - self._since, reason)

    @property
    def running(self) -> bool:
        """Whether a sandbox is admitted and not settled."""
        return self._task is not None
