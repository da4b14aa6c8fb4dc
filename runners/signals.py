"""What a TaskRunner did, for tests to wait on (taskmgr/signals.py): pass a RunnerSignals
as `TaskRunner(signals=...)`. None in production."""

from __future__ import annotations

import uuid

from runners.poller import Poller
from taskmgr.messages import Heartbeat, Report, StartBatch, StartOrder, Stop, TypeChange
from taskmgr.signals import Signal, Signals


class RunnerSignals(Signals):
    def __init__(self) -> None:
        super().__init__()
        # The consumers are set up: the runner takes start orders and stops from here on.
        self.consuming: Signal[str] = Signal(self)  # the runner's id
        # Start messages, once settled: acked (its orders' reports confirmed), requeued
        # (not confirmed in time) or dead-lettered (malformed; a bug).
        self.start_acked: Signal[StartBatch] = Signal(self)
        self.start_requeued: Signal[StartBatch] = Signal(self)
        self.dead_lettered: Signal[str] = Signal(self)  # the reason
        # Orders that started nothing: older than their start timeout, or a (task,
        # attempt) this runner holds or held already.
        self.stale_order: Signal[StartOrder] = Signal(self)
        self.duplicate_order: Signal[StartOrder] = Signal(self)
        # Pollers: started, one tick done, ended (however: finished, failed, replaced,
        # stopped, handed back). `pollers` are those running now.
        self.poller_started: Signal[Poller] = Signal(self, then=self._started)
        self.ticked: Signal[Poller] = Signal(self)
        self.poller_ended: Signal[Poller] = Signal(self, then=self._ended)
        self.pollers: dict[uuid.UUID, Poller] = {}
        # Stop messages handled (acked), and the pollers they stopped.
        self.stop_handled: Signal[Stop] = Signal(self)
        self.stopped: Signal[Poller] = Signal(self)
        # A task type's new values taken (by the pollers of that type running here).
        self.retuned: Signal[TypeChange] = Signal(self)
        # Sent and confirmed by the broker: a heartbeat; a message of reports.
        self.heartbeat_sent: Signal[Heartbeat] = Signal(self)
        self.reports_sent: Signal[list[Report]] = Signal(self)
        # The start consumer's prefetch, each time the runner changes it.
        self.prefetch_set: Signal[int] = Signal(self)

    @property
    def active(self) -> dict[uuid.UUID, int]:
        """Task id -> attempt of the pollers running now."""
        return {tid: p.attempt for tid, p in self.pollers.items()}

    def _started(self, poller: Poller) -> None:
        self.pollers[poller.order.task_id] = poller

    def _ended(self, poller: Poller) -> None:
        if self.pollers.get(poller.order.task_id) is poller:
            del self.pollers[poller.order.task_id]
