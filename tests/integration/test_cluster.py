"""On the cluster harness (scripts/cluster: 3 RabbitMQ nodes, a PostgreSQL primary and a
streaming replica on this machine), marked `cluster`: run by scripts/test --slow. What
it checks: the harness itself, quorum queues and the replicated stream, publishing and
consuming through the loss of the start queue's leader node."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator

import pytest

from bench.cluster import NODES, PG_PORTS, Cluster
from taskmgr import broker
from taskmgr.broker import BrokerError, Consumer, Publisher, StreamRetention, Topology, delete_names

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

# A robust connection reconnects 5 s after its node goes; a quorum queue elects a new
# leader within a few seconds of losing one.
FAILOVER_BOUND_S = 60.0


def psql(port: int, sql: str, db: str = "taskmgr") -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db, "-XAtqc", sql],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
async def ctopo(cluster: Cluster) -> AsyncIterator[Topology]:
    topo = Topology(f"t{uuid.uuid4().hex[:12]}", stream=StreamRetention(), quorum=True)
    yield topo
    await delete_names(cluster.amqp_url, topo, pools=("default",))


def test_the_harness_runs_three_nodes_and_a_primary_with_a_replica(cluster: Cluster) -> None:
    status = cluster.run("status")
    for n in NODES:
        assert f"taskmgr-c{n}@localhost amqp://127.0.0.1:{5680 + n} up, in the cluster" in status
    primary = cluster.pg_primary()
    replica = cluster.other(primary)
    assert psql(PG_PORTS[replica], "select pg_is_in_recovery()") == "t"
    assert psql(PG_PORTS[primary], "select pg_is_in_recovery()") == "f"
    for port in PG_PORTS.values():
        assert psql(port, "show shared_preload_libraries") == "timescaledb"
        roles = psql(
            port,
            "select string_agg(rolname, ',' order by rolname) from pg_roles where rolname like 'taskmgr%'",
        )
        assert {"taskmgr_manager", "taskmgr_reader", "taskmgr_runner"} <= set(roles.split(","))
    users = cluster.rabbitmqctl("list_users")
    for user in ("taskmgr_manager", "taskmgr_runner", "taskmgr_service", "taskmgr_consumer"):
        assert user in users
    # Idempotent: a second `up` finds everything running and changes nothing.
    cluster.up()
    assert cluster.pg_primary() == primary


async def test_the_queues_are_quorum_queues_and_the_stream_is_on_every_node(
    cluster: Cluster, ctopo: Topology
) -> None:
    async with Publisher(url=cluster.amqp_url, topology=ctopo) as pub:
        await pub.ensure_pool("default")
    queues = await asyncio.to_thread(cluster.queues)
    every = {f"taskmgr-c{n}@localhost" for n in NODES}
    for name in (ctopo.start_queue("default"), ctopo.progress, ctopo.dead, ctopo.events_recorder):
        assert queues[name]["type"] == "quorum", name
        assert set(queues[name]["members"]) == every, name  # type: ignore[call-overload]
    assert queues[ctopo.events_stream]["type"] == "stream"
    assert set(queues[ctopo.events_stream]["members"]) == every  # type: ignore[call-overload]


async def test_orders_go_on_through_the_loss_of_the_start_queues_leader(
    cluster: Cluster, ctopo: Topology
) -> None:
    """Publishers and consumers connected to every node; the node that leads the start
    queue is SIGKILLed mid-stream: every order confirmed before or after arrives (at least
    once: a runner drops a repeat by its id), and the queue has a new leader."""
    got: set[str] = set()
    sent: set[str] = set()
    pool = "default"

    async def on_start(m: broker.Message) -> None:
        got.add(str(m.message_id))
        await m.ack()

    async def send(pub: Publisher, n: int) -> None:
        for _ in range(n):
            mid = str(uuid.uuid4())
            async with asyncio.timeout(FAILOVER_BOUND_S):
                while True:
                    try:
                        await pub.publish_start(pool, b"{}", message_id=mid)
                        break
                    except BrokerError:  # its node went: the caller tries again
                        await asyncio.sleep(0.5)
            sent.add(mid)

    async with Publisher(url=cluster.amqp_url, topology=ctopo, name="cl-pub") as pub:
        await pub.ensure_pool(pool)
        consumers = [
            Consumer(url=cluster.amqp_node_url(n), topology=ctopo, prefetch=50, name=f"cl-c{n}")
            for n in NODES
        ]
        for c in consumers:
            await c.__aenter__()
            await c.consume_start(pool, on_start)
        try:
            await send(pub, 50)
            leader = await asyncio.to_thread(cluster.leader_node, ctopo.start_queue(pool))
            await asyncio.to_thread(cluster.rabbit_kill, leader)
            try:
                await send(pub, 50)
                async with asyncio.timeout(FAILOVER_BOUND_S):
                    while not sent <= got:
                        await asyncio.sleep(0.2)
                assert sent <= got
                new_leader = await asyncio.to_thread(cluster.leader_node, ctopo.start_queue(pool))
                assert new_leader != leader
            finally:
                await asyncio.to_thread(cluster.rabbit_start, leader)
        finally:
            for c in consumers:
                await c.__aexit__(None, None, None)
