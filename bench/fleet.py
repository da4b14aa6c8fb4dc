"""`taskmgr bench fleet --runners 3 --pollers 10000 --interval 30`: a fleet of runner
processes, one SIGKILLed: how long until its tasks are back, on the others.

What runs where (separate OS processes, on whatever TASKMGR_AMQP_URL and
TASKMGR_DATABASE_URL name: the cluster harness's lists, or the single services):

- the box-score server (`python -m bench.boxserver --etag --min-gap interval/2`): a live
  NBA box score for any game id, 304 to a matching ETag; it counts the polls that come
  less than half an interval after the previous poll of the same game (two pollers of
  one game) and tells how many games were polled since a time;
- one manager and `--runners` runners (`python -m taskmgr.cli manager|runner`), the
  runners with room for the whole load on one fewer of them, and 10% more
  (TASKMGR_CONCURRENCY = 1.1 x pollers x runners / (runners - 1));
- this process schedules runners x pollers `live_game` tasks (NBA, one game id each, the
  type's interval set to --interval), due now, and waits until all are RUNNING.

Then: polls/s over one interval (the server's count) and each runner's RSS; the runner
holding the most tasks is SIGKILLed at t0; `handover_running_s` = t0 until every task is
RUNNING on a live runner again (the manager declares the runner dead after
TASKMGR_RUNNER_DEAD_AFTER and dispatches its tasks again); `handover_polled_s` = t0
until every game has been polled since t0; `close_repeats` = polls of a game within half
an interval of its previous one, from t0 to the end of the hand-over plus one interval
(a poller running twice). Then a new runner starts and --rebalance-tasks more tasks are
scheduled: `rebalance` says how many of them the new, empty runner took (new dispatches
go to the runners with the most free room first: each runner's start consumer has a
priority from its free room, runners/runner.py).

Through the cluster harness: `eval "$(scripts/cluster env)"` first (TASKMGR_AMQP_URL and
TASKMGR_DATABASE_URL then list the nodes; quorum queues follow from the node list).
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from typing import Any

import httpx
from sqlalchemy import text

from bench._common import Procs, child_env, fresh_database, log, machine, new_prefix, rss_mb
from taskmgr import broker
from taskmgr.db import make_engine
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from taskmgr.testing import free_port

DB = "taskmgr_bench_fleet"
POOL = "default"  # live_game's pool (sql/0002)
SCHEDULE_BATCH = 5000
RUNNING_TIMEOUT_S = 600.0
# Each runner has room for this share more than the whole load on one runner fewer: a full
# runner cannot take the last orders of a hand-over (they wait for their start timeout).
HEADROOM = 1.1


def _log(msg: str) -> None:
    log("fleet", msg)


async def _schedule(service: TaskService, first: int, n: int) -> None:
    for start in range(first, first + n, SCHEDULE_BATCH):
        tasks = [
            NewTask("live_game", {"provider": "nba", "league": "nba", "game_id": f"00{i:08d}"})
            for i in range(start, min(first + n, start + SCHEDULE_BATCH))
        ]
        async with service.session() as session, session.begin():
            await service.schedule_many(session, tasks)


async def _running_by_runner(engine: Any) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "select s.runner_id, count(*) from task_state s join runners r on r.id = s.runner_id"
                " where s.state = 'RUNNING' and not r.dead group by 1"
            )
        )
        return {r[0]: int(r[1]) for r in rows}


async def _runner_pids(engine: Any) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("select id, pid from runners where not dead"))
        return {r[0]: int(r[1]) for r in rows if r[1] is not None}


async def _until(what: str, check: Any, timeout: float, every: float = 0.5) -> float:
    """Seconds until `check()` is true (TimeoutError naming `what` after `timeout`)."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)
    return time.monotonic() - t0


async def main(
    settings: Settings,
    runners: int = 3,
    pollers: int = 10000,
    interval: float = 30.0,
    rebalance_tasks: int = 1000,
    **_: Any,
) -> dict[str, Any]:
    if runners < 2:
        raise ValueError("--runners: at least 2 (one is killed)")
    total = runners * pollers
    procs = Procs("fleet")
    prefix = new_prefix()
    url = await fresh_database(settings, DB)
    engine = make_engine(url, pool_size=2, name="taskmgr-bench-fleet")
    service = TaskService(engine=engine)
    http_port = free_port()
    box = f"http://127.0.0.1:{http_port}"
    client = httpx.AsyncClient(timeout=30)
    try:
        server = procs.start(
            ["-m", "bench.boxserver", "--port", str(http_port), "--etag", "--min-gap", str(interval / 2)],
            child_env(settings, url, prefix),
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None
        if (await asyncio.to_thread(server.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the box-score server did not start")
        env = child_env(
            settings,
            url,
            prefix,
            TASKMGR_FEED_URL=box,
            TASKMGR_PROVIDER_URLS="",
            TASKMGR_CONCURRENCY=math.ceil(HEADROOM * total / (runners - 1)),
            TASKMGR_POOL=POOL,
            TASKMGR_SCHEDULE_CRON="",  # no schedule tasks of the leagues: only the fleet's
        )
        await service.update_type("live_game", poll_interval_s=interval)
        procs.start(["-m", "taskmgr.cli", "manager"], env)
        fleet = [procs.start(["-m", "taskmgr.cli", "runner", "--pool", POOL], env) for _ in range(runners)]
        t0 = time.monotonic()
        await _schedule(service, 0, total)
        _log(f"{total} tasks scheduled in {time.monotonic() - t0:.1f} s; waiting until all are RUNNING")

        async def all_running() -> bool:
            return sum((await _running_by_runner(engine)).values()) >= total

        warm_s = await _until("all RUNNING", all_running, RUNNING_TIMEOUT_S)
        spread = await _running_by_runner(engine)
        _log(f"all {total} RUNNING after {warm_s:.1f} s: {spread}")
        await asyncio.sleep(interval)  # every poller past its first tick
        s0 = (await client.get(f"{box}/_stats")).json()
        w0 = time.monotonic()
        await asyncio.sleep(interval)
        s1 = (await client.get(f"{box}/_stats")).json()
        polls_per_s = (s1["requests"] - s0["requests"]) / (time.monotonic() - w0)
        pids = await _runner_pids(engine)
        rss = {rid: rss_mb(pid) for rid, pid in pids.items()}

        victim_id = max(spread, key=lambda r: spread[r])
        victim = next(p for p in fleet if p.pid == pids.get(victim_id))
        killed_at = time.time()
        k0 = time.monotonic()
        victim.kill()
        _log(f"SIGKILL runner {victim_id} (pid {victim.pid}, {spread[victim_id]} tasks)")

        async def back_running() -> bool:
            now = await _running_by_runner(engine)
            return victim_id not in now and sum(now.values()) >= total

        async def back_polled() -> bool:
            r = await client.get(f"{box}/_polled", params={"since": str(killed_at)})
            return int(r.json()["games"]) >= total

        running_s = await _until("hand-over (RUNNING)", back_running, RUNNING_TIMEOUT_S)
        await _until("hand-over (polled)", back_polled, RUNNING_TIMEOUT_S)
        polled_s = time.monotonic() - k0
        await asyncio.sleep(interval)
        s2 = (await client.get(f"{box}/_stats")).json()
        after = await _running_by_runner(engine)
        _log(f"hand-over: RUNNING again after {running_s:.1f} s, all polled after {polled_s:.1f} s: {after}")

        # Rebalance: an empty runner joins, then more tasks come.
        before_new = set(after)
        fleet.append(procs.start(["-m", "taskmgr.cli", "runner", "--pool", POOL], env))

        async def joined() -> bool:
            return len(set(await _runner_pids(engine)) - before_new - {victim_id}) >= 1

        await _until("the new runner's first heartbeat", joined, 60)
        await _schedule(service, total, rebalance_tasks)

        async def all_again() -> bool:
            return sum((await _running_by_runner(engine)).values()) >= total + rebalance_tasks

        await _until("the new tasks RUNNING", all_again, RUNNING_TIMEOUT_S)
        final = await _running_by_runner(engine)
        new_ids = set(final) - before_new
        took = sum(final[r] for r in new_ids)
        result: dict[str, Any] = {
            "benchmark": "fleet",
            "where": "manager and runner subprocesses (taskmgr.cli) and a box-score server subprocess "
            "(bench.boxserver); TASKMGR_AMQP_URL "
            + ("lists several nodes" if "," in settings.amqp_url else "is one node")
            + ", TASKMGR_DATABASE_URL "
            + ("lists several hosts" if "," in settings.database_url else "is one host"),
            "machine": machine(),
            "runners": runners,
            "pollers_per_runner": pollers,
            "interval_s": interval,
            "all_running_after_s": round(warm_s, 1),
            "spread_before": sorted(spread.values()),
            "polls_per_s": round(polls_per_s, 1),
            "expected_polls_per_s": round(total / interval, 1),
            "rss_mb_per_runner": sorted(rss.values()),
            "killed_runner_tasks": spread[victim_id],
            "handover_running_s": round(running_s, 1),
            "handover_polled_s": round(polled_s, 1),
            "close_repeats_during_handover": s2["close_repeats"] - s1["close_repeats"],
            "close_repeats_before_kill": s1["close_repeats"],
            "spread_after_handover": sorted(after.values()),
            "rebalance": {"new_tasks": rebalance_tasks, "taken_by_the_new_runner": took},
            "spread_at_end": sorted(final.values()),
        }
        return result
    finally:
        await client.aclose()
        await procs.stop_all()
        await engine.dispose()
        try:
            await broker.delete_names(settings.amqp_url, broker.Topology(prefix), [POOL])
        except Exception as exc:
            _log(f"could not delete the queues of {prefix}: {exc!r}")
