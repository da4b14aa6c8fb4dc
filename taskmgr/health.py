"""Health and status for `taskmgr check` and `taskmgr status`."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from yarl import URL

from taskmgr import store, upkeep
from taskmgr.connections import amqp_urls, connect_once
from taskmgr.db import each_host, make_engine
from taskmgr.migrate import current_version
from taskmgr.redact import redact_text
from taskmgr.service import utcnow
from taskmgr.settings import Settings

CHECK_TIMEOUT_S = 5.0


async def _broker_ok(settings: Settings) -> tuple[bool, str]:
    try:
        conn = await asyncio.wait_for(connect_once(settings.amqp_url), CHECK_TIMEOUT_S)
    except Exception as exc:
        return False, redact_text(f"RabbitMQ unreachable: {exc!r}")[:300]
    await conn.close()
    return True, "reachable"


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})


def development_passwords(settings: Settings) -> list[str]:
    """The connections that use a development password (none, the user's own name, or
    guest/guest) against a host other than this one: fine on a developer's machine,
    not in production."""
    found = []
    urls = [("database", u) for u in {*each_host(settings.database_url), *each_host(settings.reads_url)}]
    urls += [("broker", u) for u in amqp_urls(settings.amqp_url)]
    for what, url in sorted(urls):
        u = URL(url)
        user = u.user or ("guest" if what == "broker" else "")
        password = u.password or ""
        if (u.host or "") in LOCAL_HOSTS:
            continue
        if not password or password == user or (user, password) == ("guest", "guest"):
            found.append(f"{what}: user {user!r} on {u.host} has a development password (set a real one)")
    return found


async def check_health(settings: Settings, *, need_runners: bool = True) -> dict[str, tuple[bool, str]]:
    """Each check: (ok, detail)."""
    results: dict[str, tuple[bool, str]] = {}
    engine = make_engine(settings.database_url, pool_size=1, name="taskmgr-check")
    try:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                version = await current_version(settings.database_url)
                async with engine.connect() as conn:
                    leader = await store.leader_present(conn)
                    since = utcnow() - timedelta(seconds=settings.runner_dead_after)
                    runners = await store.active_runners(conn, since)
            results["database"] = (
                version is not None,
                f"schema version {version}" if version else "not migrated",
            )
            results["leader"] = (leader, "a manager leads" if leader else "no manager holds the leadership")
            if need_runners:
                results["runners"] = (bool(runners), f"{len(runners)} heartbeating")
        except Exception as exc:
            results["database"] = (False, redact_text(f"PostgreSQL unreachable: {exc!r}")[:300])
        results["broker"] = await _broker_ok(settings)
        weak = development_passwords(settings)
        if weak:
            results["passwords"] = (False, "; ".join(weak))
    finally:
        await engine.dispose()
    return results


async def system_status(settings: Settings) -> dict[str, Any]:
    engine = make_engine(settings.database_url, pool_size=1, name="taskmgr-status")
    try:
        version = await current_version(settings.database_url)
        if version is None:
            return {"schema_version": None, "hint": "run `taskmgr migrate`"}
        async with engine.connect() as conn:
            types = await store.list_types(conn)
            counts = await upkeep.state_counts(conn)
            runners = await store.active_runners(
                conn, utcnow() - timedelta(seconds=settings.runner_dead_after)
            )
            leader = await store.leader_present(conn)
        return {
            "schema_version": version,
            "task_types": {
                t.name: {"handler": t.handler, "pool": t.pool, "poll_interval_s": t.poll_interval_s}
                for t in types
            },
            "tasks_by_state": {str(k): v for k, v in sorted(counts.items())},
            "leader_present": leader,
            "runners": [{"id": r["id"], "pool": r["pool"], "tasks": r["tasks"]} for r in runners],
            "broker": (await _broker_ok(settings))[1],
        }
    finally:
        await engine.dispose()
