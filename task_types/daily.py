"""The daily schedule job: one `schedule` task per configured provider and league,
which a runner executes: it fetches the day's schedule and syncs one game task per game
(see task_types/schedule.py). The leading manager runs it on its cron rule and catches
up a day nobody seeded (`daily_schedule_jobs`); `taskmgr schedule seed` runs it by hand."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import date, datetime, timedelta
from functools import cache
from importlib import resources
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from prometheus_client import Gauge
from sqlalchemy import TextClause
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from task_types.settings import SportsSettings
from taskmgr.errors import TaskTypeNotFound
from taskmgr.jobs import JobContext, LeaderJob, LeaderJobs
from taskmgr.queries import load
from taskmgr.service import NewTask, TaskService, utcnow

log = logging.getLogger(__name__)

SCHEDULE_TYPE = "schedule"
GAME_TYPE = "live_game"
# A day whose cron moment passed unseeded is looked for this often by the leader.
CATCH_UP_EVERY_S = 60.0

# The "day not seeded by its time" alert compares the two (docs/observability/alerts.yml).
# Every manager with the job computes the first at each scrape; the leader's catch-up sets
# the second once it finds that fire's day seeded, so it lags the first by at most a minute.
FIRE = Gauge(
    "taskmgr_schedule_fire_timestamp_seconds",
    "The daily schedule cron's latest fire time (Unix seconds; 0: none within two days)",
)
SEEDED = Gauge(
    "taskmgr_schedule_seeded_timestamp_seconds",
    "The latest daily schedule fire whose day the leader found seeded (Unix seconds)",
)


@cache
def _q() -> dict[str, TextClause]:
    """The sports part's own queries (task_types/sql/queries.sql)."""
    return load(resources.files("task_types") / "sql" / "queries.sql")


async def seeded(conn: AsyncConnection, day: date) -> set[tuple[str, str]]:
    """The (provider, league) pairs whose schedule for `day` is seeded already."""
    rows = await conn.execute(_q()["seeded"], {"day": day})
    return {(r.provider, r.league) for r in rows}


async def record_seedings(
    conn: AsyncConnection, day: date, seedings: Sequence[tuple[str, str, uuid.UUID]], now: datetime
) -> None:
    """Record (provider, league, schedule task) seedings of `day`; a repeat is a no-op."""
    if seedings:
        params = {
            "day": day,
            "now": now,
            "providers": [p for p, _, _ in seedings],
            "leagues": [league for _, league, _ in seedings],
            "task_ids": [t for _, _, t in seedings],
        }
        await conn.execute(_q()["record_seedings"], params)


def daily_schedule_jobs(settings: SportsSettings) -> LeaderJobs:
    """The leader's jobs for the daily schedule: seed on the cron rule, and catch up a
    day whose cron moment passed unseeded (no leader then, a database blip, a late
    loop) at once and every minute. None when TASKMGR_SCHEDULE_CRON is empty."""

    def jobs(ctx: JobContext) -> list[LeaderJob]:
        if not settings.schedule_cron.strip():
            return []
        daily = DailySchedule(service=ctx.service, settings=settings, clock=ctx.clock, engine=ctx.engine)
        FIRE.set_function(daily.last_fire_timestamp)
        return [
            LeaderJob("schedule-catch-up", daily.catch_up, every_s=CATCH_UP_EVERY_S, at_start=True),
            LeaderJob(
                "daily-schedule",
                daily.run_once,
                cron=settings.schedule_cron,
                timezone=settings.schedule_timezone,
            ),
        ]

    return jobs


class DailySchedule:
    def __init__(
        self,
        *,
        service: TaskService,
        settings: SportsSettings,
        clock: Callable[[], datetime] = utcnow,
        engine: AsyncEngine | None = None,
    ) -> None:
        """engine: where to write (the leader's fenced engine); the service's by default."""
        self._service = service
        self._engine = engine
        self._settings = settings
        self._clock = clock

    def _begin(self) -> AbstractAsyncContextManager[AsyncConnection]:
        engine = self._engine or self._service.engine
        return engine.begin()

    async def run_once(
        self, day: date | None = None, *, providers: Sequence[str] | None = None, manual: bool = False
    ) -> int:
        """Seed today's (or `day`'s) schedule tasks, one per configured provider and
        league (only `providers`, if given); returns how many were created.

        Each (provider, league, day) is seeded once: a pair already recorded in
        schedule_seedings is skipped, and the task and its record are written in one
        transaction. `manual` (`taskmgr schedule seed`) runs a new sync of the day even
        when it was seeded: the sync creates no duplicate games (their dedup keys) and
        follows moved or dropped ones."""
        now = self._clock()
        day = day or now.astimezone(ZoneInfo(self._settings.schedule_timezone)).date()
        try:
            return await self._seed(now, day, providers=providers, manual=manual)
        except TaskTypeNotFound:
            _no_schedule_type()
            return 0

    async def _seed(self, now: datetime, day: date, *, providers: Sequence[str] | None, manual: bool) -> int:
        """run_once's work; raises TaskTypeNotFound when there is no schedule type."""
        pairs = [(p, lg) for p, lg in self._settings.league_list() if providers is None or p in providers]
        suffix = f":manual:{uuid.uuid4().hex[:12]}" if manual else ""
        async with self._begin() as conn:
            done = set() if manual else await seeded(conn, day)
            todo = [pair for pair in pairs if pair not in done]
            if not todo:
                return 0
            news = [
                NewTask(
                    type=SCHEDULE_TYPE,
                    payload={
                        "provider": provider,
                        "league": league,
                        "date": day.isoformat(),
                        "lead_s": self._settings.schedule_lead_s,
                        "game_type": GAME_TYPE,
                    },
                    due_at=now,
                    dedup_key=f"schedule:{provider}:{league}:{day.isoformat()}{suffix}",
                    created_by="schedule-cron",
                )
                for provider, league in todo
            ]
            scheduled = await self._service.schedule_many(conn, news)
            await record_seedings(
                conn, day, [(p, lg, s.id) for (p, lg), s in zip(todo, scheduled, strict=True)], now
            )
        created = sum(1 for d in scheduled if d.created)
        log.info("daily schedule job: %d schedule tasks for %s", created, day)
        return created

    def last_fire(self) -> datetime | None:
        """The cron's most recent fire time up to now (None: not within two days)."""
        now = self._clock()
        trigger = CronTrigger.from_crontab(
            self._settings.schedule_cron, timezone=ZoneInfo(self._settings.schedule_timezone)
        )
        last, fire = None, trigger.get_next_fire_time(None, now - timedelta(days=2))
        while fire is not None and fire <= now:
            last, fire = fire, trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        return last

    async def catch_up(self) -> int:
        """Seed the day of the cron's latest fire time if it was not seeded (no leader
        lived at that moment, PostgreSQL was away, the job ran late): the leader runs
        this when it takes over and every minute. Only that day, never older ones."""
        fire = self.last_fire()
        if fire is None:
            return 0
        day = fire.astimezone(ZoneInfo(self._settings.schedule_timezone)).date()
        try:
            created = await self._seed(self._clock(), day, providers=None, manual=False)
        except TaskTypeNotFound:
            _no_schedule_type()
            return 0
        # Committed (or seeded before): that fire's day is seeded.
        SEEDED.set(fire.timestamp())
        if created:
            log.warning("schedule for %s seeded late (catch-up after %s)", day, fire.isoformat())
        return created

    def last_fire_timestamp(self) -> float:
        """last_fire() in Unix seconds, 0 for none (the FIRE gauge, read at each scrape)."""
        fire = self.last_fire()
        return fire.timestamp() if fire is not None else 0.0


def _no_schedule_type() -> None:
    log.error("no %r task type: run `taskmgr migrate` (it seeds the sports types)", SCHEDULE_TYPE)
