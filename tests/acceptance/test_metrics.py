"""The manager and runner processes (`taskmgr manager`, `taskmgr runner`) serve their
Prometheus metrics on TASKMGR_METRICS_PORT."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from taskmgr.settings import Settings
from tests.helpers import Samples, free_port, scrape, val, wait_for

pytestmark = [pytest.mark.usefixtures("clean"), pytest.mark.timeout(60)]


def process_env(settings: Settings, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
    env.update(
        TASKMGR_DATABASE_URL=settings.database_url,
        TASKMGR_AMQP_URL=settings.amqp_url,
        TASKMGR_AMQP_PREFIX=settings.amqp_prefix,
        TASKMGR_LOG_LEVEL="WARNING",
        TASKMGR_HEARTBEAT_INTERVAL="0.3",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for p in started:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            await asyncio.wait_for(p.wait(), 15)
        except TimeoutError:
            p.kill()
            await p.wait()


async def test_manager_and_runner_processes_serve_metrics_on_their_port(
    settings: Settings, processes: list[asyncio.subprocess.Process]
) -> None:
    m_port, r_port = free_port(), free_port()
    for cmd, port in (("manager", m_port), ("runner", r_port)):
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "taskmgr.cli",
                cmd,
                env=process_env(settings, TASKMGR_METRICS_PORT=port),
                stdout=asyncio.subprocess.DEVNULL,
            )
        )

    async def scraped(port: int, name: str) -> Samples | None:
        try:
            samples = await scrape(f"http://127.0.0.1:{port}/metrics")
        except httpx.TransportError:
            return None
        return samples if val(samples, name) == 1 else None

    # The manager leads; the runner says it polls nothing yet (and heartbeats: the
    # leader handled at least one of its heartbeats).
    manager = await wait_for(lambda: scraped(m_port, "taskmgr_leader"), timeout=30)
    runner = await wait_for(lambda: _scrape_or_none(r_port), timeout=30)
    assert ("taskmgr_dispatch_lateness_seconds_count", frozenset()) in manager
    assert val(runner, "taskmgr_runner_active_pollers") == 0
    assert ("taskmgr_runner_events_published_total", frozenset()) in runner
    beats = await wait_for(lambda: _heartbeats(m_port), timeout=30)
    assert beats >= 1


async def _scrape_or_none(port: int) -> Samples | None:
    try:
        return await scrape(f"http://127.0.0.1:{port}/metrics")
    except httpx.TransportError:
        return None


async def _heartbeats(port: int) -> float:
    return val(
        await scrape(f"http://127.0.0.1:{port}/metrics"), "taskmgr_progress_messages_total", kind="heartbeat"
    )
