"""Runners, status, health (/healthz: the process answers; /readyz: the database answers
and is migrated) and the Prometheus metrics."""

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.api import metrics
from manager.api.auth import Auth, Caller
from manager.api.stream import EventHub
from taskmgr import overview, store, upkeep
from taskmgr.errors import InvalidInput
from taskmgr.service import TaskService, utcnow
from taskmgr.settings import Settings
from taskmgr.tokens import Scope

# How far back the runners page looks (runners gone longer ago are not listed).
RUNNERS_WINDOW = timedelta(hours=1)
# The window of the runners' poll errors.
ERRORS_WINDOW = timedelta(minutes=5)


class RunnerOut(BaseModel):
    id: str
    pool: str
    host: str
    pid: int | None
    started_at: datetime
    last_seen: datetime
    heartbeat_age_s: float
    tasks: int
    status: str  # alive, late, dead, stopped
    poll_errors_5m: int = 0  # failed polls it reported in the last 5 minutes


class Status(BaseModel):
    schema_version: str | None
    leader_present: bool
    tasks_by_state: dict[str, int]
    runners_alive: int
    stream_clients: int


def runner_rows(
    rows: list[overview.RunnerRow], now: datetime, dead_after_s: float, errors: dict[str, int] | None = None
) -> list[RunnerOut]:
    out = []
    for r in rows:
        age = (now - r.last_seen).total_seconds()
        status = (
            "stopped"
            if r.stopped_at
            else "dead"
            if r.dead or age > dead_after_s
            else "late"
            if age > dead_after_s / 3
            else "alive"
        )
        extra = {
            "heartbeat_age_s": round(age, 1),
            "status": status,
            "poll_errors_5m": (errors or {}).get(r.id, 0),
        }
        out.append(RunnerOut(**{**r.__dict__, **extra}))
    return out


async def read_runners(engine: AsyncEngine, dead_after_s: float) -> list[RunnerOut]:
    """The runners seen in RUNNERS_WINDOW, with their failed polls of ERRORS_WINDOW."""
    now = utcnow()
    async with engine.connect() as conn:
        rows = await overview.list_runners(conn, now - RUNNERS_WINDOW)
        errors = await overview.poll_errors(conn, now - ERRORS_WINDOW)
    return runner_rows(rows, now, dead_after_s, errors)


def router(
    *, settings: Settings, engine: AsyncEngine, service: TaskService, hub: EventHub, auth: Auth
) -> APIRouter:
    r = APIRouter(tags=["system"])
    read = auth.require(Scope.READ)

    async def runners() -> list[RunnerOut]:
        return await read_runners(engine, settings.runner_dead_after)

    @r.get("/api/v1/runners", response_model=list[RunnerOut], summary="Runners as their heartbeats show them")
    async def list_runners(_: Annotated[Caller, Depends(read)]) -> list[RunnerOut]:
        return await runners()

    @r.get("/api/v1/status", response_model=Status, summary="Tasks by state, leader, runners")
    async def status(_: Annotated[Caller, Depends(read)]) -> Status:
        async with engine.connect() as conn:
            version = await overview.schema_version(conn)
            leader = await store.leader_present(conn)
            counts = await upkeep.state_counts(conn)
        alive = sum(1 for x in await runners() if x.status in ("alive", "late"))
        return Status(
            schema_version=version,
            leader_present=leader,
            tasks_by_state={str(k): v for k, v in sorted(counts.items())},
            runners_alive=alive,
            stream_clients=hub.clients,
        )

    @r.get("/api/v1/stats/lateness", summary="Dispatch lateness histogram (starts since `minutes` ago)")
    async def lateness(
        _: Annotated[Caller, Depends(read)],
        minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
        width_ms: Annotated[float, Query(gt=0, le=3_600_000)] = 250,
        buckets: Annotated[int, Query(ge=2, le=200)] = 20,
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            counts = await overview.lateness_histogram(
                conn, utcnow() - timedelta(minutes=minutes), width_ms, buckets
            )
        return {"width_ms": width_ms, "counts": counts}

    @r.get("/api/v1/stats/states", summary="State changes per time bucket (TimescaleDB time_bucket)")
    async def states_over_time(
        _: Annotated[Caller, Depends(read)],
        minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
        bucket: Annotated[str, Query(max_length=30)] = "1 minute",
    ) -> list[dict[str, Any]]:
        now = utcnow()
        try:
            rows = await service.counts_per_bucket(bucket, now - timedelta(minutes=minutes), now)
        except InvalidInput as exc:
            raise InvalidInput(f"query.{exc.field}", exc.problem) from None
        return [{"bucket": b, "state": s, "n": n} for b, s, n in rows]

    @r.get("/healthz", summary="The process answers (no auth)", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz", summary="The database answers and is migrated (no auth)", tags=["health"])
    async def readyz() -> JSONResponse:
        try:
            async with engine.connect() as conn:
                version = await overview.schema_version(conn)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "detail": type(exc).__name__}, status_code=503)
        if version is None:
            return JSONResponse({"status": "unavailable", "detail": "not migrated"}, status_code=503)
        return JSONResponse({"status": "ready", "schema_version": version})

    @r.get("/metrics", summary="Prometheus metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus(_: Annotated[Caller, Depends(read)]) -> PlainTextResponse:
        metrics.STREAM_CLIENTS.set(hub.clients)
        metrics.STREAM_SENT.set(hub.sent)
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return r
