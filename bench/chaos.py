"""`taskmgr bench chaos --minutes 5`: a game day under faults.

The simulated feed plays games on an accelerated clock while two managers and three
runners (running as their least-privilege roles) do the work and this harness injects
faults at random, from a printed seed so a run can be replayed: SIGKILL of a runner,
SIGKILL of the leading manager, the services' RabbitMQ connections closed, a PostgreSQL
restart, and bursts of API 5xx / timeouts / malformed bodies. A consumer records every
event. At the end the harness checks, against the feed's ground truth:

- every game has exactly one `game.final` event id, with the right final score;
- no event id was delivered with two different contents;
- every score emitted is one the game really had (no phantom scores), and the share of
  the feed's score changes that were observed is reported (a box-score poller cannot see
  a score that came and went between two polls, or while its runner was dead: the
  DESIGN's "every change emitted" holds only for changes slower than the poll interval);
- no game, period or schedule task is left STARTED or RUNNING, and every game task
  FINISHED;
- no (task, attempt) has two STARTED events.

It prints the faults and the invariants as JSON (`ok` false and a non-zero exit when an
invariant failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import httpx
from sqlalchemy import text

from bench._common import amqp_as, as_role, free_port
from manager.schedule_cron import ScheduleCron
from task_types.feed import feed_day
from taskmgr import store
from taskmgr.broker import Consumer, Topology
from taskmgr.db import make_engine
from taskmgr.messages import Event, decode_event
from taskmgr.migrate import recreate_database, with_database
from taskmgr.service import TaskService
from taskmgr.settings import Settings

KINDS = ("runner", "manager", "broker", "postgres", "api")
CHAOS_DB = "taskmgr_chaos"
RUNNERS = 3
MANAGERS = 2
PG_MAJOR = os.environ.get("TASKMGR_PG_MAJOR", "15")


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Harness:
    def __init__(self, settings: Settings, *, minutes: float, seed: int, kinds: tuple[str, ...]) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.minutes = minutes
        self.kinds = kinds
        self.db_url = with_database(settings.database_url, CHAOS_DB)
        self.prefix = f"chaos{seed}"
        self.feed_port = free_port()
        self.settings = settings.model_copy(
            update={
                "database_url": self.db_url,
                "amqp_prefix": self.prefix,
                "feed_url": f"http://127.0.0.1:{self.feed_port}",
                "schedule_lead_s": 0.0,
            }
        )
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.counter = 0
        self.events: list[tuple[str, Event]] = []
        self.faults: Counter[str] = Counter()
        self.fault_log: list[dict[str, Any]] = []

    # -- processes -------------------------------------------------------------------

    def env(self, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
        env.update(
            {
                # Runners hold no database credentials: theirs points nowhere.
                "TASKMGR_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:9/none"
                if role == "taskmgr_runner"
                else as_role(self.db_url, role),
                "TASKMGR_AMQP_URL": amqp_as(self.settings.amqp_url, role),
                "TASKMGR_AMQP_PREFIX": self.prefix,
                "TASKMGR_FEED_URL": self.settings.feed_url,
                "TASKMGR_POLL_INTERVAL": "0.3",
                "TASKMGR_RECOVERY_INTERVAL": "0.5",
                "TASKMGR_HEARTBEAT_INTERVAL": "0.5",
                "TASKMGR_RUNNER_DEAD_AFTER": "3",
                "TASKMGR_LEADER_RETRY": "0.5",
                "TASKMGR_LOG_LEVEL": "WARNING",
            }
        )
        return env

    async def spawn(self, kind: str, *args: str, role: str = "postgres") -> str:
        self.counter += 1
        name = f"{kind}-{self.counter}"
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskmgr.cli",
            *args,
            env=self.env(role),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return name

    async def stop_all(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                p.kill()
                await p.wait()

    def alive(self, kind: str) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith(kind + "-") and p.returncode is None]

    # -- faults ----------------------------------------------------------------------

    async def inject(self, kind: str, engine: Any) -> str:
        if kind == "runner":
            victim = self.rng.choice(self.alive("runner"))
            self.procs[victim].send_signal(signal.SIGKILL)
            await self.procs[victim].wait()
            await self.spawn("runner", "runner", role="taskmgr_runner")
            return f"SIGKILL {victim}"
        if kind == "manager":
            pid = await self.leader_pid(engine)
            victims = [n for n in self.alive("manager") if self.procs[n].pid == pid] or self.alive("manager")[
                :1
            ]
            self.procs[victims[0]].send_signal(signal.SIGKILL)
            await self.procs[victims[0]].wait()
            await self.spawn("manager", "manager", role="taskmgr_manager")
            return f"SIGKILL leader {victims[0]}"
        if kind == "broker":
            closed = await asyncio.to_thread(self.close_connections)
            return f"closed {closed} RabbitMQ connections"
        if kind == "postgres":
            await asyncio.to_thread(
                subprocess.run,
                ["pg_ctlcluster", "--skip-systemctl-redirect", PG_MAJOR, "main", "restart"],
                check=True,
                capture_output=True,
            )
            return "PostgreSQL restarted"
        rates = {"error_5xx": 0.3, "malformed": 0.15, "timeout": 0.05, "timeout_s": 2.0}
        await self.set_feed_faults(rates)
        await asyncio.sleep(self.rng.uniform(2, 5))
        await self.set_feed_faults({"error_5xx": 0.0, "malformed": 0.0, "timeout": 0.0})
        return f"API faults {rates}"

    def close_connections(self) -> int:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "user"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        n = 0
        for line in out.splitlines():
            pid, _, user = line.partition("\t")
            if user.strip() in ("taskmgr_manager", "taskmgr_runner"):
                r = subprocess.run(
                    ["rabbitmqctl", "-q", "close_connection", pid, "chaos"], capture_output=True, check=False
                )
                n += r.returncode == 0
        return n

    async def set_feed_faults(self, changes: dict[str, Any]) -> None:
        async with httpx.AsyncClient() as client:
            await client.post(f"{self.settings.feed_url}/_faults", json=changes)

    async def leader_pid(self, engine: Any) -> int | None:
        with contextlib.suppress(Exception):
            async with engine.connect() as conn:
                name = await store.leader_name(conn)
                return int(name.rsplit("-", 1)[1]) if name else None
        return None

    # -- the day -----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        window = self.minutes * 60
        await recreate_database(self.db_url)
        engine = make_engine(self.db_url, name="taskmgr-chaos")
        service = TaskService(engine=engine)
        for name in ("live_game", "period_score", "schedule"):
            await service.update_type(name, poll_interval_s=0.3, request_timeout_s=1.0)
        games = max(2, round(self.minutes * 2))
        period_s = 3.0
        spread = max(10.0, window - 60.0)
        feed = await self.spawn(
            "feed",
            "feed",
            "--port",
            str(self.feed_port),
            "--games",
            str(games),
            "--seed",
            str(self.seed),
            "--period-s",
            str(period_s),
            "--first-start-s",
            "5",
            "--spread-s",
            str(spread),
        )
        day = await feed_day(self.settings.feed_url)
        for _ in range(MANAGERS):
            await self.spawn("manager", "manager", role="taskmgr_manager")
        for _ in range(RUNNERS):
            await self.spawn("runner", "runner", role="taskmgr_runner")
        schedule = [k for k in self.kinds for _ in range(max(1, round(2 * self.minutes)))]
        self.rng.shuffle(schedule)
        gap = window / (len(schedule) + 1)
        log(
            f"seed {self.seed}: {games * 4} games over {window:.0f} s,"
            f" {len(schedule)} faults every {gap:.1f} s"
        )
        started = time.monotonic()
        try:
            async with Consumer(
                url=self.settings.amqp_url, topology=Topology(self.prefix), prefetch=1000, name="chaos"
            ) as consumer:

                async def on_event(m: Any) -> None:
                    await m.ack()
                    self.events.append((m.routing_key, decode_event(m.body)))

                await consumer.consume_events("#", on_event)
                await self.seed_day(service, day)
                for i, kind in enumerate(schedule):
                    await asyncio.sleep(max(0.0, started + gap * (i + 1) - time.monotonic()))
                    what = await self.inject(kind, engine)
                    self.faults[kind] += 1
                    self.fault_log.append(
                        {"t": round(time.monotonic() - started, 1), "kind": kind, "what": what}
                    )
                    log(what)
                log("faults done; waiting for the games to end")
                ended = await self.wait_done(engine, timeout=120 + games * 4 * 5)
                result = await self.check(engine, service, ended)
        finally:
            await self.stop_all()
            await engine.dispose()
            del feed
        return result

    async def seed_day(self, service: TaskService, day: Any) -> None:
        settings = self.settings.model_copy(update={"leagues": "nba:nba,espn:basketball/nba,mlb:mlb,nhl:nhl"})
        for _ in range(20):  # PostgreSQL may be restarting
            try:
                await ScheduleCron(service=service, settings=settings).run_once(day)
                return
            except Exception as exc:
                log(f"seeding failed ({exc}); again")
                await asyncio.sleep(1)

    async def truth(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.settings.feed_url}/_truth")).json()  # type: ignore[no-any-return]

    async def wait_done(self, engine: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                truth = await self.truth()
                if all(g["status"] in ("final", "postponed", "cancelled") for g in truth["games"]):
                    async with engine.connect() as conn:
                        open_ = (
                            await conn.execute(
                                text(
                                    "select count(*) from tasks t join task_state s on s.task_id = t.id"
                                    " where t.type in ('live_game', 'period_score', 'schedule')"
                                    " and s.state not in ('FINISHED', 'FAILED', 'CANCELLED')"
                                )
                            )
                        ).scalar_one()
                        games = (
                            await conn.execute(text("select count(*) from tasks where type = 'live_game'"))
                        ).scalar_one()
                    if games == len(truth["games"]) and open_ == 0:
                        return True
            await asyncio.sleep(1)
        return False

    async def check(self, engine: Any, service: TaskService, ended: bool) -> dict[str, Any]:
        truth = {g["game_id"]: g for g in (await self.truth())["games"]}
        inv: dict[str, dict[str, Any]] = {"all games ended in time": {"ok": ended}}
        finals: dict[str, set[Any]] = defaultdict(set)
        wrong_final: list[str] = []
        contents: dict[str, Any] = {}
        phantom: list[tuple[str, Any]] = []
        seen_scores: dict[str, set[tuple[Any, Any]]] = defaultdict(set)
        conflicting = 0
        for _, ev in self.events:
            key = str(ev.event_id)
            if contents.setdefault(key, ev.data) != ev.data:
                conflicting += 1
            gid = str(ev.data.get("game_id", ""))
            if gid not in truth:
                continue
            g = truth[gid]
            if ev.event == "game.final":
                finals[gid].add(ev.event_id)
                if (ev.data.get("home_score"), ev.data.get("away_score")) != (
                    g["final"]["home"],
                    g["final"]["away"],
                ):
                    wrong_final.append(gid)
            if ev.event == "score.changed":
                score = (ev.data.get("home_score"), ev.data.get("away_score"))
                real = {(c["home"], c["away"]) for c in g["score_changes"]} | {(0, 0)}
                if score not in real:
                    phantom.append((gid, score))
                seen_scores[gid].add(score)
        bad_finals = {g: len(finals.get(g, ())) for g in truth if len(finals.get(g, ())) != 1}
        inv["one game.final event id per game"] = {"ok": not bad_finals, "bad": bad_finals}
        inv["final scores match the feed"] = {"ok": not wrong_final, "bad": wrong_final}
        inv["no event id with two contents"] = {"ok": conflicting == 0, "conflicts": conflicting}
        inv["no phantom scores"] = {"ok": not phantom, "bad": phantom[:10]}
        total = sum(len(g["score_changes"]) for g in truth.values())
        observed = sum(
            len({(c["home"], c["away"]) for c in g["score_changes"]} & seen_scores[gid])
            for gid, g in truth.items()
        )
        inv["score changes observed"] = {
            "ok": True,
            "observed": observed,
            "of": total,
            "share": round(observed / total, 3) if total else 1.0,
        }
        async with engine.connect() as conn:
            stuck = (
                await conn.execute(
                    text(
                        "select count(*) from tasks t join task_state s on s.task_id = t.id"
                        " where t.type in ('live_game', 'period_score', 'schedule')"
                        " and s.state in ('STARTED', 'RUNNING')"
                    )
                )
            ).scalar_one()
            unfinished = (
                await conn.execute(
                    text(
                        "select count(*) from tasks t join task_state s on s.task_id = t.id"
                        " where t.type = 'live_game' and s.state <> 'FINISHED'"
                    )
                )
            ).scalar_one()
            double = (
                await conn.execute(
                    text(
                        "select count(*) from (select task_id, attempt from task_events"
                        " where state = 'STARTED'"
                        " group by 1, 2 having count(*) > 1) x"
                    )
                )
            ).scalar_one()
            counts = await service.counts_by_state()
        inv["nothing left STARTED or RUNNING"] = {"ok": stuck == 0, "stuck": stuck}
        inv["every game task FINISHED"] = {"ok": unfinished == 0, "unfinished": unfinished}
        inv["no attempt started twice"] = {"ok": double == 0, "doubles": double}
        ok = all(v["ok"] for v in inv.values())
        return {
            "seed": self.seed,
            "minutes": self.minutes,
            "games": len(truth),
            "events": len(self.events),
            "faults": dict(self.faults),
            "fault_log": self.fault_log,
            "tasks_by_state": {str(k): v for k, v in counts.items()},
            "invariants": inv,
            "ok": ok,
        }


async def main(
    settings: Settings, minutes: float = 5.0, seed: int | None = None, kinds: str = ",".join(KINDS)
) -> dict[str, Any]:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = set(chosen) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    return await Harness(settings, minutes=minutes, seed=seed, kinds=chosen).run()
