"""Quorum queues and a list of nodes, on the shared RabbitMQ node (a single node declares
quorum queues too; the cluster's failover is tests/integration/test_cluster.py's): the
queue types declared, poison dead-lettered after the delivery limit, a queue of the other
type used as it is, and a connection that skips a node that is down."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest

from taskmgr import broker
from taskmgr.broker import Consumer, Publisher, Topology
from taskmgr.connections import BrokerError, amqp_urls, connect_once
from tests.conftest import AMQP_URL
from tests.helpers import free_port, queue_depth, wait_for


@pytest.fixture
async def quorum(topology: Topology) -> AsyncIterator[Topology]:
    """The test's topology, with quorum queues and a delivery limit of 2."""
    yield dataclasses.replace(topology, quorum=True, delivery_limit=2)


async def queue_type_is(name: str, arguments: dict[str, object]) -> bool:
    """Whether declaring `name` with these arguments is accepted (RabbitMQ refuses a
    declare whose x-queue-type differs from the queue's)."""
    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        return True
    finally:
        await conn.close()


async def test_a_quorum_topology_declares_quorum_queues(quorum: Topology) -> None:
    async with Publisher(url=AMQP_URL, topology=quorum) as pub:
        await pub.ensure_pool("default")
    for name in (quorum.start_queue("default"), quorum.progress):
        assert await queue_type_is(name, quorum.queue_args())
        assert not await queue_type_is(name, {"x-dead-letter-exchange": quorum.dlx})
    assert await queue_type_is(quorum.dead, {"x-queue-type": "quorum"})


async def test_a_start_order_never_acked_goes_to_the_dead_letters_after_the_delivery_limit(
    quorum: Topology,
) -> None:
    """Poison that kills its runner at each delivery: with a delivery limit of 2 the third
    return to the queue dead-letters it, and the queue is empty."""
    deliveries = 0
    async with Publisher(url=AMQP_URL, topology=quorum) as pub:
        await pub.publish_start("default", b'{"poison": true}', message_id=str(uuid.uuid4()))
        async with Consumer(url=AMQP_URL, topology=quorum, prefetch=1, name="poison-q") as c:

            async def crash(m: broker.Message) -> None:  # a runner that dies: back to the queue
                nonlocal deliveries
                deliveries += 1
                await m.nack(requeue=True)

            await c.consume_start("default", crash)
            await wait_for(lambda: queue_depth(AMQP_URL, quorum.dead), timeout=10, what="dead letter")
            await c.cancel_all()
    assert deliveries == 3  # the first delivery and two more: the limit
    assert await queue_depth(AMQP_URL, quorum.dead) == 1
    assert await queue_depth(AMQP_URL, quorum.start_queue("default")) == 0


async def test_a_classic_queue_that_exists_is_used_as_it_is_with_a_warning(
    topology: Topology, quorum: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """An installation that turns quorum queues on keeps its classic queues (RabbitMQ
    cannot change a queue's type) and goes on working: the warning says what to do."""
    async with Publisher(url=AMQP_URL, topology=topology) as pub:
        await pub.ensure_pool("default")
    with caplog.at_level(logging.WARNING, logger="taskmgr.broker"):
        async with Publisher(url=AMQP_URL, topology=quorum) as pub:
            await pub.publish_start("default", b"{}", message_id=str(uuid.uuid4()))
            await pub.publish_progress(b"{}")
    assert await queue_depth(AMQP_URL, quorum.start_queue("default")) == 1
    assert await queue_depth(AMQP_URL, quorum.progress) == 1
    warned = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.getMessage()]
    assert any(quorum.start_queue("default") in w for w in warned)
    assert any(quorum.progress in w for w in warned)
    assert await queue_type_is(quorum.progress, {"x-dead-letter-exchange": quorum.dlx})  # still classic


async def test_a_list_of_nodes_skips_one_that_is_down(topology: Topology) -> None:
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    async with Publisher(url=f"{down}, {AMQP_URL}", topology=topology) as pub:
        await pub.publish_progress(b"{}")
    assert await queue_depth(AMQP_URL, topology.progress) == 1
    conn = await connect_once(f"{down},{AMQP_URL}")
    await conn.close()


async def test_no_node_that_answers_is_an_error() -> None:
    down = [f"amqp://guest:guest@127.0.0.1:{free_port()}/" for _ in range(2)]
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        async with asyncio.timeout(30), Publisher(url=",".join(down), topology=Topology("tnone")):
            pass
    with pytest.raises(BrokerError, match="no AMQP URL"):
        amqp_urls(" , ")


async def test_a_channel_wide_prefetch_on_quorum_queues_limits_the_start_consumers(quorum: Topology) -> None:
    """RabbitMQ refuses a channel-wide limit on quorum queues (and closes the connection):
    the runner's prefetch adjustment applies per consumer instead, at once."""
    held: list[broker.Message] = []
    async with Publisher(url=AMQP_URL, topology=quorum) as pub:
        async with Consumer(url=AMQP_URL, topology=quorum, prefetch=8, name="prefetch-q") as c:

            async def hold(m: broker.Message) -> None:  # a runner that is full: no ack yet
                held.append(m)

            await c.consume_start("default", hold)
            await c.set_prefetch(2, channel_wide=True)
            for _ in range(6):
                await pub.publish_start("default", b"{}", message_id=str(uuid.uuid4()))
            await wait_for(lambda: asyncio.sleep(0, len(held) >= 2), timeout=10, what="two deliveries")
            await asyncio.sleep(0.5)  # a third would arrive now
            assert len(held) == 2
            for m in held:
                await m.ack()
            await wait_for(lambda: asyncio.sleep(0, len(held) >= 4), timeout=10, what="two more")
            await c.cancel_all()
    # Six sent, two acked: the other two held go back to the queue when the consumer closes.
    assert await queue_depth(AMQP_URL, quorum.start_queue("default")) == 4
