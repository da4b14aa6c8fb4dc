"""Forward-only plain-SQL migrations (NNNN_name.sql, from the engine's sql/ and each
registered part's), applied in version order, each in its own transaction, and
recorded in schema_migrations."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable

import asyncpg

from taskmgr import db
from taskmgr.db import asyncpg_dsn as asyncpg_dsn  # re-exported: the tests import them from here
from taskmgr.db import with_database as with_database
from taskmgr.errors import MigrationsMissing, TimescaleMissing
from taskmgr.resources import migration_dirs

SQL_DIRS = migration_dirs()
MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def available(sql_dirs: Sequence[Traversable] = SQL_DIRS) -> list[Migration]:
    """Every migration of these folders, by version (two files of one version: an error)."""
    found: dict[str, Migration] = {}
    for folder in sql_dirs:
        for path in folder.iterdir() if folder.is_dir() else []:
            m = MIGRATION_RE.match(path.name)
            if not m:
                continue
            if m.group(1) in found:
                other = found[m.group(1)].name
                raise ValueError(f"two migrations of version {m.group(1)}: {other}, {path.name}")
            found[m.group(1)] = Migration(m.group(1), path.name.removesuffix(".sql"), path.read_text())
    return [found[v] for v in sorted(found)]


async def migrate(database_url: str, sql_dirs: Sequence[Traversable] = SQL_DIRS) -> list[str]:
    """Apply the missing migrations; return the versions applied (empty when none).
    Raises MigrationsMissing when it finds no migration at all (an installation without
    its SQL), before touching the database."""
    if not available(sql_dirs):
        raise MigrationsMissing(", ".join(map(str, sql_dirs)))
    conn = await db.connect(database_url)
    try:
        await db.lock_migrations(conn)
        await _require_timescale(conn)
        await conn.execute(
            "create table if not exists schema_migrations ("
            " version text primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
        applied = []
        for mig in available(sql_dirs):
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "insert into schema_migrations (version, name) values ($1, $2)",
                    mig.version,
                    mig.name,
                )
            applied.append(mig.version)
        return applied
    finally:
        await conn.close()


async def recreate_database(database_url: str, *, migrated: bool = True) -> None:
    """Drop (with force) and create the database the URL names, then migrate it: for
    the demo, the benchmarks and the tests, which each work in a database of their own."""
    await db.drop_and_create_database(database_url)
    if migrated:
        await migrate(database_url)


async def current_version(database_url: str) -> str | None:
    conn = await db.connect(database_url)
    try:
        exists = await conn.fetchval("select to_regclass('schema_migrations') is not null")
        if not exists:
            return None
        return await conn.fetchval("select max(version) from schema_migrations")
    finally:
        await conn.close()


async def _require_timescale(conn: asyncpg.Connection) -> None:
    available_ = await conn.fetchval(
        "select default_version from pg_available_extensions where name = 'timescaledb'"
    )
    if available_ is None:
        raise TimescaleMissing("no timescaledb in pg_available_extensions")
    preload = await conn.fetchval("show shared_preload_libraries")
    if "timescaledb" not in preload:
        raise TimescaleMissing("timescaledb is installed but not in shared_preload_libraries")
