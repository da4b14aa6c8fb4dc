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
from taskmgr.settings import Settings
from tests.helpers import amqp_as, as_role, schedule

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
async def task_id(service) -> uuid.UUID:  # type: ignore[no-untyped-def]
    await service.create_type({"name": "box", "handler": "noop"})
    [tid] = await schedule(service, "box", 1)
    return tid


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        ("taskmgr_runner", "update task_events set state = 'FINISHED'"),
        ("taskmgr_runner", "delete from task_events"),
        ("taskmgr_runner", "update task_types set poll_interval_s = 1"),
        ("taskmgr_runner", "insert into task_types (name, handler) values ('x', 'noop')"),
        ("taskmgr_runner", "update tasks set payload = '{}'"),
        ("taskmgr_runner", "select * from task_events"),
        ("taskmgr_manager", "update task_events set state = 'FINISHED'"),
        ("taskmgr_manager", "delete from task_events"),
        ("taskmgr_manager", "update task_types set poll_interval_s = 1"),
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


async def test_runner_role_writes_follow_ons_and_reads_types(database_url: str, service, task_id) -> None:  # type: ignore[no-untyped-def]
    from task_types.base import FollowOn
    from taskmgr.service import TaskService

    engine = make_engine(as_role(database_url, "taskmgr_runner"))
    try:
        runner_service = TaskService(engine=engine)
        done = await runner_service.schedule_follow_ons(
            {"task_id": task_id, "root_task_id": task_id}, [FollowOn("box", {}, "child-1")]
        )
        assert done[0].created
        again = await runner_service.schedule_follow_ons(
            {"task_id": task_id, "root_task_id": task_id}, [FollowOn("box", {}, "child-1")]
        )
        assert not again[0].created
    finally:
        await engine.dispose()
    assert (await service.get_task(done[0].id)).root_id == task_id


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
        assert await Retention(engine=manager_engine, settings=settings).run_once() == 1
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
            await pub.publish_event("live_game.game.final", b"{}", message_id="e1", headers={})
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
    """A manager as taskmgr_manager and a runner as taskmgr_runner (database and broker)
    take a task from due to FINISHED."""
    import httpx

    from manager.app import TaskManager
    from runners import TaskRunner
    from task_types.registry import Registry

    await service.create_type(
        {"name": "ping", "handler": "noop", "url_template": "http://api.test/ping", "poll_interval_s": 0.1}
    )
    [tid] = await schedule(service, "ping", 1, due_at=datetime.now(UTC) + timedelta(seconds=0.5))
    m_engine = make_engine(as_role(database_url, "taskmgr_manager"))
    r_engine = make_engine(as_role(database_url, "taskmgr_runner"))
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True}))
    stop = asyncio.Event()
    try:
        async with (
            TaskManager(
                settings=settings.model_copy(
                    update={"amqp_url": amqp_as(settings.amqp_url, "taskmgr_manager")}
                ),
                engine=m_engine,
            ) as m,
            TaskRunner(
                settings=settings.model_copy(
                    update={"amqp_url": amqp_as(settings.amqp_url, "taskmgr_runner")}
                ),
                engine=r_engine,
                registry=Registry.default(with_entry_points=False),
                transport=transport,
            ) as r,
        ):
            runs = [asyncio.create_task(m.run(stop)), asyncio.create_task(r.run(stop))]
            async with asyncio.timeout(20):
                while (await service.get_task(tid)).state.value != "FINISHED":
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*runs)
    finally:
        await m_engine.dispose()
        await r_engine.dispose()
