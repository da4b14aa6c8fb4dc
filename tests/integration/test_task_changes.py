"""Changing a waiting task: reschedule and payload update through TaskService and the
CLI, each under the task's row lock and kept in its history; `tasks create NAME --type T
--parameter k=v`. Real PostgreSQL+TimescaleDB and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from taskmgr import store
from taskmgr.cli import main
from taskmgr.db import make_engine
from taskmgr.errors import Conflict, InvalidInput, TaskNotFound, TaskNotWaiting
from taskmgr.messages import decode_start
from taskmgr.models import State
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from tests.helpers import Runs, as_role, create, drain

pytestmark = pytest.mark.usefixtures("clean")

SCHEMA = {
    "type": "object",
    "required": ["game_id"],
    "properties": {"game_id": {"type": "string"}, "period": {"type": "integer"}},
}


@pytest.fixture
async def box(service: TaskService) -> str:
    await service.create_type({"name": "box", "handler": "noop", "payload_schema": SCHEMA})
    return "box"


@pytest.fixture
def runs(engine, publisher, settings, service) -> Runs:  # type: ignore[no-untyped-def]
    return Runs(engine, publisher, settings, service)


async def snapshot(engine: Any, tid: uuid.UUID) -> tuple[Any, ...]:
    """Everything a change could touch: the task's row, its state row, its history and
    its lifecycle outbox rows."""
    async with engine.connect() as conn:
        one = {"t": tid}
        task = (await conn.execute(text("select * from tasks where id = :t"), one)).one()
        state = (await conn.execute(text("select * from task_state where task_id = :t"), one)).one()
        n = (await conn.execute(text("select count(*) from task_events where task_id = :t"), one)).scalar()
        out = (
            await conn.execute(text("select count(*) from lifecycle_outbox where task_id = :t"), one)
        ).scalar()
    return tuple(task), tuple(state), n, out


async def test_reschedule_a_scheduled_task(engine, service: TaskService, box: str, runs: Runs) -> None:  # type: ignore[no-untyped-def]
    first = datetime.now(UTC) + timedelta(hours=1)
    [tid] = await create(service, NewTask(box, {"game_id": "g"}, due_at=first))
    later = first + timedelta(hours=2)
    before = await snapshot(engine, tid)
    moved = await service.reschedule(tid, later, source="api")
    assert (moved.state, moved.due_at, moved.run_at) == (State.SCHEDULED, later, later)
    last = (await service.history(tid))[-1]
    assert (last.state, last.applied, last.source) == (State.SCHEDULED, False, "api")
    assert last.detail == {
        "change": "rescheduled",
        "moved_from": first.isoformat(),
        "due_at": later.isoformat(),
    }
    # Part of the history, not a state change: no lifecycle event.
    assert (await snapshot(engine, tid))[3] == before[3]
    # Moved into the past: due now, and the next poll starts it.
    await service.reschedule(tid, datetime.now(UTC) - timedelta(seconds=1))
    assert await runs.dispatch() == 1


async def test_reschedule_a_retrying_task_moves_its_next_attempt(  # type: ignore[no-untyped-def]
    engine, service: TaskService, box: str, runs: Runs
) -> None:
    await service.update_type(box, max_attempts=3, backoff_base_s=600, backoff_max_s=600)
    [tid] = await create(service, NewTask(box, {"game_id": "g"}))
    await runs.dispatch()
    await runs.end(tid, "failed")
    retrying = await service.get_task(tid)
    assert retrying.state is State.RETRYING and retrying.run_at is not None
    soon = datetime.now(UTC) + timedelta(seconds=30)
    moved = await service.reschedule(tid, soon)
    assert (moved.state, moved.run_at, moved.due_at) == (State.RETRYING, soon, retrying.due_at)
    assert (await service.history(tid))[-1].detail == {
        "change": "rescheduled",
        "moved_from": retrying.run_at.isoformat(),
        "run_at": soon.isoformat(),
    }
    async with engine.begin() as conn:  # the projection rebuilt from the history keeps it
        await store.rebuild_state(conn)
    assert (await service.get_task(tid)).run_at == soon


async def test_reschedule_a_task_waiting_for_dependencies(service: TaskService, box: str, runs: Runs) -> None:
    [a] = await create(service, NewTask(box, {"game_id": "a"}))
    [b] = await create(service, NewTask(box, {"game_id": "b"}, depends_on=[a]))
    later = datetime.now(UTC) + timedelta(hours=3)
    moved = await service.reschedule(b, later)
    assert moved.blocked and moved.due_at == later  # still waits for A
    await runs.dispatch()
    await runs.end(a)
    assert (await service.get_task(b)).run_at == later  # released, due at its new time


async def test_update_the_payload_of_a_waiting_task(  # type: ignore[no-untyped-def]
    engine, service: TaskService, settings: Settings, box: str, runs: Runs
) -> None:
    [tid] = await create(service, NewTask(box, {"game_id": "g1", "period": 1}))
    updated = await service.update_payload(tid, {"game_id": "g2"}, source="api")
    assert updated.payload == {"game_id": "g2"}
    merged = await service.update_payload(tid, {"period": 3}, merge=True)
    assert merged.payload == {"game_id": "g2", "period": 3}
    history = await service.history(tid)
    assert [(e.detail.get("change"), e.applied, e.source) for e in history[1:]] == [
        ("payload_updated", False, "api"),
        ("payload_updated", False, "operator"),
    ]
    assert history[1].detail["previous"] == {"game_id": "g1", "period": 1}
    assert history[2].detail["payload"] == {"game_id": "g2", "period": 3}
    # The start order carries the new payload.
    assert await runs.dispatch() == 1
    [body] = await drain(
        settings.amqp_url, runs.dispatcher._publisher.topology.start_queue("default"), expect=1
    )
    assert decode_start(body).orders[0].payload == {"game_id": "g2", "period": 3}


@pytest.mark.parametrize(
    ("payload", "merge", "field"),
    [
        ({"period": 2}, False, "payload: 'game_id' is a required property"),
        ({"period": "two"}, True, "payload.period: 'two' is not of type 'integer'"),
        ([1, 2], False, "payload: must be a JSON object"),
    ],
)
async def test_a_payload_that_fails_the_schema_changes_nothing(  # type: ignore[no-untyped-def]
    engine, service: TaskService, box: str, payload: Any, merge: bool, field: str
) -> None:
    [tid] = await create(service, NewTask(box, {"game_id": "g1"}))
    before = await snapshot(engine, tid)
    with pytest.raises(InvalidInput, match=field.replace("(", r"\(")):
        await service.update_payload(tid, payload, merge=merge)
    assert await snapshot(engine, tid) == before


async def test_only_a_waiting_task_can_be_changed(engine, service: TaskService, box: str, runs: Runs) -> None:  # type: ignore[no-untyped-def]
    """STARTED, RUNNING, FINISHED, FAILED, CANCELLED: a conflict (an HTTP API's 409),
    and nothing changes. A naive time, an unknown task: their own errors."""
    ids = await create(service, *(NewTask(box, {"game_id": str(i)}) for i in range(5)))
    await runs.dispatch()
    started, running, finished, failed, cancelled = ids
    await runs.end(running, "running")
    await runs.end(finished)
    await service.update_type(box, max_attempts=1)
    await runs.end(failed, "failed")
    await service.cancel(cancelled)
    soon = datetime.now(UTC) + timedelta(minutes=5)
    for tid, state in zip(ids, ["STARTED", "RUNNING", "FINISHED", "FAILED", "CANCELLED"], strict=True):
        before = await snapshot(engine, tid)
        with pytest.raises(TaskNotWaiting, match=f"is {state}: only a SCHEDULED or RETRYING task") as info:
            await service.reschedule(tid, soon)
        assert isinstance(info.value, Conflict)
        with pytest.raises(TaskNotWaiting, match="can be updated"):
            await service.update_payload(tid, {"game_id": "x"})
        assert await snapshot(engine, tid) == before
    with pytest.raises(InvalidInput, match="due_at: must be a time with a timezone"):
        await service.reschedule(started, datetime(2026, 1, 1))
    with pytest.raises(TaskNotFound):
        await service.reschedule(uuid.uuid4(), soon)
    with pytest.raises(TaskNotFound):
        await service.update_payload(uuid.uuid4(), {"game_id": "x"})


async def test_changes_under_the_managers_role(database_url: str, service: TaskService, box: str) -> None:
    """The HTTP API and the manager run as taskmgr_manager: it may create tasks with
    dependencies, reschedule and update them (and nothing in sql/0015-0016 needs more)."""
    m_engine = make_engine(as_role(database_url, "taskmgr_manager"))
    try:
        svc = TaskService(engine=m_engine)
        [a] = await create(svc, NewTask(box, {"game_id": "a"}, name="A", priority=5))
        [b] = await create(svc, NewTask(box, {"game_id": "b"}, depends_on=[a]))
        await svc.reschedule(b, datetime.now(UTC) + timedelta(hours=1))
        await svc.update_payload(b, {"game_id": "b2"})
        await svc.cancel(a)  # B (fail) fails in the same transaction
        assert (await svc.get_task(b)).state is State.FAILED
    finally:
        await m_engine.dispose()


# -- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def cli(settings: Settings):  # type: ignore[no-untyped-def]
    env = {"TASKMGR_DATABASE_URL": settings.database_url, "TASKMGR_LOG_LEVEL": "WARNING"}

    async def invoke(*args: str) -> Result:  # in a thread: the command runs its own event loop
        return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=env, catch_exceptions=False)

    return invoke


def out(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_cli_create_with_a_name_and_parameters_beside_the_old_form(cli, box: str) -> None:  # type: ignore[no-untyped-def]
    named = out(
        await cli(
            "tasks",
            "create",
            "Lakers at Celtics",
            "--type",
            box,
            "--parameter",
            'game_id="401"',
            "--parameter",
            "period=2",
            "--description",
            "the late game",
            "--priority",
            "5",
            "-o",
            "json",
        )
    )
    # A value is JSON when it parses: "401" quoted is the string, period=2 the number.
    assert (named["name"], named["type"], named["priority"]) == ("Lakers at Celtics", box, 5)
    got = out(await cli("tasks", "get", named["id"], "-o", "json"))
    assert got["payload"] == {"game_id": "401", "period": 2} and got["description"] == "the late game"
    payload = '{"game_id": "g", "period": 1}'
    both = out(
        await cli("tasks", "create", "-t", box, "x", "-p", payload, "--parameter", "period=4", "-o", "json")
    )
    assert out(await cli("tasks", "get", both["id"], "-o", "json"))["payload"] == {
        "game_id": "g",
        "period": 4,
    }
    old = out(await cli("tasks", "create", box, "-p", '{"game_id": "g"}', "--name", "old form", "-o", "json"))
    assert (old["type"], old["name"]) == (box, "old form")
    waiting = out(
        await cli("tasks", "create", box, "-p", '{"game_id": "w"}', "--after", old["id"], "-o", "json")
    )
    got = out(await cli("tasks", "get", waiting["id"], "-o", "json"))
    assert got["depends_on"] == [old["id"]] and got["run_at"] is None


async def test_cli_reschedule_and_update(cli, service: TaskService, box: str) -> None:  # type: ignore[no-untyped-def]
    tid = out(await cli("tasks", "create", box, "-p", '{"game_id": "g"}', "--in", "3600", "-o", "json"))["id"]
    at = "2030-01-01T19:00:00+00:00"
    assert out(await cli("tasks", "reschedule", tid, "--at", at, "-o", "json"))["due_at"] == at
    soon = out(await cli("tasks", "reschedule", tid, "--in", "60", "-o", "json"))
    assert datetime.fromisoformat(soon["due_at"]) < datetime.now(UTC) + timedelta(seconds=61)
    assert out(await cli("tasks", "update", tid, "-p", '{"game_id": "h"}', "-o", "json"))["payload"] == {
        "game_id": "h"
    }
    merged = out(await cli("tasks", "update", tid, "--parameter", "period=3", "-o", "json"))
    assert merged["payload"] == {"game_id": "h", "period": 3}
    history = out(await cli("tasks", "history", tid, "-o", "json"))
    assert [h["detail"].get("change") for h in history] == [
        None,
        "rescheduled",
        "rescheduled",
        "payload_updated",
        "payload_updated",
    ]
    table = await cli("tasks", "history", tid)
    assert table.exit_code == 0 and "rescheduled" in table.stdout and "payload_updated" in table.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("tasks", "create", "N", "--type", "box", "--parameter", "game_id"), 2, "is not KEY=VALUE"),
        (("tasks", "create", "N", "--type", "box", "--name", "M"), 2, "the argument is the name"),
        (("tasks", "create", "N", "--type", "box", "--parameter", "period=1"), 2, "'game_id' is a required"),
        (("tasks", "create", "box", "-p", '{"game_id": "g"}', "--priority", "99999"), 2, "priority"),
        (
            ("tasks", "create", "box", "-p", '{"game_id": "g"}', "--after", str(uuid.UUID(int=7))),
            2,
            "no such task",
        ),
        (
            ("tasks", "create", "box", "-p", '{"game_id": "g"}', "--after", "x"),
            2,
            "--after: 'x' is not a UUID",
        ),
        (("tasks", "reschedule", "{tid}"), 2, "--at ISO-TIME or --in SECONDS"),
        (("tasks", "reschedule", "{tid}", "--at", "2030-01-01T19:00:00Z", "--in", "5"), 2, "one of them"),
        (("tasks", "reschedule", "{tid}", "--at", "2030-01-01T19:00"), 2, "needs a timezone"),
        (
            ("tasks", "reschedule", "{done}", "--in", "5"),
            1,
            "only a SCHEDULED or RETRYING task can be rescheduled",
        ),
        (("tasks", "update", "{tid}"), 2, "nothing to change"),
        (("tasks", "update", "{tid}", "-p", '{"period": 1}'), 2, "'game_id' is a required property"),
        (("tasks", "update", "{done}", "-p", '{"game_id": "x"}'), 1, "can be updated"),
    ],
)
async def test_cli_bad_input_is_one_line_and_changes_nothing(  # type: ignore[no-untyped-def]
    cli, engine, service: TaskService, box: str, args: tuple[str, ...], code: int, message: str
) -> None:
    [tid, done] = await create(service, NewTask(box, {"game_id": "g"}), NewTask(box, {"game_id": "d"}))
    await service.cancel(done)
    before = [await snapshot(engine, t) for t in (tid, done)]
    result = await cli(*(a.replace("{tid}", str(tid)).replace("{done}", str(done)) for a in args))
    assert result.exit_code == code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [await snapshot(engine, t) for t in (tid, done)] == before
    async with engine.connect() as conn:
        assert (await conn.execute(text("select count(*) from tasks"))).scalar() == 2


async def test_a_recurring_tasks_occurrences_keep_its_name_and_priority(
    service: TaskService, box: str, runs: Runs
) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    every = {"every_s": 3600}
    [first] = await create(
        service, NewTask(box, {"game_id": "g"}, due, recurrence=every, name="hourly", priority=3)
    )
    assert await runs.dispatch() == 1  # writes the next occurrence
    [nxt] = [t for t in await service.list_tasks(type=box) if t.id != first]
    assert (nxt.name, nxt.priority, nxt.occurrence, nxt.state) == ("hourly", 3, 2, State.SCHEDULED)
    async with service.engine.connect() as conn:
        copied = (
            await conn.execute(text("select priority from task_state where task_id = :t"), {"t": nxt.id})
        ).scalar()
    assert copied == 3  # the claim's index has it
