"""Values the data layer returns: frozen, never database rows."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from taskmgr.errors import IllegalTransition


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


# The sets of states the rest of the code asks about: these, not tuples of its own.
TERMINAL = frozenset({State.FINISHED, State.FAILED, State.CANCELLED})
ACTIVE = frozenset({State.STARTED, State.RUNNING})  # an attempt under way (order sent, or a runner has it)
WAITING = frozenset({State.SCHEDULED, State.RETRYING})  # due at run_at: what discovery claims

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


# The reason (and the runner's report kind) of a task that ran past its type's
# max_runtime_s, counted from its first start: it ends FAILED for good, never retried.
EXPIRED = "expired"


def runtime_deadline(started_at: datetime | None, max_runtime_s: float | None) -> datetime | None:
    """When a task started at `started_at` expires under `max_runtime_s` (None: never)."""
    if started_at is None or max_runtime_s is None:
        return None
    return started_at + timedelta(seconds=max_runtime_s)


def can_transition(current: State, new: State) -> bool:
    return new in TRANSITIONS[current]


# A task's priority: among tasks due at the same time, higher is claimed first (smallint).
PRIORITY_RANGE = (-32768, 32767)


class DependencyPolicy(StrEnum):
    """What a dependency that ends FAILED or CANCELLED does to the task waiting for it."""

    FAIL = "fail"  # the waiting task fails at once, naming the dependency
    RUN = "run"  # it counts as ended: the task runs once every dependency has ended


class Readiness(StrEnum):
    WAITING = "waiting"  # a dependency has not ended yet
    READY = "ready"  # due (at its due time, or now if that has passed)
    FAILED = "failed"  # a dependency ended FAILED or CANCELLED, and the policy is fail


def readiness(
    dependencies: Mapping[uuid.UUID, State], policy: DependencyPolicy
) -> tuple[Readiness, uuid.UUID | None]:
    """Whether a task waiting for these dependencies (their current states) may run: the
    rule, in one place. READY once every one FINISHED (with policy RUN: once every one
    ended, however); FAILED, naming the first dependency that ended FAILED or CANCELLED,
    with policy FAIL, without waiting for the others. A FAILED dependency counts as ended
    although an operator may retry it: its dependents were judged when it failed."""
    unsuccessful = sorted(d for d, s in dependencies.items() if s in TERMINAL and s is not State.FINISHED)
    if unsuccessful and policy is DependencyPolicy.FAIL:
        return Readiness.FAILED, unsuccessful[0]
    if all(s in TERMINAL for s in dependencies.values()):
        return Readiness.READY, None
    return Readiness.WAITING, None


class MisfirePolicy(StrEnum):
    COALESCE = "coalesce"  # run the late occurrence once, skip the other missed slots
    CATCH_UP = "catch_up"  # run every missed slot, one after another
    SKIP = "skip"  # an occurrence later than its grace is cancelled; next slot after now


def _declared(
    default: Any = ...,
    *,
    description: str,
    unit: str | None = None,
    listed: bool = False,
    **constraints: Any,
) -> Any:
    """One declared field of a task type: its default, its constraints, what it means
    (`description`, with its `unit`) and whether `taskmgr types list` shows it."""
    extra: dict[str, Any] = {"unit": unit, "listed": listed}
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class TaskTypeFields(BaseModel):
    """A task type's fields as a user sets them: the one declaration. The `taskmgr types`
    options and listing (taskmgr/cli/types.py), the TaskType value below and the
    columns the store writes (taskmgr/store.py, sql/queries.sql) derive from it, and
    user input is checked against it (TaskService.create_type / update_type)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = _declared(description="The type's name", pattern=r"^[a-z][a-z0-9_.-]{0,62}$", listed=True)
    handler: str = _declared(
        description="Handler name (task_types/ or an entry point)", min_length=1, listed=True
    )
    url_template: str = _declared("", description="URL template; {base} is the provider's base URL")
    poll_interval_s: float = _declared(
        5.0, description="Time between polls", unit="seconds", gt=0, listed=True
    )
    payload_schema: dict[str, Any] = _declared({}, description="JSON Schema the payloads must match")
    max_attempts: int = _declared(
        3, description="Failed attempts after which the task fails", ge=1, listed=True
    )
    backoff_base_s: float = _declared(
        2.0, description="Delay before the retry after the first failed attempt", unit="seconds", ge=0
    )
    backoff_max_s: float = _declared(
        300.0, description="Longest delay between attempts", unit="seconds", ge=0
    )
    request_timeout_s: float = _declared(10.0, description="Timeout of one request", unit="seconds", gt=0)
    start_timeout_s: float = _declared(
        30.0, description="Time a runner has to take a start order", unit="seconds", gt=0
    )
    max_consecutive_failures: int = _declared(
        5, description="Failed polls in a row that fail the attempt", ge=1
    )
    pool: str = _declared(
        "default", description="Runner pool", pattern=r"^[A-Za-z0-9_.-]{1,64}$", listed=True
    )
    required_services: tuple[str, ...] = _declared(
        (), description="Outside services that must report before the task ends", listed=True
    )
    misfire_policy: MisfirePolicy = _declared(
        MisfirePolicy.COALESCE, description="What a late occurrence of a recurring task does", listed=True
    )
    misfire_grace_s: float = _declared(
        60.0, description="Lateness the skip policy allows", unit="seconds", ge=0
    )
    max_runtime_s: float | None = _declared(
        None,
        description="Longest run of a task, from its first start; then it fails, reason expired "
        "(none: no limit)",
        unit="seconds",
        gt=0,
        listed=True,
    )

    @field_validator("payload_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        import jsonschema  # here: a runner process, which never checks a type, does not load it

        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value


class TaskType(TaskTypeFields):
    """A task type as stored: the declared fields and the times the store keeps."""

    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = Field(None, json_schema_extra={"listed": True})


# The fields a user sets (the columns the store writes), and those `types list` shows.
TYPE_FIELDS: tuple[str, ...] = tuple(TaskTypeFields.model_fields)
TYPE_LISTED: tuple[str, ...] = tuple(
    n
    for n, f in TaskType.model_fields.items()
    if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("listed")
)


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
    name: str | None = None
    description: str | None = None
    priority: int = 0  # among tasks due at the same time, higher is claimed first
    run_at: datetime | None = None  # when it is due next (waiting), None otherwise
    depends_on: tuple[uuid.UUID, ...] = ()
    on_dependency_failure: DependencyPolicy = DependencyPolicy.FAIL

    @property
    def blocked(self) -> bool:
        """SCHEDULED, waiting for its dependencies to end."""
        return self.state is State.SCHEDULED and self.run_at is None


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
    # The task's first STARTED (since its creation or an operator's retry): max_runtime_s
    # counts from here, across attempts.
    started_at: datetime | None = None

    def after(self, t: Transition, now: datetime) -> CurrentState:
        """This row once `t` (an applied, legal transition) is folded in: the projection
        rule, in one place."""
        waiting = t.state in WAITING
        return replace(
            self,
            state=t.state,
            attempt=t.attempt,
            failures=self.failures + (1 if t.count_failure else 0),
            run_at=(t.run_at or now) if waiting else None,
            runner_id=None if t.state in (State.STARTED, State.RETRYING) else (t.runner_id or self.runner_id),
            started_at=(self.started_at or now) if t.state is State.STARTED else self.started_at,
        )


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


@dataclass
class StateChanges:
    """Transitions checked against the state machine and folded, in order, into the
    rows they change: the one place where a change is judged and applied (the store
    writes what it holds: `store.write_changes`). Later transitions of a task see the
    earlier ones (`rows`).

    rows: each task's locked current state, as the changes so far leave it.
    strict: an illegal transition (or one for a task not in `rows`) raises
    IllegalTransition; otherwise it is kept in the history with applied=False and the
    reason."""

    now: datetime
    rows: dict[uuid.UUID, CurrentState]
    strict: bool = True
    recorded: list[Transition] = field(default_factory=list)  # the events to append
    changed: dict[uuid.UUID, CurrentState] = field(default_factory=dict)  # the rows to write

    def add(self, t: Transition) -> Transition:
        """Judge and fold one transition; returns it as recorded."""
        cur = self.rows.get(t.task_id)
        if cur is None:
            if self.strict:
                raise IllegalTransition(t.task_id, "(no such task)", t.state)
            t = replace(t, applied=False, detail={**t.detail, "ignored": "no such task"})
        elif t.applied and not can_transition(cur.state, t.state):
            if self.strict:
                raise IllegalTransition(t.task_id, cur.state, t.state)
            reason = f"illegal transition {cur.state} -> {t.state}"
            t = replace(t, applied=False, detail={**t.detail, "ignored": reason})
        elif t.applied:
            self.rows[t.task_id] = self.changed[t.task_id] = cur.after(t, self.now)
        self.recorded.append(t)
        return t
