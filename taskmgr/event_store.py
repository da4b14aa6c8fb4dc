"""The event history's SQL (sql/0012, queries in sql/event_queries.sql): the emitted
events the recorder stores once each, and what reads them back. As taskmgr.store for
the tasks: methods named after their queries, taking the connection to run on, returning
frozen values, never rows; driver errors become StoreError.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from taskmgr.messages import Event
from taskmgr.queries import QueryFile, in_sql_dir
from taskmgr.store import Conn

# The history's tables (tests and benchmarks empty them).
TABLES = "emitted_events, emitted_event_ids"
# Rows a listing returns at most unless told otherwise.
DEFAULT_LIMIT = 1000
# Rows per page of a replay from the hypertable.
REPLAY_PAGE = 5000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NIL = uuid.UUID(int=0)


@dataclass(frozen=True)
class StoredEvent:
    """One row of emitted_events: the first copy of an event that was recorded."""

    time: datetime  # its observed_at
    event_id: uuid.UUID
    kind: str  # the event name: score.changed, game.final, ...
    task_type: str
    task_id: uuid.UUID
    root_task_id: uuid.UUID
    runner_id: str
    attempt: int
    version: int
    data: dict[str, Any]

    @property
    def routing_key(self) -> str:
        return f"{self.task_type}.{self.kind}"


_QUERIES = QueryFile(in_sql_dir("event_queries.sql"))
_run = _QUERIES.run


def event_from_row(row: Any) -> StoredEvent:
    m = row._mapping
    return StoredEvent(
        time=m["time"],
        event_id=m["event_id"],
        kind=m["kind"],
        task_type=m["task_type"],
        task_id=m["task_id"],
        root_task_id=m["root_task_id"],
        runner_id=m["runner_id"],
        attempt=m["attempt"],
        version=m["version"],
        data=m["data"],
    )


def first_copies(events: Sequence[Event]) -> list[Event]:
    """One event per id, the first of its copies (the batch of one statement must not
    carry an id twice)."""
    seen: dict[uuid.UUID, Event] = {}
    for ev in events:
        seen.setdefault(ev.event_id, ev)
    return list(seen.values())


async def record_events(conn: Conn, events: Sequence[Event]) -> int:
    """Store the events whose id is not stored yet, in one statement; returns how many
    were new. Safe with several recorders at once (the ids' primary key decides)."""
    batch = first_copies(events)
    if not batch:
        return 0
    params = {
        "event_ids": [e.event_id for e in batch],
        "times": [e.observed_at for e in batch],
        "kinds": [e.event for e in batch],
        "task_types": [e.task_type for e in batch],
        "task_ids": [e.task_id for e in batch],
        "root_task_ids": [e.root_task_id for e in batch],
        "runner_ids": [e.task_runner_id for e in batch],
        "attempts": [e.attempt for e in batch],
        "versions": [e.version for e in batch],
        "datas": [json.dumps(e.data, separators=(",", ":")) for e in batch],
    }
    return int((await _run(conn, "record_events", params)).rowcount)


async def events_of_task(
    conn: Conn,
    task_id: uuid.UUID,
    *,
    since: datetime | None = None,
    kinds: Sequence[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> list[StoredEvent]:
    """A task's events in time order."""
    params = {"task_id": task_id, "since": since or _EPOCH, "kinds": list(kinds), "limit": limit}
    return [event_from_row(r) for r in await _run(conn, "events_of_task", params)]


async def events_of_root(
    conn: Conn,
    root_id: uuid.UUID,
    *,
    since: datetime | None = None,
    kinds: Sequence[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> list[StoredEvent]:
    """The events of every task of a tree (a root and its follow-ons), in time order."""
    params = {"root_id": root_id, "since": since or _EPOCH, "kinds": list(kinds), "limit": limit}
    return [event_from_row(r) for r in await _run(conn, "events_of_root", params)]


async def events_after(
    conn: Conn, time: datetime, event_id: uuid.UUID = _NIL, *, limit: int = REPLAY_PAGE
) -> list[StoredEvent]:
    """One page of the history after (time, event id), in that order (a keyset)."""
    rows = await _run(conn, "events_after", {"time": time, "event_id": event_id, "limit": limit})
    return [event_from_row(r) for r in rows]


async def replay(
    conn: Conn, *, since: datetime | None = None, page: int = REPLAY_PAGE
) -> AsyncIterator[list[StoredEvent]]:
    """The whole history from `since`, in (time, event id) order, a page at a time."""
    time, event_id = since or _EPOCH, _NIL
    while True:
        events = await events_after(conn, time, event_id, limit=page)
        if not events:
            return
        yield events
        time, event_id = events[-1].time, events[-1].event_id


async def event_counts(conn: Conn) -> tuple[int, int]:
    """(rows, distinct event ids) in the history: equal unless dedup failed."""
    row = (await _run(conn, "event_counts")).one()
    return int(row.events), int(row.ids)


async def drop_old_emitted_events(conn: Conn, older_than: datetime) -> int:
    """Drop the history's chunks older than `older_than` (never newer than the owner's
    floor) and their ids; returns the chunks dropped."""
    return int((await _run(conn, "drop_old_emitted_events", {"older_than": older_than})).scalar_one())


# -- task lifecycle events: the outbox (sql/0014) ---------------------------------------


@dataclass(frozen=True)
class LifecycleChange:
    """A state change waiting to be published as a lifecycle event."""

    id: int
    seq: int
    time: datetime
    task_id: uuid.UUID
    root_id: uuid.UUID
    type: str
    state: str
    attempt: int
    runner_id: str | None
    source: str
    detail: dict[str, Any]


async def take_lifecycle(conn: Conn, limit: int) -> tuple[list[LifecycleChange], list[int]]:
    """Up to `limit` unpublished state changes, oldest first, and the outbox ids among
    them whose task no longer exists (nothing to publish them with: delete them too).
    Nothing is locked or deleted: the relay deletes them (delete_lifecycle) once their
    events are confirmed."""
    rows = await _run(conn, "take_lifecycle", {"limit": limit})
    changes: list[LifecycleChange] = []
    gone: list[int] = []
    for r in rows:
        if r.type is None:
            gone.append(r.id)
            continue
        changes.append(
            LifecycleChange(
                id=r.id,
                seq=r.seq,
                time=r.time,
                task_id=r.task_id,
                root_id=r.root_id,
                type=r.type,
                state=r.state,
                attempt=r.attempt,
                runner_id=r.runner_id,
                source=r.source,
                detail=r.detail,
            )
        )
    return changes, gone


async def delete_lifecycle(conn: Conn, ids: Sequence[int]) -> None:
    """Forget the outbox rows whose events the broker confirmed."""
    await _run(conn, "delete_lifecycle", {"ids": list(ids)})


async def lifecycle_outbox_age(conn: Conn) -> float:
    """Seconds the oldest state change has waited in the outbox; 0 when none waits."""
    age = (await _run(conn, "lifecycle_outbox_age")).scalar_one_or_none()
    return max(float(age), 0.0) if age is not None else 0.0
