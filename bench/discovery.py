"""`taskmgr bench discovery --events 10000000`: does a discovery poll cost what is due,
not what is stored (DESIGN invariant 5)?

Everything runs in this process against its own database `taskmgr_bench_discovery`
(dropped with force and made anew) and RabbitMQ prefix `bench<random>`:

1. empty history: `--polls` times (after 2 warm-up polls), schedule `--due` (100) tasks
   already due, then time one whole `Dispatcher.poll_once()` (claim query, STARTED events
   into the hypertable, projection update, commit, publishing the start orders with
   confirms to the pool's queue, mark sent, the next-due probe); separately, in a
   transaction that is rolled back, time the claim query alone (`store.claim_due`).
2. insert `--events` rows into task_events server-side (generate_series, in time order,
   spread over the last 30 days, i.e. ~30 one-day chunks; random task ids: discovery
   never reads history rows), then CHECKPOINT and ANALYZE;
3. the same polls with the full history.

Figures: medians in ms; `ratio` = poll_ms_full / poll_ms_empty (target < 1.2).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from bench._common import fresh_database, log, machine, new_prefix
from manager.dispatch import Dispatcher
from taskmgr import broker, store
from taskmgr.db import make_engine
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings

DB = "taskmgr_bench_discovery"
POOL = "benchdisc"
STEP = 1_000_000  # rows per insert statement


def _log(msg: str) -> None:
    log("discovery", msg)


async def _polls(
    dispatcher: Dispatcher, svc: TaskService, engine: Any, due: int, polls: int
) -> dict[str, Any]:
    poll_ms: list[float] = []
    claim_ms: list[float] = []
    claimed: list[int] = []
    for i in range(polls + 2):
        past = datetime.now(UTC) - timedelta(seconds=1)
        # The claim query alone, rolled back.
        async with engine.connect() as conn:
            tx = await conn.begin()
            await svc.schedule_many(conn, [NewTask("bench_disc", {"i": j}, due_at=past) for j in range(due)])
            t = time.perf_counter()
            rows = await store.claim_due(conn, datetime.now(UTC), 5000)
            c_ms = (time.perf_counter() - t) * 1000
            await tx.rollback()
        # The whole poll.
        async with engine.begin() as conn:
            await svc.schedule_many(conn, [NewTask("bench_disc", {"i": j}, due_at=past) for j in range(due)])
        t = time.perf_counter()
        counts = await dispatcher.poll_once()
        p_ms = (time.perf_counter() - t) * 1000
        if i >= 2:  # two warm-up polls
            poll_ms.append(p_ms)
            claim_ms.append(c_ms)
            claimed.append(counts.claimed)
        if len(rows) != due or counts.claimed != due:
            _log(f"warning: claimed {len(rows)} / {counts.claimed}, expected {due}")
    return {
        "poll_ms": round(statistics.median(poll_ms), 2),
        "claim_ms": round(statistics.median(claim_ms), 2),
        "poll_ms_all": [round(x, 1) for x in poll_ms],
        "claimed_per_poll": claimed[0] if claimed else 0,
    }


async def main(
    settings: Settings, events: int = 10_000_000, due: int = 100, polls: int = 15, **_: Any
) -> dict[str, Any]:
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    url = await fresh_database(settings, DB)
    _log(f"database {DB} ready; RabbitMQ prefix {prefix}")
    engine = make_engine(url, pool_size=3, name="taskmgr-bench")
    svc = TaskService(engine=engine)
    own = settings.model_copy(update={"database_url": url, "amqp_prefix": prefix})
    try:
        await svc.create_type(
            {
                "name": "bench_disc",
                "pool": POOL,
                "handler": "noop",
                "url_template": "http://127.0.0.1:8765/noop",
                "start_timeout_s": 3600,
            }
        )
        async with broker.Publisher(url=settings.amqp_url, topology=topo, name="bench-discovery") as pub:
            dispatcher = Dispatcher(engine=engine, publisher=pub, service=svc, settings=own)
            empty = await _polls(dispatcher, svc, engine, due, polls)
            _log(f"empty history: poll {empty['poll_ms']} ms, claim {empty['claim_ms']} ms")

            _log(f"inserting {events:,} events over 30 days")
            t0 = time.perf_counter()
            done = 0
            async with engine.connect() as conn:
                await conn.execute(text("set synchronous_commit = off"))
                await conn.commit()
                while done < events:
                    n = min(STEP, events - done)
                    # Rows done+1 .. done+n of `events`, evenly in time over [now-30d, now-1min].
                    await conn.execute(
                        text(
                            "insert into task_events"
                            " (time, task_id, state, attempt, runner_id, source, detail) "
                            "select now() - interval '30 days'"
                            " + (g::float8 / cast(:total as float8))"
                            " * (interval '30 days' - interval '1 minute'),"
                            " gen_random_uuid(), "
                            "(array['SCHEDULED','STARTED','RUNNING','FINISHED'])[1 + g % 4], 1, "
                            "'runner-bench', 'runner', '{\"bench\": true}'::jsonb "
                            "from generate_series(cast(:lo as bigint), cast(:hi as bigint)) g"
                        ),
                        {"total": events, "lo": done + 1, "hi": done + n},
                    )
                    await conn.commit()
                    done += n
                    _log(f"  {done:,} events ({time.perf_counter() - t0:.0f} s)")
            insert_s = time.perf_counter() - t0
            async with engine.connect() as conn:
                await conn.execute(text("checkpoint"))
                await conn.execute(text("analyze task_events"))
                await conn.commit()
                chunks = (
                    await conn.execute(
                        text(
                            "select count(*) from timescaledb_information.chunks"
                            " where hypertable_name = 'task_events'"
                        )
                    )
                ).scalar()
            _log(f"inserted in {insert_s:.0f} s; {chunks} chunks")
            full = await _polls(dispatcher, svc, engine, due, polls)
            _log(f"full history: poll {full['poll_ms']} ms, claim {full['claim_ms']} ms")
    finally:
        await engine.dispose()
        try:
            await broker.delete_names(settings.amqp_url, topo, [POOL])
        except Exception as exc:
            _log(f"could not delete the queues of {prefix}: {exc!r}")
    return {
        "benchmark": "discovery",
        "measured": f"Dispatcher.poll_once() with {due} tasks due (claim + STARTED events + publish with "
        "confirms + mark sent; the next-due probe), and the claim query alone; medians of "
        f"{polls} polls after 2 warm-up polls; all in the bench process",
        "events": events,
        "chunks": chunks,
        "due_per_poll": due,
        "poll_ms_empty": empty["poll_ms"],
        "poll_ms_full": full["poll_ms"],
        "ratio": round(full["poll_ms"] / empty["poll_ms"], 3),
        "claim_ms_empty": empty["claim_ms"],
        "claim_ms_full": full["claim_ms"],
        "claim_ratio": round(full["claim_ms"] / empty["claim_ms"], 3),
        "insert_seconds": round(insert_s, 1),
        "polls_empty_ms": empty["poll_ms_all"],
        "polls_full_ms": full["poll_ms_all"],
        "machine": machine(),
    }
