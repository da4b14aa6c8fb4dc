"""The API on a real server: the live event stream (Server-Sent Events) delivers stored
events as the recorder stores them and resumes from Last-Event-ID; the tokens commands;
the API under its own least-privilege database role."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import event_store
from taskmgr.cli import main
from taskmgr.db import make_engine
from taskmgr.messages import Event
from taskmgr.migrate import asyncpg_dsn
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.api_helpers import build, client, make_tokens, serving
from tests.event_helpers import truncate_events
from tests.helpers import as_role, schedule

pytestmark = pytest.mark.usefixtures("clean")


def _event(n: int, task_id: uuid.UUID, kind: str = "score.changed") -> Event:
    return Event(
        event_id=uuid.uuid5(task_id, f"{kind}{n}"),
        event=kind,
        task_type="live_game",
        task_id=task_id,
        root_task_id=task_id,
        task_runner_id="runner-a",
        attempt=1,
        observed_at=datetime.now(UTC),
        data={
            "provider": "nba",
            "game_id": "g1",
            "home_team": "BOS",
            "away_team": "NYK",
            "league": "nba",
            "home_score": n,
            "away_score": 0,
            "period": 1,
        },
    )


async def _store(engine: AsyncEngine, *events: Event) -> None:
    async with engine.begin() as conn:
        await event_store.record_events(conn, list(events))


async def _frames(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The stream's events as {id, event, data}."""
    frame: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in frame:
                frame["data"] = json.loads(frame["data"])
                yield frame
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            frame[key] = value


async def _take(frames: AsyncIterator[dict[str, Any]], n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        return [await anext(frames) for _ in range(n)]


async def test_the_stream_delivers_stored_events_and_resumes_after_last_event_id(
    engine: AsyncEngine, database_url: str, settings: Settings
) -> None:
    await truncate_events(database_url)
    tokens = await make_tokens(engine, database_url)
    task = uuid.uuid4()
    other = uuid.uuid4()
    app = build(settings.model_copy(update={"api_stream_poll_s": 0.05}), engine)
    async with serving(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        h = tokens.header("read")
        async with c.stream("GET", "/api/v1/events/stream", headers=h, params={"task": str(task)}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            await asyncio.sleep(0.3)  # the hub has started reading
            await _store(engine, _event(1, task), _event(1, other))
            [first] = await _take(_frames(r), 1)
        assert first["event"] == "live_game.score.changed"
        assert first["data"]["task_id"] == str(task)
        assert first["data"]["data"]["home_score"] == 1
        # Events stored while the client was away come first when it resumes.
        await _store(engine, _event(2, task), _event(3, task))
        async with c.stream(
            "GET",
            "/api/v1/events/stream",
            headers={**h, "Last-Event-ID": first["id"]},
            params={"task": str(task)},
        ) as r:
            frames = _frames(r)
            resumed = await _take(frames, 2)
            await _store(engine, _event(4, task))
            [live] = await _take(frames, 1)
    assert [f["data"]["data"]["home_score"] for f in resumed] == [2, 3]
    assert live["data"]["data"]["home_score"] == 4
    assert len({f["id"] for f in [first, *resumed, live]}) == 4


def test_tokens_commands(settings: Settings, database_url: str) -> None:
    env = {"TASKMGR_DATABASE_URL": database_url}
    runner = CliRunner()
    made = runner.invoke(
        main, ["tokens", "create", "--name", "ops-desk", "--scope", "write", "-o", "json"], env=env
    )
    assert made.exit_code == 0, made.output
    secret = json.loads(made.stdout)["secret"]
    again = runner.invoke(main, ["tokens", "create", "--name", "ops-desk"], env=env)
    bad = runner.invoke(main, ["tokens", "create", "--name", "no spaces please"], env=env)
    listed = runner.invoke(main, ["tokens", "list", "-o", "json"], env=env)
    revoked = runner.invoke(main, ["tokens", "revoke", "ops-desk", "-o", "json"], env=env)
    unknown = runner.invoke(main, ["tokens", "revoke", "nobody"], env=env)
    assert again.exit_code == 1 and "exists" in again.output
    assert bad.exit_code == 2
    rows = [t for t in json.loads(listed.stdout) if t["name"] == "ops-desk"]
    assert [(t["scope"], t["revoked_at"]) for t in rows] == [("write", None)]
    assert secret not in listed.stdout
    assert json.loads(revoked.stdout)["revoked_at"]
    assert unknown.exit_code == 1


async def test_only_the_hash_of_a_secret_is_stored(engine: AsyncEngine, database_url: str) -> None:
    tokens = await make_tokens(engine, database_url)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        dump = str([dict(r) for r in await conn.fetch("select * from api_tokens")])
    finally:
        await conn.close()
    for secret in (tokens.read, tokens.write, tokens.admin):
        assert secret not in dump and secret[4:] not in dump


async def test_a_revoked_token_is_refused_once_the_cache_lapses(
    engine: AsyncEngine, database_url: str, settings: Settings
) -> None:
    from taskmgr import tokens as store
    from taskmgr.service import utcnow

    tokens = await make_tokens(engine, database_url)
    app = build(settings.model_copy(update={"api_token_cache_s": 0.2}), engine)
    async with client(app) as c:
        assert (await c.get("/api/v1/status", headers=tokens.header("read"))).status_code == 200
        async with engine.begin() as conn:
            await store.revoke_token(conn, "test-read", utcnow())
        await asyncio.sleep(0.3)
        assert (await c.get("/api/v1/status", headers=tokens.header("read"))).status_code == 401


async def test_the_api_role_does_its_job_and_nothing_more(
    engine: AsyncEngine, database_url: str, settings: Settings, service: TaskService
) -> None:
    """taskmgr_api (sql/0019): reads, creates, cancels and retries tasks, manages types;
    may not touch the history, the runners, the lease or the tokens themselves."""
    tokens = await make_tokens(engine, database_url)
    await service.create_type({"name": "box", "handler": "noop"})
    [later] = await schedule(service, "box", 1, due_at=datetime.now(UTC) + timedelta(hours=1))
    api_engine = make_engine(as_role(database_url, "taskmgr_api"), pool_size=2, name="taskmgr-api-test")
    try:
        app = build(settings, api_engine)
        h = tokens.header("admin")
        async with client(app) as c:
            made = await c.post("/api/v1/tasks", headers=h, json={"type": "box"})
            cancelled = await c.post(f"/api/v1/tasks/{later}/cancel", headers=h)
            typed = await c.post("/api/v1/task-types", headers=h, json={"name": "crate", "handler": "noop"})
            patched = await c.patch("/api/v1/task-types/crate", headers=h, json={"max_attempts": 4})
            listed = await c.get("/api/v1/tasks", headers=h)
            audit = await c.get(f"/api/v1/tasks/{later}/audit", headers=h)
            for path in (
                "/api/v1/runners",
                "/api/v1/status",
                "/api/v1/events",
                "/api/v1/games",
                "/api/v1/stats/lateness",
                "/api/v1/stats/states",
                "/readyz",
            ):
                assert (await c.get(path, headers=h)).status_code == 200, path
        assert made.status_code == 201, made.text
        assert cancelled.status_code == 200, cancelled.text
        assert typed.status_code == 201 and patched.status_code == 200
        assert listed.status_code == 200 and audit.status_code == 200
        conn = await asyncpg.connect(asyncpg_dsn(as_role(database_url, "taskmgr_api")))
        try:
            for statement in (
                "update task_events set state = 'FINISHED'",
                "delete from tasks",
                "update runners set dead = true",
                "update taskmgr_leader set holder = 'me'",
                "insert into api_tokens (id, name, scope, secret_sha256) values"
                " (gen_random_uuid(), 'x', 'admin', sha256('x'))",
                "update api_tokens set scope = 'admin'",
                "update api_tokens set revoked_at = null",
                "select created_by from api_tokens",
                "update taskmgr_policy set min_retention_days = 1",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"permission denied"):
                    await conn.execute(statement)
        finally:
            await conn.close()
    finally:
        await api_engine.dispose()


async def test_runners_with_heartbeat_age_and_poll_errors(
    engine: AsyncEngine, database_url: str, settings: Settings, service: TaskService
) -> None:
    """A runner as its heartbeats show it, with the failed polls it reported (kept in the
    history, not applied) in the last five minutes."""
    tokens = await make_tokens(engine, database_url)
    await service.create_type({"name": "box", "handler": "noop"})
    [tid] = await schedule(service, "box", 1)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            "insert into runners (id, pool, host, pid, last_seen, tasks)"
            " values ('r-1', 'default', 'h', 1, now() - interval '2 seconds', 3),"
            " ('r-2', 'sports', 'h', 2, now() - interval '40 minutes', 0)"
        )
        for age in (timedelta(minutes=1), timedelta(minutes=2), timedelta(minutes=20)):
            await conn.execute(
                "insert into task_events (time, task_id, state, attempt, runner_id, source, applied, detail)"
                " values (now() - cast($2 as interval), $1, 'RUNNING', 1, 'r-1', 'runner', false,"
                ' \'{"report": "poll_error", "error": "timeout"}\')',
                tid,
                age,
            )
    finally:
        await conn.close()
    async with client(build(settings.model_copy(update={"runner_dead_after": 15.0}), engine)) as c:
        rows = {r["id"]: r for r in (await c.get("/api/v1/runners", headers=tokens.header("read"))).json()}
        c.cookies.set("taskmgr_token", tokens.read)
        page = await c.get("/runners")
    assert (rows["r-1"]["status"], rows["r-1"]["tasks"], rows["r-1"]["poll_errors_5m"]) == ("alive", 3, 2)
    assert 1.5 <= rows["r-1"]["heartbeat_age_s"] < 30
    assert (rows["r-2"]["status"], rows["r-2"]["poll_errors_5m"]) == ("dead", 0)
    assert page.status_code == 200 and "r-1" in page.text and "sports" in page.text
