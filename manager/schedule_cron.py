"""The daily schedule job (seed 001's "Sports Api Daily Schedules Job"): one `schedule`
task per configured provider and league, which a runner executes: it fetches the day's
schedule and syncs one game task per game (see task_types/schedule.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime
from zoneinfo import ZoneInfo

from taskmgr.errors import TaskTypeNotFound
from taskmgr.service import NewTask, TaskService, utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

SCHEDULE_TYPE = "schedule"
GAME_TYPE = "live_game"


class ScheduleCron:
    def __init__(
        self, *, service: TaskService, settings: Settings, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._service = service
        self._settings = settings
        self._clock = clock

    async def run_once(self, day: date | None = None) -> int:
        """Schedule today's (or `day`'s) schedule tasks; returns how many were created.
        Re-running creates a new sync of the same day, which writes no duplicate games
        (their dedup keys) and follows moved or dropped games."""
        now = self._clock()
        day = day or now.astimezone(ZoneInfo(self._settings.schedule_timezone)).date()
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
                dedup_key=f"schedule:{provider}:{league}:{day.isoformat()}:{now.isoformat()}",
                created_by="schedule-cron",
            )
            for provider, league in self._settings.league_list()
        ]
        if not news:
            return 0
        try:
            async with self._service.session() as session, session.begin():
                done = await self._service.schedule_many(session, news)
        except TaskTypeNotFound:
            log.error("no %r task type: run `taskmgr migrate` (it seeds the sports types)", SCHEDULE_TYPE)
            return 0
        log.info("daily schedule job: %d schedule tasks for %s", len(done), day)
        return sum(1 for d in done if d.created)
