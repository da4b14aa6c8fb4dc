"""Settings for a cluster: the queue type follows the number of RabbitMQ nodes unless
set, the arguments of each queue, the read URL, and the nodes of a connection."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from yarl import URL

from taskmgr.broker import Topology
from taskmgr.connections import BrokerError, _RobustConnection, amqp_urls
from taskmgr.settings import Settings

ONE = "amqp://guest:guest@127.0.0.1:5672/"
THREE = "amqp://u:p@h1:5681/,amqp://u:p@h2:5682/ , amqp://u:p@h3:5683/"


def test_quorum_queues_default_on_for_a_list_of_nodes_and_off_for_one() -> None:
    assert not Settings(amqp_url=ONE).use_quorum_queues
    assert Settings(amqp_url=THREE).use_quorum_queues
    assert Settings(amqp_url=ONE, quorum_queues=True).use_quorum_queues
    assert not Settings(amqp_url=THREE, quorum_queues=False).use_quorum_queues


def test_a_delivery_limit_below_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="delivery_limit"):
        Settings(delivery_limit=0)


def test_the_topology_of_the_settings_declares_each_queue_type() -> None:
    quorum = Topology.from_settings(Settings(amqp_url=THREE, delivery_limit=4, amqp_prefix="p"))
    assert quorum.queue_args() == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": "p.dlx",
    }
    assert quorum.dead_args() == {"x-queue-type": "quorum"}
    assert "x-queue-mode" not in quorum.recorder_args()  # quorum queues keep messages on disk
    assert quorum.control_args()["durable"] and "exclusive" not in quorum.control_args()
    classic = Topology.from_settings(Settings(amqp_url=ONE, amqp_prefix="p"), stream=False)
    assert classic.stream is None
    assert classic.queue_args() == {"x-dead-letter-exchange": "p.dlx"}
    assert classic.control_args() == {"exclusive": True, "auto_delete": True}


def test_read_commands_use_the_read_url_when_set() -> None:
    assert Settings(database_url="postgresql+asyncpg://a/x").reads_url == "postgresql+asyncpg://a/x"
    s = Settings(database_url="postgresql+asyncpg://a/x", read_database_url="postgresql+asyncpg://b/x")
    assert s.reads_url == "postgresql+asyncpg://b/x"


def test_the_nodes_of_an_amqp_url() -> None:
    assert amqp_urls(THREE) == ["amqp://u:p@h1:5681/", "amqp://u:p@h2:5682/", "amqp://u:p@h3:5683/"]
    with pytest.raises(BrokerError):
        amqp_urls("")


async def test_each_connection_attempt_goes_to_the_next_node() -> None:
    urls = [URL(u) for u in amqp_urls(THREE)]
    conn = _RobustConnection(urls, 1)
    assert conn.url.host == "h2"  # where it starts
    conn.transport = None  # aio-pika clears it before each attempt
    assert conn.url.host == "h3"
    conn.transport = None
    assert conn.url.host == "h1"
    conn.url = conn.url.with_password("new")  # aio-pika's update_secret: this node's only
    assert [u.password for u in conn._urls] == ["new", "p", "p"]
