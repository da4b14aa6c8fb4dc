"""Dependencies (Requires/After): a task waits for others and is released, or failed, in
the transaction that ends the last of them. Real PostgreSQL+TimescaleDB and RabbitMQ; a
real manager and runner for the diamond."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from manager.intake import ProgressIntake
from taskmgr import store
from taskmgr.errors import AlreadyExists, InvalidInput
from taskmgr.messages import Report, RunnerReports
from taskmgr.models import State
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from tests.helpers import Runs, create, run_until

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
async def step(service: TaskService) -> str:
    """A type whose attempts fail for good at the first failure."""
    await service.create_type({"name": "step", "handler": "noop", "max_attempts": 1})
    return "step"


def after(*deps: uuid.UUID, policy: str = "fail", **kw: Any) -> NewTask:
    return NewTask("step", depends_on=deps, on_dependency_failure=policy, **kw)


@pytest.fixture
def runs(engine, publisher, settings, service) -> Runs:  # type: ignore[no-untyped-def]
    return Runs(engine, publisher, settings, service)


async def events(engine: Any, *ids: uuid.UUID) -> list[dict[str, Any]]:
    """The history of these tasks in the order it was written (seq), as rows."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "select seq, time, task_id, state, applied, source, detail from task_events"
                " where task_id = any(:ids) order by seq"
            ),
            {"ids": list(ids)},
        )
        return [dict(r._mapping) for r in rows]


async def states(service: TaskService, *ids: uuid.UUID) -> list[State]:
    return [(await service.get_task(t)).state for t in ids]


@pytest.fixture
async def part(service: TaskService) -> str:
    await service.create_type(
        {
            "name": "part",
            "handler": "noop",
            "url_template": "http://api.test/{n}",
            "poll_interval_s": 0.1,
            "max_attempts": 1,
            "max_consecutive_failures": 1,
        }
    )
    return "part"


async def test_a_diamond_runs_in_order_with_a_real_manager_and_runner_under_their_roles(
    database_url: str, settings: Settings, service: TaskService, part: str
) -> None:
    """A -> B, A -> C, B + C -> D, created in one call (each names the others by id), run
    by a manager as taskmgr_manager and a runner as taskmgr_runner: B and C start only
    after A finished, D only after both; each is released in the transaction that
    finished its last dependency; nothing polls."""
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    now = datetime.now(UTC)
    # D first: an order in the call does not matter, only the ids.
    await create(
        service,
        NewTask(part, {"n": "d"}, id=d, depends_on=[b, c], name="D"),
        NewTask(part, {"n": "b"}, id=b, depends_on=[a], name="B"),
        NewTask(part, {"n": "c"}, id=c, depends_on=[a], name="C"),
        NewTask(part, {"n": "a"}, id=a, due_at=now + timedelta(seconds=0.5), name="A"),
    )
    assert [(await service.get_task(t)).blocked for t in (a, b, c, d)] == [False, True, True, True]
    polled: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        polled.append(request.url.path.strip("/"))
        return httpx.Response(200, json={"ok": True})

    async def finished() -> bool:
        return (await service.get_task(d)).state is State.FINISHED

    await run_until(database_url, settings, api, finished)
    assert await states(service, a, b, c, d) == [State.FINISHED] * 4
    assert polled[0] == "a" and sorted(polled[1:3]) == ["b", "c"] and polled[3:] == ["d"]
    history = await events(service.engine, a, b, c, d)
    seq = {(e["task_id"], e["state"], e["applied"]): e for e in history}
    released = {e["task_id"]: e for e in history if e["detail"].get("change") == "released"}
    assert set(released) == {b, c, d}
    for child, parents in ((b, [a]), (c, [a]), (d, [b, c])):
        last = max((seq[(p, "FINISHED", True)] for p in parents), key=lambda e: e["seq"])
        # Released in the transaction that finished its last dependency (its time is
        # that transaction's), and started only after.
        assert released[child]["time"] == last["time"] and released[child]["seq"] > last["seq"]
        assert released[child]["detail"]["released"] == {"FINISHED": len(parents)}
        assert seq[(child, "STARTED", True)]["seq"] > last["seq"]
        # Not late: lateness counts from its release, not from its due time.
        assert seq[(child, "STARTED", True)]["detail"]["lateness_ms"] < 5000


async def test_a_parent_failing_on_a_real_runner_fails_or_runs_its_dependents(
    database_url: str, settings: Settings, service: TaskService, part: str
) -> None:
    """A's API answers 500: the runner fails its one attempt, the manager records A
    FAILED, and in that transaction fails B (on_dependency_failure=fail) and releases C
    (run), which then runs on the runner; D, waiting for B, fails too."""
    [a] = await create(service, NewTask(part, {"n": "a"}))
    [b, c] = await create(
        service,
        NewTask(part, {"n": "b"}, depends_on=[a]),
        NewTask(part, {"n": "c"}, depends_on=[a], on_dependency_failure="run"),
    )
    [d] = await create(service, NewTask(part, {"n": "d"}, depends_on=[b]))
    polled: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        polled.append(request.url.path.strip("/"))
        return httpx.Response(500 if request.url.path == "/a" else 200, json={})

    async def ended() -> bool:
        return (await service.get_task(c)).state is State.FINISHED

    await run_until(database_url, settings, api, ended)
    assert await states(service, a, b, c, d) == [State.FAILED, State.FAILED, State.FINISHED, State.FAILED]
    assert "b" not in polled and "d" not in polled
    history = await events(service.engine, a, b, c)
    a_failed = next(e for e in history if e["task_id"] == a and e["state"] == "FAILED")
    b_failed = next(e for e in history if e["task_id"] == b and e["state"] == "FAILED")
    c_released = next(e for e in history if e["task_id"] == c and e["detail"].get("change") == "released")
    assert b_failed["time"] == c_released["time"] == a_failed["time"]  # one transaction
    assert b_failed["detail"]["reason"] == f"dependency {a} ended FAILED"
    assert c_released["detail"]["released"] == {"FAILED": 1}


async def test_a_failed_dependency_fails_its_dependents_or_not_per_their_flag(  # type: ignore[no-untyped-def]
    engine, service: TaskService, step: str, runs: Runs
) -> None:
    """A fails: B (fail) fails at once naming A, and so does E (fail) waiting for B; C
    (run) runs; F (run) waiting for B runs too once B ended; G waits for A and a task
    still running, with run: it keeps waiting for that one."""
    [a, slow] = await create(service, NewTask(step), NewTask(step))
    [b, c, g] = await create(service, after(a), after(a, policy="run"), after(a, slow, policy="run"))
    [e, f] = await create(service, after(b), after(b, policy="run"))
    assert await runs.dispatch() == 2
    await runs.end(slow, "running")
    await runs.end(a, "failed")
    assert await states(service, a, b, e) == [State.FAILED] * 3
    for task, dep in ((b, a), (e, b)):
        last = (await service.history(task))[-1]
        assert (last.state, last.source, last.applied) == (State.FAILED, "dependencies", True)
        assert last.detail["dependency"] == str(dep) and last.detail["dependency_state"] == "FAILED"
        assert last.detail["reason"] == f"dependency {dep} ended FAILED"
    released = [await service.get_task(t) for t in (c, f)]
    assert all(t.state is State.SCHEDULED and not t.blocked for t in released)
    assert (await service.get_task(g)).blocked
    # The failures are state changes like any other: lifecycle events go out for them.
    async with engine.connect() as conn:
        outbox = await conn.execute(
            text(
                "select task_id from lifecycle_outbox"
                " where state = 'FAILED' and source = 'dependencies' and task_id = any(:ids)"
            ),
            {"ids": [a, slow, b, c, g, e, f]},
        )
        assert set(outbox.scalars()) == {b, e}
    assert await runs.dispatch() == 2  # C and F; never B, E or G
    await runs.end(slow)
    assert not (await service.get_task(g)).blocked


async def test_a_cancelled_dependency_fails_or_releases(service: TaskService, step: str) -> None:
    [a] = await create(service, NewTask(step, due_at=datetime.now(UTC) + timedelta(hours=1)))
    later = datetime.now(UTC) + timedelta(hours=2)
    [b, c] = await create(service, after(a), after(a, policy="run", due_at=later))
    await service.cancel(a, reason="not needed")
    failed = await service.get_task(b)
    assert failed.state is State.FAILED
    assert (await service.history(b))[-1].detail["dependency_state"] == "CANCELLED"
    released = await service.get_task(c)
    # Released, due at its own due time: it was later than the release.
    assert (released.state, released.run_at) == (State.SCHEDULED, later)


async def test_a_dependency_that_has_ended_already(  # type: ignore[no-untyped-def]
    engine, service: TaskService, step: str, runs: Runs
) -> None:
    [done, failed] = await create(service, NewTask(step), NewTask(step))
    await runs.dispatch()
    await runs.end(done)
    await runs.end(failed, "failed")
    due = datetime.now(UTC) - timedelta(seconds=1)
    [b, c, d] = await create(
        service, after(done, due_at=due), after(failed, policy="run", due_at=due), after(done, failed)
    )
    for t in (b, c):  # due at once, as if they waited for nothing
        task = await service.get_task(t)
        assert (task.state, task.run_at, task.blocked) == (State.SCHEDULED, due, False)
        assert "waiting_for" not in (await service.history(t))[0].detail
    # With on_dependency_failure=fail, a dependency that failed already fails it at once.
    assert [e.state for e in await service.history(d)] == [State.SCHEDULED, State.FAILED]
    assert (await service.get_task(d)).depends_on == tuple(sorted([done, failed]))
    assert await runs.dispatch() == 2


async def test_dependencies_ending_at_once_in_two_transactions_release_once(  # type: ignore[no-untyped-def]
    engine, service: TaskService, publisher, settings, step: str, runs: Runs
) -> None:
    """Two dependencies end at the same moment in two transactions (two intakes; an
    intake and an operator's cancel): each locks the waiting task before reading its
    dependencies' states, so the later one sees the earlier's end and releases it. It is
    never left waiting, and released once."""
    other = ProgressIntake(engine=engine, publisher=publisher, settings=settings)
    for round_ in range(8):
        [x, y] = await create(service, NewTask(step), NewTask(step))
        [d] = await create(service, after(x, y, policy="run"))
        await runs.dispatch()
        for t in (x, y):
            await runs.end(t, "running")

        def done(t: uuid.UUID) -> RunnerReports:
            report = Report(task_id=t, attempt=1, status="finished", at=datetime.now(UTC))
            return RunnerReports(runner_id="r1", pool="default", reports=[report])

        second = other.apply([done(y)]) if round_ % 2 else service.cancel(y)
        await asyncio.gather(runs.intake.apply([done(x)]), second)
        task = await service.get_task(d)
        assert (task.state, task.blocked) == (State.SCHEDULED, False), round_
        releases = [e for e in await service.history(d) if e.detail.get("change") == "released"]
        assert len(releases) == 1
        await runs.dispatch()  # D out of the way of the next round


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda ids: [after(uuid.uuid4())], InvalidInput, "depends_on: no such task"),
        (
            lambda ids: [NewTask("step", id=ids[0], depends_on=[ids[0]])],
            InvalidInput,
            "cannot wait for itself",
        ),
        (
            lambda ids: [
                NewTask("step", id=ids[0], depends_on=[ids[2]]),
                NewTask("step", id=ids[1], depends_on=[ids[0]]),
                NewTask("step", id=ids[2], depends_on=[ids[1]]),
            ],
            InvalidInput,
            "depends_on: a cycle",
        ),
        (lambda ids: [after(ids[3], recurrence={"every_s": 60})], InvalidInput, "recurring"),
        (lambda ids: [NewTask("step", id=ids[3])], AlreadyExists, "exists"),
        (lambda ids: [NewTask("step", id=ids[0]), NewTask("step", id=ids[0])], InvalidInput, "same id"),
    ],
)
async def test_bad_dependencies_are_refused_and_write_nothing(  # type: ignore[no-untyped-def]
    engine, service: TaskService, step: str, make, error: type, message: str
) -> None:
    [existing] = await create(service, NewTask(step))
    ids = [uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), existing]
    with pytest.raises(error, match=message):
        await create(service, NewTask(step), *make(ids))
    async with engine.connect() as conn:
        counts = [
            (await conn.execute(text(f"select count(*) from {table}"))).scalar()
            for table in ("tasks", "task_state", "task_events", "task_dependencies")
        ]
    assert counts == [1, 1, 1, 0]


async def test_rebuild_keeps_a_waiting_task_waiting(
    engine, service: TaskService, step: str, runs: Runs
) -> None:  # type: ignore[no-untyped-def]
    [a] = await create(service, NewTask(step))
    [waiting] = await create(service, after(a))
    await runs.dispatch()

    async def rebuild() -> None:
        async with engine.begin() as conn:
            await store.rebuild_state(conn)

    await rebuild()
    assert (await service.get_task(waiting)).blocked
    await runs.end(a)
    released = await service.get_task(waiting)
    await rebuild()
    again = await service.get_task(waiting)
    assert not again.blocked and again.run_at == released.due_at


async def test_claims_order_by_due_time_then_priority(engine, service: TaskService, step: str) -> None:  # type: ignore[no-untyped-def]
    """Among tasks due at the same time the higher priority is claimed first; an earlier
    due time still comes first whatever its priority. Both claims (one-off tasks in one
    statement, recurring ones through claim_due) and the next occurrence keep it."""
    due = datetime.now(UTC) - timedelta(seconds=10)
    early = (await create(service, NewTask(step, due_at=due - timedelta(seconds=1), priority=-100)))[0]
    by_priority = {
        p: (await create(service, NewTask(step, due_at=due, priority=p)))[0] for p in (0, 7, -3, 30, 2)
    }
    now = datetime.now(UTC)
    claimed: list[set[uuid.UUID]] = []
    for limit in (3, 2, 5):
        async with engine.begin() as conn:
            claimed.append({r["task_id"] for r in await store.start_due(conn, now, limit)})
    assert claimed == [
        {early, by_priority[30], by_priority[7]},
        {by_priority[2], by_priority[0]},
        {by_priority[-3]},
    ]
    every = {"every_s": 3600}
    recurring = {
        p: (await create(service, NewTask(step, due_at=due, priority=p, recurrence=every)))[0]
        for p in (1, 9, 4)
    }
    async with engine.connect() as conn:  # rolled back
        rows = await store.claim_due(conn, now, 10)
        assert [r["task_id"] for r in rows] == [recurring[9], recurring[4], recurring[1]]


async def test_the_claim_reads_the_due_index_in_order(engine, service: TaskService, step: str) -> None:  # type: ignore[no-untyped-def]
    """Invariant 5 with priorities: with 20,000 tasks waiting and 300 due, the claim is an
    index scan of task_state_due_idx (run_at, priority desc), in its order, with no sort:
    it reads what is due, not what is stored."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "insert into tasks (id, type, due_at, root_id, priority)"
                " select g, 'step', now() + make_interval(secs => i - 300), g, (i % 5)"
                " from (select gen_random_uuid() as g, i from generate_series(1, 20000) i) s"
            )
        )
        await conn.execute(
            text(
                "insert into task_state (task_id, state, run_at, priority)"
                " select id, 'SCHEDULED', due_at, priority from tasks"
            )
        )
        await conn.execute(text("analyze tasks, task_state"))
    for name in ("start_due", "claim_due"):
        async with engine.connect() as conn:
            sql = store.q(name).text
            plan = (
                await conn.execute(
                    text("explain (format json) " + sql), {"now": datetime.now(UTC), "limit": 100}
                )
            ).scalar_one()
        nodes = _nodes(plan[0]["Plan"])
        # start_due: its claim is the CTE `due` (the update then finds those rows by key,
        # as the planner likes for the table's size).
        claim = next((n for n in nodes if n.get("Subplan Name") == "CTE due"), plan[0]["Plan"])
        reads = {
            (n["Node Type"], n.get("Index Name"))
            for n in _nodes(claim)
            if n.get("Relation Name") == "task_state"
        }
        assert reads == {("Index Scan", "task_state_due_idx")}, name
        assert not [n for n in _nodes(claim) if n["Node Type"] in ("Sort", "Incremental Sort")], name


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def test_waiting_for_a_task_whose_dedup_key_exists_waits_for_the_existing_one(
    service: TaskService, step: str, runs: Runs
) -> None:
    """A call creates a task and one that waits for it, but the first's dedup key exists
    already (a call repeated): the second waits for the task that has the key."""
    [first] = await create(service, NewTask(step, dedup_key="k"))
    again = uuid.uuid4()
    done = await create(service, NewTask(step, dedup_key="k", id=again), after(again))
    assert done[0] == first
    waiting = await service.get_task(done[1])
    assert waiting.depends_on == (first,) and waiting.blocked
    await runs.dispatch()
    await runs.end(first)
    assert not (await service.get_task(done[1])).blocked


async def test_a_dependency_ending_while_its_dependent_is_created_still_releases_it(  # type: ignore[no-untyped-def]
    engine, service: TaskService, step: str, runs: Runs
) -> None:
    """A new task share-locks the tasks it names until its transaction ends: the report
    that finishes one meanwhile waits for that commit, then sees the new task and
    releases it (read before the commit, it would have left it waiting for ever)."""
    [p] = await create(service, NewTask(step))
    await runs.dispatch()
    await runs.end(p, "running")
    async with service.session() as session:
        await session.begin()
        [d] = await service.schedule_many(session, [after(p)])
        finishing = asyncio.create_task(runs.end(p))
        async with asyncio.timeout(10):  # the intake waits for the lock
            while True:
                async with engine.connect() as conn:
                    waiting = await conn.execute(
                        text(
                            "select count(*) from pg_stat_activity"
                            " where datname = current_database() and wait_event_type = 'Lock'"
                        )
                    )
                    if waiting.scalar():
                        break
                await asyncio.sleep(0.02)
        assert not finishing.done()
        await session.commit()
    await finishing
    assert (await service.get_task(p)).state is State.FINISHED
    released = await service.get_task(d.id)
    assert (released.state, released.blocked) == (State.SCHEDULED, False)
