"""Structured logs about a task from a real dispatch and real polls (PostgreSQL and
RabbitMQ real; the sports API is an httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.dispatch import Dispatcher
from runners import TaskRunner
from runners.signals import RunnerSignals
from task_types.noop import NoopHandler
from taskmgr import logs
from taskmgr.broker import Publisher
from taskmgr.handlers import Registry
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import schedule


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The JSON configuration the CLI applies, into a buffer; the test's own logging back
    afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logs.configure("INFO", "json", stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


async def test_json_log_lines_about_a_task_carry_its_ids_and_attempt(
    engine: AsyncEngine, service: TaskService, settings: Settings, json_log: io.StringIO
) -> None:
    """A late dispatch (the manager's warning) and a failing API (the runner's poll
    errors): each line names the task, its root, the attempt and, from a runner, the
    runner, as JSON fields."""
    await service.create_type(
        {
            "name": "flaky",
            "handler": "noop",
            "url_template": "http://down.test/{n}",
            "poll_interval_s": 0.05,
            "max_consecutive_failures": 2,
            "max_attempts": 1,
        }
    )
    now = datetime.now(UTC)
    (root,) = await schedule(service, "flaky", 1, payload={"n": 1}, due_at=now + timedelta(hours=1))
    (child,) = await schedule(service, "flaky", 1, payload={"n": 2}, due_at=now, parent_id=root)
    roots = {child: root}

    async def api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    later = now + timedelta(seconds=30)  # the dispatcher's clock: 30 s after the due time
    signals = RunnerSignals()
    async with (
        Publisher(url=settings.amqp_url, topology=_topology(settings)) as pub,
        TaskRunner(
            settings=settings,
            registry=Registry([NoopHandler()]),
            transport=httpx.MockTransport(api),
            runner_id="runner-logs",
            signals=signals,
        ) as runner,
    ):
        late_service = TaskService(engine=engine, clock=lambda: later)
        disp = Dispatcher(
            engine=engine, publisher=pub, service=late_service, settings=settings, clock=lambda: later
        )
        assert (await disp.poll_once()).claimed == 1
        stop = asyncio.Event()
        run = asyncio.create_task(runner.run(stop))
        await signals.poller_ended.wait()
        stop.set()
        await run

    got = lines(json_log)
    assert got, "nothing was logged"
    for line in got:
        assert {"time", "levelname", "name", "message"} <= set(line), line
    late = [x for x in got if x["name"] == "manager.dispatch" and "after they were due" in x["message"]]
    assert len(late) == 1
    assert (late[0]["levelname"], late[0]["task_id"], late[0]["root_task_id"], late[0]["attempt"]) == (
        "WARNING",
        str(child),
        str(root),
        1,
    )
    polls = [x for x in got if x["name"] == "runners.poller" and "poll failed" in x["message"]]
    assert len(polls) == 2
    for x in polls:
        assert (x["task_id"], x["root_task_id"], x["task_runner_id"], x["attempt"]) == (
            str(child),
            str(root),
            "runner-logs",
            1,
        )
    # Every line that talks about a task carries its fields.
    about = [x for x in got if any(str(t) in x["message"] or x.get("task_id") == str(t) for t in roots)]
    assert len(about) >= 3
    for x in about:
        tid = uuid.UUID(x["task_id"])
        assert (x["root_task_id"], x["attempt"]) == (str(roots[tid]), 1), x
        if x["name"].startswith("runners."):
            assert x["task_runner_id"] == "runner-logs", x


def _topology(settings: Settings) -> Any:
    from taskmgr.broker import Topology

    return Topology(settings.amqp_prefix)
