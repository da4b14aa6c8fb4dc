"""Task lifecycle events: every applied state change, published on the events exchange
as `task.<type>.<state>` after the commit that made it, through an outbox (sql/0014).

The outbox rows are written by a trigger on task_events in the transaction of the change
itself, so no code path can change a task without its event, and a rollback leaves none.
The leader reads a batch, publishes it with confirms, and deletes it in a second short
transaction once every event is confirmed: no transaction stays open while the broker
confirms (a slow broker, a memory alarm, would otherwise outlast the leader's idle-in-
transaction timeout and roll the batch back, again and again). A failed publish or a
crash between the two leaves the rows, and they are published again: a repeat has the
same event id (uuid5 of the task and the history row's seq), so consumers drop it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine

from manager import metrics
from taskmgr import event_store
from taskmgr.broker import BrokerError, Publisher, Topology
from taskmgr.event_store import LifecycleChange
from taskmgr.messages import (
    LIFECYCLE_TASK_TYPE,
    Event,
    TaskLifecycle,
    encode,
    lifecycle_event_id,
)

log = logging.getLogger(__name__)

# State changes taken per transaction; the relay runs again at once while it takes full batches.
LIFECYCLE_BATCH = 2000
# How often the leader looks at the outbox (seconds).
LIFECYCLE_INTERVAL_S = 0.5

PUBLISHED = Counter(
    "taskmgr_lifecycle_events_published_total", "Task lifecycle events confirmed by the broker"
)


def routing_key(change: LifecycleChange) -> str:
    return f"{LIFECYCLE_TASK_TYPE}.{change.type}.{change.state.lower()}"


def lifecycle_event(change: LifecycleChange) -> Event:
    data = TaskLifecycle(
        type=change.type,
        state=change.state,  # type: ignore[arg-type]
        attempt=change.attempt,
        source=change.source,
        runner_id=change.runner_id,
        detail=change.detail,
    )
    return Event(
        event_id=lifecycle_event_id(change.task_id, change.seq),
        event=f"{change.type}.{change.state.lower()}",
        task_type=LIFECYCLE_TASK_TYPE,
        task_id=change.task_id,
        root_task_id=change.root_id,
        task_runner_id=change.runner_id or change.source,
        attempt=change.attempt,
        observed_at=change.time,
        data=data.model_dump(mode="json"),
    )


class LifecycleRelay:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: Publisher | None = None,
        url: str = "",
        topology: Topology | None = None,
        batch: int = LIFECYCLE_BATCH,
    ) -> None:
        """publisher: one to use; otherwise the relay opens its own (on `url`, once the
        manager declared `topology`), so a burst of lifecycle events never queues the
        leader's start orders behind it on one channel."""
        self._engine = engine
        self._publisher = publisher
        self._own = publisher is None
        self._url = url
        self._topology = topology
        self._batch = batch

    async def _ready(self) -> Publisher:
        if self._publisher is None:
            assert self._topology is not None, "a publisher or a url and topology"
            publisher = Publisher(
                url=self._url, topology=self._topology, name="taskmgr-lifecycle", declare=False
            )
            await publisher.__aenter__()
            self._publisher = publisher
        return self._publisher

    async def _reset(self) -> None:
        """A failed publish: a relay's own publisher connects anew next time."""
        if self._own:
            with contextlib.suppress(Exception):
                await self.close()
            self._publisher = None

    async def close(self) -> None:
        if self._own and self._publisher is not None:
            await self._publisher.__aexit__()
            self._publisher = None

    async def measure(self) -> float:
        """Set the age of the oldest state change still in the outbox (the gauge of the
        outbox-age alert; one index probe): apart from run_once, so a relay that stalls
        or keeps failing shows as a growing age."""
        async with self._engine.connect() as conn:
            age = await event_store.lifecycle_outbox_age(conn)
        metrics.LIFECYCLE_OUTBOX_AGE.set(age)
        return age

    async def run_once(self) -> int:
        """Publish what the outbox holds; returns the events confirmed."""
        total = 0
        while True:
            taken, published = await self._one_batch()
            total += published
            if taken < self._batch:
                return total

    async def _one_batch(self) -> tuple[int, int]:
        """One batch: (outbox rows taken, events published)."""
        publisher = await self._ready()
        async with self._engine.begin() as conn:
            changes, gone = await event_store.take_lifecycle(conn, self._batch)
        if not changes and not gone:
            return 0, 0
        if gone:
            log.warning("%d lifecycle changes of tasks that no longer exist dropped unpublished", len(gone))
        # No transaction is open while the broker confirms; the rows are deleted only
        # once every event is confirmed, so a failure leaves them for the next run.
        try:
            if changes:
                await publisher.publish_many(_items(changes))
        except BrokerError:
            await self._reset()
            raise
        async with self._engine.begin() as conn:
            await event_store.delete_lifecycle(conn, [c.id for c in changes] + gone)
        PUBLISHED.inc(len(changes))
        return len(changes) + len(gone), len(changes)


def _items(changes: Sequence[LifecycleChange]) -> list[tuple[str, str, bytes, Mapping[str, Any] | None, str]]:
    items: list[tuple[str, str, bytes, Mapping[str, Any] | None, str]] = []
    for c in changes:
        ev = lifecycle_event(c)
        headers = {
            "task_id": str(ev.task_id),
            "root_task_id": str(ev.root_task_id),
            "task_runner_id": ev.task_runner_id,
            "event_id": str(ev.event_id),
            "observed_at": ev.observed_at.isoformat(),
        }
        items.append(("events", routing_key(c), encode(ev), headers, str(ev.event_id)))
    return items
