"""The TaskRunner: an always-on process that takes start orders from its pool's queue
and runs one periodic coroutine (a Poller) per task.

Invariants it keeps (see DESIGN.md):
- a start message is acked only once the reports for its orders ("running", or
  "rejected"/"failed") are confirmed by the broker; a redelivered message makes no
  second poller, and a newer attempt replaces an older one;
- a malformed message is dead-lettered, never requeued forever;
- one task's failure never stops the others or the runner; a side coroutine's
  (heartbeat, report flusher) death stops the runner loudly;
- on stop, it stops taking work, hands every task it holds back to the manager, says
  so in a last heartbeat and closes.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gc
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import httpx

from runners import metrics
from runners.http import Fetcher, TransportFetcher, fast_transport
from runners.limits import HostLimit, HostLimiter, parse_host_limits
from runners.poller import Poller, PollerDeps, TickStats
from runners.reports import ReportBuffer
from runners.signals import RunnerSignals
from taskmgr import broker
from taskmgr.broker import BrokerError, Consumer, Publisher, Topology
from taskmgr.handlers import HandlerError, Registry, UnknownHandler
from taskmgr.logs import task_fields
from taskmgr.messages import (
    HEARTBEAT_HEADER,
    BadMessage,
    FollowOnOrder,
    Heartbeat,
    Report,
    ReportStatus,
    StartOrder,
    SyncOrder,
    TypeChange,
    decode_control,
    decode_start,
    encode,
)
from taskmgr.redact import redact_url
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

# gc thresholds (generations 0, 1, 2) for a runner process. Measured with 10,000 pollers
# (bench runner): the default (700, 10, 10) gave tick drift p99 395 ms at 278 MB;
# (2000, 10, 10) 218 ms at 272 MB; (10000, 10, 10) 35 ms but 406 MB of waiting garbage.
RUNNER_GC_THRESHOLDS = (2_000, 10, 10)

# A start message whose reports are not confirmed within this is requeued (redelivered,
# the duplicate makes no second poller).
START_CONFIRM_TIMEOUT_S = 30.0
# The start consumer's x-priority: its free room in this many steps (0 full, 10 empty).
PRIORITY_LEVELS = 10
# Heartbeats published and not confirmed yet, at most (a broker that confirms nothing).
MAX_UNCONFIRMED_HEARTBEATS = 3
# Shutdown: time allowed to publish the handbacks and the last heartbeat.
SHUTDOWN_PUBLISH_TIMEOUT_S = 4.0
# (task, attempt)s that ended here, remembered: a late duplicate start restarts nothing.
ENDED_MEMORY = 50_000


def allowed_hosts(base_urls: Iterable[str], extra: str) -> list[tuple[str, int | None]]:
    """(host pattern, port or None for any) pairs: the base URLs' hosts and `extra`."""
    out: list[tuple[str, int | None]] = []
    for base in base_urls:
        u = httpx.URL(base)
        if u.host:
            out.append((u.host, u.port))
    for item in filter(None, (i.strip() for i in extra.split(","))):
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        out.append((host.lower(), int(port) if port.isdigit() else None))
    return out


def default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class TaskRunner:
    """`async with TaskRunner(...) as r: await r.run(stop)`.

    signals: what the runner did, for tests to wait on (runners/signals.py); None in
    production, where the runner records nothing for them.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        runner_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        signals: RunnerSignals | None = None,
    ) -> None:
        self.settings = settings
        self.runner_id = runner_id or default_runner_id()
        self.topology = Topology.from_settings(settings, stream=False)
        self._registry = registry
        self._transport = transport
        # The hosts the handlers' URLs point at, and those named in TASKMGR_ALLOWED_HOSTS.
        self._allowed_hosts = allowed_hosts(
            (base for h in registry for base in h.base_urls()), settings.allowed_hosts
        )
        self._limiter = HostLimiter(
            HostLimit(settings.host_concurrency, settings.host_rate), parse_host_limits(settings.host_limits)
        )
        self._pollers: dict[uuid.UUID, Poller] = {}
        self._ended: OrderedDict[uuid.UUID, int] = OrderedDict()
        self._signals = signals
        self._stack: AsyncExitStack | None = None
        self._publisher: Publisher | None = None
        self._beats: Publisher | None = None  # heartbeats, on a connection of their own
        self._consumer: Consumer | None = None
        self._reports: ReportBuffer | None = None
        self._deps: PollerDeps | None = None
        self._prefetch: int | None = None
        self._priority = PRIORITY_LEVELS  # the start consumer's: empty at first
        self._adjusting = asyncio.Lock()  # one prefetch / priority change at a time
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> TaskRunner:
        s = self.settings
        async with AsyncExitStack() as stack:
            name = f"runner-{self.runner_id}"
            self._publisher = await stack.enter_async_context(
                # The manager declares the exchanges; a runner's user may only use them.
                Publisher(url=s.amqp_url, topology=self.topology, name=name, declare=False)
            )
            # Heartbeats on a connection of their own: RabbitMQ's flow control holds a whole
            # connection, and they must not wait behind the events and reports of thousands
            # of first polls (3 x 3,000 on the cluster: none arrived for 15 s meanwhile).
            self._beats = await stack.enter_async_context(
                Publisher(url=s.amqp_url, topology=self.topology, name=f"{name}-beat", declare=False)
            )
            self._consumer = await stack.enter_async_context(
                Consumer(
                    url=s.amqp_url,
                    topology=self.topology,
                    prefetch=s.prefetch_messages,
                    name=name,
                    declare=False,
                )
            )
            # httpx's transport API, no client layers, no redirects followed (runners/http.py).
            fetcher: Fetcher = TransportFetcher(self._transport or fast_transport)
            stack.push_async_callback(fetcher.aclose)
            self._reports = ReportBuffer(
                publish=self._publisher.publish_progress,
                runner_id=self.runner_id,
                pool=s.pool,
                signals=self._signals,
            )
            self._deps = PollerDeps(
                fetcher=fetcher,
                limiter=self._limiter,
                publisher=self._publisher,
                runner_id=self.runner_id,
                report=self._poller_report,
                on_tick=_ignore if self._signals is None else self._signals.ticked.emit,
                drift=TickStats(),
                max_response_bytes=s.max_response_bytes,
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._drop_all()
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

    async def run(self, stop: asyncio.Event) -> None:
        """Take and run tasks until `stop` is set, then shut down gracefully. Raises
        (an ExceptionGroup) if a side coroutine dies."""
        if self._consumer is None or self._reports is None:
            raise RuntimeError("enter the runner first: `async with TaskRunner(...) as runner`")
        try:
            async with asyncio.TaskGroup() as tg:
                flusher = tg.create_task(self._reports.run(), name=f"{self.runner_id}-reports")
                beat = tg.create_task(self._heartbeat_loop(), name=f"{self.runner_id}-heartbeat")
                await self._consumer.consume_control(
                    self.runner_id, self._on_control, pool=self.settings.pool
                )
                await self._consumer.consume_start(self.settings.pool, self._on_start, self._priority)
                log.info(
                    "runner %s: taking tasks from %s",
                    self.runner_id,
                    self.topology.start_queue(self.settings.pool),
                )
                if self._signals is not None:
                    self._signals.consuming.emit(self.runner_id)
                await stop.wait()
                beat.cancel()
                await self._shutdown(flusher)
        finally:
            self._drop_all()

    async def _shutdown(self, flusher: asyncio.Task[None]) -> None:
        assert self._consumer is not None and self._reports is not None
        self._stopping = True
        await self._consumer.cancel_all()  # first: take no more work
        held = list(self._pollers.values())
        for p in held:
            self._remove(p)
        tasks = [p.task for p in held if p.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in held:
            self._report(p.order, "handback", {"reason": f"runner {self.runner_id} is shutting down"})
        self._reports.close()
        try:
            async with asyncio.timeout(SHUTDOWN_PUBLISH_TIMEOUT_S):
                await flusher
                await self._send_heartbeat(stopping=True)
        except TimeoutError:
            log.error(
                "runner %s: could not publish its handbacks in time; the manager will notice "
                "the missing heartbeats instead",
                self.runner_id,
            )
            self._reports.abandon("runner shut down")
        log.info("runner %s: stopped, handed back %d tasks", self.runner_id, len(held))

    def _drop_all(self) -> None:
        """Cancel whatever pollers are left (a crash, or `run()` never called)."""
        for p in list(self._pollers.values()):
            self._remove(p)
            if p.task is not None:
                p.task.cancel()

    # -- start orders ------------------------------------------------------------------

    async def _on_start(self, message: broker.Message) -> None:
        if self._stopping:
            await _settle(message.nack(requeue=True))
            return
        try:
            try:
                batch = decode_start(message.body)
            except BadMessage as exc:
                log.warning("runner %s: dead-lettering a start message: %s", self.runner_id, exc)
                await self._dead_letter(message, str(exc))
                return
            waits = [f for f in (self._take(order) for order in batch.orders) if f is not None]
            try:
                async with asyncio.timeout(START_CONFIRM_TIMEOUT_S):
                    await asyncio.gather(*(asyncio.shield(f) for f in waits))
            except (TimeoutError, BrokerError) as exc:
                # Settled all the same: an unsettled delivery holds a prefetch slot for
                # good (a memory alarm longer than this would stop the runner taking
                # any order). Requeued, it comes back; its orders already registered
                # here are duplicates then, which start nothing and re-send "running".
                log.warning(
                    "runner %s: reports for start message %s not confirmed (%r); requeueing it",
                    self.runner_id,
                    message.message_id,
                    exc,
                )
                await _settle(message.nack(requeue=True))
                if self._signals is not None:
                    self._signals.start_requeued.emit(batch)
                return
            await _settle(message.ack())
            if self._signals is not None:
                self._signals.start_acked.emit(batch)
            await self._adjust_prefetch()
        except Exception as exc:  # a bug: never requeue it forever
            log.exception("runner %s: start message %s", self.runner_id, message.message_id)
            await self._dead_letter(message, f"runner error: {exc!r}")

    def _allowed(self, url: httpx.URL) -> bool:
        """Whether the runner may call this URL's host: a provider's host (the base URLs
        in use) or one TASKMGR_ALLOWED_HOSTS names (host, host:port or *.domain)."""
        return any(
            fnmatch.fnmatch(url.host, host) and (port is None or port == url.port)
            for host, port in self._allowed_hosts
        )

    def _take(self, order: StartOrder) -> asyncio.Future[None] | None:
        """Register one order; the future resolves when its report is confirmed."""
        tid = order.task_id
        if (
            order.start_timeout_s is not None
            and (datetime.now(UTC) - order.claimed_at).total_seconds() > order.start_timeout_s
        ):
            # Recovery has dispatched the task again by now: this order is stale.
            if self._signals is not None:
                self._signals.stale_order.emit(order)
            return None
        current = self._pollers.get(tid)
        if current is not None:
            if current.attempt >= order.attempt:
                if self._signals is not None:
                    self._signals.duplicate_order.emit(order)
                rr = current.running_report
                if rr is not None and rr.done() and (rr.cancelled() or rr.exception() is not None):
                    # Its "running" was never confirmed: say it again.
                    rr = current.running_report = self._report(current.order, "running", confirm=True)
                return rr
            log.info(
                "task %s: attempt %d replaces attempt %d",
                tid,
                order.attempt,
                current.attempt,
                extra=task_fields(tid, order.root_task_id, order.attempt, self.runner_id),
            )
            self._stop_poller(current)
        elif self._ended.get(tid, 0) >= order.attempt:
            if self._signals is not None:
                self._signals.duplicate_order.emit(order)
            return None
        try:
            handler = self._registry.get(order.handler)
            url = handler.url(order.url_template, order.payload)
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise HandlerError(f"{redact_url(url)!r} is not an http(s) URL")
            if not self._allowed(parsed):
                # A payload must not make a runner call a host of its choosing (SSRF).
                raise HandlerError(
                    f"host {parsed.host!r} is not allowed (the providers' hosts and TASKMGR_ALLOWED_HOSTS)"
                )
        except UnknownHandler as exc:
            # Not the task's fault: this runner is older or newer than the task type (a
            # rolling upgrade). Handed back as a rejection, it goes to another runner
            # after a backoff, and no failure is counted.
            reason = f"runner {self.runner_id} has no handler {order.handler!r}: {exc}"
            return self._report(order, "rejected", {"reason": reason, "kind": "handler"}, confirm=True)
        except Exception as exc:  # HandlerError or a handler's bug: the task cannot run
            detail = {"reason": f"cannot build the URL: {exc}", "kind": "url"}
            return self._report(order, "failed", detail, confirm=True)
        if len(self._pollers) >= self.settings.concurrency:
            reason = f"runner {self.runner_id} is at capacity ({self.settings.concurrency} tasks)"
            return self._report(order, "rejected", {"reason": reason}, confirm=True)
        assert self._deps is not None
        poller = Poller(order=order, handler=handler, url=url, deps=self._deps)
        self._pollers[tid] = poller
        metrics.ACTIVE_POLLERS.inc()
        # Queued before the poller's first tick can report anything: reports keep order.
        poller.running_report = self._report(order, "running", {"url": redact_url(url)}, confirm=True)
        poller.task = asyncio.create_task(self._run_poller(poller), name=f"poll-{tid}-{order.attempt}")
        if self._signals is not None:
            self._signals.poller_started.emit(poller)
        return poller.running_report

    async def _run_poller(self, poller: Poller) -> None:
        try:
            await poller.run()
        finally:
            if self._pollers.get(poller.order.task_id) is poller:
                self._remove(poller)

    def _remove(self, poller: Poller) -> None:
        tid = poller.order.task_id
        if self._pollers.get(tid) is poller:
            del self._pollers[tid]
            metrics.ACTIVE_POLLERS.dec()
            if self._signals is not None:
                self._signals.poller_ended.emit(poller)
        self._remember_ended(tid, poller.attempt)

    def _remember_ended(self, task_id: uuid.UUID, attempt: int) -> None:
        self._ended[task_id] = max(attempt, self._ended.get(task_id, 0))
        self._ended.move_to_end(task_id)
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _stop_poller(self, poller: Poller) -> None:
        """At once and silently (no more reports for it)."""
        self._remove(poller)
        if poller.task is not None:
            poller.task.cancel()

    # -- control -----------------------------------------------------------------------

    async def _on_control(self, message: broker.Message) -> None:
        try:
            try:
                stop = decode_control(message.body)
            except BadMessage as exc:
                log.warning("runner %s: dead-lettering a control message: %s", self.runner_id, exc)
                await self._dead_letter(message, str(exc))
                return
            if isinstance(stop, TypeChange):
                self._retune(stop)
                await _settle(message.ack())
                return
            poller = self._pollers.get(stop.task_id)
            if poller is not None and poller.attempt <= stop.attempt:
                log.info(
                    "task %s attempt %d: stopped (%s)",
                    stop.task_id,
                    poller.attempt,
                    stop.reason,
                    extra=task_fields(
                        stop.task_id, poller.order.root_task_id, poller.attempt, self.runner_id
                    ),
                )
                self._stop_poller(poller)
                if self._signals is not None:
                    self._signals.stopped.emit(poller)
            else:
                # A stop that overtook its start: do not start that attempt later.
                self._remember_ended(stop.task_id, stop.attempt)
            await _settle(message.ack())
            if self._signals is not None:
                self._signals.stop_handled.emit(stop)
        except Exception as exc:
            log.exception("runner %s: control message", self.runner_id)
            await self._dead_letter(message, f"runner error: {exc!r}")

    def _retune(self, change: TypeChange) -> None:
        """A task type changed: its running pollers take the new values at their next tick."""
        pollers = [p for p in self._pollers.values() if p.order.type == change.name]
        for p in pollers:
            p.retune(change)
        if pollers:
            log.info(
                "runner %s: %d pollers of %s take its new values", self.runner_id, len(pollers), change.name
            )
        if self._signals is not None:
            self._signals.retuned.emit(change)

    async def _dead_letter(self, message: broker.Message, reason: str) -> None:
        assert self._publisher is not None
        try:
            await self._publisher.dead_letter(
                message.body,
                reason,
                headers={
                    "x-taskmgr-routing-key": message.routing_key or "",
                    "x-taskmgr-runner": self.runner_id,
                },
            )
        except BrokerError as exc:
            log.error("runner %s: dead-lettering failed (%s); rejecting instead", self.runner_id, exc)
            await _settle(message.reject(requeue=False))  # the queue's own DLX takes it
            return
        await _settle(message.ack())
        if self._signals is not None:
            self._signals.dead_lettered.emit(reason)

    # -- reports, heartbeats, prefetch -------------------------------------------------

    def _report(
        self,
        order: StartOrder,
        status: ReportStatus,
        detail: dict[str, Any] | None = None,
        *,
        confirm: bool = False,
        follow_ons: list[FollowOnOrder] | None = None,
        sync: SyncOrder | None = None,
    ) -> asyncio.Future[None] | None:
        assert self._reports is not None
        report = Report(
            task_id=order.task_id,
            attempt=order.attempt,
            status=status,
            at=datetime.now(UTC),
            detail=detail or {},
            follow_ons=follow_ons or [],
            sync=sync,
        )
        return self._reports.add(report, confirm=confirm)

    def _poller_report(
        self,
        order: StartOrder,
        status: ReportStatus,
        detail: dict[str, Any],
        *,
        follow_ons: list[FollowOnOrder] | None = None,
        sync: SyncOrder | None = None,
    ) -> None:
        self._report(order, status, detail, follow_ons=follow_ons, sync=sync)

    async def _heartbeat_loop(self) -> None:
        """A heartbeat every interval, whether or not the broker confirmed the one before:
        waiting for that confirm held the next heartbeat back by as long as the confirm
        took (up to the publish timeout), while the heartbeat had long reached the manager."""
        pending: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []  # a bug in a heartbeat stops the runner loudly

        def settled(beat: asyncio.Task[None]) -> None:
            pending.discard(beat)
            if not beat.cancelled() and beat.exception() is not None:
                failed.append(beat.exception())  # type: ignore[arg-type]

        try:
            while True:
                if failed:
                    raise failed[0]
                if len(pending) < MAX_UNCONFIRMED_HEARTBEATS:
                    beat = asyncio.create_task(self._send_heartbeat())
                    pending.add(beat)
                    beat.add_done_callback(settled)
                await self._adjust_prefetch()
                await asyncio.sleep(self.settings.heartbeat_interval)
        finally:
            for beat in pending:
                beat.cancel()

    async def _send_heartbeat(self, *, stopping: bool = False) -> None:
        assert self._beats is not None
        beat = Heartbeat(
            runner_id=self.runner_id,
            pool=self.settings.pool,
            host=socket.gethostname(),
            pid=os.getpid(),
            at=datetime.now(UTC),
            tasks=[(tid, p.attempt) for tid, p in self._pollers.items()],
            stopping=stopping,
        )
        try:
            await self._beats.publish_progress(encode(beat), {HEARTBEAT_HEADER: self.runner_id})
        except BrokerError as exc:  # the connection reconnects by itself
            log.warning("runner %s: heartbeat not sent: %s", self.runner_id, exc)
            return
        if self._signals is not None:
            self._signals.heartbeat_sent.emit(beat)

    async def _adjust_prefetch(self) -> None:
        """Unacked start messages follow free capacity, so a full runner does not hoard
        orders that another runner could start now; and the start consumer's priority
        follows it too (in PRIORITY_LEVELS steps), so that RabbitMQ gives new orders to
        the runners with the most room first, round-robin only among equals (a loaded
        runner with room left took its share of every dispatch before)."""
        assert self._consumer is not None
        if self._adjusting.locked():
            return  # the change in progress, or the next beat, sees the room as it is then
        async with self._adjusting:
            free = max(0, self.settings.concurrency - len(self._pollers))
            want = max(1, min(self.settings.prefetch_messages, free // self.settings.orders_per_message))
            priority = free * PRIORITY_LEVELS // self.settings.concurrency
            try:
                if want != self._prefetch and not self._stopping:
                    await self._consumer.set_prefetch(want, channel_wide=True)
                    self._prefetch = want
                    if self._signals is not None:
                        self._signals.prefetch_set.emit(want)
                if priority != self._priority and not self._stopping:
                    await self._consumer.set_start_priority(priority)
                    self._priority = priority
            except Exception as exc:  # a reconnecting channel: try on the next beat
                log.warning("runner %s: prefetch %d, priority %d: %r", self.runner_id, want, priority, exc)


def _ignore(_poller: Poller) -> None:
    """A tick without signals to emit."""


async def _settle(op: Any) -> None:
    """Ack/nack/reject, tolerating a channel that was replaced meanwhile (the broker
    then redelivers the message, and a duplicate start changes nothing)."""
    try:
        await op
    except Exception as exc:
        log.warning("could not settle a message: %r", exc)


async def run_runner(settings: Settings, stop: asyncio.Event) -> None:
    """The `taskmgr runner` command: run one TaskRunner until `stop` is set. A runner
    talks only to RabbitMQ and the APIs: it never opens a database connection (its
    follow-ons travel in its reports; the start order carries its type's settings)."""
    from prometheus_client import start_http_server

    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    # Ten thousand pollers make a large, long-lived heap that every full collection
    # scans, stalling all ticks: collect less often, and keep the objects of start-up
    # (which never die) out of the scans.
    gc.freeze()
    gc.set_threshold(*RUNNER_GC_THRESHOLDS)
    async with TaskRunner(settings=settings, registry=Registry.default()) as runner:
        log.info("runner %s: pool %s, up to %d tasks", runner.runner_id, settings.pool, settings.concurrency)
        await runner.run(stop)
