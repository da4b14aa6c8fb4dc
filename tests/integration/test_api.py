"""The HTTP API (manager/api, wired by taskmgr/cli/api.py): every route answers its
scope's token, refuses a missing or revoked token (401) and a token of a lower scope
(403), and answers bad input with 400/422 naming the JSON path while writing nothing."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import event_store
from taskmgr.messages import Event
from taskmgr.migrate import asyncpg_dsn
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.api_helpers import Tokens, build, client, make_tokens, serving
from tests.event_helpers import truncate_events
from tests.helpers import schedule

BOX_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False}


@dataclass
class World:
    app: Any
    tokens: Tokens
    task_id: uuid.UUID
    failed_id: uuid.UUID


@pytest.fixture
async def world(service: TaskService, engine: AsyncEngine, database_url: str, settings: Settings) -> World:
    await service.create_type({"name": "box", "handler": "noop", "payload_schema": BOX_SCHEMA})
    [tid, failed] = await schedule(service, "box", 2, due_at=datetime.now(UTC) + timedelta(hours=1))
    await _fail(database_url, failed)
    await truncate_events(database_url)
    await _event(engine)
    return World(build(settings, engine), await make_tokens(engine, database_url), tid, failed)


async def _fail(database_url: str, task_id: uuid.UUID) -> None:
    """A task FAILED (as recovery would leave it), to retry."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            "update task_state set state = 'FAILED', run_at = null where task_id = $1", task_id
        )
    finally:
        await conn.close()


GAME_DATA = {"provider": "nba", "league": "nba", "game_id": "g1", "home_team": "BOS", "away_team": "NYK"}


async def _event(engine: AsyncEngine) -> None:
    tid = uuid.uuid4()
    ev = Event(
        event_id=uuid.uuid5(tid, "score"),
        event="score.changed",
        task_type="live_game",
        task_id=tid,
        root_task_id=tid,
        task_runner_id="runner-a",
        attempt=1,
        observed_at=datetime.now(UTC),
        data={**GAME_DATA, "home_score": 2, "away_score": 0, "period": 1},
    )
    async with engine.begin() as conn:
        await event_store.record_events(conn, [ev])


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    scope: str  # the lowest scope allowed
    ok: dict[str, Any]
    ok_status: int = 200
    bad: dict[str, Any] | None = None  # None: the route takes no input
    bad_status: int = 422
    bad_path: str | None = None

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"


NEW_TYPE = {"name": "crate", "handler": "noop", "poll_interval_s": 2}
ROUTES = [
    Route(
        "GET",
        "/api/v1/task-types",
        "read",
        {"params": {"include_deleted": "true"}},
        bad={"params": {"include_deleted": "maybe"}},
        bad_path="query.include_deleted",
    ),
    Route(
        "GET",
        "/api/v1/task-types/{type}",
        "read",
        {},
        bad={"path": {"type": "x" * 201}},
        bad_path="path.name",
    ),
    Route(
        "POST",
        "/api/v1/task-types",
        "admin",
        {"json": NEW_TYPE},
        201,
        bad={"json": {**NEW_TYPE, "poll_interval_s": -1}},
        bad_path="body.poll_interval_s",
    ),
    Route(
        "PATCH",
        "/api/v1/task-types/{type}",
        "admin",
        {"json": {"poll_interval_s": 2.5}},
        bad={"json": {"poll_interval_s": 0}},
        bad_path="body.poll_interval_s",
    ),
    Route(
        "DELETE",
        "/api/v1/task-types/{type}",
        "admin",
        {},
        bad={"path": {"type": "y" * 201}},
        bad_path="path.name",
    ),
    Route(
        "POST",
        "/api/v1/task-types/{type}/restore",
        "admin",
        {},
        bad={"path": {"type": "z" * 201}},
        bad_path="path.name",
    ),
    Route(
        "POST",
        "/api/v1/tasks",
        "write",
        {"json": {"type": "box", "payload": {"n": 1}}},
        201,
        bad={"json": {"type": "box", "payload": {"n": "one"}}},
        bad_path="body.payload.n",
    ),
    Route(
        "POST",
        "/api/v1/tasks/batch",
        "write",
        {"json": {"tasks": [{"type": "box"}, {"type": "box", "payload": {"n": 2}}]}},
        201,
        bad={"json": {"tasks": [{"type": "box"}, {"type": "box", "due_at": "2026-01-01T00:00:00"}]}},
        bad_path="body.tasks[1].due_at",
    ),
    Route(
        "GET",
        "/api/v1/tasks",
        "read",
        {"params": {"state": "SCHEDULED", "type": "box"}},
        bad={"params": {"state": "SLEEPING"}},
        bad_path="query.state",
    ),
    Route(
        "GET",
        "/api/v1/tasks/{task}",
        "read",
        {},
        bad={"path": {"task": "not-a-uuid"}},
        bad_path="path.task_id",
    ),
    Route(
        "GET",
        "/api/v1/tasks/{task}/history",
        "read",
        {},
        bad={"path": {"task": "nope"}},
        bad_path="path.task_id",
    ),
    Route(
        "GET",
        "/api/v1/tasks/{task}/audit",
        "read",
        {},
        bad={"path": {"task": "nope"}},
        bad_path="path.task_id",
    ),
    Route(
        "POST",
        "/api/v1/tasks/{task}/cancel",
        "write",
        {"json": {"reason": "test"}},
        bad={"json": {"reason": 5}},
        bad_path="body.reason",
    ),
    Route(
        "POST",
        "/api/v1/tasks/{failed}/retry",
        "write",
        {},
        bad={"path": {"failed": "x"}},
        bad_path="path.task_id",
    ),
    Route(
        "POST",
        "/api/v1/tasks/{task}/reschedule",
        "write",
        {"json": {"due_at": "2099-01-01T00:00:00+00:00"}},
        bad={"json": {"due_at": "2099-01-01T00:00:00"}},  # no timezone
        bad_path="body.due_at",
    ),
    Route(
        "POST",
        "/api/v1/tasks/{task}/payload",
        "write",
        {"json": {"payload": {"n": 5}}},
        bad={"json": {"payload": {"n": "five"}}},
        bad_path="body.payload.n",
    ),
    Route(
        "GET",
        "/api/v1/events",
        "read",
        {"params": {"kind": "score.changed"}},
        bad={"params": {"limit": 0}},
        bad_path="query.limit",
    ),
    Route(
        "GET",
        "/api/v1/events/stream",
        "read",
        {"stream": True},
        bad={"headers": {"Last-Event-ID": "yesterday"}},
        bad_status=400,
        bad_path="header.Last-Event-ID",
    ),
    Route(
        "GET", "/api/v1/games", "read", {}, bad={"params": {"due_from": "today"}}, bad_path="query.due_from"
    ),
    Route(
        "GET", "/api/v1/games/{game}", "read", {}, bad={"path": {"game": "cricket:1"}}, bad_path="path.game"
    ),
    Route("GET", "/api/v1/runners", "read", {}),
    Route("GET", "/api/v1/status", "read", {}),
    Route(
        "GET",
        "/api/v1/stats/lateness",
        "read",
        {"params": {"minutes": 5}},
        bad={"params": {"minutes": 0}},
        bad_path="query.minutes",
    ),
    Route(
        "GET",
        "/api/v1/stats/states",
        "read",
        {"params": {"bucket": "5 minutes"}},
        bad={"params": {"bucket": "a fortnight"}},
        bad_path="query.bucket",
    ),
    Route("GET", "/metrics", "read", {}),
]
SCOPES = ["read", "write", "admin"]
LOWER = {"write": "read", "admin": "write"}


def _url(route: Route, w: World, override: dict[str, str] | None = None) -> str:
    values = {"type": "box", "task": str(w.task_id), "failed": str(w.failed_id), "game": "nba:g1"}
    values.update(override or {})
    return route.path.format(**values)


async def _call(
    w: World, route: Route, spec: dict[str, Any], token: str | None, headers: dict[str, str] | None = None
) -> httpx.Response:
    h = {**(headers or {}), **spec.get("headers", {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    url = _url(route, w, spec.get("path"))
    if route.path.endswith("/stream"):
        # The stream never ends: the start of its answer (on a real server) is what counts.
        async with serving(w.app) as base, httpx.AsyncClient(base_url=base) as c:
            async with c.stream(route.method, url, headers=h, params={"keys": "none.such"}) as r:
                if r.status_code != 200:
                    await r.aread()
                return r
    async with client(w.app) as c:
        return await c.request(route.method, url, headers=h, params=spec.get("params"), json=spec.get("json"))


async def _snapshot(database_url: str) -> Any:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return (
            await conn.fetch("select * from tasks order by id"),
            await conn.fetch("select * from task_state order by task_id"),
            await conn.fetchval("select count(*) from task_events"),
            await conn.fetch("select * from task_types order by name"),
        )
    finally:
        await conn.close()


def test_every_route_of_the_app_is_in_the_table(settings: Settings) -> None:
    from taskmgr.cli.api import openapi_document

    paths = openapi_document(settings)["paths"]
    documented = {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}
    tabled = {
        f"{r.method} {r.path}".replace("{type}", "{name}")
        .replace("{failed}", "{task_id}")
        .replace("{task}", "{task_id}")
        for r in ROUTES
    }
    assert documented - {"GET /healthz", "GET /readyz"} == tabled


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.id)
async def test_success_with_its_scope(world: World, route: Route) -> None:
    r = await _call(world, route, route.ok, getattr(world.tokens, route.scope))
    assert r.status_code == route.ok_status, r.text if not route.ok.get("stream") else ""


@pytest.mark.parametrize("route", [r for r in ROUTES if r.scope != "admin"], ids=lambda r: r.id)
async def test_a_higher_scope_may_too(world: World, route: Route) -> None:
    r = await _call(world, route, route.ok, world.tokens.admin)
    assert r.status_code == route.ok_status


@pytest.mark.parametrize("route", [r for r in ROUTES if r.bad is not None], ids=lambda r: r.id)
async def test_bad_input_names_the_path_and_writes_nothing(
    world: World, route: Route, database_url: str
) -> None:
    assert route.bad is not None
    before = await _snapshot(database_url)
    r = await _call(world, route, route.bad, world.tokens.admin)
    assert r.status_code == route.bad_status, r.text
    body = r.json()
    assert body["path"] == route.bad_path, body
    assert body["message"]
    assert await _snapshot(database_url) == before


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.id)
@pytest.mark.parametrize("token", ["none", "unknown", "revoked"])
async def test_no_valid_token_is_401(world: World, route: Route, token: str, database_url: str) -> None:
    secret = {"none": None, "unknown": "tmk_" + "x" * 43, "revoked": world.tokens.revoked}[token]
    before = await _snapshot(database_url)
    r = await _call(world, route, route.ok, secret)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert await _snapshot(database_url) == before


@pytest.mark.parametrize("route", [r for r in ROUTES if r.scope != "read"], ids=lambda r: r.id)
async def test_a_lower_scope_is_403(world: World, route: Route, database_url: str) -> None:
    before = await _snapshot(database_url)
    r = await _call(world, route, route.ok, getattr(world.tokens, LOWER[route.scope]))
    assert r.status_code == 403
    assert r.json()["error"] == "forbidden"
    assert await _snapshot(database_url) == before


async def test_health_needs_no_token(world: World) -> None:
    async with client(world.app) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


async def test_unknown_ids_are_404(world: World) -> None:
    h = world.tokens.header("admin")
    async with client(world.app) as c:
        for method, url in [
            ("GET", f"/api/v1/tasks/{uuid.uuid4()}"),
            ("GET", f"/api/v1/tasks/{uuid.uuid4()}/history"),
            ("GET", f"/api/v1/tasks/{uuid.uuid4()}/audit"),
            ("POST", f"/api/v1/tasks/{uuid.uuid4()}/cancel"),
            ("POST", f"/api/v1/tasks/{uuid.uuid4()}/retry"),
            ("POST", f"/api/v1/tasks/{uuid.uuid4()}/reschedule"),
            ("POST", f"/api/v1/tasks/{uuid.uuid4()}/payload"),
            ("GET", "/api/v1/task-types/nosuch"),
            ("PATCH", "/api/v1/task-types/nosuch"),
            ("DELETE", "/api/v1/task-types/nosuch"),
            ("GET", "/api/v1/games/nba:nosuch"),
        ]:
            body = {
                "PATCH": {},
                "reschedule": {"due_at": "2099-01-01T00:00:00Z"},
                "payload": {"payload": {"n": 1}},
            }
            r = await c.request(
                method, url, headers=h, json=body.get(url.rpartition("/")[2], body.get(method))
            )
            assert r.status_code == 404, (method, url, r.text)
            assert r.json()["error"] == "not_found"
        unknown_type = await c.post("/api/v1/tasks", headers=h, json={"type": "nosuch"})
    assert unknown_type.status_code == 404


async def test_conflicts_are_409(world: World) -> None:
    h = world.tokens.header("admin")
    async with client(world.app) as c:
        assert (await c.post(f"/api/v1/tasks/{world.task_id}/cancel", headers=h)).status_code == 200
        again = await c.post(f"/api/v1/tasks/{world.task_id}/cancel", headers=h)
        retry_scheduled = await c.post(f"/api/v1/tasks/{world.task_id}/retry", headers=h)
        exists = await c.post("/api/v1/task-types", headers=h, json={"name": "box", "handler": "noop"})
        # Only a waiting task may be moved or take a new payload.
        moved = await c.post(
            f"/api/v1/tasks/{world.task_id}/reschedule", headers=h, json={"due_at": "2099-01-01T00:00:00Z"}
        )
        changed = await c.post(f"/api/v1/tasks/{world.failed_id}/payload", headers=h, json={"payload": {}})
    assert (again.status_code, again.json()["state"]) == (409, "CANCELLED")
    assert retry_scheduled.status_code == 409
    assert exists.status_code == 409
    assert moved.status_code == 409 and changed.status_code == 409, (moved.text, changed.text)


async def test_malformed_json_is_400(world: World) -> None:
    async with client(world.app) as c:
        r = await c.post(
            "/api/v1/tasks",
            headers={**world.tokens.header("write"), "Content-Type": "application/json"},
            content=b'{"type": "box",',
        )
    assert r.status_code == 400
    assert r.json()["error"] == "bad_request"


async def test_idempotency_key_makes_one_task(world: World, service: TaskService) -> None:
    h = {**world.tokens.header("write"), "Idempotency-Key": "order-42"}
    async with client(world.app) as c:
        first = await c.post("/api/v1/tasks", headers=h, json={"type": "box", "payload": {"n": 1}})
        second = await c.post("/api/v1/tasks", headers=h, json={"type": "box", "payload": {"n": 1}})
        batch = [
            await c.post(
                "/api/v1/tasks/batch",
                headers={**h, "Idempotency-Key": "b"},
                json={"tasks": [{"type": "box"}, {"type": "box"}]},
            )
            for _ in range(2)
        ]
        clash = await c.post("/api/v1/tasks", headers=h, json={"type": "box", "dedup_key": "other"})
    assert (first.status_code, first.json()["created"]) == (201, True)
    assert (second.status_code, second.json()["created"]) == (200, False)
    assert first.json()["task"]["id"] == second.json()["task"]["id"]
    assert first.json()["task"]["dedup_key"] == "order-42"
    assert first.json()["task"]["created_by"] == "api:test-write"
    assert [b.status_code for b in batch] == [201, 200]
    assert [t["task"]["id"] for t in batch[0].json()["tasks"]] == [
        t["task"]["id"] for t in batch[1].json()["tasks"]
    ]
    assert clash.status_code == 400
    assert len(await service.list_tasks(type="box", limit=100)) == 2 + 1 + 2


async def test_list_pages_with_the_cursor_and_filters(world: World, service: TaskService) -> None:
    base = datetime(2030, 1, 1, tzinfo=UTC)
    ids = [(await schedule(service, "box", 1, due_at=base + timedelta(minutes=i)))[0] for i in range(5)]
    h = world.tokens.header("read")
    seen: list[str] = []
    params: dict[str, Any] = {"type": "box", "due_from": base.isoformat(), "limit": 2}
    async with client(world.app) as c:
        while True:
            page = (await c.get("/api/v1/tasks", headers=h, params=params)).json()
            seen += [t["id"] for t in page["items"]]
            if page["next"] is None:
                break
            params["after"] = page["next"]
        window = (
            await c.get(
                "/api/v1/tasks",
                headers=h,
                params={
                    "due_from": (base + timedelta(minutes=1)).isoformat(),
                    "due_to": (base + timedelta(minutes=3)).isoformat(),
                },
            )
        ).json()
        failed = (await c.get("/api/v1/tasks", headers=h, params={"state": "FAILED"})).json()
        tree = (await c.get("/api/v1/tasks", headers=h, params={"root": str(ids[0])})).json()
        bad_cursor = await c.get("/api/v1/tasks", headers=h, params={"after": "bm90IGEgY3Vyc29y"})
    assert seen == [str(i) for i in ids]
    assert [t["id"] for t in window["items"]] == [str(i) for i in ids[1:3]]
    assert [t["id"] for t in failed["items"]] == [str(world.failed_id)]
    assert [t["id"] for t in tree["items"]] == [str(ids[0])]
    assert (bad_cursor.status_code, bad_cursor.json()["path"]) == (400, "query.after")


async def test_cancel_retry_history_and_audit(world: World, service: TaskService) -> None:
    h = world.tokens.header("write")
    async with client(world.app) as c:
        cancelled = (
            await c.post(f"/api/v1/tasks/{world.task_id}/cancel", headers=h, json={"reason": "rained off"})
        ).json()
        retried = (await c.post(f"/api/v1/tasks/{world.failed_id}/retry", headers=h)).json()
        history = (await c.get(f"/api/v1/tasks/{world.task_id}/history", headers=h)).json()
        audit = (await c.get(f"/api/v1/tasks/{world.task_id}/audit", headers=h)).json()
    assert cancelled["state"] == "CANCELLED"
    assert retried["state"] == "RETRYING"
    assert [e["state"] for e in history] == ["SCHEDULED", "CANCELLED"]
    assert history[-1]["detail"]["reason"] == "rained off"
    assert history[-1]["source"] == "api:test-write"
    assert [n["task"]["id"] for n in audit["tasks"]] == [str(world.task_id)]
    assert (await service.get_task(world.task_id)).state == "CANCELLED"


async def test_reschedule_payload_and_dependencies(world: World, service: TaskService) -> None:
    """The changes of a waiting task and a task's dependencies, through the API as
    TaskService has them: recorded in the history, a dependent waiting until its
    dependency ends."""
    h = world.tokens.header("write")
    at = datetime.now(UTC) + timedelta(days=2)
    async with client(world.app) as c:
        moved = (
            await c.post(
                f"/api/v1/tasks/{world.task_id}/reschedule", headers=h, json={"due_at": at.isoformat()}
            )
        ).json()
        merged = (
            await c.post(
                f"/api/v1/tasks/{world.task_id}/payload", headers=h, json={"payload": {"n": 9}, "merge": True}
            )
        ).json()
        history = (await c.get(f"/api/v1/tasks/{world.task_id}/history", headers=h)).json()
        dependent = await c.post(
            "/api/v1/tasks",
            headers=h,
            json={"type": "box", "name": "after the box", "priority": 3, "depends_on": [str(world.task_id)]},
        )
        unknown = await c.post(
            "/api/v1/tasks", headers=h, json={"type": "box", "depends_on": [str(uuid.uuid4())]}
        )
    assert datetime.fromisoformat(moved["due_at"]) == at
    assert merged["payload"] == {"n": 9}
    assert [e["detail"].get("change") for e in history if not e["applied"]] == [
        "rescheduled",
        "payload_updated",
    ]
    assert dependent.status_code == 201, dependent.text
    task = dependent.json()["task"]
    assert (task["name"], task["priority"], task["depends_on"]) == ("after the box", 3, [str(world.task_id)])
    assert task["state"] == "SCHEDULED" and task["run_at"] is None  # waits for the box
    assert unknown.status_code == 422 and unknown.json()["path"].startswith("body.depends_on"), unknown.text


async def test_types_lifecycle(world: World, service: TaskService) -> None:
    h = world.tokens.header("admin")
    async with client(world.app) as c:
        created = await c.post("/api/v1/task-types", headers=h, json=NEW_TYPE)
        patched = await c.patch("/api/v1/task-types/crate", headers=h, json={"max_attempts": 7})
        renamed = await c.patch("/api/v1/task-types/crate", headers=h, json={"name": "barrel"})
        deleted = await c.delete("/api/v1/task-types/crate", headers=h)
        refused = await c.post("/api/v1/tasks", headers=h, json={"type": "crate"})
        listed = (await c.get("/api/v1/task-types", headers=h)).json()
        restored = await c.post("/api/v1/task-types/crate/restore", headers=h)
    assert created.status_code == 201
    assert patched.json()["max_attempts"] == 7
    assert (renamed.status_code, renamed.json()["path"]) == (422, "body.name")
    assert deleted.json()["deleted_at"] is not None
    assert refused.status_code == 404
    assert "crate" not in [t["name"] for t in listed]
    assert restored.json()["deleted_at"] is None
    assert (await service.get_type("crate")).max_attempts == 7


async def test_events_and_games_from_the_history(world: World) -> None:
    h = world.tokens.header("read")
    async with client(world.app) as c:
        events = (await c.get("/api/v1/events", headers=h)).json()
        game = (await c.get("/api/v1/games/g1", headers=h)).json()
    assert [e["kind"] for e in events] == ["score.changed"]
    assert game["game"] == "nba:g1"
    assert game["score"] == {"home": 2, "away": 0}


async def test_console_cookie_is_a_token_too(world: World) -> None:
    async with client(world.app) as c:
        c.cookies.set("taskmgr_token", world.tokens.read)
        r = await c.get("/api/v1/status")
    assert r.status_code == 200
    assert json.loads(r.text)["schema_version"]
