"""The web console: server-rendered pages (Jinja2) over the same core calls as the API,
with one small script (static/console.js: times in the viewer's timezone, the live
board's scores over the event stream). Nothing is fetched from elsewhere at run time and
nothing is built: the templates and static files ship in the package.

Login: an API token, kept in an HttpOnly, SameSite=Strict cookie that the API routes
accept too (so the board's script calls them as the viewer). Buttons that change a task
show only to a token of write scope, and their routes check the scope again."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from manager.api.auth import COOKIE, Caller
from manager.api.errors import BadRequest
from manager.api.schemas import decode_cursor, encode_cursor
from manager.api.system import read_runners
from taskmgr import event_store, overview
from taskmgr.errors import TaskmgrError
from taskmgr.messages import LIFECYCLE_TASK_TYPE
from taskmgr.models import State
from taskmgr.service import utcnow
from taskmgr.tokens import Scope

HERE = Path(__file__).parent
PAGE = 50
COOKIE_MAX_AGE_S = 12 * 3600
# Lateness histogram: bucket width and count (the last bucket is open-ended).
LATENESS_WIDTH_MS = 250.0
LATENESS_BUCKETS = 20


def install(app: FastAPI, api: Any) -> None:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["states"] = [s.value for s in State]
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    async def who(request: Request) -> Caller | None:
        return await api.auth.caller(request, None)

    def render(request: Request, name: str, caller: Caller | None, status: int = 200, **ctx: Any) -> Response:
        can_write = caller is not None and caller.token.scope.allows(Scope.WRITE)
        ctx = {"caller": caller, "can_write": can_write, "page": name.removesuffix(".html"), **ctx}
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def to_login(request: Request) -> Response:
        return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)

    @app.get("/login", include_in_schema=False)
    async def login_page(request: Request, next: str = "/") -> Response:
        return render(request, "login.html", None, next=_safe(next), error=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # A form of two fields, read here (python-multipart would be a dependency for it).
        fields = parse_qs((await request.body())[:10_000].decode(errors="replace"))
        token, next = fields.get("token", [""])[0], fields.get("next", ["/"])[0]
        found = await api.auth.token(token.strip()) if token.strip() else None
        if found is None:
            return render(
                request, "login.html", None, 401, next=_safe(next), error="That token is not valid."
            )
        response = RedirectResponse(_safe(next), status_code=303)
        response.set_cookie(
            COOKIE,
            token.strip(),
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=api.settings.api_secure_cookie,
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/", include_in_schema=False)
    async def board(request: Request) -> Response:
        caller = await who(request)
        if caller is None:
            return to_login(request)
        return render(request, "board.html", caller)

    @app.get("/tasks", include_in_schema=False)
    async def tasks_page(
        request: Request,
        state: str = "",
        type: str = "",
        root: str = "",
        due_from: str = "",
        due_to: str = "",
        after: str = "",
    ) -> Response:
        caller = await who(request)
        if caller is None:
            return to_login(request)
        form = {"state": state, "type": type, "root": root, "due_from": due_from, "due_to": due_to}
        error, rows, nxt = None, [], None
        try:
            filters = {
                "state": State(state) if state else None,
                "type": type or None,
                "root_id": uuid.UUID(root) if root else None,
                "due_from": _time(due_from),
                "due_to": _time(due_to),
                "after": decode_cursor(after) if after else None,
            }
            rows = await api.service.list_tasks(**filters, limit=PAGE)
            if len(rows) == PAGE:
                nxt = urlencode({**form, "after": encode_cursor(rows[-1].due_at, rows[-1].id)})
        except (ValueError, TaskmgrError, BadRequest) as exc:  # shown on the page, not a 500
            error = _message(exc)
        types = [t.name for t in await api.service.list_types(include_deleted=True)]
        return render(request, "tasks.html", caller, form=form, rows=rows, next=nxt, error=error, types=types)

    @app.get("/tasks/{task_id}", include_in_schema=False)
    async def task_page(request: Request, task_id: str, notice: str = "") -> Response:
        caller = await who(request)
        if caller is None:
            return to_login(request)
        try:
            tid = uuid.UUID(task_id)
            task = await api.service.get_task(tid)
        except (ValueError, LookupError) as exc:
            return render(request, "missing.html", caller, 404, what=_message(exc))
        history = await api.service.history(tid)
        tree, _ = await api.service.audit(task.root_id)
        async with api.engine.connect() as conn:
            events = await event_store.events_of_task(conn, tid, limit=500)
        # The lifecycle events (task.<type>.<state>) repeat the state history shown above.
        events = [e for e in events if e.task_type != LIFECYCLE_TASK_TYPE]
        attempts = _attempts(history)
        return render(
            request,
            "task.html",
            caller,
            task=task,
            history=history,
            attempts=attempts,
            tree=_tree(tree, task.root_id),
            events=events,
            notice=notice,
            can_cancel=not task.state.terminal,
            can_retry=task.state is State.FAILED,
        )

    @app.post("/tasks/{task_id}/{action}", include_in_schema=False)
    async def task_action(request: Request, task_id: uuid.UUID, action: str) -> Response:
        caller = await who(request)
        if caller is None:
            return to_login(request)
        if not caller.token.scope.allows(Scope.WRITE):
            return render(request, "missing.html", caller, 403, what="Your token may only read.")
        try:
            if action == "cancel":
                await api.service.cancel(
                    task_id, reason=f"cancelled in the console by {caller.token.name}", source=caller.name
                )
            elif action == "retry":
                await api.service.retry(task_id, source=caller.name)
            else:
                return render(request, "missing.html", caller, 404, what=f"no action {action!r}")
            notice = (
                "Cancelled. If it was running, its runner has been told to stop."
                if action == "cancel"
                else "Retrying: it is due again now."
            )
        except (LookupError, TaskmgrError) as exc:
            notice = _message(exc)
        return RedirectResponse(f"/tasks/{task_id}?" + urlencode({"notice": notice}), status_code=303)

    @app.get("/runners", include_in_schema=False)
    async def runners_page(request: Request) -> Response:
        caller = await who(request)
        if caller is None:
            return to_login(request)
        runners = await read_runners(api.engine, api.settings.runner_dead_after)
        return render(request, "runners.html", caller, runners=runners)

    @app.get("/stats", include_in_schema=False)
    async def stats_page(request: Request, minutes: int = 60) -> Response:
        caller = await who(request)
        if caller is None:
            return to_login(request)
        minutes = min(max(minutes, 5), 7 * 24 * 60)
        now = utcnow()
        since = now - timedelta(minutes=minutes)
        async with api.engine.connect() as conn:
            hist = await overview.lateness_histogram(conn, since, LATENESS_WIDTH_MS, LATENESS_BUCKETS)
        width = _bucket_for(minutes)
        per_bucket = await api.service.counts_per_bucket(width, since, now)
        counts = await api.service.counts_by_state()
        return render(
            request,
            "stats.html",
            caller,
            minutes=minutes,
            hist=_histogram(hist),
            bucket=width,
            series=_series(per_bucket),
            counts={s.value: counts.get(s, 0) for s in State},
        )

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)


def _safe(next_: str) -> str:
    """Only a path on this site (an open redirect is a phishing tool)."""
    return next_ if next_.startswith("/") and not next_.startswith("//") else "/"


def _time(value: str) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(value)
    if t.tzinfo is None:
        raise ValueError(f"{value!r} needs a timezone (e.g. 2026-12-06T19:00Z)")
    return t


def _message(exc: BaseException) -> str:
    return str(exc).strip("'\"")[:300]


def _attempts(history: list[Any]) -> list[dict[str, Any]]:
    """One row per attempt: when it started, how late, on which runner, how it ended."""
    out: dict[int, dict[str, Any]] = {}
    for e in history:
        if not e.applied or e.attempt == 0:
            continue
        a = out.setdefault(
            e.attempt,
            {
                "attempt": e.attempt,
                "started": None,
                "lateness_ms": None,
                "runner": None,
                "ended": None,
                "state": None,
                "reason": None,
            },
        )
        if e.state is State.STARTED:
            a["started"], a["lateness_ms"] = e.time, e.detail.get("lateness_ms")
        if e.runner_id:
            a["runner"] = e.runner_id
        a["state"], a["ended"] = e.state.value, e.time
        a["reason"] = e.detail.get("reason") or e.detail.get("error") or a["reason"]
    return list(out.values())


def _tree(tasks: list[Any], root: uuid.UUID) -> list[tuple[int, Any]]:
    """The tree under `root` in depth-first order, with each task's depth."""
    children: dict[Any, list[Any]] = {}
    for t in tasks:
        children.setdefault(t.parent_id if t.id != root else None, []).append(t)
    out: list[tuple[int, Any]] = []

    def walk(parent: Any, depth: int) -> None:
        for t in sorted(children.get(parent, []), key=lambda t: t.due_at):
            out.append((depth, t))
            if len(out) < 500:
                walk(t.id, depth + 1)

    walk(None, 0)
    return out


def _histogram(counts: list[int]) -> list[dict[str, Any]]:
    top = max(counts) or 1
    out = []
    for i, n in enumerate(counts):
        lo = i * LATENESS_WIDTH_MS / 1000
        hi = lo + LATENESS_WIDTH_MS / 1000
        last = i == len(counts) - 1
        label = f"≥{lo:g} s" if last else f"{lo:g}-{hi:g} s"
        tick = label if last else (f"{lo:g} s" if lo == int(lo) else "")
        out.append({"label": label, "tick": tick, "n": n, "pct": round(100 * n / top, 1)})
    return out


def _bucket_for(minutes: int) -> str:
    for limit, width in ((60, "1 minute"), (360, "5 minutes"), (1440, "15 minutes"), (10080, "1 hour")):
        if minutes <= limit:
            return width
    return "1 day"


def _series(rows: list[tuple[datetime, State, int]]) -> dict[str, Any]:
    """State changes per bucket as stacked bars: buckets in order, per state a count."""
    buckets: dict[datetime, dict[str, int]] = {}
    for b, s, n in rows:
        buckets.setdefault(b, {})[s.value] = n
    top = max((sum(v.values()) for v in buckets.values()), default=0) or 1
    return {
        "top": top,
        "bars": [{"at": b, "by": v, "total": sum(v.values())} for b, v in sorted(buckets.items())],
    }
