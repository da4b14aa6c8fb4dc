"""What a TaskManager did, for tests to wait on (taskmgr/signals.py): pass a
ManagerSignals as `TaskManager(signals=...)`. None in production."""

from __future__ import annotations

import dataclasses
from typing import Any

from manager.dispatch import DispatchCounts
from manager.intake import IntakeCounts
from taskmgr.messages import TypeChange
from taskmgr.signals import Signal, Signals


class ManagerSignals(Signals):
    def __init__(self) -> None:
        super().__init__()
        # The leader's loops: one dispatch poll done, one batch of progress messages
        # handled, with their counts; and the totals of those since these signals began.
        self.dispatch_polled: Signal[DispatchCounts] = Signal(self, then=self._dispatched)
        self.intake_handled: Signal[IntakeCounts] = Signal(self, then=self._taken)
        # A task type's new values broadcast to the runners (its TypeChange).
        self.type_broadcast: Signal[TypeChange] = Signal(self)
        self.dispatched = DispatchCounts()
        self.intake = IntakeCounts()

    def _dispatched(self, counts: DispatchCounts) -> None:
        _add(self.dispatched, counts)

    def _taken(self, counts: IntakeCounts) -> None:
        _add(self.intake, counts)


def _add(total: Any, more: Any) -> None:
    for f in dataclasses.fields(total):
        setattr(total, f.name, getattr(total, f.name) + getattr(more, f.name))
