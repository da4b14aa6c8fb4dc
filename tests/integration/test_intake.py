"""Progress intake against the real PostgreSQL+TimescaleDB and RabbitMQ: one poison
message costs only itself (invariant 6), rejections back off."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from sqlalchemy import text

from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from taskmgr import broker
from taskmgr.broker import Publisher
from taskmgr.messages import Heartbeat, Report, RunnerReports, encode
from taskmgr.migrate import asyncpg_dsn
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import Clock, queue_depth, schedule

pytestmark = pytest.mark.usefixtures("clean")


async def _running(engine, service, publisher, settings, clock, n: int) -> list[uuid.UUID]:  # type: ignore[no-untyped-def]
    """n tasks of a fresh type, dispatched (STARTED, attempt 1)."""
    await service.create_type(
        {"name": "poll", "handler": "noop", "max_attempts": 3, "backoff_base_s": 1, "backoff_max_s": 8}
    )
    ids = await schedule(service, "poll", n, due_at=clock.now - timedelta(seconds=1))
    disp = Dispatcher(
        engine=engine,
        publisher=publisher,
        service=TaskService(engine=engine, clock=clock),
        settings=settings,
        clock=clock,
    )
    assert (await disp.poll_once()).claimed == n
    return ids


def _report(runner: str, task: uuid.UUID, attempt: int, status: str, **detail: Any) -> dict[str, Any]:
    body = RunnerReports(
        runner_id="x",
        pool="default",
        reports=[Report(task_id=task, attempt=1, status="running", at=datetime.now(UTC))],
    ).model_dump(mode="json")
    body["runner_id"] = runner
    body["reports"][0].update(attempt=attempt, status=status, detail=detail)
    return body


def _heartbeat(runner: str, **kw: Any) -> dict[str, Any]:
    body = Heartbeat(runner_id="x", pool="default", at=datetime.now(UTC)).model_dump(mode="json")
    body.update(runner_id=runner, **kw)
    return body


async def _deliver(settings: Settings, topology: broker.Topology, publisher: Publisher, bodies: list[bytes]):  # type: ignore[no-untyped-def]
    """Publish to the progress queue and take the deliveries as the manager would (one
    batch, unacked), with the consumer that holds them."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    consumer = broker.Consumer(url=settings.amqp_url, topology=topology, prefetch=1000)
    await consumer.__aenter__()

    async def take(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        got.append(m)

    await consumer.consume_progress(take)
    for b in bodies:
        await publisher.publish_progress(b)
    async with asyncio.timeout(10):
        while len(got) < len(bodies):
            await asyncio.sleep(0.02)
    return consumer, got


async def _dead(settings: Settings, topology: broker.Topology) -> list[tuple[bytes, str]]:
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        ch = await conn.channel()
        q = await ch.get_queue(topology.dead)
        out = []
        while (m := await q.get(no_ack=True, fail=False)) is not None:
            out.append((m.body, str(m.headers[broker.REASON_HEADER])))
        return out
    finally:
        await conn.close()


async def _history(engine, task: uuid.UUID) -> list[tuple[str, int, bool]]:  # type: ignore[no-untyped-def]
    return [(h.state.value, h.attempt, h.applied) for h in await TaskService(engine=engine).history(task)]


async def _runner_ids(engine) -> set[str]:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        return {r[0] for r in (await conn.execute(text("select id from runners"))).all()}


RAN_ONCE = [("SCHEDULED", 0, True), ("STARTED", 1, True), ("RUNNING", 1, True)]

POISON = {
    "attempt 2**31": lambda t: _report("r1", t, 2**31, "running"),
    "pid 2**40": lambda t: _heartbeat("r9", pid=2**40),
    "NUL in detail": lambda t: _report("r1", t, 1, "poll_error", error="bad\u0000byte"),
    "NUL in a detail key": lambda t: _report("r1", t, 1, "poll_error", nested={"k\u0000": 1}),
    "oversized detail": lambda t: _report("r1", t, 1, "poll_error", error="x" * 100_000),
    "NUL in runner_id": lambda t: _heartbeat("r\u00001"),
    "NaN in detail": lambda t: _report("r1", t, 1, "poll_error", error=float("nan")),
}


@pytest.mark.parametrize("kind", list(POISON))
async def test_poison_progress_message_costs_only_itself(  # type: ignore[no-untyped-def]
    engine, service, publisher, settings, topology, kind
) -> None:
    clock = Clock(datetime.now(UTC))
    a, b, victim = await _running(engine, service, publisher, settings, clock, 3)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    good = [
        _report("r1", a, 1, "running"),
        _heartbeat("r1", tasks=[[str(a), 1]]),
        POISON[kind](victim),
        _report("r1", b, 1, "running"),
        _heartbeat("r2"),
    ]
    bodies = [json.dumps(x).encode() for x in good]
    consumer, msgs = await _deliver(settings, topology, publisher, bodies)
    try:
        counts = await intake.handle_messages(msgs)
    finally:
        await consumer.__aexit__(None, None, None)
    assert counts.dead_lettered == 1
    [(body, reason)] = await _dead(settings, topology)
    assert body == bodies[2] and reason.startswith("progress message")
    for t in (a, b):
        assert await _history(engine, t) == RAN_ONCE
    assert (await service.get_task(victim)).state == State.STARTED
    assert await _runner_ids(engine) == {"r1", "r2"}
    assert await queue_depth(settings.amqp_url, topology.progress) == 0, "nothing requeued"


async def test_poison_that_cannot_be_dead_lettered_is_rejected_and_the_rest_applied(  # type: ignore[no-untyped-def]
    engine, service, publisher, settings, topology
) -> None:
    """The dead-letter publish fails (as during a memory alarm, past the publish timeout,
    or with the connection down): the poison message goes to the progress queue's own
    dead-letter exchange instead, and the rest of its batch is applied and acked. Before,
    the failure left the whole batch unsettled, and the next batch's `multiple` ack
    swept it away unapplied."""
    clock = Clock(datetime.now(UTC))
    [a] = await _running(engine, service, publisher, settings, clock, 1)
    down = Publisher(url=settings.amqp_url, topology=topology, name="down")
    await down.__aenter__()
    await down.__aexit__(None, None, None)  # closed: each of its publishes fails at once
    intake = ProgressIntake(engine=engine, publisher=down, settings=settings, clock=clock)
    bodies = [b"{not json", json.dumps(_report("r1", a, 1, "running")).encode()]
    bodies.append(json.dumps(_heartbeat("r1")).encode())
    consumer, msgs = await _deliver(settings, topology, publisher, bodies)
    try:
        counts = await intake.handle_messages(msgs)
    finally:
        await consumer.__aexit__(None, None, None)
    assert counts.dead_lettered == 1
    assert await _history(engine, a) == RAN_ONCE
    assert await _runner_ids(engine) == {"r1"}
    assert await queue_depth(settings.amqp_url, topology.progress) == 0, "nothing requeued"
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        dead = await (await conn.channel()).get_queue(topology.dead)
        m = await dead.get(no_ack=True, fail=False)
        assert m is not None and m.body == b"{not json"
        assert m.headers["x-death"][0]["reason"] == "rejected"  # type: ignore[index]
    finally:
        await conn.close()


async def test_message_refused_by_postgresql_is_isolated_and_dead_lettered(  # type: ignore[no-untyped-def]
    engine, service, publisher, settings, topology, database_url
) -> None:
    """Second line of defence: a message the models accept but PostgreSQL refuses (here
    a real CHECK constraint the test adds) fails alone; the rest of its batch is applied
    once and acked."""
    clock = Clock(datetime.now(UTC))
    ids = await _running(engine, service, publisher, settings, clock, 6)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    bodies = [encode(Heartbeat(runner_id="r0", pool="default", at=clock.now))]
    bodies += [json.dumps(_report("r1", t, 1, "running")).encode() for t in ids[:3]]
    bodies.append(json.dumps(_heartbeat("r1", host="poison")).encode())
    bodies += [json.dumps(_report("r1", t, 1, "running")).encode() for t in ids[3:]]
    pg = await asyncpg.connect(asyncpg_dsn(database_url))
    await pg.execute("alter table runners add constraint t_no_poison check (host <> 'poison')")
    try:
        consumer, msgs = await _deliver(settings, topology, publisher, bodies)
        try:
            counts = await intake.handle_messages(msgs)
        finally:
            await consumer.__aexit__(None, None, None)
        hosts = await pg.fetch("select id, host from runners order by id")
    finally:
        await pg.execute("alter table runners drop constraint t_no_poison")
        await pg.close()
    assert counts.dead_lettered == 1
    [(body, reason)] = await _dead(settings, topology)
    assert body == bodies[4] and "t_no_poison" in reason
    for t in ids:
        assert await _history(engine, t) == RAN_ONCE
    assert [r["id"] for r in hosts] == ["r0"]
    assert await queue_depth(settings.amqp_url, topology.progress) == 0, "nothing requeued"


async def test_rejections_back_off_and_are_not_failures(  # type: ignore[no-untyped-def]
    engine, service, publisher, settings
) -> None:
    """A full runner's rejection makes the task due again after an exponential delay with
    jitter (0.5-1 s, then 1-2 s, ... capped at 30 s), not at once, and never counts
    against max_attempts."""
    clock = Clock(datetime.now(UTC))
    [tid] = await _running(engine, service, publisher, settings, clock, 1)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    disp = Dispatcher(
        engine=engine,
        publisher=publisher,
        service=TaskService(engine=engine, clock=clock),
        settings=settings,
        clock=clock,
    )
    delays = []
    for attempt in range(1, 9):
        await intake.apply([RunnerReports.model_validate(_report("r1", tid, attempt, "rejected"))])
        last = (await service.history(tid))[-1]
        assert (last.state, last.attempt) == (State.RETRYING, attempt)
        delay = (datetime.fromisoformat(last.detail["retry_at"]) - clock.now).total_seconds()
        delays.append(delay)
        assert (await disp.poll_once()).claimed == 0, "not due again at once"
        clock.advance(delay + 0.01)
        assert (await disp.poll_once()).claimed == 1
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 2 <= delays[2] <= 4
    assert all(15 <= d <= 30 for d in delays[5:]), delays
    task = await service.get_task(tid)
    assert (task.state, task.attempt, task.failures) == (State.STARTED, 9, 0)


async def test_cancel_while_started_reaches_the_runner_that_later_takes_the_order(  # type: ignore[no-untyped-def]
    engine, service, settings, topology
) -> None:
    """A task cancelled while STARTED (its order sent, no runner known yet): the Stop goes
    to every runner of the task's pool, so the runner that takes the order afterwards
    never polls it (before: it polled until its stale RUNNING report earned a Stop)."""
    import httpx

    from manager.app import TaskManager
    from runners import TaskRunner
    from runners.signals import RunnerSignals
    from taskmgr.handlers import Registry
    from tests.helpers import drain

    calls: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, json={})

    await service.create_type(
        {"name": "poll", "handler": "noop", "url_template": "http://api/{g}", "poll_interval_s": 0.05}
    )
    clock = Clock(datetime.now(UTC) + timedelta(hours=1))
    [tid] = await schedule(service, "poll", 1, payload={"g": "one"}, due_at=clock.now)
    # The order is claimed and sent, but held back (to another prefix) until after the cancel.
    held = broker.Topology(prefix=f"{topology.prefix}h")
    try:
        async with Publisher(url=settings.amqp_url, topology=held) as side:
            disp = Dispatcher(
                engine=engine,
                publisher=side,
                service=TaskService(engine=engine, clock=clock),
                settings=settings,
                clock=clock,
            )
            assert (await disp.poll_once()).claimed == 1
        [order] = await drain(settings.amqp_url, held.start_queue("default"), expect=1)
    finally:
        await broker.delete_names(settings.amqp_url, held, pools=("default",))
    sig = RunnerSignals()
    async with (
        TaskManager(settings=settings, engine=engine) as manager,
        TaskRunner(
            settings=settings,
            registry=Registry.default(),
            runner_id="r-cancel",
            transport=httpx.MockTransport(api),
            signals=sig,
        ) as runner,
    ):
        stop, rstop = asyncio.Event(), asyncio.Event()
        run = asyncio.create_task(manager.run(stop))
        rrun = asyncio.create_task(runner.run(rstop))
        try:
            await asyncio.wait_for(manager.is_leader.wait(), 10)
            await sig.consuming.wait()  # its control queues are bound
            assert (await service.get_task(tid)).state is State.STARTED
            await service.cancel(tid, reason="no longer wanted")
            handled = await sig.stop_handled.wait(within_s=5)  # the Stop overtook the order
            assert handled.task_id == tid and sig.stopped.count == 0
            await manager.publisher.publish_start("default", order, message_id="late")
            await sig.duplicate_order.wait(within_s=5)
            assert sig.poller_started.count == 0 and calls == []
        finally:
            rstop.set()
            stop.set()
            await rrun
            await run
    assert (await service.get_task(tid)).state is State.CANCELLED


async def test_intake_and_recovery_take_locks_in_one_order(  # type: ignore[no-untyped-def]
    engine, service, publisher, settings
) -> None:
    """A runner's heartbeat and reports arrive while recovery declares it dead: both lock
    the runners row and the task_state rows of its tasks. Round after round, neither
    fails with a deadlock (PostgreSQL's DeadlockDetected)."""
    from manager.recovery import Recovery

    clock = Clock(datetime.now(UTC))
    await service.create_type({"name": "poll", "handler": "noop"})
    disp = Dispatcher(
        engine=engine,
        publisher=publisher,
        service=TaskService(engine=engine, clock=clock),
        settings=settings,
        clock=clock,
    )
    errors: list[BaseException] = []
    for _ in range(15):
        ids = await schedule(service, "poll", 100, due_at=clock.now - timedelta(seconds=1))
        await disp.poll_once()
        then = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
        running = RunnerReports(
            runner_id="r1",
            pool="default",
            reports=[Report(task_id=t, attempt=1, status="running", at=clock.now) for t in ids],
        )
        await then.apply([running, Heartbeat(runner_id="r1", pool="default", at=clock.now)])
        clock.advance(settings.runner_dead_after + 5)
        # r1 is back (its poll errors, then its heartbeat) just as recovery gives it up.
        back = RunnerReports(
            runner_id="r1",
            pool="default",
            reports=[Report(task_id=t, attempt=1, status="poll_error", at=clock.now) for t in ids],
        )
        hb = Heartbeat(runner_id="r1", pool="default", at=clock.now, tasks=[(t, 1) for t in ids])
        later = Clock(clock.now + timedelta(seconds=settings.runner_dead_after + 1))
        recovery = Recovery(engine=engine, settings=settings, clock=later)
        results = await asyncio.gather(then.apply([back, hb]), recovery.run_once(), return_exceptions=True)
        errors += [r for r in results if isinstance(r, BaseException)]
        clock.advance(settings.runner_dead_after + 5)
    assert errors == []
