"""Message contracts (pydantic) and the one place they are encoded and decoded.

The machine-readable description of these messages is docs/asyncapi.yaml; a test
checks that each model there matches the JSON Schema pydantic generates here.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from taskmgr.errors import TaskmgrError

# Bounds on what a message may carry, so that one that decodes also fits the database
# (int4 columns, text without NUL, jsonb without NaN) and one message cannot be huge.
INT32_MAX = 2**31 - 1
MAX_NAME_CHARS = 200  # runner ids, pools, hosts, service names, dedup keys
MAX_DETAIL_BYTES = 16 * 1024  # a report's detail, as JSON
# A task's payload: it travels in every start order of its task and in its row (TaskService
# checks every payload it schedules against this; a follow-on's is bounded on the wire).
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_FOLLOW_ONS = 1000  # per report, and per schedule sync
MAX_DELAY_S = 366 * 24 * 3600.0
MAX_PROGRESS_BYTES = 16 * 1024 * 1024  # one progress message (500 reports, or 10,000 tasks)
# A heartbeat's AMQP header naming its runner: the leader notes when it arrived before
# the intake decodes and applies it (behind whatever backlog).
HEARTBEAT_HEADER = "x-taskmgr-heartbeat"


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise ValueError("nested more than 32 levels deep")
    if isinstance(value, str):
        _no_nul(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k)
            _check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)


def _json_object(limit: int) -> AfterValidator:
    def check(value: dict[str, Any]) -> dict[str, Any]:
        _check_json(value)
        try:
            size = len(json.dumps(value, allow_nan=False, separators=(",", ":")))
        except ValueError:
            raise ValueError("NaN or Infinity is not JSON") from None
        if size > limit:
            raise ValueError(f"{size} bytes of JSON; at most {limit}")
        return value

    return AfterValidator(check)


Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(_no_nul)]
Attempt = Annotated[int, Field(ge=1, le=INT32_MAX)]
Detail = Annotated[dict[str, Any], _json_object(MAX_DETAIL_BYTES)]
Payload = Annotated[dict[str, Any], _json_object(MAX_PAYLOAD_BYTES)]


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
    # An order older than claimed_at + this is stale: recovery has dispatched the task
    # again by then, so a runner drops it (the message's AMQP expiration is the same).
    start_timeout_s: float | None = Field(None, gt=0)
    # The task's type's longest run, counted from `started_at`, the task's first start
    # (not this attempt's): past it the runner stops polling and reports it failed, kind
    # "expired" (None: no limit).
    max_runtime_s: float | None = Field(None, gt=0)
    started_at: datetime | None = None


class StartBatch(_Message):
    """Several start orders for one pool in one AMQP message (batched for speed);
    each order is registered, reported and recovered on its own."""

    kind: Literal["start"] = "start"
    orders: list[StartOrder] = Field(min_length=1)
    sent_at: datetime


ReportStatus = Literal["running", "progress", "poll_error", "finished", "failed", "handback", "rejected"]


class FollowOnOrder(_Message):
    """A task a handler asks for (taskmgr.handlers.FollowOn on the wire). The manager
    writes it, idempotently: the dedup key is scoped to the parent task."""

    type: Annotated[Name, Field(min_length=1)]
    payload: Payload = Field(default_factory=dict)
    dedup_key: Annotated[Name, Field(min_length=1)]
    due_at: AwareDatetime | None = None
    delay_s: float = Field(0.0, ge=0, le=MAX_DELAY_S)


class SyncOrder(_Message):
    """Make the tasks under `scope` exactly `follow_ons` (taskmgr.handlers.ChildSync)."""

    scope: Annotated[Name, Field(min_length=1)]
    follow_ons: list[FollowOnOrder] = Field(default_factory=list, max_length=MAX_FOLLOW_ONS)


class Report(_Message):
    """One runner report. `follow_ons` and `sync` carry what the handler asked to be
    scheduled: the manager writes them in the transaction that applies the report (a
    runner holds no database credentials), for the current attempt only."""

    task_id: uuid.UUID
    attempt: Attempt
    status: ReportStatus
    at: AwareDatetime
    detail: Detail = Field(default_factory=dict)
    follow_ons: list[FollowOnOrder] = Field(default_factory=list, max_length=MAX_FOLLOW_ONS)
    sync: SyncOrder | None = None


class RunnerReports(_Message):
    kind: Literal["reports"] = "reports"
    runner_id: Name
    pool: Name
    reports: list[Report] = Field(min_length=1)


class Heartbeat(_Message):
    kind: Literal["heartbeat"] = "heartbeat"
    runner_id: Name
    pool: Name
    host: Name = ""
    pid: int = Field(0, ge=0, le=INT32_MAX)
    at: AwareDatetime
    tasks: list[tuple[uuid.UUID, Attempt]] = Field(default_factory=list)  # (task id, attempt)
    stopping: bool = False


class ServiceReport(_Message):
    """An outside service's own progress on a task (for example a photo or a caption
    service working on a game's task)."""

    kind: Literal["service"] = "service"
    service: Annotated[Name, Field(min_length=1)]
    task_id: uuid.UUID
    attempt: Attempt | None = None  # None: the task's current attempt
    state: Literal["RUNNING", "FINISHED", "FAILED"]
    at: AwareDatetime
    detail: Detail = Field(default_factory=dict)


Progress = Annotated[RunnerReports | Heartbeat | ServiceReport, Field(discriminator="kind")]
_progress = TypeAdapter(Progress)


class Stop(_Message):
    """Manager -> one runner: stop polling this task (cancelled, stale attempt, finished)."""

    kind: Literal["stop"] = "stop"
    task_id: uuid.UUID
    attempt: int
    reason: str


class TypeChange(_Message):
    """A task type's values that running pollers take at their next tick, broadcast by the
    leading manager to every runner's control queue when `TaskService.update_type`
    changes the type (it NOTIFYs the leader at its commit with this as the payload)."""

    kind: Literal["type"] = "type"
    name: Annotated[Name, Field(min_length=1)]
    poll_interval_s: float = Field(gt=0)
    request_timeout_s: float = Field(gt=0)
    max_consecutive_failures: int = Field(ge=1, le=INT32_MAX)
    max_runtime_s: float | None = Field(None, gt=0)

    @classmethod
    def of(cls, t: Any) -> TypeChange:
        """The live values of a task type (a taskmgr.models.TaskType)."""
        return cls(**{name: getattr(t, name) for name in cls.model_fields if name != "kind"})


Control = Annotated[Stop | TypeChange, Field(discriminator="kind")]
_control = TypeAdapter(Control)


class CancelNotice(_Message):
    """TaskService.cancel -> the leading manager, not over RabbitMQ but as the payload
    of a PostgreSQL NOTIFY sent at the cancel's commit: stop this attempt on its runner,
    or, while no runner is known yet (STARTED), on every runner of the pool."""

    task_id: uuid.UUID
    attempt: int
    runner_id: str | None = None
    pool: str | None = None


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
    # The version of the JSON Schema of this kind's data (`<task_type>.<event>`): a kind
    # whose data changes incompatibly gets a new version, and consumers see which.
    version: int = Field(default=1, ge=1, le=INT32_MAX)


# Task lifecycle events: the manager publishes each applied state change on the events
# exchange as an Event with task_type "task" and event "<type>.<state>" (routing key
# task.<type>.<state>, the state in lowercase), its id uuid5 of the task and the history
# row's seq, so a repeat (a relay that crashed before its commit) has the same id.
LIFECYCLE_TASK_TYPE = "task"
LIFECYCLE_NAMESPACE = uuid.UUID("3c2f7d0e-5b1a-4e8e-9f57-0c5d2b8a7e41")
LIFECYCLE_SCHEMA = "task.lifecycle"


class TaskLifecycle(BaseModel):
    """A task changed state (the data of a task.<type>.<state> event)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    state: Literal["SCHEDULED", "STARTED", "RUNNING", "RETRYING", "FINISHED", "FAILED", "CANCELLED"]
    attempt: int = Field(ge=0)
    source: str
    runner_id: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


def lifecycle_event_id(task_id: uuid.UUID, seq: int) -> uuid.UUID:
    return uuid.uuid5(LIFECYCLE_NAMESPACE, f"{task_id}|{seq}")


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode_progress(body: bytes) -> RunnerReports | Heartbeat | ServiceReport:
    if len(body) > MAX_PROGRESS_BYTES:
        raise BadMessage(f"progress message: {len(body)} bytes; at most {MAX_PROGRESS_BYTES}")
    try:
        return _progress.validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"progress message: {_first_error(exc)}") from None


def decode_start(body: bytes) -> StartBatch:
    try:
        return StartBatch.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"start message: {_first_error(exc)}") from None


def decode_control(body: bytes) -> Stop | TypeChange:
    """A message of a runner's control queue: a stop, or a task type's new values."""
    try:
        return _control.validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"control message: {_first_error(exc)}") from None


def decode_type_change(payload: str | bytes) -> TypeChange:
    try:
        return TypeChange.model_validate_json(payload)
    except ValidationError as exc:
        raise BadMessage(f"type change: {_first_error(exc)}") from None


def decode_cancel(payload: str | bytes) -> CancelNotice:
    try:
        return CancelNotice.model_validate_json(payload)
    except ValidationError as exc:
        raise BadMessage(f"cancel notice: {_first_error(exc)}") from None


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
    "TypeChange": TypeChange,
    "Event": Event,
}


# Models of event data, by routing key and version: each entry point of this group names
# a mapping "<task_type>.<event>" -> {version: pydantic model} (the sports kinds:
# task_types.events.EVENT_KINDS). The consumer kit and the contract document read them.
EVENT_KINDS_ENTRY_POINT_GROUP = "taskmgr.event_kinds"


def event_kinds() -> dict[str, dict[int, type[BaseModel]]]:
    """Every registered event kind's data models, by routing key and version."""
    from importlib.metadata import entry_points

    merged: dict[str, dict[int, type[BaseModel]]] = {}
    for ep in sorted(entry_points(group=EVENT_KINDS_ENTRY_POINT_GROUP), key=lambda e: e.name):
        for key, versions in ep.load().items():
            merged.setdefault(key, {}).update(versions)
    return dict(sorted(merged.items()))


def kind_schema_name(routing_key: str, version: int) -> str:
    """The name of a kind's schema in the contract document: live_game.score.changed.v1
    (every task.<type>.<state> lifecycle event: task.lifecycle.v1)."""
    if routing_key.startswith(LIFECYCLE_TASK_TYPE + "."):
        return f"{LIFECYCLE_SCHEMA}.v{version}"
    return f"{routing_key}.v{version}"


def _kind_schemas(schemas: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One JSON Schema per event kind and version: the Event envelope with its task
    type, event and version fixed and its data's schema. Adds the data models' schemas
    to `schemas`; returns the kinds' by name."""
    kinds: dict[str, dict[str, Any]] = {}
    lifecycle = TaskLifecycle.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["TaskLifecycle"] = lifecycle
    kinds[kind_schema_name(LIFECYCLE_SCHEMA, 1)] = {
        "title": "task.<type>.<state> v1",
        "description": "A task changed state: published by the manager after the commit that made the "
        "change, through an outbox; the routing key is task.<task type>.<state in lowercase>.",
        "allOf": [{"$ref": "#/components/schemas/Event"}],
        "properties": {
            "task_type": {"const": LIFECYCLE_TASK_TYPE},
            "event": {"type": "string", "pattern": r"^[a-z][a-z0-9_.-]*\.[a-z]+$"},
            "version": {"const": 1},
            "data": {"$ref": "#/components/schemas/TaskLifecycle"},
        },
        "required": ["task_type", "event", "version", "data"],
    }
    for routing_key, versions in event_kinds().items():
        task_type, _, event = routing_key.partition(".")
        for version, model in sorted(versions.items()):
            data = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in {**data.pop("$defs", {}), model.__name__: data}.items():
                if name in CONTRACTS or name == "TaskLifecycle" or schemas.get(name, sub) != sub:
                    raise ValueError(f"event data model {name} ({routing_key}) clashes with another schema")
                schemas[name] = sub
            kinds[kind_schema_name(routing_key, version)] = {
                "title": f"{routing_key} v{version}",
                "description": " ".join((model.__doc__ or "").split("\n\n")[0].split()),
                "allOf": [{"$ref": "#/components/schemas/Event"}],
                "properties": {
                    "task_type": {"const": task_type},
                    "event": {"const": event},
                    "version": {"const": version},
                    "data": {"$ref": f"#/components/schemas/{model.__name__}"},
                },
                "required": ["task_type", "event", "version", "data"],
            }
    return kinds


def asyncapi_document(prefix: str = "taskmgr") -> dict[str, Any]:
    """The machine-readable contract (AsyncAPI 3.0) of every channel and message,
    generated from the models above. docs/asyncapi.yaml is this document; a test keeps
    them equal (regenerate with `python -m taskmgr.messages > docs/asyncapi.yaml`)."""
    schemas: dict[str, Any] = {}
    for name, model in CONTRACTS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    kinds = _kind_schemas(schemas)
    schemas.update(kinds)

    def msg(name: str, summary: str) -> dict[str, Any]:
        return {
            "name": name,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}"},
        }

    def event_messages() -> dict[str, Any]:  # fresh dicts for each channel: no YAML anchors
        names = ["Event", *kinds]
        return {name: {"$ref": f"#/components/messages/{name}"} for name in names}

    channels = {
        "start": {
            "address": f"{prefix}.start.{{pool}}",
            "description": f"Durable queue per runner pool, bound to the direct exchange {prefix}.start "
            "with routing key = pool (only the manager's user may write to it). Persistent messages, "
            "publisher confirms, mandatory (an unroutable order stays in the outbox); runners "
            "ack after registering and reporting RUNNING for every order.",
            "parameters": {"pool": {"description": "The task type's runner pool."}},
            "messages": {"StartBatch": {"$ref": "#/components/messages/StartBatch"}},
        },
        "events": {
            "address": f"{prefix}.events",
            "description": "Topic exchange; routing key `<task_type>.<event>` "
            "(e.g. live_game.score.changed). "
            "Headers repeat task_id, root_task_id, task_runner_id, event_id; message_id is "
            "the event_id, stable across repeats. Two queues of the manager's topology are bound to it "
            f"with '#': the stream {prefix}.events.stream (replay) and the durable queue "
            f"{prefix}.events.recorder, which the recorder stores in the emitted_events hypertable, "
            "once per event_id. A queue bound here sees only what is published while it is bound; "
            "read the stream to see what was published before.",
            "messages": event_messages(),
        },
        "eventsStream": {
            "address": f"{prefix}.events.stream",
            "description": "A RabbitMQ stream (x-queue-type: stream) of every event of the events "
            "exchange, in publish order, kept for TASKMGR_EVENTS_STREAM_MAX_AGE (x-max-age, 7D) or up "
            "to TASKMGR_EVENTS_STREAM_MAX_BYTES (x-max-length-bytes, 10 GiB), whichever is reached "
            "first (whole segments are dropped). Read it with any AMQP 0-9-1 client: set a prefetch "
            "(basic.qos; required), basic.consume without no-ack, and the consumer argument "
            "x-stream-offset = 'first' | 'last' | 'next' (the default) | an offset (long) | a "
            "timestamp (AMQP timestamp, seconds) | an interval string ('10m', '2h', '1D'); ack the "
            "deliveries (acks only grant credit: a stream is not consumed by reading). Each delivery "
            "carries its offset in the x-stream-offset header: a consumer resumes after a restart "
            "from the offset it stored + 1. An event may appear more than once (two runners, a new "
            "attempt): drop repeats by event_id (message_id). The taskmgr_consumer user may read "
            "the stream and nothing more (no declare, delete, bind or publish). "
            "taskmgr.consumer.EventStream does all of this.",
            "messages": event_messages(),
        },
        "progress": {
            "address": f"{prefix}.progress",
            "description": f"Durable queue into the manager, bound to the fanout exchange {prefix}.reports "
            "(runner and outside-service users may write to it; nobody to the default exchange): runner "
            "reports, heartbeats, outside services' reports. Every message carries the publisher's "
            "user_id, which RabbitMQ validates; the manager refuses a kind its sender may not send. "
            "Unparseable or refused messages go to the dead-letter exchange.",
            "messages": {
                n: {"$ref": f"#/components/messages/{n}"}
                for n in ("RunnerReports", "Heartbeat", "ServiceReport")
            },
        },
        "control": {
            "address": f"{prefix}.control",
            "description": "Direct exchange, routing key = runner id: the manager stops a task on a "
            "runner (`pool.<pool>`: on every runner of a pool, for a task whose runner is not known yet). "
            "Routing key `all.runners` reaches every runner: a task type's new values (TypeChange), which "
            "running pollers of that type take at their next tick.",
            "messages": {
                "Stop": {"$ref": "#/components/messages/Stop"},
                "TypeChange": {"$ref": "#/components/messages/TypeChange"},
            },
        },
        "dead": {
            "address": f"{prefix}.dlx",
            "description": "Fanout dead-letter exchange (queue "
            f"{prefix}.dead); header x-taskmgr-reason says why.",
            "messages": {},
        },
    }
    summaries = {
        "StartBatch": "Start orders for one pool, each (task_id, attempt) handled on its own.",
        "Event": "What a runner's handler observed, for downstream services.",
        "RunnerReports": "A runner's reports: running, progress (follow-ons, schedule syncs), poll_error, "
        "finished, failed, handback, rejected.",
        "Heartbeat": "A runner is alive and holds these (task_id, attempt) pairs.",
        "ServiceReport": "An outside service's own state for a task.",
        "Stop": "Stop polling this task (cancelled, stale attempt, expired).",
        "TypeChange": "A task type changed: running pollers of that type take these values at their "
        "next tick.",
        **{name: f"An event of kind {k['title']}." for name, k in kinds.items()},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "taskmgr messages",
            "version": "1.1.0",
            "description": "RabbitMQ contracts between the Task Manager, TaskRunners and "
            "downstream services.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": {
            "sendStart": {"action": "send", "channel": {"$ref": "#/channels/start"}},
            "publishEvents": {"action": "send", "channel": {"$ref": "#/channels/events"}},
            "replayEvents": {"action": "receive", "channel": {"$ref": "#/channels/eventsStream"}},
            "reportProgress": {"action": "send", "channel": {"$ref": "#/channels/progress"}},
            "stopTask": {"action": "send", "channel": {"$ref": "#/channels/control"}},
        },
        "components": {"messages": {n: msg(n, s) for n, s in summaries.items()}, "schemas": schemas},
    }


if __name__ == "__main__":  # pragma: no cover
    import sys

    import yaml

    yaml.safe_dump(asyncapi_document(), sys.stdout, sort_keys=False, width=110)
