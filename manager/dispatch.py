"""Discovery and dispatch: claim due tasks in batches and send their start orders.

Claiming and the outbox are one thing here: a claim writes STARTED into task_state (and
its event) with sent_at = null, committed in one transaction; the start orders are then
published with confirms and marked sent. A crash before the commit claims nothing; a
crash after it leaves the orders in the outbox (STARTED, sent_at null), which the relay
publishes again. A publish may therefore be repeated, never lost: runners drop a start
order for an attempt they already run.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from manager import metrics
from taskmgr import recurrence as recur
from taskmgr import store
from taskmgr.broker import Publisher
from taskmgr.messages import StartOrder
from taskmgr.models import CurrentState, MisfirePolicy, State, Transition
from taskmgr.service import TaskService, utcnow
from taskmgr.settings import Settings

log = logging.getLogger(__name__)

# An unsent order younger than this belongs to a dispatch in progress; older ones were
# left by a crash or a failed publish and the relay sends them.
RELAY_AFTER_S = 3.0
# Start orders are packed several to an AMQP message up to this many bytes of JSON (and
# TASKMGR_ORDERS_PER_MESSAGE orders): payloads may be up to 64 KiB each.
MAX_START_MESSAGE_BYTES = 256 * 1024
# task_types.start_timeout_s's default, for an order that does not carry its own.
DEFAULT_START_TIMEOUT_S = 30.0


@dataclass
class DispatchCounts:
    claimed: int = 0
    published: int = 0
    publish_failed: int = 0
    skipped: int = 0  # misfired occurrences cancelled by the skip policy
    next_occurrences: int = 0
    late: int = 0
    relayed: int = 0
    bad_rules: int = 0  # recurring tasks failed because their rule cannot be evaluated


class Dispatcher:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: Publisher,
        service: TaskService,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._service = service
        self._settings = settings
        self._clock = clock
        self._in_flight: set[uuid.UUID] = set()  # claimed here, not yet marked sent: not the relay's
        self._next_at: datetime | None = None  # the earliest waiting task, as the last poll saw it
        self._latest: tuple[float, uuid.UUID, uuid.UUID, int] | None = None  # this poll's latest start

    async def poll_once(self) -> DispatchCounts:
        """Claim and send everything due now, batch after batch. (The outbox's relay is a
        periodic job of its own: it only resends orders older than RELAY_AFTER_S.)

        The first claim is small (TASKMGR_DISPATCH_FIRST_BATCH), so the first orders leave
        soon after their due time; each next claim doubles, up to TASKMGR_DISPATCH_BATCH.
        A batch's publish (confirms, then marked sent) overlaps the next batch's claim, and
        at most one publish is in flight: the next waits for it before it starts."""
        counts = DispatchCounts()
        self._latest = None
        size = min(self._settings.dispatch_first_batch, self._settings.dispatch_batch)
        sending: asyncio.Task[None] | None = None
        try:
            while True:
                orders, full = await self._claim_batch(counts, size)
                # Claimed and committed, these wait unsent for the publish before them:
                # the relay leaves them alone from now on (they would go out twice).
                self._in_flight |= {o.task_id for _, o in orders}
                try:
                    if sending is not None:
                        task, sending = sending, None
                        await task
                finally:
                    if orders:  # sent even if the publish before failed
                        sending = asyncio.create_task(self._send(orders, counts))
                if not full:
                    break
                size = min(2 * size, self._settings.dispatch_batch)
        finally:
            if sending is not None:
                # A claim failed or the poll was cancelled: the batch in flight still
                # finishes (its orders are committed; unsent, they would wait for the relay).
                await asyncio.shield(sending)
        if self._latest is not None:
            # One line per poll, not one per task: a burst of ten thousand late tasks must
            # not flood the log (a blocked stderr would stall the whole event loop). Each
            # task's lateness is in its STARTED event and in the histogram.
            late_s, task_id, root_id, attempt = self._latest
            log.warning(
                "%d tasks started more than %.0f s after they were due; the latest %.1f s",
                counts.late,
                self._settings.lateness_alert,
                late_s,
                extra={"task_id": str(task_id), "root_task_id": str(root_id), "attempt": attempt},
            )
        return counts

    async def _claim_batch(
        self, counts: DispatchCounts, limit: int
    ) -> tuple[list[tuple[str, StartOrder]], bool]:
        """One transaction: up to `limit` due one-off tasks in one statement
        (store.start_due); when that leaves room in the batch, one probe for the next due
        time and for due recurring tasks, which only then are claimed with what is left of
        the batch. Returns the orders and whether the batch was full (more may be due)."""
        now = self._clock()
        async with self._engine.begin() as conn:
            started = await store.start_due(conn, now, limit)
            orders = [(r["pool"], _order(r, r["attempt"], now)) for r in started]
            for r in started:
                self._observe_lateness(
                    r["task_id"], r["root_id"], r["attempt"], float(r["lateness_ms"]) / 1000, counts
                )
            left = limit - len(started)
            more: list[tuple[str, StartOrder]] = []
            n = 0
            if left:
                next_at, recurring_due = await store.due_probe(conn, now)
                if recurring_due:
                    more, n, next_occurrence = await self._claim_recurring(conn, now, left, counts)
                    if next_occurrence is not None and (next_at is None or next_occurrence < next_at):
                        next_at = next_occurrence
                self._next_at = next_at
        counts.claimed += len(started)
        metrics.CLAIMED.inc(len(started))
        return orders + more, len(started) + n >= limit

    def _observe_lateness(
        self, task_id: uuid.UUID, root_id: uuid.UUID, attempt: int, late_s: float, counts: DispatchCounts
    ) -> None:
        metrics.LATENESS.observe(max(late_s, 0.0))
        if late_s > self._settings.lateness_alert:
            counts.late += 1
            metrics.LATE.inc()
            if self._latest is None or late_s > self._latest[0]:
                self._latest = (late_s, task_id, root_id, attempt)

    async def _claim_recurring(
        self, conn: Any, now: datetime, limit: int, counts: DispatchCounts
    ) -> tuple[list[tuple[str, StartOrder]], int, datetime | None]:
        """Due tasks the one-statement claim left (recurring ones): each gets its own
        decision (start, or cancel a misfire) and its next occurrence, through
        store.apply_transitions. Returns the orders, the rows claimed and the earliest
        next occurrence written."""
        rows = await store.claim_due(conn, now, limit)
        if not rows:
            return [], 0, None
        current: dict[uuid.UUID, CurrentState] = {}
        transitions: list[Transition] = []
        orders: list[tuple[str, StartOrder]] = []
        next_rows: list[dict[str, Any]] = []
        for r in rows:
            tid = r["task_id"]
            state = State(r["state"])
            current[tid] = CurrentState(
                tid,
                state,
                r["attempt"],
                r["failures"],
                r["runner_id"],
                r["run_at"],
                r["type"],
                r["root_id"],
                r["started_at"],
            )
            # Lateness counts from when the task could first have started: a task
            # scheduled with a due time already past is late only from its creation.
            late_s = (now - max(r["run_at"], r["created_at"])).total_seconds()
            policy = MisfirePolicy(r["misfire_policy"])
            try:
                rule = recur.parse(r["recurrence"]) if r["recurrence"] else None
                nxt = (
                    recur.next_occurrence(
                        rule, occurrence=r["occurrence"], due_at=r["due_at"], now=now, policy=policy
                    )
                    if rule is not None and state is State.SCHEDULED
                    else None
                )
            except Exception as exc:  # a rule no clock can keep fails its own task, not the batch
                transitions.append(
                    Transition(
                        tid,
                        State.FAILED,
                        r["attempt"],
                        "manager",
                        detail={"reason": f"recurrence rule cannot be evaluated: {exc}", "final": True},
                    )
                )
                counts.bad_rules += 1
                metrics.BAD_RULES.inc()
                log.error("task %s: recurrence rule failed: %s", tid, exc, extra={"task_id": str(tid)})
                continue
            if rule is not None and state is State.SCHEDULED:
                if nxt is not None:
                    next_rows.append(recur.next_occurrence_row(r, nxt))
                behind_s = (now - r["run_at"]).total_seconds()  # the slot missed, by the rule
                if policy is MisfirePolicy.SKIP and behind_s > r["misfire_grace_s"]:
                    transitions.append(
                        Transition(
                            tid,
                            State.CANCELLED,
                            r["attempt"],
                            "manager",
                            detail={"reason": "misfired", "late_s": round(behind_s, 3)},
                        )
                    )
                    counts.skipped += 1
                    continue
            attempt = r["attempt"] + 1
            transitions.append(
                Transition(
                    tid, State.STARTED, attempt, "manager", detail={"lateness_ms": round(late_s * 1000)}
                )
            )
            self._observe_lateness(tid, r["root_id"], attempt, late_s, counts)
            orders.append((r["pool"], _order(r, attempt, now)))
        await store.apply_transitions(conn, transitions, now, current=current)
        if next_rows:
            await self._service.write_rows(conn, next_rows, now)
        counts.claimed += len(orders)
        counts.next_occurrences += len(next_rows)
        metrics.CLAIMED.inc(len(orders))
        return orders, len(rows), min((row["due_at"] for row in next_rows), default=None)

    async def _send(self, orders: Sequence[tuple[str, StartOrder]], counts: DispatchCounts) -> None:
        # In _in_flight since their claim (poll_once): the relay leaves them alone until
        # they are marked sent, however long the confirms take (a slow broker).
        ids = {o.task_id for _, o in orders}
        try:
            sent = await self._publish(orders)
            counts.published += len(sent)
            counts.publish_failed += len(orders) - len(sent)
            if sent:
                async with self._engine.begin() as conn:
                    await store.mark_sent(conn, sent, self._clock())
        finally:
            self._in_flight -= ids

    async def _publish(self, orders: Sequence[tuple[str, StartOrder]]) -> list[tuple[uuid.UUID, int]]:
        """Publish orders grouped by pool, several per message (at most
        TASKMGR_ORDERS_PER_MESSAGE and MAX_START_MESSAGE_BYTES; an order larger than that
        goes alone), all confirms in flight together. Returns the (task, attempt) pairs
        the broker confirmed."""
        by_pool: dict[str, list[StartOrder]] = defaultdict(list)
        for pool, order in orders:
            by_pool[pool].append(order)
        now = self._clock()
        sent_at = now.isoformat().encode()
        batches: list[tuple[str, list[StartOrder], bytes]] = []
        for pool, group in by_pool.items():
            for chunk, parts in _chunks(group, self._settings.orders_per_message, MAX_START_MESSAGE_BYTES):
                # The StartBatch JSON, put together from each order's own encoding (each
                # order is encoded once, which is what sizing the messages needs).
                body = b'{"kind":"start","orders":[' + b",".join(parts) + b'],"sent_at":"' + sent_at + b'"}'
                batches.append((pool, chunk, body))
        results = await asyncio.gather(
            *(
                self._publisher.publish_start(
                    pool,
                    body,
                    message_id=uuid.uuid4().hex,
                    # Expires when its orders would be dispatched again anyway.
                    expiration=min(o.start_timeout_s or DEFAULT_START_TIMEOUT_S for o in chunk),
                )
                for pool, chunk, body in batches
            ),
            return_exceptions=True,
        )
        sent: list[tuple[uuid.UUID, int]] = []
        for (_, chunk, _), result in zip(batches, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.warning("start orders stay in the outbox: %s", result)
                continue
            sent.extend((o.task_id, o.attempt) for o in chunk)
        metrics.DISPATCHED.inc(len(sent))
        return sent

    def seconds_to_next_due(self) -> float | None:
        """How long until the earliest waiting task is due, as the last poll saw it (None:
        nothing waited), so the manager wakes for it instead of waiting out its poll
        interval. A task scheduled since then due sooner wakes it by NOTIFY."""
        at = self._next_at
        return None if at is None else max(0.0, (at - self._clock()).total_seconds())

    async def relay_once(self, counts: DispatchCounts | None = None) -> int:
        """Send the start orders that a crash or a failed publish left unsent.

        The orders are read in one short transaction and published outside any, as a
        poll's are (`_in_flight` keeps the next relay and the polls off them meanwhile),
        then marked sent in another. A transaction held open across the publish kept the
        lease row's share lock (the fence) and the tasks' row locks for as long as the
        broker took to confirm (up to the publish timeout): the lease renewal, an update
        of that row, waited behind it, and on a slow cluster the leader lost its lease to
        its own relay. Two leaders overlapping may both send an order: a start message
        delivered twice makes no second poller (DESIGN.md, invariant 2)."""
        counts = counts or DispatchCounts()
        now = self._clock()
        async with self._engine.begin() as conn:
            ids = await store.outbox(
                conn, now - timedelta(seconds=RELAY_AFTER_S), self._settings.dispatch_batch
            )
            # An order whose first publisher still waits for its confirm is not lost.
            ids = [i for i in ids if i not in self._in_flight]
            if not ids:
                return 0
            rows = await store.start_orders(conn, ids)
        orders = [(r["pool"], _order(r, r["attempt"], r["changed_at"])) for r in rows]
        taken = {o.task_id for _, o in orders}
        self._in_flight |= taken
        try:
            sent = await self._publish(orders)
            if sent:
                async with self._engine.begin() as conn:
                    await store.mark_sent(conn, sent, self._clock())
        finally:
            self._in_flight -= taken
        counts.relayed += len(sent)
        if sent:
            log.info("relayed %d start orders from the outbox", len(sent))
        return len(sent)


def _chunks(
    orders: Sequence[StartOrder], max_count: int, max_bytes: int
) -> Iterator[tuple[list[StartOrder], list[bytes]]]:
    """Consecutive runs of orders with their encodings, each run at most `max_count`
    orders and (but for a lone order larger than that) `max_bytes` of JSON."""
    chunk: list[StartOrder] = []
    parts: list[bytes] = []
    size = 0
    for order in orders:
        part = order.__pydantic_serializer__.to_json(order)
        if chunk and (len(chunk) >= max_count or size + len(part) + 1 > max_bytes):
            yield chunk, parts
            chunk, parts, size = [], [], 0
        chunk.append(order)
        parts.append(part)
        size += len(part) + 1
    if chunk:
        yield chunk, parts


def _order(r: Mapping[str, Any], attempt: int, claimed_at: datetime) -> StartOrder:
    # model_construct: the values come from our own checked rows; validation would
    # cost more than the rest of the dispatch.
    return StartOrder.model_construct(
        task_id=r["task_id"],
        attempt=attempt,
        root_task_id=r["root_id"],
        type=r["type"],
        handler=r["handler"],
        payload=r["payload"],
        url_template=r["url_template"],
        interval_s=r["poll_interval_s"],
        request_timeout_s=r["request_timeout_s"],
        max_consecutive_failures=r["max_consecutive_failures"],
        due_at=r["due_at"],
        claimed_at=claimed_at,
        start_timeout_s=r["start_timeout_s"],
        max_runtime_s=r["max_runtime_s"],
        # A recurring task's claim (claim_due) has it from before its first start.
        started_at=r["started_at"] or claimed_at,
    )
