"""On the cluster harness (scripts/cluster: 3 RabbitMQ nodes, a PostgreSQL primary and a
streaming replica on this machine), marked `cluster`: run by scripts/test --slow. What
it checks: the harness itself, quorum queues and the replicated stream, publishing and
consuming through the loss of the start queue's leader node, and a PostgreSQL failover
that every connection follows, with the leadership lease intact."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from bench.cluster import NODES, PG_PORTS, Cluster
from manager.leadership import Elector
from taskmgr import broker, store
from taskmgr.broker import BrokerError, Consumer, Publisher, StreamRetention, Topology, delete_names
from taskmgr.db import make_engine

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
log = logging.getLogger(__name__)
T = TypeVar("T")

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


async def retry(what: str, fn: Callable[[], Awaitable[T]], bound: float = FAILOVER_BOUND_S) -> T:
    """`fn()` until it succeeds (a connection to the dead primary fails, then the pool
    reconnects, to the new one), within `bound` seconds."""
    async with asyncio.timeout(bound):
        while True:
            try:
                return await fn()
            except (OSError, sa_exc.DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.info("%s: %r, again", what, exc)
                await asyncio.sleep(0.3)


async def test_after_a_promotion_connections_find_the_new_primary_and_the_lease_holds(
    cluster: Cluster,
) -> None:
    """Synchronous replication on; the primary is stopped at once (as a crash) and the
    replica promoted: the same engine writes again, on the new primary, with every row
    committed before; the leader renews its lease there and no other manager takes it;
    the old primary rejoins as a replica and read-only connections prefer it."""
    table = f"cl_probe_{uuid.uuid4().hex[:8]}"
    primary = await asyncio.to_thread(cluster.pg_primary)
    await asyncio.to_thread(cluster.pg_sync, True)
    engine = make_engine(cluster.database_url(), name="taskmgr-cluster-test")
    reads = make_engine(cluster.database_url(attrs="prefer-standby"), name="taskmgr-cluster-test-reads")
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"create table {table} (n int primary key)"))
            await conn.execute(text("truncate taskmgr_leader"))
        for n in range(100):
            async with engine.begin() as conn:
                await conn.execute(text(f"insert into {table} values ({n})"))
        leader = Elector(engine=engine, lease_s=30.0, name="taskmgr-leader-cluster-1")
        other = Elector(engine=engine, lease_s=30.0, name="taskmgr-leader-cluster-2")
        assert await leader.campaign()

        await asyncio.to_thread(cluster.pg_kill, primary)
        await asyncio.to_thread(cluster.pg_promote, cluster.other(primary))
        assert await asyncio.to_thread(cluster.pg_primary) == cluster.other(primary)

        async def write() -> None:
            async with engine.begin() as conn:
                await leader.fence(conn)
                await conn.execute(text(f"insert into {table} values (100)"))

        await retry("write after the promotion", write)
        await retry("renew", leader.renew)
        assert not await retry("campaign", other.campaign)
        async with engine.connect() as conn:
            assert (await conn.execute(text(f"select count(*) from {table}"))).scalar_one() == 101
            port = (await conn.execute(text("select inet_server_port()"))).scalar_one()
            assert port == PG_PORTS[cluster.other(primary)]
            assert await store.leader_name(conn) == leader.name

        await asyncio.to_thread(cluster.pg_rejoin, primary)

        async def read_port() -> int:
            async with reads.connect() as conn:
                return int((await conn.execute(text("select inet_server_port()"))).scalar_one())

        await reads.dispose()  # connections made while it was down went to the primary
        assert await retry("read", read_port) == PG_PORTS[primary]  # the replica, now
    finally:
        await asyncio.to_thread(cluster.pg_sync, False)
        with contextlib.suppress(Exception):
            async with engine.begin() as conn:
                await conn.execute(text(f"drop table if exists {table}"))
                await conn.execute(text("truncate taskmgr_leader"))
        await engine.dispose()
        await reads.dispose()
