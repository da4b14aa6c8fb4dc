"""Connections and databases: engines (built at the edge from settings and passed down;
nothing connects at import), the manager's LISTEN connection, and what the demo, the
benchmarks, the tests and the migrations do to a whole database (create it, drop it,
take its migration lock). The queries themselves are store.py's."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from taskmgr.store import CANCEL_CHANNEL, TYPE_CHANNEL, WAKEUP_CHANNEL

# Migrations from several processes at once take turns on this session-level advisory
# lock (store.lock_scope's transaction-level locks use hashtext() of their scope).
MIGRATION_LOCK_KEY = 0x7A5C_0001


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    name: str = "taskmgr",
    server_settings: dict[str, str] | None = None,
) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,  # a PostgreSQL restart leaves dead connections in the pool
        connect_args={"server_settings": {"application_name": name, **(server_settings or {})}},
    )


_MULTI_HOST = re.compile(r"^(?P<scheme>[a-z0-9+]+://)(?P<user>[^@/]*@)?(?P<hosts>[^/?]*,[^/?]*)(?P<rest>.*)$")


def sqlalchemy_url(database_url: str) -> str:
    """SQLAlchemy's spelling of a URL with several hosts (a primary and its replicas).

    TASKMGR_DATABASE_URL takes libpq's: postgresql+asyncpg://u@h1:5432,h2:5432/db?...,
    which asyncpg reads as it is; SQLAlchemy wants the hosts in the query instead:
    postgresql+asyncpg://u@/db?host=h1:5432&host=h2:5432&... (its asyncpg dialect passes
    them, and target_session_attrs, to asyncpg.connect). A URL with one host is kept."""
    m = _MULTI_HOST.match(database_url)
    if m is None:
        return database_url
    path, _, query = m["rest"].partition("?")
    hosts = [h if ":" in h else f"{h}:5432" for h in m["hosts"].split(",") if h]
    params = "&".join([*(f"host={h}" for h in hosts), *([query] if query else [])])
    return f"{m['scheme']}{m['user'] or ''}{path or '/'}?{params}"


def each_host(database_url: str) -> list[str]:
    """One URL per host of a URL that may name several."""
    m = _MULTI_HOST.match(database_url)
    if m is None:
        return [database_url]
    return [f"{m['scheme']}{m['user'] or ''}{h}{m['rest']}" for h in m["hosts"].split(",") if h]


def asyncpg_dsn(database_url: str) -> str:
    """asyncpg wants postgresql://; SQLAlchemy URLs say postgresql+asyncpg://."""
    return re.sub(r"^postgresql\+asyncpg://", "postgresql://", database_url)


def with_database(url: str, name: str) -> str:
    """The same server (and options), another database name."""
    head, _, tail = url.rpartition("/")
    query = tail.partition("?")[2]
    return f"{head}/{name}" + (f"?{query}" if query else "")


# A database just created on the primary may not exist yet on a replica listed before
# it: asyncpg gives up at that host's error instead of trying the next. Tried again for
# this long (a replica replays a CREATE DATABASE in milliseconds).
NEW_DATABASE_WAIT_S = 10.0


async def connect(database_url: str, *, name: str | None = None) -> asyncpg.Connection:
    """A plain asyncpg connection (migrations, LISTEN), outside the engine's pool."""
    settings = {"application_name": name} if name else None
    several = _MULTI_HOST.match(database_url) is not None
    deadline = asyncio.get_running_loop().time() + NEW_DATABASE_WAIT_S
    while True:
        try:
            return await asyncpg.connect(asyncpg_dsn(database_url), server_settings=settings)
        except asyncpg.InvalidCatalogNameError:
            if not several or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def listen(
    database_url: str,
    *,
    name: str,
    on_wakeup: Callable[[], None],
    on_cancel: Callable[[str], None],
    on_type_change: Callable[[str], None] | None = None,
) -> asyncpg.Connection:
    """A connection of its own that LISTENs for what TaskService NOTIFYs at commit: a
    task due now (`on_wakeup`), a cancel (`on_cancel`, given the payload, a
    messages.CancelNotice) and a task type's change (`on_type_change`, given a
    messages.TypeChange). Its application name (`name`) shows in pg_stat_activity."""
    conn = await connect(database_url, name=name)
    try:
        await conn.add_listener(WAKEUP_CHANNEL, lambda *_: on_wakeup())
        await conn.add_listener(CANCEL_CHANNEL, lambda _conn, _pid, _channel, payload: on_cancel(payload))
        if on_type_change is not None:
            await conn.add_listener(
                TYPE_CHANNEL, lambda _conn, _pid, _channel, payload: on_type_change(payload)
            )
    except BaseException:
        await conn.close()
        raise
    return conn


async def ping(conn: asyncpg.Connection, timeout: float) -> None:
    """Raises when the connection does not answer within `timeout` seconds."""
    await asyncio.wait_for(conn.fetchval("select 1"), timeout)


async def lock_migrations(conn: asyncpg.Connection) -> None:
    """Wait for, and take, the migration lock: held until the connection closes."""
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)


async def drop_and_create_database(database_url: str) -> None:
    """Drop (with force) and create, empty, the database the URL names."""
    name = database_url.rpartition("/")[2].partition("?")[0]
    admin = await connect(with_database(database_url, "postgres"))
    try:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()


def is_transient(exc: BaseException) -> bool:
    """A failure of the database or of the connection, not of what was being written: a
    batch goes back whole rather than being split (every part would fail the same way).
    A deadlock (or a serialization failure) is one too: the transaction is tried again,
    its data is not at fault."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen,
            sa_exc.OperationalError
            | sa_exc.InterfaceError
            | sa_exc.TimeoutError
            | asyncpg.PostgresConnectionError
            | asyncpg.InterfaceError
            | asyncpg.exceptions.OperatorInterventionError
            | asyncpg.exceptions.InsufficientResourcesError
            | asyncpg.exceptions.ConnectionDoesNotExistError
            | asyncpg.exceptions.TransactionRollbackError
            | OSError
            | TimeoutError
            | ConnectionError,
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def root_reason(exc: BaseException) -> str:
    """The innermost cause, as 'Type: message', cut to 500 characters."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"[:500]
