"""TaskRunner against real PostgreSQL and RabbitMQ; only the sports API is fake
(httpx.MockTransport). The test plays the manager: it writes tasks through
TaskService, publishes start orders, and consumes progress, events and dead letters."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import httpx
import pytest
from prometheus_client import REGISTRY as PROM
from sqlalchemy.ext.asyncio import AsyncEngine

from runners import TaskRunner
from runners.signals import RunnerSignals
from task_types.noop import NoopHandler
from taskmgr import broker
from taskmgr.handlers import (
    BaseHandler,
    EmittedEvent,
    FollowOn,
    Outcome,
    ParseError,
    PollContext,
    Registry,
    json_body,
)
from taskmgr.messages import (
    Event,
    Heartbeat,
    Report,
    RunnerReports,
    StartBatch,
    StartOrder,
    Stop,
    decode_event,
    decode_progress,
    encode,
)
from taskmgr.service import TaskService
from taskmgr.settings import Settings

pytestmark = pytest.mark.timeout(30)

URL_TEMPLATE = "http://{host}/games/{game}"


class ScoreHandler(BaseHandler):
    """An event per distinct score; a follow-on when a period ends; done when final."""

    name: ClassVar[str] = "test_scores"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        body = json_body(response, "fake")
        if not isinstance(body, dict) or "score" not in body:
            raise ParseError("fake", "$.score", "missing")
        score = body["score"]
        events = []
        if ctx.state.get("score") != score:
            events.append(EmittedEvent("score.changed", f"score-{score}", {"score": score}))
        child_type = body.get("child_type", "child")
        follow_ons = [FollowOn(child_type, {"period": 1}, "period-1")] if body.get("period_ended") else []
        done = bool(body.get("final"))
        return Outcome(events=events, follow_ons=follow_ons, state={"score": score}, done=done)


REGISTRY = Registry([ScoreHandler(), NoopHandler()])

Route = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


class FakeAPI:
    """The sports API: a route per path; records every request and how many were in
    flight per host at once."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[float, httpx.Request]] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.requests.append((asyncio.get_running_loop().time(), request))
        self.in_flight[host] += 1
        self.max_in_flight[host] = max(self.max_in_flight[host], self.in_flight[host])
        try:
            result = self.routes[request.url.path](request)
            return await result if inspect.isawaitable(result) else result
        finally:
            self.in_flight[host] -= 1

    def to(self, path: str) -> list[tuple[float, httpx.Request]]:
        return [(t, r) for t, r in self.requests if r.url.path == path]

    def on_host(self, host: str) -> int:
        return sum(1 for _, r in self.requests if r.url.host == host)


def scripted(*bodies: Any) -> Route:
    """Answers with each body in turn, then the last one forever."""
    calls = [0]

    def route(request: httpx.Request) -> httpx.Response:
        body = bodies[min(calls[0], len(bodies) - 1)]
        calls[0] += 1
        return httpx.Response(200, json=body)

    return route


@dataclass
class FakeManager:
    """What the manager sees: reports, heartbeats, events and dead letters."""

    publisher: broker.Publisher
    pool: str
    reports: list[Report] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    events: list[tuple[str, str | None, Mapping[str, Any], Event]] = field(default_factory=list)
    dead: list[tuple[bytes, Mapping[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def wait(self, predicate: Callable[[], Any], within_s: float = 8.0) -> Any:
        async with asyncio.timeout(within_s):
            while not (value := predicate()):
                await self.changed.wait()
            return value

    async def on_progress(self, message: broker.Message) -> None:
        msg = decode_progress(message.body)
        if isinstance(msg, RunnerReports):
            self.reports.extend(msg.reports)
        elif isinstance(msg, Heartbeat):
            self.heartbeats.append(msg)
        await message.ack()
        self._notify()

    async def on_event(self, message: broker.Message) -> None:
        self.events.append(
            (message.routing_key or "", message.message_id, dict(message.headers), decode_event(message.body))
        )
        await message.ack()
        self._notify()

    async def on_dead(self, message: broker.Message) -> None:
        self.dead.append((message.body, dict(message.headers)))
        await message.ack()
        self._notify()

    def statuses(self, task_id: uuid.UUID) -> list[str]:
        return [r.status for r in self.reports if r.task_id == task_id]

    def of(self, task_id: uuid.UUID, status: str) -> list[Report]:
        return [r for r in self.reports if r.task_id == task_id and r.status == status]

    async def start(self, *orders: StartOrder, body: bytes | None = None) -> bytes:
        body = body or encode(StartBatch(orders=list(orders), sent_at=datetime.now(UTC)))
        await self.publisher.publish_start(self.pool, body, message_id=uuid.uuid4().hex)
        return body

    async def next_heartbeat(self) -> Heartbeat:
        """The first heartbeat after now: every report published before it is in."""
        seen = len(self.heartbeats)
        return await self.wait(lambda: self.heartbeats[seen] if len(self.heartbeats) > seen else None)


@pytest.fixture
async def manager(settings: Settings, topology: broker.Topology) -> AsyncIterator[FakeManager]:
    async with (
        broker.Publisher(url=settings.amqp_url, topology=topology, name="test-manager") as pub,
        broker.Consumer(url=settings.amqp_url, topology=topology, prefetch=200, name="test-manager") as con,
    ):
        m = FakeManager(publisher=pub, pool=settings.pool)
        await con.consume_progress(m.on_progress)
        await con.consume_events("#", m.on_event)
        await con.consume_queue(topology.dead, m.on_dead, durable=True)
        yield m
        await con.cancel_all()


@dataclass
class Running:
    runner: TaskRunner
    signals: RunnerSignals
    stop: asyncio.Event
    task: asyncio.Task[None]


@asynccontextmanager
async def running(
    settings: Settings, engine: AsyncEngine, api: FakeAPI, **changes: Any
) -> AsyncIterator[Running]:
    settings = settings.model_copy(update=changes)
    stop = asyncio.Event()
    signals = RunnerSignals()
    async with TaskRunner(
        settings=settings,
        registry=REGISTRY,
        runner_id=f"test-runner-{uuid.uuid4().hex[:8]}",
        transport=httpx.MockTransport(api),
        signals=signals,
    ) as runner:
        task = asyncio.create_task(runner.run(stop))
        try:
            yield Running(runner, signals, stop, task)
        finally:
            stop.set()
            async with asyncio.timeout(8):
                await task


async def make_type(service: TaskService, name: str = "scores", **values: Any) -> None:
    await service.create_type(
        {
            "name": name,
            "handler": "test_scores",
            "url_template": URL_TEMPLATE,
            "poll_interval_s": 0.1,
            "request_timeout_s": 1.0,
            "max_consecutive_failures": 3,
            **values,
        }
    )


async def order_for(
    service: TaskService, type_name: str, payload: Mapping[str, Any], attempt: int = 1, **changes: Any
) -> StartOrder:
    """What the manager would send for a new task of this type."""
    async with service.session() as session, session.begin():
        scheduled = await service.schedule(session, type_name, payload)
    task = await service.get_task(scheduled.id)
    tt = await service.get_type(type_name)
    values = {
        "task_id": task.id,
        "attempt": attempt,
        "root_task_id": task.root_id,
        "type": task.type,
        "handler": tt.handler,
        "payload": task.payload,
        "url_template": tt.url_template,
        "interval_s": tt.poll_interval_s,
        "request_timeout_s": tt.request_timeout_s,
        "max_consecutive_failures": tt.max_consecutive_failures,
        "due_at": task.due_at,
        "claimed_at": datetime.now(UTC),
        **changes,
    }
    return StartOrder(**values)


def follow_ons_sent() -> float:
    return PROM.get_sample_value("taskmgr_runner_follow_ons_sent_total") or 0.0


def drifts_recorded() -> float:
    return PROM.get_sample_value("taskmgr_runner_tick_drift_seconds_count") or 0.0


# -- the happy path ------------------------------------------------------------------


async def test_polls_emits_events_sends_follow_ons_once_then_finishes(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    await service.create_type({"name": "child", "handler": "noop"})
    api = FakeAPI()
    api.routes["/games/g1"] = scripted(
        {"score": 0},
        {"score": 0},
        {"score": 1, "period_ended": True},
        {"score": 1, "period_ended": True},
        {"score": 2, "final": True},
    )
    order = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    sent_before, drifts_before = follow_ons_sent(), drifts_recorded()
    async with running(settings, engine, api) as run:
        await manager.start(order)
        await manager.wait(lambda: "finished" in manager.statuses(order.task_id))
        await manager.wait(lambda: len(manager.events) == 3)
        assert manager.statuses(order.task_id) == ["running", "progress", "finished"]
        assert run.signals.active == {}
        assert run.signals.start_acked.count == 1

    # Polled at its interval, without drift piling up.
    times = [t for t, _ in api.to("/games/g1")]
    assert len(times) == 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.09 for g in gaps), gaps
    # The first poll at once, the second an interval and a phase (up to one interval here)
    # later, then on the grid.
    assert times[-1] - times[1] == pytest.approx(0.3, abs=0.08)
    assert drifts_recorded() - drifts_before == 5

    # One event per distinct score, tagged, with ids stable across runners/attempts.
    keys = [k for k, *_ in manager.events]
    assert keys == ["scores.score.changed"] * 3
    for (_, message_id, headers, event), score in zip(manager.events, [0, 1, 2], strict=True):
        expected = EmittedEvent("score.changed", f"score-{score}").event_id(order.task_id)
        assert event.event_id == expected and message_id == str(expected)
        assert event.data == {"score": score} and event.task_type == "scores"
        assert headers["event_id"] == str(expected)
        assert headers["task_id"] == str(order.task_id)
        assert headers["root_task_id"] == str(order.root_task_id)
        assert headers["task_runner_id"] == run.runner.runner_id

    # The follow-on was sent to the manager once, in a report, though two polls asked
    # for it; the runner wrote nothing to the database (it has no connection to it).
    (progress,) = manager.of(order.task_id, "progress")
    sent = [(f.type, f.dedup_key, f.payload) for f in progress.follow_ons]
    assert sent == [("child", "period-1", {"period": 1})]
    assert follow_ons_sent() - sent_before == 1
    assert await service.list_tasks(type="child") == []


async def test_not_modified_keeps_polling_without_calling_the_handler(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    api = FakeAPI()
    final = asyncio.Event()
    changed = asyncio.Event()

    def route(request: httpx.Request) -> httpx.Response:
        if final.is_set():
            return httpx.Response(200, json={"score": 3, "final": True}, headers={"ETag": '"v3"'})
        etag = request.headers.get("if-none-match")
        if etag == '"v2"' or (etag == '"v1"' and not changed.is_set()):
            return httpx.Response(304)
        if etag == '"v1"':  # the score changed: new validators
            return httpx.Response(200, json={"score": 2}, headers={"ETag": '"v2"'})
        headers = {"ETag": '"v1"', "Last-Modified": "Tue, 24 Nov 2026 18:00:00 GMT"}
        return httpx.Response(200, json={"score": 1}, headers=headers)

    api.routes["/games/g1"] = route
    order = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    async with running(settings, engine, api) as run:
        await manager.start(order)
        poller = await run.signals.poller_started.wait()
        await run.signals.wait_for(lambda: poller.ticks >= 4)
        assert poller.handled == 1 and poller.failures == 0
        later = [r for _, r in api.to("/games/g1")][1:]
        assert later and all(r.headers["if-none-match"] == '"v1"' for r in later)
        assert all(r.headers["if-modified-since"] == "Tue, 24 Nov 2026 18:00:00 GMT" for r in later)
        # A poller keeps its GET while the validators stay; a new ETag makes a new one,
        # without the old Last-Modified (the 200 that brought v2 had none).
        changed.set()
        await run.signals.wait_for(lambda: poller.handled == 2)
        seen = len(api.to("/games/g1"))
        await run.signals.wait_for(lambda: len(api.to("/games/g1")) >= seen + 2)
        after = [r for _, r in api.to("/games/g1")][seen:]
        assert all(r.headers["if-none-match"] == '"v2"' for r in after)
        assert all("if-modified-since" not in r.headers for r in after)
        assert poller.handled == 2
        final.set()
        await manager.wait(lambda: "finished" in manager.statuses(order.task_id))
        await manager.wait(lambda: len(manager.events) == 3)
    assert manager.statuses(order.task_id) == ["running", "finished"]


async def test_the_first_poll_comes_at_once_the_phase_after_it(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    """A new task polls as soon as its runner takes it (bench lifecycle: a random phase of
    up to 1 s before the first poll made every task's first data up to 1 s late); the
    phase that keeps orders started together apart comes before the second tick."""
    await make_type(service, poll_interval_s=5.0)
    api = FakeAPI()
    games = [f"g{i}" for i in range(12)]
    for g in games:
        api.routes[f"/games/{g}"] = scripted({"score": 0})
    orders = [await order_for(service, "scores", {"host": "api.test", "game": g}) for g in games]
    loop = asyncio.get_running_loop()
    async with running(settings, engine, api) as run:
        started = loop.time()
        for order in orders:
            await manager.start(order)
        await run.signals.wait_for(lambda: all(api.to(f"/games/{g}") for g in games))
        firsts = [api.to(f"/games/{g}")[0][0] - started for g in games]
    # Before: each first poll uniformly within 1 s; all 12 within 0.4 s had odds of 0.4**12.
    assert max(firsts) < 0.4, firsts


# -- duplicates and control ------------------------------------------------------------


async def test_duplicate_start_makes_one_poller_newer_attempt_replaces_stop_stops(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    order = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    async with running(settings, engine, api) as run:
        r, sig = run.runner, run.signals
        body = await manager.start(order)
        await manager.start(body=body)  # the same message again (a redelivery)
        await sig.start_acked.wait(2)
        assert sig.poller_started.count == 1 and sig.duplicate_order.count == 1
        beat = await manager.next_heartbeat()
        assert beat.tasks == [(order.task_id, 1)]
        assert manager.statuses(order.task_id) == ["running"]

        # A newer attempt for the same task replaces the poller.
        await manager.start(order.model_copy(update={"attempt": 2}))
        await sig.wait_for(lambda: sig.active.get(order.task_id) == 2)
        assert sig.poller_started.count == 2 and len(sig.active) == 1
        await manager.wait(lambda: manager.of(order.task_id, "running")[1:])
        assert manager.of(order.task_id, "running")[1].attempt == 2

        # A stop for an older attempt changes nothing; for this one, it stops at once.
        await manager.publisher.publish_control(
            r.runner_id, encode(Stop(task_id=order.task_id, attempt=1, reason="stale"))
        )
        await manager.publisher.publish_control(
            r.runner_id, encode(Stop(task_id=order.task_id, attempt=2, reason="cancelled"))
        )
        await sig.stop_handled.wait(2)
        assert order.task_id not in sig.active and sig.stopped.count == 1
        polls = len(api.to("/games/g1"))
        beat = await manager.next_heartbeat()  # 0.3 s: three intervals
        assert beat.tasks == []
        assert len(api.to("/games/g1")) == polls
        assert manager.statuses(order.task_id) == ["running", "running"]


class Gate:
    """Holds the runner's report publishes (as a broker that stops confirming, during a
    memory alarm, would) until opened. Wraps the runner's own publish function."""

    def __init__(self, publish: Callable[[bytes], Awaitable[None]]) -> None:
        self._publish = publish
        self.open = asyncio.Event()

    async def __call__(self, body: bytes) -> None:
        await self.open.wait()
        await self._publish(body)


async def test_a_start_message_whose_reports_are_not_confirmed_is_settled_and_the_runner_goes_on(
    settings: Settings,
    engine: AsyncEngine,
    service: TaskService,
    manager: FakeManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With prefetch 1, an unsettled start message used to block the runner for good."""
    import runners.runner

    monkeypatch.setattr(runners.runner, "START_CONFIRM_TIMEOUT_S", 0.5)
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    api.routes["/games/g2"] = scripted({"score": 0})
    first = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    second = await order_for(service, "scores", {"host": "api.test", "game": "g2"})
    async with running(settings, engine, api, concurrency=50, orders_per_message=200) as run:
        r, sig = run.runner, run.signals
        await sig.wait_for(lambda: sig.prefetch_set.last == 1)
        gate = Gate(r._reports._publish)  # type: ignore[union-attr]
        r._reports._publish = gate  # type: ignore[union-attr]
        await manager.start(first)
        await manager.start(second)
        await sig.start_requeued.wait(within_s=5)
        assert sig.reports_sent.count == 0, "requeued because no report was confirmed"
        gate.open.set()  # the alarm ends
        await sig.wait_for(lambda: sig.start_acked.count >= 2 and second.task_id in sig.active, within_s=10)
        assert sig.poller_started.count == 2


async def test_a_stop_reaches_the_runner_while_start_orders_fill_its_prefetch(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    order = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    async with running(settings, engine, api, concurrency=50, orders_per_message=200) as run:
        r, sig = run.runner, run.signals
        await sig.wait_for(lambda: sig.prefetch_set.last == 1)
        gate = Gate(r._reports._publish)  # type: ignore[union-attr]
        r._reports._publish = gate  # type: ignore[union-attr]
        await manager.start(order)  # registered, but its message stays unsettled
        await sig.poller_started.wait()
        await manager.publisher.publish_control(
            r.runner_id, encode(Stop(task_id=order.task_id, attempt=1, reason="cancelled"))
        )
        await sig.stopped.wait(within_s=5)
        assert order.task_id not in sig.active and sig.start_acked.count == 0
        gate.open.set()


async def test_a_stale_start_order_is_dropped(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    """An order older than its start timeout (recovery has dispatched the task again by
    now) starts nothing; its message is settled."""
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    order = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    stale = order.model_copy(
        update={"claimed_at": datetime.now(UTC) - timedelta(seconds=60), "start_timeout_s": 30.0}
    )
    async with running(settings, engine, api) as run:
        sig = run.signals
        await manager.start(stale)
        await sig.start_acked.wait()
        assert sig.stale_order.count == 1 and sig.poller_started.count == 0
        assert manager.statuses(order.task_id) == []


# -- failures ----------------------------------------------------------------------------


async def test_failed_polls_report_errors_then_fail_while_another_task_keeps_polling(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    await make_type(service, "flaky", poll_interval_s=0.05, request_timeout_s=0.1)
    api = FakeAPI()
    api.routes["/games/ok"] = scripted({"score": 0})
    api.routes["/games/e500"] = lambda r: httpx.Response(500, text="oops")
    api.routes["/games/busy"] = lambda r: httpx.Response(429, headers={"Retry-After": "0.2"})
    api.routes["/games/junk"] = lambda r: httpx.Response(200, text="<html>not json")

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)  # the API hangs; the runner's timeout cuts it off
        return httpx.Response(200, json={"score": 0})

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    api.routes["/games/slow"] = slow
    api.routes["/games/down"] = down
    ok = await order_for(service, "scores", {"host": "api.test", "game": "ok"})
    kinds = {
        "e500": "http_5xx",
        "busy": "http_429",
        "junk": "parse",
        "slow": "timeout",
        "down": "connect",
    }
    bad = {g: await order_for(service, "flaky", {"host": "api.test", "game": g}) for g in kinds}
    async with running(settings, engine, api) as run:
        sig = run.signals
        await manager.start(ok, *bad.values())
        await manager.wait(lambda: all(manager.of(o.task_id, "failed") for o in bad.values()))
        assert sig.active == {ok.task_id: 1}
        ok_poller = sig.pollers[ok.task_id]
        ticks = ok_poller.ticks
        await sig.wait_for(lambda: ok_poller.ticks >= ticks + 2)

    for game, o in bad.items():
        assert manager.statuses(o.task_id) == ["running", "poll_error", "poll_error", "poll_error", "failed"]
        errors = manager.of(o.task_id, "poll_error")
        assert [e.detail["consecutive"] for e in errors] == [1, 2, 3]
        assert {e.detail["kind"] for e in errors} == {kinds[game]}, game
        failed = manager.of(o.task_id, "failed")[0]
        assert "3 consecutive failed polls" in failed.detail["reason"]
        assert failed.detail["kind"] == kinds[game]
    assert "HTTP 500" in manager.of(bad["e500"].task_id, "poll_error")[0].detail["error"]
    assert "fake: $" in manager.of(bad["junk"].task_id, "poll_error")[0].detail["error"]
    # Retry-After is honoured.
    busy = [t for t, _ in api.to("/games/busy")]
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(busy)), busy
    assert set(manager.statuses(ok.task_id)) == {"running", "handback"}


# -- bad input ---------------------------------------------------------------------------


async def test_malformed_start_is_dead_lettered_and_bad_orders_are_reported(
    settings: Settings,
    engine: AsyncEngine,
    service: TaskService,
    manager: FakeManager,
    topology: broker.Topology,
) -> None:
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    first = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    unknown = await order_for(service, "scores", {"host": "api.test", "game": "g1"}, handler="nope")
    extra = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    async with running(settings, engine, api, concurrency=1) as run:
        sig = run.signals
        await manager.start(body=b'{"kind": "start", "orders": []}')
        await manager.start(body=b"\xff not json")
        await manager.wait(lambda: len(manager.dead) == 2)
        assert all(h[broker.REASON_HEADER].startswith("start message") for _, h in manager.dead)
        assert manager.dead[0][0] == b'{"kind": "start", "orders": []}'
        await sig.dead_lettered.wait(2)

        # The runner goes on: good orders start; an order for a handler this runner
        # lacks (a rolling upgrade) is handed back, not failed; an order beyond its
        # capacity is rejected (the manager sends both elsewhere, after a backoff).
        await manager.start(first, unknown, extra)
        await manager.wait(lambda: len(manager.reports) == 3)
        assert manager.statuses(first.task_id) == ["running"]
        assert manager.statuses(unknown.task_id) == ["rejected"]
        handed_back = manager.of(unknown.task_id, "rejected")[0].detail
        assert handed_back["kind"] == "handler" and "no handler 'nope'" in handed_back["reason"]
        assert manager.statuses(extra.task_id) == ["rejected"]
        assert "capacity" in manager.of(extra.task_id, "rejected")[0].detail["reason"]
        assert sig.active == {first.task_id: 1}


# -- shutdown ----------------------------------------------------------------------------


async def test_shutdown_hands_back_held_tasks(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    orders = [await order_for(service, "scores", {"host": "api.test", "game": "g1"}) for _ in range(3)]
    async with running(settings, engine, api) as run:
        await manager.start(*orders)
        await run.signals.wait_for(lambda: len(run.signals.active) == 3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        run.stop.set()
        async with asyncio.timeout(5):
            await run.task
        assert loop.time() - started < 3
        assert run.signals.active == {}
    polls = len(api.requests)
    await manager.wait(lambda: any(b.stopping for b in manager.heartbeats))
    for o in orders:
        assert manager.statuses(o.task_id) == ["running", "handback"]
    last = manager.heartbeats[-1]
    assert last.stopping and last.tasks == []
    assert len(api.requests) == polls


# -- politeness --------------------------------------------------------------------------


async def test_per_host_concurrency_and_rate_limits(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service, poll_interval_s=0.05)
    api = FakeAPI()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.03)
        return httpx.Response(200, json={"score": 0})

    orders = []
    for host, n in (("api.test", 5), ("one.test", 3), ("rated.test", 4)):
        for i in range(n):
            api.routes[f"/games/{host}-{i}"] = slow
            orders.append(await order_for(service, "scores", {"host": host, "game": f"{host}-{i}"}))
    async with running(
        settings, engine, api, host_concurrency=2, host_limits="one.test=1, rated.test=10:20"
    ) as run:
        await manager.start(*orders)
        await run.signals.wait_for(
            lambda: (
                api.on_host("api.test") >= 20
                and api.on_host("one.test") >= 8
                and api.on_host("rated.test") >= 8
            )
        )
    assert api.max_in_flight["api.test"] == 2
    assert api.max_in_flight["one.test"] == 1
    rated = [t for t, r in api.requests if r.url.host == "rated.test"]
    # 20/s: the limiter spaces the starts 50 ms apart. Arrivals carry the event loop's
    # jitter (one request late, the next on time), so the check allows for it: no three
    # requests within one spacing, and no faster than 20/s over the run.
    assert all(c - a >= 0.05 for a, c in zip(rated, rated[2:], strict=False)), rated
    assert (rated[-1] - rated[0]) / (len(rated) - 1) >= 0.05 * 0.95, rated


# -- the default (aiohttp) transport against a real local server -----------------------


async def test_default_transport_against_a_local_server(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    from aiohttp import web

    async def final(request: web.Request) -> web.Response:
        return web.json_response({"score": 3, "final": True})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({"score": 0})

    app = web.Application()
    app.router.add_get("/games/final", final)
    app.router.add_get("/games/slow", slow)
    server = web.AppRunner(app, shutdown_timeout=1.0)
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    closed_port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    try:
        await make_type(
            service, "local", poll_interval_s=0.05, request_timeout_s=0.1, max_consecutive_failures=2
        )
        good = await order_for(service, "local", {"host": f"127.0.0.1:{port}", "game": "final"})
        slow_o = await order_for(service, "local", {"host": f"127.0.0.1:{port}", "game": "slow"})
        down = await order_for(service, "local", {"host": f"127.0.0.1:{closed_port}", "game": "x"})
        stop = asyncio.Event()
        async with TaskRunner(settings=settings, registry=REGISTRY) as runner:
            task = asyncio.create_task(runner.run(stop))
            await manager.start(good, slow_o, down)
            await manager.wait(
                lambda: (
                    manager.of(good.task_id, "finished")
                    and manager.of(slow_o.task_id, "failed")
                    and manager.of(down.task_id, "failed")
                )
            )
            stop.set()
            await task
        assert manager.events[0][3].data == {"score": 3}
        assert {e.detail["kind"] for e in manager.of(slow_o.task_id, "poll_error")} == {"timeout"}
        assert {e.detail["kind"] for e in manager.of(down.task_id, "poll_error")} == {"connect"}
    finally:
        await server.cleanup()


async def test_an_oversized_response_or_a_gzip_bomb_fails_the_poll_not_the_runner(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    """Through the real transport: a body over the cap, declared or not, and a gzip bomb
    (about 10 KB on the wire, 10 MB inflated) each fail their poll (kind too_large) while
    the runner lives and another task keeps polling."""
    import gzip

    from aiohttp import web

    cap = 64 * 1024
    bomb = gzip.compress(b"0" * 10_000_000)

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b'{"score": "' + b"9" * (2 * cap) + b'"}', content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(200):  # no length announced: only counting stops it
            await response.write(b" " * 4096)
        await response.write_eof()
        return response

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def fine(request: web.Request) -> web.Response:
        return web.json_response({"score": 1})

    app = web.Application()
    for path, route in (("/games/big", big), ("/games/chunked", chunked), ("/games/bomb", gzipped)):
        app.router.add_get(path, route)
    app.router.add_get("/games/fine", fine)
    server = web.AppRunner(app, shutdown_timeout=1.0)
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await make_type(
            service, "local", poll_interval_s=0.05, request_timeout_s=2.0, max_consecutive_failures=2
        )
        bad = {
            g: await order_for(service, "local", {"host": f"127.0.0.1:{port}", "game": g})
            for g in ("big", "chunked", "bomb")
        }
        ok = await order_for(service, "local", {"host": f"127.0.0.1:{port}", "game": "fine"})
        stop = asyncio.Event()
        capped = settings.model_copy(update={"max_response_bytes": cap})
        sig = RunnerSignals()
        async with TaskRunner(settings=capped, registry=REGISTRY, signals=sig) as runner:
            task = asyncio.create_task(runner.run(stop))
            await manager.start(ok, *bad.values())
            await manager.wait(lambda: all(manager.of(o.task_id, "failed") for o in bad.values()))
            ok_poller = sig.pollers[ok.task_id]
            ticks = ok_poller.ticks
            await sig.wait_for(lambda: ok_poller.ticks >= ticks + 2)
            stop.set()
            await task
        for game, order in bad.items():
            kinds = {e.detail["kind"] for e in manager.of(order.task_id, "poll_error")}
            assert kinds == {"too_large"}, (game, kinds)
    finally:
        await server.cleanup()


async def test_a_dying_side_coroutine_stops_the_runner_loudly(
    settings: Settings, engine: AsyncEngine, service: TaskService, manager: FakeManager
) -> None:
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    order = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    sig = RunnerSignals()
    async with TaskRunner(
        settings=settings, registry=REGISTRY, transport=httpx.MockTransport(api), signals=sig
    ) as runner:
        beats = 0

        async def heartbeat(*, stopping: bool = False) -> None:
            nonlocal beats
            beats += 1
            if beats > 1:
                raise RuntimeError("the heartbeat broke")

        runner._send_heartbeat = heartbeat  # type: ignore[method-assign]
        await manager.start(order)
        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.timeout(5):
                await runner.run(asyncio.Event())
        assert info.group_contains(RuntimeError, match="the heartbeat broke")
        assert sig.active == {}


async def test_run_runner_entry_point(settings: Settings, manager: FakeManager) -> None:
    from runners import run_runner

    stop = asyncio.Event()
    task = asyncio.create_task(run_runner(settings.model_copy(update={"pool": "bench"}), stop))
    beat = await manager.next_heartbeat()
    assert beat.pool == "bench" and not beat.stopping
    stop.set()
    async with asyncio.timeout(5):
        await task
    await manager.wait(lambda: manager.heartbeats[-1].stopping)


# -- URLs a task may call -----------------------------------------------------------


async def test_a_payload_cannot_send_a_runner_to_another_host(
    engine, service, settings: Settings, manager: FakeManager
) -> None:  # type: ignore[no-untyped-def]
    """The type's URL template takes the host from the payload: a host outside the
    allow-list fails the order (kind url) and nothing is fetched from it."""
    await make_type(service)
    api = FakeAPI()
    api.routes["/games/g1"] = scripted({"score": 0})
    inside = await order_for(service, "scores", {"host": "api.test", "game": "g1"})
    outside = await order_for(service, "scores", {"host": "169.254.169.254", "game": "g1"})
    async with running(settings, engine, api) as run:
        await manager.start(inside, outside)
        await manager.wait(
            lambda: manager.of(outside.task_id, "failed") and manager.of(inside.task_id, "running")
        )
        assert run.signals.active == {inside.task_id: 1}
    failed = manager.of(outside.task_id, "failed")[0].detail
    assert (
        failed["kind"] == "url"
        and "169.254.169.254" in failed["reason"]
        and "not allowed" in failed["reason"]
    )
    assert api.on_host("169.254.169.254") == 0


async def test_redirects_are_not_followed_and_the_recorded_url_has_no_secret(
    engine, service, settings: Settings, manager: FakeManager
) -> None:  # type: ignore[no-untyped-def]
    import httpx

    await service.create_type(
        {
            "name": "keyed",
            "handler": "test_scores",
            "url_template": "http://u:pw@{host}/games/{game}?apiKey=s3cret",
            "poll_interval_s": 0.05,
            "max_consecutive_failures": 2,
        }
    )
    api = FakeAPI()
    api.routes["/games/moved"] = lambda r: httpx.Response(
        302, headers={"Location": "http://evil.example/steal"}
    )
    order = await order_for(service, "keyed", {"host": "api.test", "game": "moved"})
    async with running(settings, engine, api):
        await manager.start(order)
        await manager.wait(lambda: manager.of(order.task_id, "failed"))
    assert api.on_host("evil.example") == 0
    assert {e.detail["kind"] for e in manager.of(order.task_id, "poll_error")} == {"http_3xx"}
    recorded = manager.of(order.task_id, "running")[0].detail["url"]
    assert "pw" not in recorded and "s3cret" not in recorded and recorded.startswith("http://u:***@api.test")
