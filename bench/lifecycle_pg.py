# ruff: noqa: ASYNC240
"""PostgreSQL's side of `taskmgr bench lifecycle`: WAL bytes (pg_current_wal_lsn, the
whole server's: anything else writing meanwhile is counted too), the database's
transactions and rows written by table (pg_stat_database, pg_stat_user_tables: the
chunks of a hypertable counted under its name), and the statements: from
pg_stat_statements when the server preloads it, else from the server's log with
`log_min_duration_statement = 0` set on the bench's database only (`ALTER DATABASE`:
new sessions take it, no reload), read from where the log stood at the start."""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from typing import Any

import asyncpg

PG_LOG = os.environ.get("BENCH_PG_LOG", "/var/log/postgresql/postgresql-15-main.log")
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d [\d:.]+ \w+ \[\d+\] (?P<who>\S*)@(?P<db>\S*) LOG:  duration: (?P<ms>[\d.]+) ms  "
    r"(?P<kind>parse|bind|execute|statement)(?: [^:]*)?: (?P<sql>.*)$"
)


async def counters(conn: asyncpg.Connection) -> dict[str, Any]:
    lsn = await conn.fetchval("select pg_current_wal_lsn()::text")
    db = await conn.fetchrow(
        "select xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted"
        " from pg_stat_database where datname = current_database()"
    )
    chunks: dict[str, str] = {}
    try:
        for r in await conn.fetch("select chunk_name, hypertable_name from timescaledb_information.chunks"):
            chunks[r["chunk_name"]] = r["hypertable_name"]
    except asyncpg.PostgresError:
        pass
    tables: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in await conn.fetch(
        "select relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del from pg_stat_user_tables"
    ):
        name = chunks.get(r["relname"], r["relname"])
        for i, k in enumerate(("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_tup_del")):
            tables[name][i] += r[k]
    return {"lsn": lsn, "db": dict(db) if db else {}, "tables": dict(tables)}


async def spent(conn: asyncpg.Connection, before: dict[str, Any], tasks: int) -> dict[str, Any]:
    """WAL, transactions and rows written since `before`, per task finished."""
    # Backends send their table counters at most once a second (and idle ones later).
    await conn.execute("select pg_stat_force_next_flush()")
    now = await counters(conn)
    diff = "select pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)"
    wal = int(await conn.fetchval(diff, now["lsn"], before["lsn"]))
    per = max(tasks, 1)
    rows: dict[str, dict[str, float]] = {}
    for name, vals in now["tables"].items():
        old = before["tables"].get(name, [0, 0, 0, 0])
        d = [v - o for v, o in zip(vals, old, strict=True)]
        if any(d):
            rows[name] = {
                k: round(x / per, 2)
                for k, x in zip(("inserted", "updated", "hot_updated", "deleted"), d, strict=True)
                if x
            }
    db = {k: round((now["db"].get(k, 0) - before["db"].get(k, 0)) / per, 2) for k in now["db"]}
    return {
        "wal_bytes": wal,
        "wal_bytes_per_task": round(wal / per),
        "per_task_in_this_database": db,
        "rows_per_task_by_table": rows,
        "note": "WAL is the whole server's (other databases writing meanwhile count too); "
        "transactions and rows are this database's (the bench's own creating included)",
    }


async def preloaded(conn: asyncpg.Connection) -> bool:
    libs = await conn.fetchval("show shared_preload_libraries")
    return "pg_stat_statements" in libs


class Statements:
    """Every statement the bench's database runs during a window, by text."""

    def __init__(self, admin_dsn: str, db: str) -> None:
        self.admin_dsn = admin_dsn
        self.db = db
        self.how = ""
        self.offset = 0

    async def setup(self, conn: asyncpg.Connection) -> None:
        """Before the processes under test connect (a database setting reaches new sessions)."""
        if await preloaded(conn):
            self.how = "pg_stat_statements"
            await conn.execute("create extension if not exists pg_stat_statements")
            return
        self.how = f"server log ({PG_LOG}), log_min_duration_statement = 0 on database {self.db}"
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'alter database "{self.db}" set log_min_duration_statement = 0')
            await admin.execute(f'alter database "{self.db}" set log_parameter_max_length = 0')
        finally:
            await admin.close()

    async def start(self, conn: asyncpg.Connection) -> None:
        if self.how == "pg_stat_statements":
            await conn.execute("select pg_stat_statements_reset()")
        else:
            self.offset = os.path.getsize(PG_LOG)

    async def stop(self, conn: asyncpg.Connection, tasks: int) -> dict[str, Any]:
        per = max(tasks, 1)
        if self.how == "pg_stat_statements":
            rows = await conn.fetch(
                "select query, calls, total_exec_time, rows, wal_bytes from pg_stat_statements"
                " where dbid = (select oid from pg_database where datname = current_database())"
                " order by calls desc"
            )
            stmts = [
                {
                    "calls_per_task": round(r["calls"] / per, 3),
                    "ms_per_task": round(r["total_exec_time"] / per, 4),
                    "rows_per_task": round(r["rows"] / per, 2),
                    "wal_bytes_per_task": round(int(r["wal_bytes"]) / per),
                    "sql": " ".join(r["query"].split())[:160],
                }
                for r in rows
            ]
            return {"how": self.how, "statements": stmts[:40]}
        return {"how": self.how, **self._from_log(per)}

    def _from_log(self, per: int) -> dict[str, Any]:
        calls: Counter[tuple[str, str]] = Counter()
        ms: dict[tuple[str, str], float] = {}
        with open(PG_LOG, errors="replace") as f:
            f.seek(self.offset)
            for line in f:
                m = LOG_LINE.match(line)
                if not m or m["db"] != self.db:
                    continue
                key = (m["kind"], " ".join(m["sql"].split())[:160])
                calls[key] += 1
                ms[key] = ms.get(key, 0.0) + float(m["ms"])
        by_kind: Counter[str] = Counter()
        for (kind, _), n in calls.items():
            by_kind[kind] += n
        stmts = [
            {
                "kind": kind,
                "calls_per_task": round(n / per, 3),
                "ms_per_task": round(ms[(kind, sql)] / per, 4),
                "sql": sql,
            }
            for (kind, sql), n in calls.most_common()
            if kind in ("execute", "statement")
        ]
        return {
            "per_task_by_protocol_step": {k: round(v / per, 2) for k, v in by_kind.items()},
            # asyncpg: a prepare (parse) is one round trip, each execute (bind+execute+sync)
            # one; a simple-protocol statement (BEGIN, COMMIT) one.
            "round_trips_per_task": round(
                (by_kind["parse"] + by_kind["execute"] + by_kind["statement"]) / per, 2
            ),
            "statements": stmts[:40],
        }

    async def teardown(self) -> None:
        if self.how.startswith("server log"):
            admin = await asyncpg.connect(self.admin_dsn)
            try:
                await admin.execute(f'alter database "{self.db}" reset all')
            finally:
                await admin.close()
