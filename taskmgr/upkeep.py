"""The data layer of upkeep (sql/0017, queries in sql/upkeep_queries.sql): the counts of
tasks by state (those triggers keep; counted for one type; per time bucket from the
history), the scan for tasks past their type's max_runtime_s,
and pruning (whole trees of old terminal tasks, runners long gone). As taskmgr.store:
functions named after their queries, taking the connection to run on, returning values,
never rows; driver errors become StoreError.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from taskmgr.models import State
from taskmgr.queries import QueryFile, in_sql_dir
from taskmgr.store import Conn

_QUERIES = QueryFile(in_sql_dir("upkeep_queries.sql"))
_run = _QUERIES.run


async def state_counts(conn: Conn) -> dict[State, int]:
    """Tasks by state (states with none left out), from the counts kept by triggers in
    the transaction of each change: a read of a few rows, however many tasks are stored."""
    return {State(r.state): int(r.n) for r in await _run(conn, "state_counts")}


async def counts_by_state(conn: Conn, *, type: str | None = None) -> dict[State, int]:
    """Counted from the projection, every task stored: for one type (an operator's question).
    Of all types, state_counts reads the counts the triggers keep."""
    rows = await _run(conn, "counts_by_state", {"type": type})
    return {State(r.state): r.n for r in rows}


async def counts_per_bucket(
    conn: Conn, bucket: timedelta, since: datetime, until: datetime
) -> list[tuple[datetime, State, int]]:
    rows = await _run(conn, "counts_per_bucket", {"bucket": bucket, "since": since, "until": until})
    return [(r.bucket, State(r.state), r.n) for r in rows]


async def fold_state_counts(conn: Conn) -> None:
    """Fold the counts' deltas into one row per state (the leader, with the gauges)."""
    await _run(conn, "fold_state_counts")


@dataclass(frozen=True)
class Expired:
    """An active task past its type's max_runtime_s, counted from its first start."""

    task_id: uuid.UUID
    state: State
    attempt: int
    runner_id: str | None
    pool: str
    started_at: datetime
    max_runtime_s: float


async def expired(conn: Conn, now: datetime, limit: int) -> list[Expired]:
    rows = await _run(conn, "expired", {"now": now, "limit": limit})
    return [
        Expired(r.task_id, State(r.state), r.attempt, r.runner_id, r.pool, r.started_at, r.max_runtime_s)
        for r in rows
    ]


@dataclass(frozen=True)
class Pruned:
    """One step of pruning: tasks deleted, old terminal tasks looked at, and where the
    next step goes on from (None: nothing was left to look at)."""

    pruned: int
    scanned: int
    after: tuple[datetime, uuid.UUID] | None


async def prune_tasks(
    conn: Conn, older_than: datetime, after: tuple[datetime, uuid.UUID] | None, max_tasks: int
) -> Pruned:
    """Delete the trees whose every task ended before `older_than` (never newer than the
    owner's floor, taskmgr_policy.min_retention_days), looking at up to `max_tasks` old
    terminal tasks after `after`: their rows in task_state, task_services and tasks, and
    what other parts' foreign keys delete with them."""
    params = {
        "older_than": older_than,
        "after_at": after[0] if after else None,
        "after_id": after[1] if after else None,
        "max_tasks": max_tasks,
    }
    r = (await _run(conn, "prune_tasks", params)).one()
    cursor = (r.last_at, r.last_id) if r.scanned else None
    return Pruned(int(r.pruned), int(r.scanned), cursor)


async def prune_runners(conn: Conn, older_than: datetime) -> int:
    """Delete the runners stopped or declared dead whose last heartbeat is older."""
    return int((await _run(conn, "prune_runners", {"older_than": older_than})).scalar_one())
