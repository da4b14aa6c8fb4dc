"""Progress intake: runner reports, heartbeats and outside services' reports become
state events, many messages per transaction.

Fencing: every report names its attempt. A report for an attempt that is no longer the
task's current one (the task was dispatched again since) is recorded with applied=false
and changes nothing, and its runner is told to stop that task.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from manager import metrics
from taskmgr import db, store
from taskmgr.backoff import backoff_s
from taskmgr.broker import BrokerError, Message, Publisher, ack_all, requeue_all
from taskmgr.errors import InvalidInput, TaskTypeNotFound
from taskmgr.messages import (
    BadMessage,
    Heartbeat,
    Report,
    RunnerReports,
    ServiceReport,
    Stop,
    decode_progress,
    encode,
)
from taskmgr.models import ACTIVE, EXPIRED, CurrentState, State, StateChanges, TaskType, Transition
from taskmgr.service import TaskService, utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

RUNNER_SERVICE = "runner"  # the runner's own result, kept beside the outside services'


# A rejected start order (the runner was full) is due again after 0.5-1 s, doubling per
# rejection up to 15-30 s.
REJECT_BACKOFF_BASE_S = 1.0
REJECT_BACKOFF_MAX_S = 30.0
# A stop for a (runner, task, attempt) is sent again after this at the soonest, however
# many heartbeats or stale reports ask for it meanwhile.
STOP_RESEND_S = 30.0
STOPS_REMEMBERED = 100_000


@dataclass
class IntakeCounts:
    messages: int = 0
    reports: int = 0
    heartbeats: int = 0
    service_reports: int = 0
    applied: int = 0
    stale: int = 0
    dead_lettered: int = 0
    rejected: int = 0  # from a sender not allowed to send that kind (dead-lettered too)
    stops: int = 0
    lost: int = 0


@dataclass
class _Batch:
    """The working state of one transaction. `changes` judges and folds each state
    change as it is added (models.StateChanges), so later reports in the batch see
    the earlier ones; the store writes them at the end, as they are."""

    changes: StateChanges
    types: dict[str, TaskType]
    stops: list[tuple[str, Stop]] = field(default_factory=list)
    unknown: list[tuple[bytes, str]] = field(default_factory=list)

    @property
    def now(self) -> datetime:
        return self.changes.now

    @property
    def cur(self) -> dict[uuid.UUID, CurrentState]:
        """Each locked task's state, as the batch's changes so far leave it."""
        return self.changes.rows

    def add(self, t: Transition) -> None:
        self.changes.add(t)


class ProgressIntake:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: Publisher,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
        service: TaskService | None = None,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._settings = settings
        self._clock = clock
        self._senders = settings.senders()
        # Writes the follow-on tasks and schedule syncs that runners' reports carry.
        self._service = service or TaskService(engine=engine, clock=clock)
        # Tasks a runner's heartbeat no longer listed, and since when: declared lost
        # only when still missing two heartbeats later (a final report may be in flight).
        self._missing: dict[uuid.UUID, datetime] = {}
        # Stops sent lately, (runner, task, attempt) -> when: not sent again before
        # STOP_RESEND_S (see _fresh_stops).
        self._stops_sent: dict[tuple[str, uuid.UUID, int], datetime] = {}

    async def handle_messages(self, messages: Sequence[Message]) -> IntakeCounts:
        """Decode, apply in one transaction, then ack. A message that cannot be parsed
        goes to the dead-letter exchange with the reason. If the transaction fails for
        the data (not for a lost connection), the batch is split in halves until the
        message that fails is alone: it is dead-lettered with the reason and the rest is
        applied once, so one poison message never stalls the queue. If the database or
        the connection fails, the batch is requeued whole (applying a report twice
        changes nothing)."""
        counts = IntakeCounts(messages=len(messages))
        decoded: list[tuple[Message, RunnerReports | Heartbeat | ServiceReport]] = []
        settled: set[int] = set()  # rejected already: not in the batch's ack
        for m in messages:
            try:
                msg = decode_progress(m.body)
            except BadMessage as exc:
                if await self._dead_letter_or_reject(m, str(exc), counts):
                    settled.add(id(m))
                continue
            refused = self._refused_sender(m, msg)
            if refused:
                if await self._dead_letter_or_reject(m, refused, counts):
                    settled.add(id(m))
                counts.rejected += 1
                metrics.PROGRESS_REJECTED.labels(msg.kind).inc()
                continue
            decoded.append((m, msg))
        unsettled = [m for m in messages if id(m) not in settled]
        try:
            await self._apply_isolating(decoded, counts)
        except Exception:
            log.exception("progress batch failed; requeueing %d messages", len(unsettled))
            await requeue_all(unsettled)
            raise
        await ack_all(unsettled)
        return counts

    async def _dead_letter_or_reject(self, m: Message, reason: str, counts: IntakeCounts) -> bool:
        """Dead-letter a message with the reason. If that publish fails (a memory alarm
        blocks the publisher past its timeout, its connection is down), reject it
        instead: the progress queue's own dead-letter exchange takes it, without the
        reason. Raising here would leave the whole batch unsettled, to be swept away
        unapplied by the next batch's `multiple` ack. True when rejected (settled)."""
        try:
            await self._dead_letter(m.body, reason, counts)
            return False
        except BrokerError as exc:
            log.error("progress message not dead-lettered (%s); rejecting it instead: %s", exc, reason)
        try:
            await m.reject(requeue=False)
        except Exception as exc:  # a replaced channel: the broker redelivers it
            log.warning("could not reject a progress message: %r", exc)
        counts.dead_lettered += 1
        metrics.DEAD_LETTERED.inc()
        return True

    def _refused_sender(self, m: Message, msg: RunnerReports | Heartbeat | ServiceReport) -> str | None:
        """Why this message's sender may not send it, or None. The sender is the
        message's user_id, which RabbitMQ checks against the connection's user: runner
        reports and heartbeats come from runner users, service reports from service
        users, and a message without a user_id is not trusted."""
        allowed = self._senders[msg.kind]
        if m.user_id in allowed:
            return None
        log.warning("progress message refused: %s from user %r", msg.kind, m.user_id)
        return f"sender {m.user_id!r} may not send {msg.kind} messages"

    async def _apply_isolating(
        self, items: Sequence[tuple[Message, RunnerReports | Heartbeat | ServiceReport]], counts: IntakeCounts
    ) -> None:
        if not items:
            return
        part = IntakeCounts()
        try:
            batch = await self.apply([msg for _, msg in items], part)
        except Exception as exc:
            if db.is_transient(exc):
                raise
            if len(items) == 1:
                reason = f"cannot be applied: {db.root_reason(exc)}"
                log.error("progress message dead-lettered: %s", reason)
                await self._dead_letter(items[0][0].body, reason, counts)
                return
            half = len(items) // 2
            await self._apply_isolating(items[:half], counts)
            await self._apply_isolating(items[half:], counts)
            return
        for name, value in vars(part).items():
            setattr(counts, name, getattr(counts, name) + value)
        for body, reason in batch.unknown:
            await self._dead_letter(body, reason, counts)
        # All at once: during a memory alarm each publish waits out its timeout, and one
        # after the other they would hold the intake for that many times as long.
        sent = await asyncio.gather(
            *(self._publisher.publish_control(rid, encode(stop)) for rid, stop in batch.stops),
            return_exceptions=True,
        )
        for (_, stop), result in zip(batch.stops, sent, strict=True):
            if isinstance(result, BaseException):  # the next heartbeat asks again
                log.warning("stop for %s not sent: %s", stop.task_id, result)
            else:
                counts.stops += 1

    async def _dead_letter(self, body: bytes, reason: str, counts: IntakeCounts) -> None:
        await self._publisher.dead_letter(body, reason)
        counts.dead_lettered += 1
        metrics.DEAD_LETTERED.inc()
        log.warning("progress message dead-lettered: %s", reason)

    async def apply(
        self, msgs: Sequence[RunnerReports | Heartbeat | ServiceReport], counts: IntakeCounts | None = None
    ) -> _Batch:
        counts = counts or IntakeCounts()
        now = self._clock()
        ids: set[uuid.UUID] = set()
        for msg in msgs:
            if isinstance(msg, RunnerReports):
                ids.update(r.task_id for r in msg.reports)
            elif isinstance(msg, ServiceReport):
                ids.add(msg.task_id)
            # A heartbeat's tasks are only read (a runner may hold ten thousand): the
            # few it silently dropped are locked with the rest, below.
        heartbeats = [m for m in msgs if isinstance(m, Heartbeat)]
        dropped: dict[int, list[uuid.UUID]] = {}
        kinds: Counter[str] = Counter()
        async with self._engine.begin() as conn:
            # Locks in one order, the same as recovery's: the runners rows first (by id),
            # then the task_state rows (by id, all at once). A runner's return and its
            # being declared dead then never deadlock.
            for h in sorted(heartbeats, key=lambda h: h.runner_id):  # stable: a runner's beats in order
                await self._record_runner(conn, h, now)
            for h in heartbeats:
                dropped[id(h)] = await self._dropped(conn, h)
                ids.update(dropped[id(h)])
            locked = await store.lock_states(conn, ids)
            # The batch's task types, read once (follow-ons add theirs as they are read).
            types = await store.get_types(conn, {c.type for c in locked.values()}) if locked else {}
            batch = _Batch(changes=StateChanges(now, dict(locked), strict=False), types=types)
            for msg in msgs:
                if isinstance(msg, RunnerReports):
                    counts.reports += len(msg.reports)
                    kinds["reports"] += 1
                    for report in msg.reports:
                        await self._runner_report(conn, batch, msg, report)
                elif isinstance(msg, ServiceReport):
                    counts.service_reports += 1
                    kinds["service"] += 1
                    await self._service_report(conn, batch, msg)
                else:
                    counts.heartbeats += 1
                    kinds["heartbeat"] += 1
                    counts.lost += await self._heartbeat(conn, batch, msg, dropped[id(msg)])
            await store.write_changes(conn, batch.changes)
        recorded = batch.changes.recorded
        for kind, n in kinds.items():  # counted once applied (a batch split in halves runs again)
            metrics.PROGRESS.labels(kind).inc(n)
        counts.applied += sum(1 for t in recorded if t.applied)
        counts.stale += sum(1 for t in recorded if t.detail.get("stale"))
        batch.stops = self._fresh_stops(batch.stops, now)
        return batch

    def _fresh_stops(self, stops: list[tuple[str, Stop]], now: datetime) -> list[tuple[str, Stop]]:
        """The stops not sent within STOP_RESEND_S. A runner lists its every task in each
        heartbeat: one that still holds thousands of tasks dispatched again elsewhere
        (it was declared dead while busy, or its stops are slow to arrive) had a stop
        sent for each of them at every heartbeat, each publish waiting up to its timeout
        while the next heartbeats added thousands more (35,000 in 5 minutes on the
        cluster, the leader at 100% of a core and 2.6 GB). A stop that was lost goes
        again after STOP_RESEND_S."""
        since = now - timedelta(seconds=STOP_RESEND_S)
        if len(self._stops_sent) > STOPS_REMEMBERED:
            self._stops_sent = {k: at for k, at in self._stops_sent.items() if at >= since}
        fresh = []
        for rid, stop in stops:
            key = (rid, stop.task_id, stop.attempt)
            at = self._stops_sent.get(key)
            if at is None or at < since:
                self._stops_sent[key] = now
                fresh.append((rid, stop))
        return fresh

    # -- runner reports --------------------------------------------------------------

    async def _runner_report(self, conn: Any, batch: _Batch, msg: RunnerReports, r: Report) -> None:
        c = batch.cur.get(r.task_id)
        rid = msg.runner_id
        if c is None:
            one = RunnerReports(runner_id=rid, pool=msg.pool, reports=[r])
            batch.unknown.append((encode(one), f"report names an unknown task {r.task_id}"))
            return
        detail = {"report": r.status, "at": r.at.isoformat(), **r.detail}
        current = (
            r.attempt == c.attempt
            and c.state in ACTIVE
            and not (c.state is State.RUNNING and c.runner_id not in (None, rid))
        )
        if not current:
            batch.add(
                Transition(
                    r.task_id, c.state, r.attempt, "runner", rid, {**detail, "stale": True}, applied=False
                ),
            )
            if r.status in ("running", "progress", "poll_error"):
                batch.stops.append((rid, Stop(task_id=r.task_id, attempt=r.attempt, reason="stale attempt")))
            return
        tt = batch.types.get(c.type)
        if r.follow_ons or r.sync is not None:
            await self._follow_ons(conn, batch, c, r, rid)
        if r.status == "progress":
            pass  # it carried only follow-ons
        elif r.status == "running":
            if c.state is State.STARTED:
                batch.add(Transition(r.task_id, State.RUNNING, r.attempt, "runner", rid, detail))
        elif r.status == "poll_error":
            batch.add(Transition(r.task_id, c.state, r.attempt, "runner", rid, detail, applied=False))
        elif r.status == "finished":
            if tt is not None and tt.required_services:
                await store.upsert_service(
                    conn,
                    task_id=r.task_id,
                    service=RUNNER_SERVICE,
                    attempt=r.attempt,
                    state="FINISHED",
                    detail=r.detail,
                    now=batch.now,
                )
                batch.add(
                    Transition(
                        r.task_id,
                        c.state,
                        r.attempt,
                        "runner",
                        rid,
                        {**detail, "waiting_for": list(tt.required_services)},
                        applied=False,
                    ),
                )
                await self._derive(conn, batch, r.task_id, tt)
            else:
                batch.add(Transition(r.task_id, State.FINISHED, r.attempt, "runner", rid, detail))
        elif r.status == "failed" and r.detail.get("kind") == EXPIRED and tt is not None and tt.max_runtime_s:
            # Past its type's max_runtime_s: final, never retried (recovery ends it the
            # same way if the runner says nothing).
            final = {**detail, "reason": EXPIRED, "final": True}
            batch.add(
                Transition(r.task_id, State.FAILED, r.attempt, "runner", rid, final, count_failure=True)
            )
        elif r.status == "failed":
            self._fail(batch, c, r.attempt, "runner", rid, detail, tt)
        elif r.status == "rejected":
            # A full runner: due again after a growing delay, or a saturated pool would
            # churn a new attempt per excess task per second. Not a failure. The count of
            # attempts that did not fail (attempt - failures) grows with each rejection
            # and is kept in task_state, so it needs no memory of its own.
            delay = backoff_s(c.attempt - c.failures, REJECT_BACKOFF_BASE_S, REJECT_BACKOFF_MAX_S)
            run_at = batch.now + timedelta(seconds=delay)
            batch.add(
                Transition(
                    r.task_id,
                    State.RETRYING,
                    r.attempt,
                    "runner",
                    rid,
                    {**detail, "retry_at": run_at.isoformat()},
                    run_at=run_at,
                ),
            )
        else:  # handback: give it to another runner now, not a failure
            batch.add(
                Transition(r.task_id, State.RETRYING, r.attempt, "runner", rid, detail, run_at=batch.now),
            )

    async def _follow_ons(self, conn: Any, batch: _Batch, c: CurrentState, r: Report, rid: str) -> None:
        """Write what the handler asked for, in this transaction: the follow-on tasks
        (dedup keys scoped to the parent: a report delivered twice writes them once) and
        the schedule sync. A follow-on the task types refuse (a bad payload, an unknown
        type) is recorded on the parent and changes nothing (a savepoint undoes a sync
        half written); the report itself still applies."""
        parent = {"task_id": c.task_id, "root_task_id": c.root_id}
        created = 0
        try:
            async with conn.begin_nested():
                if r.follow_ons:
                    done = await self._service.schedule_follow_ons(
                        conn, parent, r.follow_ons, batch.now, types=batch.types
                    )
                    created += sum(1 for d in done if d.created)
                if r.sync is not None:
                    result = await self._service.sync_children(
                        conn, parent, r.sync.scope, r.sync.follow_ons, types=batch.types
                    )
                    created += result.created
        except (InvalidInput, TaskTypeNotFound) as exc:
            detail = {"report": r.status, "follow_ons_refused": str(exc)}
            batch.add(Transition(r.task_id, c.state, r.attempt, "runner", rid, detail, applied=False))
            log.warning("task %s: follow-ons refused: %s", r.task_id, exc)
            return
        metrics.FOLLOW_ONS_WRITTEN.inc(created)

    def _fail(
        self,
        batch: _Batch,
        c: CurrentState,
        attempt: int,
        source: str,
        rid: str | None,
        detail: dict[str, Any],
        tt: TaskType | None,
    ) -> None:
        failures = c.failures + 1
        max_attempts = tt.max_attempts if tt else 1
        if failures >= max_attempts:
            batch.add(
                Transition(
                    c.task_id,
                    State.FAILED,
                    attempt,
                    source,
                    rid,
                    {**detail, "failures": failures, "final": True},
                    count_failure=True,
                ),
            )
            return
        delay = backoff_s(failures, tt.backoff_base_s if tt else 1.0, tt.backoff_max_s if tt else 60.0)
        run_at = batch.now + timedelta(seconds=delay)
        batch.add(
            Transition(
                c.task_id,
                State.RETRYING,
                attempt,
                source,
                rid,
                {**detail, "failures": failures, "retry_at": run_at.isoformat()},
                run_at=run_at,
                count_failure=True,
            ),
        )

    # -- outside services ------------------------------------------------------------

    async def _service_report(self, conn: Any, batch: _Batch, s: ServiceReport) -> None:
        c = batch.cur.get(s.task_id)
        if c is None:
            batch.unknown.append((encode(s), f"service report names an unknown task {s.task_id}"))
            return
        attempt = s.attempt or c.attempt
        detail = {"service": s.service, "service_state": s.state, "at": s.at.isoformat(), **s.detail}
        source = f"service:{s.service}"
        if attempt != c.attempt or c.state.terminal:
            batch.add(
                Transition(
                    s.task_id, c.state, attempt, source, None, {**detail, "stale": True}, applied=False
                ),
            )
            return
        await store.upsert_service(
            conn,
            task_id=s.task_id,
            service=s.service,
            attempt=attempt,
            state=s.state,
            detail=s.detail,
            now=batch.now,
        )
        batch.add(Transition(s.task_id, c.state, attempt, source, None, detail, applied=False))
        tt = batch.types.get(c.type)
        if tt is not None and s.service in tt.required_services:
            await self._derive(conn, batch, s.task_id, tt)

    async def _derive(self, conn: Any, batch: _Batch, task_id: uuid.UUID, tt: TaskType) -> None:
        """The overall state from the runner's result and the required services' reports
        (for example, a photo service may fail while a caption service succeeds: the task
        FAILS, naming both)."""
        c = batch.cur[task_id]
        if c.state not in ACTIVE:
            return
        rows = {
            k: v for k, v in (await store.services_of(conn, task_id)).items() if v["attempt"] == c.attempt
        }
        runner = rows.get(RUNNER_SERVICE)
        if runner is None or runner["state"] != "FINISHED":
            return
        states = {name: rows[name]["state"] if name in rows else None for name in tt.required_services}
        failed = sorted(n for n, st in states.items() if st == "FAILED")
        finished = sorted(n for n, st in states.items() if st == "FINISHED")
        detail = {"services_failed": failed, "services_finished": finished}
        if failed:
            batch.add(Transition(task_id, State.FAILED, c.attempt, "manager", None, detail))
        elif len(finished) == len(tt.required_services):
            batch.add(Transition(task_id, State.FINISHED, c.attempt, "manager", None, detail))

    # -- heartbeats ------------------------------------------------------------------

    async def _record_runner(self, conn: Any, h: Heartbeat, now: datetime) -> None:
        await store.upsert_runner(
            conn,
            runner_id=h.runner_id,
            pool=h.pool,
            host=h.host,
            pid=h.pid,
            tasks=len(h.tasks),
            now=now,
        )
        if h.stopping:
            await store.stop_runner(conn, h.runner_id, now)

    async def _dropped(self, conn: Any, h: Heartbeat) -> list[uuid.UUID]:
        """Tasks we think the runner holds (RUNNING) that its heartbeats stopped listing
        two heartbeats apart (a final report may be in flight): read, not locked."""
        held = {t for t, _ in h.tasks}
        for tid in [t for t in self._missing if t in held]:  # listed again
            del self._missing[tid]
        out: list[uuid.UUID] = []
        grace = timedelta(seconds=2 * self._settings.heartbeat_interval)
        # Only what the heartbeat does not list comes back (not the runner's every task).
        for row in await store.runner_holdings(conn, h.runner_id, list(held)):
            tid = row["task_id"]
            if row["state"] != State.RUNNING or row["changed_at"] > h.at - grace:
                self._missing.pop(tid, None)
                continue
            since = self._missing.setdefault(tid, h.at)
            if h.at - since < grace:
                continue
            self._missing.pop(tid, None)
            out.append(tid)
        return out

    async def _heartbeat(self, conn: Any, batch: _Batch, h: Heartbeat, dropped: Sequence[uuid.UUID]) -> int:
        """Compare what the runner holds with what we think it holds (its runners row is
        recorded already): it is told to stop what is no longer its own; what it silently
        dropped (locked with the batch's other rows) is dispatched again."""
        # The tasks this batch locked are judged as the batch leaves them; the others (nearly
        # all) by the database, which returns only those that are not the runner's.
        unread = [(t, a) for t, a in h.tasks if t not in batch.cur]
        not_ours = await store.not_held_by(conn, h.runner_id, unread) if unread else []
        for task_id, attempt in h.tasks:
            c = batch.cur.get(task_id)
            if c is not None and not (
                c.attempt == attempt
                and (c.state == State.STARTED or (c.state == State.RUNNING and c.runner_id == h.runner_id))
            ):
                not_ours.append((task_id, attempt))
        for task_id, attempt in not_ours:
            batch.stops.append(
                (h.runner_id, Stop(task_id=task_id, attempt=attempt, reason="not this runner's attempt"))
            )
        lost = 0
        for tid in dropped:
            c = batch.cur.get(tid)
            if c is not None and c.state is State.RUNNING and c.runner_id == h.runner_id:
                batch.add(
                    Transition(
                        tid,
                        State.RETRYING,
                        c.attempt,
                        "manager",
                        None,
                        {"reason": f"runner {h.runner_id} no longer holds it"},
                        run_at=batch.now,
                    ),
                )
                metrics.RECOVERED.labels("dropped").inc()
                lost += 1
        return lost
