"""The leader's upkeep jobs: the task gauges (every 15 s) and pruning (daily).

Gauges: the counts of tasks by state come from task_state_counts, which triggers keep in
the transaction of each change (sql/0017); the job folds their deltas into one row per
state and reads those few rows, so its cost does not grow with the tasks stored.

Pruning keeps `tasks`, `task_state`, `task_services` and `runners` as small as what
happened within the retention: whole trees of tasks that all ended more than
TASKMGR_RETENTION_DAYS ago (never newer than the owner's floor), in steps of
PRUNE_STEP old tasks, one transaction each; and runners stopped or declared dead more
than TASKMGR_RUNNER_RETENTION_DAYS ago. The history (`task_events`) goes by whole chunks
(Retention, manager/recovery.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from manager import metrics
from taskmgr import upkeep
from taskmgr.service import utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

# Old terminal tasks looked at per pruning transaction (their trees are deleted whole).
PRUNE_STEP = 5000


@dataclass
class PruneCounts:
    tasks: int = 0
    scanned: int = 0
    runners: int = 0
    steps: int = 0


class Upkeep:
    def __init__(
        self, *, engine: AsyncEngine, settings: Settings, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock

    async def refresh_gauges(self) -> None:
        """Fold the counts' deltas and set the tasks-by-state gauges from them."""
        async with self._engine.begin() as conn:
            await upkeep.fold_state_counts(conn)
            counts = await upkeep.state_counts(conn)
        metrics.set_tasks_by_state(counts)

    async def prune_once(self, step: int = PRUNE_STEP) -> PruneCounts:
        now = self._clock()
        counts = PruneCounts()
        cutoff = now - timedelta(days=self._settings.retention_days)
        after = None
        while True:
            async with self._engine.begin() as conn:
                done = await upkeep.prune_tasks(conn, cutoff, after, step)
            counts.tasks += done.pruned
            counts.scanned += done.scanned
            counts.steps += 1
            if done.scanned < step or done.after is None:
                break
            after = done.after
        async with self._engine.begin() as conn:
            counts.runners = await upkeep.prune_runners(
                conn, now - timedelta(days=self._settings.runner_retention_days)
            )
        if counts.tasks or counts.runners:
            log.info(
                "pruned %d tasks (whole trees ended before %s) and %d runners",
                counts.tasks,
                cutoff.isoformat(),
                counts.runners,
            )
        return counts
