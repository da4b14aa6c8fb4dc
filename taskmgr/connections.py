"""Connections to RabbitMQ: to one node or to any node of a cluster (TASKMGR_AMQP_URL
lists them, comma-separated), robust (reconnecting, moving to another node) or plain."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from yarl import URL

from taskmgr.errors import TaskmgrError

log = logging.getLogger(__name__)


class BrokerError(TaskmgrError):
    pass


class _RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, over a list of nodes, and a connection that closed
    is no longer counted as blocked.

    Nodes: aio-pika's robust connection reconnects to its one URL. This one holds the
    nodes of a cluster (TASKMGR_AMQP_URL, comma-separated) and moves to the next at each
    connection attempt (aio-pika clears `transport` before each), so a reconnect after a
    node died goes to another node, and a node that is down is skipped at the next try.

    Blocked: during a memory alarm RabbitMQ blocks each connection that publishes, and
    aiormq then holds `Connection.ready()` until connection.unblocked arrives. A connection
    closed while blocked (a broker closing connections, a cut network) never gets one.
    On that close each of its robust channels reopens itself, in aio-pika, through
    `ready()` of that dead connection: it waits there for good, holding the channel's
    restore lock, so the reconnect that follows waits for that lock for good too and
    never restores any channel. Every publish then fails with "channel closed" for the
    rest of the process: the chaos day's runners stopped heartbeating and reporting
    (tests/test_alarm.py). Unblocking the dead connection lets the stale reopen fail at
    once and the reconnect restore the channels."""

    def __init__(self, urls: Sequence[URL], first: int, **kwargs: Any) -> None:
        self._urls = list(urls)
        self._at = first - 1  # aio-pika's __init__ clears `transport` once: to `first`
        super().__init__(self._urls[first], **kwargs)

    @property  # type: ignore[override]
    def url(self) -> URL:
        return self._urls[self._at % len(self._urls)]

    @url.setter
    def url(self, value: URL) -> None:  # aio-pika's (__init__, update_secret): this node's
        self._urls[self._at % len(self._urls)] = URL(value)

    @property  # type: ignore[override]
    def transport(self) -> Any:
        return self._transport

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None:  # before each connection attempt (and at a close): the next node
            self._at += 1
        self._transport = value

    async def _on_connected(self) -> None:
        transport = self.transport
        if transport is not None:
            conn = transport.connection
            conn.closing.add_done_callback(functools.partial(_unblock, conn))
            if len(self._urls) > 1:
                log.info("connected to %s:%s", self.url.host, self.url.port)
        await super()._on_connected()


def _unblock(conn: Any, _closing: object = None) -> None:
    event = getattr(conn, "_Connection__connection_unblocked", None)  # aiormq's, private
    if isinstance(event, asyncio.Event):
        event.set()
    else:
        log.error("aiormq has no connection-unblocked event: a connection closed while blocked may stall")


def amqp_urls(url: str) -> list[str]:
    """The nodes of TASKMGR_AMQP_URL: one URL, or a cluster's, comma-separated."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise BrokerError("no AMQP URL given (TASKMGR_AMQP_URL)")
    return urls


async def robust_connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection to one of the nodes, starting at a random one (the processes
    spread over the cluster); the first attempt tries each node in turn before failing."""
    urls = [URL(u) for u in amqp_urls(url)]
    start = random.randrange(len(urls))
    error: Exception | None = None
    for k in range(len(urls)):
        conn = _RobustConnection(urls, (start + k) % len(urls), client_properties={"connection_name": name})
        try:
            await conn.connect()
            return conn
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            error = exc
            log.warning("cannot connect to %s: %r", conn.url.with_password("******"), exc)
            await conn.close()
    assert error is not None
    raise error


async def connect_once(url: str, **kwargs: Any) -> AbstractConnection:
    """A plain (not robust) connection to the first node of `url` that answers."""
    error: Exception | None = None
    for u in amqp_urls(url):
        try:
            return await aio_pika.connect(u, **kwargs)
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            error = exc
    assert error is not None
    raise error


def amqp_user(url: str) -> str:
    """The user a connection to `url` authenticates as (RabbitMQ's default: guest)."""
    return URL(amqp_urls(url)[0]).user or "guest"
