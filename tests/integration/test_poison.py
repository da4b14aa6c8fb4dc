"""Poison progress messages cost only themselves: a message that cannot be decoded, or
that decodes but fails in PostgreSQL, is dead-lettered with its reason; the rest of its
batch is applied once. Real PostgreSQL+TimescaleDB and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from taskmgr import broker
from taskmgr.broker import REASON_HEADER, Consumer, Publisher
from taskmgr.messages import Heartbeat, Report, RunnerReports, encode
from taskmgr.models import State
from taskmgr.settings import Settings
from tests.helpers import POISON, queue_depth, schedule
from tests.helpers import poison_heartbeat as heartbeat
from tests.helpers import poison_report as report

pytestmark = pytest.mark.usefixtures("clean")


async def take(settings: Settings, publisher: Publisher, bodies: list[bytes], queue: str) -> list[Any]:
    """Publish these bodies to `queue` through the broker and hand back the deliveries
    (unacked), as the manager's consumer would."""
    got: list[broker.Message] = []
    all_in = asyncio.Event()
    consumer = Consumer(url=settings.amqp_url, topology=publisher.topology, prefetch=1000, name="poison")
    await consumer.__aenter__()

    async def on_message(m: broker.Message) -> None:
        got.append(m)
        if len(got) == len(bodies):
            all_in.set()

    await consumer.consume_queue(queue, on_message, durable=True, arguments=publisher.topology.queue_args())
    for body in bodies:
        await publisher.publish_progress(body)
    async with asyncio.timeout(10):
        await all_in.wait()
    take.consumers.append(consumer)  # type: ignore[attr-defined]
    return got


take.consumers = []  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
async def _close_consumers() -> Any:
    yield
    while take.consumers:  # type: ignore[attr-defined]
        await take.consumers.pop().__aexit__(None, None, None)  # type: ignore[attr-defined]


async def dead_letters(settings: Settings, topology: broker.Topology, n: int) -> list[tuple[bytes, str]]:
    got: list[tuple[bytes, str]] = []
    done = asyncio.Event()
    async with Consumer(url=settings.amqp_url, topology=topology, prefetch=100, name="dead") as c:

        async def on_dead(m: broker.Message) -> None:
            await m.ack()
            got.append((m.body, str(m.headers.get(REASON_HEADER))))
            if len(got) >= n:
                done.set()

        await c.consume_queue(topology.dead, on_dead, durable=True)
        async with asyncio.timeout(10):
            await done.wait()
        await asyncio.sleep(0.2)  # anything more would arrive now: there must be nothing
    return got


@pytest.fixture
async def running_tasks(engine, service, publisher, settings: Settings) -> list[uuid.UUID]:  # type: ignore[no-untyped-def]
    await service.create_type({"name": "p", "handler": "noop"})
    ids = await schedule(service, "p", 3, due_at=datetime.now(UTC) - timedelta(seconds=1))
    disp = Dispatcher(engine=engine, publisher=publisher, service=service, settings=settings)
    assert (await disp.poll_once()).claimed == 3
    return ids


async def test_poison_in_a_batch_is_dead_lettered_and_the_rest_applied_once(
    engine, service, publisher, settings: Settings, topology: broker.Topology, running_tasks: list[uuid.UUID]
) -> None:
    good = [json.dumps(report(str(t))).encode() for t in running_tasks] + [
        json.dumps(heartbeat(runner_id=f"r{i}", tasks=[[str(t), 1] for t in running_tasks])).encode()
        for i in range(2)
    ]
    poison = [json.dumps(p).encode() for p in POISON.values()]
    bodies = good[:2] + poison[:4] + good[2:] + poison[4:]
    messages = await take(settings, publisher, bodies, topology.progress)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings)
    counts = await intake.handle_messages(messages)
    assert counts.dead_lettered == len(POISON)
    assert (counts.reports, counts.heartbeats) == (3, 2)
    for tid in running_tasks:
        assert (await service.get_task(tid)).state == State.RUNNING
        assert [e.state for e in await service.history(tid)].count(State.RUNNING) == 1
    dead = await dead_letters(settings, topology, len(POISON))
    assert sorted(b for b, _ in dead) == sorted(poison)
    assert all(reason.startswith("progress message:") for _, reason in dead)
    await asyncio.sleep(0.3)
    assert await queue_depth(settings.amqp_url, topology.progress) == 0  # all settled, nothing requeued


async def test_a_message_that_fails_in_postgresql_is_isolated(
    engine, service, publisher, settings: Settings, topology: broker.Topology, running_tasks: list[uuid.UUID]
) -> None:
    """A heartbeat the models accept but PostgreSQL refuses (a constraint this test adds:
    a real database error, as an unforeseen one would be) fails only itself: the batch
    is split until it is alone, it is dead-lettered with the database's reason, and
    every other message of the batch is applied once."""
    async with engine.begin() as conn:
        await conn.execute(text("alter table runners add constraint test_no_evil check (id <> 'evil')"))
    try:
        bodies = [
            encode(
                RunnerReports(
                    runner_id="r1",
                    pool="default",
                    reports=[Report(task_id=t, attempt=1, status="running", at=datetime.now(UTC))],
                )
            )
            for t in running_tasks
        ]
        evil = encode(Heartbeat(runner_id="evil", pool="default", at=datetime.now(UTC)))
        beats = [
            encode(Heartbeat(runner_id=f"ok{i}", pool="default", at=datetime.now(UTC))) for i in range(3)
        ]
        messages = await take(settings, publisher, [*bodies[:2], evil, *beats, bodies[2]], topology.progress)
        counts = await ProgressIntake(engine=engine, publisher=publisher, settings=settings).handle_messages(
            messages
        )
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("alter table runners drop constraint test_no_evil"))
    assert counts.dead_lettered == 1 and counts.heartbeats == 3 and counts.reports == 3
    [(body, reason)] = await dead_letters(settings, topology, 1)
    assert body == evil and "cannot be applied" in reason and "test_no_evil" in reason
    for tid in running_tasks:
        assert [e.state for e in await service.history(tid)].count(State.RUNNING) == 1
    async with engine.connect() as conn:
        runners = set((await conn.execute(text("select id from runners"))).scalars())
    assert runners == {"ok0", "ok1", "ok2"}
    await asyncio.sleep(0.3)
    assert await queue_depth(settings.amqp_url, topology.progress) == 0
