"""Reading one queue, or a stream from an offset, fast: the recorder's and the
replays' side of the broker (taskmgr/broker.py has the publisher and the consumers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection

from taskmgr.broker import BrokerError
from taskmgr.connections import connect_once

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as a QueueReader got it."""

    body: bytes
    routing_key: str
    message_id: str | None
    user_id: str | None
    headers: Mapping[str, Any]
    delivery_tag: int
    redelivered: bool

    @property
    def stream_offset(self) -> int | None:
        """The message's offset in its stream (a stream's deliveries carry it)."""
        value = self.headers.get("x-stream-offset")
        return value if isinstance(value, int) else None


class QueueReader:
    """Reads one queue, or a stream from an offset, at the speed the recorder and the
    replays need: on the channel under aio-pika's (aiormq), without aio-pika's message
    objects, about half again as fast.

    The connection is a plain one, not robust: when it or the consumer is lost, `take`
    raises BrokerError and the caller connects again (unacked messages go back to their
    queue; a stream is read again from the caller's offset). `prefetch` bounds the
    unacked messages (RabbitMQ requires one to consume a stream)."""

    def __init__(
        self,
        *,
        url: str,
        queue: str,
        prefetch: int,
        name: str = "taskmgr",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self._url = url
        self.queue = queue
        self._prefetch = prefetch
        self._name = name
        self._arguments = dict(arguments or {})
        self._conn: AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._inbox: asyncio.Queue[Delivery | BaseException] = asyncio.Queue()
        self._lost: BaseException | None = None

    async def __aenter__(self) -> QueueReader:
        try:
            self._conn = await connect_once(
                self._url, client_properties={"connection_name": f"{self._name}-read"}
            )
            channel = await self._conn.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            self._channel = raw = await channel.get_underlay_channel()
            raw.closing.add_done_callback(lambda f: self._fail(f, "channel closed"))
            raw.on_consumer_cancel_callbacks.add(self._on_cancel)
            await raw.basic_consume(self.queue, self._on_message, arguments=self._arguments)
        except BaseException as exc:
            await self.__aexit__()
            if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                raise BrokerError(f"no queue {self.queue!r}: {exc}") from exc
            if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
                raise BrokerError(f"may not read {self.queue!r}: {exc}") from exc
            if isinstance(exc, OSError | aiormq.exceptions.AMQPError):
                raise BrokerError(f"reading {self.queue!r}: {exc!r}") from exc
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    def _fail(self, future: asyncio.Future[Any], what: str) -> None:
        if self._lost is None:
            cause = None if future.cancelled() else future.exception()
            self._lost = BrokerError(f"{self.queue}: {what}: {cause!r}")
            self._inbox.put_nowait(self._lost)

    async def _on_cancel(self, _frame: Any) -> None:
        if self._lost is None:
            self._lost = BrokerError(f"{self.queue}: the broker cancelled the consumer (queue deleted?)")
            self._inbox.put_nowait(self._lost)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        delivery = message.delivery
        self._inbox.put_nowait(
            Delivery(
                body=message.body,
                routing_key=delivery.routing_key or "",  # type: ignore[union-attr]
                message_id=props.message_id,
                user_id=props.user_id,
                headers=props.headers or {},
                delivery_tag=delivery.delivery_tag or 0,  # type: ignore[union-attr]
                redelivered=bool(delivery.redelivered),  # type: ignore[union-attr]
            )
        )

    def _item(self, item: Delivery | BaseException) -> Delivery:
        if isinstance(item, BaseException):
            self._inbox.put_nowait(item)  # every later call fails the same way
            raise item
        return item

    async def take(self, max_n: int, *, linger_s: float = 0.0, wait_s: float | None = None) -> list[Delivery]:
        """Up to `max_n` deliveries: waits up to `wait_s` (None: for ever) for the first,
        then up to `linger_s` more for others. Raises BrokerError once the connection or
        the consumer is lost."""
        out: list[Delivery] = []
        try:
            async with asyncio.timeout(wait_s):
                out.append(self._item(await self._inbox.get()))
        except TimeoutError:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger_s
        while len(out) < max_n:
            try:
                out.append(self._item(self._inbox.get_nowait()))
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    out.append(self._item(await self._inbox.get()))
            except TimeoutError:
                break
        return out

    def pending(self) -> int:
        """Deliveries received and not taken yet."""
        return self._inbox.qsize()

    @property
    def _raw(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None:
            raise BrokerError("reader is not connected (use `async with`)")
        return self._channel

    async def ack(self, delivery_tag: int, *, multiple: bool = True) -> None:
        try:
            await self._raw.basic_ack(delivery_tag, multiple=multiple)
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerError(f"ack on {self.queue}: {exc!r}") from exc

    async def requeue_all(self) -> None:
        """Give back every unacked delivery (nack multiple, requeue)."""
        with contextlib.suppress(Exception):
            await self._raw.basic_nack(0, multiple=True, requeue=True)
