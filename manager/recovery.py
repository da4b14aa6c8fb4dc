"""Recovery, the reconciliation job (every TASKMGR_RECOVERY_INTERVAL): runners whose heartbeats
stopped, start orders nobody took, tasks past their type's max_runtime_s. Also retention."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager import metrics
from taskmgr import event_store, store, upkeep
from taskmgr.messages import Stop
from taskmgr.models import ACTIVE, EXPIRED, State, Transition
from taskmgr.service import utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

RECOVERY_BATCH = 5000
# A task whose runners died this many times soon after it started on them fails (a task
# that kills its runner must not walk through the pool killing each runner in turn).
MAX_RUNNER_DEATHS = 3
# "Soon": a poison task kills its runner at its first polls. A death counts toward
# MAX_RUNNER_DEATHS only when the runner's last heartbeat came within this window of the
# task becoming RUNNING on it: the first QUICK_DEATH_POLLS polls have all begun within
# that many poll intervals of the start (the first tick comes within one interval,
# runners/poller.py), a response that kills is read within the request timeout after,
# and the last heartbeat precedes the death by up to one heartbeat interval. A death
# later than that says nothing about the task (an operator, a host, the chaos harness's
# SIGKILLs: a long game must not fail for its runners' deaths). Derived per type, so
# it scales with the type's pace: 28 s for the defaults (5 s polls, 10 s timeout, 3 s
# heartbeats), 2.4 s on the chaos day's quick clock.
QUICK_DEATH_POLLS = 3
# A task whose start order no runner took this many times in a row (since a runner last
# reported it RUNNING) fails (its pool has no consumer): not re-sent every start timeout
# forever, while a long-lived task that met a few pool restarts over its life goes on.
MAX_UNDELIVERED = 5


@dataclass
class RecoveryCounts:
    dead_runners: int = 0
    from_dead_runners: int = 0
    start_timeouts: int = 0
    expired: int = 0


# Sends a stop to a runner (runner id) or, while no runner is known (STARTED), to every
# runner of a pool: the manager's (TaskManager._send_stop).
StopSender = Callable[[Stop, str | None, str | None], Awaitable[None]]


class Recovery:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
        send_stop: StopSender | None = None,
        heard: Callable[[], Mapping[str, datetime]] | None = None,
    ) -> None:
        """send_stop: how an expired task's runner is told to stop (None: not told; its
        next report is stale and answered with a stop by the intake). heard: when each
        runner's last heartbeat reached the leader (TaskManager), applied or not: a
        runner is judged by when its heartbeat arrived, not by when the intake, behind
        a backlog of reports, got to write it."""
        self._heard = heard
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._send_stop = send_stop

    async def run_once(self) -> RecoveryCounts:
        counts = RecoveryCounts()
        now = self._clock()
        async with self._engine.begin() as conn:
            # Lock order, as the intake's: runners rows (by id), then task_state rows (by
            # id); a runner returning while declared dead cannot deadlock the two.
            since = now - timedelta(seconds=self._settings.runner_dead_after)
            heard = [r for r, at in (self._heard() if self._heard else {}).items() if at >= since]
            dead = await store.dead_runners(conn, since, heard)
            counts.dead_runners = len(dead)
            for pool in dead.values():
                metrics.RUNNERS_DEAD.labels(pool).inc()
            if dead:
                ids = await store.tasks_of_runners(conn, list(dead))
                counts.from_dead_runners = await self._redispatch(
                    conn,
                    ids,
                    now,
                    lambda c: c.runner_id in dead,
                    "runner_dead",
                    lambda c: f"runner {c.runner_id} stopped heartbeating",
                    bound=MAX_RUNNER_DEATHS,
                    bound_reason=lambda n: f"its runners died {n} times soon after it started on them",
                    counted=self._quick_deaths,
                )
                log.warning(
                    "runners declared dead: %s (%d tasks dispatched again)",
                    list(dead),
                    counts.from_dead_runners,
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
                bound=MAX_UNDELIVERED,
                bound_reason=lambda n: f"no runner took its start order {n} times: is its pool consumed?",
                since_running=True,
            )
        counts.expired = await self._expire(now)
        return counts

    async def measure_runners(self) -> dict[str, int]:
        """Set the live runners per pool (the gauge the "no live runner" alert reads): the
        runners recovery does not count as dead, by the same TASKMGR_RUNNER_DEAD_AFTER."""
        since = self._clock() - timedelta(seconds=self._settings.runner_dead_after)
        async with self._engine.connect() as conn:
            counts = await store.live_runners_by_pool(conn, since)
        metrics.set_runners_live(counts)
        return counts

    async def _expire(self, now: datetime) -> int:
        """Active tasks past their type's max_runtime_s since their first start end FAILED,
        reason `expired`, for good (no retry), whether or not their runner says so; their
        runner (or, while none is known, their pool's runners) is told to stop."""
        async with self._engine.begin() as conn:
            found = await upkeep.expired(conn, now, RECOVERY_BATCH)
            if not found:
                return 0
            current = await store.lock_states(conn, [e.task_id for e in found])
            ended = []
            for e in found:
                c = current.get(e.task_id)
                if c is None or c.state not in ACTIVE or c.attempt != e.attempt:
                    continue  # changed since the scan: the next run looks again
                detail = {
                    "reason": EXPIRED,
                    "max_runtime_s": e.max_runtime_s,
                    "started_at": e.started_at.isoformat(),
                    "final": True,
                }
                ended.append((e, Transition(e.task_id, State.FAILED, e.attempt, "manager", None, detail)))
            await store.apply_transitions(conn, [t for _, t in ended], now, current=current)
        metrics.RECOVERY_GAVE_UP.labels(EXPIRED).inc(len(ended))
        for e, _ in ended:
            log.warning(
                "task %s expired: running for more than %s s since %s",
                e.task_id,
                e.max_runtime_s,
                e.started_at.isoformat(),
                extra={"task_id": str(e.task_id), "attempt": e.attempt},
            )
            if self._send_stop is not None:
                stop = Stop(task_id=e.task_id, attempt=e.attempt, reason=EXPIRED)
                await self._send_stop(stop, e.runner_id, None if e.runner_id else e.pool)
        return len(ended)

    def quick_death_window_s(self, poll_interval_s: float, request_timeout_s: float) -> float:
        """How soon after a task became RUNNING on a runner that runner's death counts
        toward MAX_RUNNER_DEATHS (see QUICK_DEATH_POLLS)."""
        return QUICK_DEATH_POLLS * poll_interval_s + request_timeout_s + self._settings.heartbeat_interval

    async def _quick_deaths(self, conn, taken):  # type: ignore[no-untyped-def]
        """task id -> (whether its runner's death counts, what the event records)."""
        rows = await store.runner_deaths(conn, [c.task_id for c in taken])
        out = {}
        for c in taken:
            row = rows.get(c.task_id)
            if row is None:  # not RUNNING (no start on that runner to measure from): counted
                out[c.task_id] = (True, {"counted": True})
                continue
            window = self.quick_death_window_s(row["poll_interval_s"], row["request_timeout_s"])
            quick = row["held_s"] <= window
            out[c.task_id] = (
                quick,
                {"counted": quick, "held_s": round(row["held_s"], 3), "window_s": round(window, 3)},
            )
        return out

    async def _redispatch(  # type: ignore[no-untyped-def]
        self,
        conn,
        ids,
        now,
        still,
        reason_label,
        reason,
        *,
        bound,
        bound_reason,
        since_running=False,
        counted=None,
    ):
        """RETRYING now, same attempt: discovery gives it the next attempt number, which
        fences the old runner's late reports. Not a failure: max_attempts is untouched,
        except that a task taken back `bound` times for the same reason FAILS. `counted`
        (conn, taken) -> {task id: (counts, detail)}: which of these count toward the
        bound (the others are recorded with counted=false and leave the count as is)."""
        if not ids:
            return 0
        current = await store.lock_states(conn, ids)
        taken = [c for c in current.values() if c.state in ACTIVE and still(c)]
        before = (
            await store.recoveries(
                conn, [c.task_id for c in taken], reason_label, since_running=since_running
            )
            if taken
            else {}
        )
        judged = await counted(conn, taken) if counted is not None and taken else {}
        transitions = []
        for c in taken:
            counts, extra = judged.get(c.task_id, (True, {}))
            n = before.get(c.task_id, 0) + (1 if counts else 0)
            detail = {"reason": reason(c), "recovery": reason_label, "times": n, **extra}
            if counts and n >= bound:
                detail = {**detail, "reason": f"{bound_reason(n)}; the last: {reason(c)}", "final": True}
                transitions.append(Transition(c.task_id, State.FAILED, c.attempt, "manager", None, detail))
                metrics.RECOVERY_GAVE_UP.labels(reason_label).inc()
                log.error("task %s failed: %s", c.task_id, detail["reason"])
            else:
                transitions.append(
                    Transition(c.task_id, State.RETRYING, c.attempt, "manager", None, detail, run_at=now)
                )
        await store.apply_transitions(conn, transitions, now, current=current)
        metrics.RECOVERED.labels(reason_label).inc(len(transitions))
        return len(transitions)


class Retention:
    """Drops a history hypertable's chunks older than its retention, daily (the Apache
    edition of TimescaleDB has no retention policies, so the manager does it), through a
    SECURITY DEFINER function that never drops newer than the owner's floor."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        table: str,
        days: int,
        drop: Callable[[AsyncConnection, datetime], Awaitable[int]],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._table = table
        self._days = days
        self._drop = drop
        self._clock = clock

    @classmethod
    def of_task_events(cls, *, engine: AsyncEngine, settings: Settings, **kw: Any) -> Retention:
        """task_events, kept TASKMGR_RETENTION_DAYS."""
        return cls(
            engine=engine, table="task_events", days=settings.retention_days, drop=store.drop_chunks, **kw
        )

    @classmethod
    def of_emitted_events(cls, *, engine: AsyncEngine, settings: Settings, **kw: Any) -> Retention:
        """The emitted events' history and their ids, kept TASKMGR_EVENT_RETENTION_DAYS."""
        return cls(
            engine=engine,
            table="emitted_events",
            days=settings.event_retention_days,
            drop=event_store.drop_old_emitted_events,
            **kw,
        )

    async def run_once(self) -> int:
        cutoff = self._clock() - timedelta(days=self._days)
        async with self._engine.begin() as conn:
            dropped = await self._drop(conn, cutoff)
        if dropped:
            log.info("retention dropped %d %s chunks older than %s", dropped, self._table, cutoff.isoformat())
        return dropped
