"""`taskmgr bench upkeep --finished 1000000`: do the manager's periodic jobs cost the
same with a million finished tasks stored as with none (tables that stay small)?

Everything runs in this process against its own database `taskmgr_bench_upkeep` (dropped
with force and made anew) and RabbitMQ prefix `bench<random>`:

1. the same live work in both phases: `--active` (1,000) tasks dispatched and left
   STARTED (sent, never taken: no runner consumes the pool), every type's start timeout
   an hour and the bench type's max_runtime_s a day, so that recovery finds nothing to
   do: its scans read what is overdue (sent orders older than the smallest start
   timeout, active tasks older than the smallest max runtime), which is work, not what
   is stored;
2. with no finished task, each periodic job of the leader `--runs` times (after 2
   warm-up runs), median ms:
   - dispatch: `Dispatcher.poll_once()` with `--due` (100) tasks due (claim, STARTED
     events, publish with confirms, mark sent; the tasks are deleted again afterwards, so
     the live set stays the same);
   - lifecycle: `LifecycleRelay.run_once()`, publishing the poll's STARTED events;
   - relay: `Dispatcher.relay_once()` (the outbox, nothing left in it);
   - recovery: `Recovery.run_once()` (dead runners, start timeouts, expiries);
   - gauges: `Upkeep.refresh_gauges()` (fold the counts' deltas, read them);
   - retention: `Retention.run_once()` of task_events and emitted_events (no chunk is
     old enough) and `Upkeep.prune_once()` (no task ended before the retention);
   - and, for comparison, the count the gauges used to run (`upkeep.counts_by_state`:
     every task stored, grouped by state);
3. `--finished` tasks FINISHED within the last 20 days (inside the retention), written
   server-side with generate_series in steps of 100,000 through the real triggers
   (inserted SCHEDULED, then moved to FINISHED), each with two history rows (SCHEDULED,
   FINISHED) in task_events; VACUUM ANALYZE (what autovacuum does as tasks finish one by
   one: the fill's burst would otherwise leave a million dead versions), CHECKPOINT;
4. the same runs again, and the plans (EXPLAIN ANALYZE) of the scans.

Figures: medians in ms, `ratio` per job = full / empty (target: about 1; the old count's
ratio shows what it was); the fastest runs too (`*_min_ms`, `ratio_min`), which the load
of the shared machine disturbs less.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from bench._common import fresh_database, log, machine, new_prefix
from manager.dispatch import Dispatcher
from manager.lifecycle import LifecycleRelay
from manager.recovery import Recovery, Retention
from manager.upkeep import Upkeep
from taskmgr import broker, upkeep
from taskmgr.db import make_engine
from taskmgr.queries import q
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings

DB = "taskmgr_bench_upkeep"
POOL = "benchupkeep"
TYPE = "bench_upkeep"
STEP = 100_000  # finished tasks per statement

# The scans whose plans the report shows, with their parameters.
PLANS = {
    "start_timeouts": lambda now: (q("start_timeouts").text, {"now": now, "limit": 5000}),
    "expired": lambda now: (
        "select s.task_id from task_state s join tasks t on t.id = s.task_id "
        "join task_types tt on tt.name = t.type where s.state in ('STARTED', 'RUNNING') "
        "and s.started_at < cast(:now as timestamptz) "
        "- (select make_interval(secs => min(max_runtime_s)) from task_types) "
        "and tt.max_runtime_s is not null "
        "and s.started_at < cast(:now as timestamptz) - make_interval(secs => tt.max_runtime_s) "
        "order by s.started_at limit 5000",
        {"now": now},
    ),
    "state_counts": lambda now: (
        "select state, sum(n)::bigint as n from task_state_counts group by state having sum(n) <> 0",
        {},
    ),
    "prune_scan": lambda now: (
        "select s.task_id from task_state s where s.state in ('FINISHED', 'FAILED', 'CANCELLED') "
        "and s.changed_at < cast(:cutoff as timestamptz) order by s.changed_at, s.task_id limit 5000",
        {"cutoff": now - timedelta(days=30)},
    ),
}


def _log(msg: str) -> None:
    log("upkeep", msg)


async def _timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await fn()
    return (time.perf_counter() - t) * 1000


async def _phase(jobs: dict[str, Any], engine: Any, svc: TaskService, due: int, runs: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(runs + 2):
        past = datetime.now(UTC) - timedelta(seconds=1)
        async with engine.begin() as conn:
            new = await svc.schedule_many(conn, [NewTask(TYPE, {"i": j}, due_at=past) for j in range(due)])
        for name, fn in jobs.items():
            ms = await _timed(fn)
            if i >= 2:
                times[name].append(ms)
        # The poll's tasks go again: the live set stays what it was.
        async with engine.begin() as conn:
            ids = [n.id for n in new]
            await conn.execute(text("delete from task_state where task_id = any(:ids)"), {"ids": ids})
            await conn.execute(text("delete from tasks where id = any(:ids)"), {"ids": ids})
    return (
        {name: round(statistics.median(ms), 2) for name, ms in times.items()}
        | {f"{name}_min": round(min(ms), 2) for name, ms in times.items()}
        | {f"{name}_all": [round(x, 1) for x in ms] for name, ms in times.items()}
    )


async def _fill(engine: Any, finished: int) -> float:
    """`finished` tasks FINISHED within the last 20 days, through the real triggers, with
    two history rows each. Returns the seconds it took."""
    t0 = time.perf_counter()
    done = 0
    async with engine.connect() as conn:
        await conn.execute(text("set synchronous_commit = off"))
        await conn.commit()
        while done < finished:
            n = min(STEP, finished - done)
            params = {"total": finished, "lo": done + 1, "hi": done + n, "type": TYPE}
            # Task g ended at now - 20 days + g/total of 20 days (minus a minute).
            await conn.execute(
                text(
                    "create temp table batch on commit drop as "
                    "select gen_random_uuid() as id, g, now() - interval '20 days'"
                    " + (g::float8 / cast(:total as float8)) * (interval '20 days' - interval '1 minute')"
                    " as ended "
                    "from generate_series(cast(:lo as bigint), cast(:hi as bigint)) g"
                ),
                params,
            )
            await conn.execute(
                text(
                    "insert into tasks (id, type, payload, due_at, root_id, created_at, created_by) "
                    "select id, :type, jsonb_build_object('i', g), ended - interval '2 hours', id,"
                    " ended - interval '3 hours', 'bench' from batch"
                ),
                params,
            )
            await conn.execute(
                text(
                    "insert into task_state (task_id, state, attempt, run_at, changed_at) "
                    "select id, 'SCHEDULED', 0, ended - interval '2 hours', ended - interval '3 hours'"
                    " from batch"
                )
            )
            await conn.execute(
                text(
                    "update task_state s set state = 'FINISHED', attempt = 1, run_at = null,"
                    " runner_id = 'runner-bench', started_at = b.ended - interval '2 hours',"
                    " changed_at = b.ended from batch b where s.task_id = b.id"
                )
            )
            await conn.execute(
                text(
                    "insert into task_events (time, task_id, state, attempt, runner_id, source, detail) "
                    "select ended - interval '3 hours', id, 'SCHEDULED', 0, null, 'bench', '{}'::jsonb"
                    " from batch union all "
                    "select ended, id, 'FINISHED', 1, 'runner-bench', 'runner', '{}'::jsonb from batch"
                )
            )
            # Their lifecycle events are not this benchmark's: the relay would publish them.
            await conn.execute(text("delete from lifecycle_outbox"))
            await conn.commit()
            done += n
            _log(f"  {done:,} finished tasks ({time.perf_counter() - t0:.0f} s)")
    # What autovacuum would have done by the time a million tasks had finished one by one:
    # the fill's burst leaves a million dead SCHEDULED versions (in task_state_due_idx too)
    # and two million deleted outbox rows, which the first scans would otherwise wade through.
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("vacuum analyze"))
        await conn.execute(text("checkpoint"))
    return time.perf_counter() - t0


async def _plans(engine: Any) -> dict[str, list[str]]:
    now = datetime.now(UTC)
    out: dict[str, list[str]] = {}
    async with engine.connect() as conn:
        for name, make in PLANS.items():
            sql, params = make(now)
            rows = await conn.execute(text("explain (analyze, costs off, timing off) " + sql), params)
            out[name] = [r[0] for r in rows]
    return out


async def main(
    settings: Settings,
    finished: int = 1_000_000,
    active: int = 1000,
    due: int = 100,
    runs: int = 15,
    **_: Any,
) -> dict[str, Any]:
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    url = await fresh_database(settings, DB)
    _log(f"database {DB} ready; RabbitMQ prefix {prefix}")
    engine = make_engine(url, pool_size=3, name="taskmgr-bench")
    svc = TaskService(engine=engine)
    own = settings.model_copy(update={"database_url": url, "amqp_prefix": prefix})
    relay = LifecycleRelay(engine=engine, url=settings.amqp_url, topology=topo)
    try:
        await svc.create_type(
            {
                "name": TYPE,
                "pool": POOL,
                "handler": "noop",
                "url_template": "http://127.0.0.1:8765/noop",
                "start_timeout_s": 3600,
                "max_runtime_s": 86400,
            }
        )
        async with broker.Publisher(url=settings.amqp_url, topology=topo, name="bench-upkeep") as pub:
            dispatcher = Dispatcher(engine=engine, publisher=pub, service=svc, settings=own)
            past = datetime.now(UTC) - timedelta(seconds=1)
            async with engine.begin() as conn:
                await conn.execute(text("update task_types set start_timeout_s = 3600"))
                await svc.schedule_many(conn, [NewTask(TYPE, {"a": j}, due_at=past) for j in range(active)])
            assert (await dispatcher.poll_once()).claimed == active
            await relay.run_once()
            upkeep_ = Upkeep(engine=engine, settings=own)

            async def counted() -> None:
                async with engine.connect() as conn:
                    await upkeep.counts_by_state(conn)

            async def retention() -> None:
                await Retention.of_task_events(engine=engine, settings=own).run_once()
                await Retention.of_emitted_events(engine=engine, settings=own).run_once()

            jobs = {
                "dispatch": dispatcher.poll_once,
                "lifecycle": relay.run_once,
                "relay": dispatcher.relay_once,
                "recovery": Recovery(engine=engine, settings=own).run_once,
                "gauges": upkeep_.refresh_gauges,
                "retention": retention,
                "prune": upkeep_.prune_once,
                "old_count_by_state": counted,
            }
            empty = await _phase(jobs, engine, svc, due, runs)
            _log("no finished task: " + ", ".join(f"{k} {empty[k]} ms" for k in jobs))
            _log(f"writing {finished:,} finished tasks")
            fill_s = await _fill(engine, finished)
            full = await _phase(jobs, engine, svc, due, runs)
            _log(f"{finished:,} finished: " + ", ".join(f"{k} {full[k]} ms" for k in jobs))
            plans = await _plans(engine)
            async with engine.connect() as conn:
                counts = {str(k): v for k, v in (await svc.counts_by_state()).items()}
                stored = (await conn.execute(text("select count(*) from tasks"))).scalar()
    finally:
        await relay.close()
        await engine.dispose()
        try:
            await broker.delete_names(settings.amqp_url, topo, [POOL])
        except Exception as exc:
            _log(f"could not delete the queues of {prefix}: {exc!r}")
    return {
        "benchmark": "upkeep",
        "measured": f"each periodic job of the leader, median of {runs} runs after 2 warm-up runs, "
        f"with {active} tasks active and {due} due per dispatch poll, with 0 and with {finished:,} "
        "finished tasks stored; all in the bench process",
        "finished": finished,
        "tasks_stored_full": stored,
        "counts_full": counts,
        "empty_ms": {k: empty[k] for k in jobs},
        "full_ms": {k: full[k] for k in jobs},
        "ratio": {k: round(full[k] / empty[k], 3) if empty[k] else None for k in jobs},
        # The fastest run of each: what a job costs when the shared machine lets it run.
        "empty_min_ms": {k: empty[f"{k}_min"] for k in jobs},
        "full_min_ms": {k: full[f"{k}_min"] for k in jobs},
        "ratio_min": {k: round(full[f"{k}_min"] / empty[f"{k}_min"], 3) for k in jobs},
        "fill_seconds": round(fill_s, 1),
        "runs_empty_ms": {k: empty[f"{k}_all"] for k in jobs},
        "runs_full_ms": {k: full[f"{k}_all"] for k in jobs},
        "plans_full": plans,
        "machine": machine(),
    }
