"""What the event-history tests share: events made and published as a runner would, the
recorder run in this process, the history's tables emptied."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.recorder import Recorder
from taskmgr import event_store
from taskmgr.broker import Publisher
from taskmgr.messages import Event, encode
from taskmgr.migrate import asyncpg_dsn
from taskmgr.settings import Settings

EVENT_TABLES = "emitted_events, emitted_event_ids"


async def truncate_events(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(f"truncate {EVENT_TABLES}")
    finally:
        await conn.close()


def make_event(
    n: int,
    *,
    task_id: uuid.UUID | None = None,
    root_task_id: uuid.UUID | None = None,
    kind: str = "score.changed",
    task_type: str = "live_game",
    runner: str = "runner-a",
    at: datetime | None = None,
    data: dict[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
) -> Event:
    task_id = task_id or uuid.uuid4()
    return Event(
        event_id=event_id or uuid.uuid5(task_id, f"{kind}|{n}"),
        event=kind,
        task_type=task_type,
        task_id=task_id,
        root_task_id=root_task_id or task_id,
        task_runner_id=runner,
        attempt=1,
        observed_at=at or datetime.now(UTC),
        data=data if data is not None else {"n": n},
    )


def repeat_of(ev: Event, *, runner: str = "runner-b", later_s: float = 1.5) -> Event:
    """The same event as another runner (or a later poll) publishes it: same id and
    data, another runner and time."""
    return ev.model_copy(
        update={"task_runner_id": runner, "observed_at": ev.observed_at + timedelta(seconds=later_s)}
    )


async def publish(publisher: Publisher, events: Sequence[Event], *, chunk: int = 500) -> None:
    """As the runner's poller does: routing key <task_type>.<event>, message_id = the
    event id, the ids in the headers; confirms in flight together."""
    items = [
        (
            "events",
            f"{ev.task_type}.{ev.event}",
            encode(ev),
            {"task_id": str(ev.task_id), "event_id": str(ev.event_id)},
            str(ev.event_id),
        )
        for ev in events
    ]
    for i in range(0, len(items), chunk):
        await publisher.publish_many(items[i : i + chunk])


@contextlib.asynccontextmanager
async def running_recorder(settings: Settings, engine: AsyncEngine) -> AsyncIterator[Recorder]:
    recorder = Recorder(settings=settings, engine=engine)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        async with asyncio.timeout(15):
            await recorder.ready.wait()
        yield recorder
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def stored_count(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        return await event_store.event_counts(conn)


# -- a simulated day: the feed, a manager, two runners and the recorder in this process ---

FAST_TYPES = {"poll_interval_s": 0.2, "request_timeout_s": 2.0}


@dataclass
class Day:
    feed: Any  # task_types.feed.RunningFeed
    service: Any  # taskmgr.service.TaskService
    recorder: Recorder
    manager: Any


@contextlib.asynccontextmanager
async def simulated_day(
    engine: AsyncEngine, settings: Settings, config: Any, *, runners: int = 2, runner_signals: Any = None
) -> AsyncIterator[Day]:
    """The feed playing `config`, a manager (which declares the events stream), runners
    and a recorder; the day's schedule seeded. runner_signals: one RunnerSignals per runner."""
    from manager.app import TaskManager
    from runners import TaskRunner
    from task_types.daily import DailySchedule
    from task_types.feed import start_feed
    from task_types.settings import SportsSettings
    from taskmgr.service import TaskService
    from tests.helpers import sports_registry

    feed = await start_feed(config)
    sports = SportsSettings(feed_url=feed.url, schedule_lead_s=0.0, leagues=LEAGUES)
    service = TaskService(engine=engine)
    for name in ("live_game", "period_score", "stat_correction", "schedule"):
        await service.update_type(name, **FAST_TYPES)
    stop = asyncio.Event()
    registry = sports_registry(feed.base_urls())
    tasks: list[asyncio.Task[None]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            manager = await stack.enter_async_context(TaskManager(settings=settings, engine=engine))
            tasks.append(asyncio.create_task(manager.run(stop)))
            await asyncio.wait_for(manager.is_leader.wait(), 15)
            for i in range(runners):
                sig = runner_signals[i] if runner_signals else None
                r = await stack.enter_async_context(
                    TaskRunner(settings=settings, registry=registry, signals=sig)
                )
                tasks.append(asyncio.create_task(r.run(stop)))
            recorder = Recorder(settings=settings, engine=engine)
            tasks.append(asyncio.create_task(recorder.run(stop)))
            await asyncio.wait_for(recorder.ready.wait(), 15)
            providers = {p for p, _ in sports.league_list()}
            await DailySchedule(service=service, settings=sports).run_once(feed.day.day)
            assert providers
            try:
                yield Day(feed=feed, service=service, recorder=recorder, manager=manager)
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await feed.close()


LEAGUES = "nba:nba,espn:basketball/nba,mlb:mlb,nhl:nhl"


async def games_done(engine: AsyncEngine) -> bool:
    from taskmgr import store

    async with engine.connect() as conn:
        rows = await store.counts_by_type_and_state(conn)
    games = sum(n for t, _, n in rows if t == "live_game")
    # stat_correction checks come 10 minutes after a final: not waited for.
    open_ = sum(n for t, s, n in rows if t in ("live_game", "period_score", "schedule") and not s.terminal)
    return games > 0 and open_ == 0
