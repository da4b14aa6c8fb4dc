"""The topology, a Publisher and a Consumer (with taskmgr/connections.py, how to reach
the nodes, and taskmgr/reader.py, the fast queue reader, the modules that import aio-pika).

Publishing and consuming use separate connections (a blocked publisher must not stall
consumers' acks). Connections are robust: they reconnect (to another node of a cluster)
and restore consumers; a publish that fails while the connection is down raises BrokerError, and the caller
(the manager's outbox, the runner's event buffer) tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from taskmgr.connections import BrokerError, amqp_user, connect_once, robust_connect
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
REASON_HEADER = "x-taskmgr-reason"
# A publish not confirmed within this fails (BrokerError) and is tried again by its caller.
PUBLISH_TIMEOUT_S = 15.0
# Unacked control messages (stops) a runner may hold; they are handled at once.
CONTROL_PREFETCH = 100


@dataclass(frozen=True)
class StreamRetention:
    """How much the events stream keeps: RabbitMQ drops its oldest segments once they
    are older than `max_age` (x-max-age: 7D, 12h, 30m, ...) or the stream is larger than
    `max_bytes` (x-max-length-bytes)."""

    max_age: str = "7D"
    max_bytes: int = 10 * 1024**3

    def arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "stream", "x-max-age": self.max_age, "x-max-length-bytes": self.max_bytes}


@dataclass(frozen=True)
class Topology:
    """Every name, derived from one prefix so that test runs do not collide.

    Each kind of message has an exchange of its own, so RabbitMQ's write permission on
    that exchange says who may send it (nobody needs the default exchange): `start`
    (manager -> runner pools, routing key = pool), `control` (manager -> one runner),
    `reports` (runners and outside services -> the manager's `progress` queue), `events`
    (runners -> downstream services), `dlx` (dead letters)."""

    prefix: str = "taskmgr"
    # Set (the manager's, the recorder's): the events stream and recorder's queue are declared too.
    stream: StreamRetention | None = None
    # Quorum queues (a cluster): the start, progress, control, dead and recorder queues are
    # Raft queues; a message delivered `delivery_limit` times unacked is dead-lettered.
    quorum: bool = False
    delivery_limit: int = 10

    @classmethod
    def from_settings(cls, settings: Settings, *, stream: bool = True) -> Topology:
        """The topology of the settings: with their events stream (the manager's, the
        recorder's; `stream=False`: a runner's) and their queue type."""
        return cls(
            settings.amqp_prefix,
            stream=StreamRetention(settings.events_stream_max_age, settings.events_stream_max_bytes)
            if stream
            else None,
            quorum=settings.use_quorum_queues,
            delivery_limit=settings.delivery_limit,
        )

    @property
    def start(self) -> str:
        return f"{self.prefix}.start"

    def start_queue(self, pool: str) -> str:
        return f"{self.prefix}.start.{pool}"

    @property
    def reports(self) -> str:
        return f"{self.prefix}.reports"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def events_stream(self) -> str:
        """A stream (x-queue-type: stream) bound to the events exchange with "#": every
        event, replayable by any AMQP 0-9-1 client from an offset, a time or the start."""
        return f"{self.prefix}.events.stream"

    @property
    def events_recorder(self) -> str:
        """The recorder's durable queue, bound to the events exchange with "#"."""
        return f"{self.prefix}.events.recorder"

    @property
    def progress(self) -> str:
        return f"{self.prefix}.progress"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    def control_queue(self, runner_id: str) -> str:
        return f"{self.prefix}.control.{runner_id}"

    @staticmethod
    def control_pool_key(pool: str) -> str:
        """The control exchange's routing key that reaches every runner of a pool (for a
        stop whose runner is not known yet)."""
        return f"pool.{pool}"

    # The control exchange's routing key that reaches every runner (each runner's control
    # queue is bound with it): a task type's new values for the pollers running it.
    CONTROL_ALL_KEY = "all.runners"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    def queue_args(self) -> dict[str, Any]:
        """The start and progress queues': dead letters to the DLX (and, quorum, the
        delivery limit that sends poison there)."""
        if self.quorum:
            limit = {"x-delivery-limit": self.delivery_limit}
            return {**QUORUM_ARGS, **limit, "x-dead-letter-exchange": self.dlx}
        return {"x-dead-letter-exchange": self.dlx}

    def dead_args(self) -> dict[str, Any]:
        return dict(QUORUM_ARGS) if self.quorum else {}

    def recorder_args(self) -> dict[str, Any]:
        # The recorder's queue keeps messages on disk rather than in memory: it may hold
        # hours of events while no recorder runs (a quorum queue always does; RabbitMQ
        # 3.12+ ignores the mode, its classic queues do so too).
        return self.queue_args() if self.quorum else {**self.queue_args(), "x-queue-mode": "lazy"}

    def control_args(self) -> dict[str, Any]:
        """A runner's control queue: exclusive (it goes with the runner's connection), or,
        quorum, durable and replicated, so a stop sent while the runner's node is down
        waits for it; RabbitMQ deletes it CONTROL_EXPIRES_MS after its runner is gone."""
        if self.quorum:
            return {"durable": True, "arguments": {**QUORUM_ARGS, "x-expires": CONTROL_EXPIRES_MS}}
        return {"exclusive": True, "auto_delete": True}


QUORUM_ARGS: dict[str, Any] = {"x-queue-type": "quorum"}
# A quorum control queue left by a runner that is gone: deleted after this long unused.
CONTROL_EXPIRES_MS = 10 * 60 * 1000


Message = AbstractIncomingMessage
Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


# A component whose user may not declare the topology (a runner) waits this long for it.
TOPOLOGY_WAIT_S = 120.0
TOPOLOGY_RETRY_S = 0.5


async def declare_durable(
    conn: AbstractRobustConnection, channel: AbstractChannel, name: str, arguments: Mapping[str, Any]
) -> AbstractQueue:
    """Declare a durable queue with these arguments, or, when it exists with others (a
    classic queue, now that the settings ask for quorum queues, or the other way round:
    RabbitMQ refuses to change a queue's type), use it as it is, with a warning that says
    how to switch it (docs/design.md, "Quorum queues"). The check runs on a throwaway
    channel, since a refused declare closes its channel."""
    probe = await conn.channel()
    try:
        await probe.declare_queue(name, durable=True, arguments=dict(arguments))
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue %s exists with other arguments than %s (%s); it is used as it is. To change its "
            "type, let it drain and delete it while no manager or runner runs (docs/design.md)",
            name,
            dict(arguments),
            exc,
        )
        return await channel.declare_queue(name, passive=True)
    finally:
        if not probe.is_closed:
            await probe.close()
    return await channel.declare_queue(name, durable=True, arguments=dict(arguments))


async def _declare_common(
    conn: AbstractRobustConnection, channel: AbstractRobustChannel, topo: Topology
) -> dict[str, AbstractExchange]:
    dlx = await channel.declare_exchange(topo.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await declare_durable(conn, channel, topo.dead, topo.dead_args())
    await dead.bind(dlx)
    events = await channel.declare_exchange(topo.events, aio_pika.ExchangeType.TOPIC, durable=True)
    control = await channel.declare_exchange(topo.control, aio_pika.ExchangeType.DIRECT, durable=True)
    start = await channel.declare_exchange(topo.start, aio_pika.ExchangeType.DIRECT, durable=True)
    reports = await channel.declare_exchange(topo.reports, aio_pika.ExchangeType.FANOUT, durable=True)
    progress = await declare_durable(conn, channel, topo.progress, topo.queue_args())
    await progress.bind(reports)
    return {"dlx": dlx, "events": events, "control": control, "start": start, "reports": reports}


async def _declare_events_log(conn: AbstractRobustConnection, topo: Topology) -> None:
    """The events stream and the recorder's queue, each bound to the events exchange
    with "#", so every event is kept from the moment the manager first runs, whether or
    not a recorder or a consumer is up. A stream that exists with other retention
    arguments is kept as it is (RabbitMQ refuses to redeclare it): the warning says how
    to change it."""
    assert topo.stream is not None
    channel: AbstractChannel = await conn.channel()
    try:
        recorder = await declare_durable(conn, channel, topo.events_recorder, topo.recorder_args())
        await recorder.bind(topo.events, routing_key="#")
        stream: AbstractQueue
        try:
            stream = await channel.declare_queue(
                topo.events_stream, durable=True, arguments=topo.stream.arguments()
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning(
                "the events stream %s exists with other retention than %s (%s); it is kept as it is: "
                "to change it, set a RabbitMQ policy (max-age, max-length-bytes) or delete the stream",
                topo.events_stream,
                topo.stream,
                exc,
            )
            channel = await conn.channel()  # the refused declare closed the other one
            stream = await channel.get_queue(topo.events_stream, ensure=False)
        await stream.bind(topo.events, routing_key="#")
    finally:
        if not channel.is_closed:
            await channel.close()


async def _existing(
    conn: AbstractRobustConnection, channel: AbstractRobustChannel, topo: Topology
) -> dict[str, AbstractExchange]:
    """The exchanges, without declaring them (which needs configure permission): wait
    until they exist (the manager declares them), checking on a throwaway channel since
    a failed passive declare closes its channel."""
    names = {"dlx": topo.dlx, "events": topo.events, "control": topo.control, "reports": topo.reports}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TOPOLOGY_WAIT_S
    while True:
        probe = await conn.channel()
        try:
            for name in names.values():
                await probe.declare_exchange(name, passive=True)
            break
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            if loop.time() > deadline:
                missing = sorted(names.values())
                raise BrokerError(f"the exchanges {missing} do not exist: is a manager running?") from exc
            log.info("waiting for the manager to declare the exchanges (%s)", exc)
            await asyncio.sleep(TOPOLOGY_RETRY_S)
        finally:
            if not probe.is_closed:
                await probe.close()
    return {k: await channel.get_exchange(v, ensure=False) for k, v in names.items()}


class Publisher:
    """Persistent messages with publisher confirms: `publish_*` returns once the broker
    has taken responsibility for the message (or raises BrokerError)."""

    def __init__(self, *, url: str, topology: Topology, name: str = "taskmgr", declare: bool = True) -> None:
        """declare=False: use the exchanges the manager declared, waiting for them (a
        runner, whose user may not declare them)."""
        self._url = url
        self.topology = topology
        self._name = name
        self._declare = declare
        # Every message carries the user it was published as: RabbitMQ refuses a
        # user_id that is not the connection's, so the receiver can trust it.
        self.user = amqp_user(url)
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._ex: dict[str, AbstractExchange] = {}
        self._pools: set[str] = set()

    async def __aenter__(self) -> Publisher:
        self._conn = await robust_connect(self._url, f"{self._name}-publish")
        # on_return_raises: a mandatory message nobody could route (a start order for a
        # pool whose queue is gone) fails its publish instead of counting as confirmed.
        self._channel = await self._conn.channel(  # type: ignore[assignment]
            publisher_confirms=True, on_return_raises=True
        )
        assert self._channel is not None
        if self._declare:
            self._ex = await _declare_common(self._conn, self._channel, self.topology)
            if self.topology.stream is not None:
                await _declare_events_log(self._conn, self.topology)
        else:
            self._ex = await _existing(self._conn, self._channel, self.topology)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def channel(self) -> AbstractRobustChannel:
        if self._channel is None:
            raise BrokerError("publisher is not connected (use `async with`)")
        return self._channel

    async def _publish(
        self,
        exchange: AbstractExchange,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = False,
        expiration: float | None = None,
    ) -> None:
        msg = aio_pika.Message(
            body,
            delivery_mode=PERSISTENT,
            content_type="application/json",
            message_id=message_id,
            headers=dict(headers or {}),
            user_id=self.user,
            expiration=expiration,
        )
        try:
            # Bounded: a publish whose confirm never comes (its channel closed while the
            # broker blocked publishers) must not hold its caller, or the orders it
            # carries, for good; the caller tries again.
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await exchange.publish(msg, routing_key=routing_key, mandatory=mandatory)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise BrokerError(f"publish to {exchange.name or '(default)'}/{routing_key}: {exc!r}") from exc

    async def ensure_pool(self, pool: str) -> None:
        if pool not in self._pools:
            assert self._conn is not None
            try:
                queue = await declare_durable(
                    self._conn, self.channel, self.topology.start_queue(pool), self.topology.queue_args()
                )
                await queue.bind(self._ex["start"], routing_key=pool)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection is down (a node went): tried again
                raise BrokerError(f"declare the start queue of pool {pool}: {exc!r}") from exc
            self._pools.add(pool)

    async def publish_start(
        self, pool: str, body: bytes, *, message_id: str, expiration: float | None = None
    ) -> None:
        """Raises BrokerError when the broker cannot route the order to the pool's queue
        (the order stays in the outbox); the queue is declared again on the next try."""
        await self.ensure_pool(pool)
        try:
            await self._publish(
                self._ex["start"], pool, body, message_id=message_id, mandatory=True, expiration=expiration
            )
        except BrokerError:
            self._pools.discard(pool)
            raise

    async def publish_many(
        self, items: Sequence[tuple[str, str, bytes, Mapping[str, Any] | None, str]]
    ) -> None:
        """Publish (exchange kind, routing key, body, headers, message id) items with all
        confirms in flight at once: the round trips overlap."""
        exchanges = {"events": self._ex["events"], "control": self._ex["control"]}
        await asyncio.gather(
            *(
                self._publish(exchanges[kind], key, body, headers=headers, message_id=mid)
                for kind, key, body, headers, mid in items
            )
        )

    async def publish_progress(self, body: bytes, headers: Mapping[str, Any] | None = None) -> None:
        await self._publish(self._ex["reports"], "", body, headers=headers)

    async def publish_control(self, runner_id: str, body: bytes) -> None:
        await self._publish(self._ex["control"], runner_id, body)

    async def publish_control_pool(self, pool: str, body: bytes) -> None:
        await self._publish(self._ex["control"], self.topology.control_pool_key(pool), body)

    async def queue_depth(self, queue: str) -> int:
        """Messages ready in `queue`, on a channel of its own: a failed passive declare
        closes its channel, which must not be the one that publishes."""
        if self._conn is None:
            raise BrokerError("publisher is not connected (use `async with`)")
        channel = await self._conn.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def publish_control_all(self, body: bytes) -> None:
        """To every runner's control queue (a broadcast: a task type's new values)."""
        await self._publish(self._ex["control"], Topology.CONTROL_ALL_KEY, body)

    async def dead_letter(self, body: bytes, reason: str, headers: Mapping[str, Any] | None = None) -> None:
        await self._publish(
            self._ex["dlx"], "", body, headers={**(headers or {}), REASON_HEADER: reason[:1000]}
        )


class Consumer:
    """Consumes queues on its own connection. `prefetch` bounds unacked messages."""

    def __init__(
        self, *, url: str, topology: Topology, prefetch: int, name: str = "taskmgr", declare: bool = True
    ) -> None:
        """declare=False: do not declare the system's exchanges and queues (a downstream
        consumer whose RabbitMQ user may only read the events exchange)."""
        self._declare = declare
        self._url = url
        self.topology = topology
        self._prefetch = prefetch
        self._name = name
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._control_channel: AbstractRobustChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._starts: list[tuple[AbstractQueue, Handler, str, int]] = []  # queue, handler, tag, priority

    async def __aenter__(self) -> Consumer:
        self._conn = await robust_connect(self._url, f"{self._name}-consume")
        self._channel = await self._conn.channel()  # type: ignore[assignment]
        assert self._channel is not None
        await self._channel.set_qos(prefetch_count=self._prefetch)
        if self._declare:
            await _declare_common(self._conn, self._channel, self.topology)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def channel(self) -> AbstractRobustChannel:
        if self._channel is None:
            raise BrokerError("consumer is not connected (use `async with`)")
        return self._channel

    async def set_prefetch(self, prefetch: int, *, channel_wide: bool = False) -> None:
        """`channel_wide`: one limit for the channel's consumers, at once (a per-consumer
        limit applies only to consumers started later). Quorum queues have none (RabbitMQ
        closes the connection that asks): the start consumers start again under a
        per-consumer limit."""
        if channel_wide and self.topology.quorum:
            await self.channel.set_qos(prefetch_count=max(1, prefetch))
            return await self.set_start_priority(None)
        await self.channel.set_qos(prefetch_count=max(1, prefetch), global_=channel_wide)

    async def set_start_priority(self, priority: int | None) -> None:
        """Consume the start queues again with this priority (None: each its own), the new
        consumer before the old is cancelled (no gap). What the old one got stays the
        channel's to ack, and deliveries before its cancel-ok still reach the handler."""
        for k, (queue, handler, tag, prio) in enumerate(self._starts):
            prio = prio if priority is None else priority
            new_tag = await queue.consume(handler, arguments={"x-priority": prio})
            self._consumers.append((queue, new_tag))
            self._starts[k] = (queue, handler, new_tag, prio)
            await queue.cancel(tag)
            self._consumers.remove((queue, tag))

    async def consume_start(self, pool: str, handler: Handler, priority: int = 0) -> None:
        """priority (x-priority): the broker delivers to the highest-priority consumers
        with prefetch room, round-robin among them (classic and quorum queues alike)."""
        assert self._conn is not None
        queue = await declare_durable(
            self._conn, self.channel, self.topology.start_queue(pool), self.topology.queue_args()
        )
        tag = await queue.consume(handler, arguments={"x-priority": priority})
        self._consumers.append((queue, tag))
        self._starts.append((queue, handler, tag, priority))

    async def consume_progress(self, handler: Handler) -> None:
        assert self._conn is not None
        topo = self.topology
        queue = await declare_durable(self._conn, self.channel, topo.progress, topo.queue_args())
        self._consumers.append((queue, await queue.consume(handler)))

    async def consume_control(self, runner_id: str, handler: Handler, *, pool: str | None = None) -> None:
        """Stops for this runner, (with `pool`) those sent to every runner of its pool, and
        the broadcasts to every runner (task type changes).
        On a channel of its own, with its own QoS: Stop messages never wait behind start
        orders that fill the work channel's prefetch."""
        if self._control_channel is None:
            assert self._conn is not None
            self._control_channel = await self._conn.channel()  # type: ignore[assignment]
            assert self._control_channel is not None
            await self._control_channel.set_qos(prefetch_count=CONTROL_PREFETCH)
        queue = await self._control_channel.declare_queue(
            self.topology.control_queue(runner_id), **self.topology.control_args()
        )
        await queue.bind(self.topology.control, routing_key=runner_id)
        await queue.bind(self.topology.control, routing_key=Topology.CONTROL_ALL_KEY)
        if pool is not None:
            await queue.bind(self.topology.control, routing_key=self.topology.control_pool_key(pool))
        self._consumers.append((queue, await queue.consume(handler)))

    async def consume_events(self, binding: str, handler: Handler, *, queue_name: str = "") -> AbstractQueue:
        """A temporary queue bound to the events exchange (for `events tail` and tests)."""
        queue = await self.channel.declare_queue(queue_name, exclusive=True, auto_delete=True)
        await queue.bind(self.topology.events, routing_key=binding)
        self._consumers.append((queue, await queue.consume(handler)))
        return queue

    async def consume_queue(self, name: str, handler: Handler, **declare: Any) -> None:
        queue = await self.channel.declare_queue(name, **declare)
        self._consumers.append((queue, await queue.consume(handler)))

    async def cancel_all(self) -> None:
        """Stop taking messages (unacked ones go back to the queue when we close)."""
        for queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except Exception as exc:  # a closing connection: nothing left to cancel
                log.debug("cancel %s: %r", queue.name, exc)
        self._consumers.clear()
        self._starts.clear()


async def ack_all(messages: Sequence[Message]) -> None:
    """Ack a batch with one `multiple` ack per channel, on its highest delivery tag. For
    a consumer that takes deliveries in order and settles each batch before the next, so
    that every earlier delivery of the channel is settled already."""
    await _settle(messages, ack=True)


async def requeue_all(messages: Sequence[Message]) -> None:
    """Back to the queue: one `multiple` nack per channel, as `ack_all` acks."""
    await _settle(messages, ack=False)


async def _settle(messages: Sequence[Message], *, ack: bool) -> None:
    last: dict[int, Message] = {}
    for m in messages:
        key = id(m.channel)
        if key not in last or (m.delivery_tag or 0) > (last[key].delivery_tag or 0):
            last[key] = m
    results = await asyncio.gather(
        *(m.ack(multiple=True) if ack else m.nack(multiple=True, requeue=True) for m in last.values()),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, BaseException):  # a replaced channel: the broker redelivers
            log.warning("could not %s messages: %r", "ack" if ack else "requeue", r)


async def queue_depth(url: str, queue: str) -> int:
    """Messages ready in a queue (not for a stream, which reports none)."""
    conn = await connect_once(url)
    try:
        channel = await conn.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await conn.close()


async def delete_names(url: str, topology: Topology, pools: Sequence[str] = ()) -> None:
    """Delete a topology's exchanges and queues (tests)."""
    conn = await connect_once(url)
    try:
        ch = await conn.channel()
        queues = [topology.progress, topology.dead, topology.events_stream, topology.events_recorder]
        for q in [*queues, *(topology.start_queue(p) for p in pools)]:
            await ch.queue_delete(q)
        for ex in [topology.events, topology.control, topology.dlx, topology.start, topology.reports]:
            await ch.exchange_delete(ex)
    finally:
        await conn.close()
