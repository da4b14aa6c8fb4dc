"""TaskStore: the only module that talks SQL. Methods are named after their queries and
return frozen values from taskmgr.models, never rows.

Every method takes the connection or session to run on, so callers decide the
transaction: `schedule` joins the caller's, the manager batches many changes in one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import Any, get_origin

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from taskmgr.errors import StoreError as StoreError  # re-exported: callers import it from here
from taskmgr.messages import CancelNotice, TypeChange, encode
from taskmgr.models import (
    TYPE_FIELDS,
    CurrentState,
    DependencyPolicy,
    MisfirePolicy,
    State,
    StateChanges,
    Task,
    TaskEvent,
    TaskType,
    TaskTypeFields,
    Transition,
)
from taskmgr.queries import ENGINE, q

Conn = AsyncConnection | AsyncSession

# The NOTIFY channels (the leading manager LISTENs on them: taskmgr/db.py's listen).
WAKEUP_CHANNEL = "taskmgr_wakeup"  # a task is due now: dispatch at once, not at the next poll
CANCEL_CHANNEL = "taskmgr_cancel"  # a started or running task was cancelled: its payload, a CancelNotice
TYPE_CHANNEL = "taskmgr_type_changed"  # a task type changed: its payload, a TypeChange for the runners


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


def _type_from_row(row: Any) -> TaskType:
    m = row._mapping
    values = {name: m[name] for name in TaskType.model_fields}
    values["required_services"] = tuple(values["required_services"] or ())
    values["misfire_policy"] = MisfirePolicy(values["misfire_policy"])
    return TaskType.model_construct(**values)  # checked when written


def _task_from_row(row: Any) -> Task:
    m = row._mapping
    return Task(
        id=m["id"],
        type=m["type"],
        payload=m["payload"],
        due_at=m["due_at"],
        root_id=m["root_id"],
        parent_id=m["parent_id"],
        dedup_key=m["dedup_key"],
        recurrence=m["recurrence"],
        occurrence=m["occurrence"],
        created_at=m["created_at"],
        created_by=m["created_by"],
        state=State(m["state"]),
        attempt=m["attempt"],
        failures=m["failures"],
        runner_id=m["runner_id"],
        changed_at=m["changed_at"],
        **{k: m[k] for k in ("name", "description", "priority", "run_at")},
        depends_on=tuple(m["depends_on"]),
        on_dependency_failure=DependencyPolicy(m["on_dependency_failure"]),
    )


def _event_from_row(row: Any) -> TaskEvent:
    m = row._mapping
    return TaskEvent(
        time=m["time"],
        task_id=m["task_id"],
        state=State(m["state"]),
        attempt=m["attempt"],
        runner_id=m["runner_id"],
        source=m["source"],
        applied=m["applied"],
        detail=m["detail"],
    )


async def _run(
    conn: Conn, name: str, params: Mapping[str, Any] | None = None, *, query: TextClause | None = None
) -> Any:
    """Run the named query (or `query`, made from it) and wrap a database error."""
    return await ENGINE.run(conn, name, params, query=query)


# -- task types ----------------------------------------------------------------------


def _type_column(name: str) -> tuple[str, str]:
    """A declared field's column and the SQL of its value: JSON objects are jsonb,
    tuples text[]."""
    origin: Any = get_origin(TaskTypeFields.model_fields[name].annotation)
    cast = {dict: "jsonb", tuple: "text[]"}.get(origin)
    return name, f"cast(:{name} as {cast})" if cast else f":{name}"


@cache
def _type_query(name: str) -> TextClause:
    """insert_type / update_type, their columns filled in from the declaration
    (taskmgr.models.TaskTypeFields)."""
    columns = [_type_column(n) for n in TYPE_FIELDS]
    return text(
        q(name).text.format(
            columns=", ".join(c for c, _ in columns),
            values=", ".join(v for _, v in columns),
            assignments=", ".join(f"{c} = {v}" for c, v in columns if c != "name"),
        )
    )


def _type_params(t: TaskType) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in TYPE_FIELDS:
        value = getattr(t, name)
        if isinstance(value, dict):
            value = _dumps(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, StrEnum):
            value = str(value)
        params[name] = value
    return params


async def _write_type(conn: Conn, name: str, t: TaskType) -> TaskType | None:
    row = (await _run(conn, name, _type_params(t), query=_type_query(name))).first()
    return _type_from_row(row) if row else None


async def insert_type(conn: Conn, t: TaskType) -> TaskType | None:
    """The new type, or None when one of that name exists."""
    return await _write_type(conn, "insert_type", t)


async def update_type(conn: Conn, t: TaskType) -> TaskType | None:
    return await _write_type(conn, "update_type", t)


async def get_type(conn: Conn, name: str, *, for_update: bool = False) -> TaskType | None:
    query = "get_type_for_update" if for_update else "get_type"
    row = (await _run(conn, query, {"name": name})).first()
    return _type_from_row(row) if row else None


async def get_types(conn: Conn, names: Iterable[str]) -> dict[str, TaskType]:
    """The types of these names that exist (deleted ones included), in one query."""
    rows = await _run(conn, "get_types", {"names": sorted(set(names))})
    return {t.name: t for t in map(_type_from_row, rows)}


async def list_types(conn: Conn, *, include_deleted: bool = False) -> list[TaskType]:
    rows = await _run(conn, "list_types", {"include_deleted": include_deleted})
    return [_type_from_row(r) for r in rows]


async def set_type_deleted(conn: Conn, name: str, deleted: bool) -> TaskType | None:
    row = (await _run(conn, "set_type_deleted", {"name": name, "deleted": deleted})).first()
    return _type_from_row(row) if row else None


# -- tasks ---------------------------------------------------------------------------


async def insert_tasks(conn: Conn, tasks: Sequence[Mapping[str, Any]]) -> set[uuid.UUID]:
    """Insert tasks (dicts with the `tasks` columns); return the ids actually inserted
    (a dedup key that exists inserts nothing)."""
    if not tasks:
        return set()
    params = {
        "ids": [t["id"] for t in tasks],
        "types": [t["type"] for t in tasks],
        "payloads": [_dumps(t["payload"]) for t in tasks],
        "due_ats": [t["due_at"] for t in tasks],
        "parent_ids": [t.get("parent_id") for t in tasks],
        "root_ids": [t["root_id"] for t in tasks],
        "dedup_keys": [t.get("dedup_key") for t in tasks],
        "recurrences": [_dumps(t.get("recurrence")) for t in tasks],
        "occurrences": [t.get("occurrence", 1) for t in tasks],
        "created_bys": [t.get("created_by", "") for t in tasks],
        "names": [t.get("name") for t in tasks],
        "descriptions": [t.get("description") for t in tasks],
        "priorities": [t.get("priority", 0) for t in tasks],
        "on_dependency_failures": [str(t.get("on_dependency_failure", DependencyPolicy.FAIL)) for t in tasks],
    }
    rows = await _run(conn, "insert_tasks", params)
    return {r[0] for r in rows}


async def ids_by_dedup_key(conn: Conn, keys: Sequence[str]) -> dict[str, uuid.UUID]:
    rows = await _run(conn, "ids_by_dedup_key", {"keys": list(keys)})
    return {r[0]: r[1] for r in rows}


async def insert_states(
    conn: Conn, rows: Sequence[tuple[uuid.UUID, datetime | None, int]], now: datetime
) -> None:
    """New tasks' rows: (id, run_at or None while waiting for dependencies, priority)."""
    if rows:
        ids, run_ats, priorities = zip(*rows, strict=True)
        params = {"ids": list(ids), "run_ats": list(run_ats), "priorities": list(priorities), "now": now}
        await _run(conn, "insert_states", params)


async def insert_events(conn: Conn, transitions: Sequence[Transition], now: datetime) -> None:
    if not transitions:
        return
    await _run(
        conn,
        "insert_events",
        {
            "now": now,
            "ids": [t.task_id for t in transitions],
            "states": [str(t.state) for t in transitions],
            "attempts": [t.attempt for t in transitions],
            "runner_ids": [t.runner_id for t in transitions],
            "sources": [t.source for t in transitions],
            "applieds": [t.applied for t in transitions],
            "details": [_dumps(t.detail) for t in transitions],
        },
    )


def _current_from_row(row: Any) -> CurrentState:
    m = row._mapping
    return CurrentState(
        task_id=m["task_id"],
        state=State(m["state"]),
        attempt=m["attempt"],
        failures=m["failures"],
        runner_id=m["runner_id"],
        run_at=m["run_at"],
        type=m["type"],
        root_id=m["root_id"],
        started_at=m["started_at"],
    )


async def lock_states(conn: Conn, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, CurrentState]:
    """Lock the state rows of these tasks (in id order, so two lockers never deadlock)."""
    rows = await _run(conn, "lock_states", {"ids": sorted(set(ids))})
    return {r.task_id: _current_from_row(r) for r in rows}


async def apply_transitions(
    conn: Conn,
    transitions: Sequence[Transition],
    now: datetime,
    *,
    current: Mapping[uuid.UUID, CurrentState] | None = None,
    strict: bool = True,
) -> list[Transition]:
    """How state changes are written (the one exception is `start_due`, the dispatch
    hot path, whose WHERE admits only SCHEDULED/RETRYING -> STARTED): each transition is
    checked against the state machine and folded into the task_state projection
    (models.StateChanges), then written (`write_changes`), in the caller's transaction.
    `current` is the locked state (from `lock_states` or a claim); without it the rows
    are locked here.

    strict: an illegal transition raises IllegalTransition (nothing is written).
    Otherwise it is kept in the history with applied=false and the reason. Returns the
    transitions as recorded.
    """
    if not transitions:
        return []
    states = dict(current) if current is not None else None
    if states is None:
        states = await lock_states(conn, (t.task_id for t in transitions))
    changes = StateChanges(now, states, strict=strict)
    for t in transitions:
        changes.add(t)
    await write_changes(conn, changes)
    return changes.recorded


async def write_changes(conn: Conn, changes: StateChanges) -> None:
    """Append the changes' events to task_events and write the rows they changed to
    task_state (both as models.StateChanges judged and folded them); then, in the same
    transaction, settle the tasks waiting for those that ended (taskmgr.waiting.settle)."""
    from taskmgr import waiting  # it writes its own changes through this function

    batch: StateChanges | None = changes
    while batch is not None:
        await _write_changes(conn, batch)
        batch = await waiting.settle(conn, batch)


async def _write_changes(conn: Conn, changes: StateChanges) -> None:
    await insert_events(conn, changes.recorded, changes.now)
    if changes.changed:
        rows = list(changes.changed.values())
        await _run(
            conn,
            "update_states",
            {
                "now": changes.now,
                "ids": [r.task_id for r in rows],
                "states": [str(r.state) for r in rows],
                "attempts": [r.attempt for r in rows],
                "failures": [r.failures for r in rows],
                "run_ats": [r.run_at for r in rows],
                "runner_ids": [r.runner_id for r in rows],
                "started_ats": [r.started_at for r in rows],
            },
        )


async def claim_due(conn: Conn, now: datetime, limit: int) -> list[Any]:
    """Lock up to `limit` due tasks (skipping ones another manager holds). Returns
    mappings with the task's columns and its locked state."""
    rows = await _run(conn, "claim_due", {"now": now, "limit": limit})
    return [r._mapping for r in rows]


async def start_due(conn: Conn, now: datetime, limit: int) -> list[Any]:
    """Claim and start up to `limit` due one-off tasks in one statement (the hot path of
    dispatch): the SCHEDULED/RETRYING -> STARTED edge of the state machine, written with
    its events like `apply_transitions` would. Returns mappings with what a start order
    needs and `lateness_ms`."""
    rows = await _run(conn, "start_due", {"now": now, "limit": limit})
    return [r._mapping for r in rows]


async def start_orders(conn: Conn, ids: Sequence[uuid.UUID]) -> list[Any]:
    rows = await _run(conn, "start_orders", {"ids": list(ids)})
    return [r._mapping for r in rows]


async def outbox(conn: Conn, before: datetime, limit: int) -> list[uuid.UUID]:
    rows = await _run(conn, "outbox", {"before": before, "limit": limit})
    return [r[0] for r in rows]


async def mark_sent(conn: Conn, sent: Sequence[tuple[uuid.UUID, int]], now: datetime) -> None:
    if sent:
        await _run(
            conn,
            "mark_sent",
            {"now": now, "ids": [i for i, _ in sent], "attempts": [a for _, a in sent]},
        )


async def get_task(conn: Conn, task_id: uuid.UUID) -> Task | None:
    row = (await _run(conn, "get_task", {"id": task_id})).first()
    return _task_from_row(row) if row else None


async def list_tasks(
    conn: Conn,
    *,
    type: str | None = None,
    state: State | None = None,
    root_id: uuid.UUID | None = None,
    due_from: datetime | None = None,
    due_to: datetime | None = None,
    after: tuple[datetime, uuid.UUID] | None = None,
    limit: int = 100,
) -> list[Task]:
    params = {
        "type": type,
        "state": str(state) if state else None,
        "root_id": root_id,
        "due_from": due_from,
        "due_to": due_to,
        "after_due": after[0] if after else None,
        "after_id": after[1] if after else None,
        "limit": limit,
    }
    return [_task_from_row(r) for r in await _run(conn, "list_tasks", params)]


async def history(conn: Conn, task_id: uuid.UUID) -> list[TaskEvent]:
    return [_event_from_row(r) for r in await _run(conn, "history", {"id": task_id})]


async def tree_events(conn: Conn, root_id: uuid.UUID) -> list[TaskEvent]:
    return [_event_from_row(r) for r in await _run(conn, "tree_events", {"root_id": root_id})]


# -- runners -------------------------------------------------------------------------


async def upsert_runner(
    conn: Conn, *, runner_id: str, pool: str, host: str, pid: int, tasks: int, now: datetime
) -> None:
    await _run(
        conn,
        "upsert_runner",
        {"id": runner_id, "pool": pool, "host": host, "pid": pid, "tasks": tasks, "now": now},
    )


async def stop_runner(conn: Conn, runner_id: str, now: datetime) -> None:
    await _run(conn, "stop_runner", {"id": runner_id, "now": now})


async def dead_runners(conn: Conn, before: datetime, heard: Sequence[str] = ()) -> dict[str, str]:
    """Mark the runners silent since `before` dead, but for those `heard` from since then
    (a heartbeat received, not applied yet); returns their ids and pools."""
    rows = await _run(conn, "dead_runners", {"before": before, "heard": list(heard)})
    return {r.id: r.pool for r in rows}


async def live_runners_by_pool(conn: Conn, since: datetime) -> dict[str, int]:
    """Runners heard from since `since` (not stopped, not dead) per pool; 0 for the pool
    of a task type that has none."""
    return {r.pool: int(r.n) for r in await _run(conn, "live_runners_by_pool", {"since": since})}


async def active_runners(conn: Conn, since: datetime) -> list[Mapping[str, Any]]:
    return [r._mapping for r in await _run(conn, "active_runners", {"since": since})]


async def tasks_of_runners(conn: Conn, runner_ids: Sequence[str]) -> list[uuid.UUID]:
    rows = await _run(conn, "tasks_of_runners", {"runner_ids": list(runner_ids)})
    return [r[0] for r in rows]


async def runner_deaths(conn: Conn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Mapping[str, Any]]:
    """For RUNNING tasks of dead runners: `held_s` (the runner's last heartbeat minus
    the time the task became RUNNING there), `poll_interval_s`, `request_timeout_s`."""
    return {r.task_id: r._mapping for r in await _run(conn, "runner_deaths", {"ids": list(ids)})}


async def runner_holdings(conn: Conn, runner_id: str, held: Sequence[uuid.UUID]) -> list[Mapping[str, Any]]:
    """What the manager thinks the runner holds that its heartbeat (`held`) does not list."""
    rows = await _run(conn, "runner_holdings", {"runner_id": runner_id, "held": list(held)})
    return [r._mapping for r in rows]


async def not_held_by(
    conn: Conn, runner_id: str, tasks: Sequence[tuple[uuid.UUID, int]]
) -> list[tuple[uuid.UUID, int]]:
    """Of the (task, attempt) pairs a runner's heartbeat lists, those not its own."""
    params = {"runner_id": runner_id, "ids": [t for t, _ in tasks], "attempts": [a for _, a in tasks]}
    return [(r.task_id, r.attempt) for r in await _run(conn, "not_held_by", params)]


async def recoveries(
    conn: Conn, ids: Sequence[uuid.UUID], label: str, *, since_running: bool = False
) -> dict[uuid.UUID, int]:
    """How many times recovery took each task back for `label` (runner_dead, start_timeout);
    since_running: only since the task last reached RUNNING (a count in a row)."""
    rows = await _run(conn, "recoveries", {"ids": list(ids), "label": label, "since_running": since_running})
    return {r.task_id: r.n for r in rows}


async def start_timeouts(conn: Conn, now: datetime, limit: int) -> list[uuid.UUID]:
    return [r[0] for r in await _run(conn, "start_timeouts", {"now": now, "limit": limit})]


# -- outside services ----------------------------------------------------------------


async def upsert_service(
    conn: Conn,
    *,
    task_id: uuid.UUID,
    service: str,
    attempt: int,
    state: str,
    detail: Mapping[str, Any],
    now: datetime,
) -> None:
    await _run(
        conn,
        "upsert_service",
        {
            "task_id": task_id,
            "service": service,
            "attempt": attempt,
            "state": state,
            "detail": _dumps(dict(detail)),
            "now": now,
        },
    )


async def services_of(conn: Conn, task_id: uuid.UUID) -> dict[str, Mapping[str, Any]]:
    rows = await _run(conn, "services_of", {"task_id": task_id})
    return {r.service: r._mapping for r in rows}


# -- schedule sync, retention, leadership --------------------------------------------


async def sync_scope(conn: Conn, scope: str) -> list[Mapping[str, Any]]:
    prefix = scope.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
    return [r._mapping for r in await _run(conn, "sync_scope", {"prefix": prefix})]


async def lock_scope(conn: Conn, scope: str) -> None:
    """Serialise the schedule syncs of one scope, until the transaction ends."""
    await _run(conn, "lock_scope", {"scope": scope})


async def notify_wakeup(conn: Conn) -> None:
    """At commit, wake the leader's dispatch (a task is due now)."""
    await _run(conn, "notify", {"channel": WAKEUP_CHANNEL, "payload": ""})


async def notify_leader(conn: Conn, message: CancelNotice | TypeChange) -> None:
    """At commit, tell the leader of a task to stop (CancelNotice), a type change to broadcast."""
    channel = CANCEL_CHANNEL if isinstance(message, CancelNotice) else TYPE_CHANNEL
    await _run(conn, "notify", {"channel": channel, "payload": encode(message).decode()})


async def drop_chunks(conn: Conn, older_than: datetime) -> int:
    return int((await _run(conn, "drop_chunks", {"older_than": older_than})).scalar_one())


async def leader_present(conn: Conn) -> bool:
    """Whether some manager holds a live leadership lease in this database."""
    row = (await _run(conn, "leader_present")).first()
    return bool(row and row.present)


async def campaign(conn: Conn, holder: str, lease_s: float) -> int | None:
    """Take the leadership lease if none is live: the new term, or None. Waits for the
    write transactions that checked the lease (the fence) to end."""
    await _run(conn, "lock_lease", {})
    return (await _run(conn, "campaign", {"holder": holder, "lease_s": lease_s})).scalar()  # type: ignore[no-any-return]


async def renew(conn: Conn, term: int, holder: str, lease_s: float) -> bool:
    """Extend this holder's term's lease; False when it was lost (expired, or taken over)."""
    params = {"term": term, "holder": holder, "lease_s": lease_s}
    return (await _run(conn, "renew", params)).first() is not None


async def resign(conn: Conn, term: int, holder: str) -> None:
    await _run(conn, "resign", {"term": term, "holder": holder})


async def fence(conn: Conn, term: int, holder: str) -> bool:
    """In a write transaction: whether this holder's `term` still holds a live lease
    (key-share-locked until the transaction ends: a takeover waits for it)."""
    return (await _run(conn, "fence", {"term": term, "holder": holder})).first() is not None


# -- reports -------------------------------------------------------------------------


async def states_of(conn: Conn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, State]:
    rows = await _run(conn, "states_of", {"ids": list(ids)})
    return {r.task_id: State(r.state) for r in rows}


async def counts_by_type_and_state(conn: Conn) -> list[tuple[str, State, int]]:
    return [(r.type, State(r.state), r.n) for r in await _run(conn, "counts_by_type_and_state")]


async def lateness_ms(conn: Conn, since: datetime) -> list[float]:
    return [r.ms for r in await _run(conn, "lateness_ms", {"since": since})]


async def due_probe(conn: Conn, now: datetime) -> tuple[datetime | None, bool]:
    """When the earliest waiting task is due (None: nothing waits), and whether a
    recurring task is due at `now`."""
    row = (await _run(conn, "due_probe", {"now": now})).one()
    return row.next_at, bool(row.recurring_due)


async def rebuild_state(conn: Conn) -> int:
    """Recompute task_state from task_events; returns the rows rewritten. Run by the
    database owner: the state-machine trigger lets a rebuild jump states, but never for
    the manager's role."""
    await _run(conn, "allow_rebuild")
    return int((await _run(conn, "rebuild_state")).rowcount)


async def leader_name(conn: Conn) -> str | None:
    """Who leads: the live lease's holder, taskmgr-leader-<host>-<pid>."""
    return (await _run(conn, "leader_name")).scalar()  # type: ignore[no-any-return]


async def roots_of(conn: Conn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """The root task of each of these tasks (the ones that exist)."""
    return {r.id: r.root_id for r in await _run(conn, "roots_of", {"ids": list(ids)})}
