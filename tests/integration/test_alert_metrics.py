"""The readings the alerts need (docs/observability/alerts.yml), taken from the real
PostgreSQL and RabbitMQ: live runners per pool and runner deaths, the lifecycle outbox's
age, the dead-letter queue's depth (the leader's, gone when it steps down), and the daily
schedule's fire and seeded times. Values are read from this process's registry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import aiormq
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.app import TaskManager
from manager.lifecycle import LifecycleRelay
from manager.recovery import Recovery
from task_types import daily
from task_types.daily import daily_schedule_jobs
from task_types.settings import SportsSettings
from taskmgr import store
from taskmgr.broker import Publisher, Topology
from taskmgr.jobs import JobContext
from taskmgr.service import TaskService, utcnow
from taskmgr.settings import Settings
from tests.helpers import schedule, wait_for

pytestmark = [pytest.mark.usefixtures("clean"), pytest.mark.timeout(60)]


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def add_runner(engine: AsyncEngine, runner_id: str, pool: str, last_seen: datetime) -> None:
    async with engine.begin() as conn:
        await store.upsert_runner(
            conn, runner_id=runner_id, pool=pool, host="h", pid=1, tasks=0, now=last_seen
        )


async def test_live_runners_per_pool_and_the_runners_declared_dead(
    engine: AsyncEngine, service: TaskService, settings: Settings
) -> None:
    """A pool counts its runners heard from within TASKMGR_RUNNER_DEAD_AFTER; a task type's
    pool without any shows 0 (the alert's case); a pool that only a dead runner served
    leaves the gauge; each runner recovery declares dead counts under its pool."""
    await service.create_type({"name": "lonely_work", "handler": "noop", "pool": "lonely"})
    now = utcnow()
    await add_runner(engine, "r-live", "default", now)
    await add_runner(engine, "r-stopped", "default", now)
    async with engine.begin() as conn:
        await store.stop_runner(conn, "r-stopped", now)
    await add_runner(engine, "r-silent", "other", now - timedelta(seconds=60))
    recovery = Recovery(engine=engine, settings=settings)
    died_before = sample("taskmgr_runners_dead_total", pool="other") or 0.0

    assert await recovery.measure_runners() == {"default": 1, "lonely": 0, "other": 0}
    assert sample("taskmgr_runners_live", pool="lonely") == 0
    assert sample("taskmgr_runners_live", pool="default") == 1

    assert (await recovery.run_once()).dead_runners == 1
    assert sample("taskmgr_runners_dead_total", pool="other") == died_before + 1
    assert await recovery.measure_runners() == {"default": 1, "lonely": 0}
    assert sample("taskmgr_runners_live", pool="other") is None, "a pool nobody serves or needs is dropped"


async def test_the_lifecycle_outbox_age_grows_until_the_relay_publishes(
    engine: AsyncEngine, settings: Settings, publisher: Publisher
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("truncate lifecycle_outbox"))
    relay = LifecycleRelay(engine=engine, publisher=publisher)
    assert await relay.measure() == 0.0
    # A state change written 90 s ago and never relayed (no leader since, say).
    old = TaskService(engine=engine, clock=lambda: utcnow() - timedelta(seconds=90))
    await old.create_type({"name": "work", "handler": "noop"})
    await schedule(old, "work", 3, due_at=utcnow() + timedelta(hours=1))
    age = await relay.measure()
    assert 89 <= age < 120
    assert sample("taskmgr_lifecycle_outbox_age_seconds") == age
    assert await relay.run_once() == 3
    assert await relay.measure() == 0.0


async def test_the_dead_letter_depth_is_the_leaders_and_leaves_with_the_leadership(
    engine: AsyncEngine, service: TaskService, settings: Settings, topology: Topology, publisher: Publisher
) -> None:
    await service.create_type({"name": "work", "handler": "noop", "pool": "default"})
    await publisher.dead_letter(b"{not json", "a test's poison")
    stop = asyncio.Event()
    async with TaskManager(settings=settings, engine=engine) as manager:
        run = asyncio.create_task(manager.run(stop))
        # The leader measures as it takes the lead, then every 15 s.
        await wait_for(
            lambda: _async(sample("taskmgr_dead_letter_messages", queue=topology.dead) == 1),
            timeout=20,
            what="the dead letter counted",
        )
        assert sample("taskmgr_runners_live", pool="default") == 0  # a type's pool, no runner
        stop.set()
        await asyncio.wait_for(run, 20)
    assert sample("taskmgr_dead_letter_messages", queue=topology.dead) is None
    assert sample("taskmgr_runners_live", pool="default") is None
    assert sample("taskmgr_lifecycle_outbox_age_seconds") == 0


async def test_the_depth_of_a_missing_queue_is_an_error_and_the_publisher_goes_on(
    publisher: Publisher, topology: Topology
) -> None:
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await publisher.queue_depth(f"{topology.prefix}.no-such-queue")
    await publisher.dead_letter(b"x", "still publishing")
    assert await publisher.queue_depth(topology.dead) == 1


async def _async(value: bool) -> bool:
    return value


NY = ZoneInfo("America/New_York")


async def test_the_schedule_gauges_follow_the_cron_and_the_catch_up(
    engine: AsyncEngine, service: TaskService, sports_types: None
) -> None:
    """The fire time is the cron's latest moment, read at each scrape; the seeded time
    follows once the leader's catch-up found (or made) that day seeded, and not while the
    schedule type is missing (the alert's case)."""
    now = datetime(2026, 11, 24, 6, 30, tzinfo=NY).astimezone(UTC)
    fire = datetime(2026, 11, 24, 6, 0, tzinfo=NY).timestamp()
    sports = SportsSettings(leagues="nba:nba", schedule_cron="0 6 * * *", schedule_timezone=str(NY))
    jobs = {j.name: j for j in daily_schedule_jobs(sports)(JobContext(service, engine, lambda: now))}
    daily.SEEDED.set(0)
    assert sample("taskmgr_schedule_fire_timestamp_seconds") == fire
    async with engine.begin() as conn:
        await conn.execute(text("delete from task_types where name = 'schedule'"))
    assert await jobs["schedule-catch-up"].run() == 0
    assert sample("taskmgr_schedule_seeded_timestamp_seconds") == 0, "no schedule type: not seeded"

    await sports_types_again(engine)
    assert await jobs["schedule-catch-up"].run() == 1
    assert sample("taskmgr_schedule_seeded_timestamp_seconds") == fire
    daily.SEEDED.set(0)
    assert await jobs["schedule-catch-up"].run() == 0, "seeded already"
    assert sample("taskmgr_schedule_seeded_timestamp_seconds") == fire, "and found so"


async def sports_types_again(engine: AsyncEngine) -> None:
    from taskmgr.migrate import available

    [sports] = [m for m in available() if m.name == "0002_sports_types"]
    async with engine.begin() as conn:
        await conn.execute(text("delete from task_types"))
        await conn.exec_driver_sql(sports.sql)
