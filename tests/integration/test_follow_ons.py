"""Follow-on tasks and schedule syncs travel in runners' reports; the manager's intake
writes them in the transaction that applies the report (a runner holds no database
credentials). Real PostgreSQL+TimescaleDB and RabbitMQ."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from taskmgr import broker
from taskmgr.messages import FollowOnOrder, Report, RunnerReports, SyncOrder, encode
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import schedule

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
async def started(engine, service: TaskService, publisher, settings: Settings) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A `game` task, dispatched (attempt 1) and RUNNING on runner r1."""
    await service.create_type({"name": "game", "handler": "noop"})
    await service.create_type(
        {
            "name": "period",
            "handler": "noop",
            "payload_schema": {"type": "object", "required": ["period"]},
        }
    )
    [tid] = await schedule(service, "game", 1, due_at=datetime.now(UTC) - timedelta(seconds=1))
    disp = Dispatcher(engine=engine, publisher=publisher, service=service, settings=settings)
    assert (await disp.poll_once()).claimed == 1
    await intake_of(engine, publisher, settings).apply([reports((tid, 1, "running"))])
    return tid


def intake_of(engine, publisher, settings: Settings) -> ProgressIntake:  # type: ignore[no-untyped-def]
    return ProgressIntake(engine=engine, publisher=publisher, settings=settings)


def reports(*items: tuple[uuid.UUID, int, str], **fields: object) -> RunnerReports:
    now = datetime.now(UTC)
    return RunnerReports(
        runner_id="r1",
        pool="default",
        reports=[Report(task_id=t, attempt=a, status=s, at=now, **fields) for t, a, s in items],  # type: ignore[arg-type]
    )


def period(n: int, **changes: object) -> FollowOnOrder:
    values: dict[str, object] = {"type": "period", "payload": {"period": n}, "dedup_key": f"period-{n}"}
    return FollowOnOrder(**{**values, **changes})  # type: ignore[arg-type]


async def test_follow_ons_in_a_report_are_written_once_even_if_it_arrives_twice(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    intake = intake_of(engine, publisher, settings)
    msg = reports((started, 1, "progress"), follow_ons=[period(1), period(2, delay_s=60)])
    await intake.apply([msg])
    await intake.apply([msg])  # redelivered
    children = await service.list_tasks(type="period")
    assert sorted(c.payload["period"] for c in children) == [1, 2]
    for c in children:
        assert (c.parent_id, c.root_id, c.state, c.created_by) == (
            started,
            started,
            State.SCHEDULED,
            "runner",
        )
        assert c.dedup_key == f"{started}/period-{c.payload['period']}"
    delayed = next(c for c in children if c.payload["period"] == 2)
    assert delayed.due_at > datetime.now(UTC) + timedelta(seconds=50)
    # A progress report changes nothing of the parent's own state.
    assert (await service.get_task(started)).state == State.RUNNING


async def test_a_refused_follow_on_is_recorded_and_the_report_still_applies(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    """A follow-on of an unknown type or with a payload its type refuses writes nothing
    (not even the good follow-ons of the same report) and is kept on the parent's
    history; the report's own change (here: finished) applies."""
    intake = intake_of(engine, publisher, settings)
    for bad in (period(3, type="missing"), period(4, payload={"nope": 1})):
        await intake.apply([reports((started, 1, "progress"), follow_ons=[period(1), bad])])
    await intake.apply([reports((started, 1, "finished"))])
    assert await service.list_tasks(type="period") == []
    assert (await service.get_task(started)).state == State.FINISHED
    refused = [
        e.detail["follow_ons_refused"]
        for e in await service.history(started)
        if "follow_ons_refused" in e.detail
    ]
    assert len(refused) == 2
    assert "missing" in refused[0] and "period" in refused[1]


async def test_a_stale_attempts_follow_ons_are_not_written_and_it_is_stopped(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    intake = intake_of(engine, publisher, settings)
    batch = await intake.apply([reports((started, 7, "progress"), follow_ons=[period(1)])])
    assert await service.list_tasks(type="period") == []
    assert [(rid, s.task_id, s.attempt) for rid, s in batch.stops] == [("r1", started, 7)]


async def test_a_schedule_sync_in_a_report_creates_moves_and_cancels_under_its_scope(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    intake = intake_of(engine, publisher, settings)
    start = datetime.now(UTC) + timedelta(hours=2)
    first = SyncOrder(scope="feed:day", follow_ons=[period(1, due_at=start), period(2, due_at=start)])
    await intake.apply([reports((started, 1, "progress"), sync=first)])
    later = start + timedelta(minutes=30)
    second = SyncOrder(scope="feed:day", follow_ons=[period(1, due_at=later)])
    await intake.apply([reports((started, 1, "progress"), sync=second)])
    await intake.apply([reports((started, 1, "progress"), sync=second)])  # a repeat changes nothing
    children = {c.dedup_key: c for c in await service.list_tasks(type="period")}
    assert set(children) == {"feed:day/period-1", "feed:day/period-2"}
    assert children["feed:day/period-1"].due_at == later
    assert children["feed:day/period-2"].state == State.CANCELLED


async def test_the_manager_applies_follow_ons_from_the_progress_queue(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    """End to end through RabbitMQ: what a runner publishes reaches the intake."""
    intake = intake_of(engine, publisher, settings)
    got: list[broker.Message] = []
    async with broker.Consumer(
        url=settings.amqp_url, topology=publisher.topology, prefetch=10, name="test"
    ) as consumer:
        import asyncio

        arrived = asyncio.Event()

        async def on_progress(m: broker.Message) -> None:
            got.append(m)
            arrived.set()

        await consumer.consume_progress(on_progress)
        await publisher.publish_progress(encode(reports((started, 1, "progress"), follow_ons=[period(1)])))
        async with asyncio.timeout(5):
            await arrived.wait()
        counts = await intake.handle_messages(got)
    assert counts.reports == 1
    assert [c.payload for c in await service.list_tasks(type="period")] == [{"period": 1}]


async def test_a_game_the_schedule_cancelled_comes_back_when_listed_again(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    """Dropped from one listing (the task is cancelled), listed again: a new task for it
    (the cancelled one stays cancelled); an operator's cancel is not undone."""
    intake = intake_of(engine, publisher, settings)
    start = datetime.now(UTC) + timedelta(hours=2)
    both = SyncOrder(scope="feed:day", follow_ons=[period(1, due_at=start), period(2, due_at=start)])
    await intake.apply([reports((started, 1, "progress"), sync=both)])
    only_one = SyncOrder(scope="feed:day", follow_ons=[period(1, due_at=start)])
    await intake.apply([reports((started, 1, "progress"), sync=only_one)])
    operator_cancelled = next(t for t in await service.list_tasks(type="period") if t.payload["period"] == 1)
    await service.cancel(operator_cancelled.id)
    await intake.apply([reports((started, 1, "progress"), sync=both)])
    tasks = {t.dedup_key: t for t in await service.list_tasks(type="period")}
    assert tasks["feed:day/period-2"].state == State.CANCELLED
    assert tasks["feed:day/period-2#2"].state == State.SCHEDULED, "revived"
    assert tasks["feed:day/period-1"].state == State.CANCELLED and "feed:day/period-1#2" not in tasks
    # The same listing again changes nothing more.
    await intake.apply([reports((started, 1, "progress"), sync=both)])
    assert len(await service.list_tasks(type="period")) == 3


async def test_a_sync_never_cancels_a_game_under_way(
    engine, service: TaskService, publisher, settings: Settings, started: uuid.UUID
) -> None:
    intake = intake_of(engine, publisher, settings)
    now = datetime.now(UTC)
    await intake.apply(
        [reports((started, 1, "progress"), sync=SyncOrder(scope="s", follow_ons=[period(1, due_at=now)]))]
    )
    [child] = await service.list_tasks(type="period")
    disp = Dispatcher(engine=engine, publisher=publisher, service=service, settings=settings)
    assert (await disp.poll_once()).claimed == 1
    await intake.apply([reports((started, 1, "progress"), sync=SyncOrder(scope="s", follow_ons=[]))])
    assert (await service.get_task(child.id)).state == State.STARTED
