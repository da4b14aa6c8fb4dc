"""Prometheus metrics of the manager and the runner, scraped from a real /metrics
endpoint during a real dispatch and real polls (PostgreSQL and RabbitMQ real; the sports
API is an httpx.MockTransport). Counters are checked by their before/after deltas: the
registry is per process and other tests move it too."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import pytest
from prometheus_client import start_http_server
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.app import TaskManager
from manager.signals import ManagerSignals
from runners import TaskRunner
from runners.signals import RunnerSignals
from task_types.noop import NoopHandler
from taskmgr import store
from taskmgr.handlers import BaseHandler, EmittedEvent, FollowOn, Outcome, PollContext, Registry
from taskmgr.messages import ServiceReport, encode
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import delta, free_port, schedule, scrape, val, wait_for

pytestmark = [pytest.mark.usefixtures("clean"), pytest.mark.timeout(60)]

class GameHandler(BaseHandler):
    """Two events, one follow-on (due in an hour, so never dispatched here), done."""

    name: ClassVar[str] = "obs_game"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        return Outcome(
            events=[EmittedEvent("score.changed", "s1", {"home": 1}), EmittedEvent("game.final", "f", {})],
            follow_ons=[FollowOn("obs_child", {"parent": str(ctx.task_id)}, "child", delay_s=3600)],
            done=True,
        )


REGISTRY = Registry([GameHandler(), NoopHandler()])


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    """This process's default registry served over HTTP, as the CLI serves it."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(5)


class Gate:
    """The sports API: every request waits for `open`; flaky.test fails its first."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0
        self.flaky_calls = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        if request.url.host == "flaky.test":
            self.flaky_calls += 1
            if self.flaky_calls == 1:
                return httpx.Response(503)
        return httpx.Response(200, json={"ok": True})


@pytest.fixture
async def game_types(service: TaskService) -> None:
    await service.create_type(
        {
            "name": "obs_game",
            "handler": "obs_game",
            "url_template": "http://{host}/g/{n}",
            "poll_interval_s": 0.1,
            "max_consecutive_failures": 3,
        }
    )
    await service.create_type({"name": "obs_child", "handler": "noop"})


async def _all_in(service: TaskService, ids: list[Any], state: State) -> bool:
    async with service.session() as session:
        states = await store.states_of(session, ids)
    return len(states) == len(ids) and all(s is state for s in states.values())


async def test_a_dispatch_and_its_polls_move_each_metric_by_the_right_amount(
    engine: AsyncEngine, service: TaskService, settings: Settings, game_types: None, metrics_url: str
) -> None:
    n_ok = 5
    before = await scrape(metrics_url)
    api = Gate()
    m_sig, r_sig = ManagerSignals(), RunnerSignals()
    async with (
        TaskManager(settings=settings, engine=engine, signals=m_sig) as manager,
        TaskRunner(
            settings=settings, registry=REGISTRY, transport=httpx.MockTransport(api), signals=r_sig
        ) as runner,
    ):
        stop_m, stop_r = asyncio.Event(), asyncio.Event()
        run_m = asyncio.create_task(manager.run(stop_m))
        run_r = asyncio.create_task(runner.run(stop_r))
        await asyncio.wait_for(manager.is_leader.wait(), 10)
        assert val(await scrape(metrics_url), "taskmgr_leader") == 1

        ids = []
        for host, n in [("ok.test", i) for i in range(n_ok)] + [("flaky.test", 99)]:
            ids += await schedule(service, "obs_game", 1, payload={"host": host, "n": n})
        n = len(ids)
        # Every poller is parked in its first request: the gauge counts them all.
        await r_sig.wait_for(lambda: len(r_sig.active) == n)
        await wait_for(lambda: _ready(api.waiting == n))
        during = await scrape(metrics_url)
        assert delta(before, during, "taskmgr_runner_active_pollers") == n
        assert delta(before, during, "taskmgr_claimed_total") == n
        assert delta(before, during, "taskmgr_dispatched_total") == n
        assert delta(before, during, "taskmgr_dispatch_lateness_seconds_count") == n
        assert delta(before, during, "taskmgr_dispatch_lateness_seconds_bucket", le="+Inf") == n
        await wait_for(lambda: _all_in(service, ids, State.RUNNING))
        await manager.upkeep.refresh_gauges()  # the leader's 15 s job, at once
        running = await scrape(metrics_url)
        assert val(running, "taskmgr_tasks", state="RUNNING") == n
        assert val(running, "taskmgr_tasks", state="FINISHED") == 0

        api.open.set()
        await wait_for(lambda: _all_in(service, ids, State.FINISHED), timeout=20)
        # A service report and a malformed message: two more kinds of progress.
        await manager.publisher.publish_progress(
            encode(ServiceReport(service="photo", task_id=ids[0], state="FINISHED", at=datetime.now(UTC)))
        )
        await manager.publisher.publish_progress(b"{not json")
        await m_sig.wait_for(lambda: m_sig.intake.service_reports == 1 and m_sig.intake.dead_lettered == 1)
        await manager.upkeep.refresh_gauges()  # the leader's 15 s job, at once
        by_state = await scrape(metrics_url)
        assert val(by_state, "taskmgr_tasks", state="FINISHED") == n
        assert val(by_state, "taskmgr_tasks", state="SCHEDULED") == n  # the follow-ons, due in an hour
        assert val(by_state, "taskmgr_tasks", state="RUNNING") == 0  # emptied: not its last count

        stop_r.set()
        await run_r
        # The runner's last heartbeat (stopping) is handled before the manager stops.
        await m_sig.wait_for(lambda: m_sig.intake.heartbeats >= r_sig.heartbeat_sent.count)
        stop_m.set()
        await run_m
    after = await scrape(metrics_url)

    # Manager.
    assert val(after, "taskmgr_leader") == 0
    assert delta(before, after, "taskmgr_claimed_total") == n
    assert delta(before, after, "taskmgr_dispatched_total") == n
    assert delta(before, after, "taskmgr_dispatch_lateness_seconds_count") == n
    assert delta(before, after, "taskmgr_late_dispatches_total") == 0
    assert delta(before, after, "taskmgr_dead_lettered_total") == 1
    assert delta(before, after, "taskmgr_progress_messages_total", kind="service") == 1
    beats = r_sig.heartbeat_sent.count
    assert delta(before, after, "taskmgr_progress_messages_total", kind="heartbeat") == beats
    # Reports travel several to a message: their messages are what the intake took
    # besides the heartbeat, the service report and the malformed one.
    report_msgs = delta(before, after, "taskmgr_progress_messages_total", kind="reports")
    assert report_msgs == m_sig.intake.messages - beats - 2
    assert 1 <= report_msgs <= m_sig.intake.reports
    # Runner: one report of each kind per task, and the flaky host's one poll error.
    assert delta(before, after, "taskmgr_runner_reports_total", status="running") == n
    assert delta(before, after, "taskmgr_runner_reports_total", status="finished") == n
    assert delta(before, after, "taskmgr_runner_reports_total", status="poll_error") == 1
    # ... and one "progress" report per task, carrying its follow-on to the manager.
    assert delta(before, after, "taskmgr_runner_reports_total", status="progress") == n
    assert m_sig.intake.reports == 3 * n + 1
    assert delta(before, after, "taskmgr_runner_polls_total", host="ok.test", outcome="ok") == n_ok
    assert delta(before, after, "taskmgr_runner_polls_total", host="flaky.test", outcome="http_5xx") == 1
    assert delta(before, after, "taskmgr_runner_polls_total", host="flaky.test", outcome="ok") == 1
    assert delta(before, after, "taskmgr_runner_poll_duration_seconds_count") == n + 1
    assert delta(before, after, "taskmgr_runner_tick_drift_seconds_count") == n + 1
    assert delta(before, after, "taskmgr_runner_events_published_total") == 2 * n
    assert delta(before, after, "taskmgr_runner_follow_ons_sent_total") == n
    assert delta(before, after, "taskmgr_follow_ons_written_total") == n
    assert delta(before, after, "taskmgr_runner_active_pollers") == 0


async def _ready(value: bool) -> bool:
    return value
