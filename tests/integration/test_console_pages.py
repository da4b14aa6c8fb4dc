"""The console's pages without a browser: login with a token (a bad one changes
nothing), every page needs it, the buttons' routes check the scope again, and the
pages render with data in them (the browser test, tests/acceptance/test_console.py,
drives them on a live day)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.api_helpers import build, client, make_tokens
from tests.helpers import schedule

pytestmark = pytest.mark.usefixtures("clean")
PAGES = ["/", "/tasks", "/runners", "/stats"]


async def _task(service: TaskService) -> uuid.UUID:
    await service.create_type({"name": "box", "handler": "noop"})
    [tid] = await schedule(service, "box", 1, due_at=datetime.now(UTC) + timedelta(hours=1))
    return tid


async def test_pages_need_a_login(engine: AsyncEngine, settings: Settings, service: TaskService) -> None:
    tid = await _task(service)
    async with client(build(settings, engine)) as c:
        for page in [*PAGES, f"/tasks/{tid}"]:
            r = await c.get(page)
            assert r.status_code == 303, page
            assert r.headers["location"].startswith("/login?next=")
        assert (await c.post(f"/tasks/{tid}/cancel")).status_code == 303
    assert (await service.get_task(tid)).state == "SCHEDULED"


async def test_login_sets_the_cookie_and_a_bad_token_does_not(
    engine: AsyncEngine, database_url: str, settings: Settings
) -> None:
    tokens = await make_tokens(engine, database_url)
    async with client(build(settings, engine)) as c:
        bad = await c.post("/login", data={"token": "tmk_nope", "next": "/tasks"})
        assert bad.status_code == 401 and "not valid" in bad.text
        assert "taskmgr_token" not in c.cookies
        revoked = await c.post("/login", data={"token": tokens.revoked})
        assert revoked.status_code == 401
        # Only a path on this site is followed after the login (no open redirect).
        ok = await c.post("/login", data={"token": tokens.read, "next": "//evil.example/"})
        assert (ok.status_code, ok.headers["location"]) == (303, "/")
        assert "httponly" in ok.headers["set-cookie"].lower()
        assert "samesite=strict" in ok.headers["set-cookie"].lower()
        for page in PAGES:
            r = await c.get(page)
            assert r.status_code == 200, page
            assert "test-read" in r.text
        out = await c.post("/logout")
        assert out.status_code == 303
        assert (await c.get("/tasks")).status_code == 303


async def test_buttons_only_with_write_scope_and_their_routes_check_it(
    engine: AsyncEngine, database_url: str, settings: Settings, service: TaskService
) -> None:
    tid = await _task(service)
    tokens = await make_tokens(engine, database_url)
    app = build(settings, engine)
    async with client(app) as c:
        c.cookies.set("taskmgr_token", tokens.read)
        page = await c.get(f"/tasks/{tid}")
        assert page.status_code == 200 and 'id="cancel"' not in page.text
        refused = await c.post(f"/tasks/{tid}/cancel")
        assert refused.status_code == 403
    assert (await service.get_task(tid)).state == "SCHEDULED"
    async with client(app) as c:
        c.cookies.set("taskmgr_token", tokens.write)
        page = await c.get(f"/tasks/{tid}")
        assert 'id="cancel"' in page.text and 'id="retry"' not in page.text
        done = await c.post(f"/tasks/{tid}/cancel")
        assert done.status_code == 303
        after = await c.get(done.headers["location"])
        assert "CANCELLED" in after.text and 'id="cancel"' not in after.text
        missing = await c.get(f"/tasks/{uuid.uuid4()}")
        assert missing.status_code == 404
        bad_filter = await c.get("/tasks", params={"due_from": "2026-12-06T00:00"})
        assert bad_filter.status_code == 200 and "needs a timezone" in bad_filter.text
    assert (await service.get_task(tid)).state == "CANCELLED"


async def test_static_files_are_served_from_the_package(engine: AsyncEngine, settings: Settings) -> None:
    async with client(build(settings, engine)) as c:
        css = await c.get("/static/console.css")
        js = await c.get("/static/console.js")
    assert css.status_code == 200 and "--RUNNING" in css.text
    assert js.status_code == 200 and "EventSource" in js.text


def test_nothing_is_fetched_from_elsewhere() -> None:
    """No CDN: the pages load only this site's files."""
    from pathlib import Path

    import manager.api

    root = Path(manager.api.__file__).parent
    files = [*root.glob("templates/*.html"), *root.glob("static/*")]
    assert len(files) >= 8
    for f in files:
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
