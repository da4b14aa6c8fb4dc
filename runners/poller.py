"""One periodic coroutine per task: GET the task's URL every interval, hand the
response to the task type's handler, and act on what it says."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx

from runners import metrics
from runners.http import Fetched, Fetcher, TooLarge, poll_request
from runners.limits import HostLimiter
from taskmgr.backoff import backoff_s
from taskmgr.broker import BrokerError, Publisher
from taskmgr.handlers import ChildSync, EmittedEvent, FollowOn, Handler, HandlerError, Outcome, PollContext
from taskmgr.logs import task_fields
from taskmgr.messages import Event, FollowOnOrder, ReportStatus, StartOrder, SyncOrder, TypeChange, encode
from taskmgr.models import EXPIRED, runtime_deadline
from taskmgr.redact import redact_text

log = logging.getLogger(__name__)

# Transient failures (timeouts, connection errors, 5xx, 429) back off exponentially from
# the task's interval, up to this; a Retry-After is honoured up to the same cap.
BACKOFF_CAP_S = 60.0
# The first tick comes at once (a new game's first data is wanted now); the second comes an
# interval later plus a random phase up to this (or the interval, if shorter), so that
# orders started together do not all tick at the same instant ever after.
START_SPREAD_S = 1.0
# Tick drift samples kept for percentiles (the benchmark reads them).
DRIFT_SAMPLES = 100_000


# A response body read past this many bytes (decompressed) fails the poll, not the runner.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_ERROR_CHARS = 2000
_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class TickStats:
    """Tick drift: how late each tick started against its schedule (loop clock)."""

    def __init__(self, keep: int = DRIFT_SAMPLES) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.samples: deque[float] = deque(maxlen=keep)

    def record(self, drift: float) -> None:
        self.count += 1
        self.total += drift
        self.max = max(self.max, drift)
        self.samples.append(drift)
        metrics.TICK_DRIFT.observe(drift)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, p: float) -> float:
        """The p-th percentile (0-100) of the kept samples."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


class ReportFn(Protocol):
    def __call__(
        self,
        order: StartOrder,
        status: ReportStatus,
        detail: dict[str, Any],
        *,
        follow_ons: list[FollowOnOrder] | None = None,
        sync: SyncOrder | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class PollerDeps:
    """What every poller of a runner shares.

    `fetcher` does the GETs (runners/http.py: httpx's transport API, on aiohttp's pool
    by default, on httpx.MockTransport in tests)."""

    fetcher: Fetcher
    limiter: HostLimiter
    publisher: Publisher
    runner_id: str
    report: ReportFn
    on_tick: Callable[[Poller], None]
    drift: TickStats
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES


@dataclass(frozen=True)
class _Next:
    end: bool = False
    backoff_s: float | None = None  # None: keep to the schedule


class Poller:
    """The periodic coroutine of one (task, attempt); `run()` is its body."""

    def __init__(self, *, order: StartOrder, handler: Handler, url: str, deps: PollerDeps) -> None:
        self.order = order
        self.handler = handler
        self.url = url
        self.deps = deps
        self._url = httpx.URL(url)  # parsed once, not on every request
        self.host = self._url.host
        self.port = self._url.port
        self._counters: dict[str, Any] = {}
        self.state: Mapping[str, Any] = {}  # carried from tick to tick
        self.failures = 0  # consecutive
        self.ticks = 0
        self.handled = 0  # responses given to the handler (a 304 is not)
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._request: httpx.Request | None = None  # the last GET sent, kept while etag and
        self._validators: tuple[str | None, str | None] = (None, None)  # last_modified stay these
        self.task: asyncio.Task[None] | None = None
        self.running_report: asyncio.Future[None] | None = None  # the "running" report's confirm
        self._interval = order.interval_s
        self._wake: asyncio.Future[str] | None = None  # resolved to wake the poller early
        self._sent: set[str] = set()  # follow-on dedup keys already sent to the manager
        self._last_sync: ChildSync | None = None
        self._log = task_fields(order.task_id, order.root_task_id, order.attempt, deps.runner_id)

    @property
    def attempt(self) -> int:
        return self.order.attempt

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Orders arrive in batches; a small random phase, taken after the first tick,
        # keeps their ticks from all landing on the same instant every interval.
        deadline = loop.time()
        phase = random.uniform(0, min(self.order.interval_s, START_SPREAD_S))
        slot: float | None = None  # when the last tick was due (on the grid)
        backing_off = False
        try:
            while True:
                woke = await self._sleep_until(deadline)
                if woke == "retuned":
                    # The type's values changed: the next tick keeps to the new interval
                    # from the last one, or comes now if that has passed (a backoff runs
                    # its course).
                    if slot is not None and not backing_off:
                        deadline = max(slot + self._interval, loop.time())
                    continue
                if woke == "expired":
                    self._report_expired()
                    return
                self.deps.drift.record(max(0.0, loop.time() - deadline))
                slot = deadline
                nxt = await self._tick()
                self.ticks += 1
                self.deps.on_tick(self)
                if nxt.end:
                    return
                now = loop.time()
                backing_off = nxt.backoff_s is not None
                if nxt.backoff_s is not None:
                    deadline = now + nxt.backoff_s
                else:
                    # Keep to the grid (no drift); when more than an interval late, skip
                    # the missed slots rather than bursting to catch up.
                    deadline += self._interval + phase
                    phase = 0.0
                    late = now - deadline
                    if late > self._interval:
                        deadline += math.ceil(late / self._interval) * self._interval
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the runner or other tasks down
            log.exception(
                "task %s attempt %s: poller crashed", self.order.task_id, self.attempt, extra=self._log
            )
            self.deps.report(self.order, "failed", {"reason": f"runner error: {exc!r}", "kind": "runner"})

    async def _sleep_until(self, deadline: float) -> str:
        """Wait for the tick due at `deadline` (loop clock): "tick"; or, sooner, the task's
        expiry ("expired") or a change of its type's values (`retune`: "retuned")."""
        loop = asyncio.get_running_loop()
        expires_in = self._expires_in()
        if expires_in is not None and expires_in <= 0:
            return "expired"
        until, woke = deadline, "tick"
        if expires_in is not None and loop.time() + expires_in < deadline:
            until, woke = loop.time() + expires_in, "expired"
        if until <= loop.time():
            return woke
        fut: asyncio.Future[str] = loop.create_future()
        self._wake = fut
        handle = loop.call_at(until, _resolve, fut, woke)
        try:
            return await fut
        finally:
            handle.cancel()
            self._wake = None

    def _expires_in(self) -> float | None:
        """Seconds until the task has run its type's max_runtime_s since its first start
        (None: no limit)."""
        end = runtime_deadline(self.order.started_at, self.order.max_runtime_s)
        return None if end is None else (end - datetime.now(UTC)).total_seconds()

    def _report_expired(self) -> None:
        order = self.order
        log.warning(
            "task %s attempt %s: expired (ran its type's max_runtime_s of %s s since %s)",
            order.task_id,
            order.attempt,
            order.max_runtime_s,
            order.started_at.isoformat() if order.started_at else None,
            extra=self._log,
        )
        detail = {
            "reason": EXPIRED,
            "kind": EXPIRED,
            "max_runtime_s": order.max_runtime_s,
            "started_at": order.started_at.isoformat() if order.started_at else None,
        }
        self.deps.report(order, "failed", detail)

    def retune(self, change: TypeChange) -> None:
        """Take a task type's new values (a broadcast of the manager's): the interval, the
        request timeout, the failed polls allowed and the max runtime, from the next
        tick on; a poller waiting for its next tick re-times it at once."""
        self.order = self.order.model_copy(
            update={
                "interval_s": change.poll_interval_s,
                "request_timeout_s": change.request_timeout_s,
                "max_consecutive_failures": change.max_consecutive_failures,
                "max_runtime_s": change.max_runtime_s,
            }
        )
        self._interval = change.poll_interval_s
        if self._wake is not None and not self._wake.done():
            self._wake.set_result("retuned")

    # -- one tick ----------------------------------------------------------------------

    async def _tick(self) -> _Next:
        order = self.order
        loop = asyncio.get_running_loop()
        try:
            async with self.deps.limiter.slot(self.host, self.port):
                started = loop.time()
                try:
                    async with asyncio.timeout(order.request_timeout_s):
                        response = await self._get()
                finally:
                    metrics.POLL_DURATION.observe(loop.time() - started)
        except asyncio.CancelledError:
            raise
        except TooLarge as exc:
            return self._failed("too_large", str(exc), False)
        except Exception as exc:
            if _is_timeout(exc):
                return self._failed("timeout", f"no response within {order.request_timeout_s} s", True)
            cause = exc.__cause__ or exc  # a wrapping transport's names mislead; the cause's do not
            return self._failed("connect", f"{type(cause).__name__}: {cause}", True)

        status = response.status
        if status == 304:
            return self._succeeded("not_modified", None, response)
        if 200 <= status < 300:
            return await self._handle(self._response(response))
        if status == 429:
            wait = _retry_after(response.headers)
            return self._failed("http_429", f"HTTP 429 from {self.host}", True, wait)
        if status >= 500:
            return self._failed("http_5xx", f"HTTP {status} from {self.host}", True)
        return self._failed(f"http_{status // 100}xx", f"HTTP {status} from {self.host}", False)

    async def _get(self) -> Fetched:
        """GET the task's URL with this poller's validators, the body read (up to the cap)."""
        validators = (self.etag, self.last_modified)
        if self._request is None or validators != self._validators:
            headers: dict[str, str] = {}
            if self.etag:
                headers["If-None-Match"] = self.etag
            if self.last_modified:
                headers["If-Modified-Since"] = self.last_modified
            self._request, self._validators = poll_request(self._url, headers), validators
        return await self.deps.fetcher.get(self._request, self.deps.max_response_bytes)

    def _response(self, fetched: Fetched) -> httpx.Response:
        """The handlers' type over a read response: a plain body, without the encoding
        headers that would decode it twice."""
        kept = [(k, v) for k, v in fetched.headers.items() if k.lower() not in _BODY_HEADERS]
        return httpx.Response(fetched.status, headers=kept, content=fetched.body, request=self._request)

    async def _handle(self, response: httpx.Response) -> _Next:
        order = self.order
        ctx = PollContext(
            task_id=order.task_id,
            root_task_id=order.root_task_id,
            task_type=order.type,
            attempt=order.attempt,
            payload=order.payload,
            state=self.state,
            url=self.url,
            now=datetime.now(UTC),
            interval_s=order.interval_s,
        )
        self.handled += 1
        try:
            outcome = self.handler.handle(ctx, response)
            events = self._events(outcome.events, ctx.now)
        except HandlerError as exc:
            return self._failed("parse", str(exc), False)
        except Exception as exc:
            log.exception("task %s: handler %s raised", order.task_id, order.handler, extra=self._log)
            return self._failed("handler", f"{type(exc).__name__}: {exc}", False)
        if events:
            try:
                await self.deps.publisher.publish_many(events)
            except BrokerError as exc:
                return self._failed("publish", str(exc), True)
            metrics.EVENTS_PUBLISHED.inc(len(events))
        self._send_follow_ons(outcome)
        self.state = dict(outcome.state)
        self._interval = outcome.next_interval_s or order.interval_s
        return self._succeeded("ok", outcome, response)

    def _events(
        self, emitted: list[EmittedEvent], now: datetime
    ) -> list[tuple[str, str, bytes, Mapping[str, Any] | None, str]]:
        order = self.order
        items: list[tuple[str, str, bytes, Mapping[str, Any] | None, str]] = []
        for ev in emitted:
            event_id = ev.event_id(order.task_id)
            body = encode(
                Event(
                    event_id=event_id,
                    event=ev.name,
                    task_type=order.type,
                    task_id=order.task_id,
                    root_task_id=order.root_task_id,
                    task_runner_id=self.deps.runner_id,
                    attempt=order.attempt,
                    observed_at=now,
                    data=dict(ev.data),
                    version=ev.version,
                )
            )
            headers = {
                "task_id": str(order.task_id),
                "root_task_id": str(order.root_task_id),
                "task_runner_id": self.deps.runner_id,
                "event_id": str(event_id),
                "observed_at": now.isoformat(),
            }
            items.append(("events", f"{order.type}.{ev.name}", body, headers, str(event_id)))
        return items

    def _send_follow_ons(self, outcome: Outcome) -> None:
        """Hand the handler's follow-ons and schedule sync to the manager in a report
        (queued before this tick's own reports, so they keep their order): the manager
        writes them, idempotently by dedup key, in the transaction that applies the
        report. What this poller sent already is not sent again."""
        new = [f for f in outcome.follow_ons if f.dedup_key not in self._sent]
        sync = outcome.sync if outcome.sync is not None and outcome.sync != self._last_sync else None
        if not new and sync is None:
            return
        self.deps.report(
            self.order,
            "progress",
            {"follow_ons": len(new), "sync": sync.scope if sync else None},
            follow_ons=[_follow_on_order(f) for f in new],
            sync=SyncOrder(scope=sync.scope, follow_ons=[_follow_on_order(f) for f in sync.follow_ons])
            if sync
            else None,
        )
        metrics.FOLLOW_ONS_SENT.inc(len(new))
        self._sent.update(f.dedup_key for f in new)
        if sync is not None:
            self._last_sync = sync

    # -- results -----------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        counter = self._counters.get(outcome)
        if counter is None:
            counter = self._counters[outcome] = metrics.POLLS.labels(self.host, outcome)
        counter.inc()

    def _succeeded(self, label: str, outcome: Outcome | None, response: Fetched | httpx.Response) -> _Next:
        self._count(label)
        self.failures = 0
        if outcome is not None:
            # Remember validators only once the response was fully acted on, so a failed
            # tick sees the same data again instead of a 304.
            refetch = outcome.refetch
            self.etag = None if refetch else response.headers.get("etag")
            self.last_modified = None if refetch else response.headers.get("last-modified")
            if outcome.done:
                self.deps.report(self.order, "finished", {"polls": self.ticks + 1})
                return _Next(end=True)
        return _Next()

    def _failed(self, kind: str, error: str, transient: bool, retry_after: float | None = None) -> _Next:
        # An error may quote the URL (and its credentials), or be huge: a report's
        # detail is bounded (taskmgr.messages), and one over it would lose its batch.
        error = redact_text(error)[:MAX_ERROR_CHARS]
        self._count(kind)
        self.failures += 1
        n = self.failures
        order = self.order
        log.info(
            "task %s attempt %s: poll failed (%s, %d in a row): %s",
            order.task_id,
            order.attempt,
            kind,
            n,
            error,
            extra=self._log,
        )
        self.deps.report(order, "poll_error", {"error": error, "kind": kind, "consecutive": n})
        if n >= order.max_consecutive_failures:
            reason = f"{n} consecutive failed polls; the last: {kind}: {error}"
            detail = {"reason": reason, "error": error, "kind": kind, "consecutive": n}
            self.deps.report(order, "failed", detail)
            return _Next(end=True)
        backoff: float | None = None
        if transient:  # the first waits one to two intervals
            backoff = backoff_s(n, 2 * self._interval, BACKOFF_CAP_S)
        if retry_after is not None:
            backoff = max(backoff or 0.0, min(retry_after, BACKOFF_CAP_S))
        return _Next(backoff_s=backoff)


def _resolve(fut: asyncio.Future[str], value: str) -> None:
    if not fut.done():
        fut.set_result(value)


def _follow_on_order(f: FollowOn) -> FollowOnOrder:
    return FollowOnOrder(
        type=f.type, payload=dict(f.payload), dedup_key=f.dedup_key, due_at=f.due_at, delay_s=f.delay_s
    )


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    if isinstance(exc, httpx.TimeoutException):
        # An httpx transport over aiohttp (httpx-aiohttp) maps every aiohttp connection
        # error to ConnectTimeout: look at the cause to tell a refused connection from a
        # slow one.
        cause = exc.__cause__
        return cause is None or isinstance(cause, TimeoutError)
    return False


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After as seconds (a number, fractions accepted, or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
