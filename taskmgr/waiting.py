"""Waiting tasks (SCHEDULED or RETRYING): what may change while a task waits (its due
time, its payload) and what it waits for (its dependencies, sql/0016). The SQL is
sql/waiting_queries.sql; as in taskmgr.store, every function takes the connection to
run on, so the caller decides the transaction.

Dependencies. A task may name tasks it waits for when it is created (never later, so
only tasks that exist, or that the same call creates, can be named, and a cycle can
only be made inside one call: `check_new` refuses it). While one of them has not ended
it is SCHEDULED with run_at null, which no claim reads. Whether it may run is
models.readiness. Every state change is written by store.write_changes, which calls
`settle` with what it wrote: the tasks waiting for one that ended are locked, judged
and released (due at their due time, or now if that passed) or failed in that same
transaction, and a failure goes on down the graph the same way. No job polls for them.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from taskmgr import store
from taskmgr.errors import InvalidInput
from taskmgr.models import (
    TERMINAL,
    CurrentState,
    DependencyPolicy,
    Readiness,
    State,
    StateChanges,
    Transition,
    readiness,
)
from taskmgr.queries import QueryFile, in_sql_dir

# How many tasks one task may wait for.
MAX_DEPENDENCIES = 1000
# A task due within this of now wakes the manager instead of waiting for its next poll.
WAKEUP_HORIZON_S = 1.0
# The source of the changes made by the dependency rule (releases and failures).
SOURCE = "dependencies"


_QUERIES = QueryFile(in_sql_dir("waiting_queries.sql"))
_run = _QUERIES.run


# -- changes while a task waits ------------------------------------------------------


async def move_due(conn: store.Conn, task_id: uuid.UUID, due_at: datetime, now: datetime) -> None:
    """A SCHEDULED task's new due time (one waiting for dependencies keeps waiting)."""
    await _run(conn, "move_due", {"id": task_id, "due_at": due_at})
    await _run(conn, "move_run_at", {"id": task_id, "due_at": due_at, "now": now})


async def set_retry_at(conn: store.Conn, task_id: uuid.UUID, run_at: datetime, now: datetime) -> None:
    """A RETRYING task's next attempt, at `run_at`."""
    await _run(conn, "set_retry_at", {"id": task_id, "run_at": run_at, "now": now})


async def set_payload(conn: store.Conn, task_id: uuid.UUID, payload: Mapping[str, Any]) -> None:
    await _run(conn, "set_payload", {"id": task_id, "payload": store._dumps(dict(payload))})


def moved(cur: CurrentState, old: datetime, new: datetime, source: str, **detail: Any) -> Transition:
    """The history row of a moved due time (a reschedule, a schedule sync): kept for the
    record (applied=false), it changes no state. `run_at` is where a RETRYING task's
    next attempt went (`taskmgr rebuild-state` reads it)."""
    when = {"due_at": new.isoformat()} if cur.state is State.SCHEDULED else {"run_at": new.isoformat()}
    return Transition(
        cur.task_id,
        cur.state,
        cur.attempt,
        source,
        detail={"change": "rescheduled", "moved_from": old.isoformat(), **when, **detail},
        applied=False,
    )


# -- dependencies of new tasks -------------------------------------------------------


def check_depends_on(value: Any, where: str = "") -> tuple[uuid.UUID, ...]:
    """A task's `depends_on` as given: task ids (UUIDs or their strings), at most
    MAX_DEPENDENCIES, each once (repeats are dropped); None is none."""
    field = f"{where}depends_on"
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidInput(field, "must be a list of task ids")
    ids: dict[uuid.UUID, None] = {}
    for v in value:
        try:
            ids[v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))] = None
        except ValueError:
            raise InvalidInput(field, f"{v!r} is not a task id (a UUID)") from None
    if len(ids) > MAX_DEPENDENCIES:
        raise InvalidInput(field, f"{len(ids)} tasks; a task may wait for at most {MAX_DEPENDENCIES}")
    return tuple(ids)


def _check_acyclic(rows: Sequence[Mapping[str, Any]]) -> None:
    """The dependencies among one batch's own tasks form no cycle (depth-first, iterative)."""
    edges = {r["id"]: [d for d in r.get("depends_on") or () if d != r["id"]] for r in rows}
    for r in rows:
        if r["id"] in (r.get("depends_on") or ()):
            raise InvalidInput("depends_on", f"task {r['id']} cannot wait for itself")
    done: set[uuid.UUID] = set()
    for start in edges:
        if start in done:
            continue
        path, on_path = [start], {start}
        stack = [iter(edges[start])]
        while stack:
            nxt = next((d for d in stack[-1] if d in edges), None)
            if nxt is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                stack.pop()
            elif nxt in on_path:
                cycle = [*path[path.index(nxt) :], nxt]
                raise InvalidInput("depends_on", "a cycle: " + " -> ".join(map(str, cycle)))
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(edges[nxt]))


async def lock_dependencies(conn: store.Conn, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, State]:
    """The states of these tasks (those that exist), share-locked until the transaction
    ends: none of them can end unseen by the tasks about to wait for it."""
    rows = await _run(conn, "lock_dependencies", {"ids": sorted(set(ids))})
    return {r.task_id: State(r.state) for r in rows}


async def check_new(conn: store.Conn, rows: Sequence[Mapping[str, Any]]) -> dict[uuid.UUID, State]:
    """Before a batch of new tasks (the rows TaskService writes) is written: each
    dependency is a task of the batch or one that exists, and the batch's own tasks form
    no cycle; otherwise InvalidInput, and nothing is written. Returns the states of the
    existing tasks named (share-locked)."""
    named = {d for r in rows for d in r.get("depends_on") or ()}
    if not named:
        return {}
    _check_acyclic(rows)
    outside = named - {r["id"] for r in rows}
    states = await lock_dependencies(conn, outside) if outside else {}
    missing = sorted(outside - set(states))
    if missing:
        raise InvalidInput("depends_on", f"no such task {missing[0]}")
    return states


class NewDependencies:
    """The dependencies of a batch's new tasks, once written (`judge`, then `write`):
    which wait, which may run, which fail at once (a dependency FAILED or CANCELLED
    already, with on_dependency_failure=fail)."""

    def __init__(self) -> None:
        self.depends_on: dict[uuid.UUID, tuple[uuid.UUID, ...]] = {}
        self.verdicts: dict[uuid.UUID, tuple[Readiness, uuid.UUID | None]] = {}
        self.states: dict[uuid.UUID, State] = {}

    async def judge(
        self,
        conn: store.Conn,
        rows: Sequence[Mapping[str, Any]],
        inserted: set[uuid.UUID],
        aliases: Mapping[uuid.UUID, uuid.UUID],
        states: Mapping[uuid.UUID, State],
    ) -> None:
        """`inserted`: the rows written (a dedup key that existed writes none);
        `aliases`: a batch row not written -> the task that has its dedup key, which
        its dependents wait for instead; `states`: from check_new."""
        self.states = dict(states)
        for r in rows:
            if r["id"] in inserted and r.get("depends_on"):
                self.depends_on[r["id"]] = tuple(dict.fromkeys(aliases.get(d, d) for d in r["depends_on"]))
        unread = {d for ds in self.depends_on.values() for d in ds} - set(self.states) - inserted
        if unread:
            self.states.update(await lock_dependencies(conn, unread))
        for r in rows:
            if r["id"] not in self.depends_on:
                continue
            # A new task has not ended; a task that is gone since (pruned) no longer counts.
            deps = self.depends_on[r["id"]]
            of = {d: State.SCHEDULED if d in inserted else self.states.get(d) for d in deps}
            known = {d: s for d, s in of.items() if s is not None}
            self.depends_on[r["id"]] = tuple(known)
            policy = DependencyPolicy(r.get("on_dependency_failure") or DependencyPolicy.FAIL)
            self.verdicts[r["id"]] = readiness(known, policy)

    def waits(self, task_id: uuid.UUID) -> bool:
        """Whether this new task starts waiting (run_at null): for a dependency, or to
        fail at once in `write`."""
        verdict = self.verdicts.get(task_id)
        return verdict is not None and verdict[0] is not Readiness.READY

    async def write(self, conn: store.Conn, now: datetime) -> None:
        """The dependency rows, and the failure of the tasks a dependency failed already."""
        pairs = [(t, d) for t, ds in self.depends_on.items() for d in ds]
        if not pairs:
            return
        await _run(
            conn,
            "insert_dependencies",
            {"task_ids": [t for t, _ in pairs], "depends_ons": [d for _, d in pairs]},
        )
        failed = [
            Transition(t, State.FAILED, 0, SOURCE, detail=_failure(by, self.states[by]))
            for t, (verdict, by) in self.verdicts.items()
            if verdict is Readiness.FAILED and by is not None
        ]
        await store.apply_transitions(conn, failed, now)


def _failure(dependency: uuid.UUID, state: State) -> dict[str, Any]:
    return {
        "reason": f"dependency {dependency} ended {state}",
        "dependency": str(dependency),
        "dependency_state": str(state),
        "final": True,
    }


# -- the release ---------------------------------------------------------------------


async def settle(conn: store.Conn, changes: StateChanges) -> StateChanges | None:
    """After `changes` were written (by store.write_changes, in their transaction): the
    tasks waiting for one that ended are locked and judged (models.readiness). Those
    that may run are released, due at their due time or now if it passed (a history
    row, applied=false, says so; the manager is woken if one is due now); those a
    failed dependency fails come back as the next changes to write, whose own
    dependents are settled in turn."""
    ended = sorted(r.task_id for r in changes.changed.values() if r.state in TERMINAL)
    if not ended:
        return None
    waiting = {r.task_id: r for r in await _run(conn, "lock_dependents", {"ids": ended})}
    if not waiting:
        return None
    deps: dict[uuid.UUID, dict[uuid.UUID, State]] = {t: {} for t in waiting}
    for d in await _run(conn, "dependency_states", {"ids": list(waiting)}):
        deps[d.task_id][d.depends_on] = State(d.state)
    now = changes.now
    rows = {
        t: CurrentState(t, State(r.state), r.attempt, r.failures, r.runner_id, r.run_at, r.type, r.root_id)
        for t, r in waiting.items()
    }
    failing = StateChanges(now, rows)
    released: list[tuple[uuid.UUID, datetime]] = []
    events: list[Transition] = []
    for t, r in waiting.items():
        verdict, by = readiness(deps[t], DependencyPolicy(r.on_dependency_failure))
        if verdict is Readiness.FAILED and by is not None:
            failing.add(Transition(t, State.FAILED, r.attempt, SOURCE, detail=_failure(by, deps[t][by])))
        elif verdict is Readiness.READY:
            run_at = max(r.due_at, now)
            released.append((t, run_at))
            ended_as = dict(Counter(str(s) for s in deps[t].values()))
            detail = {"change": "released", "released": ended_as, "run_at": run_at.isoformat()}
            events.append(Transition(t, State.SCHEDULED, r.attempt, SOURCE, detail=detail, applied=False))
    if released:
        await _run(conn, "release", {"ids": [t for t, _ in released], "run_ats": [a for _, a in released]})
        await store.insert_events(conn, events, now)
        if any(a <= now + timedelta(seconds=WAKEUP_HORIZON_S) for _, a in released):
            await store.notify_wakeup(conn)
    return failing if failing.recorded else None
