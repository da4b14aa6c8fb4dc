"""Message contracts (pydantic) and the one place they are encoded and decoded.

The machine-readable description of these messages is docs/asyncapi.yaml; a test
checks that each model there matches the JSON Schema pydantic generates here.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from taskmgr.errors import TaskmgrError


class BadMessage(TaskmgrError):
    """A message that cannot be parsed: it goes to the dead-letter exchange."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StartOrder(_Message):
    """Start (task_id, attempt). The attempt fences stale runners: a report for an
    older attempt changes nothing."""

    task_id: uuid.UUID
    attempt: int = Field(ge=1)
    root_task_id: uuid.UUID
    type: str
    handler: str
    payload: dict[str, Any]
    url_template: str
    interval_s: float = Field(gt=0)
    request_timeout_s: float = Field(gt=0)
    max_consecutive_failures: int = Field(ge=1)
    due_at: datetime
    claimed_at: datetime


class StartBatch(_Message):
    """Several start orders for one pool in one AMQP message (batched for speed);
    each order is registered, reported and recovered on its own."""

    kind: Literal["start"] = "start"
    orders: list[StartOrder] = Field(min_length=1)
    sent_at: datetime


ReportStatus = Literal["running", "poll_error", "finished", "failed", "handback", "rejected"]


class Report(_Message):
    task_id: uuid.UUID
    attempt: int = Field(ge=1)
    status: ReportStatus
    at: datetime
    detail: dict[str, Any] = Field(default_factory=dict)


class RunnerReports(_Message):
    kind: Literal["reports"] = "reports"
    runner_id: str
    pool: str
    reports: list[Report] = Field(min_length=1)


class Heartbeat(_Message):
    kind: Literal["heartbeat"] = "heartbeat"
    runner_id: str
    pool: str
    host: str = ""
    pid: int = 0
    at: datetime
    tasks: list[tuple[uuid.UUID, int]] = Field(default_factory=list)  # (task id, attempt)
    stopping: bool = False


class ServiceReport(_Message):
    """An outside service's own progress on a task (seed 001's photo/caption services)."""

    kind: Literal["service"] = "service"
    service: str = Field(min_length=1)
    task_id: uuid.UUID
    attempt: int | None = None  # None: the task's current attempt
    state: Literal["RUNNING", "FINISHED", "FAILED"]
    at: datetime
    detail: dict[str, Any] = Field(default_factory=dict)


Progress = Annotated[RunnerReports | Heartbeat | ServiceReport, Field(discriminator="kind")]
_progress = TypeAdapter(Progress)


class Stop(_Message):
    """Manager -> one runner: stop polling this task (cancelled, stale attempt, finished)."""

    kind: Literal["stop"] = "stop"
    task_id: uuid.UUID
    attempt: int
    reason: str


class Event(_Message):
    """An event for downstream services, on the events exchange with routing key
    `<task_type>.<event>`. `event_id` is stable: the same observation polled twice (by
    any runner, any attempt) has the same id, so consumers can drop repeats."""

    event_id: uuid.UUID
    event: str
    task_type: str
    task_id: uuid.UUID
    root_task_id: uuid.UUID
    task_runner_id: str
    attempt: int
    observed_at: datetime
    data: dict[str, Any] = Field(default_factory=dict)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode_progress(body: bytes) -> RunnerReports | Heartbeat | ServiceReport:
    try:
        return _progress.validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"progress message: {_first_error(exc)}") from None


def decode_start(body: bytes) -> StartBatch:
    try:
        return StartBatch.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"start message: {_first_error(exc)}") from None


def decode_stop(body: bytes) -> Stop:
    try:
        return Stop.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"control message: {_first_error(exc)}") from None


def decode_event(body: bytes) -> Event:
    try:
        return Event.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"event: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


CONTRACTS: dict[str, type[BaseModel]] = {
    "StartBatch": StartBatch,
    "RunnerReports": RunnerReports,
    "Heartbeat": Heartbeat,
    "ServiceReport": ServiceReport,
    "Stop": Stop,
    "Event": Event,
}
