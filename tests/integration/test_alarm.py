"""A RabbitMQ memory alarm, on a throwaway RabbitMQ node that the tests start and stop
themselves (an alarm blocks every publisher of its broker, so never the shared one).

During an alarm RabbitMQ blocks each connection that publishes (connection.blocked).
A connection that is closed while blocked (a broker that closes connections, a network
cut during the alarm) must come back: before the fix in taskmgr/broker.py its channel
never did, so a runner's heartbeats and reports stopped for good (the chaos day's
"stalled intake").
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from runners.runner import TaskRunner
from runners.signals import RunnerSignals
from taskmgr.broker import BrokerError, Publisher, Topology, delete_names
from taskmgr.handlers import Registry
from taskmgr.settings import Settings
from tests.helpers import free_port, queue_depth, wait_for

# The watermark that raises the alarm at once, and RabbitMQ's default that clears it.
ALARM_WATERMARK = "0.000001"
NORMAL_WATERMARK = "0.4"
# A node starts in a few seconds on these machines; the bound is generous.
NODE_START_TIMEOUT_S = 90
# aio-pika's robust connection reconnects 5 s after a close.
RECONNECT_BOUND_S = 30.0


@dataclass
class Node:
    """A RabbitMQ node of the test's own: its AMQP URL and rabbitmqctl."""

    name: str
    url: str

    def ctl(self, *args: str) -> str:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, "-q", *args], capture_output=True, text=True, check=True
        ).stdout

    def alarm(self, on: bool) -> None:
        self.ctl("set_vm_memory_high_watermark", ALARM_WATERMARK if on else NORMAL_WATERMARK)

    def connections(self, name_prefix: str) -> dict[str, str]:
        """pid -> state of the connections whose client-given name starts with this."""
        out = {}
        for line in self.ctl("list_connections", "pid", "state", "client_properties").splitlines():
            pid, state, props = line.split("\t", 2)
            if f'"connection_name","{name_prefix}' in props.replace(", ", ","):
                out[pid] = state
        return out

    def close(self, name_prefix: str) -> int:
        pids = list(self.connections(name_prefix))
        for pid in pids:
            self.ctl("close_connection", pid, "the test closes it during the alarm")
        return len(pids)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        pytest.skip("needs a RabbitMQ installation (rabbitmq-server, rabbitmqctl) to start a throwaway node")
    base = tempfile.mkdtemp(prefix="taskmgr-alarm-")
    name = f"talarm{uuid.uuid4().hex[:8]}@localhost"
    port = free_port()
    with open(os.path.join(base, "rabbitmq.conf"), "w") as f:
        # Its own listener only (the machine's /etc/rabbitmq config names the shared one).
        f.write(f"listeners.tcp.local = 127.0.0.1:{port}\n")
    with open(os.path.join(base, "enabled_plugins"), "w") as f:
        f.write("[].\n")  # no management or prometheus listeners to collide with
    if _has_user("rabbitmq"):  # rabbitmq-server, run as root, runs the node as rabbitmq
        for path in [base, *(os.path.join(base, e) for e in os.listdir(base))]:
            shutil.chown(path, "rabbitmq", "rabbitmq")
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": os.path.join(base, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(base, "log"),
        "RABBITMQ_PID_FILE": os.path.join(base, "pid"),
        "RABBITMQ_CONFIG_FILE": os.path.join(base, "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(base, "enabled_plugins"),
    }
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True)
    n = Node(name=name, url=f"amqp://guest:guest@127.0.0.1:{port}/")
    pid_file = env["RABBITMQ_PID_FILE"]
    try:
        subprocess.run(
            ["rabbitmqctl", "-n", name, "-q", "wait", pid_file, "--timeout", str(NODE_START_TIMEOUT_S)],
            check=True,
            capture_output=True,
            timeout=NODE_START_TIMEOUT_S + 10,
        )
        yield n
    finally:
        subprocess.run(
            ["rabbitmqctl", "-n", name, "-q", "stop"], capture_output=True, check=False, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)


def _has_user(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


async def _blocked(node: Node, name_prefix: str) -> bool:
    states = await asyncio.to_thread(node.connections, name_prefix)
    return "blocked" in states.values()


async def test_a_publisher_closed_while_blocked_by_an_alarm_publishes_again(node: Node) -> None:
    topo = Topology(f"t{uuid.uuid4().hex[:12]}")
    name = f"alarm-{uuid.uuid4().hex[:8]}"
    try:
        async with Publisher(url=node.url, topology=topo, name=name) as pub:
            await pub.publish_progress(b'{"before": "the alarm"}')
            conn = pub._conn
            assert conn is not None
            reconnected = asyncio.Event()
            conn.reconnect_callbacks.add(lambda *_: reconnected.set())
            await asyncio.to_thread(node.alarm, True)
            try:
                during = asyncio.create_task(pub.publish_progress(b'{"during": "the alarm"}'))
                # The broker blocks the connection on its first publish of the alarm.
                await wait_for(lambda: _blocked(node, f"{name}-publish"), timeout=10, every=0.1)
                assert await asyncio.to_thread(node.close, f"{name}-publish") == 1
                with pytest.raises(BrokerError):
                    await during
            finally:
                await asyncio.to_thread(node.alarm, False)
            # Before the fix the channel's restore waited for ever for the dead
            # connection to be unblocked, and the reconnect behind it never finished.
            async with asyncio.timeout(RECONNECT_BOUND_S):
                await reconnected.wait()
            await pub.publish_progress(b'{"after": "the alarm"}')
        assert await queue_depth(node.url, topo.progress) >= 2
    finally:
        await delete_names(node.url, topo)


async def test_a_runner_heartbeats_again_after_an_alarm_that_closed_its_connections(node: Node) -> None:
    """The chaos day's symptom: a runner whose connections were closed during a memory
    alarm never heartbeated (nor reported) again, so its tasks were never seen taken."""
    topo = Topology(f"t{uuid.uuid4().hex[:12]}")
    settings = Settings(amqp_url=node.url, amqp_prefix=topo.prefix, heartbeat_interval=0.3)
    stop = asyncio.Event()
    try:
        async with Publisher(url=node.url, topology=topo, name="manager") as manager:
            await manager.ensure_pool(settings.pool)  # the manager declares the topology
            signals = RunnerSignals()
            async with TaskRunner(settings=settings, registry=Registry.default(), signals=signals) as runner:
                run = asyncio.create_task(runner.run(stop))
                await signals.heartbeat_sent.wait()
                prefix = f"runner-{runner.runner_id}"
                await asyncio.to_thread(node.alarm, True)
                try:
                    # Heartbeats have a connection of their own, blocked at its next beat.
                    await wait_for(lambda: _blocked(node, f"{prefix}-beat-publish"), timeout=10, every=0.1)
                    # Its publishing, heartbeat and consuming connections, as the chaos day does.
                    assert await asyncio.to_thread(node.close, prefix) == 3
                finally:
                    await asyncio.to_thread(node.alarm, False)
                before = signals.heartbeat_sent.count
                # Before the fix: no heartbeat was ever confirmed again.
                await signals.heartbeat_sent.wait(before + 3, within_s=RECONNECT_BOUND_S)
                stop.set()
                await asyncio.wait_for(run, 30)
    finally:
        stop.set()
        await delete_names(node.url, topo, pools=(settings.pool,))
