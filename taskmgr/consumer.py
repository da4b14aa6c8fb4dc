"""The consumer kit for downstream services: the events, from the replayable stream.

    offsets = FileOffsets("/var/lib/scores/offset.json")
    async with EventStream(url=AMQP_URL, name="scores", routing_keys=["live_game.#"],
                           offsets=offsets, start="first") as events:
        async for received in events:
            match received.data:          # a typed model per event kind and version
                case ScoreChanged(): ...

- **Where it reads**: the stream P.events.stream (x-queue-type: stream), which holds
  every event of the events exchange for TASKMGR_EVENTS_STREAM_MAX_AGE / _MAX_BYTES,
  with plain AMQP 0-9-1 (x-stream-offset; prefetch set; manual acks). A service that
  was down reads what it missed; a new one reads from the start, an offset or a time.
- **Filter**: AMQP topic patterns on the routing key (`<task_type>.<event>`), matched
  here (the stream holds every event).
- **Ack after the handler returns**: an event is settled (acked, remembered, its offset
  saved) when the loop asks for the next one; if the handler raises, it is not, and a
  restart reads it again.
- **Dedup**: an event id seen within the last `dedup_window` events is dropped (the
  same event emitted by two runners, or by a new attempt). After a restart the window is
  rebuilt by reading the `dedup_window` events before the stored offset again (ids
  only, not handed to the loop).
- **Resume**: the offset of the last settled event is stored by an OffsetStore, owned by
  the service: FileOffsets (a JSON file, replaced atomically), SqlOffsets (a row in a
  table of the service's own database; `save_in(conn, offset)` writes it in the
  transaction of the handler's own writes, so effect and offset commit together:
  exactly once), or MemoryOffsets. With no stored offset it starts at `start`.
- **Typed models**: EventModels maps `<task_type>.<event>` and a version to a pydantic
  model of the data; the default set comes from the `taskmgr.event_kinds` entry-point
  group (the sports kinds are task_types.events'). An event of a kind or version with
  no model is handed over with its data as a dict; one whose data does not fit its
  model is skipped with a warning (and counted), never handed over half-checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskmgr.broker import BrokerError, Topology
from taskmgr.errors import InvalidInput
from taskmgr.messages import (
    LIFECYCLE_TASK_TYPE,
    BadMessage,
    Event,
    TaskLifecycle,
    decode_event,
    event_kinds,
)
from taskmgr.reader import Delivery, QueueReader

log = logging.getLogger(__name__)

DEFAULT_DEDUP_WINDOW = 50_000  # event ids remembered
DEFAULT_PREFETCH = 2000  # unacked deliveries (RabbitMQ requires a limit on a stream)
ACK_EVERY = 200  # deliveries settled per ack (multiple) at most
RECONNECT_S = 1.0

Start = Literal["first", "last", "next"] | int | datetime | timedelta


class ConsumerError(InvalidInput):
    """A consumer asked for something that cannot be: a bad pattern or start."""


# -- routing-key filters --------------------------------------------------------------

_WORD = re.compile(r"^[A-Za-z0-9_-]+$")


def topic_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate over routing keys for AMQP topic patterns (`*` one word, `#` any
    number of words, words separated by dots). Raises ConsumerError for a pattern that
    is not one."""
    if not patterns:
        raise ConsumerError("routing keys", "give at least one pattern (# for every event)")
    regexes = []
    for pattern in patterns:
        words = pattern.split(".")
        if not pattern or any(w not in ("*", "#") and not _WORD.match(w) for w in words):
            raise ConsumerError(
                "routing-key pattern",
                f"{pattern!r} is not one: words of letters, digits, _ or -, or * or #, "
                "separated by dots (e.g. live_game.score.* or live_game.#)",
            )
        # Matched against "." + key: each word brings its dot, so "#" may match no word.
        tokens = {"#": r"(?:\.[^.]+)*", "*": r"\.[^.]+"}
        regexes.append(re.compile("^" + "".join(tokens.get(w) or r"\." + re.escape(w) for w in words) + "$"))
    if "#" in patterns:
        return lambda _key: True
    return lambda key: any(r.match("." + key) for r in regexes)


# -- typed models --------------------------------------------------------------------


class EventModels:
    """Pydantic models of event data, by routing key (`<task_type>.<event>`) and version."""

    def __init__(self, models: Mapping[str, Mapping[int, type[BaseModel]]] | None = None) -> None:
        self._models: dict[str, dict[int, type[BaseModel]]] = {k: dict(v) for k, v in (models or {}).items()}

    @classmethod
    def default(cls) -> EventModels:
        """Every kind registered in the `taskmgr.event_kinds` entry-point group (each
        names a mapping like the constructor's)."""
        return cls(event_kinds())

    def get(self, routing_key: str, version: int) -> type[BaseModel] | None:
        if routing_key.startswith(LIFECYCLE_TASK_TYPE + ".") and version == 1:
            return TaskLifecycle  # task.<type>.<state>: every task type's
        return self._models.get(routing_key, {}).get(version)

    def kinds(self) -> dict[str, dict[int, type[BaseModel]]]:
        return {k: dict(v) for k, v in self._models.items()}


# -- offsets -------------------------------------------------------------------------


class OffsetStore(Protocol):
    """Where a consumer keeps the stream offset of the last event it settled."""

    async def load(self) -> int | None: ...

    async def save(self, offset: int) -> None: ...


class MemoryOffsets:
    """Kept in memory: a restart of the process starts over (tests, one-off replays)."""

    def __init__(self, offset: int | None = None) -> None:
        self.offset = offset

    async def load(self) -> int | None:
        return self.offset

    async def save(self, offset: int) -> None:
        self.offset = offset


class FileOffsets:
    """A JSON file {"offset": n}, replaced atomically (written aside, then renamed), so a
    process killed at any point leaves the old offset or the new one. `fsync=True`
    also survives a power cut, at a disk flush per save."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self._fsync = fsync

    async def load(self) -> int | None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConsumerError(f"offset file {self.path}", str(exc)) from None
        offset = raw.get("offset") if isinstance(raw, dict) else None
        if not isinstance(offset, int) or offset < 0:
            raise ConsumerError(f"offset file {self.path}", f"no offset in {raw!r}")
        return offset

    async def save(self, offset: int) -> None:
        # A few dozen bytes to the page cache: cheaper inline than a thread per event.
        _replace_file(self.path, json.dumps({"offset": offset}), fsync=self._fsync)


def _replace_file(path: Path, content: str, *, fsync: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(content)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class SqlOffsets:
    """A row of `taskmgr_consumer_offsets` in the consumer's own database (PostgreSQL).
    A handler that writes its effects in the same database passes its connection to
    `save_in`, so effect and offset commit together, and opens the stream with
    `commit_offsets=False`."""

    TABLE_DDL = (
        "create table if not exists taskmgr_consumer_offsets ("
        " consumer text primary key, stream_offset bigint not null check (stream_offset >= 0),"
        " saved_at timestamptz not null default now())"
    )

    def __init__(self, engine: AsyncEngine, consumer: str) -> None:
        self._engine = engine
        self.consumer = consumer

    async def setup(self) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(text(self.TABLE_DDL))

    async def load(self) -> int | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    text("select stream_offset from taskmgr_consumer_offsets where consumer = :c"),
                    {"c": self.consumer},
                )
            ).first()
        return None if row is None else int(row.stream_offset)

    async def save(self, offset: int) -> None:
        async with self._engine.begin() as conn:
            await self.save_in(conn, offset)

    async def save_in(self, conn: AsyncConnection, offset: int) -> None:
        await conn.execute(
            text(
                "insert into taskmgr_consumer_offsets (consumer, stream_offset) values (:c, :o)"
                " on conflict (consumer) do update set stream_offset = excluded.stream_offset,"
                " saved_at = now()"
            ),
            {"c": self.consumer, "o": offset},
        )


# -- the stream ----------------------------------------------------------------------


class RecentIds:
    """The last `capacity` event ids, oldest dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[uuid.UUID, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: uuid.UUID) -> None:
        if self.capacity <= 0:
            return
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


@dataclass(frozen=True)
class Received:
    """One event handed to the loop: the envelope, its data (an instance of the kind's
    model, or the dict when the kind or version has none) and its stream offset."""

    event: Event
    data: Any
    routing_key: str
    offset: int

    @property
    def event_id(self) -> uuid.UUID:
        return self.event.event_id

    @property
    def typed(self) -> bool:
        return isinstance(self.data, BaseModel)


@dataclass
class StreamCounts:
    handed: int = 0  # events given to the loop
    repeats: int = 0  # dropped: an id seen within the window
    filtered: int = 0  # not matching the routing-key patterns
    invalid: int = 0  # not an event, or data that does not fit its model
    warmup: int = 0  # read again after a restart to rebuild the dedup window
    reconnects: int = 0
    invalid_reasons: list[str] = field(default_factory=list)


class EventStream:
    """An async iterator over the events of the stream; see the module's docstring."""

    def __init__(
        self,
        *,
        url: str,
        prefix: str = "taskmgr",
        name: str = "consumer",
        routing_keys: Sequence[str] = ("#",),
        start: Start = "next",
        offsets: OffsetStore | None = None,
        commit_offsets: bool = True,
        models: EventModels | None = None,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        """start: where to begin when `offsets` holds none: "first" (the oldest event
        kept), "last", "next" (only new events), an offset, a time, or a timedelta (that
        long ago). commit_offsets=False: the handler saves `received.offset` itself (in
        its own transaction, SqlOffsets.save_in); the stream only loads it."""
        self._url = url
        self.stream = Topology(prefix).events_stream
        self._name = name
        self._match = topic_matcher(list(routing_keys))
        self._start = _check_start(start)
        self._offsets = offsets
        self._commit = commit_offsets and offsets is not None
        self._models = models if models is not None else EventModels.default()
        self._window = RecentIds(dedup_window)
        self._prefetch = max(prefetch, ACK_EVERY + 1)
        self.counts = StreamCounts()
        self._reader: QueueReader | None = None
        self._buffer: list[Delivery] = []
        self._warm_until = -1  # offsets up to here are read only to rebuild the window
        self._last: int | None = None  # the offset of the last settled delivery
        self._pending: tuple[Delivery, uuid.UUID | None] | None = None  # handed, not settled
        self._unacked = 0
        self._last_tag = 0

    async def __aenter__(self) -> EventStream:
        stored = await self._offsets.load() if self._offsets is not None else None
        if stored is not None:
            self._last = stored
            self._warm_until = stored
            begin: Any = max(0, stored + 1 - self._window.capacity)
        else:
            begin = self._start_argument()
        await self._connect(begin)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    def __aiter__(self) -> EventStream:
        return self

    @property
    def offset(self) -> int | None:
        """The offset of the last event settled (handled, or skipped)."""
        return self._last

    def _start_argument(self) -> Any:
        start = self._start
        if isinstance(start, timedelta):
            return datetime.now(UTC) - start
        return start

    async def _connect(self, begin: Any) -> None:
        self._buffer = []
        self._unacked = 0
        self._reader = QueueReader(
            url=self._url,
            queue=self.stream,
            prefetch=self._prefetch,
            name=self._name,
            arguments={"x-stream-offset": begin},
        )
        await self._reader.__aenter__()

    async def _close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                if self._unacked:
                    await self._reader.ack(self._last_tag)
            await self._reader.__aexit__()
            self._reader = None

    async def __anext__(self) -> Received:
        # The loop asks for the next event: the handler of the previous one returned.
        if self._pending is not None:
            delivery, event_id = self._pending
            self._pending = None
            await self._settle(delivery, event_id)
        while True:
            delivery = await self._next_delivery()
            offset = delivery.stream_offset
            if offset is None:  # not from a stream: cannot be resumed, so not handed over
                raise BrokerError(f"{self.stream} delivered a message without x-stream-offset")
            if self._last is not None and offset <= self._last and offset > self._warm_until:
                await self._settle(delivery, None, advance=False)  # already settled (a reconnect)
                continue
            event_id = _event_id(delivery)
            if offset <= self._warm_until:
                self.counts.warmup += 1
                await self._settle(delivery, event_id, advance=False)
                continue
            if not self._match(delivery.routing_key):
                self.counts.filtered += 1
                await self._settle(delivery, event_id)
                continue
            if event_id is not None and event_id in self._window:
                self.counts.repeats += 1
                await self._settle(delivery, event_id)
                continue
            received = self._decode(delivery, offset)
            if received is None:
                await self._settle(delivery, event_id)
                continue
            self.counts.handed += 1
            self._pending = (delivery, received.event_id)
            return received

    async def _next_delivery(self) -> Delivery:
        while True:
            if self._buffer:
                return self._buffer.pop()
            assert self._reader is not None
            try:
                if self._unacked and not self._reader.pending():
                    await self._ack()  # idle: nothing held back
                got = await self._reader.take(ACK_EVERY, linger_s=0.0)
            except BrokerError as exc:
                await self._reconnect(exc)
                continue
            got.reverse()  # popped from the end, in order
            self._buffer = got

    async def _reconnect(self, exc: BaseException) -> None:
        """Read again from the event after the last one settled: nothing is skipped, and
        what was delivered but not settled comes again."""
        log.warning("%s: %s; reading again from offset %s", self.stream, exc, self._last)
        self.counts.reconnects += 1
        await self._close()
        while True:
            try:
                await asyncio.sleep(RECONNECT_S)
                await self._connect(self._last + 1 if self._last is not None else self._start_argument())
                return
            except BrokerError as again:
                log.warning("%s: %s; trying again", self.stream, again)

    def _decode(self, delivery: Delivery, offset: int) -> Received | None:
        try:
            event = decode_event(delivery.body)
        except BadMessage as exc:
            self._invalid(f"offset {offset} ({delivery.routing_key}): {exc}")
            return None
        data: Any = event.data
        model = self._models.get(f"{event.task_type}.{event.event}", event.version)
        if model is not None:
            try:
                data = model.model_validate(event.data)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "data"
                self._invalid(
                    f"offset {offset} ({delivery.routing_key} v{event.version}): {where}: {err['msg']}"
                )
                return None
        return Received(event=event, data=data, routing_key=delivery.routing_key, offset=offset)

    def _invalid(self, reason: str) -> None:
        log.warning("event skipped: %s", reason)
        self.counts.invalid += 1
        if len(self.counts.invalid_reasons) < 100:
            self.counts.invalid_reasons.append(reason)
        return None

    async def _settle(self, delivery: Delivery, event_id: uuid.UUID | None, *, advance: bool = True) -> None:
        if event_id is not None:
            self._window.add(event_id)
        self._unacked += 1
        self._last_tag = delivery.delivery_tag
        if self._unacked >= ACK_EVERY:
            await self._ack()
        offset = delivery.stream_offset
        if advance and offset is not None and (self._last is None or offset > self._last):
            self._last = offset
            if self._commit:
                assert self._offsets is not None
                await self._offsets.save(offset)

    async def _ack(self) -> None:
        assert self._reader is not None
        await self._reader.ack(self._last_tag)
        self._unacked = 0


def _event_id(delivery: Delivery) -> uuid.UUID | None:
    """The id from the message's properties (the runner sets message_id = event id), so
    a repeat or a warm-up costs no JSON decoding."""
    raw = delivery.message_id or delivery.headers.get("event_id")
    if not raw:
        return None
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        return None


def _check_start(start: Any) -> Start:
    what = "first, last, next, an offset, a time or a timedelta"
    if start in ("first", "last", "next"):
        return start  # type: ignore[no-any-return]
    if isinstance(start, bool):
        raise ConsumerError("start", f"{start!r} is not one of {what}")
    if isinstance(start, int):
        if start < 0:
            raise ConsumerError("start", f"offset {start}: offsets are 0 or more")
        return start
    if isinstance(start, datetime):
        if start.tzinfo is None:
            raise ConsumerError("start", f"time {start.isoformat()} needs a timezone")
        return start
    if isinstance(start, timedelta):
        if start <= timedelta(0):
            raise ConsumerError("start", f"{start}: a time ago must be positive")
        return start
    raise ConsumerError("start", f"{start!r} is not one of {what}")


def kinds_of(received: Iterable[Received]) -> list[str]:
    """The routing keys, in order (tests and examples)."""
    return [r.routing_key for r in received]
