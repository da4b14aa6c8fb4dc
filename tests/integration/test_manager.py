"""The Task Manager against the real PostgreSQL+TimescaleDB and RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import aio_pika
import pytest
from sqlalchemy import text

from manager.app import TaskManager, leader_present
from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from manager.recovery import Recovery, Retention
from manager.signals import ManagerSignals
from taskmgr import broker
from taskmgr.broker import Publisher
from taskmgr.messages import Heartbeat, Report, RunnerReports, ServiceReport, encode
from taskmgr.models import State
from taskmgr.service import TaskService
from tests.helpers import Clock, SlowConfirms, drain, queue_depth, schedule, start_orders, wait_for

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
async def poll_type(service: TaskService) -> str:
    await service.create_type(
        {"name": "poll", "handler": "noop", "max_attempts": 3, "backoff_base_s": 1, "backoff_max_s": 8}
    )
    return "poll"


def dispatcher(engine, publisher, settings, clock=None) -> Dispatcher:  # type: ignore[no-untyped-def]
    kw = {"clock": clock} if clock else {}
    return Dispatcher(
        engine=engine, publisher=publisher, service=TaskService(engine=engine, **kw), settings=settings, **kw
    )


async def events_of(engine, task_id) -> list[tuple[str, int, bool]]:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("select state, attempt, applied from task_events where task_id = :t order by seq"),
            {"t": task_id},
        )
        return [tuple(r) for r in rows]


async def test_poll_once_claims_due_tasks_and_sends_start_orders(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    now = datetime.now(UTC)
    due = await schedule(service, poll_type, 3, due_at=now - timedelta(seconds=1))
    later = await schedule(service, poll_type, 2, due_at=now + timedelta(hours=1))
    counts = await dispatcher(engine, publisher, settings).poll_once()
    assert (counts.claimed, counts.published) == (3, 3)
    bodies = await drain(settings.amqp_url, publisher.topology.start_queue("default"), expect=3)
    assert sorted(start_orders(bodies)) == sorted((t, 1) for t in due)
    for t in due:
        task = await service.get_task(t)
        assert (task.state, task.attempt) == (State.STARTED, 1)
    for t in later:
        assert (await service.get_task(t)).state == State.SCHEDULED
    # Nothing more is due: a second poll claims nothing.
    assert (await dispatcher(engine, publisher, settings).poll_once()).claimed == 0


async def test_three_overlapping_dispatchers_claim_each_task_once(
    engine,
    service,
    settings,
    topology,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """Even three leaders at once (a false takeover) claim and send each task once."""
    n = 5000
    ids = await schedule(service, poll_type, n, due_at=datetime.now(UTC) - timedelta(seconds=1))
    small = settings.model_copy(update={"dispatch_batch": 700})
    async with (
        Publisher(url=settings.amqp_url, topology=topology) as p1,
        Publisher(url=settings.amqp_url, topology=topology) as p2,
        Publisher(url=settings.amqp_url, topology=topology) as p3,
    ):
        results = await asyncio.gather(*(dispatcher(engine, p, small).poll_once() for p in (p1, p2, p3)))
    assert sum(r.claimed for r in results) == n
    assert sum(1 for r in results if r.claimed) >= 2, "the three dispatchers should have overlapped"
    orders = start_orders(await drain(settings.amqp_url, topology.start_queue("default"), expect=n))
    assert len(orders) == n and set(orders) == {(t, 1) for t in ids}
    async with engine.connect() as conn:
        started = (
            await conn.execute(
                text(
                    "select task_id, count(*) from task_events"
                    " where state = 'STARTED' and attempt = 1 group by task_id"
                )
            )
        ).all()
    assert len(started) == n and all(c == 1 for _, c in started)


async def test_claims_grow_from_a_small_first_batch_with_one_publish_in_flight(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """A burst is claimed 3, 6, 12, then 20 at a time (first batch, doubling, the batch
    cap), each batch's publish overlapping the next claim but never another publish; every
    task is claimed and sent once."""
    n = 100
    ids = await schedule(service, poll_type, n, due_at=datetime.now(UTC) - timedelta(seconds=1))
    disp = dispatcher(
        engine, publisher, settings.model_copy(update={"dispatch_first_batch": 3, "dispatch_batch": 20})
    )
    sending, most, claims_during_a_send = 0, 0, 0
    send, claim = disp._send, disp._claim_batch

    async def counted_send(*args, **kw):  # type: ignore[no-untyped-def]
        nonlocal sending, most
        sending += 1
        most = max(most, sending)
        try:
            await asyncio.sleep(0.05)  # a slow broker: the next claim runs meanwhile
            return await send(*args, **kw)
        finally:
            sending -= 1

    async def counted_claim(*args, **kw):  # type: ignore[no-untyped-def]
        nonlocal claims_during_a_send
        result = await claim(*args, **kw)
        claims_during_a_send += sending > 0  # the previous batch's publish still going
        return result

    disp._send, disp._claim_batch = counted_send, counted_claim  # type: ignore[method-assign]
    counts = await disp.poll_once()
    assert (counts.claimed, counts.published, counts.publish_failed) == (n, n, 0)
    assert most == 1, "at most one publish in flight"
    assert claims_during_a_send >= 5, "the claims should have overlapped the publishes"
    orders = start_orders(await drain(settings.amqp_url, publisher.topology.start_queue("default"), expect=n))
    assert sorted(orders) == sorted((t, 1) for t in ids)
    async with engine.connect() as conn:
        sizes = (
            (
                await conn.execute(
                    text(
                        "select count(*) from task_events where state = 'STARTED' group by time order by time"
                    )
                )
            )
            .scalars()
            .all()
        )
        unsent = (
            await conn.execute(
                text("select count(*) from task_state where state = 'STARTED' and sent_at is null")
            )
        ).scalar()
    assert sizes == [3, 6, 12, 20, 20, 20, 19]
    assert unsent == 0


async def test_failed_publish_stays_in_outbox_and_is_relayed_once(
    engine,
    service,
    settings,
    topology,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """The RabbitMQ connection is closed under the manager mid-dispatch: the claimed
    tasks stay in the outbox and reach the queue once the connection is back."""
    ids = await schedule(service, poll_type, 50, due_at=datetime.now(UTC) - timedelta(seconds=1))
    name = f"mgr-{uuid.uuid4().hex[:8]}"
    async with Publisher(url=settings.amqp_url, topology=topology, name=name) as pub:
        await pub.ensure_pool("default")
        closed = subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", await _connection_pid(name), "test closes it"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert closed.returncode == 0, closed.stderr
        counts = await dispatcher(engine, pub, settings).poll_once()
        assert counts.claimed == 50
        assert counts.publish_failed == 50, "the publish should have failed with the connection closed"
        # The robust connection comes back; the relay sends what the outbox holds.
        clock = Clock(datetime.now(UTC) + timedelta(seconds=10))
        relayed = await wait_for(lambda: dispatcher(engine, pub, settings, clock).relay_once(), timeout=20)
        assert relayed == 50
        assert await dispatcher(engine, pub, settings, clock).relay_once() == 0
    orders = start_orders(await drain(settings.amqp_url, topology.start_queue("default"), expect=50))
    assert sorted(orders) == sorted((t, 1) for t in ids)


async def _connection_pid(name: str) -> str:
    async def find() -> str | None:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            if f"{name}-publish" in line:
                return line.split("\t")[0]
        return None

    return await wait_for(find, timeout=15, every=0.3)


async def test_retries_with_backoff_then_failed(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    clock = Clock(datetime.now(UTC))
    [tid] = await schedule(service, poll_type, 1, due_at=clock.now - timedelta(seconds=1))
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    disp = dispatcher(engine, publisher, settings, clock)
    retry_delays = []
    for attempt in (1, 2, 3):
        assert (await disp.poll_once()).claimed == 1
        await intake.apply(
            [_reports("r1", (tid, attempt, "running")), _reports("r1", (tid, attempt, "failed"))]
        )
        task = await service.get_task(tid)
        if attempt < 3:
            assert (task.state, task.failures) == (State.RETRYING, attempt)
            [ev] = [e for e in await service.history(tid) if e.state == State.RETRYING and e.applied][-1:]
            delay = (datetime.fromisoformat(ev.detail["retry_at"]) - clock.now).total_seconds()
            retry_delays.append(delay)
            assert (await disp.poll_once()).claimed == 0, "not before its backoff"
            clock.advance(delay + 0.01)
        else:
            assert (task.state, task.failures) == (State.FAILED, 3)
    # Exponential with jitter: base 1 s -> [0.5, 1], then [1, 2].
    assert 0.5 <= retry_delays[0] <= 1 and 1 <= retry_delays[1] <= 2
    states = [s for s, _, applied in await events_of(engine, tid) if applied]
    assert states == [
        "SCHEDULED",
        "STARTED",
        "RUNNING",
        "RETRYING",
        "STARTED",
        "RUNNING",
        "RETRYING",
        "STARTED",
        "RUNNING",
        "FAILED",
    ]


def _reports(runner: str, *items: tuple[uuid.UUID, int, str]) -> RunnerReports:
    now = datetime.now(UTC)
    return RunnerReports(
        runner_id=runner,
        pool="default",
        reports=[Report(task_id=t, attempt=a, status=s, at=now) for t, a, s in items],
    )


async def test_dead_runner_tasks_are_dispatched_again_and_stale_reports_change_nothing(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    clock = Clock(datetime.now(UTC))
    ids = await schedule(service, poll_type, 3, due_at=clock.now - timedelta(seconds=1))
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    disp = dispatcher(engine, publisher, settings, clock)
    await disp.poll_once()
    hb = Heartbeat(runner_id="r1", pool="default", at=clock.now, tasks=[(t, 1) for t in ids])
    await intake.apply([_reports("r1", *((t, 1, "running") for t in ids)), hb])
    # r1 goes silent; past the dead-after timeout recovery gives its tasks back.
    clock.advance(settings.runner_dead_after + 1)
    counts = await Recovery(engine=engine, settings=settings, clock=clock).run_once()
    assert (counts.dead_runners, counts.from_dead_runners) == (1, 3)
    await disp.poll_once()
    for t in ids:
        task = await service.get_task(t)
        assert (task.state, task.attempt) == (State.STARTED, 2)
    await intake.apply([_reports("r2", *((t, 2, "running") for t in ids))])
    # r1 comes back from the dead with late reports for attempt 1: recorded, not applied.
    batch = await intake.apply([_reports("r1", (ids[0], 1, "finished"), (ids[1], 1, "poll_error"))])
    assert [(s.task_id, s.attempt) for _, s in batch.stops] == [(ids[1], 1)]
    for t in ids:
        task = await service.get_task(t)
        assert (task.state, task.attempt, task.runner_id) == (State.RUNNING, 2, "r2")
    last = (await service.history(ids[0]))[-1]
    assert (last.applied, last.attempt, last.detail["stale"], last.detail["report"]) == (
        False,
        1,
        True,
        "finished",
    )


async def test_start_order_nobody_takes_is_dispatched_again(
    engine,
    service,
    publisher,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    await service.create_type({"name": "quick", "handler": "noop", "start_timeout_s": 5})
    clock = Clock(datetime.now(UTC))
    [tid] = await schedule(service, "quick", 1, due_at=clock.now)
    disp = dispatcher(engine, publisher, settings, clock)
    await disp.poll_once()
    clock.advance(6)
    assert (await Recovery(engine=engine, settings=settings, clock=clock).run_once()).start_timeouts == 1
    await disp.poll_once()
    assert (await service.get_task(tid)).attempt == 2


async def test_an_order_nobody_ever_takes_fails_after_a_bounded_number_of_tries(
    engine,
    service,
    publisher,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    """A pool nobody consumes: not re-sent every start timeout forever."""
    from manager.recovery import MAX_UNDELIVERED

    await service.create_type({"name": "orphan", "handler": "noop", "start_timeout_s": 5, "pool": "nobody"})
    clock = Clock(datetime.now(UTC))
    [tid] = await schedule(service, "orphan", 1, due_at=clock.now)
    disp = dispatcher(engine, publisher, settings, clock)
    recovery = Recovery(engine=engine, settings=settings, clock=clock)
    for _ in range(MAX_UNDELIVERED):
        assert (await disp.poll_once()).claimed == 1
        clock.advance(6)
        assert (await recovery.run_once()).start_timeouts == 1
    task = await service.get_task(tid)
    assert (task.state, task.attempt) == (State.FAILED, MAX_UNDELIVERED)
    reason = (await service.history(tid))[-1].detail["reason"]
    assert f"no runner took its start order {MAX_UNDELIVERED} times" in reason
    assert (await disp.poll_once()).claimed == 0


async def test_undelivered_orders_are_counted_in_a_row_since_the_task_last_ran(
    engine, service, publisher, settings
) -> None:  # type: ignore[no-untyped-def]
    """Start timeouts count towards MAX_UNDELIVERED only in a row: a runner reporting
    RUNNING resets the count, so a long-lived task that met a few restarts of its pool
    over its life does not fail for them."""
    from manager.recovery import MAX_UNDELIVERED

    await service.create_type({"name": "quick", "handler": "noop", "start_timeout_s": 5})
    clock = Clock(datetime.now(UTC))
    [tid] = await schedule(service, "quick", 1, due_at=clock.now)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    disp = dispatcher(engine, publisher, settings, clock)
    recovery = Recovery(engine=engine, settings=settings, clock=clock)

    async def undelivered_times(n: int) -> None:
        for _ in range(n):
            assert (await disp.poll_once()).claimed == 1
            clock.advance(6)
            assert (await recovery.run_once()).start_timeouts == 1

    await undelivered_times(MAX_UNDELIVERED - 1)
    await disp.poll_once()
    attempt = (await service.get_task(tid)).attempt
    await intake.apply(
        [Heartbeat(runner_id="r1", pool="default", at=clock.now), _reports("r1", (tid, attempt, "running"))]
    )
    assert (await service.get_task(tid)).state is State.RUNNING
    clock.advance(settings.runner_dead_after + 1)
    assert (await recovery.run_once()).from_dead_runners == 1
    await undelivered_times(MAX_UNDELIVERED - 1)
    assert (await service.get_task(tid)).state is State.RETRYING
    await undelivered_times(1)
    assert (await service.get_task(tid)).state is State.FAILED


async def test_a_task_whose_runners_keep_dying_fails(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """A task that kills its runner does not walk through the pool: after a bounded
    number of deaths of the runner holding it, it fails; a task whose runner died
    fewer times is dispatched again."""
    from manager.recovery import MAX_RUNNER_DEATHS

    clock = Clock(datetime.now(UTC))
    poison, lucky = await schedule(service, poll_type, 2, due_at=clock.now)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    disp = dispatcher(engine, publisher, settings, clock)
    recovery = Recovery(engine=engine, settings=settings, clock=clock)
    for death in range(1, MAX_RUNNER_DEATHS + 1):
        await disp.poll_once()
        runner = f"r{death}"
        held = [(poison, death, "running")] + ([(lucky, death, "running")] if death == 1 else [])
        await intake.apply(
            [Heartbeat(runner_id=runner, pool="default", at=clock.now), _reports(runner, *held)]
        )
        clock.advance(settings.runner_dead_after + 1)
        assert (await recovery.run_once()).dead_runners == 1
    task = await service.get_task(poison)
    assert task.state == State.FAILED
    assert (
        f"its runners died {MAX_RUNNER_DEATHS} times soon after it started on them"
        in (await service.history(poison))[-1].detail["reason"]
    )
    assert [e.detail.get("counted") for e in await service.history(poison) if e.detail.get("recovery")] == [
        True
    ] * MAX_RUNNER_DEATHS
    assert (await service.get_task(lucky)).state in (State.RETRYING, State.STARTED)


async def test_a_burst_of_late_tasks_is_one_warning_per_poll(
    engine,
    service,
    publisher,
    settings,
    poll_type,
    caplog,  # type: ignore[no-untyped-def]
) -> None:
    """Ten thousand late tasks once logged ten thousand warnings, and a manager whose
    stderr was a full pipe stalled on them (no renewals: its lease ran out). One line
    per poll now, naming the latest task; every start is still in the histogram."""
    clock = Clock(datetime.now(UTC) + timedelta(seconds=60))  # every task 60 s late
    await schedule(service, poll_type, 50, due_at=datetime.now(UTC))
    with caplog.at_level("WARNING", logger="manager.dispatch"):
        counts = await dispatcher(engine, publisher, settings, clock).poll_once()
    assert (counts.claimed, counts.late) == (50, 50)
    late = [r for r in caplog.records if r.name == "manager.dispatch" and "after" in r.getMessage()]
    assert len(late) == 1, [r.getMessage() for r in late]
    assert late[0].getMessage().startswith("50 tasks started more than 10 s after they were due")


async def test_runner_deaths_long_after_the_task_started_do_not_fail_it(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """Only a death soon after the task started on its runner says the task may have
    killed it: runners killed long into a task's run (the chaos day's SIGKILLs during a
    game) count for nothing, however often; quick deaths still do (the test above)."""
    from manager.recovery import MAX_RUNNER_DEATHS

    clock = Clock(datetime.now(UTC))
    [tid] = await schedule(service, poll_type, 1, due_at=clock.now)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    disp = dispatcher(engine, publisher, settings, clock)
    recovery = Recovery(engine=engine, settings=settings, clock=clock)
    tt = await service.get_type(poll_type)
    window = recovery.quick_death_window_s(tt.poll_interval_s, tt.request_timeout_s)
    for death in range(1, MAX_RUNNER_DEATHS + 3):
        await disp.poll_once()
        runner = f"r{death}"
        await intake.apply(
            [
                Heartbeat(runner_id=runner, pool="default", at=clock.now),
                _reports(runner, (tid, death, "running")),
            ]
        )
        clock.advance(window + 5)  # it ran a while, heartbeating, then its runner died
        await intake.apply([Heartbeat(runner_id=runner, pool="default", at=clock.now, tasks=[(tid, death)])])
        clock.advance(settings.runner_dead_after + 1)
        assert (await recovery.run_once()).from_dead_runners == 1
        task = await service.get_task(tid)
        assert task.state == State.RETRYING, f"death {death}: {task.state}"
        last = (await service.history(tid))[-1].detail
        assert (last["recovery"], last["counted"], last["times"]) == ("runner_dead", False, 0)
        assert last["held_s"] > last["window_s"] == round(window, 3)
    # A quick death after all those: the first that counts.
    await disp.poll_once()
    await intake.apply(
        [Heartbeat(runner_id="quick", pool="default", at=clock.now), _reports("quick", (tid, 6, "running"))]
    )
    clock.advance(settings.runner_dead_after + 1)
    assert (await recovery.run_once()).from_dead_runners == 1
    last = (await service.history(tid))[-1].detail
    assert (last["counted"], last["times"]) == (True, 1)
    assert (await service.get_task(tid)).state == State.RETRYING


async def test_heartbeat_reconciles_what_a_runner_holds(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    clock = Clock(datetime.now(UTC))
    a, b, c = await schedule(service, poll_type, 3, due_at=clock.now)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    await dispatcher(engine, publisher, settings, clock).poll_once()
    await intake.apply([_reports("r1", (a, 1, "running"), (b, 1, "running"))])
    await service.cancel(c)
    # r1 claims to hold c (cancelled) and an unknown attempt of a, and has dropped b.
    batches = []
    for step in range(3):
        clock.advance(settings.heartbeat_interval * 2)
        hb = Heartbeat(runner_id="r1", pool="default", at=clock.now, tasks=[(a, 1), (c, 1), (a, 7)])
        batches.append(await intake.apply([hb]))
        if step == 0:
            assert (await service.get_task(b)).state == State.RUNNING, "not lost after one heartbeat"
    assert {(s.task_id, s.attempt) for _, s in batches[0].stops} == {(c, 1), (a, 7)}
    assert (await service.get_task(b)).state == State.RETRYING
    assert (await service.get_task(a)).state == State.RUNNING


async def test_required_services_decide_the_overall_state(
    engine,
    service,
    publisher,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    await service.create_type(
        {"name": "photos", "handler": "noop", "required_services": ["photo", "caption"]}
    )
    clock = Clock(datetime.now(UTC))
    ok, bad = await schedule(service, "photos", 2, due_at=clock.now)
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    await dispatcher(engine, publisher, settings, clock).poll_once()

    def svc(task: uuid.UUID, name: str, state: str) -> ServiceReport:
        return ServiceReport(service=name, task_id=task, state=state, at=clock.now)

    await intake.apply(
        [_reports("r1", (ok, 1, "running"), (bad, 1, "running")), svc(ok, "photo", "FINISHED")]
    )
    await intake.apply([_reports("r1", (ok, 1, "finished"), (bad, 1, "finished"))])
    assert (await service.get_task(ok)).state == State.RUNNING, "caption has not reported yet"
    await intake.apply(
        [svc(ok, "caption", "FINISHED"), svc(bad, "caption", "FINISHED"), svc(bad, "photo", "FAILED")]
    )
    assert (await service.get_task(ok)).state == State.FINISHED
    failed = await service.get_task(bad)
    assert failed.state == State.FAILED
    assert (await service.history(bad))[-1].detail == {
        "services_failed": ["photo"],
        "services_finished": ["caption"],
    }


async def test_cancel_before_and_during_a_run(
    engine,
    service,
    publisher,
    settings,
    topology,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    clock = Clock(datetime.now(UTC))
    before, during = await schedule(service, poll_type, 2, due_at=clock.now + timedelta(seconds=5))
    await service.cancel(before)
    disp = dispatcher(engine, publisher, settings, clock)
    clock.advance(10)
    # `during` is claimed and taken by a runner; `before` is never dispatched.
    assert (await disp.poll_once()).claimed == 1
    intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings, clock=clock)
    await intake.apply([_reports("r1", (during, 1, "running"))])
    # A running task's cancel reaches its runner as a Stop on its control queue.
    got: asyncio.Queue[bytes] = asyncio.Queue()
    async with broker.Consumer(url=settings.amqp_url, topology=topology, prefetch=10) as consumer:

        async def on_stop(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            await m.ack()
            await got.put(m.body)

        await consumer.consume_control("r1", on_stop)
        async with TaskManager(settings=settings, engine=engine) as manager:
            stop = asyncio.Event()
            run = asyncio.create_task(manager.run(stop))
            await asyncio.wait_for(manager.is_leader.wait(), 10)
            await service.cancel(during, reason="abandoned")
            async with asyncio.timeout(10):
                body = await got.get()
            stop.set()
            await run
    assert b'"reason":"cancelled"' in body and str(during).encode() in body
    assert [s for s, _, _ in await events_of(engine, before)] == ["SCHEDULED", "CANCELLED"]
    assert (await service.get_task(during)).state == State.CANCELLED


async def test_malformed_and_unknown_progress_messages_are_dead_lettered(
    engine,
    service,
    settings,
    topology,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    signals = ManagerSignals()
    async with TaskManager(settings=settings, engine=engine, signals=signals) as manager:
        stop = asyncio.Event()
        run = asyncio.create_task(manager.run(stop))
        await asyncio.wait_for(manager.is_leader.wait(), 10)
        pub = manager.publisher
        await pub.publish_progress(b"{not json")
        await pub.publish_progress(b'{"kind": "heartbeat", "runner_id": 5}')
        await pub.publish_progress(encode(_reports("r1", (uuid.uuid4(), 1, "running"))))
        await pub.publish_progress(encode(Heartbeat(runner_id="ok", pool="default", at=datetime.now(UTC))))
        await signals.wait_for(lambda: signals.intake.messages >= 4)
        stop.set()
        await run
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        ch = await conn.channel()
        q = await ch.get_queue(topology.dead)
        reasons = []
        while (m := await q.get(no_ack=True, fail=False)) is not None:
            reasons.append(m.headers[broker.REASON_HEADER])
    finally:
        await conn.close()
    assert len(reasons) == 3
    assert any("unknown task" in r for r in reasons)
    assert any("runner_id" in r for r in reasons)
    assert signals.intake.heartbeats == 1, "the manager went on"


async def _ready(value: bool) -> bool:
    return value


async def test_manager_dispatches_on_wakeup_and_one_leads(
    engine,
    service,
    settings,
    topology,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    slow = settings.model_copy(update={"poll_interval": 30.0})
    stop = asyncio.Event()
    s1, s2 = ManagerSignals(), ManagerSignals()
    async with (
        TaskManager(settings=slow, engine=engine, signals=s1) as m1,
        TaskManager(settings=slow, engine=engine, signals=s2) as m2,
    ):
        runs = [asyncio.create_task(m.run(stop)) for m in (m1, m2)]
        await wait_for(lambda: _ready(m1.is_leader.is_set() or m2.is_leader.is_set()))
        assert await leader_present(engine)
        await asyncio.sleep(0)  # the other one must stay a standby
        assert not (m1.is_leader.is_set() and m2.is_leader.is_set())
        signals = s1 if m1.is_leader.is_set() else s2
        await signals.dispatch_polled.wait()  # the leader's first (empty) poll
        assert signals.dispatched.claimed == 0
        # Due now: the NOTIFY at commit wakes the leader long before its 30 s poll.
        await schedule(service, poll_type, 5)
        orders = start_orders(
            await drain(settings.amqp_url, topology.start_queue("default"), expect=5, timeout=5)
        )
        assert len(orders) == 5
        await signals.wait_for(lambda: signals.dispatched.claimed == 5)
        stop.set()
        await asyncio.gather(*runs)
    assert not await leader_present(engine)


async def test_recurring_interval_task_schedules_its_next_occurrence(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    clock = Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    async with service.session() as s, s.begin():
        first = (
            await service.schedule(
                s, poll_type, {}, due_at=clock.now, recurrence={"every_s": 60, "ends_after": 3}
            )
        ).id
    disp = dispatcher(engine, publisher, settings, clock)
    dues = []
    for _ in range(4):
        await disp.poll_once()
        clock.advance(60)
    tasks = await service.list_tasks(root_id=first, limit=10)
    dues = [t.due_at for t in tasks]
    assert dues == [datetime(2026, 3, 1, 12, m, tzinfo=UTC) for m in (0, 1, 2)]
    assert [t.occurrence for t in tasks] == [1, 2, 3]
    assert all(t.state == State.STARTED for t in tasks)


async def test_cron_recurrence_keeps_local_time_across_dst(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """09:30 in New York every day across the March 2026 change (8 March)."""
    ny = ZoneInfo("America/New_York")
    clock = Clock(datetime(2026, 3, 6, 9, 30, tzinfo=ny).astimezone(UTC))
    async with service.session() as s, s.begin():
        first = (
            await service.schedule(
                s,
                poll_type,
                {},
                due_at=clock.now,
                recurrence={"cron": "30 9 * * *", "timezone": "America/New_York"},
            )
        ).id
    disp = dispatcher(engine, publisher, settings, clock)
    for _ in range(4):
        await disp.poll_once()
        clock.advance(24 * 3600)
    tasks = await service.list_tasks(root_id=first, limit=10)
    local = [t.due_at.astimezone(ny) for t in tasks]
    assert [(d.day, d.hour, d.minute) for d in local] == [
        (6, 9, 30),
        (7, 9, 30),
        (8, 9, 30),
        (9, 9, 30),
        (10, 9, 30),
    ]
    utc_hours = [t.due_at.astimezone(UTC).hour for t in tasks]
    assert utc_hours == [14, 14, 13, 13, 13]


async def test_a_rule_that_cannot_fire_fails_its_task_not_the_batch(
    engine,
    service,
    publisher,
    settings,
    poll_type,  # type: ignore[no-untyped-def]
) -> None:
    """A rule written past the checks (straight into the table; or a timezone database
    update) fails its own task at dispatch; the one-off and recurring tasks due in the
    same poll are dispatched."""
    clock = Clock(datetime.now(UTC))
    due = clock.now - timedelta(seconds=1)
    one_offs = await schedule(service, poll_type, 3, due_at=due)
    async with service.session() as s, s.begin():
        good = (await service.schedule(s, poll_type, {}, due_at=due, recurrence={"every_s": 60})).id
        bad = [
            (await service.schedule(s, poll_type, {}, due_at=due, recurrence={"every_s": 60})).id
            for _ in range(2)
        ]
    async with engine.begin() as conn:
        await conn.execute(
            text("update tasks set recurrence = cast(:r as jsonb) where id = :id"),
            {"r": '{"cron": "0 0 30 2 *", "timezone": "UTC"}', "id": bad[0]},
        )
        await conn.execute(
            text("update tasks set recurrence = cast(:r as jsonb) where id = :id"),
            {"r": '{"cron": "0 9 * * *", "timezone": "Mars/Base"}', "id": bad[1]},
        )
    counts = await dispatcher(engine, publisher, settings, clock).poll_once()
    assert (counts.claimed, counts.bad_rules, counts.next_occurrences) == (4, 2, 1)
    for tid in [*one_offs, good]:
        assert (await service.get_task(tid)).state == State.STARTED
    for tid in bad:
        task = await service.get_task(tid)
        assert task.state == State.FAILED
        [failed] = [e for e in await service.history(tid) if e.state == State.FAILED]
        assert "recurrence rule cannot be evaluated" in failed.detail["reason"]


@pytest.mark.parametrize(
    ("policy", "expected_runs", "expected_next_minute"),
    [("coalesce", 1, 11), ("catch_up", 1, 1), ("skip", 0, 11)],
)
async def test_misfire_policies_after_a_manager_outage(
    engine,
    service,
    publisher,
    settings,
    policy,
    expected_runs,
    expected_next_minute,  # type: ignore[no-untyped-def]
) -> None:
    """Every minute from 12:00; the manager is down until 12:10:30."""
    await service.create_type(
        {"name": "tick", "handler": "noop", "misfire_policy": policy, "misfire_grace_s": 30}
    )
    start = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    async with service.session() as s, s.begin():
        first = (await service.schedule(s, "tick", {}, due_at=start, recurrence={"every_s": 60})).id
    clock = Clock(start + timedelta(minutes=10, seconds=30))
    await dispatcher(engine, publisher, settings, clock).poll_once()
    tasks = await service.list_tasks(root_id=first, limit=10)
    assert len(tasks) == 2
    runs = sum(1 for t in tasks if t.state == State.STARTED)
    assert runs == expected_runs
    assert tasks[1].due_at == start + timedelta(minutes=expected_next_minute)
    if policy == "skip":
        assert tasks[0].state == State.CANCELLED


async def test_lateness_is_recorded_and_alerted(
    engine,
    service,
    publisher,
    settings,
    poll_type,
    caplog,  # type: ignore[no-untyped-def]
) -> None:
    now = datetime.now(UTC)
    [late] = await schedule(service, poll_type, 1, due_at=now)
    [ontime] = await schedule(service, poll_type, 1, due_at=now + timedelta(seconds=30))
    [backdated] = await schedule(service, poll_type, 1, due_at=now - timedelta(hours=1))
    # The manager gets to them 30 s after `late` was due (an outage, say).
    counts = await dispatcher(engine, publisher, settings, Clock(now + timedelta(seconds=30))).poll_once()
    assert (counts.claimed, counts.late) == (3, 2)
    started = {
        t: next(e for e in await service.history(t) if e.state == State.STARTED)
        for t in (late, ontime, backdated)
    }
    assert 29_000 <= started[late].detail["lateness_ms"] <= 30_000
    assert started[ontime].detail["lateness_ms"] == 0
    # Scheduled with a due time already past: late only from its creation.
    assert 29_000 <= started[backdated].detail["lateness_ms"] <= 30_000
    [alert] = [r for r in caplog.records if "after they were due" in r.getMessage()]
    assert alert.getMessage().startswith("2 tasks started more than 10 s")
    assert getattr(alert, "task_id", None) in (str(late), str(backdated)), "it names the latest"


async def test_retention_drops_old_chunks_only(engine, service, settings, poll_type) -> None:  # type: ignore[no-untyped-def]
    [tid] = await schedule(service, poll_type, 1)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "insert into task_events (time, task_id, state, attempt, source) values"
                " (now() - interval '90 days', :t, 'SCHEDULED', 0, 'test'),"
                " (now() - interval '60 days', :t, 'SCHEDULED', 0, 'test')"
            ),
            {"t": tid},
        )
    dropped = await Retention.of_task_events(
        engine=engine, settings=settings.model_copy(update={"retention_days": 30})
    ).run_once()
    assert dropped == 2
    assert [s for s, _, _ in await events_of(engine, tid)] == ["SCHEDULED"]


async def test_start_messages_are_split_by_bytes_as_well_as_count(
    engine, service, publisher, settings, topology
) -> None:  # type: ignore[no-untyped-def]
    """Ten orders of ~60 KiB payloads: never more than 256 KiB of JSON in one AMQP
    message (the count limit alone would put them all in one)."""
    from manager.dispatch import MAX_START_MESSAGE_BYTES

    await service.create_type({"name": "big", "handler": "noop"})
    now = datetime.now(UTC)
    async with service.session() as s, s.begin():
        for i in range(10):
            await service.schedule(
                s, "big", {"blob": f"{i}" + "x" * 60_000}, due_at=now - timedelta(seconds=1)
            )
    assert (await dispatcher(engine, publisher, settings).poll_once()).published == 10
    bodies = await drain(settings.amqp_url, topology.start_queue("default"), expect=10)
    assert len(start_orders(bodies)) == 10
    assert all(len(b) <= MAX_START_MESSAGE_BYTES for b in bodies), [len(b) for b in bodies]
    assert len(bodies) >= 3


async def test_the_relay_never_resends_an_order_its_publisher_still_waits_on(
    engine, service, settings, topology
) -> None:  # type: ignore[no-untyped-def]
    """A broker slow to confirm (past RELAY_AFTER_S): the relay must not publish the
    same order again meanwhile."""
    from manager.dispatch import RELAY_AFTER_S

    clock = Clock(datetime.now(UTC))
    await service.create_type({"name": "box", "handler": "noop"})
    [tid] = await schedule(service, "box", 1, due_at=clock.now)
    async with SlowConfirms(url=settings.amqp_url, topology=topology) as slow:
        disp = dispatcher(engine, slow, settings, clock)
        first = asyncio.create_task(disp.poll_once())
        async with asyncio.timeout(5):
            while (await service.get_task(tid)).state is not State.STARTED:
                await asyncio.sleep(0.02)
        clock.advance(RELAY_AFTER_S + 1)
        relay = asyncio.create_task(disp.relay_once())
        await asyncio.sleep(0.2)
        slow.release.set()
        assert await relay == 0
        assert (await first).published == 1
    bodies = await drain(settings.amqp_url, topology.start_queue("default"), expect=1)
    assert start_orders(bodies) == [(tid, 1)]


async def test_the_relay_never_sends_a_claimed_batch_waiting_for_the_publish_before_it(
    engine, service, settings, topology
) -> None:  # type: ignore[no-untyped-def]
    """A claim overlaps the publish of the batch before it. While that publish waits for
    slow confirms (past RELAY_AFTER_S), the next batch is claimed and committed unsent:
    the relay must leave it alone too, or its orders go out twice (once by the relay,
    once by the poll)."""
    from manager.dispatch import RELAY_AFTER_S

    clock = Clock(datetime.now(UTC))
    small = settings.model_copy(update={"dispatch_first_batch": 1, "dispatch_batch": 2})
    await service.create_type({"name": "box", "handler": "noop"})
    ids = await schedule(service, "box", 3, due_at=clock.now)
    async with SlowConfirms(url=settings.amqp_url, topology=topology) as slow:
        disp = dispatcher(engine, slow, small, clock)
        poll = asyncio.create_task(disp.poll_once())

        async def started() -> int:
            return sum([(await service.get_task(t)).state is State.STARTED for t in ids])

        async with asyncio.timeout(5):
            while await started() < 3:  # the first batch publishing, the second claimed
                await asyncio.sleep(0.02)
        clock.advance(RELAY_AFTER_S + 1)
        relay = asyncio.create_task(disp.relay_once())
        await asyncio.sleep(0.3)
        slow.release.set()
        assert await relay == 0
        assert (await poll).published == 3
    bodies = await drain(settings.amqp_url, topology.start_queue("default"), expect=3)
    assert sorted(start_orders(bodies)) == sorted((t, 1) for t in ids)


async def test_a_start_order_expires_after_its_start_timeout(
    engine, service, publisher, settings, topology
) -> None:  # type: ignore[no-untyped-def]
    """Nobody consumes the pool: the order does not pile up in its queue."""
    # 2 s: long enough to see the order queued on a loaded machine (0.5 s was not, in a
    # full suite beside other work), short enough to see it go.
    await service.create_type({"name": "brief", "handler": "noop", "start_timeout_s": 2, "pool": "bench"})
    await schedule(service, "brief", 1, due_at=datetime.now(UTC))
    assert (await dispatcher(engine, publisher, settings).poll_once()).published == 1
    queue = topology.start_queue("bench")
    assert await queue_depth(settings.amqp_url, queue) == 1
    async with asyncio.timeout(8):
        while await queue_depth(settings.amqp_url, queue):
            await asyncio.sleep(0.1)


async def test_an_unroutable_start_order_stays_in_the_outbox(
    engine, service, publisher, settings, topology, poll_type
) -> None:  # type: ignore[no-untyped-def]
    """The pool's queue is deleted after the publisher declared it: the broker returns
    the mandatory order (basic.return) and it must not count as sent; the relay sends it
    once the queue is declared again."""
    [tid] = await schedule(service, poll_type, 1, due_at=datetime.now(UTC) - timedelta(seconds=1))
    queue = topology.start_queue("default")
    await publisher.ensure_pool("default")
    conn = await aio_pika.connect(settings.amqp_url)
    async with conn:
        await (await conn.channel()).queue_delete(queue)
    counts = await dispatcher(engine, publisher, settings).poll_once()
    assert counts.claimed == 1
    assert counts.published == 0 and counts.publish_failed == 1, "a returned order counted as sent"
    clock = Clock(datetime.now(UTC) + timedelta(seconds=10))
    assert await dispatcher(engine, publisher, settings, clock).relay_once() == 1
    assert start_orders(await drain(settings.amqp_url, queue, expect=1)) == [(tid, 1)]
