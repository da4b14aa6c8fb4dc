"""`taskmgr bench chaos --cluster --minutes N`: the chaos game day (bench/chaos.py) on the
cluster harness (scripts/cluster: 3 RabbitMQ nodes, a PostgreSQL primary and a streaming
replica), with two more fault kinds:

- `node`: a RabbitMQ node SIGKILLed (every other time the one that leads the start queue,
  else one at random) and started again NODE_DOWN_S later;
- `failover`: the PostgreSQL primary stopped at once (`-m immediate`, as a crash) and the
  replica promoted; the old primary rejoins as a replica of the new one REJOIN_AFTER_S
  later (a fresh pg_basebackup).

Every process reaches the cluster through the lists of nodes (TASKMGR_AMQP_URL: the three
nodes; TASKMGR_DATABASE_URL: both PostgreSQL hosts with target_session_attrs=read-write);
the queues are quorum queues. Synchronous replication is on for the run (a commit is on
the replica before it returns), so a failover loses no acknowledged write. One node is
down at a time (a quorum queue needs two of three), and a failover waits for the previous
one's rejoin. The same invariants as the single-machine day are checked.

The single-machine kinds that act on the machine's own services (`postgres` restarts its
PostgreSQL, `alarm` its RabbitMQ's watermark) are not part of a cluster day; `broker`
closes the services' connections on the cluster's nodes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from typing import Any

from bench.chaos import LEADERLESS_GRACE_S, Harness, log
from bench.cluster import NODES, PG_PORTS, Cluster, node_name, unavailable
from taskmgr.broker import Topology
from taskmgr.settings import Settings

CLUSTER_KINDS = (
    "runner",
    "manager",
    "broker",
    "api",
    "freeze",
    "poison",
    "bomb",
    "reversal",
    "node",
    "failover",
)
# How long a killed RabbitMQ node stays down before it is started again.
NODE_DOWN_S = 8.0
# How long after a promotion the old primary rejoins as a replica.
REJOIN_AFTER_S = 5.0


class ClusterHarness(Harness):
    def __init__(self, settings: Settings, *, cluster: Cluster, **kw: Any) -> None:
        self.cluster = cluster
        on_cluster = settings.model_copy(
            update={
                "amqp_url": cluster.amqp_url,
                "database_url": cluster.database_url(),
                "quorum_queues": True,
            }
        )
        super().__init__(on_cluster, **kw)
        self.prefix = f"chaoscl{self.seed}"
        self.settings = self.settings.model_copy(update={"amqp_prefix": self.prefix})
        self.topology = Topology.from_settings(self.settings, stream=False)
        self.node_kills = 0
        self.node_lock = asyncio.Lock()  # held while a node is down: one at a time
        self.pg_lock = asyncio.Lock()  # held from a promotion to the old primary's rejoin

    def env(self, role: str) -> dict[str, str]:
        env = super().env(role)
        env["TASKMGR_QUORUM_QUEUES"] = "true"
        return env

    def _later(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def inject(self, kind: str, engine: Any) -> str:
        if kind == "node":
            return await self.kill_node()
        if kind == "failover":
            return await self.failover()
        return await super().inject(kind, engine)

    async def kill_node(self) -> str:
        await self.node_lock.acquire()  # the previous node is back
        try:
            queue = self.topology.start_queue("default")
            victim, why = self.rng.choice(NODES), "at random"
            if self.node_kills % 2 == 0:
                with contextlib.suppress(Exception):
                    victim = await asyncio.to_thread(self.cluster.leader_node, queue)
                    why = f"the leader of {queue}"
            self.node_kills += 1
            now = time.time()
            self.leaderless.append((now, now + NODE_DOWN_S + LEADERLESS_GRACE_S))
            await asyncio.to_thread(self.cluster.rabbit_kill, victim)
        except BaseException:
            self.node_lock.release()
            raise

        async def restart() -> None:
            try:
                await asyncio.sleep(NODE_DOWN_S)
                await asyncio.to_thread(self.cluster.rabbit_start, victim)
                log(f"{node_name(victim)} started again")
            finally:
                self.node_lock.release()

        self._later(restart())
        return f"SIGKILL RabbitMQ node {node_name(victim)} ({why}), back in {NODE_DOWN_S:.0f} s"

    async def failover(self) -> str:
        await self.pg_lock.acquire()  # the previous failover's old primary has rejoined
        try:
            primary = await asyncio.to_thread(self.cluster.pg_primary)
            replica = self.cluster.other(primary)
            now = time.time()
            self.leaderless.append((now, now + REJOIN_AFTER_S + LEADERLESS_GRACE_S))
            await asyncio.to_thread(self.cluster.pg_kill, primary)
            await asyncio.to_thread(self.cluster.pg_promote, replica)
        except BaseException:
            self.pg_lock.release()
            raise

        async def rejoin() -> None:
            try:
                await asyncio.sleep(REJOIN_AFTER_S)
                await asyncio.to_thread(self.cluster.pg_rejoin, primary)
                log(f"{primary} rejoined as a replica of {replica}")
            finally:
                self.pg_lock.release()

        self._later(rejoin())
        return f"PostgreSQL primary {primary} stopped at once, {replica} promoted"

    def close_connections(self) -> int:
        """The `broker` fault on the cluster: the services' connections, on every node
        (one call per user: the cluster closes them wherever they are)."""
        before = self._service_connections()
        for user in ("taskmgr_manager", "taskmgr_runner"):
            with contextlib.suppress(Exception):
                self.cluster.rabbitmqctl("close_all_user_connections", user, "chaos")
        return before

    def _service_connections(self) -> int:
        with contextlib.suppress(Exception):
            out = self.cluster.rabbitmqctl("list_connections", "user")
            return sum(line.strip() in ("taskmgr_manager", "taskmgr_runner") for line in out.splitlines())
        return 0

    async def run(self) -> dict[str, Any]:
        await asyncio.to_thread(self.cluster.pg_sync, True)
        try:
            result = await super().run()
        finally:
            await self.repair()
        result["cluster"] = {
            "rabbitmq_nodes": len(NODES),
            "node_kills": self.faults["node"],
            "failovers": self.faults["failover"],
            "synchronous_replication": True,
        }
        return result

    async def repair(self) -> None:
        """Every node running and the replica following, whatever the run left."""
        for n in NODES:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.cluster.rabbit_start, n)
        with contextlib.suppress(Exception):
            primary = await asyncio.to_thread(self.cluster.pg_primary)
            if not await asyncio.to_thread(self._replica_follows, primary):
                await asyncio.to_thread(self.cluster.pg_rejoin, self.cluster.other(primary))
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.cluster.pg_sync, False)

    def _replica_follows(self, primary: str) -> bool:
        sql = "select count(*) from pg_stat_replication where state = 'streaming'"
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(PG_PORTS[primary]), "-U", "postgres", "-XAtqc", sql],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return out == "1"


async def main(
    settings: Settings, minutes: float = 1.0, seed: int | None = None, kinds: str = "all"
) -> dict[str, Any]:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    chosen = (
        CLUSTER_KINDS
        if kinds.strip() == "all"
        else tuple(k.strip() for k in kinds.split(",") if k.strip())
    )
    unknown = set(chosen) - set(CLUSTER_KINDS)
    if unknown:
        choose = ", ".join(CLUSTER_KINDS)
        raise ValueError(f"fault kinds {sorted(unknown)} are not part of a cluster day; choose from {choose}")
    why = unavailable()
    if why:
        raise ValueError(why)
    cluster = Cluster()
    if not await asyncio.to_thread(cluster.is_up):
        raise ValueError("the cluster is not up: run scripts/cluster up first")
    return await ClusterHarness(settings, cluster=cluster, minutes=minutes, seed=seed, kinds=chosen).run()
