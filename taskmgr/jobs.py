"""Periodic jobs that run on the leading manager only, contributed by the parts that
stand on the engine (the sports part's daily schedule). The manager builds them when
it takes the lead, with what they may use, and runs them on its scheduler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr.service import TaskService


@dataclass(frozen=True)
class JobContext:
    """What a leader job may use: the manager's TaskService and its fenced engine
    (writes through it are refused once the leadership lease is lost)."""

    service: TaskService
    engine: AsyncEngine
    clock: Callable[[], datetime]


@dataclass(frozen=True)
class LeaderJob:
    """`run` on a cron rule (`cron`, in `timezone`) or every `every_s` seconds, first
    at once when `at_start`. Runs never overlap; a failing run is logged and the job
    runs again on schedule."""

    name: str
    run: Callable[[], Awaitable[Any]]
    cron: str | None = None
    timezone: str = "UTC"
    every_s: float | None = None
    at_start: bool = False


# What a part contributes: its jobs, built from the context.
LeaderJobs = Callable[[JobContext], Sequence[LeaderJob]]
