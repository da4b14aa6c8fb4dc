"""The daily schedule is never lost: each (provider, league, day) is seeded once, in the
transaction that records it, and a leader that takes over seeds a day whose cron moment
passed with nobody to seed it. Real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from manager.app import TaskManager
from task_types.daily import DailySchedule, daily_schedule_jobs
from task_types.settings import SportsSettings
from taskmgr.settings import Settings

pytestmark = pytest.mark.usefixtures("sports_types")

NY = ZoneInfo("America/New_York")
LEAGUES = "nba:nba,nhl:nhl"


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 24, hour, minute, tzinfo=NY).astimezone(UTC)


async def seedings(engine) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("select provider, league, day::text from schedule_seedings order by 1")
        )
        return [tuple(r) for r in rows]


async def schedule_tasks(engine) -> int:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        return int(
            (await conn.execute(text("select count(*) from tasks where type = 'schedule'"))).scalar_one()
        )


def cron_at(service, now: datetime) -> DailySchedule:  # type: ignore[no-untyped-def]
    s = SportsSettings(leagues=LEAGUES, schedule_cron="0 6 * * *", schedule_timezone="America/New_York")
    return DailySchedule(service=service, settings=s, clock=lambda: now)


async def test_a_day_whose_cron_moment_passed_unseeded_is_caught_up_once(engine, service, settings) -> None:  # type: ignore[no-untyped-def]
    # Before 06:00 the latest cron moment is yesterday's: that day, nothing older.
    assert await cron_at(service, at(5, 59)).catch_up() == 2
    assert {d for *_, d in await seedings(engine)} == {"2026-11-23"}
    assert await cron_at(service, at(6, 30)).catch_up() == 2
    assert await cron_at(service, at(7, 0)).catch_up() == 0, "once"
    assert await cron_at(service, at(6, 0)).run_once() == 0, "the cron itself, late: once"
    assert [s for s in await seedings(engine) if s[2] == "2026-11-24"] == [
        ("nba", "nba", "2026-11-24"),
        ("nhl", "nhl", "2026-11-24"),
    ]
    assert await schedule_tasks(engine) == 4


async def test_by_hand_a_day_is_synced_again(engine, service, settings) -> None:  # type: ignore[no-untyped-def]
    cron = cron_at(service, at(6, 30))
    assert await cron.catch_up() == 2
    assert await cron.run_once(at(6).astimezone(NY).date(), providers=["nhl"], manual=True) == 1
    assert await schedule_tasks(engine) == 3
    assert len(await seedings(engine)) == 2


async def test_a_leader_that_takes_over_after_the_cron_moment_seeds_the_day_once(
    engine, service, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    """The leader died a moment before the cron time (nothing seeded); the manager that
    leads next seeds the day as it takes over, and a third one, later, adds nothing."""
    now = datetime.now(UTC)
    cron = f"{(now - timedelta(minutes=1)).minute} {(now - timedelta(minutes=1)).hour} * * *"
    jobs = daily_schedule_jobs(SportsSettings(leagues=LEAGUES, schedule_cron=cron, schedule_timezone="UTC"))
    for _ in range(2):
        stop = asyncio.Event()
        async with TaskManager(settings=settings, engine=engine, jobs=jobs) as manager:
            run = asyncio.create_task(manager.run(stop))
            async with asyncio.timeout(15):
                while len(await seedings(engine)) < 2:
                    await asyncio.sleep(0.1)
            stop.set()
            await run
    assert await schedule_tasks(engine) == 2
