"""The live demo: the simulated feed, a manager, two runners and a day of games, with
the events printed as they arrive and a summary at the end. A recorder stores every event
once in the history; the summary counts the events stored against the distinct events the
demo saw on the exchange (equal, every run).

It works in its own database (taskmgr_demo, made anew each run) and its own RabbitMQ
names (prefix taskmgr_demo), so it never touches a real installation's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from task_types.daily import DailySchedule
from task_types.feed import feed_day
from task_types.settings import SportsSettings
from taskmgr import event_store, store, tokens
from taskmgr.broker import Consumer, Topology
from taskmgr.db import make_engine, with_database
from taskmgr.messages import decode_event
from taskmgr.migrate import recreate_database
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings

DEMO_DB = "taskmgr_demo"
DEMO_PREFIX = "taskmgr_demo"
FEED_PORT = int(os.environ.get("TASKMGR_DEMO_FEED_PORT", "8765"))
# The console's port (another free one when this one is taken).
API_PORT = int(os.environ.get("TASKMGR_DEMO_API_PORT", "8080"))
DEMO_TOKEN = "demo"
STATUS_EVERY_S = 5.0
GAME_TYPES = ("live_game", "period_score")

# Piped or captured output gets wide lines rather than wrapped ones.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


class Demo:
    def __init__(
        self,
        settings: Settings,
        *,
        games: int,
        provider_urls: str,
        period_s: float = 8.0,
        spread_s: float = 45.0,
    ) -> None:
        self.period_s = period_s
        self.spread_s = spread_s
        demo_url = with_database(settings.database_url, DEMO_DB)
        self.settings = settings.model_copy(
            update={
                "database_url": demo_url,
                "amqp_prefix": DEMO_PREFIX,
                "heartbeat_interval": 2.0,
                "runner_dead_after": 8.0,
            }
        )
        self.sports = SportsSettings(
            feed_url=f"http://127.0.0.1:{FEED_PORT}",
            provider_urls=provider_urls,
            schedule_lead_s=0.0,
            schedule_cron="",
        )
        self.games = games
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.logdir = Path(tempfile.mkdtemp(prefix="taskmgr-demo-"))
        self.events: Counter[str] = Counter()
        self.finals: dict[str, dict[str, Any]] = {}
        self.seen_ids: set[str] = set()
        self.emitted: set[str] = set()  # every distinct event id on the exchange, lifecycle too
        self.stored = 0  # rows in the history
        self.doubled = 0  # rows beyond the first of an id (0 unless dedup failed)
        self.api_port = _port_or_free(API_PORT)

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "TASKMGR_DATABASE_URL": s.database_url,
            "TASKMGR_AMQP_URL": s.amqp_url,
            "TASKMGR_AMQP_PREFIX": s.amqp_prefix,
            "TASKMGR_FEED_URL": self.sports.feed_url,
            "TASKMGR_PROVIDER_URLS": self.sports.provider_urls,
            "TASKMGR_SCHEDULE_CRON": "",  # the demo seeds its day itself
            "TASKMGR_HEARTBEAT_INTERVAL": "2",
            "TASKMGR_RUNNER_DEAD_AFTER": "8",
            "TASKMGR_POLL_INTERVAL": "0.5",
            "TASKMGR_API_PORT": str(self.api_port),
        }

    async def start(self, name: str, *args: str) -> None:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: ASYNC230 - once per process
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskmgr.cli",
            *args,
            env=self.env(),
            stdout=log,
            stderr=log,
        )

    async def stop_all(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                console.print(f"[yellow]{name} did not stop in 15 s; killing it[/]")
                p.kill()

    def on_event(self, routing_key: str, body: bytes) -> None:
        ev = decode_event(body)
        self.emitted.add(str(ev.event_id))
        if routing_key.startswith("task."):
            return  # task lifecycle events: the status line counts tasks by state
        if str(ev.event_id) in self.seen_ids:
            return  # a repeat (same observation polled twice): consumers drop it by id
        self.seen_ids.add(str(ev.event_id))
        self.events[ev.event] += 1
        d = ev.data
        game = f"{d.get('provider', '')}:{d.get('away_team', '?')}@{d.get('home_team', '?')}"
        score = ""
        if ev.event in ("period.score", "period.ended"):
            score = f"p{d.get('period')} {d.get('away')}-{d.get('home')}"
        elif "home_score" in d or "away_score" in d:
            score = f"{d.get('away_score')}-{d.get('home_score')}"
        colour = {
            "game.final": "bold green",
            "game.started": "cyan",
            "period.ended": "magenta",
            "game.postponed": "yellow",
            "score.changed": "white",
        }.get(ev.event, "dim")
        when = ev.observed_at.astimezone().strftime("%H:%M:%S")
        console.print(
            f"{when} [{colour}]{routing_key:<32}[/] {game:<24} {score:<8} "
            f"runner={ev.task_runner_id[-8:]} event={str(ev.event_id)[:8]}"
        )
        if ev.event == "game.final":
            self.finals[game] = d

    async def run(self, minutes: float | None) -> int:
        console.rule("[bold]taskmgr live demo")
        console.print(f"database {DEMO_DB} (fresh), RabbitMQ prefix {DEMO_PREFIX}, logs in {self.logdir}")
        await recreate_database(self.settings.database_url)
        service = TaskService(engine=(engine := make_engine(self.settings.database_url, name="taskmgr-demo")))
        # The accelerated clock: poll the box scores every second.
        await service.update_type("live_game", poll_interval_s=1.0)
        await service.update_type("period_score", poll_interval_s=1.0)
        await self.start("manager", "manager")
        await self.start("runner-1", "runner", "--pool", "default")
        await self.start("runner-2", "runner", "--pool", "default")
        # The recorder stores the events (the console's board reads them), the API serves
        # the console; a token of write scope for the demo's viewer.
        await self.start("recorder", "recorder")
        await self.start("api", "api")
        async with engine.begin() as conn:
            _, secret = await tokens.create_token(conn, DEMO_TOKEN, "write", created_by="demo")
        console.print(
            f"[bold]console:[/] http://127.0.0.1:{self.api_port}/  "
            f"(log in with the demo's API token: [bold]{secret}[/])"
        )
        if not self.sports.provider_urls:
            # The games start 15 s after the feed does, spread over --spread-s.
            await self.start(
                "feed",
                "feed",
                "--port",
                str(FEED_PORT),
                "--games",
                str(self.games),
                "--first-start-s",
                "15",
                "--spread-s",
                str(self.spread_s),
                "--period-s",
                str(self.period_s),
            )
            day = await feed_day(self.sports.feed_url)
            console.print(
                f"simulated feed on {self.sports.feed_url}: {self.games} games per provider, day {day}"
            )
        else:
            day = datetime.now(UTC).date()
        started = time.monotonic()
        deadline = started + minutes * 60 if minutes else None
        topo = Topology(DEMO_PREFIX)
        result = 1
        try:
            async with Consumer(
                url=self.settings.amqp_url, topology=topo, prefetch=500, name="demo"
            ) as consumer:

                async def handle(message: Any) -> None:
                    await message.ack()
                    self.on_event(message.routing_key, message.body)

                await consumer.consume_events("#", handle)
                n = await DailySchedule(service=service, settings=self.sports).run_once(day)
                console.print(
                    f"seeded {n} daily schedule tasks for {day}: the runners fetch each league's "
                    "schedule and write one game task per game"
                )
                last = 0.0
                while deadline is None or time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    for name, p in self.procs.items():
                        if p.returncode is not None:
                            raise RuntimeError(
                                f"{name} exited with {p.returncode}; see {self.logdir}/{name}.log"
                            )
                    if time.monotonic() - last >= STATUS_EVERY_S:
                        last = time.monotonic()
                        counts = await service.counts_by_state()
                        line = "  ".join(
                            f"{s.value.lower()}={counts.get(s, 0)}" for s in State if counts.get(s)
                        )
                        console.print(
                            f"[dim]-- {int(last - started):>3}s  tasks: {line}  finals: {len(self.finals)}[/]"
                        )
                    if result != 0 and await self.all_games_done(engine):
                        result = 0
                        if deadline is None:
                            console.print("every game ended; the console stays up until Ctrl-C")
                            continue
                        break
                await self.settle(engine)
        except KeyboardInterrupt:
            pass
        finally:
            await self.stop_all()
        await self.summary(engine, service, time.monotonic() - started)
        await engine.dispose()
        return result

    async def settle(self, engine: Any, timeout_s: float = 20.0) -> None:
        """Wait until the recorder stored every event the demo saw and nothing new came
        for a second (the last lifecycle events follow the last state changes)."""
        deadline = time.monotonic() + timeout_s
        last = (-1, -1)
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            async with engine.connect() as conn:
                self.stored, ids = await event_store.event_counts(conn)
            self.doubled = self.stored - ids
            now = (len(self.emitted), self.stored)
            if now == last and self.stored == len(self.emitted):
                return
            last = now

    async def all_games_done(self, engine: Any) -> bool:
        """Every game, period-score and schedule task has ended (stat corrections are
        due minutes after the final: the demo does not wait for them)."""
        async with engine.connect() as conn:
            rows = await store.counts_by_type_and_state(conn)
        games = sum(n for t, _, n in rows if t == "live_game")
        open_ = sum(
            n for t, s, n in rows if t in ("live_game", "period_score", "schedule") and not s.terminal
        )
        return games > 0 and open_ == 0

    async def summary(self, engine: Any, service: TaskService, elapsed: float) -> None:
        console.rule("[bold]summary")
        async with engine.connect() as conn:
            lateness = await store.lateness_ms(conn, datetime.now(UTC) - timedelta(days=1))
            by_type = await store.counts_by_type_and_state(conn)
        games = Table(title="games")
        for c in ("game", "final (away-home)"):
            games.add_column(c)
        for g, d in sorted(self.finals.items()):
            games.add_row(g, f"{d.get('away_score')}-{d.get('home_score')}")
        console.print(games)
        tasks = Table(title="tasks by type and state")
        for c in ("type", "state", "tasks"):
            tasks.add_column(c)
        for t, s, n in by_type:
            tasks.add_row(t, s.value, str(n))
        console.print(tasks)
        ev = Table(title="events by kind (distinct event ids)")
        ev.add_column("event")
        ev.add_column("count")
        for k, n in sorted(self.events.items()):
            ev.add_row(k, str(n))
        console.print(ev)
        console.print(
            f"events: {len(self.emitted)} distinct emitted (game and lifecycle), {self.stored} stored "
            f"by the recorder, {self.doubled} stored twice "
            f"({'equal' if self.stored == len(self.emitted) and not self.doubled else 'NOT EQUAL'})"
        )
        if lateness:
            q = statistics.quantiles(lateness, n=100) if len(lateness) > 1 else [lateness[0]] * 99
            console.print(
                f"dispatch lateness (due -> STARTED) over {len(lateness)} starts: "
                f"p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms"
            )
        console.print(
            f"elapsed {elapsed:.0f} s; logs in {self.logdir}; inspect with "
            f"TASKMGR_DATABASE_URL={self.settings.database_url} taskmgr tasks list"
        )
        # One line of JSON for scripts: never wrapped.
        totals = {
            "games_final": len(self.finals),
            "events": dict(self.events),
            "events_emitted": len(self.emitted),
            "events_stored": self.stored,
            "events_stored_twice": self.doubled,
        }
        console.print(json.dumps(totals), soft_wrap=True)


def _port_or_free(port: int) -> int:
    """`port` if nothing listens there, else a free one."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(
    settings: Settings,
    *,
    minutes: float | None,
    games: int,
    provider_urls: str,
    period_s: float = 8.0,
    spread_s: float = 45.0,
) -> int:
    demo = Demo(settings, games=games, provider_urls=provider_urls, period_s=period_s, spread_s=spread_s)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(demo.run(minutes))
    return 1
