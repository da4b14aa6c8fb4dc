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


def call(ctx: click.Context, fn: Callable[[TaskService], Awaitable[T]], *, read: bool = False) -> T:
    """Run one TaskService call (`fn(service)`) for a command, with the usual errors.
    `read`: the call only reads, and may use a replica (TASKMGR_READ_DATABASE_URL)."""

    async def go() -> T:
        async with task_service(settings_of(ctx), read=read) as svc:
            return await fn(svc)

    return run(go())


@contextlib.asynccontextmanager
async def task_service(settings: Settings, *, read: bool = False) -> AsyncIterator[TaskService]:
    """A TaskService on a small engine of its own, disposed of at the end (`read`: on
    the read URL, for a command that only reads)."""
    url = settings.reads_url if read else settings.database_url
    engine = make_engine(url, pool_size=2, name="taskmgr-cli")
    try:
        yield TaskService(engine=engine)
    finally:
        await engine.dispose()
