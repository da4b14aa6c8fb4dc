# ruff: noqa: ASYNC110
"""`taskmgr bench lifecycle --rate R --minutes M [--find-max] [--vs taskiq,procrastinate]`:
tasks created at a steady rate, each through its whole life: created (TaskService, as
clients do), claimed and sent, taken by a runner process, RUNNING, one poll of a local
server, FINISHED; one task in ten files a follow-on task that lives the same life.

What runs where (separate OS processes, one 2-core machine with PostgreSQL and RabbitMQ):

- this process: the database `taskmgr_bench_lifecycle` (made anew) and the RabbitMQ
  prefix `bench<random>`; task types `bench_life` and `bench_life_next` (handler `noop`:
  one GET, then FINISHED; a payload's `then` names its follow-on), pool `benchlife`; it
  creates the tasks, due at once, `rate x 0.1` per transaction every 100 ms with
  TaskService.schedule_many (every tenth with a follow-on);
- a box server (`python -m bench.boxserver`): GET /life/{i} keeps each name's first
  request time;
- one manager (`python -m taskmgr.cli manager`) and `--runners` runners (`python -m
  taskmgr.cli runner --pool benchlife`).

Per step (a rate held for a window): the tasks created in the window, roots and
follow-ons, are followed to the end (the step waits for them after the window).
`lateness_started_ms` = the STARTED event's time - due; `lateness_first_poll_ms` = the
box server's first request for the task - due; `intake_lag_running_ms` /
`intake_lag_finished_ms` = the RUNNING / FINISHED event's time (the intake batch's clock,
taken as its transaction begins) - the report's `at` (the runner's clock as it queued
the report); `finished_per_s` = FINISHED events in the window / its seconds; CPU of each
process (and of all PostgreSQL and RabbitMQ processes) over the window, per task
finished in it; PostgreSQL's WAL bytes, transactions and rows per task; RSS at the end.
A step is `held` when every task of the window finished, at least 97 % of the rate was
created, and both p99 lateness figures are under 1 s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg
import httpx

from bench import lifecycle_pg, peer_env
from bench._common import Procs, child_env, fresh_database, machine, new_prefix
from bench.lifecycle_common import (
    BACKLOG_S,
    DRAIN_S,
    FOLLOW_EVERY,
    CpuWindow,
    TaskTimes,
    _log,
    cpu_figures,
    figures,
    paced,
    tree_rss,
)
from bench.lifecycle_common import (
    find_max as search_max,
)
from taskmgr import broker, store
from taskmgr.db import make_engine
from taskmgr.errors import InvalidInput
from taskmgr.migrate import asyncpg_dsn, with_database
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from taskmgr.testing import free_port, wait_for

DB = "taskmgr_bench_lifecycle"
POOL = "benchlife"
TYPE, NEXT = "bench_life", "bench_life_next"
WARMUP = 20
PROFILE_S = 20.0
PEERS = ("taskiq", "procrastinate")


class TaskmgrLifecycle:
    name = "taskmgr"

    def __init__(self, settings: Settings, runners: int, statements: bool, profile: str | None) -> None:
        self.settings = settings
        self.runners = runners
        self.want_statements = statements
        self.profile = profile
        self.procs = Procs("lifecycle")
        self.prefix = new_prefix()
        self.port = free_port()
        self.box = f"http://127.0.0.1:{self.port}"
        self.next_index = 0
        self.http = httpx.AsyncClient(timeout=60)

    async def open(self) -> None:
        url = await fresh_database(self.settings, DB)
        self.dsn = asyncpg_dsn(url)
        self.pg = await asyncpg.connect(self.dsn)
        self.statements = lifecycle_pg.Statements(
            asyncpg_dsn(with_database(self.settings.database_url, "postgres")), DB
        )
        if self.want_statements:
            await self.statements.setup(self.pg)
        self.engine = make_engine(url, pool_size=2, name="taskmgr-bench-lifecycle")
        self.svc = TaskService(engine=self.engine)
        common = {
            "pool": POOL,
            "handler": "noop",
            "url_template": self.box + "/life/{i}",
            "start_timeout_s": 300,
            "poll_interval_s": 5,
        }
        await self.svc.create_type({"name": TYPE, **common})
        await self.svc.create_type({"name": NEXT, **common})
        env = child_env(
            self.settings,
            url,
            self.prefix,
            TASKMGR_POOL=POOL,
            TASKMGR_ALLOWED_HOSTS=f"127.0.0.1:{self.port}",
            TASKMGR_SCHEDULE_CRON="",  # no schedule tasks of the leagues: only the bench's
        )
        server = self.procs.start(
            ["-m", "bench.boxserver", "--port", str(self.port)], env, stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        if (await asyncio.to_thread(server.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the box server did not start")
        self.server = server
        self.manager = self.procs.start(["-m", "taskmgr.cli", "manager"], env)
        self.fleet = [
            self.procs.start(["-m", "taskmgr.cli", "runner", "--pool", POOL], env)
            for _ in range(self.runners)
        ]

        async def leads() -> bool:
            async with self.engine.connect() as conn:
                return await store.leader_present(conn)

        await wait_for(leads, 60, "the manager to lead", every=0.2)
        await self._create(0, WARMUP)
        await wait_for(lambda: self._unfinished_zero(), 60, "the warm-up tasks to finish", every=0.2)
        _log(f"manager and {self.runners} runners warm (database {DB}, prefix {self.prefix})")

    async def close(self) -> None:
        await self.procs.stop_all()
        await self.http.aclose()
        if hasattr(self, "engine"):
            await self.engine.dispose()
        if hasattr(self, "pg"):
            await self.pg.close()
        if self.want_statements and self.statements.how:
            await self.statements.teardown()
        try:
            await broker.delete_names(self.settings.amqp_url, broker.Topology(self.prefix), [POOL])
        except Exception as exc:
            _log(f"could not delete the queues of {self.prefix}: {exc!r}")

    async def _create(self, first: int, n: int) -> None:
        base = self.next_index
        self.next_index += n
        rows = []
        for i in range(base, base + n):
            payload: dict[str, Any] = {"i": str(i)}
            if i % FOLLOW_EVERY == 0:
                payload["then"] = {"type": NEXT, "payload": {"i": f"f{i}"}}
            rows.append(NewTask(TYPE, payload))
        async with self.engine.begin() as conn:
            await self.svc.schedule_many(conn, rows)

    async def _unfinished_zero(self) -> bool:
        return await self._unfinished() == 0

    async def _unfinished(self) -> int:
        return int(
            await self.pg.fetchval(
                "select count(*) from task_state s join tasks t on t.id = s.task_id"
                " where s.state not in ('FINISHED', 'FAILED', 'CANCELLED') and t.type in ($1, $2)",
                TYPE,
                NEXT,
            )
        )

    def pids(self) -> dict[str, list[int]]:
        return {
            "manager": [self.manager.pid],
            "runners": [p.pid for p in self.fleet],
            "box_server": [self.server.pid],
        }

    async def step(self, rate: float, seconds: float) -> dict[str, Any]:
        _log(f"taskmgr: {rate:.0f} tasks/s for {seconds:.0f} s")
        if self.want_statements:
            await self.statements.start(self.pg)
        pg_before = await lifecycle_pg.counters(self.pg)
        cpu = CpuWindow(self.pids())
        spy = self._profile(seconds) if self.profile else []
        a = time.time()
        created = await paced(rate, seconds, self._create)
        b = time.time()
        spent = cpu.spent()
        rss = {
            "manager": tree_rss(self.manager.pid),
            "runners": [tree_rss(p.pid) for p in self.fleet],
            "box_server": tree_rss(self.server.pid),
        }
        finished_in_window = int(
            await self.pg.fetchval(
                "select count(*) from task_events where state = 'FINISHED' and time >= to_timestamp($1)"
                " and time < to_timestamp($2)",
                a,
                b,
            )
        )
        pg = await lifecycle_pg.spent(self.pg, pg_before, finished_in_window)
        statements = await self.statements.stop(self.pg, finished_in_window) if self.want_statements else None
        for p in spy:
            await asyncio.to_thread(p.wait)
        t_drain = time.monotonic()
        while (left := await self._unfinished()) and time.monotonic() - t_drain < DRAIN_S:
            await asyncio.sleep(0.5)
        drain_s = time.monotonic() - t_drain
        tasks, lags = await self._times(a, b)
        out = figures(rate, created, (a, b), tasks, finished_in_window, lags)
        out["drain_s"] = round(drain_s, 1)
        out.update(cpu_figures(spent, b - a, finished_in_window))
        out["rss_mb"] = rss
        out["postgres"] = pg
        if statements is not None:
            out["statements"] = statements
        if left:
            # The step failed; its backlog must clear before the next step (not measured).
            t1 = time.monotonic()
            while (left := await self._unfinished()) and time.monotonic() - t1 < BACKLOG_S:
                await asyncio.sleep(1.0)
            out["backlog_cleared_after_s"] = None if left else round(DRAIN_S + time.monotonic() - t1, 1)
            if left:
                out["aborted"] = f"{left} tasks unfinished {DRAIN_S + BACKLOG_S:.0f} s after the window"
        await asyncio.sleep(2.0)
        _log(
            f"taskmgr {rate:.0f}/s: created {out['created_per_s']}/s, finished {out['finished_per_s']}/s, "
            f"late STARTED p99 {out['lateness_started_ms']['p99']} ms, first poll p99 "
            f"{out['lateness_first_poll_ms']['p99']} ms, held {out['held']}"
        )
        return out

    def _profile(self, seconds: float) -> list[subprocess.Popen[bytes]]:
        assert self.profile is not None
        os.makedirs(self.profile, exist_ok=True)
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        targets = [("manager", self.manager.pid)] + [(f"runner{i}", p.pid) for i, p in enumerate(self.fleet)]
        return [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "100",
                    "-d",
                    str(int(min(PROFILE_S, seconds))),
                    "--format",
                    "raw",
                    "-o",
                    os.path.join(self.profile, f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in targets
        ]

    async def _times(self, a: float, b: float) -> tuple[list[TaskTimes], dict[str, list[float]]]:
        """Each task created in [a, b): its due time, STARTED, first poll, FINISHED; the
        intake lags of its RUNNING and FINISHED reports."""
        rows = await self.pg.fetch(
            "select t.id, t.payload->>'i' as name, extract(epoch from t.due_at)::float8 as due"
            " from tasks t where t.created_at >= to_timestamp($1) and t.created_at < to_timestamp($2)",
            a,
            b,
        )
        by_id = {r["id"]: TaskTimes(r["due"]) for r in rows}
        names = {r["name"]: by_id[r["id"]] for r in rows}
        lag_running: list[float] = []
        lag_finished: list[float] = []
        events = await self.pg.fetch(
            "select task_id, state, extract(epoch from time)::float8 as at,"
            " extract(epoch from (detail->>'at')::timestamptz)::float8 as sent"
            " from task_events where time >= to_timestamp($1) and applied"
            " and state in ('STARTED', 'RUNNING', 'FINISHED')",
            a,
        )
        for e in events:
            t = by_id.get(e["task_id"])
            if t is None:
                continue
            if e["state"] == "STARTED":
                t.started = e["at"] if t.started is None else min(t.started, e["at"])
            elif e["state"] == "RUNNING":
                lag_running.append((e["at"] - e["sent"]) * 1000)
            else:
                t.finished = e["at"]
                lag_finished.append((e["at"] - e["sent"]) * 1000)
        first = (await self.http.get(self.box + "/_life")).json()
        for name, at in first.items():
            if name in names:
                names[name].first_poll = at
        return list(by_id.values()), {
            "intake_lag_running_ms": lag_running,
            "intake_lag_finished_ms": lag_finished,
        }


async def main(
    settings: Settings,
    rate: float = 1000.0,
    minutes: float = 1.0,
    find_max: bool = False,
    vs: str = "",
    runners: int = 2,
    statements: bool = False,
    profile: str | None = None,
    max_steps: int = 8,
    **_: Any,
) -> dict[str, Any]:
    peers = [p.strip() for p in vs.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise InvalidInput(
            "--vs", f"no lifecycle driver for {', '.join(unknown)} (known: {', '.join(PEERS)})"
        )
    if rate <= 0 or minutes <= 0:
        raise InvalidInput("--rate/--minutes", "must be positive")
    # Before anything is measured, and before bench.peers_lifecycle imports them.
    installed = peer_env.ensure(peers)
    from bench import peers_lifecycle

    seconds = minutes * 60
    result: dict[str, Any] = {
        "benchmark": "lifecycle",
        "machine": machine(),
        "where": "this process creates (TaskService.schedule_many, a batch every 100 ms); a manager and "
        f"{runners} runner subprocesses (taskmgr.cli), a box server subprocess (bench.boxserver); "
        "PostgreSQL and RabbitMQ on the same machine",
        "follow_on_every": FOLLOW_EVERY,
    }
    if installed:
        result["installed"] = installed
    own = TaskmgrLifecycle(settings, runners, statements, profile)
    try:
        await own.open()
        if find_max:
            result["taskmgr"] = await search_max(own, rate, seconds, max_steps)
        else:
            result["taskmgr"] = await own.step(rate, seconds)
    finally:
        await own.close()
    for name in peers:
        try:
            async with peers_lifecycle.system(name, settings) as peer:
                if find_max:
                    result[name] = await search_max(peer, min(rate, 500.0), seconds, max_steps)
                else:
                    result[name] = await peer.step(rate, seconds)
        except Exception as exc:
            _log(f"peer {name} failed: {exc!r}")
            result[name] = {"error": repr(exc)}
    if peers:
        result["ratios"] = _ratios(result, peers, find_max)
    return result


def _ratios(result: dict[str, Any], peers: list[str], searched: bool) -> dict[str, Any]:
    key = "max_rate_held" if searched else "finished_per_s"
    own = result["taskmgr"].get(key)
    return {f"taskmgr/{p}": round(own / result[p][key], 2) for p in peers if own and result[p].get(key)} | {
        "of": key
    }
