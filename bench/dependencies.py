"""`taskmgr bench dependencies --stored 1000000`: do dependencies and priorities keep
discovery and intake costing what is due and what ends, not what is stored?

Everything runs in this process against two databases of its own (dropped with force
and made anew): `taskmgr_bench_dependencies_empty`, with nothing stored, and
`taskmgr_bench_dependencies`, where `--stored` waiting tasks are stored server-side
first (half SCHEDULED for later with random priorities, half waiting for one of those:
task_dependencies rows; then VACUUM ANALYZE and CHECKPOINT); RabbitMQ prefix
`bench<random>` (the intake's publisher; nothing is published). Then one warm-up round
and `--rounds` rounds, each of them, in turn:

- claim, in each database: schedule `--due` (1000) tasks already due, with random
  priorities, and time `store.start_due` (the dispatch claim: due time, then priority),
  in a transaction that is rolled back;
- finish, in each database: `--batch` (500) RUNNING tasks that nothing waits for: time
  the intake applying one message of their `finished` reports (`ProgressIntake.apply`:
  the state changes, and the look-up of the tasks waiting for them, which finds none);
- releases, in the stored database: `--batch` RUNNING tasks, each waited for by one
  task: time the intake finishing them (each release is written in that transaction).

The rounds are interleaved so that a shared machine's changing load weighs on each alike.
Figures: medians in ms; `claim_ratio` and `finish_ratio` = stored / empty (the cost of
what is due and what ends, not of what is stored: near 1); `release_ms` and
`release_us_per_task` (what releasing the waiting tasks adds to the transaction that
ends their dependencies).
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from bench._common import fresh_database, log, machine, new_prefix
from manager.intake import IntakeCounts, ProgressIntake
from taskmgr import broker, store
from taskmgr.db import make_engine
from taskmgr.messages import Report, RunnerReports
from taskmgr.models import State, Transition
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings

DB = "taskmgr_bench_dependencies"  # with the stored tasks
EMPTY = "taskmgr_bench_dependencies_empty"
TYPE = "bench_dep"


def _log(msg: str) -> None:
    log("dependencies", msg)


async def _running(engine: Any, svc: TaskService, news: list[NewTask]) -> list[uuid.UUID]:
    """Schedule these tasks and take the first `n` of them to RUNNING (attempt 1) as
    dispatch and a runner's report would."""
    async with engine.begin() as conn:
        ids = [s.id for s in await svc.schedule_many(conn, news)]
    async with engine.begin() as conn:
        parents = [i for i, n in zip(ids, news, strict=True) if not n.depends_on]
        now = datetime.now(UTC)
        await store.apply_transitions(
            conn,
            [Transition(t, State.STARTED, 1, "bench") for t in parents]
            + [Transition(t, State.RUNNING, 1, "bench", runner_id="r1") for t in parents],
            now,
        )
    return parents


def _finished(ids: list[uuid.UUID]) -> RunnerReports:
    now = datetime.now(UTC)
    reports = [Report(task_id=t, attempt=1, status="finished", at=now) for t in ids]
    return RunnerReports(runner_id="r1", pool="default", reports=reports)


async def _round(
    engine: Any, svc: TaskService, intake: ProgressIntake, due: int, batch: int, waited: bool
) -> tuple[float | None, float]:
    """One claim of `due` tasks (rolled back; not when `waited`), and one intake batch
    finishing `batch` RUNNING tasks (each waited for by one task when `waited`): ms."""
    claim_ms = None
    if not waited:
        past = datetime.now(UTC) - timedelta(seconds=1)
        async with engine.connect() as conn:
            tx = await conn.begin()
            news = [NewTask(TYPE, due_at=past, priority=random.randint(-5, 5)) for _ in range(due)]
            await svc.schedule_many(conn, news)
            t = time.perf_counter()
            claimed = await store.start_due(conn, datetime.now(UTC), 5000)
            claim_ms = (time.perf_counter() - t) * 1000
            await tx.rollback()
        if len(claimed) != due:
            _log(f"warning: claimed {len(claimed)}, expected {due}")
    ids = [uuid.uuid4() for _ in range(batch)]
    news = [NewTask(TYPE, id=t) for t in ids]
    if waited:
        # Due tomorrow once released: they stay out of the next rounds' claims.
        later = datetime.now(UTC) + timedelta(days=1)
        news += [NewTask(TYPE, depends_on=[t], due_at=later) for t in ids]
    parents = await _running(engine, svc, news)
    counts = IntakeCounts()
    t = time.perf_counter()
    await intake.apply([_finished(parents)], counts)
    finish_ms = (time.perf_counter() - t) * 1000
    if counts.applied != batch:
        _log(f"warning: applied {counts.applied}, expected {batch}")
    return claim_ms, finish_ms


async def _store_waiting(engine: Any, stored: int) -> float:
    """`stored` waiting tasks: half SCHEDULED for later, half waiting for one of those."""
    half = stored // 2
    t0 = time.perf_counter()
    async with engine.connect() as conn:
        await conn.execute(text("set synchronous_commit = off"))
        await conn.execute(
            text(
                "create temporary table bench_pairs as select gen_random_uuid() as parent,"
                " gen_random_uuid() as child, g from generate_series(1, cast(:n as int)) g"
            ),
            {"n": half},
        )
        for sql in (
            "insert into tasks (id, type, due_at, root_id, priority)"
            " select parent, :type, now() + interval '1 day' + make_interval(secs => g), parent,"
            " (g % 11) - 5 from bench_pairs",
            "insert into tasks (id, type, due_at, root_id)"
            " select child, :type, now(), child from bench_pairs",
            "insert into task_state (task_id, state, run_at, priority) select t.id, 'SCHEDULED',"
            " t.due_at, t.priority from bench_pairs p join tasks t on t.id = p.parent",
            "insert into task_state (task_id, state, run_at)"
            " select child, 'SCHEDULED', null from bench_pairs",
            "insert into task_dependencies (task_id, depends_on) select child, parent from bench_pairs",
        ):
            await conn.execute(text(sql), {"type": TYPE} if ":type" in sql else {})
            await conn.commit()
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("tasks", "task_state", "task_dependencies"):
            await conn.execute(text(f"vacuum analyze {table}"))
        await conn.execute(text("checkpoint"))
    return time.perf_counter() - t0


async def main(
    settings: Settings, stored: int = 1_000_000, due: int = 1000, batch: int = 500, rounds: int = 9, **_: Any
) -> dict[str, Any]:
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    engines = {}
    for name in (EMPTY, DB):
        url = await fresh_database(settings, name)
        engines[name] = make_engine(url, pool_size=3, name="taskmgr-bench")
    _log(f"databases {EMPTY} and {DB} ready; RabbitMQ prefix {prefix}")
    claim: dict[str, list[float]] = {EMPTY: [], DB: []}
    finish: dict[str, list[float]] = {EMPTY: [], DB: [], "releases": []}
    try:
        svcs = {name: TaskService(engine=engine) for name, engine in engines.items()}
        for svc in svcs.values():
            await svc.create_type({"name": TYPE, "handler": "noop"})
        _log(f"storing {stored:,} waiting tasks in {DB} (half of them waiting for the other half)")
        store_s = await _store_waiting(engines[DB], stored)
        _log(f"stored in {store_s:.0f} s")
        async with broker.Publisher(url=settings.amqp_url, topology=topo, name="bench-dependencies") as pub:
            intakes = {
                name: ProgressIntake(engine=engine, publisher=pub, settings=settings, service=svcs[name])
                for name, engine in engines.items()
            }
            # Rounds interleaved (empty, stored, releases): the load of a shared machine
            # changes over a run, and this way it weighs on the three alike.
            for i in range(rounds + 1):
                runs = ((EMPTY, EMPTY, False), (DB, DB, False), ("releases", DB, True))
                for label, name, waited in runs:
                    c_ms, f_ms = await _round(engines[name], svcs[name], intakes[name], due, batch, waited)
                    if i == 0:
                        continue  # warm-up
                    finish[label].append(f_ms)
                    if c_ms is not None:
                        claim[label].append(c_ms)
                if i:
                    e, st, r = finish[EMPTY][-1], finish[DB][-1], finish["releases"][-1]
                    _log(f"round {i}: finish {e:.1f} ms (empty), {st:.1f} (stored), {r:.1f} (releases)")
    finally:
        for engine in engines.values():
            await engine.dispose()
        try:
            await broker.delete_names(settings.amqp_url, topo, [])
        except Exception as exc:
            _log(f"could not delete the names of {prefix}: {exc!r}")
    med = {
        k: round(statistics.median(v), 2)
        for k, v in (claim | {"f_" + k: v for k, v in finish.items()}).items()
    }
    release_ms = med["f_releases"] - med["f_" + DB]
    return {
        "benchmark": "dependencies",
        "measured": f"store.start_due claiming {due} due tasks (rolled back) and ProgressIntake.apply "
        f"finishing {batch} RUNNING tasks in one message, in a database with nothing else stored and "
        f"in one with {stored:,} waiting tasks (half waiting for the other half), rounds interleaved; "
        f"then {batch} finished tasks each waited for by one task (released in that transaction); "
        f"medians of {rounds} rounds after one warm-up; all in the bench process",
        "stored": stored,
        "due_per_claim": due,
        "batch": batch,
        "claim_ms_empty": med[EMPTY],
        "claim_ms_stored": med[DB],
        "claim_ratio": round(med[DB] / med[EMPTY], 3),
        "finish_ms_empty": med["f_" + EMPTY],
        "finish_ms_stored": med["f_" + DB],
        "finish_ratio": round(med["f_" + DB] / med["f_" + EMPTY], 3),
        "finish_with_releases_ms": med["f_releases"],
        "release_ms": round(release_ms, 2),
        "release_us_per_task": round(release_ms * 1000 / batch, 1),
        "store_seconds": round(store_s, 1),
        "finish_ms_all": {
            "empty": [round(x, 1) for x in finish[EMPTY]],
            "stored": [round(x, 1) for x in finish[DB]],
            "releases": [round(x, 1) for x in finish["releases"]],
        },
        "machine": machine(),
    }
