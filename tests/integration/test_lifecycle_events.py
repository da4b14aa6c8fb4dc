"""Task lifecycle events (issue #12, item 3): every applied state change published as
`task.<type>.<state>` through an outbox written in the transaction of the change,
published after the commit, never lost, a repeat carrying the same id."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.app import TaskManager
from manager.lifecycle import LifecycleRelay
from taskmgr.broker import BrokerError, Publisher, Topology
from taskmgr.consumer import EventStream, Received
from taskmgr.db import make_engine
from taskmgr.messages import TaskLifecycle, encode, kind_schema_name
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from tests.event_helpers import running_recorder, stored_count, truncate_events
from tests.helpers import schedule, wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


@pytest.fixture(autouse=True)
async def empty(database_url: str, engine: AsyncEngine, service: TaskService) -> None:
    await truncate_events(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("truncate lifecycle_outbox"))
    await service.create_type({"name": "box", "handler": "noop"})


@pytest.fixture
async def events_publisher(settings: Settings) -> AsyncIterator[Publisher]:
    async with Publisher(url=settings.amqp_url, topology=Topology.from_settings(settings)) as pub:
        yield pub


async def lifecycle(settings: Settings, n: int, timeout: float = 15) -> list[Received]:
    got: list[Received] = []
    async with EventStream(
        url=settings.amqp_url,
        prefix=settings.amqp_prefix,
        start="first",
        routing_keys=["task.#"],
        dedup_window=0,
    ) as stream:
        async with asyncio.timeout(timeout):
            async for r in stream:
                got.append(r)
                if len(got) == n:
                    break
    return got


async def outbox(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("select count(*) from lifecycle_outbox"))).scalar_one())


async def test_each_state_change_is_one_event_after_its_commit(
    settings: Settings, engine: AsyncEngine, service: TaskService, events_publisher: Publisher
) -> None:
    [a, b] = await schedule(service, "box", 2)
    await service.cancel(b)
    # A schedule that rolls back writes no event.
    async with service.session() as session:
        async with session.begin():
            await service.schedule_many(session, [NewTask("box", {})])
            await session.rollback()
    assert await outbox(engine) == 3  # a and b SCHEDULED, b CANCELLED
    relay = LifecycleRelay(engine=engine, publisher=events_publisher)
    assert await relay.run_once() == 3
    assert await outbox(engine) == 0 and await relay.run_once() == 0
    got = await lifecycle(settings, 3)
    assert [(r.routing_key, r.event.task_id) for r in got] == [
        ("task.box.scheduled", a),
        ("task.box.scheduled", b),
        ("task.box.cancelled", b),
    ]
    for r in got:
        assert isinstance(r.data, TaskLifecycle) and r.data.type == "box"
        assert r.event.task_type == "task" and r.event.root_task_id == r.event.task_id
    history = await service.history(b)
    assert [e.state.value for e in history if e.applied] == ["SCHEDULED", "CANCELLED"]
    # Every lifecycle event fits its schema in the contract document.
    components = yaml.safe_load(DOC.read_text())["components"]
    schema = {**components["schemas"][kind_schema_name(got[0].routing_key, 1)], "components": components}
    for r in got:
        jsonschema.validate(yaml.safe_load(encode(r.event)), schema)


class Flaky:
    """A publisher whose publishes fail (the broker refused), or that confirms and then
    fails (a crash after the confirms, before the outbox commit)."""

    def __init__(self, real: Publisher, *, after_confirm: bool) -> None:
        self.real = real
        self.after_confirm = after_confirm
        self.calls = 0

    async def publish_many(
        self, items: Sequence[tuple[str, str, bytes, Mapping[str, Any] | None, str]]
    ) -> None:
        self.calls += 1
        if self.after_confirm:
            await self.real.publish_many(items)
        raise BrokerError("the broker went away")


@pytest.mark.parametrize("after_confirm", [False, True])
async def test_a_failed_publish_loses_nothing_and_a_repeat_has_the_same_id(
    settings: Settings,
    engine: AsyncEngine,
    service: TaskService,
    events_publisher: Publisher,
    after_confirm: bool,
) -> None:
    [a] = await schedule(service, "box", 1)
    flaky = Flaky(events_publisher, after_confirm=after_confirm)
    with pytest.raises(BrokerError):
        await LifecycleRelay(engine=engine, publisher=flaky).run_once()  # type: ignore[arg-type]
    assert await outbox(engine) == 1, "still in the outbox"
    assert await LifecycleRelay(engine=engine, publisher=events_publisher).run_once() == 1
    assert await outbox(engine) == 0
    got = await lifecycle(settings, 2 if after_confirm else 1)
    assert {r.event.task_id for r in got} == {a}
    assert len({r.event_id for r in got}) == 1  # the repeat is marked by its id


class Slow:
    """A publisher whose broker takes `delay_s` to confirm (a loaded broker, an alarm)."""

    def __init__(self, real: Publisher, delay_s: float) -> None:
        self.real = real
        self.delay_s = delay_s

    async def publish_many(
        self, items: Sequence[tuple[str, str, bytes, Mapping[str, Any] | None, str]]
    ) -> None:
        await asyncio.sleep(self.delay_s)
        await self.real.publish_many(items)


async def test_a_confirm_slower_than_the_idle_transaction_limit_is_published_once(
    settings: Settings, database_url: str, service: TaskService, events_publisher: Publisher
) -> None:
    """The leader's connections end a transaction left idle past a limit. A relay that
    held its transaction open while the broker confirmed lost it whenever the confirms
    were slower than that: the batch rolled back and was published again at every run,
    never deleted. The relay holds no transaction during the publish."""
    limit = {"idle_in_transaction_session_timeout": "300"}
    idle = make_engine(database_url, name="taskmgr-tests-idle", server_settings=limit)
    try:
        [a] = await schedule(service, "box", 1)
        relay = LifecycleRelay(engine=idle, publisher=Slow(events_publisher, 0.8))  # type: ignore[arg-type]
        assert await relay.run_once() == 1
        assert await outbox(idle) == 0
    finally:
        await idle.dispose()
    assert [r.event.task_id for r in await lifecycle(settings, 1)] == [a]


async def test_a_change_whose_task_is_gone_is_dropped_not_left_forever(
    database_url: str, engine: AsyncEngine, service: TaskService, events_publisher: Publisher
) -> None:
    """An outbox row whose task was deleted (pruned, truncated by hand) cannot be
    published (no type, no root): the relay deletes it rather than leave it in the
    outbox for ever (the outbox-age alert would hold, and it would be read at every run)."""
    [a, _b] = await schedule(service, "box", 2)
    async with engine.begin() as conn:
        await conn.execute(text("delete from task_state where task_id = :id"), {"id": a})
        await conn.execute(text("delete from tasks where id = :id"), {"id": a})
    relay = LifecycleRelay(engine=engine, publisher=events_publisher, batch=1)
    assert await relay.run_once() == 1  # b's; a's dropped, and the batch loop went on past it
    assert await outbox(engine) == 0


async def test_the_leader_publishes_them_and_the_recorder_stores_them(
    settings: Settings, engine: AsyncEngine, service: TaskService
) -> None:
    stop = asyncio.Event()
    async with TaskManager(settings=settings, engine=engine) as manager:
        run = asyncio.create_task(manager.run(stop))
        try:
            await asyncio.wait_for(manager.is_leader.wait(), 15)
            async with running_recorder(settings, engine):
                later = datetime.now(UTC) + timedelta(hours=1)  # not dispatched meanwhile
                ids = await schedule(service, "box", 3, due_at=later)
                await service.cancel(ids[0])
                await wait_for(lambda: _stored(engine, 4), timeout=20, what="4 lifecycle events stored")
        finally:
            stop.set()
            await asyncio.wait_for(run, 15)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("select task_type, kind from emitted_events order by time"))).all()
    assert sorted(rows) == sorted([("task", "box.scheduled")] * 3 + [("task", "box.cancelled")])


async def _stored(engine: AsyncEngine, n: int) -> bool:
    rows, _ = await stored_count(engine)
    return rows >= n


def test_ids_are_stable() -> None:
    from taskmgr.messages import lifecycle_event_id

    t = uuid.uuid4()
    assert lifecycle_event_id(t, 7) == lifecycle_event_id(t, 7) != lifecycle_event_id(t, 8)
