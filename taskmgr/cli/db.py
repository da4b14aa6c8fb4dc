"""Commands that read or change tasks through a TaskService of their own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import click

from taskmgr.cli.common import run, settings_of
from taskmgr.db import make_engine
from taskmgr.service import TaskService
from taskmgr.settings import Settings

T = TypeVar("T")


def call(ctx: click.Context, fn: Callable[[TaskService], Awaitable[T]]) -> T:
    """Run one TaskService call (`fn(service)`) for a command, with the usual errors."""

    async def go() -> T:
        async with task_service(settings_of(ctx)) as svc:
            return await fn(svc)

    return run(go())


@contextlib.asynccontextmanager
async def task_service(settings: Settings) -> AsyncIterator[TaskService]:
    """A TaskService on a small engine of its own, disposed of at the end."""
    engine = make_engine(settings.database_url, pool_size=2, name="taskmgr-cli")
    try:
        yield TaskService(engine=engine)
    finally:
        await engine.dispose()
