"""Event routes: the stored events (the recorder's history) listed, and a live stream of
them over Server-Sent Events that resumes from `Last-Event-ID`."""

import asyncio
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime
from sqlalchemy.ext.asyncio import AsyncEngine

from manager.api.auth import Auth, Caller
from manager.api.errors import BadRequest
from manager.api.schemas import StoredEventOut
from manager.api.stream import EventHub, parse_stream_id, replay, stream_id
from taskmgr import event_store
from taskmgr.event_store import StoredEvent
from taskmgr.tokens import Scope

# A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0
MAX_EVENTS = 10_000


def _json(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


# The encoded frames of the latest events: a thousand clients of one event encode it once.
_FRAMES: OrderedDict[uuid.UUID, bytes] = OrderedDict()
FRAMES_KEPT = 20_000


def sse(e: StoredEvent) -> bytes:
    frame = _FRAMES.get(e.event_id)
    if frame is None:
        frame = f"id: {stream_id(e)}\nevent: {e.routing_key}\ndata: {_json(vars(e))}\n\n".encode()
        _FRAMES[e.event_id] = frame
        if len(_FRAMES) > FRAMES_KEPT:
            _FRAMES.popitem(last=False)
    return frame


class Filter:
    """Which events a stream sends: routing keys (`<task_type>.<kind>`), a task, a root."""

    def __init__(self, keys: str | None, task_id: uuid.UUID | None, root_id: uuid.UUID | None) -> None:
        self.keys = {k.strip() for k in keys.split(",") if k.strip()} if keys else set()
        self.task_id, self.root_id = task_id, root_id

    def __call__(self, e: StoredEvent) -> bool:
        return (
            (not self.keys or e.routing_key in self.keys)
            and (self.task_id is None or e.task_id == self.task_id)
            and (self.root_id is None or e.root_task_id == self.root_id)
        )


def router(engine: AsyncEngine, hub: EventHub, auth: Auth) -> APIRouter:
    r = APIRouter(prefix="/api/v1/events", tags=["events"])
    read = auth.require(Scope.READ)

    @r.get("", response_model=list[StoredEventOut], summary="Stored events, in time order")
    async def list_events(
        _: Annotated[Caller, Depends(read)],
        task: uuid.UUID | None = None,
        root: uuid.UUID | None = None,
        since: AwareDatetime | None = None,
        kind: Annotated[list[str], Query(max_length=50)] = [],  # noqa: B006 - FastAPI copies it
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 1000,
    ) -> list[StoredEvent]:
        """A task's events (`task`), a tree's (`root`), or everyone's from `since`."""
        async with engine.connect() as conn:
            if task is not None:
                return await event_store.events_of_task(conn, task, since=since, kinds=kind, limit=limit)
            if root is not None:
                return await event_store.events_of_root(conn, root, since=since, kinds=kind, limit=limit)
            start = since or datetime(1970, 1, 1, tzinfo=UTC)
            rows = await event_store.events_after(conn, start, limit=limit)
            return [e for e in rows if not kind or e.kind in kind]

    @r.get(
        "/stream",
        summary="Live events (Server-Sent Events)",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "id: <stream id>, event: <task_type>.<kind>, data: the stored event as JSON",
            }
        },
    )
    async def stream(
        request: Request,
        _: Annotated[Caller, Depends(read)],
        keys: Annotated[
            str | None, Query(max_length=2000, description="Routing keys, comma-separated")
        ] = None,
        task: uuid.UUID | None = None,
        root: uuid.UUID | None = None,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", max_length=200, description="Resume after this event")
        ] = None,
        after: Annotated[str | None, Query(max_length=200, description="As Last-Event-ID")] = None,
    ) -> StreamingResponse:
        resume = None
        if last_event_id or after:
            resume = parse_stream_id(last_event_id or after or "")
            if resume is None:
                raise BadRequest("header.Last-Event-ID", "not an id this stream sent (<time>~<event id>)")
        wanted = Filter(keys, task, root)

        async def body() -> AsyncIterator[bytes]:
            async with hub.subscribe() as sub:
                yield b"retry: 2000\n\n"
                sent: set[uuid.UUID] = set()
                if resume is not None:
                    async for old in replay(engine, resume):
                        sent.add(old.event_id)
                        if wanted(old):
                            yield sse(old)
                while not await request.is_disconnected():
                    try:
                        async with asyncio.timeout(KEEPALIVE_S):
                            e: StoredEvent | None = await sub.queue.get()
                    except TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    if e is None:  # too slow: dropped; the browser reconnects with Last-Event-ID
                        return
                    if e.event_id in sent:
                        sent.discard(e.event_id)
                        continue
                    if wanted(e):
                        yield sse(e)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return r
