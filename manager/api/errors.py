"""The core's errors as HTTP answers, mapped once: bad input 400/422 with the JSON path
of the problem, unknown ids 404, conflicts 409. Every error body has the same shape:
{"error": kind, "message": text, "path": "body.tasks[0].payload.game_id" | null}."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskmgr.errors import Conflict, IllegalTransition, InvalidInput, NotFound, TaskmgrError
from taskmgr.redact import redact_text

WHERE = ("body.", "query.", "path.", "header.")


class BadRequest(Exception):
    """A request that could not be read at all (a cursor not ours, a body not JSON): 400."""

    def __init__(self, path: str, message: str) -> None:
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


def json_path(loc: Sequence[Any]) -> str:
    """FastAPI's error location as a JSON path: ("body", "tasks", 0, "type") ->
    body.tasks[0].type."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_body(kind: str, message: str, path: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": kind, "message": message, "path": path, **extra}


def _answer(status: int, kind: str, message: str, path: str | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(kind, message, path, **extra), status_code=status)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        path = json_path(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return _answer(400, "bad_request", f"the body is not valid JSON: {first.get('msg')}", path)
        details = [{"path": json_path(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
        return _answer(422, "invalid_input", f"{path}: {first.get('msg')}", path, errors=details)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _answer(400, "bad_request", str(exc), exc.path)

    @app.exception_handler(InvalidInput)
    async def _invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        # The core names the field in its own terms (payload.x, tasks[1].due_at): under the
        # body, unless a route said where it came from.
        path = exc.field if exc.field.startswith(WHERE) else f"body.{exc.field}"
        return _answer(422, "invalid_input", str(exc), path)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return _answer(404, "not_found", str(exc).strip("'\""))

    @app.exception_handler(IllegalTransition)
    async def _illegal(request: Request, exc: IllegalTransition) -> JSONResponse:
        return _answer(409, "conflict", str(exc), state=str(exc.current))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        # AlreadyExists, TaskNotWaiting, and any other conflict the core names.
        return _answer(409, "conflict", str(exc))

    @app.exception_handler(TaskmgrError)
    async def _other(request: Request, exc: TaskmgrError) -> JSONResponse:
        return _answer(503, "unavailable", redact_text(str(exc))[:500])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            error_body(kinds.get(exc.status_code, "error"), str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
