"""The API's request and response bodies. Task types are the core's own model
(taskmgr.models.TaskTypeFields / TaskType): its rules are checked once, there."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from manager.api.errors import BadRequest
from taskmgr.models import PRIORITY_RANGE, DependencyPolicy, State, Task, TaskEvent
from taskmgr.waiting import MAX_DEPENDENCIES

# Tasks in one create request at most.
MAX_BATCH = 1000
# A page of tasks at most.
MAX_PAGE = 1000


class TaskIn(BaseModel):
    """A task to schedule: as TaskService.schedule takes it."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    due_at: AwareDatetime | None = Field(None, description="When it is due (default: now)")
    dedup_key: str | None = Field(
        None, min_length=1, max_length=500, description="Or the Idempotency-Key header"
    )
    parent_id: uuid.UUID | None = None
    recurrence: dict[str, Any] | None = Field(
        None, description="every_s or cron (+ timezone), ends_after, ends_at"
    )
    name: str | None = Field(None, description="A name for people (not unique)")
    description: str | None = None
    priority: int = Field(
        0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1], description="Among tasks due at once, higher first"
    )
    depends_on: list[uuid.UUID] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Tasks it waits for: due only once all of them FINISHED",
    )
    on_dependency_failure: DependencyPolicy = Field(
        DependencyPolicy.FAIL,
        description="A dependency that ends FAILED or CANCELLED: fail this task, or run it anyway",
    )


class RescheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    due_at: AwareDatetime = Field(description="The new due time (one in the past: due now)")


class PayloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: dict[str, Any] = Field(description="Checked against the task type's JSON Schema")
    merge: bool = Field(False, description="Set these keys and keep the others (default: replace)")


class TasksIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskIn] = Field(min_length=1, max_length=MAX_BATCH)


class TaskOut(BaseModel):
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
    priority: int = 0
    run_at: datetime | None = Field(None, description="When it is due next while waiting; null otherwise")
    depends_on: tuple[uuid.UUID, ...] = ()
    on_dependency_failure: DependencyPolicy = DependencyPolicy.FAIL

    @classmethod
    def of(cls, t: Task) -> TaskOut:
        return cls.model_construct(**vars(t))  # not asdict: it deep-copies every value


class Created(BaseModel):
    task: TaskOut
    created: bool = Field(description="False: the dedup key (Idempotency-Key) named an existing task")


class CreatedMany(BaseModel):
    tasks: list[Created]


class TaskPage(BaseModel):
    items: list[TaskOut]
    next: str | None = Field(description="Cursor of the next page (the `after` parameter); null at the end")


class TaskEventOut(BaseModel):
    time: datetime
    task_id: uuid.UUID
    state: State
    attempt: int
    runner_id: str | None
    source: str
    applied: bool
    detail: dict[str, Any]

    @classmethod
    def of(cls, e: TaskEvent) -> TaskEventOut:
        return cls.model_construct(**vars(e))


class AuditNode(BaseModel):
    task: TaskOut
    events: list[TaskEventOut]


class Audit(BaseModel):
    root_id: uuid.UUID
    tasks: list[AuditNode]


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("cancelled by an operator", max_length=1000)
    series: bool = Field(False, description="A recurring task: end its series")


class StoredEventOut(BaseModel):
    time: datetime
    event_id: uuid.UUID
    kind: str
    task_type: str
    task_id: uuid.UUID
    root_task_id: uuid.UUID
    runner_id: str
    attempt: int
    version: int
    data: dict[str, Any]


def encode_cursor(due_at: datetime, task_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{due_at.isoformat()}|{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (due_at, id) keyset of store.list_tasks from a cursor we gave out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, tid = raw.partition("|")
        t = datetime.fromisoformat(at)
        if t.tzinfo is None:
            raise ValueError
        return t, uuid.UUID(tid)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("query.after", "not a cursor this API gave out (use the `next` of a page)") from None
