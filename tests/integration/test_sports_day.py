"""A simulated day of games end to end: the simulated feed, a Task Manager and two
TaskRunners in this process, the real PostgreSQL+TimescaleDB and RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest

from manager.app import TaskManager
from runners import TaskRunner
from task_types.daily import DailySchedule
from task_types.feed import FeedConfig, RunningFeed, start_feed
from task_types.settings import SportsSettings
from taskmgr import store
from taskmgr.broker import Consumer
from taskmgr.messages import Event, decode_event
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import sports_registry, wait_for

pytestmark = pytest.mark.usefixtures("sports_types")

FAST = {"poll_interval_s": 0.2, "request_timeout_s": 2.0}


@dataclass
class World:
    feed: RunningFeed
    service: TaskService
    settings: Settings
    sports: SportsSettings
    events: list[tuple[str, Event]] = field(default_factory=list)

    def by_game(self) -> dict[str, list[Event]]:
        out: dict[str, list[Event]] = defaultdict(list)
        for _, ev in self.events:
            if "game_id" in ev.data:
                out[str(ev.data["game_id"])].append(ev)
        return out


@contextlib.asynccontextmanager
async def world(engine, settings: Settings, config: FeedConfig, runners: int = 2) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    feed = await start_feed(config)
    sports = SportsSettings(
        feed_url=feed.url, schedule_lead_s=0.0, leagues="nba:nba,espn:basketball/nba,mlb:mlb,nhl:nhl"
    )
    service = TaskService(engine=engine)
    for name in ("live_game", "period_score", "stat_correction", "schedule"):
        await service.update_type(name, **FAST)
    w = World(feed=feed, service=service, settings=settings, sports=sports)
    stop = asyncio.Event()
    registry = sports_registry(feed.base_urls())
    async with contextlib.AsyncExitStack() as stack:
        consumer = await stack.enter_async_context(
            Consumer(url=settings.amqp_url, topology=_topo(settings), prefetch=500)
        )

        async def on_event(message: Any) -> None:
            await message.ack()
            w.events.append((message.routing_key, decode_event(message.body)))

        await consumer.consume_events("#", on_event)
        manager = await stack.enter_async_context(TaskManager(settings=settings, engine=engine))
        tasks = [asyncio.create_task(manager.run(stop))]
        for _ in range(runners):
            r = await stack.enter_async_context(
                TaskRunner(settings=settings, registry=registry)
            )
            tasks.append(asyncio.create_task(r.run(stop)))
        try:
            yield w
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await feed.close()


def _topo(settings: Settings):  # type: ignore[no-untyped-def]
    from taskmgr.broker import Topology

    return Topology(settings.amqp_prefix)


async def games_done(engine) -> bool:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        rows = await store.counts_by_type_and_state(conn)
    games = sum(n for t, _, n in rows if t == "live_game")
    open_ = sum(n for t, s, n in rows if t in ("live_game", "period_score", "schedule") and not s.terminal)
    return games > 0 and open_ == 0


def fast_day(**kw: Any) -> FeedConfig:
    base = {
        "seed": 7,
        "games_per_provider": 2,
        "first_start_s": 1.0,
        "spread_s": 3.0,
        "period_s": 1.2,
        "intermission_s": 0.3,
    }
    return FeedConfig(**{**base, **kw})


async def test_a_simulated_day_end_to_end(engine, settings) -> None:  # type: ignore[no-untyped-def]
    async with world(engine, settings, fast_day()) as w:
        assert await DailySchedule(service=w.service, settings=w.sports).run_once(w.feed.day.day) == 4
        await wait_for(lambda: games_done(engine), timeout=90, every=0.3)
        truth = {g["game_id"]: g for g in w.feed.truth()["games"]}
    games = await w.service.list_tasks(type="live_game", limit=100)
    assert {t.payload["game_id"] for t in games} == set(truth) and len(truth) == 8
    assert all(t.state == State.FINISHED for t in games)
    events = w.by_game()
    for game_id, g in truth.items():
        finals = {ev.event_id for ev in events[game_id] if ev.event == "game.final"}
        assert len(finals) == 1, f"{game_id}: {len(finals)} final event ids"
        final = next(ev for ev in events[game_id] if ev.event == "game.final")
        assert (final.data["home_score"], final.data["away_score"]) == (
            g["final"]["home"],
            g["final"]["away"],
        )
        # Every score the feed showed was emitted (as one of the observations).
        seen = {
            (ev.data.get("home_score"), ev.data.get("away_score"))
            for ev in events[game_id]
            if ev.event == "score.changed"
        }
        assert (g["final"]["home"], g["final"]["away"]) in seen | {
            (final.data["home_score"], final.data["away_score"])
        }
        # An event id never stands for two different observations.
        by_id: dict[uuid.UUID, Any] = {}
        for ev in events[game_id]:
            assert by_id.setdefault(ev.event_id, ev.data) == ev.data
    # Follow-ons: one period_score task per period of each game, written once.
    periods = await w.service.list_tasks(type="period_score", limit=1000)
    per_game: dict[str, list[int]] = defaultdict(list)
    for t in periods:
        per_game[t.payload["game_id"]].append(t.payload["period"])
    for game_id, g in truth.items():
        assert sorted(per_game[game_id]) == list(range(1, len(g["periods"]) + 1)), game_id
    assert len(await w.service.list_tasks(type="stat_correction", limit=100)) == 8
    counts = await w.service.counts_by_state()
    assert counts.get(State.RUNNING, 0) == counts.get(State.STARTED, 0) == 0
    # Events carry the task and runner ids.
    assert all(ev.task_runner_id and ev.root_task_id for _, ev in w.events)


async def test_daily_seed_twice_moved_and_postponed_games(engine, settings) -> None:  # type: ignore[no-untyped-def]
    """Games far in the future: only the schedule syncs run."""
    async with world(engine, settings, fast_day(first_start_s=3600), runners=1) as w:
        cron = DailySchedule(service=w.service, settings=w.sports)
        await cron.run_once(w.feed.day.day)
        await wait_for(lambda: _schedules_done(w.service, 4), timeout=30)
        first = {t.payload["game_id"]: t for t in await w.service.list_tasks(type="live_game", limit=100)}
        assert len(first) == 8 and all(t.state == State.SCHEDULED for t in first.values())
        # The same day again, automatically: it was seeded, nothing runs.
        assert await cron.run_once(w.feed.day.day) == 0
        # By hand (taskmgr schedule seed): a new sync, which creates nothing new.
        await cron.run_once(w.feed.day.day, manual=True)
        await wait_for(lambda: _schedules_done(w.service, 8), timeout=30)
        again = {t.payload["game_id"]: t for t in await w.service.list_tasks(type="live_game", limit=100)}
        assert {g: t.id for g, t in again.items()} == {g: t.id for g, t in first.items()}
        # One game moves 30 minutes later, one is postponed.
        moved, postponed = sorted(g for g, t in first.items() if t.payload["provider"] == "nba")
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"{w.feed.url}/_faults", json={"moved": {moved: 1800}, "postponed": [postponed]}
            )
            assert r.status_code == 200
        await cron.run_once(w.feed.day.day, manual=True)
        await wait_for(lambda: _schedules_done(w.service, 12), timeout=30)
        after = {t.payload["game_id"]: t for t in await w.service.list_tasks(type="live_game", limit=100)}
    assert after[moved].due_at == first[moved].due_at + timedelta(seconds=1800)
    assert after[moved].state == State.SCHEDULED
    assert after[postponed].state == State.CANCELLED
    history = await w.service.history(after[postponed].id)
    assert "no longer in the schedule" in history[-1].detail["reason"]
    moved_note = [e for e in await w.service.history(after[moved].id) if "moved_from" in e.detail]
    assert len(moved_note) == 1 and not moved_note[0].applied
    unchanged = [g for g in first if g not in (moved, postponed)]
    assert all(after[g].due_at == first[g].due_at and after[g].state == State.SCHEDULED for g in unchanged)


async def _schedules_done(service: TaskService, n: int) -> bool:
    done = await service.list_tasks(type="schedule", state=State.FINISHED, limit=100)
    return len(done) >= n


async def test_faults_during_games_are_survived_and_recorded(engine, settings) -> None:  # type: ignore[no-untyped-def]
    faults = {"error_5xx": 0.15, "malformed": 0.1, "rate_limit_429": 0.05, "slow": 0.05, "slow_s": 0.3}
    from task_types.feed import Faults

    config = fast_day(providers=("nba", "nhl"), faults=Faults(**faults), period_s=1.5)
    async with world(engine, settings, config) as w:
        await DailySchedule(
            service=w.service, settings=w.sports.model_copy(update={"leagues": "nba:nba,nhl:nhl"})
        ).run_once(w.feed.day.day)
        await wait_for(lambda: games_done(engine), timeout=120, every=0.3)
        truth = {g["game_id"]: g for g in w.feed.truth()["games"]}
    games = await w.service.list_tasks(type="live_game", limit=100)
    assert len(games) == 4 and all(t.state == State.FINISHED for t in games)
    events = w.by_game()
    errors: set[str] = set()
    for t in games:
        g = truth[t.payload["game_id"]]
        finals = [ev for ev in events[g["game_id"]] if ev.event == "game.final"]
        assert len({ev.event_id for ev in finals}) == 1
        assert (finals[0].data["home_score"], finals[0].data["away_score"]) == (
            g["final"]["home"],
            g["final"]["away"],
        )
        errors |= {
            e.detail.get("kind", "")
            for e in await w.service.history(t.id)
            if e.detail.get("report") == "poll_error"
        }
    assert {"http_5xx", "parse"} <= errors, errors
