"""Task type routes: list, get (read); create, update, soft delete, restore (admin).
The body is the core's own model of a type's fields, and TaskService checks the rest."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path

from manager.api.auth import Auth, Caller
from taskmgr.models import TaskType, TaskTypeFields
from taskmgr.service import TaskService
from taskmgr.tokens import Scope

TypeName = Annotated[str, Path(max_length=200)]


def router(service: TaskService, auth: Auth) -> APIRouter:
    r = APIRouter(prefix="/api/v1/task-types", tags=["task types"])
    read, admin = auth.require(Scope.READ), auth.require(Scope.ADMIN)

    @r.get("", response_model=list[TaskType], summary="Task types")
    async def list_types(
        _: Annotated[Caller, Depends(read)], include_deleted: bool = False
    ) -> list[TaskType]:
        return await service.list_types(include_deleted=include_deleted)

    @r.get("/{name}", response_model=TaskType, summary="A task type")
    async def get_type(name: TypeName, _: Annotated[Caller, Depends(read)]) -> TaskType:
        return await service.get_type(name, include_deleted=True)

    @r.post("", status_code=201, response_model=TaskType, summary="Create a task type")
    async def create_type(body: TaskTypeFields, _: Annotated[Caller, Depends(admin)]) -> TaskType:
        return await service.create_type(body.model_dump())

    @r.patch("/{name}", response_model=TaskType, summary="Change some fields of a task type")
    async def update_type(
        name: TypeName,
        _: Annotated[Caller, Depends(admin)],
        changes: Annotated[dict[str, Any], Body(description="The fields to change (not the name)")],
    ) -> TaskType:
        return await service.update_type(name, **changes)

    @r.delete("/{name}", response_model=TaskType, summary="Soft-delete a task type (new tasks refused)")
    async def delete_type(name: TypeName, _: Annotated[Caller, Depends(admin)]) -> TaskType:
        return await service.delete_type(name)

    @r.post("/{name}/restore", response_model=TaskType, summary="Restore a soft-deleted task type")
    async def restore_type(name: TypeName, _: Annotated[Caller, Depends(admin)]) -> TaskType:
        return await service.restore_type(name)

    return r
