"""Acceptance: the real `taskmgr` processes, configured only by environment variables,
killed, frozen and stopped the hard way."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from manager.app import TaskManager
from task_types.daily import DailySchedule
from task_types.feed import FeedConfig, start_feed
from task_types.settings import SportsSettings
from taskmgr import store
from taskmgr.broker import Consumer, Topology
from taskmgr.messages import decode_event
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import amqp_as, as_role, drain, schedule, start_orders, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean")]


NO_DATABASE = "postgresql+asyncpg://nobody@127.0.0.1:9/none"


def env_of(settings: Settings, role: str, **extra: Any) -> dict[str, str]:
    """The environment of a `taskmgr` process running as `role` (its database role and
    RabbitMQ user, sql/0003 and scripts/setup.sh)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
    env.update(
        {
            # A runner talks only to RabbitMQ: give it a database nobody listens on, so
            # a connection attempt would fail the test.
            "TASKMGR_DATABASE_URL": NO_DATABASE
            if role == "taskmgr_runner"
            else as_role(settings.database_url, role),
            "TASKMGR_AMQP_URL": amqp_as(settings.amqp_url, role),
            "TASKMGR_AMQP_PREFIX": settings.amqp_prefix,
            "TASKMGR_LOG_LEVEL": "INFO",
            "TASKMGR_POLL_INTERVAL": "0.2",
            "TASKMGR_RECOVERY_INTERVAL": "0.5",
            "TASKMGR_HEARTBEAT_INTERVAL": "0.3",
            "TASKMGR_RUNNER_DEAD_AFTER": "2",
            "TASKMGR_LEADER_RETRY": "0.3",
            "TASKMGR_SCHEDULE_CRON": "",  # tests seed the days they play
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Procs:
    """The processes a test starts, their output in files (a pipe nobody reads fills up
    and blocks the writer), all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs = tempfile.TemporaryDirectory(prefix="taskmgr-procs-")

    async def start(self, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
        with open(Path(self.logs.name) / f"{args[0]}-{len(self.procs)}.log", "wb") as log:  # noqa: ASYNC230
            p = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "taskmgr.cli",
                *args,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        self.procs.append(p)
        return p

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.kill()
            await p.wait()
        self.logs.cleanup()


@pytest.fixture
async def procs() -> AsyncIterator[Procs]:
    ps = Procs()
    yield ps
    await ps.close()


async def leader_pid(engine) -> int | None:  # type: ignore[no-untyped-def]
    """The OS pid of the manager holding the leadership lock."""
    async with engine.connect() as conn:
        name = await store.leader_name(conn)
    return int(name.rsplit("-", 1)[1]) if name else None


async def test_leader_killed_mid_dispatch_standby_takes_over(engine, service, settings, procs) -> None:  # type: ignore[no-untyped-def]
    """Three managers, 20,000 due tasks, the leader SIGKILLed while it dispatches: every
    task is claimed exactly once (one STARTED for attempt 1) and reaches the queue."""
    await service.create_type({"name": "work", "handler": "noop"})
    n = 20_000
    env = env_of(settings, "taskmgr_manager", TASKMGR_DISPATCH_BATCH=1000)
    managers = [await procs.start(env, "manager") for _ in range(3)]
    await wait_for(lambda: leader_pid(engine), timeout=20)
    ids = await schedule(service, "work", n, due_at=datetime.now(UTC) + timedelta(seconds=2))

    async def started() -> int:
        async with engine.connect() as conn:
            return (
                await conn.execute(text("select count(*) from task_events where state = 'STARTED'"))
            ).scalar_one()

    await wait_for(lambda: _gt(started(), 2000), timeout=30, every=0.02)
    # The leader is the manager whose database session holds the lock; find its process.
    pid = await leader_pid(engine)
    [victim] = [m for m in managers if m.pid == pid]
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    killed_at = await started()
    assert killed_at < n, "the leader finished before it could be killed"

    async def all_sent() -> bool:
        async with engine.connect() as conn:
            left = (
                await conn.execute(
                    text("select count(*) from task_state where state <> 'STARTED' or sent_at is null")
                )
            ).scalar_one()
        return left == 0

    await wait_for(all_sent, timeout=60, every=0.2)
    async with engine.connect() as conn:
        per_task = (
            await conn.execute(
                text(
                    "select count(*) filter (where c <> 1), count(*) from"
                    " (select task_id, count(*) c from task_events"
                    " where state = 'STARTED' and attempt = 1 group by 1) x"
                )
            )
        ).one()
        attempts = (await conn.execute(text("select max(attempt) from task_state"))).scalar_one()
    assert per_task == (0, n), "every task has exactly one STARTED for attempt 1"
    assert attempts == 1
    orders = start_orders(
        await drain(
            settings.amqp_url, Topology(settings.amqp_prefix).start_queue("default"), expect=n, timeout=30
        )
    )
    assert {t for t, _ in orders} == set(ids), "every claimed task reached the queue"
    # Repeats are possible only for orders in flight at the kill (the relay's at-least-once).
    assert len(orders) - n <= 1000


async def _gt(value: Any, limit: int) -> bool:
    return (await value) > limit


@pytest.fixture
async def fast_types(service: TaskService, sports_types: None) -> None:
    for name in ("live_game", "period_score", "stat_correction", "schedule"):
        await service.update_type(name, poll_interval_s=0.2, request_timeout_s=2.0)


async def test_runner_killed_mid_game_its_games_finish_on_the_other(
    engine, service, settings, procs, fast_types
) -> None:  # type: ignore[no-untyped-def]
    feed = await start_feed(
        FeedConfig(
            seed=11,
            games_per_provider=2,
            first_start_s=1,
            spread_s=2,
            period_s=2.5,
            intermission_s=0.3,
            providers=("nba", "nhl"),
        )
    )
    sports = SportsSettings(feed_url=feed.url, schedule_lead_s=0.0, leagues="nba:nba,nhl:nhl")
    env = env_of(settings, "taskmgr_runner", TASKMGR_FEED_URL=feed.url)
    events: list[Any] = []
    stop = asyncio.Event()
    try:
        async with (
            Consumer(url=settings.amqp_url, topology=Topology(settings.amqp_prefix), prefetch=500) as c,
            TaskManager(settings=settings, engine=engine) as manager,
        ):

            async def on_event(m: Any) -> None:
                await m.ack()
                events.append(decode_event(m.body))

            await c.consume_events("live_game.#", on_event)
            run = asyncio.create_task(manager.run(stop))
            r1 = await procs.start(env, "runner")
            r2 = await procs.start(env, "runner")
            await DailySchedule(service=service, settings=sports).run_once(feed.day.day)

            async def both_running() -> bool:
                tasks = await service.list_tasks(type="live_game", state=State.RUNNING, limit=100)
                return len({t.runner_id for t in tasks}) == 2 and len(tasks) == 4

            await wait_for(both_running, timeout=30)
            running = await service.list_tasks(type="live_game", state=State.RUNNING, limit=100)
            victim_id = running[0].runner_id
            victim = r1 if victim_id.split("-")[-2] == str(r1.pid) else r2
            held = [t.id for t in running if t.runner_id == victim_id]
            victim.send_signal(signal.SIGKILL)

            async def games_finished() -> bool:
                tasks = await service.list_tasks(type="live_game", limit=100)
                return len(tasks) == 4 and all(t.state == State.FINISHED for t in tasks)

            await wait_for(games_finished, timeout=90, every=0.3)
            stop.set()
            await run
        truth = {g["game_id"]: g for g in feed.truth()["games"]}
    finally:
        await feed.close()
    for tid in held:
        task = await service.get_task(tid)
        assert task.attempt == 2 and task.runner_id != victim_id, "resumed on the other runner"
        assert any(e.detail.get("recovery") == "runner_dead" for e in await service.history(tid))
    finals: dict[str, set[Any]] = defaultdict(set)
    for ev in events:
        if ev.event == "game.final":
            finals[ev.data["game_id"]].add(ev.event_id)
            g = truth[ev.data["game_id"]]
            assert (ev.data["home_score"], ev.data["away_score"]) == (g["final"]["home"], g["final"]["away"])
    assert set(finals) == set(truth) and all(len(ids) == 1 for ids in finals.values())
    # The runners (no database) sent the schedule sync and the period follow-ons in their
    # reports; the manager wrote them, once each.
    games = {t.id for t in await service.list_tasks(type="live_game", limit=100)}
    periods = await service.list_tasks(type="period_score", limit=1000)
    assert periods and all(p.parent_id in games for p in periods)
    assert len({p.dedup_key for p in periods}) == len(periods)


async def test_sigterm_hands_tasks_back_and_exits_within_10_s(
    engine, service, settings, procs, fast_types
) -> None:  # type: ignore[no-untyped-def]
    feed = await start_feed(
        FeedConfig(seed=3, games_per_provider=2, first_start_s=0, spread_s=1, period_s=60, providers=("nba",))
    )
    sports = SportsSettings(feed_url=feed.url, schedule_lead_s=0.0, leagues="nba:nba")
    env = env_of(settings, "taskmgr_runner", TASKMGR_FEED_URL=feed.url)
    stop = asyncio.Event()
    try:
        async with TaskManager(settings=settings, engine=engine) as manager:
            run = asyncio.create_task(manager.run(stop))
            r1 = await procs.start(env, "runner")
            await DailySchedule(service=service, settings=sports).run_once(feed.day.day)

            async def running(n: int, not_runner: str | None = None) -> bool:
                tasks = await service.list_tasks(type="live_game", state=State.RUNNING, limit=10)
                return len(tasks) == n and all(t.runner_id != not_runner for t in tasks)

            await wait_for(lambda: running(2), timeout=30)
            first = (await service.list_tasks(type="live_game", limit=10))[0].runner_id
            r2 = await procs.start(env, "runner")
            t0 = time.monotonic()
            r1.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(r1.wait(), 10) == 0
            assert time.monotonic() - t0 < 10
            # Handed back: dispatched again at once (not after the dead-runner timeout).
            await wait_for(lambda: running(2, not_runner=first), timeout=15)
            stop.set()
            await run
    finally:
        await feed.close()
    for t in await service.list_tasks(type="live_game", limit=10):
        history = await service.history(t.id)
        assert any(e.state == State.RETRYING and e.detail.get("report") == "handback" for e in history)
        assert not any(e.detail.get("recovery") == "runner_dead" for e in history)
    assert r2.returncode is None


async def test_a_standby_takes_over_a_frozen_leader_which_then_writes_nothing(
    engine, service, settings: Settings, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Two manager processes; the leader is SIGSTOPped (its connections stay open, its
    kernel answers TCP keepalives): the standby leads within lease + retry + the idle
    transaction timeout. SIGCONT: the old leader finds its lease gone and stays a
    standby; the tasks due afterwards are each started once."""
    lease = 3.0
    env = env_of(
        settings,
        "taskmgr_manager",
        TASKMGR_LEADER_LEASE=lease,
        TASKMGR_LEADER_RETRY=0.3,
        TASKMGR_DATABASE_URL=as_role(database_url, "taskmgr_manager"),
    )
    await service.create_type({"name": "box", "handler": "noop"})
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskmgr.cli",
            "manager",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(2)
    ]

    async def leader_pid() -> int | None:
        async with engine.connect() as conn:
            name = await store.leader_name(conn)
        return int(name.rsplit("-", 1)[1]) if name else None

    try:
        async with asyncio.timeout(30):
            while (first := await leader_pid()) not in {p.pid for p in procs}:
                await asyncio.sleep(0.1)
        frozen = next(p for p in procs if p.pid == first)
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        async with asyncio.timeout(30):
            while (second := await leader_pid()) in (first, None):
                await asyncio.sleep(0.05)
        handover_s = time.monotonic() - stopped_at
        print(f"hand-over after SIGSTOP: {handover_s:.2f} s (lease {lease} s)")
        assert handover_s < lease + 0.3 + 3.0 + 2.0, handover_s
        frozen.send_signal(signal.SIGCONT)
        ids = await schedule(service, "box", 20, due_at=datetime.now(UTC))
        async with asyncio.timeout(30):
            while [t for t in ids if (await service.get_task(t)).state is not State.STARTED]:
                await asyncio.sleep(0.1)
        await asyncio.sleep(lease)  # the woken one has had time to try
        assert await leader_pid() == second, "the woken leader did not take the lease back"
        assert frozen.returncode is None, "it lives on as a standby"
        async with engine.connect() as conn:
            doubles = (
                await conn.execute(
                    text(
                        "select count(*) from (select task_id, attempt from task_events"
                        " where state = 'STARTED' and applied group by 1, 2 having count(*) > 1) x"
                    )
                )
            ).scalar_one()
        assert doubles == 0
    finally:
        for p in procs:
            if p.returncode is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            await p.wait()
