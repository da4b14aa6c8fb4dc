"""Small helpers for tests that talk to the real services (those shared with the
benchmarks are taskmgr.testing's)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from prometheus_client.parser import text_string_to_metric_families

from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from task_types.game import LiveGameHandler
from task_types.noop import NoopHandler
from task_types.period_score import PeriodScoreHandler
from task_types.schedule import ScheduleHandler
from task_types.stat_correction import StatCorrectionHandler
from taskmgr.broker import Publisher, Topology
from taskmgr.db import make_engine
from taskmgr.handlers import Registry
from taskmgr.messages import Report, RunnerReports, StartBatch, decode_start
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings

# Re-exported for the tests: one copy, shared with the benchmarks.
from taskmgr.testing import amqp_as as amqp_as
from taskmgr.testing import as_role as as_role
from taskmgr.testing import free_port as free_port
from taskmgr.testing import wait_for as wait_for

# The checkout, and the recorded API responses (tests/fixtures/README.md).
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


async def schedule(
    service: TaskService,
    type_: str,
    n: int,
    *,
    due_at: datetime | None = None,
    payload: dict[str, Any] | None = None,
    **kw: Any,
) -> list[uuid.UUID]:
    async with service.session() as session, session.begin():
        done = await service.schedule_many(
            session, [NewTask(type_, payload or {}, due_at=due_at, **kw) for _ in range(n)]
        )
    return [d.id for d in done]


async def create(service: TaskService, *news: NewTask) -> list[uuid.UUID]:
    async with service.session() as session, session.begin():
        return [s.id for s in await service.schedule_many(session, list(news))]


class Runs:
    """Dispatch what is due and report it ended, as a runner would (in this process)."""

    def __init__(self, engine: Any, publisher: Publisher, settings: Settings, service: TaskService) -> None:
        self.dispatcher = Dispatcher(engine=engine, publisher=publisher, service=service, settings=settings)
        self.intake = ProgressIntake(engine=engine, publisher=publisher, settings=settings)

    async def dispatch(self) -> int:
        return (await self.dispatcher.poll_once()).claimed

    async def end(self, tid: uuid.UUID, status: str = "finished", attempt: int = 1) -> None:
        now = datetime.now(UTC)
        reports = [
            Report(task_id=tid, attempt=attempt, status=s, at=now)  # type: ignore[arg-type]
            for s in ("running", status)
        ]
        await self.intake.apply([RunnerReports(runner_id="r1", pool="default", reports=reports)])


async def drain(url: str, queue: str, *, expect: int | None = None, timeout: float = 10.0) -> list[bytes]:
    """Take every message from a queue (acking them). With `expect`, wait until that
    many start orders have arrived (the queue may not exist yet)."""
    conn = await aio_pika.connect(url)
    bodies: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                ch = await conn.channel()
                try:
                    q = await ch.get_queue(queue, ensure=True)
                except aio_pika.exceptions.ChannelClosed:  # not declared yet
                    await asyncio.sleep(0.05)
                    continue
                while (msg := await q.get(no_ack=True, fail=False)) is not None:
                    bodies.append(msg.body)
                await ch.close()
                if expect is None or _orders(bodies) >= expect:
                    break
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    return bodies


def _orders(bodies: list[bytes]) -> int:
    n = 0
    for b in bodies:
        try:
            n += len(decode_start(b).orders)
        except Exception:
            n += 1
    return n


def start_orders(bodies: list[bytes]) -> list[tuple[uuid.UUID, int]]:
    out = []
    for b in bodies:
        batch: StartBatch = decode_start(b)
        out.extend((o.task_id, o.attempt) for o in batch.orders)
    return out


async def queue_depth(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return q.declaration_result.message_count or 0
    finally:
        await conn.close()


class SlowConfirms(Publisher):
    """A broker slow to confirm: start orders wait for `release` before they go out."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = asyncio.Event()

    async def publish_start(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await self.release.wait()
        await super().publish_start(*args, **kwargs)


def topology_of(prefix: str) -> Topology:
    return Topology(prefix)


class Clock:
    """A clock the test moves: pass it as `clock=` to the manager's components."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def sports_registry(bases: dict[str, str]) -> Registry:
    """The built-in handlers, the sports ones calling `bases` (the feed under test)."""
    return Registry(
        [
            NoopHandler(),
            LiveGameHandler(bases),
            PeriodScoreHandler(bases),
            StatCorrectionHandler(bases),
            ScheduleHandler(bases),
        ]
    )


# -- poison progress messages: each decodes as JSON but breaks a bound of the contracts --

POISON_AT = "2026-11-24T12:00:00+00:00"


def poison_heartbeat(**changes: Any) -> dict[str, Any]:
    """A heartbeat body (valid unless `changes` break it)."""
    body = {"kind": "heartbeat", "runner_id": "r1", "pool": "default", "at": POISON_AT, "tasks": []}
    return {**body, **changes}


def poison_report(task_id: str, **changes: Any) -> dict[str, Any]:
    """A body of one runner report (valid unless `changes` break it)."""
    one = {"task_id": task_id, "attempt": 1, "status": "running", "at": POISON_AT, **changes}
    return {"kind": "reports", "runner_id": "r1", "pool": "default", "reports": [one]}


POISON = {
    "attempt beyond int32": poison_report(str(uuid.uuid4()), attempt=2**31),
    "pid beyond int32": poison_heartbeat(pid=2**40),
    "NUL in detail": poison_report(str(uuid.uuid4()), detail={"error": "bad\u0000byte"}),
    "NUL in a detail key": poison_report(str(uuid.uuid4()), detail={"e\u0000": 1}),
    "oversized detail": poison_report(str(uuid.uuid4()), detail={"blob": "x" * 100_000}),
    "NUL in runner_id": poison_heartbeat(runner_id="r\u00001"),
    "naive time": poison_heartbeat(at="2026-11-24T12:00:00"),
    "NaN in detail": poison_report(str(uuid.uuid4()), detail={"x": float("nan")}),
}


# -- Prometheus samples, scraped from a /metrics endpoint ----------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    return parse(response.text)


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


async def run_until(
    database_url: str,
    settings: Settings,
    api: Callable[[httpx.Request], httpx.Response],
    done: Callable[[], Awaitable[bool]],
    timeout: float = 30,
) -> None:
    """A manager as taskmgr_manager (database and broker) and a runner as taskmgr_runner
    (broker only: no database connection), in this process, with `api` as the sports
    API, until `done()`."""
    from manager.app import TaskManager
    from runners import TaskRunner

    m_engine = make_engine(as_role(database_url, "taskmgr_manager"))
    stop = asyncio.Event()
    try:
        async with (
            TaskManager(
                settings=settings.model_copy(
                    update={"amqp_url": amqp_as(settings.amqp_url, "taskmgr_manager")}
                ),
                engine=m_engine,
            ) as m,
            TaskRunner(
                settings=settings.model_copy(
                    update={"amqp_url": amqp_as(settings.amqp_url, "taskmgr_runner")}
                ),
                registry=Registry.default(),
                transport=httpx.MockTransport(api),
            ) as r,
        ):
            runs = [asyncio.create_task(m.run(stop)), asyncio.create_task(r.run(stop))]
            try:
                async with asyncio.timeout(timeout):
                    while not await done():
                        await asyncio.sleep(0.05)
            finally:
                stop.set()
                await asyncio.gather(*runs)
    finally:
        await m_engine.dispose()
