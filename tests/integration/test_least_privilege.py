"""Least privilege: database roles and RabbitMQ users (created by sql/0003 and
scripts/setup.sh) allow each component what it needs and nothing more."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest
from aiormq.exceptions import ChannelAccessRefused
from sqlalchemy import text

from manager.recovery import Retention
from taskmgr.broker import Consumer, Publisher, Topology
from taskmgr.db import make_engine
from taskmgr.migrate import asyncpg_dsn
from taskmgr.models import TRANSITIONS, State
from taskmgr.settings import Settings
from tests.helpers import amqp_as, as_role, run_until, schedule

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
async def task_id(service) -> uuid.UUID:  # type: ignore[no-untyped-def]
    await service.create_type({"name": "box", "handler": "noop"})
    [tid] = await schedule(service, "box", 1)
    return tid


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        # Runners hold no database credentials: their role may not even read.
        ("taskmgr_runner", "select * from task_types"),
        ("taskmgr_runner", "select * from task_state"),
        (
            "taskmgr_runner",
            "insert into tasks (id, type, due_at, root_id)"
            " values (gen_random_uuid(), 'box', now(), gen_random_uuid())",
        ),
        ("taskmgr_runner", "update task_state set state = 'FINISHED'"),
        (
            "taskmgr_runner",
            "insert into task_events (task_id, state, attempt, source)"
            " values (gen_random_uuid(), 'FINISHED', 1, 'manager')",
        ),
        ("taskmgr_runner", "select * from task_events"),
        ("taskmgr_manager", "update task_events set state = 'FINISHED'"),
        ("taskmgr_manager", "delete from task_events"),
        ("taskmgr_manager", "update task_types set poll_interval_s = 1"),
        ("taskmgr_manager", "update taskmgr_policy set min_retention_days = 1"),
        ("taskmgr_manager", "delete from tasks"),
        ("taskmgr_reader", "update taskmgr_policy set min_retention_days = 1"),
        (
            "taskmgr_reader",
            "insert into task_events (task_id, state, attempt, source)"
            " values (gen_random_uuid(), 'SCHEDULED', 0, 'x')",
        ),
        ("taskmgr_reader", "update task_state set attempt = 9"),
        ("postgres", "update task_events set state = 'FINISHED'"),
        ("postgres", "delete from task_events"),
    ],
)
async def test_history_and_types_are_out_of_reach(
    database_url: str, task_id: uuid.UUID, role: str, statement: str
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(as_role(database_url, role)))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"permission denied|append-only"):
            await conn.execute(statement)
    finally:
        await conn.close()


def _reachable() -> dict[State, set[State]]:
    """What the state machine can reach from each state, in one step or several."""
    reach: dict[State, set[State]] = {s: set(TRANSITIONS[s]) for s in State}
    changed = True
    while changed:
        changed = False
        for s in State:
            more = set().union(*(TRANSITIONS[t] for t in reach[s])) - reach[s]
            if more:
                reach[s] |= more
                changed = True
    return reach


def _run_at(state: State) -> str:
    return "now()" if state in (State.SCHEDULED, State.RETRYING) else "null"


async def test_task_state_changes_only_as_the_state_machine_allows(database_url: str, task_id) -> None:  # type: ignore[no-untyped-def]
    """Every pair of states, tried as the manager's role: the database refuses what the
    state machine cannot reach (a batch may fold several legal steps into one update)."""
    reach = _reachable()
    owner = await asyncpg.connect(asyncpg_dsn(database_url))
    manager = await asyncpg.connect(asyncpg_dsn(as_role(database_url, "taskmgr_manager")))
    try:
        for old in State:
            for new in set(State) - {old}:
                async with owner.transaction():  # the owner's escape hatch puts the row in `old`
                    await owner.execute("select set_config('taskmgr.rebuild', 'on', true)")
                    await owner.execute(
                        f"update task_state set state = '{old}', run_at = {_run_at(old)} where task_id = $1",
                        task_id,
                    )
                change = f"update task_state set state = '{new}', run_at = {_run_at(new)} where task_id = $1"
                if new in reach[old]:
                    await manager.execute(change, task_id)
                else:
                    with pytest.raises(asyncpg.CheckViolationError, match="state machine"):
                        await manager.execute(change, task_id)
        # The manager's role cannot take the rebuild escape hatch.
        async with manager.transaction():
            await manager.execute("select set_config('taskmgr.rebuild', 'on', true)")
            with pytest.raises(asyncpg.CheckViolationError, match="state machine"):
                await manager.execute(
                    "update task_state set state = 'SCHEDULED', run_at = now() where task_id = $1", task_id
                )
    finally:
        await owner.close()
        await manager.close()


async def test_retention_never_drops_history_newer_than_the_floor(database_url: str, engine, task_id) -> None:  # type: ignore[no-untyped-def]
    """The manager's role asks for everything older than now: only chunks older than the
    owner's floor (taskmgr_policy.min_retention_days, 30) go."""
    async with engine.begin() as conn:
        for days in (2, 40):
            await conn.execute(
                text(
                    "insert into task_events (time, task_id, state, attempt, source)"
                    " values (now() - make_interval(days => :d), :t, 'SCHEDULED', 0, 'test')"
                ),
                {"t": task_id, "d": days},
            )
    conn = await asyncpg.connect(asyncpg_dsn(as_role(database_url, "taskmgr_manager")))
    try:
        assert await conn.fetchval("select taskmgr_drop_old_events(now() + interval '1 day')") == 1
    finally:
        await conn.close()
    async with engine.connect() as conn:
        ages = (
            (
                await conn.execute(
                    text("select extract(day from now() - time)::int from task_events where task_id = :t"),
                    {"t": task_id},
                )
            )
            .scalars()
            .all()
        )
    assert 2 in ages and 40 not in ages


async def test_manager_role_runs_retention_through_the_function(
    database_url: str, settings: Settings, engine, task_id
) -> None:  # type: ignore[no-untyped-def]
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "insert into task_events (time, task_id, state, attempt, source)"
                " values (now() - interval '90 days', :t, 'SCHEDULED', 0, 'test')"
            ),
            {"t": task_id},
        )
    manager_engine = make_engine(as_role(database_url, "taskmgr_manager"))
    try:
        assert await Retention.of_task_events(engine=manager_engine, settings=settings).run_once() == 1
        async with manager_engine.connect() as conn:
            with pytest.raises(Exception, match="must be owner"):
                await conn.execute(text("select drop_chunks('task_events', older_than => now())"))
    finally:
        await manager_engine.dispose()


async def test_downstream_consumer_reads_events_only(settings: Settings, topology: Topology) -> None:
    consumer_url = amqp_as(settings.amqp_url, "taskmgr_consumer")
    async with Publisher(url=settings.amqp_url, topology=topology) as pub:
        await pub.ensure_pool("default")
        got: asyncio.Queue[bytes] = asyncio.Queue()
        async with Consumer(url=consumer_url, topology=topology, prefetch=10, declare=False) as c:

            async def on_event(m: aio_pika.abc.AbstractIncomingMessage) -> None:
                await m.ack()
                await got.put(m.body)

            await c.consume_events("live_game.#", on_event)
            await pub.publish_many([("events", "live_game.game.final", b"{}", {}, "e1")])
            async with asyncio.timeout(5):
                assert await got.get() == b"{}"
        conn = await aio_pika.connect(consumer_url)
        try:
            for attempt in (
                lambda ch: ch.get_queue(topology.start_queue("default")),  # read the start queue
                lambda ch: ch.declare_queue(topology.progress, durable=True, arguments=topology.queue_args()),
            ):
                ch = await conn.channel()
                with pytest.raises(ChannelAccessRefused):
                    q = await attempt(ch)
                    await q.get(fail=False)
            ch = await conn.channel()
            ex = await ch.get_exchange(topology.events, ensure=False)
            with pytest.raises((ChannelAccessRefused, aio_pika.exceptions.ChannelClosed)):
                await ex.publish(aio_pika.Message(b"forged"), routing_key="live_game.game.final")
                await ch.close()
        finally:
            await conn.close()


async def test_runner_user_cannot_take_the_managers_queue(settings: Settings, topology: Topology) -> None:
    async with Publisher(url=settings.amqp_url, topology=topology):
        pass
    conn = await aio_pika.connect(amqp_as(settings.amqp_url, "taskmgr_runner"))
    try:
        ch = await conn.channel()
        q = await ch.get_queue(topology.progress, ensure=False)
        with pytest.raises(ChannelAccessRefused):
            await q.get(fail=False)
    finally:
        await conn.close()


async def test_dispatch_and_polling_run_under_their_roles(
    database_url: str, settings: Settings, service, topology: Topology
) -> None:  # type: ignore[no-untyped-def]
    """A manager as taskmgr_manager (database and broker) and a runner as taskmgr_runner
    (broker only: it has no database connection) take a task from due to FINISHED."""
    import httpx

    await service.create_type(
        {"name": "ping", "handler": "noop", "url_template": "http://api.test/ping", "poll_interval_s": 0.1}
    )
    [tid] = await schedule(service, "ping", 1, due_at=datetime.now(UTC) + timedelta(seconds=0.5))

    async def finished() -> bool:
        return (await service.get_task(tid)).state.value == "FINISHED"

    await run_until(
        database_url, settings, lambda request: httpx.Response(200, json={"ok": True}), finished, timeout=20
    )
