"""Values the data layer returns: frozen, never database rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any


class State(StrEnum):
    SCHEDULED = "SCHEDULED"
    STARTED = "STARTED"  # claimed, start order sent (or in the outbox)
    RUNNING = "RUNNING"  # a runner holds it
    RETRYING = "RETRYING"  # waiting for its next attempt
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.FINISHED, State.FAILED, State.CANCELLED})
ACTIVE = frozenset({State.STARTED, State.RUNNING})

# The state machine. FAILED -> RETRYING is an operator's manual retry; SCHEDULED ->
# FAILED is a task that can never start (its recurrence rule cannot be evaluated).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.SCHEDULED: frozenset({State.STARTED, State.CANCELLED, State.FAILED}),
    State.STARTED: frozenset({State.RUNNING, State.RETRYING, State.FINISHED, State.FAILED, State.CANCELLED}),
    State.RUNNING: frozenset({State.RETRYING, State.FINISHED, State.FAILED, State.CANCELLED}),
    State.RETRYING: frozenset({State.STARTED, State.FAILED, State.CANCELLED}),
    State.FINISHED: frozenset(),
    State.FAILED: frozenset({State.RETRYING}),
    State.CANCELLED: frozenset(),
}


def can_transition(current: State, new: State) -> bool:
    return new in TRANSITIONS[current]


class MisfirePolicy(StrEnum):
    COALESCE = "coalesce"  # run the late occurrence once, skip the other missed slots
    CATCH_UP = "catch_up"  # run every missed slot, one after another
    SKIP = "skip"  # an occurrence later than its grace is cancelled; next slot after now


@dataclass(frozen=True)
class TaskType:
    name: str
    handler: str
    url_template: str = ""
    poll_interval_s: float = 5.0
    payload_schema: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    request_timeout_s: float = 10.0
    start_timeout_s: float = 30.0
    max_consecutive_failures: int = 5
    pool: str = "default"
    required_services: tuple[str, ...] = ()
    misfire_policy: MisfirePolicy = MisfirePolicy.COALESCE
    misfire_grace_s: float = 60.0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


@dataclass(frozen=True)
class Recurrence:
    """Either `every_s` or `cron` (+ `timezone`); optionally ends after N runs or at a time."""

    every_s: float | None = None
    cron: str | None = None
    timezone: str = "UTC"
    ends_after: int | None = None
    ends_at: datetime | None = None


@dataclass(frozen=True)
class Task:
    id: uuid.UUID
    type: str
    payload: dict[str, Any]
    due_at: datetime
    root_id: uuid.UUID
    parent_id: uuid.UUID | None
    dedup_key: str | None
    recurrence: dict[str, Any] | None
    occurrence: int
    created_at: datetime
    created_by: str
    state: State
    attempt: int
    failures: int
    runner_id: str | None
    changed_at: datetime


@dataclass(frozen=True)
class CurrentState:
    """A task's row in the state projection, as locked for a change."""

    task_id: uuid.UUID
    state: State
    attempt: int
    failures: int
    runner_id: str | None
    run_at: datetime | None
    type: str
    root_id: uuid.UUID

    def after(self, t: Transition, now: datetime) -> CurrentState:
        """This row once `t` (an applied, legal transition) is folded in: the projection
        rule, in one place."""
        waiting = t.state in (State.SCHEDULED, State.RETRYING)
        return replace(
            self,
            state=t.state,
            attempt=t.attempt,
            failures=self.failures + (1 if t.count_failure else 0),
            run_at=(t.run_at or now) if waiting else None,
            runner_id=None if t.state in (State.STARTED, State.RETRYING) else (t.runner_id or self.runner_id),
        )


@dataclass(frozen=True)
class TaskAttempt:
    """A task's current attempt, read without a lock."""

    task_id: uuid.UUID
    state: State
    attempt: int
    runner_id: str | None


@dataclass(frozen=True)
class Scheduled:
    """What `schedule` did: the task's id, and whether it already existed (dedup key)."""

    id: uuid.UUID
    created: bool


@dataclass(frozen=True)
class TaskEvent:
    time: datetime
    task_id: uuid.UUID
    state: State
    attempt: int
    runner_id: str | None
    source: str
    applied: bool
    detail: dict[str, Any]


@dataclass(frozen=True)
class Transition:
    """One state change to record (or, with applied=False, a report kept for the record)."""

    task_id: uuid.UUID
    state: State
    attempt: int
    source: str
    runner_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    run_at: datetime | None = None  # SCHEDULED/RETRYING: when discovery should start it
    applied: bool = True
    count_failure: bool = False  # a failed attempt: counts against the type's max_attempts
