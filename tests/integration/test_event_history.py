"""The event history (issue #12, item 1): every event the runners emit stored once in
TimescaleDB by the recorder, from its own durable queue, deduplicated by event id even
when two runners emitted it; retention as for task_events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.recorder import Recorder
from manager.recovery import Retention
from taskmgr import event_store
from taskmgr.broker import Publisher, Topology
from taskmgr.db import make_engine
from taskmgr.messages import Event, encode
from taskmgr.migrate import asyncpg_dsn
from taskmgr.reader import QueueReader
from taskmgr.settings import Settings
from tests.event_helpers import (
    make_event,
    publish,
    repeat_of,
    running_recorder,
    stored_count,
    truncate_events,
)
from tests.helpers import amqp_as, as_role, queue_depth, wait_for


@pytest.fixture(autouse=True)
async def empty_history(database_url: str) -> None:
    await truncate_events(database_url)


@pytest.fixture
async def events_publisher(settings: Settings) -> AsyncIterator[Publisher]:
    """The manager's side: the topology with the events stream and the recorder's queue."""
    async with Publisher(url=settings.amqp_url, topology=Topology.from_settings(settings)) as pub:
        yield pub


async def _stored(engine: AsyncEngine, n: int) -> bool:
    rows, _ = await stored_count(engine)
    return rows >= n


async def test_every_event_is_stored_once_repeats_from_two_runners_included(
    settings: Settings, engine: AsyncEngine, events_publisher: Publisher
) -> None:
    task = uuid.uuid4()
    first = [make_event(i, task_id=task) for i in range(300)]
    repeats = [repeat_of(ev) for ev in first[::3]]  # runner-b saw every third one too
    order = first[:150] + repeats + first[150:]
    expected: dict[uuid.UUID, Event] = {}
    for ev in order:
        expected.setdefault(ev.event_id, ev)
    async with running_recorder(settings, engine) as recorder:
        await publish(events_publisher, order)
        await wait_for(lambda: _stored(engine, 300), timeout=20, what="300 events stored")
        await wait_for(lambda: _true(recorder.counts.messages == 400), timeout=10, what="every copy handled")
        # The same copies again, later (a redelivery, a third poll): nothing new.
        await publish(events_publisher, repeats)
        await wait_for(lambda: _true(recorder.counts.messages == 500), timeout=10)
    assert await stored_count(engine) == (300, 300)
    assert recorder.counts.stored == 300 and recorder.counts.repeats == 200
    async with engine.connect() as conn:
        got = await event_store.events_of_task(conn, task)
    by_id = {ev.event_id: ev for ev in got}
    assert set(by_id) == {ev.event_id for ev in first}
    for ev in expected.values():
        row = by_id[ev.event_id]
        # The first copy recorded is kept: its time, its runner.
        assert (row.time, row.runner_id, row.data, row.kind, row.version) == (
            ev.observed_at,
            ev.task_runner_id,
            ev.data,
            "score.changed",
            1,
        )
    assert {r.runner_id for r in got} == {"runner-a", "runner-b"}
    assert await queue_depth(settings.amqp_url, Topology(settings.amqp_prefix).events_recorder) == 0


async def _true(value: bool) -> bool:
    return value


async def test_events_published_while_no_recorder_runs_wait_in_its_queue(
    settings: Settings, engine: AsyncEngine, events_publisher: Publisher
) -> None:
    events = [make_event(i) for i in range(50)]
    await publish(events_publisher, events)
    queue = Topology(settings.amqp_prefix).events_recorder
    await wait_for(lambda: _true_async(queue_depth(settings.amqp_url, queue), 50), timeout=10)
    assert await stored_count(engine) == (0, 0)
    async with running_recorder(settings, engine):
        await wait_for(lambda: _stored(engine, 50), timeout=20)
    assert await stored_count(engine) == (50, 50)


async def _true_async(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_two_recorders_on_one_queue_store_each_event_once(
    settings: Settings, engine: AsyncEngine, events_publisher: Publisher
) -> None:
    events = [make_event(i) for i in range(2000)]
    copies = events + [repeat_of(ev) for ev in events]
    small = settings.model_copy(update={"recorder_batch": 50})
    async with running_recorder(small, engine) as a, running_recorder(small, engine) as b:
        await publish(events_publisher, copies)
        await wait_for(
            lambda: _true(a.counts.messages + b.counts.messages == 4000), timeout=30, what="all handled"
        )
    assert a.counts.messages and b.counts.messages, "both recorders took a share"
    assert await stored_count(engine) == (2000, 2000)
    assert a.counts.stored + b.counts.stored == 2000


async def test_a_malformed_event_and_a_refused_sender_are_dead_lettered_the_rest_stored(
    settings: Settings, engine: AsyncEngine, events_publisher: Publisher
) -> None:
    topo = Topology(settings.amqp_prefix)
    # The recorder as deployed: the manager's user; only taskmgr_runner publishes events.
    strict = settings.model_copy(
        update={"amqp_url": amqp_as(settings.amqp_url, "taskmgr_manager"), "runner_users": "taskmgr_runner"}
    )
    good = [make_event(i) for i in range(10)]
    poison = make_event(99, data={"text": "a NUL \x00 byte jsonb refuses"})
    async with Publisher(
        url=amqp_as(settings.amqp_url, "taskmgr_runner"), topology=topo, declare=False
    ) as runner:
        await publish(runner, good[:5])
        await runner.publish_many([("events", "live_game.score.changed", b"{not json", {}, "x")])
        await publish(runner, [poison, *good[5:]])
    await publish(events_publisher, [make_event(7)])  # as guest: not a runner user here
    async with running_recorder(strict, engine) as recorder:
        await wait_for(lambda: _true(recorder.counts.messages == 13), timeout=20, what="13 handled")
    assert recorder.counts.stored == 10 and recorder.counts.dead_lettered == 3
    assert await stored_count(engine) == (10, 10)
    reasons = await _dead_reasons(settings.amqp_url, topo.dead, 3)
    assert any("event:" in r for r in reasons), reasons
    assert any("cannot be stored" in r for r in reasons), reasons
    assert any("sender 'guest' may not publish events" in r for r in reasons), reasons


async def _dead_reasons(url: str, queue: str, n: int) -> list[str]:
    conn = await aio_pika.connect(url)
    reasons: list[str] = []
    try:
        ch = await conn.channel()
        q = await ch.get_queue(queue)
        async with asyncio.timeout(10):
            while len(reasons) < n:
                msg = await q.get(no_ack=True, fail=False)
                if msg is None:
                    await asyncio.sleep(0.05)
                    continue
                reasons.append(str(msg.headers.get("x-taskmgr-reason")))
    finally:
        await conn.close()
    return reasons


async def test_a_lost_database_requeues_the_batch_and_nothing_is_lost(
    settings: Settings, database_url: str, events_publisher: Publisher
) -> None:
    """The recorder's engine points at a database that refuses it (as during a
    PostgreSQL restart): the events stay queued; a recorder that can write stores them."""
    broken = make_engine(database_url.replace("127.0.0.1:5432", "127.0.0.1:1"), name="broken")
    events = [make_event(i) for i in range(20)]
    await publish(events_publisher, events)
    recorder = Recorder(settings=settings, engine=broken)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        await asyncio.wait_for(recorder.ready.wait(), 15)
        await asyncio.sleep(1.0)  # it tries, fails, reconnects
        assert recorder.counts.stored == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await broken.dispose()
    engine = make_engine(database_url, name="recorder-ok")
    try:
        async with running_recorder(settings, engine):
            await wait_for(lambda: _stored(engine, 20), timeout=20)
        assert await stored_count(engine) == (20, 20)
    finally:
        await engine.dispose()


async def test_the_recorder_runs_under_the_managers_role_and_user(
    settings: Settings, database_url: str, events_publisher: Publisher
) -> None:
    as_manager = settings.model_copy(
        update={
            "database_url": as_role(database_url, "taskmgr_manager"),
            "amqp_url": amqp_as(settings.amqp_url, "taskmgr_manager"),
        }
    )
    engine = make_engine(as_manager.database_url, name="recorder-manager-role")
    try:
        async with running_recorder(as_manager, engine):
            await publish(events_publisher, [make_event(i) for i in range(5)])
            await wait_for(lambda: _stored(engine, 5), timeout=20)
        async with engine.connect() as conn:
            for statement in ("update emitted_events set kind = 'x'", "delete from emitted_events"):
                with pytest.raises(Exception, match=r"append-only|permission denied"):
                    async with conn.begin_nested():
                        await conn.execute(text(statement))
    finally:
        await engine.dispose()
    reader = await asyncpg.connect(asyncpg_dsn(as_role(database_url, "taskmgr_reader")))
    try:
        assert await reader.fetchval("select count(*) from emitted_events") == 5
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("insert into emitted_event_ids values (gen_random_uuid(), now())")
    finally:
        await reader.close()


async def test_retention_drops_old_chunks_and_their_ids_never_past_the_floor(
    settings: Settings, database_url: str, engine: AsyncEngine
) -> None:
    now = datetime.now(UTC)
    old = [make_event(i, at=now - timedelta(days=40)) for i in range(3)]
    recent = [make_event(i, at=now - timedelta(days=10)) for i in range(3)]
    async with engine.begin() as conn:
        assert await event_store.record_events(conn, old + recent) == 6
    manager_engine = make_engine(as_role(database_url, "taskmgr_manager"), name="retention-test")
    try:
        # Asked to keep 1 day, it still keeps the owner's floor (30 days).
        ask = settings.model_copy(update={"event_retention_days": 1})
        assert await Retention.of_emitted_events(engine=manager_engine, settings=ask).run_once() == 1
    finally:
        await manager_engine.dispose()
    async with engine.connect() as conn:
        left = [r.event_id for r in (await conn.execute(text("select event_id from emitted_event_ids")))]
        assert sorted(left) == sorted(ev.event_id for ev in recent)
        assert await event_store.event_counts(conn) == (3, 3)
    # A late repeat of a dropped event is history again (a chunk of its own, which the
    # next retention run drops); one of a kept event is still a repeat.
    async with engine.begin() as conn:
        assert await event_store.record_events(conn, [repeat_of(recent[0]), old[0]]) == 1


async def test_the_stream_and_the_recorders_queue_are_declared_with_the_topology(
    settings: Settings, events_publisher: Publisher
) -> None:
    topo = Topology.from_settings(settings)
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        ch = await conn.channel()
        for name in (topo.events_stream, topo.events_recorder):
            q = await ch.declare_queue(name, passive=True)
            assert q.declaration_result.message_count is not None
        # Declared again with other retention: the manager keeps the stream, with a warning.
        other = Topology(settings.amqp_prefix, stream=type(topo.stream)("1h", 10**9))  # type: ignore[misc]
        async with Publisher(url=settings.amqp_url, topology=other):
            pass
    finally:
        await conn.close()
    await publish(events_publisher, [make_event(1)])
    assert await _stream_length(settings.amqp_url, topo.events_stream) == 1


async def _stream_length(url: str, stream: str) -> int:
    """What the stream holds, read from its start (a stream reports no message count)."""
    async with QueueReader(url=url, queue=stream, prefetch=100, arguments={"x-stream-offset": "first"}) as r:
        got = await r.take(100, linger_s=0.3, wait_s=5)
        return len(got)


def test_encode_keeps_the_version() -> None:
    ev = make_event(1).model_copy(update={"version": 2})
    assert b'"version":2' in encode(ev)


def test_compose_runs_a_recorder_as_the_managers_role_and_user() -> None:
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "compose.yaml").read_text())
    recorder = compose["services"]["recorder"]
    assert recorder["command"] == ["recorder"]
    env = recorder["environment"]
    assert env["TASKMGR_DATABASE_URL"].startswith("postgresql+asyncpg://taskmgr_manager:${")
    assert env["TASKMGR_AMQP_URL"].startswith("amqp://taskmgr_manager:${")
