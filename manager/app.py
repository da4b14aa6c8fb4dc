"""The Task Manager process.

Several may run; the holder of the leadership lease (manager/leadership.py) leads: it
dispatches, takes progress and runs the periodic jobs, its own and those the parts
above the engine contribute (taskmgr/jobs.py: the sports part's daily schedule). The
others campaign every TASKMGR_LEADER_RETRY and take over within lease + retry + 3 s.
Claims stay exclusive even if two leaders overlapped (row locks with SKIP LOCKED), and
the fence refuses a former leader's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.ext.asyncio import AsyncEngine

from manager import metrics
from manager.dispatch import Dispatcher
from manager.intake import ProgressIntake
from manager.leadership import Elector, FencedEngine, manager_server_settings, within
from manager.lifecycle import LIFECYCLE_INTERVAL_S, LifecycleRelay
from manager.recovery import Recovery, Retention
from manager.signals import ManagerSignals
from manager.upkeep import Upkeep
from taskmgr import db, store
from taskmgr.broker import Consumer, Message, Publisher, Topology
from taskmgr.jobs import JobContext, LeaderJob, LeaderJobs
from taskmgr.messages import (
    HEARTBEAT_HEADER,
    BadMessage,
    Stop,
    TypeChange,
    decode_cancel,
    decode_type_change,
    encode,
)
from taskmgr.service import TaskService, utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

INTAKE_BATCH = 500
INTAKE_LINGER_S = 0.01
PROGRESS_PREFETCH = 2000
LOCK_CHECK_S = 1.0
# Stepping down waits this long for the leader's loops to unwind, then goes on without them.
STEP_DOWN_S = 2.0
# Runners' heartbeat arrival times kept before the ones older than the dead bound are dropped.
HEARD_MAX = 10_000


async def leader_present(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        return await store.leader_present(conn)


class TaskManager:
    def __init__(
        self,
        *,
        settings: Settings,
        engine: AsyncEngine,
        clock: Callable[[], datetime] = utcnow,
        name: str | None = None,
        jobs: LeaderJobs | None = None,
        signals: ManagerSignals | None = None,
    ) -> None:
        """jobs: the leader jobs of the parts above the engine (the daily schedule).
        signals: what the manager did, for tests to wait on (manager/signals.py); None
        in production, where it records nothing for them."""
        self.settings = settings
        self.engine = engine
        self.name = name or f"manager-{uuid.uuid4().hex[:8]}"
        self._clock = clock
        # With the events stream and the recorder's queue (declared with the rest).
        self.topology = Topology.from_settings(settings)
        self.elector = Elector(engine=engine, lease_s=settings.leader_lease)
        # The leader's components write through the fence: a write after the lease is
        # lost is refused (manager/leadership.py).
        fenced = FencedEngine(engine, self.elector)
        self.service = TaskService(engine=engine, clock=clock)
        self.publisher = Publisher(url=settings.amqp_url, topology=self.topology, name=self.name)
        self.dispatcher = Dispatcher(
            engine=fenced, publisher=self.publisher, service=self.service, settings=settings, clock=clock
        )
        self.intake = ProgressIntake(
            engine=fenced, publisher=self.publisher, settings=settings, clock=clock, service=self.service
        )
        self.recovery = Recovery(
            engine=fenced,
            settings=settings,
            clock=clock,
            send_stop=lambda stop, runner_id, pool: self._send_stop(stop, runner_id=runner_id, pool=pool),
            heard=lambda: self._heard,
        )
        self.upkeep = Upkeep(engine=fenced, settings=settings, clock=clock)
        self.retention = Retention.of_task_events(engine=fenced, settings=settings, clock=clock)
        self.event_retention = Retention.of_emitted_events(engine=fenced, settings=settings, clock=clock)
        self.lifecycle = LifecycleRelay(engine=fenced, url=settings.amqp_url, topology=self.topology)
        self.jobs: list[LeaderJob] = list(jobs(JobContext(self.service, fenced, clock))) if jobs else []
        self.is_leader = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        # runner id -> when its last heartbeat reached this leader (recovery's judge of
        # liveness: the intake may apply it much later, behind a backlog of reports).
        self._heard: dict[str, datetime] = {}
        self._heartbeat_senders = settings.senders()["heartbeat"]
        self._signals = signals

    async def __aenter__(self) -> TaskManager:
        await self.publisher.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.lifecycle.close()
        await self.publisher.__aexit__(*exc)

    # -- the process ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign for the leadership lease until `stop`; lead while it is held."""
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                if await self.elector.campaign():
                    # A connection of its own for LISTEN (wake-ups, cancels); its
                    # application name shows who leads in pg_stat_activity. Listening
                    # before leading: a cancel's NOTIFY before the LISTEN would be lost.
                    conn = await db.listen(
                        self.settings.database_url,
                        name=self.elector.name,
                        on_wakeup=self._wakeup.set,
                        on_cancel=self._on_cancel,
                        on_type_change=self._on_type_change,
                    )
                    await self._lead(conn, stop)
            except Exception as exc:
                # A lost lease, a PostgreSQL restart, the broker, or a failing loop ends
                # this term; the manager campaigns again, as a standby would. It never
                # exits on its own: only `stop` ends it.
                log.warning("leadership ended: %r; campaigning again", exc)
            finally:
                if self.is_leader.is_set():
                    self.is_leader.clear()
                    metrics.LEADER.set(0)
                    metrics.clear_leader_gauges()
                    with contextlib.suppress(Exception):  # a standby need not wait for the expiry
                        await within(self.elector.resign(), 2)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await within(conn.close(), 2)
            await _wait(stop, self.settings.leader_retry)

    async def _lead(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        """Lead until `stop`, or until a loop ends (a lost lease: the renewal loop raises),
        which raises its error. Stepping down is bounded: a loop that does not unwind
        within STEP_DOWN_S (a database call cancelled mid-query waits for the server's
        answer to the cancel) is left to finish on its own, and the term ends all the
        same, so this manager campaigns again and a standby can take over."""
        scheduler = self._scheduler()
        consumer = Consumer(
            url=self.settings.amqp_url, topology=self.topology, prefetch=PROGRESS_PREFETCH, name=self.name
        )
        tasks: list[asyncio.Task[Any]] = []
        try:
            await consumer.__aenter__()
            await consumer.consume_progress(self._receive)
            scheduler.start()
            # Leading from here: listening, consuming and scheduled (a cancel's
            # NOTIFY before the LISTEN would be lost).
            log.info("%s leads", self.name)
            self.is_leader.set()
            metrics.LEADER.set(1)
            stopper = asyncio.create_task(stop.wait())
            tasks = [
                stopper,
                asyncio.create_task(self._dispatch_loop(stop)),
                asyncio.create_task(self._intake_loop()),
                asyncio.create_task(self.elector.keep()),
                asyncio.create_task(self._watch_listener(conn)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            scheduler.shutdown(wait=False)
            for t in tasks:
                t.cancel()
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=STEP_DOWN_S)
                if stuck:
                    log.error(
                        "%d of the leader's loops did not stop within %.0f s; the term ends without them",
                        len(stuck),
                        STEP_DOWN_S,
                    )
            with contextlib.suppress(Exception):
                await within(consumer.__aexit__(None, None, None), STEP_DOWN_S)
            self._drop_inbox()

    async def _receive(self, message: Message) -> None:
        """A progress message reached the leader: a heartbeat's arrival is noted at once
        (by its header, from a runner user: RabbitMQ checks the user_id), then it joins
        the intake's queue."""
        runner_id = (message.headers or {}).get(HEARTBEAT_HEADER)
        if isinstance(runner_id, str) and message.user_id in self._heartbeat_senders:
            now = self._clock()
            self._heard[runner_id] = now
            if len(self._heard) > HEARD_MAX:  # runners gone long ago
                cutoff = now - timedelta(seconds=self.settings.runner_dead_after)
                self._heard = {r: at for r, at in self._heard.items() if at >= cutoff}
        await self._inbox.put(message)

    def _drop_inbox(self) -> None:
        # Unacked messages return to the queue when the consumer's channel closes.
        while not self._inbox.empty():
            self._inbox.get_nowait()

    async def _watch_listener(self, conn: asyncpg.Connection) -> None:
        """Return (ending the leadership) as soon as the LISTEN connection fails: a
        missed cancel or wake-up must not go unnoticed."""
        while True:
            await asyncio.sleep(LOCK_CHECK_S)
            await within(db.ping(conn, LOCK_CHECK_S * 2), LOCK_CHECK_S * 2)

    def _scheduler(self) -> AsyncIOScheduler:
        s = AsyncIOScheduler(timezone="UTC")
        every = {"max_instances": 1, "coalesce": True, "misfire_grace_time": 30}
        s.add_job(
            self._job(self.recovery.run_once), "interval", seconds=self.settings.recovery_interval, **every
        )
        s.add_job(
            self._job(self.dispatcher.relay_once),
            "interval",
            seconds=self.settings.recovery_interval,
            **every,
        )
        s.add_job(self._job(self.retention.run_once), "cron", hour=3, minute=17, **every)
        s.add_job(self._job(self.event_retention.run_once), "cron", hour=3, minute=27, **every)
        s.add_job(self._job(self.upkeep.prune_once), "cron", hour=3, minute=37, **every)
        s.add_job(self._job(self.lifecycle.run_once), "interval", seconds=LIFECYCLE_INTERVAL_S, **every)
        s.add_job(
            self._job(self.upkeep.refresh_gauges), "interval", seconds=15, next_run_time=utcnow(), **every
        )
        gauges_every = metrics.GAUGES_INTERVAL_S
        s.add_job(self._job(self.measure), "interval", seconds=gauges_every, next_run_time=utcnow(), **every)
        for job in self.jobs:
            when: dict[str, Any] = {"next_run_time": utcnow()} if job.at_start else {}
            if job.cron is not None:
                trigger: Any = CronTrigger.from_crontab(job.cron, timezone=job.timezone)
                s.add_job(self._job(job.run), trigger, name=job.name, **when, **every)
            else:
                s.add_job(self._job(job.run), "interval", seconds=job.every_s, name=job.name, **when, **every)
        return s

    def _job(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        async def job() -> None:
            try:
                await fn()
            except Exception:
                log.exception("periodic job %s failed (it runs again on schedule)", fn.__qualname__)

        return job

    async def measure(self) -> None:
        """The leader's readings that alerts need (docs/observability/alerts.yml): live
        runners per pool, the lifecycle outbox's age, the dead-letter queue's depth.
        Each is an index probe or a broker round trip, never a scan of the history."""
        await self.recovery.measure_runners()
        await self.lifecycle.measure()
        dead = self.topology.dead
        metrics.DEAD_LETTERS.labels(dead).set(await self.publisher.queue_depth(dead))

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        """Poll every TASKMGR_POLL_INTERVAL at most; sooner when the next waiting task
        falls due, and at once on a wake-up (a task scheduled due now, NOTIFY'd at its
        commit). So start precision does not depend on the poll interval."""
        while not stop.is_set():
            self._wakeup.clear()
            wait = self.settings.poll_interval
            try:
                c = await self.dispatcher.poll_once()
                if self._signals is not None:
                    self._signals.dispatch_polled.emit(c)
                nxt = self.dispatcher.seconds_to_next_due()
                if nxt is not None:
                    wait = min(wait, nxt)
            except Exception:
                log.exception("dispatch failed; trying again next poll")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()

    async def _intake_loop(self) -> None:
        while True:
            first = await self._inbox.get()
            batch = [first]
            deadline = asyncio.get_running_loop().time() + INTAKE_LINGER_S
            while len(batch) < INTAKE_BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    try:
                        async with asyncio.timeout(left):
                            batch.append(await self._inbox.get())
                    except TimeoutError:
                        break
            try:
                counts = await self.intake.handle_messages(batch)
            except Exception:
                await asyncio.sleep(0.5)  # logged and requeued by handle_messages
            else:
                if self._signals is not None:
                    self._signals.intake_handled.emit(counts)

    def _on_cancel(self, payload: str) -> None:
        """A STARTED or RUNNING task was cancelled: stop it on its runner, or, when no
        runner is known yet (STARTED), on every runner of its pool, which remembers the
        stop and never starts that attempt when its order arrives."""
        try:
            notice = decode_cancel(payload)
        except BadMessage as exc:  # not from TaskService.cancel: nothing to stop
            log.error("cancel notice ignored: %s", exc)
            return
        stop = Stop(task_id=notice.task_id, attempt=notice.attempt, reason="cancelled")
        if notice.runner_id:
            asyncio.get_running_loop().create_task(self._send_stop(stop, runner_id=notice.runner_id))
        elif notice.pool:
            asyncio.get_running_loop().create_task(self._send_stop(stop, pool=notice.pool))

    def _on_type_change(self, payload: str) -> None:
        """A task type changed (TaskService.update_type's NOTIFY): broadcast its new values
        to every runner, whose pollers of that type take them at their next tick. Only the
        manager sends control messages (runners hold no database credentials, and no one
        else may write to the control exchange)."""
        try:
            change = decode_type_change(payload)
        except BadMessage as exc:
            log.error("type change ignored: %s", exc)
            return
        asyncio.get_running_loop().create_task(self._broadcast(change))

    async def _broadcast(self, change: TypeChange) -> None:
        try:
            await self.publisher.publish_control_all(encode(change))
        except Exception as exc:  # pollers take the new values at their next dispatch
            log.warning("type change of %s not broadcast: %s", change.name, exc)
            return
        if self._signals is not None:
            self._signals.type_broadcast.emit(change)

    async def _send_stop(self, stop: Stop, *, runner_id: str | None = None, pool: str | None = None) -> None:
        try:
            if runner_id is not None:
                await self.publisher.publish_control(runner_id, encode(stop))
            elif pool is not None:
                await self.publisher.publish_control_pool(pool, encode(stop))
        except Exception as exc:  # a stale RUNNING report or the next heartbeat gets the stop instead
            log.warning("stop for %s not sent now: %s", stop.task_id, exc)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def run_manager(settings: Settings, stop: asyncio.Event, *, jobs: LeaderJobs | None = None) -> None:
    engine = db.make_engine(
        settings.database_url, name="taskmgr-manager", server_settings=manager_server_settings()
    )
    try:
        async with TaskManager(settings=settings, engine=engine, jobs=jobs) as manager:
            await manager.run(stop)
    finally:
        await engine.dispose()
