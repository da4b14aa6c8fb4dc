"""`taskmgr bench chaos --minutes 5`: a game day under faults.

The simulated feed plays games on an accelerated clock while two managers and three
runners (running as their least-privilege roles) do the work and this harness injects
faults at random, from a printed seed so a run can be replayed: SIGKILL of a runner,
SIGKILL of the leading manager, the services' RabbitMQ connections closed, a PostgreSQL
restart, bursts of API 5xx / timeouts / malformed bodies, the leader frozen (SIGSTOP)
for longer than the leadership bound, poison progress messages and start orders, a
RabbitMQ memory alarm that blocks every publisher for 40 s, a game answered with a gzip
bomb, and a game whose first score is taken back. A consumer records every
event. At the end the harness checks, against the feed's ground truth:

- every game has exactly one `game.final` event id, with the right final score;
- no event id was delivered with two different contents;
- every score emitted is one the game really had (no phantom scores), and the share of
  the feed's score changes that were observed is reported (a box-score poller cannot see
  a score that came and went between two polls, or while its runner was dead: the
  DESIGN's "every change emitted" holds only for changes slower than the poll interval);
- no game, period or schedule task is left STARTED or RUNNING, and every game task
  FINISHED;
- no (task, attempt) has two STARTED events;
- no runner or manager died but those the harness killed;
- every dead-lettered message is one the harness made poison;
- a game whose score was taken back ends, for consumers, on the corrected score;
- dispatch lateness p99 stays under 10 s outside the windows where no leader could act
  (a leader killed or frozen, PostgreSQL restarting, publishes blocked by the alarm).

It prints the faults and the invariants as JSON (`ok` false and a non-zero exit when an
invariant failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from sqlalchemy import text

from bench.chaos_checks import event_invariants, recorder_invariants, store_invariants
from task_types.daily import DailySchedule
from task_types.feed import feed_day
from task_types.settings import SportsSettings
from taskmgr import store
from taskmgr.broker import Consumer, Topology, delete_names
from taskmgr.connections import connect_once
from taskmgr.db import make_engine, with_database
from taskmgr.messages import Event, decode_event
from taskmgr.migrate import recreate_database
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from taskmgr.testing import amqp_as, as_role, free_port

KINDS = ("runner", "manager", "broker", "postgres", "api", "freeze", "poison", "alarm", "bomb", "reversal")
# How long the feed answers one game with a gzip bomb.
BOMB_S = 2.0
# How long the leader stays frozen: longer than the leadership bound (manager/leadership).
FREEZE_S = 20.0
# A RabbitMQ memory alarm this long (publishers blocked), longer than a runner's confirm
# timeout for a start message.
ALARM_S = 40.0
# Dispatch lateness the harness holds to, outside windows where no leader could exist.
LATENESS_P99_S = 10.0
# After a fault that can leave the cluster leaderless (a leader killed or frozen,
# PostgreSQL restarted), STARTED events within this are not held to LATENESS_P99_S.
LEADERLESS_GRACE_S = 25.0
CHAOS_DB = "taskmgr_chaos"
RUNNERS = 3
MANAGERS = 2
# The PostgreSQL cluster the `postgres` fault restarts (pg_ctlcluster VERSION NAME): it
# must be the one TASKMGR_DATABASE_URL points at. The RabbitMQ node that rabbitmqctl
# drives (alarm, closed connections) is RABBITMQ_NODENAME's, which rabbitmqctl honours
# (default: the local node); it must be the one TASKMGR_AMQP_URL points at.
PG_MAJOR = os.environ.get("TASKMGR_PG_MAJOR", "15")
PG_CLUSTER = os.environ.get("TASKMGR_PG_CLUSTER", "main")


def _watermark() -> str:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        float(out)
    except ValueError:
        return "0.4"  # RabbitMQ's default, when the setting is not a plain fraction
    return out


def _set_watermark(value: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "set_vm_memory_high_watermark", value], check=True)


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
            }
        )
        self.sports = SportsSettings(
            feed_url=f"http://127.0.0.1:{self.feed_port}",
            schedule_lead_s=0.0,
            schedule_cron="",
            leagues="nba:nba,espn:basketball/nba,mlb:mlb,nhl:nhl",
        )
        self.topology = Topology.from_settings(self.settings, stream=False)  # quorum on a cluster
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.counter = 0
        self.events: list[tuple[str, Event]] = []
        self.faults: Counter[str] = Counter()
        self.fault_log: list[dict[str, Any]] = []
        self.killed: set[str] = set()  # processes the harness killed on purpose
        self.poison: set[bytes] = set()  # bodies the harness made poison
        self.poison_sent = 0
        self.reversed: set[str] = set()  # games whose first score the feed takes back
        self.leaderless: list[tuple[float, float]] = []  # wall-clock windows (epoch s)
        self.background: set[asyncio.Task[Any]] = set()
        self.watermark: str | None = None  # RabbitMQ's, before the first alarm
        self.alarms_on = 0

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
                "TASKMGR_FEED_URL": self.sports.feed_url,
                "TASKMGR_POLL_INTERVAL": "0.3",
                "TASKMGR_RECOVERY_INTERVAL": "0.5",
                "TASKMGR_HEARTBEAT_INTERVAL": "0.5",
                "TASKMGR_RUNNER_DEAD_AFTER": "3",
                "TASKMGR_LEADER_RETRY": "0.5",
                "TASKMGR_LOG_LEVEL": "WARNING",
                "TASKMGR_SCHEDULE_CRON": "",  # the harness seeds the feed's day itself
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
            self.killed.add(victim)
            self.procs[victim].send_signal(signal.SIGKILL)
            await self.procs[victim].wait()
            await self.spawn("runner", "runner", role="taskmgr_runner")
            return f"SIGKILL {victim}"
        if kind == "manager":
            pid = await self.leader_pid(engine)
            victims = [n for n in self.alive("manager") if self.procs[n].pid == pid] or self.alive("manager")[
                :1
            ]
            self.killed.add(victims[0])
            self.leaderless.append((time.time(), time.time() + LEADERLESS_GRACE_S))
            self.procs[victims[0]].send_signal(signal.SIGKILL)
            await self.procs[victims[0]].wait()
            await self.spawn("manager", "manager", role="taskmgr_manager")
            return f"SIGKILL leader {victims[0]}"
        if kind == "broker":
            closed = await asyncio.to_thread(self.close_connections)
            return f"closed {closed} RabbitMQ connections"
        if kind == "freeze":
            return await self.freeze(engine)
        if kind == "bomb":
            gid = await self.a_game()
            await self.set_feed_faults({"bombs": [gid]})
            await asyncio.sleep(BOMB_S)
            await self.set_feed_faults({"bombs": []})
            return f"game {gid} answered with a gzip bomb for {BOMB_S:.0f} s"
        if kind == "reversal":
            gid = await self.a_game(unscored=True)
            if not gid:
                return "reversal: every game has scored already (nothing taken back)"
            self.reversed.add(gid)
            await self.set_feed_faults({"reversals": sorted(self.reversed)})
            return f"game {gid}: its first score is taken back"
        if kind == "poison":
            return await self.send_poison()
        if kind == "alarm":
            task = asyncio.create_task(self.alarm())
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            return f"RabbitMQ memory alarm for {ALARM_S:.0f} s"
        if kind == "postgres":
            self.leaderless.append((time.time(), time.time() + LEADERLESS_GRACE_S))
            await asyncio.to_thread(
                subprocess.run,
                ["pg_ctlcluster", "--skip-systemctl-redirect", PG_MAJOR, PG_CLUSTER, "restart"],
                check=True,
                capture_output=True,
            )
            return "PostgreSQL restarted"
        rates = {"error_5xx": 0.3, "malformed": 0.15, "timeout": 0.05, "timeout_s": 2.0}
        await self.set_feed_faults(rates)
        await asyncio.sleep(self.rng.uniform(2, 5))
        await self.set_feed_faults({"error_5xx": 0.0, "malformed": 0.0, "timeout": 0.0})
        return f"API faults {rates}"

    async def a_game(self, *, unscored: bool = False) -> str:
        """A game not over yet (any game if all are), chosen by the seeded generator.
        unscored: one whose first score is still to come, so taking it back changes no
        score the truth has already shown ("" when there is none)."""
        truth = await self.truth()
        now = truth["now"]
        games = truth["games"]
        live = [g["game_id"] for g in games if g["status"] != "final"] or [g["game_id"] for g in games]
        if unscored:
            live = [g["game_id"] for g in games if all(c["at"] > now for c in g["score_changes"])]
            if not live:
                return ""
        return str(self.rng.choice(sorted(live)))

    async def freeze(self, engine: Any) -> str:
        """SIGSTOP the leader for longer than the leadership bound, then SIGCONT: a
        standby must lead meanwhile, and the woken one must not act as leader."""
        pid = await self.leader_pid(engine)
        victims = [n for n in self.alive("manager") if self.procs[n].pid == pid]
        if not victims:
            return "freeze: no leader to freeze"
        proc = self.procs[victims[0]]
        started = time.time()
        self.leaderless.append((started, started + LEADERLESS_GRACE_S))
        proc.send_signal(signal.SIGSTOP)

        async def thaw() -> None:
            await asyncio.sleep(FREEZE_S)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)

        task = asyncio.create_task(thaw())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return f"SIGSTOP leader {victims[0]} for {FREEZE_S:.0f} s"

    async def send_poison(self) -> str:
        """Malformed and out-of-range progress messages (as a runner) and start orders (as
        the manager, the only user that may send them): each must be dead-lettered
        without stalling anything."""
        import aio_pika

        now = "2026-11-24T12:00:00+00:00"
        tid = str(uuid.UUID(int=self.rng.getrandbits(128)))

        def reports(**report: Any) -> bytes:
            one = {"task_id": tid, "attempt": 1, "status": "running", "at": now, **report}
            return json.dumps(
                {"kind": "reports", "runner_id": "r", "pool": "default", "reports": [one]}
            ).encode()

        progress = [
            b"{not json",
            json.dumps(
                {"kind": "heartbeat", "runner_id": "r", "pool": "default", "at": now, "pid": 2**40}
            ).encode(),
            reports(attempt=2**31),
            reports(detail={"e": "\x00"}),
        ]
        starts = [b'{"kind": "start", "orders": "none"}', b"\x00\x01binary"]
        topo = Topology(self.prefix)
        sent = 0
        for user, exchange, key, bodies in (
            ("taskmgr_runner", topo.reports, "", progress),
            ("taskmgr_manager", topo.start, "default", starts),
        ):
            conn = await connect_once(amqp_as(self.settings.amqp_url, user))
            try:
                ch = await conn.channel(publisher_confirms=True)
                ex = await ch.get_exchange(exchange, ensure=False)
                for body in bodies:
                    self.poison.add(body)
                    self.poison_sent += 1
                    await ex.publish(aio_pika.Message(body, user_id=user), routing_key=key)
                    sent += 1
            finally:
                await conn.close()
        return f"{sent} poison messages"

    async def alarm(self) -> None:
        """A memory alarm: every publisher blocks until it clears. Dispatch waits for
        its publishes, so the window is not held to the lateness bound either."""
        if self.watermark is None:
            self.watermark = await asyncio.to_thread(_watermark)
        started = time.time()
        self.leaderless.append((started, started + ALARM_S + LEADERLESS_GRACE_S))
        self.alarms_on += 1
        await asyncio.to_thread(_set_watermark, "0.000001")
        try:
            await asyncio.sleep(ALARM_S)
        finally:
            self.alarms_on -= 1
            if self.alarms_on == 0:  # overlapping alarms: the last one clears it
                await asyncio.to_thread(_set_watermark, self.watermark)

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
            await client.post(f"{self.sports.feed_url}/_faults", json=changes)

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
        # A run with the same seed before (its prefix) may have left messages behind.
        await delete_names(self.settings.amqp_url, Topology(self.prefix), pools=("default",))
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
        day = await feed_day(self.sports.feed_url)
        for _ in range(MANAGERS):
            await self.spawn("manager", "manager", role="taskmgr_manager")
        for _ in range(RUNNERS):
            await self.spawn("runner", "runner", role="taskmgr_runner")
        await self.spawn("recorder", "recorder", role="taskmgr_manager")
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
                url=self.settings.amqp_url, topology=self.topology, prefetch=1000, name="chaos"
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
                if self.background:  # a thaw or an alarm still under way
                    await asyncio.gather(*self.background)
                ended = await self.wait_done(engine, timeout=120 + games * 4 * 5)
                died = [
                    n
                    for n, p in self.procs.items()
                    if n.split("-")[0] in ("runner", "manager", "recorder")
                    and n not in self.killed
                    and p.returncode is not None
                ]
                result = await self.check(engine, service, ended, died)
        finally:
            for task in list(self.background):
                task.cancel()
            await asyncio.gather(*self.background, return_exceptions=True)
            if self.watermark is not None:  # never leave the broker in an alarm
                await asyncio.to_thread(_set_watermark, self.watermark)
            for p in self.procs.values():  # nothing is left frozen
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGCONT)
            await self.stop_all()
            await engine.dispose()
            with contextlib.suppress(Exception):
                await delete_names(self.settings.amqp_url, Topology(self.prefix), pools=("default",))
            del feed
        return result

    async def seed_day(self, service: TaskService, day: Any) -> None:
        for _ in range(20):  # PostgreSQL may be restarting
            try:
                await DailySchedule(service=service, settings=self.sports).run_once(day)
                return
            except Exception as exc:
                log(f"seeding failed ({exc}); again")
                await asyncio.sleep(1)

    async def truth(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.sports.feed_url}/_truth")).json()  # type: ignore[no-any-return]

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

    async def dead_letters(self) -> tuple[list[bytes], int]:
        """Everything in the dead-letter queue (read as the development user), but the
        start orders that expired unread (their start timeout passed: recovery has
        dispatched those tasks again), which are counted."""
        bodies: list[bytes] = []
        expired = 0
        conn = await connect_once(self.settings.amqp_url)
        try:
            ch = await conn.channel()
            queue = await ch.get_queue(Topology(self.prefix).dead, ensure=False)
            while (m := await queue.get(fail=False, no_ack=True)) is not None:
                deaths = m.headers.get("x-death") or [{}]
                if isinstance(deaths, list) and deaths and deaths[0].get("reason") == "expired":  # type: ignore[union-attr]
                    expired += 1
                else:
                    bodies.append(m.body)
        finally:
            await conn.close()
        return bodies, expired

    async def lateness(self, engine: Any) -> tuple[float, int, int]:
        """p99 dispatch lateness (s) of the starts outside leaderless windows, and how
        many starts were held to it and how many were not."""
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "select extract(epoch from time) as at,"
                        " (detail->>'lateness_ms')::float / 1000 as late_s"
                        " from task_events where state = 'STARTED' and detail ? 'lateness_ms'"
                    )
                )
            ).all()
        held = sorted(r.late_s for r in rows if not any(a <= r.at <= b for a, b in self.leaderless))
        p99 = held[min(len(held) - 1, int(len(held) * 0.99))] if held else 0.0
        return p99, len(held), len(rows) - len(held)

    async def check(self, engine: Any, service: TaskService, ended: bool, died: list[str]) -> dict[str, Any]:
        truth = {g["game_id"]: g for g in (await self.truth())["games"]}
        inv: dict[str, dict[str, Any]] = {"all games ended in time": {"ok": ended}}
        inv["no process died but those the harness killed"] = {"ok": not died, "died": died}
        dead, expired = await self.dead_letters()
        unexpected = [b[:200].decode(errors="replace") for b in dead if b not in self.poison]
        inv["every dead letter is one the harness made poison"] = {
            "ok": not unexpected,
            "dead_letters": len(dead),
            "expired_start_orders": expired,
            "poison_sent": self.poison_sent,
            "unexpected": unexpected[:5],
        }
        p99, held, excused = await self.lateness(engine)
        inv[f"dispatch lateness p99 under {LATENESS_P99_S:.0f} s outside leaderless windows"] = {
            "ok": p99 < LATENESS_P99_S,
            "p99_s": round(p99, 3),
            "starts": held,
            "starts_in_leaderless_windows": excused,
        }
        inv.update(event_invariants(self.events, truth, self.reversed))
        inv.update(await store_invariants(engine))
        inv.update(await recorder_invariants(engine, self.events))
        counts = await service.counts_by_state()
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
    settings: Settings, minutes: float = 5.0, seed: int | None = None, kinds: str = "all"
) -> dict[str, Any]:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    chosen = KINDS if kinds.strip() == "all" else tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = set(chosen) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    return await Harness(settings, minutes=minutes, seed=seed, kinds=chosen).run()
