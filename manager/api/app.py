"""The API application: the core's TaskService and stores behind routes, tokens for
auth, the errors mapped once, metrics per route, and the console's pages."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from manager.api import errors, events, metrics, system, tasks, types
from manager.api.auth import Auth
from manager.api.stream import EventHub
from taskmgr.service import TaskService
from taskmgr.settings import Settings

VERSION = "1"


@dataclass
class Api:
    """What the routes share (the console reads it too)."""

    settings: Settings
    engine: AsyncEngine
    service: TaskService
    auth: Auth
    hub: EventHub


def create_app(
    *,
    settings: Settings,
    engine: AsyncEngine,
    service: TaskService | None = None,
    extra: Sequence[Callable[[Api], APIRouter]] = (),
    console: bool = True,
) -> FastAPI:
    """The app. `extra` builds more routers from what the routes share (the CLI adds the
    sports routes so); `console` adds the web pages."""
    api = Api(
        settings=settings,
        engine=engine,
        service=service or TaskService(engine=engine),
        auth=Auth(engine=engine, cache_s=settings.api_token_cache_s),
        hub=EventHub(
            engine=engine, poll_s=settings.api_stream_poll_s, lookback_s=settings.api_stream_lookback_s
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await api.hub.close()

    app = FastAPI(
        title="taskmgr",
        version=VERSION,
        description="The Task Manager's HTTP API: task types, tasks, their history, the stored events "
        "and their live stream, runners, status. Every route but /healthz and /readyz needs an API "
        "token (`taskmgr tokens create --scope read|write|admin --name NAME`), sent as "
        "`Authorization: Bearer <secret>`.",
        lifespan=lifespan,
    )
    app.state.api = api
    errors.install(app)
    app.include_router(types.router(api.service, api.auth))
    app.include_router(tasks.router(api.service, api.auth))
    app.include_router(events.router(engine, api.hub, api.auth))
    app.include_router(
        system.router(settings=settings, engine=engine, service=api.service, hub=api.hub, auth=api.auth)
    )
    for build in extra:
        app.include_router(build(api))
    if console:
        from manager.api import console as pages

        pages.install(app, api)

    app.add_middleware(Measure)
    return app


class Measure:
    """Counts and times each request by its route's path (a plain ASGI middleware: it
    leaves a stream's body alone)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)
                metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
            await send(message)

        await self.app(scope, receive, sending)
