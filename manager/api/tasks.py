"""Task routes: create (one or many; the Idempotency-Key header is the dedup key), get,
list with filters and cursor paging, history, audit tree, cancel, retry, and the changes
of a waiting task (reschedule, payload). Each is one
TaskService call: the rules are the service's."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Response
from pydantic import AwareDatetime, BaseModel

from manager.api.auth import Auth, Caller
from manager.api.errors import BadRequest
from manager.api.schemas import (
    MAX_PAGE,
    Audit,
    AuditNode,
    CancelIn,
    Created,
    CreatedMany,
    PayloadIn,
    RescheduleIn,
    TaskEventOut,
    TaskIn,
    TaskOut,
    TaskPage,
    TasksIn,
    decode_cursor,
    encode_cursor,
)
from taskmgr.models import State
from taskmgr.service import NewTask, TaskService
from taskmgr.tokens import Scope

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Sent again with the same request, it creates nothing new: the task's dedup key "
        "(for a batch, the key of task i is `<key>/<i>`)",
    ),
]


def as_json(model: BaseModel) -> Response:
    """A response model built from the core's values, serialized as it is: FastAPI would
    validate it again first (most of a page's cost: 5 ms of CPU for 50 tasks)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _new(t: TaskIn, dedup_key: str | None, caller: Caller, where: str) -> NewTask:
    if dedup_key is not None and t.dedup_key is not None and dedup_key != t.dedup_key:
        raise BadRequest(
            f"body.{where}dedup_key", "differs from the Idempotency-Key header; send one of them"
        )
    return NewTask(
        type=t.type,
        payload=t.payload,
        due_at=t.due_at,
        dedup_key=t.dedup_key or dedup_key,
        parent_id=t.parent_id,
        recurrence=t.recurrence,
        created_by=caller.name,
        name=t.name,
        description=t.description,
        priority=t.priority,
        depends_on=tuple(t.depends_on),
        on_dependency_failure=t.on_dependency_failure,
    )


def router(service: TaskService, auth: Auth) -> APIRouter:
    r = APIRouter(prefix="/api/v1/tasks", tags=["tasks"])
    read, write = auth.require(Scope.READ), auth.require(Scope.WRITE)

    async def schedule(news: list[NewTask]) -> list[Created]:
        async with service.session() as session, session.begin():
            done = await service.schedule_many(session, news)
        return [Created(task=TaskOut.of(await service.get_task(d.id)), created=d.created) for d in done]

    @r.post("", status_code=201, response_model=Created, summary="Schedule a task")
    async def create_task(
        response: Response,
        body: TaskIn,
        caller: Annotated[Caller, Depends(write)],
        idempotency_key: IdempotencyKey = None,
    ) -> Created:
        [out] = await schedule([_new(body, idempotency_key, caller, "")])
        if not out.created:
            response.status_code = 200
        return out

    @r.post("/batch", status_code=201, response_model=CreatedMany, summary="Schedule many tasks at once")
    async def create_tasks(
        response: Response,
        body: TasksIn,
        caller: Annotated[Caller, Depends(write)],
        idempotency_key: IdempotencyKey = None,
    ) -> CreatedMany:
        """All or none: one bad task writes none (the error's path names it)."""
        news = [
            _new(t, f"{idempotency_key}/{i}" if idempotency_key else None, caller, f"tasks[{i}].")
            for i, t in enumerate(body.tasks)
        ]
        out = await schedule(news)
        if not any(c.created for c in out):
            response.status_code = 200
        return CreatedMany(tasks=out)

    @r.get("", response_model=TaskPage, summary="List tasks by due time")
    async def list_tasks(
        _: Annotated[Caller, Depends(read)],
        state: State | None = None,
        type: Annotated[str | None, Query(max_length=200)] = None,
        root: uuid.UUID | None = None,
        due_from: AwareDatetime | None = None,
        due_to: AwareDatetime | None = None,
        after: Annotated[
            str | None, Query(max_length=400, description="The `next` of the page before")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> Response:
        rows = await service.list_tasks(
            type=type,
            state=state,
            root_id=root,
            due_from=due_from,
            due_to=due_to,
            after=decode_cursor(after) if after else None,
            limit=limit,
        )
        nxt = encode_cursor(rows[-1].due_at, rows[-1].id) if len(rows) == limit else None
        return as_json(TaskPage.model_construct(items=[TaskOut.of(t) for t in rows], next=nxt))

    @r.get("/{task_id}", response_model=TaskOut, summary="A task and its current state")
    async def get_task(task_id: uuid.UUID, _: Annotated[Caller, Depends(read)]) -> Response:
        return as_json(TaskOut.of(await service.get_task(task_id)))

    @r.get("/{task_id}/history", response_model=list[TaskEventOut], summary="Every state change of a task")
    async def history(task_id: uuid.UUID, _: Annotated[Caller, Depends(read)]) -> list[TaskEventOut]:
        return [TaskEventOut.of(e) for e in await service.history(task_id)]

    @r.get("/{task_id}/audit", response_model=Audit, summary="The tree under a root task, with its history")
    async def audit(task_id: uuid.UUID, _: Annotated[Caller, Depends(read)]) -> Audit:
        tasks, events = await service.audit(task_id)
        by_task: dict[uuid.UUID, list[TaskEventOut]] = {}
        for e in events:
            by_task.setdefault(e.task_id, []).append(TaskEventOut.of(e))
        nodes = [AuditNode(task=TaskOut.of(t), events=by_task.get(t.id, [])) for t in tasks]
        return Audit(root_id=task_id, tasks=nodes)

    @r.post("/{task_id}/cancel", response_model=TaskOut, summary="Cancel a task (a running one is stopped)")
    async def cancel(
        task_id: uuid.UUID,
        caller: Annotated[Caller, Depends(write)],
        body: Annotated[CancelIn | None, Body()] = None,
    ) -> TaskOut:
        body = body or CancelIn.model_validate({})
        return TaskOut.of(
            await service.cancel(task_id, reason=body.reason, source=caller.name, series=body.series)
        )

    @r.post("/{task_id}/retry", response_model=TaskOut, summary="Run a FAILED task again now")
    async def retry(task_id: uuid.UUID, caller: Annotated[Caller, Depends(write)]) -> TaskOut:
        return TaskOut.of(await service.retry(task_id, source=caller.name))

    @r.post(
        "/{task_id}/reschedule",
        response_model=TaskOut,
        summary="Move a waiting (SCHEDULED or RETRYING) task to a new due time; 409 otherwise",
    )
    async def reschedule(
        task_id: uuid.UUID, body: RescheduleIn, caller: Annotated[Caller, Depends(write)]
    ) -> TaskOut:
        return TaskOut.of(await service.reschedule(task_id, body.due_at, source=caller.name))

    @r.post(
        "/{task_id}/payload",
        response_model=TaskOut,
        summary="Replace (or merge into) a waiting task's payload, checked by its type's schema; "
        "409 if it is not waiting",
    )
    async def update_payload(
        task_id: uuid.UUID, body: PayloadIn, caller: Annotated[Caller, Depends(write)]
    ) -> TaskOut:
        return TaskOut.of(
            await service.update_payload(task_id, body.payload, merge=body.merge, source=caller.name)
        )

    return r
