"""The live stream of stored events, shared by every connected client: one reader of the
event history (taskmgr/event_store.py) per API process, whatever the number of clients,
and only while one is connected.

Each event's stream id is `<observed time>~<event id>`, the history's keyset order; a
client that reconnects with `Last-Event-ID` is replayed what it missed from the history,
then joins the live feed. The recorder commits an event a little after its observed
time, so each read goes back `lookback` seconds behind the newest event seen and drops
ids it has already sent: an event committed later than that reaches the clients
connected then only after a reconnect (it is in the history)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import event_store
from taskmgr.event_store import StoredEvent
from taskmgr.service import utcnow

log = logging.getLogger(__name__)

# Events a slow client may have waiting before it is dropped (it reconnects and resumes).
CLIENT_BUFFER = 10_000
# Seconds before the next read after a failed one (the database away: one warning a
# few seconds, not four a second).
RETRY_S = 2.0
# Rows per read of the history.
PAGE = 5000
_NIL = uuid.UUID(int=0)


def stream_id(e: StoredEvent) -> str:
    return f"{e.time.isoformat()}~{e.event_id}"


def parse_stream_id(value: str) -> tuple[datetime, uuid.UUID] | None:
    at, _, eid = value.partition("~")
    try:
        t = datetime.fromisoformat(at)
        return (t, uuid.UUID(eid)) if t.tzinfo is not None else None
    except ValueError:
        return None


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue(CLIENT_BUFFER)
        self.dropped = False


class EventHub:
    def __init__(self, *, engine: AsyncEngine, poll_s: float, lookback_s: float) -> None:
        self._engine = engine
        self._poll_s = poll_s
        self._lookback = timedelta(seconds=lookback_s)
        self._subs: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[uuid.UUID, datetime] = {}
        self._cursor: datetime | None = None
        self.sent = 0  # events handed to clients (for the metrics)

    @property
    def clients(self) -> int:
        return len(self._subs)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        sub = Subscription()
        self._subs.add(sub)
        if self._task is None or self._task.done():
            self._cursor = None
            self._task = asyncio.create_task(self._run(), name="taskmgr-api-event-hub")
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._subs:
            pause = self._poll_s
            try:
                await self.read_once()
            except Exception:  # a database blip: the clients wait, a later read tries again
                log.warning("the event stream could not read the history", exc_info=True)
                pause = max(pause, RETRY_S)
            await asyncio.sleep(pause)

    async def read_once(self) -> int:
        """Hand every event new since the last read to each client; returns how many."""
        if self._cursor is None:
            self._cursor = utcnow()  # a new live feed starts now; replays come from the history
        start, after_id, new = self._cursor - self._lookback, _NIL, 0
        async with self._engine.connect() as conn:
            while True:
                page = await event_store.events_after(conn, start, after_id, limit=PAGE)
                for e in page:
                    if e.event_id in self._seen:
                        continue
                    self._seen[e.event_id] = e.time
                    # Not past this clock: an event stamped ahead by a runner's skewed
                    # clock must not move the window past the others.
                    self._cursor = min(max(self._cursor, e.time), utcnow())
                    self._publish(e)
                    new += 1
                if len(page) < PAGE:
                    break
                start, after_id = page[-1].time, page[-1].event_id
        horizon = self._cursor - self._lookback
        self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
        return new

    def _publish(self, e: StoredEvent) -> None:
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(e)
                self.sent += 1
            except asyncio.QueueFull:
                sub.dropped = True
                self._subs.discard(sub)
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)  # tells the client's loop to end


async def replay(engine: AsyncEngine, since: tuple[datetime, uuid.UUID]) -> AsyncIterator[StoredEvent]:
    """The history after a stream id, in order (a client resuming with Last-Event-ID)."""
    start, after_id = since
    async with engine.connect() as conn:
        while True:
            page = await event_store.events_after(conn, start, after_id, limit=PAGE)
            for e in page:
                yield e
            if len(page) < PAGE:
                return
            start, after_id = page[-1].time, page[-1].event_id
