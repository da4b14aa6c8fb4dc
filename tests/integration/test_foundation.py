"""Schema, migrations, TaskService and the state machine against the real database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from sqlalchemy import text

from taskmgr import store
from taskmgr.errors import (
    AlreadyExists,
    IllegalTransition,
    InvalidInput,
    MigrationsMissing,
    TaskNotFound,
    TaskTypeNotFound,
)
from taskmgr.migrate import asyncpg_dsn, available, current_version, migrate
from taskmgr.models import State, Transition
from taskmgr.service import NewTask, TaskService
from tests.conftest import AMQP_URL

NOW = datetime(2026, 11, 24, 18, 0, tzinfo=UTC)
SCHEMA = {
    "type": "object",
    "properties": {"game_id": {"type": "string"}, "period": {"type": "integer", "minimum": 1}},
    "required": ["game_id"],
    "additionalProperties": False,
}


async def row_counts(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return {
            t: await conn.fetchval(f"select count(*) from {t}")
            for t in ("tasks", "task_state", "task_events", "task_types")
        }
    finally:
        await conn.close()


@pytest.fixture
async def game_type(service: TaskService) -> str:
    await service.create_type({"name": "game", "handler": "noop", "payload_schema": SCHEMA})
    return "game"


async def test_migrate_twice_changes_nothing(database_url: str) -> None:
    assert await migrate(database_url) == []
    assert await current_version(database_url) == available()[-1].version


async def test_task_events_is_a_hypertable(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        dims = await conn.fetch(
            "select column_name, time_interval from timescaledb_information.dimensions"
            " where hypertable_name = 'task_events'"
        )
    finally:
        await conn.close()
    assert [(d["column_name"], d["time_interval"]) for d in dims] == [("time", timedelta(days=1))]


async def test_migrate_refuses_to_run_without_migrations(database_url: str, tmp_path: Path) -> None:
    with pytest.raises(MigrationsMissing, match="no migrations"):
        await migrate(database_url, sql_dirs=[tmp_path])


async def test_task_type_lifecycle(service: TaskService) -> None:
    created = await service.create_type(
        {"name": "box", "handler": "noop", "poll_interval_s": 3, "required_services": ["photo"]}
    )
    assert created.poll_interval_s == 3 and created.required_services == ("photo",)
    with pytest.raises(AlreadyExists):
        await service.create_type({"name": "box", "handler": "noop"})
    updated = await service.update_type("box", poll_interval_s=7.5, pool="sports")
    assert (updated.poll_interval_s, updated.pool) == (7.5, "sports")
    assert [t.name for t in await service.list_types()] == ["box"]
    await service.delete_type("box")
    assert await service.list_types() == []
    assert [t.name for t in await service.list_types(include_deleted=True)] == ["box"]
    with pytest.raises(TaskTypeNotFound, match="was deleted"):
        await service.get_type("box")
    restored = await service.restore_type("box")
    assert restored.deleted_at is None
    with pytest.raises(TaskTypeNotFound):
        await service.update_type("nope", poll_interval_s=1)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"name": "Bad Name", "handler": "noop"}, "name"),
        ({"name": "t", "handler": ""}, "handler"),
        ({"name": "t", "handler": "noop", "poll_interval_s": 0}, "poll_interval_s"),
        ({"name": "t", "handler": "noop", "payload_schema": {"type": "nonsense"}}, "payload_schema"),
        ({"name": "t", "handler": "noop", "max_attempts": 0}, "max_attempts"),
        ({"name": "t", "handler": "noop", "misfire_policy": "sometimes"}, "misfire_policy"),
        ({"name": "t", "handler": "noop", "colour": "red"}, "colour"),
    ],
)
async def test_bad_task_type_is_refused_and_writes_nothing(
    service: TaskService, database_url: str, values: dict, field: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        await service.create_type(values)
    assert err.value.field == field
    assert (await row_counts(database_url))["task_types"] == 0


async def test_schedule_joins_the_callers_transaction(
    service: TaskService, game_type: str, database_url: str
) -> None:
    async with service.session() as session:
        async with session.begin():
            result = await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)
            assert result.created
            # Visible inside the transaction...
            assert (await session.execute(text("select count(*) from tasks"))).scalar_one() == 1
            await session.rollback()
    # ...and nothing survives the rollback, in any table.
    counts = await row_counts(database_url)
    assert counts == {"tasks": 0, "task_state": 0, "task_events": 0, "task_types": 1}


async def test_schedule_commits_with_the_caller(service: TaskService, game_type: str) -> None:
    async with service.session() as session, session.begin():
        result = await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)
    task = await service.get_task(result.id)
    assert (task.state, task.attempt, task.root_id, task.due_at) == (State.SCHEDULED, 0, task.id, NOW)
    [event] = await service.history(task.id)
    assert (event.state, event.attempt, event.applied) == (State.SCHEDULED, 0, True)


async def test_dedup_key_makes_scheduling_idempotent(service: TaskService, game_type: str) -> None:
    async with service.session() as session, session.begin():
        first = await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW, dedup_key="g1")
    async with service.session() as session, session.begin():
        second = await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW, dedup_key="g1")
    assert first.created and not second.created and first.id == second.id
    assert len(await service.list_tasks()) == 1


BAD_SCHEDULES = [
    (dict(type="nope", payload={"game_id": "1"}), TaskTypeNotFound, "does not exist"),
    (dict(type="game", payload={}), InvalidInput, "payload"),
    (dict(type="game", payload={"game_id": 5}), InvalidInput, "payload.game_id"),
    (dict(type="game", payload={"game_id": "1", "period": 0}), InvalidInput, "payload.period"),
    (dict(type="game", payload={"game_id": "1", "x": 1}), InvalidInput, "payload"),
    (dict(type="game", payload={"game_id": "1"}, due_at=datetime(2026, 1, 1)), InvalidInput, "due_at"),
    (
        dict(type="game", payload={"game_id": "1"}, recurrence={"cron": "61 * * * *"}),
        InvalidInput,
        "recurrence.cron",
    ),
    (
        dict(type="game", payload={"game_id": "1"}, recurrence={"every_s": -1}),
        InvalidInput,
        "recurrence.every_s",
    ),
    (
        dict(
            type="game", payload={"game_id": "1"}, recurrence={"cron": "0 9 * * *", "timezone": "Mars/Base"}
        ),
        InvalidInput,
        "recurrence.timezone",
    ),
    (
        dict(type="game", payload={"game_id": "1"}, recurrence={"every_s": 5, "cron": "* * * * *"}),
        InvalidInput,
        "recurrence",
    ),
    # Rules no clock can keep: never fires, spins the loop, fires once a geological age.
    (
        dict(type="game", payload={"game_id": "1"}, recurrence={"cron": "0 0 30 2 *"}),
        InvalidInput,
        "recurrence.cron",
    ),
    (
        dict(type="game", payload={"game_id": "1"}, recurrence={"every_s": 1e-7}),
        InvalidInput,
        "recurrence.every_s",
    ),
    (
        dict(type="game", payload={"game_id": "1"}, recurrence={"every_s": 1e13}),
        InvalidInput,
        "recurrence.every_s",
    ),
    (
        dict(
            type="game",
            payload={"game_id": "1"},
            recurrence={"every_s": 60, "ends_at": (NOW - timedelta(hours=1)).isoformat()},
        ),
        InvalidInput,
        "recurrence.ends_at",
    ),
    # A payload too large to travel in every start order.
    (dict(type="game", payload={"game_id": "x" * 70_000}), InvalidInput, "payload"),
]


@pytest.mark.parametrize(("kwargs", "error", "where"), BAD_SCHEDULES)
async def test_bad_schedule_is_a_clear_error_and_writes_nothing(
    service: TaskService, game_type: str, database_url: str, kwargs: dict, error: type, where: str
) -> None:
    kwargs = dict(kwargs)
    type_ = kwargs.pop("type")
    payload = kwargs.pop("payload")
    kwargs.setdefault("due_at", NOW)
    with pytest.raises(error) as err:
        async with service.session() as session, session.begin():
            await service.schedule(session, type_, payload, **kwargs)
    if isinstance(err.value, InvalidInput):
        assert err.value.field.startswith(where), err.value
    else:
        assert where in str(err.value)
    counts = await row_counts(database_url)
    assert (counts["tasks"], counts["task_state"], counts["task_events"]) == (0, 0, 0)


async def test_deleted_type_refuses_new_tasks(
    service: TaskService, game_type: str, database_url: str
) -> None:
    await service.delete_type(game_type)
    with pytest.raises(TaskTypeNotFound, match="was deleted"):
        async with service.session() as session, session.begin():
            await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)
    assert (await row_counts(database_url))["tasks"] == 0


async def test_one_bad_task_in_a_batch_writes_none(
    service: TaskService, game_type: str, database_url: str
) -> None:
    with pytest.raises(InvalidInput, match=r"tasks\[1\]\.payload"):
        async with service.session() as session, session.begin():
            await service.schedule_many(
                session, [NewTask(game_type, {"game_id": "1"}), NewTask(game_type, {"nope": 1})]
            )
    assert (await row_counts(database_url))["tasks"] == 0


async def test_state_machine(service: TaskService, game_type: str) -> None:
    async with service.session() as session, session.begin():
        tid = (await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)).id
    steps = [
        Transition(tid, State.STARTED, 1, "manager"),
        Transition(tid, State.RUNNING, 1, "runner", runner_id="r1"),
        Transition(tid, State.RETRYING, 1, "manager", count_failure=True, run_at=NOW),
        Transition(tid, State.STARTED, 2, "manager"),
        Transition(tid, State.RUNNING, 2, "runner", runner_id="r2"),
        Transition(tid, State.FINISHED, 2, "runner", runner_id="r2"),
    ]
    async with service.session() as session, session.begin():
        await service.record(session, steps)
    task = await service.get_task(tid)
    assert (task.state, task.attempt, task.failures, task.runner_id) == (State.FINISHED, 2, 1, "r2")
    assert [e.state for e in await service.history(tid)] == [State.SCHEDULED] + [s.state for s in steps]
    # Terminal: an illegal change is an error and writes nothing.
    with pytest.raises(IllegalTransition, match="FINISHED to RUNNING"):
        async with service.session() as session, session.begin():
            await service.record(session, [Transition(tid, State.RUNNING, 2, "runner")])
    assert len(await service.history(tid)) == 7
    with pytest.raises(IllegalTransition):
        await service.cancel(tid)


async def test_illegal_transition_is_kept_unapplied_when_not_strict(
    service: TaskService, game_type: str
) -> None:
    async with service.session() as session, session.begin():
        tid = (await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)).id
    async with service.session() as session, session.begin():
        recorded = await service.record(session, [Transition(tid, State.FINISHED, 1, "runner")], strict=False)
    assert not recorded[0].applied and "illegal" in recorded[0].detail["ignored"]
    assert (await service.get_task(tid)).state == State.SCHEDULED
    assert [e.applied for e in await service.history(tid)] == [True, False]


async def test_cancel_and_retry(service: TaskService, game_type: str) -> None:
    async with service.session() as session, session.begin():
        tid = (await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)).id
    cancelled = await service.cancel(tid, reason="rained off")
    assert cancelled.state == State.CANCELLED
    assert (await service.history(tid))[-1].detail == {"reason": "rained off"}
    with pytest.raises(TaskNotFound):
        await service.cancel(uuid.uuid4())
    async with service.session() as session, session.begin():
        t2 = (await service.schedule(session, game_type, {"game_id": "2"}, due_at=NOW)).id
        await service.record(
            session,
            [Transition(t2, State.STARTED, 1, "manager"), Transition(t2, State.FAILED, 1, "manager")],
        )
    retried = await service.retry(t2)
    assert (retried.state, retried.failures) == (State.RETRYING, 0)


async def test_trees_audit_and_counts(service: TaskService, game_type: str) -> None:
    async with service.session() as session, session.begin():
        root = (await service.schedule(session, game_type, {"game_id": "1"}, due_at=NOW)).id
        child = (await service.schedule(session, game_type, {"game_id": "1", "period": 1}, parent_id=root)).id
        grandchild = (
            await service.schedule(session, game_type, {"game_id": "1", "period": 2}, parent_id=child)
        ).id
        other = (await service.schedule(session, game_type, {"game_id": "2"}, due_at=NOW)).id
    gc = await service.get_task(grandchild)
    assert (gc.parent_id, gc.root_id) == (child, root)
    tasks, events = await service.audit(root)
    assert {t.id for t in tasks} == {root, child, grandchild}
    assert {e.task_id for e in events} == {root, child, grandchild}
    await service.cancel(other)
    assert await service.counts_by_state() == {State.SCHEDULED: 3, State.CANCELLED: 1}
    now = datetime.now(UTC)
    buckets = await service.counts_per_bucket(
        "1 minute", now - timedelta(minutes=5), now + timedelta(minutes=1)
    )
    assert sum(n for _, s, n in buckets if s == State.SCHEDULED) == 4
    assert sum(n for _, s, n in buckets if s == State.CANCELLED) == 1
    with pytest.raises(InvalidInput, match="bucket"):
        await service.counts_per_bucket("1; drop table tasks", now, now)
    with pytest.raises(InvalidInput, match="parent_id"):
        async with service.session() as session, session.begin():
            await service.schedule(session, game_type, {"game_id": "3"}, parent_id=uuid.uuid4())


async def test_list_tasks_filters_and_pages(service: TaskService, game_type: str) -> None:
    async with service.session() as session, session.begin():
        await service.schedule_many(
            session,
            [NewTask(game_type, {"game_id": str(i)}, due_at=NOW + timedelta(minutes=i)) for i in range(5)],
        )
    page1 = await service.list_tasks(limit=2)
    page2 = await service.list_tasks(limit=2, after=(page1[-1].due_at, page1[-1].id))
    assert [t.payload["game_id"] for t in page1 + page2] == ["0", "1", "2", "3"]
    window = await service.list_tasks(due_from=NOW + timedelta(minutes=1), due_to=NOW + timedelta(minutes=3))
    assert [t.payload["game_id"] for t in window] == ["1", "2"]
    assert await service.list_tasks(state=State.RUNNING) == []


async def test_projection_matches_history(service: TaskService, game_type: str, engine) -> None:  # type: ignore[no-untyped-def]
    """task_state is the last applied event of each task: rebuildable from the hypertable."""
    async with service.session() as session, session.begin():
        ids = [
            r.id
            for r in await service.schedule_many(
                session, [NewTask(game_type, {"game_id": str(i)}) for i in range(3)]
            )
        ]
        await service.record(session, [Transition(ids[0], State.STARTED, 1, "manager")])
    await service.cancel(ids[1])
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "select s.task_id, s.state = last.state and s.attempt = last.attempt as same"
                    " from task_state s cross join lateral (select state, attempt from task_events e"
                    " where e.task_id = s.task_id and applied order by time desc, seq desc limit 1) last"
                )
            )
        ).all()
    assert len(rows) == 3 and all(r.same for r in rows)


async def test_rabbitmq_smoke(topology) -> None:  # type: ignore[no-untyped-def]
    from taskmgr.broker import Consumer, Publisher

    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        got.set_result(message.body)

    async with (
        Publisher(url=AMQP_URL, topology=topology) as pub,
        Consumer(url=AMQP_URL, topology=topology, prefetch=1) as con,
    ):
        await con.consume_start("default", on_message)
        await pub.publish_start("default", b'{"hello": 1}', message_id="m1")
        async with asyncio.timeout(5):
            assert await got == b'{"hello": 1}'


async def test_store_never_returns_rows(service: TaskService, game_type: str, engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        t = await store.get_type(conn, game_type)
    assert t is not None and t.payload_schema == SCHEMA


async def test_projection_is_rebuilt_from_the_history(service: TaskService, game_type: str, engine) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    async with service.session() as session, session.begin():
        a, b, c, d = [
            r.id
            for r in await service.schedule_many(
                session, [NewTask(game_type, {"game_id": str(i)}, due_at=now) for i in range(4)]
            )
        ]
        await service.record(
            session,
            [
                Transition(b, State.STARTED, 1, "manager"),
                Transition(b, State.RUNNING, 1, "runner", runner_id="r1"),
                Transition(c, State.STARTED, 1, "manager"),
                Transition(
                    c,
                    State.RETRYING,
                    1,
                    "manager",
                    count_failure=True,
                    run_at=now + timedelta(minutes=5),
                    detail={"failures": 1, "retry_at": (now + timedelta(minutes=5)).isoformat()},
                ),
                Transition(d, State.STARTED, 1, "manager"),
                Transition(d, State.FINISHED, 1, "runner", runner_id="r2"),
            ],
        )
    before = {t: await service.get_task(t) for t in (a, b, c, d)}
    async with engine.begin() as conn:
        # Corrupting the projection takes the same escape hatch as a rebuild: the
        # state-machine trigger refuses FINISHED -> FAILED even to the owner.
        await conn.execute(text("select set_config('taskmgr.rebuild', 'on', true)"))
        await conn.execute(
            text(
                "update task_state set state = 'FAILED', attempt = 9, failures = 7, runner_id = 'x',"
                " run_at = null"
            )
        )
        assert await store.rebuild_state(conn) == 4
    for t, was in before.items():
        now_ = await service.get_task(t)
        assert (now_.state, now_.attempt, now_.failures, now_.runner_id) == (
            was.state,
            was.attempt,
            was.failures,
            was.runner_id,
        ), t
    async with engine.connect() as conn:
        run_ats = dict((await conn.execute(text("select task_id, run_at from task_state"))).all())
    assert run_ats[a] == now and run_ats[c] == now + timedelta(minutes=5) and run_ats[b] is None
