"""What the operator's views (the HTTP API and its console) read beyond TaskService: the
runners as their heartbeats show them, their failed polls, the lateness of starts, the
schema's version. Queries in sql/api_queries.sql; driver errors become StoreError."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from taskmgr.queries import QueryFile, in_sql_dir
from taskmgr.store import Conn

_QUERIES = QueryFile(in_sql_dir("api_queries.sql"))
_run = _QUERIES.run


@dataclass(frozen=True)
class RunnerRow:
    id: str
    pool: str
    host: str
    pid: int | None
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None
    tasks: int
    dead: bool


async def list_runners(conn: Conn, since: datetime) -> list[RunnerRow]:
    rows = await _run(conn, "list_runners", {"since": since})
    return [RunnerRow(**dict(r._mapping)) for r in rows]


async def poll_errors(conn: Conn, since: datetime) -> dict[str, int]:
    """Failed polls per runner since `since`."""
    return {r.runner_id: int(r.n) for r in await _run(conn, "runner_poll_errors", {"since": since})}


async def lateness_histogram(conn: Conn, since: datetime, width_ms: float, buckets: int) -> list[int]:
    """Counts of starts per lateness bucket of `width_ms` (the last one open-ended)."""
    counts = [0] * buckets
    for r in await _run(conn, "lateness_histogram", {"since": since, "width": width_ms, "buckets": buckets}):
        counts[max(0, int(r.bucket))] += int(r.n)
    return counts


async def schema_version(conn: Conn) -> str | None:
    """The latest migration applied (StoreError if there is no schema at all)."""
    row = (await _run(conn, "schema_version", {})).first()
    return None if row is None or row.version is None else str(row.version)
