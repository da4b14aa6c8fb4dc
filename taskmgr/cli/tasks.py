"""`taskmgr tasks`, `audit` and `logs`: tasks created, read, listed, rescheduled,
updated, cancelled and retried, with their history."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from taskmgr.cli.common import BadInput, parse_json_arg, parse_time, parse_uuid, run, settings_of
from taskmgr.cli.db import call, task_service
from taskmgr.cli.output import emit, output_option
from taskmgr.models import DependencyPolicy, State

TASK_COLUMNS = ["id", "name", "type", "state", "attempt", "priority", "due_at", "runner_id", "root_id"]
TASK_DETAIL = [*TASK_COLUMNS, "dedup_key", "run_at", "depends_on", "description", "payload"]
EVENT_COLUMNS = ["time", "state", "attempt", "applied", "source", "runner_id", "detail"]


@click.group()
def tasks() -> None:
    """Tasks: create, get, list, history, cancel, retry, status."""


def parse_parameters(values: Sequence[str], what: str = "--parameter") -> dict[str, Any]:
    """KEY=VALUE pairs as payload fields: the value is JSON if it parses (5, true,
    [1,2], {"a":1}, "quoted"), else the string as given."""
    fields: dict[str, Any] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BadInput(f"{what}: {item!r} is not KEY=VALUE")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields


def payload_of(payload: str | None, parameters: Sequence[str]) -> Any:
    """--payload (JSON) with the --parameter fields set over it; None when neither."""
    body = parse_json_arg(payload, "--payload")
    if not parameters:
        return body
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadInput("--payload: must be a JSON object to take --parameter fields")
    return {**body, **parse_parameters(parameters)}


PARAMETER_HELP = (
    "A payload field KEY=VALUE (repeatable): VALUE is JSON if it parses (5, true, "
    '"5", [1,2]), else a string. Set over --payload.'
)


@tasks.command("create")
@click.argument("name_or_type", metavar="NAME|TYPE")
@click.option("--type", "-t", "type_", default=None, help="The task type; the argument is then its name.")
@click.option("--parameter", "parameters", multiple=True, metavar="KEY=VALUE", help=PARAMETER_HELP)
@click.option("--payload", "-p", default=None, help="JSON payload, inline or @file (default: {}).")
@click.option("--name", default=None, help="The task's name (with TYPE as the argument).")
@click.option("--description", default=None, help="What the task is for.")
@click.option(
    "--priority",
    type=int,
    default=0,
    show_default=True,
    help="Among tasks due at the same time, higher starts first (-32768..32767).",
)
@click.option(
    "--after",
    "after",
    multiple=True,
    metavar="TASK",
    help="Wait for this task to end first (repeatable): due once all of them FINISHED.",
)
@click.option(
    "--on-dependency-failure",
    type=click.Choice([p.value for p in DependencyPolicy]),
    default=DependencyPolicy.FAIL.value,
    show_default=True,
    help="A task of --after that ends FAILED or CANCELLED: fail this one, or run it anyway.",
)
@click.option("--due", default=None, help="ISO-8601 due time with a timezone (default: now).")
@click.option("--in", "in_s", type=float, default=None, help="Due in this many seconds.")
@click.option("--dedup-key", default=None, help="Idempotency key.")
@click.option("--parent", default=None, help="Parent task id (a follow-on).")
@click.option("--every", type=float, default=None, help="Recur every N seconds.")
@click.option("--cron", default=None, help="Recur on a cron expression.")
@click.option("--timezone", default="UTC", show_default=True, help="Timezone of --cron.")
@click.option("--ends-after", type=int, default=None, help="Stop after N occurrences.")
@click.option("--ends-at", default=None, help="Stop after this ISO time.")
@output_option
@click.pass_context
def tasks_create(
    ctx: click.Context,
    name_or_type: str,
    type_: str | None,
    parameters: tuple[str, ...],
    payload: str | None,
    name: str | None,
    description: str | None,
    priority: int,
    after: tuple[str, ...],
    on_dependency_failure: str,
    due: str | None,
    in_s: float | None,
    dedup_key: str | None,
    parent: str | None,
    every: float | None,
    cron: str | None,
    timezone: str,
    ends_after: int | None,
    ends_at: str | None,
    output: str,
) -> None:
    """Schedule a task: `create NAME --type TYPE [--parameter K=V ...]`, or `create TYPE
    [-p JSON]`."""
    if type_ is not None:
        if name is not None:
            raise BadInput("--name: the argument is the name already (with --type)")
        name = name_or_type
    else:
        type_ = name_or_type
    body = payload_of(payload, parameters)
    body = {} if body is None else body
    depends_on = [parse_uuid(a, "--after") for a in after]
    due_at = parse_time(due, "--due")
    if in_s is not None:
        due_at = datetime.now(UTC) + timedelta(seconds=in_s)
    rec = None
    if every is not None or cron is not None:
        rec = {
            "every_s": every,
            "cron": cron,
            "timezone": timezone,
            "ends_after": ends_after,
            "ends_at": ends_at,
        }
        rec = {k: v for k, v in rec.items() if v is not None}
    parent_id = parse_uuid(parent, "--parent") if parent else None

    async def go() -> Any:
        async with task_service(settings_of(ctx)) as svc:
            async with svc.session() as session, session.begin():
                done = await svc.schedule(
                    session,
                    type_,
                    body,
                    due_at=due_at,
                    dedup_key=dedup_key,
                    parent_id=parent_id,
                    recurrence=rec,
                    created_by="cli",
                    name=name,
                    description=description,
                    priority=priority,
                    depends_on=depends_on,
                    on_dependency_failure=on_dependency_failure,
                )
            return await svc.get_task(done.id), done.created

    task, created = run(go())
    if not created:
        click.echo(f"dedup key {dedup_key!r} exists: task {task.id}", err=True)
    emit(task, output, TASK_COLUMNS)


@tasks.command("get")
@click.argument("task_id")
@output_option
@click.pass_context
def tasks_get(ctx: click.Context, task_id: str, output: str) -> None:
    tid = parse_uuid(task_id)

    emit(call(ctx, lambda svc: svc.get_task(tid), read=True), output, [*TASK_COLUMNS, "payload"])


@tasks.command("reschedule")
@click.argument("task_id")
@click.option("--at", "at", default=None, help="The new due time, ISO-8601 with a timezone.")
@click.option("--in", "in_s", type=float, default=None, help="Due this many seconds from now.")
@output_option
@click.pass_context
def tasks_reschedule(
    ctx: click.Context, task_id: str, at: str | None, in_s: float | None, output: str
) -> None:
    """Move a waiting (SCHEDULED or RETRYING) task to a new due time."""
    tid = parse_uuid(task_id)
    if (at is None) == (in_s is None):
        raise BadInput("give the new due time: --at ISO-TIME or --in SECONDS (one of them)")
    due_at = parse_time(at, "--at") if at is not None else datetime.now(UTC) + timedelta(seconds=in_s or 0)
    assert due_at is not None

    emit(call(ctx, lambda svc: svc.reschedule(tid, due_at)), output, TASK_DETAIL)


@tasks.command("update")
@click.argument("task_id")
@click.option("--payload", "-p", default=None, help="The new payload (JSON, inline or @file): replaces it.")
@click.option(
    "--parameter",
    "parameters",
    multiple=True,
    metavar="KEY=VALUE",
    help=PARAMETER_HELP + " Without --payload, the task's other fields are kept.",
)
@output_option
@click.pass_context
def tasks_update(
    ctx: click.Context, task_id: str, payload: str | None, parameters: tuple[str, ...], output: str
) -> None:
    """Change a waiting (SCHEDULED or RETRYING) task's payload; it must match its type's schema."""
    tid = parse_uuid(task_id)
    body = payload_of(payload, parameters)
    if body is None:
        raise BadInput("nothing to change: give -p JSON and/or --parameter KEY=VALUE")
    merge = payload is None

    emit(call(ctx, lambda svc: svc.update_payload(tid, body, merge=merge)), output, TASK_DETAIL)


@tasks.command("list")
@click.option("--type", "type_", default=None)
@click.option(
    "--state",
    type=click.Choice(
        [s.value for s in State],
        case_sensitive=False,
    ),
    default=None,
)
@click.option("--root", default=None, help="Only the tree under this root task.")
@click.option("--due-from", default=None, help="ISO time (inclusive).")
@click.option("--due-to", default=None, help="ISO time (exclusive).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--after", default=None, help="Cursor from the previous page (printed on stderr).")
@output_option
@click.pass_context
def tasks_list(
    ctx: click.Context,
    type_: str | None,
    state: str | None,
    root: str | None,
    due_from: str | None,
    due_to: str | None,
    limit: int,
    after: str | None,
    output: str,
) -> None:
    """List tasks by due time; page with --after CURSOR."""
    cursor = None
    if after:
        at, _, tid = after.partition("|")
        cursor = (parse_time(at, "--after"), parse_uuid(tid, "--after"))

    filters = {
        "type": type_,
        "state": State(state.upper()) if state else None,
        "root_id": parse_uuid(root, "--root") if root else None,
        "due_from": parse_time(due_from, "--due-from"),
        "due_to": parse_time(due_to, "--due-to"),
        "after": cursor,
        "limit": limit,
    }
    rows = call(ctx, lambda svc: svc.list_tasks(**filters), read=True)
    emit(rows, output, TASK_COLUMNS)
    if len(rows) == limit:
        click.echo(f"next page: --after '{rows[-1].due_at.isoformat()}|{rows[-1].id}'", err=True)


@tasks.command("history")
@click.argument("task_id")
@output_option
@click.pass_context
def tasks_history(ctx: click.Context, task_id: str, output: str) -> None:
    """Every state change of a task (and the reports kept for the record)."""
    tid = parse_uuid(task_id)

    emit(call(ctx, lambda svc: svc.history(tid), read=True), output, EVENT_COLUMNS)


@tasks.command("cancel")
@click.argument("task_id")
@click.option("--reason", default="cancelled by an operator")
@click.option(
    "--series",
    is_flag=True,
    help="A recurring task: end its series (this and every later occurrence). "
    "Without it only this occurrence is cancelled and the next one still comes.",
)
@output_option
@click.pass_context
def tasks_cancel(ctx: click.Context, task_id: str, reason: str, series: bool, output: str) -> None:
    """Cancel a task; a running one is stopped on its runner."""
    tid = parse_uuid(task_id)

    emit(call(ctx, lambda svc: svc.cancel(tid, reason=reason, series=series)), output, TASK_COLUMNS)


@tasks.command("retry")
@click.argument("task_id")
@output_option
@click.pass_context
def tasks_retry(ctx: click.Context, task_id: str, output: str) -> None:
    """Run a FAILED task again now."""
    tid = parse_uuid(task_id)

    emit(call(ctx, lambda svc: svc.retry(tid)), output, TASK_COLUMNS)


@tasks.command("status")
@click.option("--type", "type_", default=None)
@output_option
@click.pass_context
def tasks_status(ctx: click.Context, type_: str | None, output: str) -> None:
    """Counts of tasks by state."""
    counts = call(ctx, lambda svc: svc.counts_by_state(type=type_), read=True)
    rows = [{"state": s.value, "tasks": counts.get(s, 0)} for s in State]
    emit(rows if output == "table" else {r["state"]: r["tasks"] for r in rows}, output, ["state", "tasks"])


@click.command("audit")
@click.argument("root_id")
@output_option
@click.pass_context
def audit(ctx: click.Context, root_id: str, output: str) -> None:
    """The whole tree under a root task, with every state change."""
    rid = parse_uuid(root_id, "root task id")

    tasks_, events = call(ctx, lambda svc: svc.audit(rid), read=True)
    by_task: dict[uuid.UUID, list[Any]] = {}
    for e in events:
        by_task.setdefault(e.task_id, []).append(e)
    tree = [
        {
            "id": t.id,
            "type": t.type,
            "parent_id": t.parent_id,
            "state": t.state,
            "attempt": t.attempt,
            "changes": " > ".join(e.state.value for e in by_task.get(t.id, []) if e.applied),
            "events": [asdict(e) for e in by_task.get(t.id, [])],
        }
        for t in tasks_
    ]
    emit(tree, output, ["id", "type", "parent_id", "state", "attempt", "changes"])


@click.command("logs")
@click.argument("task_id")
@output_option
@click.pass_context
def logs_cmd(ctx: click.Context, task_id: str, output: str) -> None:
    """A task's polls, errors and state changes over time."""
    tid = parse_uuid(task_id)

    rows = [
        {
            "time": e.time,
            "attempt": e.attempt,
            "runner_id": e.runner_id,
            "what": e.detail.get("report") or e.state.value,
            "error": e.detail.get("error") or e.detail.get("reason") or "",
            "detail": e.detail,
        }
        for e in call(ctx, lambda svc: svc.history(tid), read=True)
    ]
    emit(rows, output, ["time", "attempt", "runner_id", "what", "error"])
