"""What the API tests share: tokens of each scope, the app on the test database, a real
server on a free port (for the streams and the browser)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import httpx
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import tokens
from taskmgr.migrate import asyncpg_dsn
from taskmgr.settings import Settings
from taskmgr.testing import free_port

# anyio imports its file helpers lazily, and StaticFiles first needs them in a worker
# thread, where pytest's assertion rewriting of that import trips a CPython 3.11 bug
# ("AST constructor recursion depth mismatch"): import them here, on the main thread.
_ = anyio.open_file


@dataclass
class Tokens:
    read: str
    write: str
    admin: str
    revoked: str

    def header(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, scope)}"}


async def make_tokens(engine: AsyncEngine, database_url: str) -> Tokens:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("truncate api_tokens")
    finally:
        await conn.close()
    secrets: dict[str, str] = {}
    async with engine.begin() as c:
        for scope in ("read", "write", "admin"):
            secrets[scope] = (await tokens.create_token(c, f"test-{scope}", scope))[1]
        secrets["revoked"] = (await tokens.create_token(c, "test-revoked", "admin"))[1]
        from taskmgr.service import utcnow

        await tokens.revoke_token(c, "test-revoked", utcnow())
    return Tokens(**secrets)


def build(settings: Settings, engine: AsyncEngine) -> Any:
    from taskmgr.cli.api import build_app

    return build_app(settings, engine)


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """The app on a real HTTP server in this process: its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, 10)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")
