"""Leadership: a lease in PostgreSQL with an expiry, renewed by the leader, and a fence
on each of the leader's write transactions.

Bound: a standby takes over at most TASKMGR_LEADER_LEASE + TASKMGR_LEADER_RETRY after
the leader's last renewal, however the leader stopped (crash, freeze, partition), plus
at most IDLE_IN_TRANSACTION_S when the leader froze inside a transaction that holds the
lease row's key-share lock (PostgreSQL ends that session). With the defaults, 10 + 1 + 3 =
14 s.

Fencing: every transaction the leader's components begin goes through FencedEngine,
which first checks, and key-share-locks, the lease row of the leader's term. A leader that
wakes after its lease passed is refused (LeadershipLost) before it writes anything; a
takeover (whose FOR UPDATE conflicts with that lock) waits for a transaction that checked
a live lease to end, while the leader's own renewal (a plain update) never waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskmgr import store
from taskmgr.errors import TaskmgrError

log = logging.getLogger(__name__)

T = TypeVar("T")

# The leader's connections end a transaction left idle this long (a process frozen
# mid-transaction must not hold the lease row's lock, or task rows, for long).
IDLE_IN_TRANSACTION_S = 3.0
# Renewals per lease: a lease survives a couple of slow or failed renewals.
RENEWALS_PER_LEASE = 4


class LeadershipLost(TaskmgrError):
    """This manager's lease expired or was taken over: it must not write."""


def leader_name() -> str:
    """taskmgr-leader-<host>-<pid>: who leads, as `taskmgr check` and the chaos day show it."""
    return f"taskmgr-leader-{socket.gethostname()}-{os.getpid()}"


class Elector:
    """Campaigns for the lease, renews it while leading, and fences writes.

    `term` is the term of the last lease this process held (None before the first): it
    stays set after the lease is lost, so a straggling transaction is fenced with it and
    refused, rather than running unfenced."""

    def __init__(self, *, engine: AsyncEngine, lease_s: float, name: str | None = None) -> None:
        self._engine = engine
        self.lease_s = lease_s
        self.name = name or leader_name()
        self.term: int | None = None
        self._renewed = 0.0  # monotonic time of the last successful renewal

    @property
    def valid(self) -> bool:
        """Whether this process's own clock says its lease still runs (a frozen
        process, on waking, finds it does not before it asks the database)."""
        return self.term is not None and time.monotonic() - self._renewed < self.lease_s

    async def campaign(self) -> bool:
        started = time.monotonic()
        async with self._engine.begin() as conn:
            term = await store.campaign(conn, self.name, self.lease_s)
        if term is None:
            return False
        self.term, self._renewed = term, started
        log.info("%s holds the leadership lease, term %d", self.name, term)
        return True

    async def renew(self) -> None:
        """Raises LeadershipLost when the lease could not be extended in time."""
        assert self.term is not None
        if not self.valid:
            raise LeadershipLost(f"term {self.term}: no renewal for {time.monotonic() - self._renewed:.1f} s")
        started = time.monotonic()
        async with asyncio.timeout(self.lease_s / RENEWALS_PER_LEASE), self._engine.begin() as conn:
            if not await store.renew(conn, self.term, self.name, self.lease_s):
                raise LeadershipLost(f"term {self.term}: the lease expired or was taken over")
        self._renewed = started

    async def keep(self) -> None:
        """Renew until the lease is lost (raises LeadershipLost); a failed renewal is
        tried again until the lease would have run out. Each renewal is bounded by
        `within`, not by its own timeout alone, which waits for the cancelled renewal to
        unwind: on a starved cluster that took 30 s once, and then for good, and the
        leader, its lease long gone, never stepped down (3 x 10,000 fleet run)."""
        while True:
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
            try:
                await within(self.renew(), self.lease_s / RENEWALS_PER_LEASE)
            except LeadershipLost:
                raise
            except Exception as exc:
                if not self.valid:
                    raise LeadershipLost(f"term {self.term}: renewals failed ({exc!r})") from exc
                log.warning("leadership renewal failed, trying again: %r", exc)

    async def resign(self) -> None:
        if self.term is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2), self._engine.begin() as conn:
                await store.resign(conn, self.term, self.name)

    async def fence(self, conn: AsyncConnection) -> None:
        if self.term is None or not self.valid:
            raise LeadershipLost(f"{self.name} does not hold a live lease")
        if not await store.fence(conn, self.term, self.name):
            raise LeadershipLost(f"term {self.term} no longer holds the lease")


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`aw`'s result, or TimeoutError after `timeout` seconds, then without waiting for
    it to unwind (it is cancelled and left to finish on its own). asyncio.timeout and
    wait_for wait for the cancelled operation to end, and a database call cancelled
    mid-query (asyncpg asks the server to cancel and waits for the answer) or a
    connection closed through a starved server can take far longer than a lease."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    task.add_done_callback(_retrieve)
    raise TimeoutError(f"no answer within {timeout:.1f} s")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """An abandoned operation's outcome, read so that asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


class FencedEngine(AsyncEngine):
    """The engine the leader's components write through: each transaction begins with
    the elector's fence. The same pool as the engine it wraps; `connect()` (reads) is
    not fenced."""

    def __init__(self, engine: AsyncEngine, elector: Elector) -> None:
        super().__init__(engine.sync_engine)
        self._elector = elector

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:  # type: ignore[override]
        async with super().begin() as conn:
            await self._elector.fence(conn)
            yield conn


def manager_server_settings() -> dict[str, Any]:
    """PostgreSQL session settings of a manager's connections."""
    return {"idle_in_transaction_session_timeout": str(int(IDLE_IN_TRANSACTION_S * 1000))}
