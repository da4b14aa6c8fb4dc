"""CLI commands that need live processes: `events tail`, `end2end`, `check`. The CLI runs
as a subprocess (`python -m taskmgr.cli`, as an operator runs it); the manager, the runner
and the simulated feed run in this process against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.app import TaskManager
from manager.signals import ManagerSignals
from runners import TaskRunner
from runners.signals import RunnerSignals
from task_types.feed import FeedConfig, start_feed
from taskmgr import broker
from taskmgr.broker import Publisher
from taskmgr.handlers import Registry
from taskmgr.messages import Event, encode
from taskmgr.settings import Settings
from tests.helpers import ROOT, sports_registry

pytestmark = [pytest.mark.usefixtures("clean"), pytest.mark.timeout(90)]


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def cli_env(settings: Settings, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
    env.update(
        TASKMGR_DATABASE_URL=settings.database_url,
        TASKMGR_AMQP_URL=settings.amqp_url,
        TASKMGR_AMQP_PREFIX=settings.amqp_prefix,
        TASKMGR_LOG_LEVEL="WARNING",
        TASKMGR_RUNNER_DEAD_AFTER=str(settings.runner_dead_after),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def spawn(settings: Settings, *args: str, **env: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskmgr.cli",
        *args,
        cwd=ROOT,
        env=cli_env(settings, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def cli(settings: Settings, *args: str, within_s: float = 60, **env: Any) -> Ran:
    proc = await spawn(settings, *args, **env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


class Live:
    """An in-process manager and, optionally, a runner and the simulated feed."""

    def __init__(self) -> None:
        self.manager: TaskManager | None = None
        self.runner: TaskRunner | None = None
        self.manager_signals = ManagerSignals()
        self.runner_signals = RunnerSignals()
        self.stops: dict[str, asyncio.Event] = {}
        self.runs: dict[str, asyncio.Task[None]] = {}
        self.feed_url = ""

    async def stop(self, which: str) -> None:
        self.stops[which].set()
        await self.runs.pop(which)


@asynccontextmanager
async def live(
    engine: AsyncEngine, settings: Settings, *, runner: bool, feed: bool = False
) -> AsyncIterator[Live]:
    out = Live()
    async with AsyncExitStack() as stack:
        registry = Registry.default()
        if feed:
            running = await start_feed(FeedConfig(seed=3, games_per_provider=1), port=0)
            stack.push_async_callback(running.close)
            registry = sports_registry(running.base_urls())
            out.feed_url = running.url
        out.manager = await stack.enter_async_context(
            TaskManager(settings=settings, engine=engine, signals=out.manager_signals)
        )
        procs: list[tuple[str, Any]] = [("manager", out.manager)]
        if runner:
            out.runner = await stack.enter_async_context(
                TaskRunner(settings=settings, registry=registry, signals=out.runner_signals)
            )
            procs.append(("runner", out.runner))
        for name, proc in procs:
            out.stops[name] = asyncio.Event()
            out.runs[name] = asyncio.create_task(proc.run(out.stops[name]))
        try:
            await asyncio.wait_for(out.manager.is_leader.wait(), 10)
            yield out
        finally:
            for name in list(out.runs):
                await out.stop(name)


# -- events tail ------------------------------------------------------------------------


def _event(routing_key: str, n: int) -> tuple[str, Event]:
    task_type, _, name = routing_key.partition(".")
    return routing_key, Event(
        event_id=uuid.uuid4(),
        event=name,
        task_type=task_type,
        task_id=uuid.uuid4(),
        root_task_id=uuid.uuid4(),
        task_runner_id="runner-tail",
        attempt=1,
        observed_at=datetime.now(UTC),
        data={"n": n},
    )


async def _until_listening(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    seen = ""
    async with asyncio.timeout(20):
        while "listening on" not in seen:
            line = await proc.stderr.readline()
            assert line, f"events tail ended before listening: {seen!r}"
            seen += line.decode()
    return seen


@pytest.mark.parametrize("fmt", ["json", "yaml"])
async def test_events_tail_prints_the_events_its_pattern_binds(
    settings: Settings, topology: broker.Topology, fmt: str
) -> None:
    events = [
        _event(k, i)
        for i, k in enumerate(
            [
                "live_game.period.ended",
                "other.score.changed",
                "live_game.score.changed",
                "live_game.score.corrected",
                "live_game.score.changed",
            ]
        )
    ]
    async with Publisher(url=settings.amqp_url, topology=topology) as pub:  # declares the events exchange
        proc = await spawn(
            settings,
            "events",
            "tail",
            "--routing-key",
            "live_game.score.*",
            "--count",
            "2",
            "-o",
            fmt,
            "--timeout",
            "30",
        )
        try:
            assert f"{topology.prefix}.events for 'live_game.score.*'" in await _until_listening(proc)
            # The ones the pattern does not bind come first: had they reached the
            # queue, they would be printed first.
            for key, ev in events:
                await pub.publish_many(
                    [("events", key, encode(ev), {"task_id": str(ev.task_id)}, str(ev.event_id))]
                )
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0
    text = out.decode()
    if fmt == "json":
        rows = [json.loads(line) for line in text.splitlines()]  # one event per line
    else:
        rows = list(yaml.safe_load_all(text))
    assert [r["routing_key"] for r in rows] == ["live_game.score.changed", "live_game.score.corrected"]
    for row, (_, ev) in zip(rows, events[2:4], strict=True):
        assert row["event_id"] == str(ev.event_id) and row["task_id"] == str(ev.task_id)
        assert (row["runner"], row["data"]) == ("runner-tail", ev.data)
        assert datetime.fromisoformat(row["time"]) == ev.observed_at


async def test_events_tail_stops_at_its_timeout_and_without_the_exchange_fails_in_one_line(
    settings: Settings, topology: broker.Topology
) -> None:
    missing = await cli(settings, "events", "tail", "--timeout", "1", within_s=30)
    assert missing.code == 1, missing
    assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1, missing.stderr
    assert f"{topology.prefix}.events" in missing.stderr
    async with Publisher(url=settings.amqp_url, topology=topology):
        quiet = await cli(settings, "events", "tail", "--timeout", "1", "-o", "json", within_s=30)
    assert (quiet.code, quiet.stdout) == (0, ""), quiet


# -- end2end ----------------------------------------------------------------------------


async def test_end2end_finishes_every_task_with_a_manager_a_runner_and_the_feed(
    engine: AsyncEngine, settings: Settings
) -> None:
    async with live(engine, settings, runner=True, feed=True) as world:
        ran = await cli(
            settings,
            "end2end",
            *("-n", "20", "--deadline", "60", "-o", "json"),
            within_s=80,
            TASKMGR_FEED_URL=world.feed_url,
        )
    assert ran.code == 0, ran
    result = json.loads(ran.stdout)
    assert result["result"] == "success"
    assert (result["tasks"], result["finished"], result["failed"], result["unfinished"]) == (20, 20, 0, 0)
    assert result["types"] == {"end2end": 10, "end2end_espn": 10}, "a mix of two task types"


async def test_end2end_without_a_runner_is_partial_at_its_deadline(
    engine: AsyncEngine, settings: Settings
) -> None:
    async with live(engine, settings, runner=False):
        ran = await cli(settings, "end2end", "-n", "20", "--deadline", "2", "-o", "json", within_s=30)
    assert ran.code == 1, ran
    result = json.loads(ran.stdout)
    assert (result["result"], result["finished"], result["unfinished"]) == ("partial", 0, 20)
    assert result["seconds"] >= 2


# -- check ------------------------------------------------------------------------------


def checks(ran: Ran) -> dict[str, bool]:
    return {c["check"]: c["ok"] for c in json.loads(ran.stdout)}


async def test_check_passes_with_a_leader_and_a_heartbeating_runner_and_fails_without_a_runner(
    engine: AsyncEngine, settings: Settings
) -> None:
    async with live(engine, settings, runner=True) as procs:
        taken = procs.manager_signals
        await taken.wait_for(lambda: taken.intake.heartbeats >= 1)
        ok = await cli(settings, "check", "-o", "json")
        assert ok.code == 0, ok
        assert checks(ok) == {"database": True, "leader": True, "runners": True, "broker": True}

        # The runner stops (its last heartbeat says so): no runner any more.
        await procs.stop("runner")
        beats = procs.runner_signals.heartbeat_sent.count
        await taken.wait_for(lambda: taken.intake.heartbeats >= beats)
        none = await cli(settings, "check", "-o", "json")
        assert none.code == 1, none
        assert checks(none) == {"database": True, "leader": True, "runners": False, "broker": True}
        assert (await cli(settings, "check", "--no-runners", "-o", "json")).code == 0
