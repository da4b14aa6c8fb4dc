"""Test signals (after River's `testsignals`): what a component did, for tests to wait on.

A component takes an optional signals object (`TaskRunner(signals=...)`,
`TaskManager(signals=...)`); given one, it emits on it as things happen; in production it
is None, and the component neither records nor computes anything for it. Tests wait on a
signal under a timeout instead of sleeping or polling the component's internals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar, cast

T = TypeVar("T")
V = TypeVar("V")

# How long a test waits for a signal unless it says otherwise, in seconds.
WAIT_S = 10.0


class Signals:
    """The signals of one component: whichever of them is emitted wakes `wait_for`."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def _emitted(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[], V], within_s: float = WAIT_S) -> V:
        """Wait until `predicate()` is truthy, checking it now and after every signal;
        return its value. TimeoutError after `within_s` seconds."""
        async with asyncio.timeout(within_s):
            while not (value := predicate()):
                await self._changed.wait()
            return value


class Signal(Generic[T]):
    """One kind of event of a component: how many times it happened, the last value it
    carried, and `wait`."""

    def __init__(self, owner: Signals, then: Callable[[T], None] | None = None) -> None:
        """then: what the owner keeps up to date from each value (before waiters wake)."""
        self._owner = owner
        self._then = then
        self.count = 0
        self.last: T | None = None

    def emit(self, value: T) -> None:
        self.count += 1
        self.last = value
        if self._then is not None:
            self._then(value)
        self._owner._emitted()

    async def wait(self, count: int = 1, within_s: float = WAIT_S) -> T:
        """Wait until it has been emitted `count` times in all; return the last value."""
        await self._owner.wait_for(lambda: self.count >= count, within_s)
        return cast(T, self.last)
