"""Tables that stay small, against the real PostgreSQL+TimescaleDB: the counts by state
that triggers keep stay right across every kind of state change, and pruning deletes
whole trees of old terminal tasks (and old runners) and nothing else, under the
manager's own database role."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from manager.upkeep import Upkeep
from taskmgr import store, upkeep
from taskmgr.broker import Publisher
from taskmgr.db import make_engine
from taskmgr.messages import Heartbeat, Report, RunnerReports
from taskmgr.migrate import asyncpg_dsn
from taskmgr.models import State, Transition
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from tests.helpers import as_role, schedule

pytestmark = pytest.mark.usefixtures("clean")

OLD = timedelta(days=40)  # past the 30 days of retention (and the owner's floor)


async def _true_counts(engine: Any) -> dict[State, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("select state, count(*) from task_state group by state"))
        return {State(r[0]): r[1] for r in rows}


async def _kept_counts(engine: Any) -> dict[State, int]:
    async with engine.connect() as conn:
        return await upkeep.state_counts(conn)


async def _check_counts(engine: Any, expect: dict[State, int] | None = None) -> None:
    true = await _true_counts(engine)
    assert await _kept_counts(engine) == true
    if expect is not None:
        assert true == expect


async def test_counts_by_state_stay_right_across_state_changes(
    engine: Any, service: TaskService, publisher: Publisher, settings: Settings
) -> None:
    await service.create_type({"name": "poll", "handler": "noop", "max_attempts": 1})
    await _check_counts(engine, {})
    ids = await schedule(service, "poll", 6)
    later = await schedule(service, "poll", 2, due_at=datetime.now(UTC) + timedelta(hours=1))
    await _check_counts(engine, {State.SCHEDULED: 8})
    # A rolled-back schedule counts nothing.
    async with service.session() as session:
        async with session.begin():
            await service.schedule_many(session, [NewTask("poll") for _ in range(3)])
            await session.rollback()
    await _check_counts(engine, {State.SCHEDULED: 8})
    # Dispatch (the one-statement claim), then runners' reports through the intake.
    disp = Dispatcher(engine=engine, publisher=publisher, service=service, settings=settings)
    assert (await disp.poll_once()).claimed == 6
    await _check_counts(engine, {State.SCHEDULED: 2, State.STARTED: 6})
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings)
    now = datetime.now(UTC)
    reports = [Report(task_id=t, attempt=1, status="running", at=now) for t in ids]
    reports += [Report(task_id=ids[0], attempt=1, status="finished", at=now)]
    reports += [Report(task_id=ids[1], attempt=1, status="failed", at=now, detail={"reason": "x"})]
    reports += [Report(task_id=ids[2], attempt=1, status="handback", at=now)]
    await intake.apply(
        [
            RunnerReports(runner_id="r1", pool="default", reports=reports),
            Heartbeat(runner_id="r1", pool="default", at=now),
        ]
    )
    expect = {State.SCHEDULED: 2, State.RUNNING: 3, State.FINISHED: 1, State.FAILED: 1, State.RETRYING: 1}
    await _check_counts(engine, expect)
    # The fold changes the rows, not the counts; then operators' cancels and retries.
    async with engine.begin() as conn:
        await upkeep.fold_state_counts(conn)
        n_rows = (await conn.execute(text("select count(*) from task_state_counts"))).scalar()
    assert n_rows == len(expect)
    await _check_counts(engine, expect)
    await service.cancel(later[0])
    await service.cancel(ids[3])
    await service.retry(ids[1])
    expect = {
        State.SCHEDULED: 1,
        State.RUNNING: 2,
        State.FINISHED: 1,
        State.RETRYING: 2,
        State.CANCELLED: 2,
    }
    await _check_counts(engine, expect)
    assert await service.counts_by_state() == expect
    assert await service.counts_by_state(type="poll") == expect
    # The gauges' job folds and reads the same.
    await Upkeep(engine=engine, settings=settings).refresh_gauges()
    await _check_counts(engine, expect)


async def _make_tree(service: TaskService, n_children: int) -> list[uuid.UUID]:
    """A root (due later: it waits) and its children (due now), as ids, root first."""
    (root,) = await schedule(service, "poll", 1, due_at=datetime.now(UTC) + timedelta(hours=1))
    children = await schedule(service, "poll", n_children, parent_id=root)
    grandchild = await schedule(service, "poll", 1, parent_id=children[0]) if children else []
    return [root, *children, *grandchild]


async def _end(service: TaskService, ids: list[uuid.UUID], *, finished: uuid.UUID | None = None) -> None:
    """Cancel these tasks; `finished` is made FINISHED instead (through the state machine)."""
    for t in ids:
        if t == finished:
            async with service.session() as s, s.begin():
                await service.record(
                    s,
                    [
                        Transition(t, State.STARTED, 1, "manager"),
                        Transition(t, State.RUNNING, 1, "runner", "r-old"),
                        Transition(t, State.FINISHED, 1, "runner", "r-old"),
                    ],
                )
        else:
            await service.cancel(t)


async def _age(database_url: str, ids: list[uuid.UUID], by: timedelta) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            "update task_state set changed_at = changed_at - $2::interval where task_id = any($1::uuid[])",
            ids,
            by,
        )
    finally:
        await conn.close()


async def _existing(engine: Any, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("select id from tasks where id = any(:ids)"), {"ids": ids})
        return {r[0] for r in rows}


async def _dangling(engine: Any) -> dict[str, int]:
    """Rows that name a task that no longer exists (or a task without its state)."""
    checks = {
        "task_state": "select count(*) from task_state s where not exists "
        "(select 1 from tasks t where t.id = s.task_id)",
        "task_services": "select count(*) from task_services s where not exists "
        "(select 1 from tasks t where t.id = s.task_id)",
        "parents": "select count(*) from tasks c where c.parent_id is not null and not exists "
        "(select 1 from tasks p where p.id = c.parent_id)",
        "roots": "select count(*) from tasks c where not exists "
        "(select 1 from tasks r where r.id = c.root_id)",
        "stateless": "select count(*) from tasks t where not exists "
        "(select 1 from task_state s where s.task_id = t.id)",
        "seedings": "select count(*) from schedule_seedings g where not exists "
        "(select 1 from tasks t where t.id = g.task_id)",
        "dependencies": "select count(*) from task_dependencies d where not exists "
        "(select 1 from tasks t where t.id = d.task_id) or not exists "
        "(select 1 from tasks t where t.id = d.depends_on)",
    }
    async with engine.connect() as conn:
        return {k: (await conn.execute(text(sql))).scalar_one() for k, sql in checks.items()}


async def test_pruning_deletes_whole_old_trees_only_and_leaves_nothing_dangling(
    engine: Any, service: TaskService, database_url: str, settings: Settings
) -> None:
    await service.create_type({"name": "poll", "handler": "noop"})
    # Tree A: every task ended 40 days ago (one FINISHED with an outside service's row
    # and a seeding naming it): pruned whole.
    a = await _make_tree(service, 3)
    await _end(service, a[::-1], finished=a[1])
    async with engine.begin() as conn:
        await store.upsert_service(
            conn,
            task_id=a[1],
            service="photos",
            attempt=1,
            state="FINISHED",
            detail={},
            now=datetime.now(UTC),
        )
        await conn.execute(
            text(
                "insert into schedule_seedings (provider, league, day, task_id) values ('nba', 'nba', :d, :t)"
            ),
            {"d": (datetime.now(UTC) - OLD).date(), "t": a[0]},
        )
    # Tree B: old and ended but for one child still waiting: kept whole.
    b = await _make_tree(service, 2)
    await _end(service, [b[0], b[2], b[3]])
    # Tree C: all ended, but one only just now: kept whole.
    c = await _make_tree(service, 1)
    await _end(service, c)
    # D: a lone root ended 40 days ago: pruned.
    d = await schedule(service, "poll", 1)
    await _end(service, d)
    # E: a lone root ended 40 days ago, but a task still waiting (G, another tree) depends
    # on it: kept while G is.
    later = datetime.now(UTC) + timedelta(hours=1)
    e = await schedule(service, "poll", 1, due_at=later)
    g = await schedule(service, "poll", 1, due_at=later, depends_on=e, on_dependency_failure="run")
    await _end(service, e)
    await _age(database_url, a + b + c[:-1] + d + e, OLD)
    # Runners: stopped long ago (pruned), dead long ago (pruned), stopped lately, live.
    async with engine.begin() as conn:
        long_ago = datetime.now(UTC) - timedelta(days=10)
        for rid, when in (("r-stopped", long_ago), ("r-dead", long_ago), ("r-lately", datetime.now(UTC))):
            await store.upsert_runner(conn, runner_id=rid, pool="p", host="h", pid=1, tasks=0, now=when)
        await store.stop_runner(conn, "r-stopped", long_ago)
        await store.stop_runner(conn, "r-lately", datetime.now(UTC))
        await conn.execute(text("update runners set dead = true where id = 'r-dead'"))
        await store.upsert_runner(conn, runner_id="r-live", pool="p", host="h", pid=1, tasks=0, now=long_ago)
        await conn.execute(text("update runners set last_seen = now() where id = 'r-live'"))

    # Under the manager's role, in steps of 2 old tasks (several transactions).
    manager_engine = make_engine(as_role(database_url, "taskmgr_manager"), name="taskmgr-tests-prune")
    try:
        counts = await Upkeep(engine=manager_engine, settings=settings).prune_once(step=2)
    finally:
        await manager_engine.dispose()

    assert counts.tasks == len(a) + len(d)
    assert counts.steps > 1 and counts.runners == 2
    assert await _existing(engine, a + d) == set()
    assert await _existing(engine, b) == set(b)
    assert await _existing(engine, c) == set(c)
    assert await _existing(engine, e + g) == set(e + g)
    assert await _dangling(engine) == dict.fromkeys(
        ("task_state", "task_services", "parents", "roots", "stateless", "seedings", "dependencies"), 0
    )
    async with engine.connect() as conn:
        seedings = (await conn.execute(text("select count(*) from schedule_seedings"))).scalar()
        runners = {r[0] for r in await conn.execute(text("select id from runners"))}
    assert seedings == 0 and runners == {"r-lately", "r-live"}
    await _check_counts(engine)
    # Once the last task of B ends (and is old), B goes too; and E with G once G has ended.
    await _end(service, [b[1], *g])
    await _age(database_url, [b[1], *g], OLD)
    again = await Upkeep(engine=engine, settings=settings).prune_once()
    assert again.tasks == len(b) + len(e) + len(g)
    assert await _existing(engine, b + c + e + g) == set(c)
    await _check_counts(engine)


async def test_pruning_never_goes_past_the_owners_floor(
    engine: Any, service: TaskService, database_url: str, settings: Settings
) -> None:
    await service.create_type({"name": "poll", "handler": "noop"})
    t = await schedule(service, "poll", 1)
    await _end(service, t)
    await _age(database_url, t, timedelta(days=10))
    # The manager asks for 1 day of retention; the owner's floor (30 days) wins.
    short = settings.model_copy(update={"retention_days": 1})
    assert (await Upkeep(engine=engine, settings=short).prune_once()).tasks == 0
    assert await _existing(engine, t) == set(t)
    # The functions are the manager's way to delete: its role cannot delete tasks itself.
    conn = await asyncpg.connect(asyncpg_dsn(as_role(database_url, "taskmgr_manager")))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("delete from tasks where id = $1", t[0])
    finally:
        await conn.close()
