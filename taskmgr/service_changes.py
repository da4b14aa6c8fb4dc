"""Changes an operator (a command, the HTTP API) makes to one task, each under the task's
row lock: cancel, retry, reschedule, update_payload. TaskService's (taskmgr/service.py,
which owns the rest of the rules and inherits these): call them on a TaskService.

Each runs in a transaction of its own and returns the task as it is then. Errors say
what was wrong and change nothing: InvalidInput (bad input: HTTP 400), TaskNotFound
(404), a Conflict with the task's current state (409: TaskNotWaiting,
IllegalTransition).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from taskmgr import recurrence as recur
from taskmgr import store, waiting
from taskmgr.errors import IllegalTransition, InvalidInput, TaskNotFound, TaskNotWaiting
from taskmgr.messages import CancelNotice
from taskmgr.models import ACTIVE, WAITING, CurrentState, MisfirePolicy, State, Task, Transition

if TYPE_CHECKING:
    from taskmgr.models import TaskType

# How many occurrences after a cancelled one `cancel(series=True)` follows at most (a
# series has one or two occurrences not yet ended: the guard is against a cycle).
MAX_SERIES_WALK = 1000


class TaskChanges:
    """The operator's changes of one task (a part of TaskService)."""

    _engine: AsyncEngine
    _clock: Callable[[], datetime]

    if TYPE_CHECKING:  # TaskService's

        def session(self) -> AsyncSession: ...

        async def get_task(self, task_id: uuid.UUID) -> Task: ...

        def _validate_payload(self, t: TaskType, payload: Any, where: str = "") -> None: ...

        async def write_rows(self, conn: Any, rows: Any, now: datetime) -> Any: ...

    async def reschedule(self, task_id: uuid.UUID, due_at: datetime, *, source: str = "operator") -> Task:
        """Move a waiting task to a new due time, under its row lock.

        SCHEDULED: its due time becomes `due_at` (a task still waiting for its
        dependencies keeps waiting, and once they end is due at `due_at` at the
        earliest). RETRYING: its next attempt is at `due_at`. A time in the past makes it
        due now. A recurring task's occurrence moves alone; its successor follows the
        rule from the new due time. Recorded in the history (`tasks history`): a row with
        applied=false (not a state change, so no lifecycle event), `change` "rescheduled",
        `moved_from`, and `due_at` (SCHEDULED) or `run_at` (RETRYING).

        Raises InvalidInput (not a time with a timezone), TaskNotFound, TaskNotWaiting
        (not SCHEDULED or RETRYING: a conflict); nothing changes then.
        """
        if not isinstance(due_at, datetime) or due_at.tzinfo is None or due_at.utcoffset() is None:
            raise InvalidInput("due_at", f"must be a time with a timezone: {due_at!r}")
        now = self._clock()
        async with self.session() as session, session.begin():
            cur = await self._lock_waiting(session, task_id, "rescheduled")
            if cur.state is State.SCHEDULED:
                task = await store.get_task(session, task_id)
                assert task is not None
                old = task.due_at
                await waiting.move_due(session, task_id, due_at, now)
            else:
                assert cur.run_at is not None
                old = cur.run_at
                await waiting.set_retry_at(session, task_id, due_at, now)
            await store.insert_events(session, [waiting.moved(cur, old, due_at, source)], now)
            if cur.run_at is not None and due_at <= now + timedelta(seconds=waiting.WAKEUP_HORIZON_S):
                await store.notify_wakeup(session)
        return await self.get_task(task_id)

    async def update_payload(
        self,
        task_id: uuid.UUID,
        payload: Mapping[str, Any],
        *,
        merge: bool = False,
        source: str = "operator",
    ) -> Task:
        """Replace a waiting task's payload (merge=True: set these keys, keep the
        others), under its row lock. The result must match the task type's JSON Schema.
        Its next attempt (or its first) runs with it; a recurring task's later
        occurrences copy it. Recorded in the history (`tasks history`): a row with
        applied=false, `change` "payload_updated", the `previous` payload and the new.

        Raises InvalidInput (not an object, or it fails the schema: the field and the
        problem), TaskNotFound, TaskNotWaiting (not SCHEDULED or RETRYING: a conflict);
        nothing changes then.
        """
        if not isinstance(payload, Mapping):
            raise InvalidInput("payload", "must be a JSON object")
        now = self._clock()
        async with self.session() as session, session.begin():
            cur = await self._lock_waiting(session, task_id, "updated")
            task = await store.get_task(session, task_id)
            tt = await store.get_type(session, cur.type)
            assert task is not None and tt is not None  # types are only ever soft-deleted
            new = {**task.payload, **payload} if merge else dict(payload)
            self._validate_payload(tt, new)
            await waiting.set_payload(session, task_id, new)
            detail = {"change": "payload_updated", "previous": task.payload, "payload": new}
            event = Transition(task_id, cur.state, cur.attempt, source, detail=detail, applied=False)
            await store.insert_events(session, [event], now)
        return await self.get_task(task_id)

    async def _lock_waiting(self, session: Any, task_id: uuid.UUID, what: str) -> CurrentState:
        cur = (await store.lock_states(session, [task_id])).get(task_id)
        if cur is None:
            raise TaskNotFound(task_id)
        if cur.state not in WAITING:
            raise TaskNotWaiting(task_id, cur.state, what)
        return cur

    async def cancel(
        self, task_id: uuid.UUID, *, reason: str = "", source: str = "operator", series: bool = False
    ) -> Task:
        """Record CANCELLED. A due task is never dispatched after this commits; a
        running one is stopped: the manager hears of it (NOTIFY) and tells its runner.

        A recurring task: cancelling one occurrence cancels that occurrence only. Its
        successor is written when it is dispatched; one cancelled before that gets its
        successor written here (the same `<id>:next` row), so the series goes on.
        series=True ends the series: no successor, and those already written are
        cancelled too."""
        now = self._clock()
        async with self.session() as session, session.begin():
            cur = (await store.lock_states(session, [task_id])).get(task_id)
            if cur is None:
                raise TaskNotFound(task_id)
            if cur.state.terminal:
                raise IllegalTransition(task_id, cur.state, State.CANCELLED)
            await self._cancel_locked(session, cur, reason or "cancelled", source, now)
            task = await store.get_task(session, task_id)
            if task is not None and task.recurrence:
                if series:
                    await self._cancel_successors(session, task_id, source, now)
                elif cur.state is State.SCHEDULED:
                    await self._write_successor(session, task, now)
        return await self.get_task(task_id)

    async def _cancel_locked(
        self, session: Any, cur: CurrentState, reason: str, source: str, now: datetime
    ) -> None:
        await store.apply_transitions(
            session,
            [
                Transition(
                    cur.task_id, State.CANCELLED, cur.attempt, source, cur.runner_id, {"reason": reason}
                )
            ],
            now,
            current={cur.task_id: cur},
        )
        if cur.state in ACTIVE:
            # STARTED: no runner known yet; the stop goes to every runner of the pool.
            tt = await store.get_type(session, cur.type)
            notice = CancelNotice(
                task_id=cur.task_id,
                attempt=cur.attempt,
                runner_id=cur.runner_id,
                pool=tt.pool if tt is not None else None,
            )
            await store.notify_leader(session, notice)

    async def _cancel_successors(self, session: Any, task_id: uuid.UUID, source: str, now: datetime) -> None:
        """Follow the `<id>:next` chain and cancel every occurrence not yet ended."""
        key = f"{task_id}:next"
        for _ in range(MAX_SERIES_WALK):
            nxt = (await store.ids_by_dedup_key(session, [key])).get(key)
            if nxt is None:
                return
            c = (await store.lock_states(session, [nxt])).get(nxt)
            if c is not None and not c.state.terminal:
                await self._cancel_locked(session, c, f"series cancelled with {task_id}", source, now)
            key = f"{nxt}:next"

    async def _write_successor(self, session: Any, task: Task, now: datetime) -> None:
        rule = recur.parse(task.recurrence)
        assert rule is not None
        tt = await store.get_type(session, task.type)
        due = recur.next_occurrence(
            rule,
            occurrence=task.occurrence,
            due_at=task.due_at,
            now=now,
            policy=tt.misfire_policy if tt is not None else MisfirePolicy.COALESCE,
        )
        if due is None:  # the rule has ended
            return
        row = {
            "task_id": task.id,
            "type": task.type,
            "payload": task.payload,
            "root_id": task.root_id,
            "recurrence": task.recurrence,
            "occurrence": task.occurrence,
            "name": task.name,
            "description": task.description,
            "priority": task.priority,
        }
        await self.write_rows(session, [recur.next_occurrence_row(row, due)], now)

    async def retry(self, task_id: uuid.UUID, *, source: str = "operator") -> Task:
        """An operator's retry of a FAILED task: due again now, failures count reset."""
        async with self.session() as session, session.begin():
            cur = (await store.lock_states(session, [task_id])).get(task_id)
            if cur is None:
                raise TaskNotFound(task_id)
            await store.apply_transitions(
                session,
                [
                    Transition(
                        task_id,
                        State.RETRYING,
                        cur.attempt,
                        source,
                        detail={"reason": "manual retry", "failures": 0},
                    )
                ],
                self._clock(),
                # A new run: failures and max_runtime_s count again from here.
                current={task_id: replace(cur, failures=0, started_at=None)},
            )
            await store.notify_wakeup(session)
        return await self.get_task(task_id)
