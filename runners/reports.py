"""Reports to the manager, batched: many pollers' reports travel in one message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from runners import metrics
from taskmgr.broker import BrokerError
from taskmgr.messages import Report, RunnerReports, encode

if TYPE_CHECKING:
    from runners.signals import RunnerSignals

log = logging.getLogger(__name__)

# Collect reports for this long (or this many) before publishing one message.
REPORT_LINGER_S = 0.02
REPORT_BATCH_MAX = 500
# After a failed publish (the connection is down; it reconnects by itself).
REPORT_RETRY_S = 0.5


class ReportBuffer:
    """Reports go out in order, one message at a time, each confirmed by the broker.
    `add(..., confirm=True)` gives a future that resolves once the report's message is
    confirmed (a start message is acked only then). A failed publish is tried again:
    reports are never dropped while the runner lives."""

    def __init__(
        self,
        *,
        publish: Callable[[bytes], Awaitable[None]],
        runner_id: str,
        pool: str,
        linger_s: float = REPORT_LINGER_S,
        max_batch: int = REPORT_BATCH_MAX,
        signals: RunnerSignals | None = None,
    ) -> None:
        self._publish = publish
        self._runner_id = runner_id
        self._pool = pool
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._items: list[tuple[Report, asyncio.Future[None] | None]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._signals = signals

    def __len__(self) -> int:
        return len(self._items)

    def add(self, report: Report, *, confirm: bool = False) -> asyncio.Future[None] | None:
        fut: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if confirm else None
        self._items.append((report, fut))
        self._wake.set()
        return fut

    def close(self) -> None:
        """Publish what is left, then `run()` returns."""
        self._closing = True
        self._wake.set()

    def abandon(self, reason: str) -> None:
        """Give up on what is left (shutdown ran out of time): fail the waiters."""
        for _, fut in self._items:
            if fut is not None and not fut.done():
                fut.set_exception(BrokerError(reason))
        self._items.clear()

    async def run(self) -> None:
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._items) < self._max_batch and not self._closing:
                await asyncio.sleep(self._linger_s)  # let a burst of reports share a message
            batch = self._items[: self._max_batch]
            body = encode(
                RunnerReports(runner_id=self._runner_id, pool=self._pool, reports=[r for r, _ in batch])
            )
            try:
                await self._publish(body)
            except BrokerError as exc:
                log.warning("publishing %d reports failed, trying again: %s", len(batch), exc)
                await asyncio.sleep(REPORT_RETRY_S)
                continue
            del self._items[: len(batch)]
            for report, fut in batch:
                metrics.REPORTS_PUBLISHED.labels(report.status).inc()
                if fut is not None and not fut.done():
                    fut.set_result(None)
            if self._signals is not None:
                self._signals.reports_sent.emit([r for r, _ in batch])
