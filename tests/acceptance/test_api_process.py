"""`taskmgr api` as a real process, one worker or several: it serves the API and the
console on its port, and a SIGTERM ends it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr.settings import Settings
from tests.api_helpers import make_tokens
from tests.helpers import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean")]


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_api_process_serves_and_stops_on_sigterm(
    engine: AsyncEngine, database_url: str, settings: Settings, workers: int
) -> None:
    tokens = await make_tokens(engine, database_url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
    env.update({"TASKMGR_DATABASE_URL": database_url, "TASKMGR_API_PORT": str(port)})
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for in a thread
        [sys.executable, "-m", "taskmgr.cli", "api", "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:

            async def ready() -> bool:
                try:
                    return (await c.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(ready, timeout=30, what="the API's /readyz")
            status = await c.get("/api/v1/status", headers=tokens.header("read"))
            refused = await c.get("/api/v1/status")
            login = await c.get("/login")
        assert status.status_code == 200 and status.json()["schema_version"]
        assert refused.status_code == 401
        assert login.status_code == 200 and "API token" in login.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, (proc.stderr.read() if proc.stderr else b"")[-2000:]
