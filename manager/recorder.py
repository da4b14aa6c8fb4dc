"""The recorder (`taskmgr recorder`): every event of the events exchange, stored once in
the history (emitted_events, sql/0012).

It consumes its own durable queue (P.events.recorder, bound to the events exchange
with "#" and declared with the manager's topology, so events wait there while no
recorder runs) and stores up to TASKMGR_RECORDER_BATCH events per transaction, in one
statement that drops the ids already stored (taskmgr.event_store.record_events). The
batch is acked after the commit: a crash before it stores nothing and the broker
delivers the batch again; after it, a redelivery is dropped as a repeat.

Why a process of its own rather than a job of the leading manager: it needs no
leadership (the ids' primary key keeps several recorders, or a recorder and a stale
one, from storing an event twice), so it keeps recording while leadership passes; at
tens of thousands of events a second it would compete with dispatch and intake for the
leader's event loop and connections; and it scales by running more of them on the one
queue. It runs as the manager's identities (database role taskmgr_manager, which may
insert events and never change them; RabbitMQ user taskmgr_manager, which may read the
recorder's queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import db, event_store
from taskmgr.broker import Publisher, Topology, amqp_user
from taskmgr.db import make_engine
from taskmgr.messages import BadMessage, Event, decode_event
from taskmgr.reader import Delivery, QueueReader
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

# Deliveries held unacked: batches keep arriving while the previous one is written.
PREFETCH_BATCHES = 4
# A batch waits this long for more events before it is written.
LINGER_S = 0.05
# After a lost connection (broker or database), try again after this.
RETRY_S = 1.0

RECORDED = Counter("taskmgr_events_recorded_total", "Events stored in the history (new ids)")
REPEATS = Counter("taskmgr_events_repeats_total", "Events not stored: their id was stored already")
REFUSED = Counter(
    "taskmgr_events_dead_lettered_total", "Events the recorder dead-lettered (malformed, refused sender)"
)


@dataclass
class RecordCounts:
    messages: int = 0
    stored: int = 0
    repeats: int = 0
    dead_lettered: int = 0

    def add(self, other: RecordCounts) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


class Recorder:
    def __init__(self, *, settings: Settings, engine: AsyncEngine, name: str = "taskmgr-recorder") -> None:
        self._settings = settings
        self._engine = engine
        self._name = name
        self.topology = Topology.from_settings(settings)
        self._batch = settings.recorder_batch
        # Who may publish events: the runners, and the manager itself (task lifecycle
        # events). RabbitMQ validates a message's user_id against its connection's user.
        self._senders = {*settings.senders()["reports"], amqp_user(settings.amqp_url)}
        self.counts = RecordCounts()  # totals since start (tests, the benchmark)
        self.ready = asyncio.Event()  # set while consuming

    async def run(self, stop: asyncio.Event) -> None:
        """Record until `stop`; reconnect after a lost broker or database connection."""
        while not stop.is_set():
            try:
                await self._consume(stop)
            except Exception as exc:
                self.ready.clear()
                log.warning("recorder: %s; connecting again in %.0f s", db.root_reason(exc), RETRY_S)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_S):
                        await stop.wait()

    async def _consume(self, stop: asyncio.Event) -> None:
        publisher = Publisher(url=self._settings.amqp_url, topology=self.topology, name=self._name)
        reader = QueueReader(
            url=self._settings.amqp_url,
            queue=self.topology.events_recorder,
            prefetch=self._batch * PREFETCH_BATCHES,
            name=self._name,
        )
        # The publisher declares the topology (the recorder's queue with it) before the
        # reader consumes that queue.
        async with publisher:
            async with reader:
                self.ready.set()
                log.info("recording the events of %s", self.topology.events)
                while not stop.is_set():
                    batch = await reader.take(self._batch, linger_s=LINGER_S, wait_s=0.5)
                    if batch:
                        self.counts.add(await self.record(batch, reader, publisher))

    async def record(
        self, batch: Sequence[Delivery], reader: QueueReader, publisher: Publisher
    ) -> RecordCounts:
        """Store one batch and ack it. A message that is not an event, or whose sender may
        not publish events, is dead-lettered with the reason. If the transaction fails
        for the data, the batch is split in halves until the event that fails is alone
        (dead-lettered; the rest is stored once). If the database fails, the batch goes
        back to the queue whole and BrokerError/StoreError reaches `run`."""
        counts = RecordCounts(messages=len(batch))
        events: list[tuple[Delivery, Event]] = []
        for d in batch:
            if d.user_id not in self._senders:
                await self._dead_letter(publisher, d, f"sender {d.user_id!r} may not publish events", counts)
                continue
            try:
                events.append((d, decode_event(d.body)))
            except BadMessage as exc:
                await self._dead_letter(publisher, d, str(exc), counts)
        try:
            await self._store_isolating(events, publisher, counts)
        except Exception:
            await reader.requeue_all()
            raise
        await reader.ack(batch[-1].delivery_tag, multiple=True)
        RECORDED.inc(counts.stored)
        REPEATS.inc(counts.repeats)
        return counts

    async def _store_isolating(
        self, items: Sequence[tuple[Delivery, Event]], publisher: Publisher, counts: RecordCounts
    ) -> None:
        if not items:
            return
        try:
            async with self._engine.begin() as conn:
                stored = await event_store.record_events(conn, [ev for _, ev in items])
        except Exception as exc:
            if db.is_transient(exc):
                raise
            if len(items) == 1:
                reason = f"cannot be stored: {db.root_reason(exc)}"
                await self._dead_letter(publisher, items[0][0], reason, counts)
                return
            half = len(items) // 2
            await self._store_isolating(items[:half], publisher, counts)
            await self._store_isolating(items[half:], publisher, counts)
            return
        counts.stored += stored
        counts.repeats += len(items) - stored

    async def _dead_letter(
        self, publisher: Publisher, d: Delivery, reason: str, counts: RecordCounts
    ) -> None:
        log.warning("event dead-lettered (%s): %s", d.routing_key, reason)
        await publisher.dead_letter(d.body, reason, headers={"x-taskmgr-routing-key": d.routing_key})
        counts.dead_lettered += 1
        REFUSED.inc()


async def run_recorder(settings: Settings, stop: asyncio.Event) -> None:
    engine = make_engine(settings.database_url, name="taskmgr-recorder")
    try:
        await Recorder(settings=settings, engine=engine).run(stop)
    finally:
        await engine.dispose()
