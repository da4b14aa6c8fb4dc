"""Small helpers for tests that talk to the real services (those shared with the
benchmarks are taskmgr.testing's)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Any

import aio_pika

from task_types.game import LiveGameHandler
from task_types.noop import NoopHandler
from task_types.period_score import PeriodScoreHandler
from task_types.schedule import ScheduleHandler
from task_types.stat_correction import StatCorrectionHandler
from taskmgr.broker import Topology
from taskmgr.handlers import Registry
from taskmgr.messages import StartBatch, decode_start
from taskmgr.service import NewTask, TaskService

# Re-exported for the tests: one copy, shared with the benchmarks.
from taskmgr.testing import amqp_as as amqp_as
from taskmgr.testing import as_role as as_role
from taskmgr.testing import free_port as free_port
from taskmgr.testing import wait_for as wait_for


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
