"""A Task Manager with the dispatch path timed and, optionally, changed: for
`taskmgr bench dispatch --variant NAME` only (experiments on the lead's code without
editing it). Run as `python -m bench.manager_variant NAME` with the usual TASKMGR_* env.

Variants (comma-separated):
- `timed`: no change; logs to stderr, per poll that claimed something, the time spent in
  claim_due, apply_transitions, the rest of the claim transaction (Python + commit),
  publishing and mark_sent.
- `pipelined`: the next batch is claimed while the previous batch's orders are being
  published and marked sent (at most two sends in flight); claims stay in due order.
- `fastclaim`: non-recurring due tasks are claimed by ONE statement (CTEs: lock the due
  rows, update the projection, insert the STARTED events with their lateness computed in
  SQL, return what the start orders need) on the raw asyncpg connection; recurring tasks
  (next occurrence, misfire policy) still go through the original claim.
- `nometrics`: the per-task lateness histogram observation is batched (one lock per
  bucket per batch instead of one per task).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from manager import dispatch as dmod
from taskmgr import store

SPANS: dict[str, float] = defaultdict(float)


def _timed_async(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            SPANS[name] += time.perf_counter() - t

    return wrapper


FAST_CLAIM = """
with due as (
    select s.task_id, s.attempt, s.run_at
    from task_state s join tasks t on t.id = s.task_id
    where s.state in ('SCHEDULED', 'RETRYING') and s.run_at <= $1 and t.recurrence is null
    order by s.run_at
    limit $2
    for update of s skip locked
), upd as (
    update task_state s set state = 'STARTED', attempt = due.attempt + 1, run_at = null,
        runner_id = null, sent_at = null, changed_at = $1
    from due where s.task_id = due.task_id
    returning s.task_id, s.attempt, due.run_at
), ev as (
    insert into task_events (time, task_id, state, attempt, runner_id, source, applied, detail)
    select $1, u.task_id, 'STARTED', u.attempt, null, 'manager', true,
        jsonb_build_object('lateness_ms',
            round(extract(epoch from ($1 - greatest(u.run_at, t.created_at))) * 1000))
    from upd u join tasks t on t.id = u.task_id
)
select u.task_id, u.attempt, u.run_at, t.created_at, t.type, t.payload::text as payload, t.due_at,
    t.root_id, tt.pool, tt.handler, tt.url_template, tt.poll_interval_s, tt.request_timeout_s,
    tt.max_consecutive_failures
from upd u join tasks t on t.id = u.task_id join task_types tt on tt.name = t.type
"""


def install(variants: set[str]) -> None:
    store.claim_due = _timed_async("claim_due", store.claim_due)  # type: ignore[assignment]
    store.apply_transitions = _timed_async("apply_transitions", store.apply_transitions)  # type: ignore[assignment]
    store.mark_sent = _timed_async("mark_sent", store.mark_sent)  # type: ignore[assignment]
    D = dmod.Dispatcher
    D._claim_batch = _timed_async("claim_batch_total", D._claim_batch)  # type: ignore[method-assign,assignment]
    D._publish = _timed_async("publish", D._publish)  # type: ignore[method-assign,assignment]
    original_poll = D.poll_once

    async def pipelined_poll(self: dmod.Dispatcher) -> dmod.DispatchCounts:
        counts = dmod.DispatchCounts()
        sends: list[asyncio.Task[None]] = []
        while True:
            orders, rows = await self._claim_batch(counts)
            if orders:
                sends.append(asyncio.create_task(self._send(orders, counts)))
                if len(sends) >= 2:
                    await sends.pop(0)
            if rows < self._settings.dispatch_batch:
                break
        await asyncio.gather(*sends)
        await self.relay_once(counts)
        return counts

    poll = pipelined_poll if "pipelined" in variants else original_poll

    async def poll_once(self: dmod.Dispatcher) -> dmod.DispatchCounts:
        SPANS.clear()
        t = time.perf_counter()
        counts = await poll(self)
        if counts.claimed:
            total = time.perf_counter() - t
            spans = dict(SPANS)
            spans["claim_rest"] = (
                spans.get("claim_batch_total", 0)
                - spans.get("claim_due", 0)
                - spans.get("apply_transitions", 0)
            )
            print(
                f"[variant] poll claimed {counts.claimed} in {total * 1000:.0f} ms: "
                + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in sorted(spans.items())),
                file=sys.stderr,
                flush=True,
            )
        return counts

    D.poll_once = poll_once  # type: ignore[method-assign,assignment]

    if "fastclaim" in variants:
        import json

        slow_claim = D._claim_batch

        async def fast_claim(self: dmod.Dispatcher, counts: dmod.DispatchCounts) -> Any:
            now = self._clock()
            limit = self._settings.dispatch_batch
            t = time.perf_counter()
            async with self._engine.begin() as conn:
                raw = await conn.get_raw_connection()
                rows = await raw.driver_connection.fetch(FAST_CLAIM, now, limit)  # type: ignore[union-attr]
            SPANS["fast_claim"] += time.perf_counter() - t
            orders = []
            for r in rows:
                row = dict(r)
                row["payload"] = json.loads(row["payload"])
                late_s = (now - max(r["run_at"], r["created_at"])).total_seconds()
                dmod.metrics.LATENESS.observe(max(late_s, 0.0))
                orders.append((r["pool"], dmod._order(row, r["attempt"], now)))
            counts.claimed += len(orders)
            dmod.metrics.CLAIMED.inc(len(orders))
            if len(rows) < limit:  # recurring tasks: the original path
                more, n = await slow_claim(self, counts)
                return orders + more, len(rows) + n
            return orders, len(rows)

        D._claim_batch = fast_claim  # type: ignore[method-assign,assignment]

    if "nometrics" in variants:
        hist = dmod.metrics.LATENESS
        pending: list[float] = []

        class Batched:
            def observe(self, v: float) -> None:
                pending.append(v)

        dmod.metrics.LATENESS = Batched()  # type: ignore[assignment]
        orig_claim = D._claim_batch

        async def claim_then_flush(self: dmod.Dispatcher, counts: dmod.DispatchCounts) -> Any:
            try:
                return await orig_claim(self, counts)
            finally:
                # One pass over the buckets: the histogram's own _sum and per-bucket counts.
                if pending:
                    bounds = hist._upper_bounds  # type: ignore[attr-defined]
                    buckets = [0] * len(bounds)
                    for v in pending:
                        for i, b in enumerate(bounds):
                            if v <= b:
                                buckets[i] += 1
                                break
                    for i, n in enumerate(buckets):
                        if n:
                            hist._buckets[i].inc(n)  # type: ignore[attr-defined]
                    hist._sum.inc(sum(pending))  # type: ignore[attr-defined]
                    pending.clear()

        D._claim_batch = claim_then_flush  # type: ignore[method-assign,assignment]


def main() -> None:
    variants = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else set()
    install(variants)
    from taskmgr.cli import main as cli

    cli(["manager"])


if __name__ == "__main__":
    main()
