"""Recovery (seed 003's reconciliation job, every few seconds): runners whose heartbeats
stopped, start orders nobody took, and the outbox. Also retention."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from manager import metrics
from taskmgr import store
from taskmgr.models import State, Transition
from taskmgr.service import utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

RECOVERY_BATCH = 5000


@dataclass
class RecoveryCounts:
    dead_runners: int = 0
    from_dead_runners: int = 0
    start_timeouts: int = 0


class Recovery:
    def __init__(
        self, *, engine: AsyncEngine, settings: Settings, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock

    async def run_once(self) -> RecoveryCounts:
        counts = RecoveryCounts()
        now = self._clock()
        async with self._engine.begin() as conn:
            # Lock order, as the intake's: runners rows (by id), then task_state rows (by
            # id); a runner returning while declared dead cannot deadlock the two.
            dead = await store.dead_runners(conn, now - timedelta(seconds=self._settings.runner_dead_after))
            counts.dead_runners = len(dead)
            if dead:
                ids = await store.tasks_of_runners(conn, dead)
                counts.from_dead_runners = await self._redispatch(
                    conn,
                    ids,
                    now,
                    lambda c: c.runner_id in dead,
                    "runner_dead",
                    lambda c: f"runner {c.runner_id} stopped heartbeating",
                )
                log.warning(
                    "runners declared dead: %s (%d tasks dispatched again)", dead, counts.from_dead_runners
                )
        async with self._engine.begin() as conn:
            ids = await store.start_timeouts(conn, now, RECOVERY_BATCH)
            counts.start_timeouts = await self._redispatch(
                conn,
                ids,
                now,
                lambda c: c.state is State.STARTED,
                "start_timeout",
                lambda c: "no runner took the start order within the type's start_timeout_s",
            )
        return counts

    async def _redispatch(self, conn, ids, now, still, reason_label, reason):  # type: ignore[no-untyped-def]
        """RETRYING now, same attempt: discovery gives it the next attempt number, which
        fences the old runner's late reports. Not a failure: max_attempts is untouched."""
        if not ids:
            return 0
        current = await store.lock_states(conn, ids)
        transitions = [
            Transition(
                c.task_id,
                State.RETRYING,
                c.attempt,
                "manager",
                None,
                {"reason": reason(c), "recovery": reason_label},
                run_at=now,
            )
            for c in current.values()
            if c.state in (State.STARTED, State.RUNNING) and still(c)
        ]
        await store.apply_transitions(conn, transitions, now, current=current)
        metrics.RECOVERED.labels(reason_label).inc(len(transitions))
        return len(transitions)


class Retention:
    """Drops task_events chunks older than TASKMGR_RETENTION_DAYS (the Apache edition
    of TimescaleDB has no retention policies, so the manager does it daily)."""

    def __init__(
        self, *, engine: AsyncEngine, settings: Settings, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock

    async def run_once(self) -> int:
        cutoff = self._clock() - timedelta(days=self._settings.retention_days)
        async with self._engine.begin() as conn:
            dropped = await store.drop_chunks(conn, cutoff)
        if dropped:
            log.info("retention dropped %d task_events chunks older than %s", dropped, cutoff.isoformat())
        return dropped
