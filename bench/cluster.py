"""The cluster harness (scripts/cluster) from Python, for the cluster tests and the
cluster chaos day: a 3-node RabbitMQ cluster and a PostgreSQL primary with a streaming
replica on this machine, their URLs, and the faults (kill and restart a node, kill the
primary and promote the replica, rejoin the old primary as a replica)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster"
NODES = (1, 2, 3)
PG_NAMES = ("tmc1", "tmc2")
PG_PORTS = {"tmc1": 5441, "tmc2": 5442}
# `scripts/cluster up` from nothing takes about 80 s on this 2-core machine.
UP_TIMEOUT_S = 400.0


class ClusterError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why the harness cannot run here (None: it can)."""
    if not SCRIPT.exists():
        return f"{SCRIPT} is missing (the harness runs from a checkout)"
    if os.geteuid() != 0:
        return "the cluster harness runs as root (it starts RabbitMQ nodes and PostgreSQL clusters)"
    for tool in ("rabbitmq-server", "rabbitmqctl", "pg_createcluster", "pg_basebackup"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def node_name(n: int) -> str:
    return f"taskmgr-c{n}@localhost"


def amqp_port(n: int) -> int:
    return 5680 + n


@dataclass
class Cluster:
    """The harness's cluster. Its URLs are those of `scripts/cluster env`."""

    user: str = "guest"
    password: str = "guest"
    database: str = "taskmgr"

    def run(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run(
            [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise ClusterError(f"scripts/cluster {' '.join(args)}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    # -- lifecycle --------------------------------------------------------------------

    def up(self) -> None:
        self.run("up", timeout=UP_TIMEOUT_S)

    def down(self) -> None:
        self.run("down", timeout=UP_TIMEOUT_S)

    def is_up(self) -> bool:
        return subprocess.run([str(SCRIPT), "status"], capture_output=True, check=False).returncode == 0

    # -- URLs -------------------------------------------------------------------------

    def amqp_node_url(self, n: int) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{amqp_port(n)}/"

    @property
    def amqp_url(self) -> str:
        """Every node, comma-separated (TASKMGR_AMQP_URL)."""
        return ",".join(self.amqp_node_url(n) for n in NODES)

    def database_url(self, database: str | None = None, *, attrs: str = "read-write") -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in PG_PORTS.values())
        return (
            f"postgresql+asyncpg://postgres@{hosts}/{database or self.database}?target_session_attrs={attrs}"
        )

    def pg_url(self, name: str, database: str | None = None) -> str:
        """One PostgreSQL cluster of the two (not the failover URL)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{PG_PORTS[name]}/{database or self.database}"

    # -- RabbitMQ ---------------------------------------------------------------------

    def rabbit_kill(self, n: int) -> None:
        self.run("rabbit-kill", str(n))

    def rabbit_start(self, n: int) -> None:
        self.run("rabbit-start", str(n), timeout=200)

    def rabbitmqctl(self, *args: str, node: int | None = None) -> str:
        """rabbitmqctl against node `node`, or the first that answers."""
        error = ""
        for n in [node] if node else list(NODES):
            done = subprocess.run(
                ["rabbitmqctl", "-n", node_name(n), "-q", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return done.stdout
            error = done.stderr
        raise ClusterError(f"rabbitmqctl {' '.join(args)}: {error.strip()[-1000:]}")

    def queues(self) -> dict[str, dict[str, object]]:
        """name -> {type, leader, members} of every queue of the cluster."""
        out = self.rabbitmqctl("list_queues", "name", "type", "leader", "members", "--formatter", "json")
        return {q["name"]: q for q in json.loads(out)}

    def leader_node(self, queue: str) -> int:
        """The node number (1..3) that leads a quorum queue or a stream."""
        leader = str(self.queues()[queue]["leader"])
        for n in NODES:
            if leader == node_name(n):
                return n
        raise ClusterError(f"queue {queue} has leader {leader!r}, not a harness node")

    # -- PostgreSQL -------------------------------------------------------------------

    def pg_primary(self) -> str:
        """The running primary, tmc1 or tmc2."""
        name = self.run("pg-primary").strip()
        if name not in PG_NAMES:
            raise ClusterError("no PostgreSQL primary runs")
        return name

    @staticmethod
    def other(name: str) -> str:
        return "tmc2" if name == "tmc1" else "tmc1"

    def pg_kill(self, name: str) -> None:
        self.run("pg-kill", name)

    def pg_promote(self, name: str) -> None:
        self.run("pg-promote", name)

    def pg_rejoin(self, name: str) -> None:
        self.run("pg-rejoin", name, timeout=300)

    def pg_sync(self, on: bool) -> None:
        self.run("pg-sync", "on" if on else "off")
