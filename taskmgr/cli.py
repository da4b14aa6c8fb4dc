"""The `taskmgr` command line.

Every option also reads an environment variable (named in --help). Exit codes:
0 success, 1 failure (not found, unhealthy, operation failed), 2 bad input or usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from taskmgr.errors import InvalidInput, TaskmgrError
from taskmgr.redact import redact_text
from taskmgr.settings import Settings

T = TypeVar("T")
OUTPUTS = click.Choice(["table", "json", "yaml"])
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


# -- plumbing -----------------------------------------------------------------------


def _opt(*names: str, env: str, **kw: Any) -> Callable[[Any], Any]:
    """An option that also reads `env` and names it in --help."""
    return click.option(*names, envvar=env, show_envvar=True, **kw)


def output_option(f: Any) -> Any:
    return click.option(
        "--output",
        "-o",
        type=OUTPUTS,
        default="table",
        show_default=True,
        envvar="TASKMGR_OUTPUT",
        show_envvar=True,
        help="Output format.",
    )(f)


class Fail(click.ClickException):
    exit_code = EXIT_FAILURE

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class BadInput(Fail):
    exit_code = EXIT_BAD_INPUT


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine; our errors become one line on stderr and an exit code."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None
    except (TaskmgrError, LookupError) as exc:
        raise Fail(redact_text(str(exc).strip("'\""))) from None


def serve(main: Callable[[Settings, asyncio.Event], Awaitable[None]], settings: Settings) -> None:
    """Run a long-lived process: SIGTERM or SIGINT sets the stop event."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    try:
        import uvloop

        uvloop.run(wrapper())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(wrapper())


def jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump())
    return value


def emit(data: Any, output: str, columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """Print rows (a list of dicts) or one object in the chosen format."""
    data = jsonable(data)
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False))
        return
    if output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    rows = data if isinstance(data, list) else [data]
    cols = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, show_lines=False)
    for c in cols:
        table.add_column(c, no_wrap=c in ("id", "task_id", "root_id", "parent_id", "time", "due_at"))
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    # Piped output is for grep and scripts: wide enough that ids never wrap.
    Console(width=None if sys.stdout.isatty() else 250).print(table)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))[:120]
    return str(v)


def parse_json_arg(value: str | None, what: str) -> Any:
    """A JSON value given inline or as @path."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise BadInput(f"{what}: cannot read {value[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{what}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def load_file(path: str) -> Any:
    """A YAML or JSON document from a file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML or JSON: {str(exc).splitlines()[0]}") from None


def parse_uuid(value: str, what: str = "task id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise BadInput(f"{what}: {value!r} is not a UUID") from None


def parse_time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise BadInput(f"{what}: {value!r} is not an ISO-8601 time") from None
    if t.tzinfo is None:
        raise BadInput(f"{what}: {value!r} needs a timezone (e.g. 2026-11-24T19:00:00Z)")
    return t


# -- the group -----------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_opt("--database-url", env="TASKMGR_DATABASE_URL", default=None, help="PostgreSQL (SQLAlchemy asyncpg URL).")
@_opt("--amqp-url", env="TASKMGR_AMQP_URL", default=None, help="RabbitMQ URL.")
@_opt("--amqp-prefix", env="TASKMGR_AMQP_PREFIX", default=None, help="Prefix of exchange and queue names.")
@_opt("--log-level", env="TASKMGR_LOG_LEVEL", default=None, help="DEBUG, INFO, WARNING, ERROR.")
@_opt(
    "--log-format",
    env="TASKMGR_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format.",
)
@click.pass_context
def main(ctx: click.Context, **overrides: Any) -> None:
    """taskmgr: a task manager for live sports data (TimescaleDB + RabbitMQ)."""
    from taskmgr import logs

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise BadInput(f"settings: {exc}") from None
    logs.configure(settings.log_level, settings.log_format)
    ctx.obj = settings


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_root().obj  # type: ignore[no-any-return]


def call(ctx: click.Context, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run one TaskService call (`fn(service)`) for a command, with the usual errors."""

    async def go() -> T:
        async with _service(settings_of(ctx)) as svc:
            return await fn(svc)

    return run(go())


@contextlib.asynccontextmanager
async def _service(settings: Settings):  # type: ignore[no-untyped-def]
    from taskmgr.db import make_engine
    from taskmgr.service import TaskService

    engine = make_engine(settings.database_url, pool_size=2, name="taskmgr-cli")
    try:
        yield TaskService(engine=engine)
    finally:
        await engine.dispose()


# -- schema and processes ------------------------------------------------------------


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Apply the missing SQL migrations (sql/NNNN_*.sql); safe to run again."""
    from taskmgr.migrate import current_version
    from taskmgr.migrate import migrate as do_migrate

    settings = settings_of(ctx)
    applied = run(do_migrate(settings.database_url))
    version = run(current_version(settings.database_url))
    click.echo(
        f"applied {', '.join(applied)}; schema version {version}"
        if applied
        else f"schema up to date (version {version})"
    )


class LeaderActive(TaskmgrError):
    """rebuild-state beside a running leader, which writes task_state meanwhile."""


@main.command("rebuild-state")
@click.option("--force", is_flag=True, help="Rebuild even while a manager leads (it may write meanwhile).")
@click.pass_context
def rebuild_state(ctx: click.Context, force: bool) -> None:
    """Recompute the current-state projection (task_state) from the task_events history.
    Run it with the managers stopped: it refuses while one leads, unless --force."""
    from taskmgr import store
    from taskmgr.db import make_engine

    async def go() -> int:
        engine = make_engine(settings_of(ctx).database_url, pool_size=1, name="taskmgr-cli")
        try:
            async with engine.begin() as conn:
                if not force and await store.leader_present(conn):
                    leader = await store.leader_name(conn)
                    raise LeaderActive(
                        f"a manager leader is active ({leader or 'unnamed'}): stop the managers first, "
                        "or rebuild anyway with --force; nothing was changed"
                    )
                return await store.rebuild_state(conn)
        finally:
            await engine.dispose()

    click.echo(f"rebuilt the state of {run(go())} tasks from task_events")


@main.command("manager")
@_opt("--poll-interval", env="TASKMGR_POLL_INTERVAL", type=float, default=None, help="Seconds between polls.")
@_opt("--metrics-port", env="TASKMGR_METRICS_PORT", type=int, default=None, help="Prometheus port (0: off).")
@click.pass_context
def manager_cmd(ctx: click.Context, poll_interval: float | None, metrics_port: int | None) -> None:
    """Run a Task Manager (several may run: one leads, the others stand by)."""
    from manager.app import run_manager

    settings = _with(settings_of(ctx), poll_interval=poll_interval, metrics_port=metrics_port)
    _metrics(settings)
    serve(run_manager, settings)


@main.command("runner")
@_opt("--pool", env="TASKMGR_POOL", default=None, help="Runner pool (start queue) to serve.")
@_opt("--concurrency", env="TASKMGR_CONCURRENCY", type=int, default=None, help="Most pollers at once.")
@_opt("--metrics-port", env="TASKMGR_METRICS_PORT", type=int, default=None, help="Prometheus port (0: off).")
@click.pass_context
def runner_cmd(
    ctx: click.Context, pool: str | None, concurrency: int | None, metrics_port: int | None
) -> None:
    """Run an always-on TaskRunner for one pool."""
    from runners import run_runner

    # run_runner serves the metrics itself (TASKMGR_METRICS_PORT).
    serve(run_runner, _with(settings_of(ctx), pool=pool, concurrency=concurrency, metrics_port=metrics_port))


def _with(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={k: v for k, v in changes.items() if v is not None})


def _metrics(settings: Settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr="0.0.0.0")


# -- task types ----------------------------------------------------------------------

TYPE_COLUMNS = [
    "name",
    "handler",
    "pool",
    "poll_interval_s",
    "max_attempts",
    "required_services",
    "misfire_policy",
    "deleted_at",
]


def _type_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--file", "-f", "file", default=None, help="YAML or JSON file with the type's fields."),
        click.option("--handler", default=None, help="Handler name (task_types/ or an entry point)."),
        click.option("--url-template", default=None, help="URL template; {base} is the provider's base URL."),
        click.option("--poll-interval", "poll_interval_s", type=float, default=None, help="Seconds."),
        click.option("--payload-schema", default=None, help="JSON Schema, inline or @file."),
        click.option("--max-attempts", type=int, default=None),
        click.option("--backoff-base", "backoff_base_s", type=float, default=None, help="Seconds."),
        click.option("--backoff-max", "backoff_max_s", type=float, default=None, help="Seconds."),
        click.option("--request-timeout", "request_timeout_s", type=float, default=None, help="Seconds."),
        click.option("--start-timeout", "start_timeout_s", type=float, default=None, help="Seconds."),
        click.option("--max-consecutive-failures", type=int, default=None),
        click.option("--pool", default=None),
        click.option("--required-service", "required_services", multiple=True, help="Repeat for each."),
        click.option("--misfire-policy", type=click.Choice(["coalesce", "catch_up", "skip"]), default=None),
        click.option("--misfire-grace", "misfire_grace_s", type=float, default=None, help="Seconds."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _type_values(file: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if file:
        doc = load_file(file)
        if not isinstance(doc, dict):
            raise BadInput(f"{file}: expected a mapping of task type fields")
        values.update(doc)
    for k, v in flags.items():
        if v is None or v == ():
            continue
        values[k] = parse_json_arg(v, "--payload-schema") if k == "payload_schema" else v
    return values


@main.group()
def types() -> None:
    """Task types: add, update, list, show, delete (soft), restore."""


@types.command("add")
@click.argument("name", required=False)
@_type_options
@output_option
@click.pass_context
def types_add(ctx: click.Context, name: str | None, file: str | None, output: str, **flags: Any) -> None:
    """Add a task type from flags or a file."""
    values = _type_values(file, flags)
    if name:
        values["name"] = name
    if "name" not in values:
        raise BadInput("name: give NAME or a file with a name")

    emit(call(ctx, lambda svc: svc.create_type(values)), output, TYPE_COLUMNS)


@types.command("update")
@click.argument("name")
@_type_options
@output_option
@click.pass_context
def types_update(ctx: click.Context, name: str, file: str | None, output: str, **flags: Any) -> None:
    """Change fields of a task type (takes effect at the next dispatch; no restart)."""
    values = _type_values(file, flags)
    values.pop("name", None)
    if not values:
        raise BadInput("nothing to change: give flags or --file")

    emit(call(ctx, lambda svc: svc.update_type(name, **values)), output, TYPE_COLUMNS)


@types.command("list")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted types.")
@output_option
@click.pass_context
def types_list(ctx: click.Context, include_deleted: bool, output: str) -> None:
    emit(call(ctx, lambda svc: svc.list_types(include_deleted=include_deleted)), output, TYPE_COLUMNS)


@types.command("show")
@click.argument("name")
@output_option
@click.pass_context
def types_show(ctx: click.Context, name: str, output: str) -> None:
    t = call(ctx, lambda svc: svc.get_type(name, include_deleted=True))
    emit(t, output, None if output != "table" else [*TYPE_COLUMNS, "url_template", "payload_schema"])


@types.command("delete")
@click.argument("name")
@output_option
@click.pass_context
def types_delete(ctx: click.Context, name: str, output: str) -> None:
    """Soft delete: no new tasks of this type; history and scheduled tasks stay."""

    emit(call(ctx, lambda svc: svc.delete_type(name)), output, TYPE_COLUMNS)


@types.command("restore")
@click.argument("name")
@output_option
@click.pass_context
def types_restore(ctx: click.Context, name: str, output: str) -> None:
    emit(call(ctx, lambda svc: svc.restore_type(name)), output, TYPE_COLUMNS)


# -- tasks ---------------------------------------------------------------------------

TASK_COLUMNS = ["id", "type", "state", "attempt", "due_at", "runner_id", "root_id", "dedup_key"]
EVENT_COLUMNS = ["time", "state", "attempt", "applied", "source", "runner_id", "detail"]


@main.group()
def schedule() -> None:
    """The daily schedule job (one schedule task per provider and league)."""


@schedule.command("seed")
@click.option("--date", "day", required=True, help="The day to seed, YYYY-MM-DD.")
@click.option("--provider", "providers", multiple=True, help="Only this provider (repeatable).")
@output_option
@click.pass_context
def schedule_seed(ctx: click.Context, day: str, providers: tuple[str, ...], output: str) -> None:
    """Seed a day's schedule by hand: a new sync of the day even if it was seeded
    (games are never duplicated; moved and dropped ones are followed)."""
    from manager.schedule_cron import ScheduleCron

    settings = settings_of(ctx)
    try:
        wanted = date.fromisoformat(day)
    except ValueError:
        raise BadInput(f"--date: {day!r} is not a date like 2026-11-24") from None
    known = sorted({p for p, _ in settings.league_list()})
    unknown = sorted(set(providers) - set(known))
    if unknown:
        configured = ", ".join(known)
        raise BadInput(f"--provider: {unknown[0]!r} is not configured (TASKMGR_LEAGUES has {configured})")

    async def go(service: Any) -> int:
        cron = ScheduleCron(service=service, settings=settings)
        return await cron.run_once(wanted, providers=list(providers) or None, manual=True)

    created = call(ctx, go)
    emit({"date": wanted.isoformat(), "schedule_tasks_created": created}, output)


@main.group()
def tasks() -> None:
    """Tasks: create, get, list, history, cancel, retry, status."""


@tasks.command("create")
@click.argument("type_")
@click.option("--payload", "-p", default="{}", help="JSON payload, inline or @file.")
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
    type_: str,
    payload: str,
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
    """Schedule a task of TYPE."""
    body = parse_json_arg(payload, "--payload")
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
        async with _service(settings_of(ctx)) as svc:
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

    emit(call(ctx, lambda svc: svc.get_task(tid)), output, [*TASK_COLUMNS, "payload"])


@tasks.command("list")
@click.option("--type", "type_", default=None)
@click.option(
    "--state",
    type=click.Choice(
        ["SCHEDULED", "STARTED", "RUNNING", "RETRYING", "FINISHED", "FAILED", "CANCELLED"],
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
    from taskmgr.models import State

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
    rows = call(ctx, lambda svc: svc.list_tasks(**filters))
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

    emit(call(ctx, lambda svc: svc.history(tid)), output, EVENT_COLUMNS)


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
    from taskmgr.models import State

    counts = call(ctx, lambda svc: svc.counts_by_state(type=type_))
    rows = [{"state": s.value, "tasks": counts.get(s, 0)} for s in State]
    emit(rows if output == "table" else {r["state"]: r["tasks"] for r in rows}, output, ["state", "tasks"])


@main.command("audit")
@click.argument("root_id")
@output_option
@click.pass_context
def audit(ctx: click.Context, root_id: str, output: str) -> None:
    """The whole tree under a root task, with every state change."""
    rid = parse_uuid(root_id, "root task id")

    tasks_, events = call(ctx, lambda svc: svc.audit(rid))
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


@main.command("logs")
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
        for e in call(ctx, lambda svc: svc.history(tid))
    ]
    emit(rows, output, ["time", "attempt", "runner_id", "what", "error"])


# -- events, health ----------------------------------------------------------------


@main.group()
def events() -> None:
    """Events published by the runners."""


@events.command("tail")
@click.option(
    "--routing-key", default="#", show_default=True, help="Binding pattern, e.g. 'live_game.score.*'."
)
@click.option("--count", type=int, default=0, help="Stop after this many events (0: run until Ctrl-C).")
@click.option("--timeout", type=float, default=0, help="Stop after this many seconds (0: never).")
@output_option
@click.pass_context
def events_tail(ctx: click.Context, routing_key: str, count: int, timeout: float, output: str) -> None:
    """Bind a temporary queue to the events exchange and print events as they arrive."""
    from taskmgr.broker import Consumer, Topology
    from taskmgr.messages import decode_event

    settings = settings_of(ctx)

    async def go() -> int:
        import aio_pika

        from taskmgr.messages import BadMessage

        got = 0
        done = asyncio.Event()

        async def on_event(message: Any) -> None:
            nonlocal got
            # Deliveries are handled concurrently: count before any await, so --count N
            # prints N events, not the N plus those already prefetched.
            if count and got >= count:
                return  # unacked: the temporary queue goes away with us
            try:
                ev = decode_event(message.body)
            except BadMessage as exc:
                await message.ack()
                click.echo(f"skipped a malformed event ({message.routing_key}): {exc}", err=True)
                return
            got += 1
            if count and got >= count:
                done.set()
            await message.ack()
            row = {
                "time": ev.observed_at,
                "routing_key": message.routing_key,
                "event_id": ev.event_id,
                "task_id": ev.task_id,
                "runner": ev.task_runner_id,
                "data": ev.data,
            }
            if output == "table":
                click.echo(
                    f"{row['time'].isoformat(timespec='seconds')}  {row['routing_key']:<32} "
                    f"task={str(ev.task_id)[:8]} runner={ev.task_runner_id} {json.dumps(ev.data)[:100]}"
                )
            elif output == "json":  # JSON Lines: one event per line, for jq and scripts
                click.echo(json.dumps(jsonable(row), separators=(",", ":")))
            else:  # a YAML document per event
                doc = yaml.safe_dump(jsonable(row), sort_keys=False, allow_unicode=True)
                click.echo("---\n" + doc.rstrip())

        exchange = Topology(settings.amqp_prefix).events
        try:
            async with Consumer(
                url=settings.amqp_url, topology=Topology(settings.amqp_prefix), prefetch=100, declare=False
            ) as c:
                try:
                    await c.consume_events(routing_key, on_event)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    raise Fail(
                        f"no exchange {exchange!r}: no manager or runner has declared it yet "
                        "(or --amqp-prefix is wrong)"
                    ) from None
                click.echo(f"listening on {exchange} for {routing_key!r}", err=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout or None):
                        await done.wait()
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise Fail(f"RabbitMQ: {exc!r}"[:300]) from None
        return got

    with contextlib.suppress(KeyboardInterrupt):
        run(go())


@main.command("check")
@click.option(
    "--runners/--no-runners",
    "need_runners",
    default=True,
    show_default=True,
    help="Require at least one heartbeating runner.",
)
@output_option
@click.pass_context
def check(ctx: click.Context, need_runners: bool, output: str) -> None:
    """Health probe: database, broker, a leader, runners heartbeating. Exit 0 or 1."""
    from taskmgr.health import check_health

    results = run(check_health(settings_of(ctx), need_runners=need_runners))
    emit(
        [{"check": k, "ok": ok, "detail": d} for k, (ok, d) in results.items()],
        output,
        ["check", "ok", "detail"],
    )
    if not all(ok for ok, _ in results.values()):
        sys.exit(EXIT_FAILURE)


@main.command("status")
@output_option
@click.pass_context
def status(ctx: click.Context, output: str) -> None:
    """The state of the system: schema version, task types, tasks by state, runners, leader."""
    from taskmgr.health import system_status

    emit(run(system_status(settings_of(ctx))), output if output != "table" else "yaml")


# -- sports ----------------------------------------------------------------------------


@main.group()
def providers() -> None:
    """Sports API adapters."""


@providers.command("parse")
@click.argument("provider", type=click.Choice(["nba", "espn", "mlb", "nhl"]))
@click.argument("kind", type=click.Choice(["schedule", "game"]))
@click.argument("file", type=click.Path(dir_okay=False))
def providers_parse(provider: str, kind: str, file: str) -> None:
    """Print, as JSON, what the adapter makes of a saved API response."""
    from task_types.base import ParseError
    from task_types.providers.cli import parse_file

    try:
        result = parse_file(provider, kind, file)
    except ParseError as exc:
        raise Fail(str(exc)) from None
    except (OSError, ValueError, LookupError) as exc:
        raise BadInput(str(exc)) from None
    click.echo(json.dumps(jsonable(result), indent=2))


@main.command("feed")
@_opt("--host", env="TASKMGR_FEED_HOST", default="127.0.0.1", show_default=True)
@_opt("--port", env="TASKMGR_FEED_PORT", type=int, default=8765, show_default=True)
@_opt("--seed", env="TASKMGR_FEED_SEED", type=int, default=1, show_default=True)
@_opt("--games", env="TASKMGR_FEED_GAMES", type=int, default=2, show_default=True, help="Games per provider.")
@_opt(
    "--period-s",
    env="TASKMGR_FEED_PERIOD_S",
    type=float,
    default=8.0,
    show_default=True,
    help="Real seconds per period.",
)
@_opt("--first-start-s", env="TASKMGR_FEED_FIRST_START_S", type=float, default=10.0, show_default=True)
@_opt("--spread-s", env="TASKMGR_FEED_SPREAD_S", type=float, default=50.0, show_default=True)
@_opt(
    "--faults",
    env="TASKMGR_FEED_FAULTS",
    default=None,
    help="JSON of fault rates, e.g. '{\"error_5xx\": 0.05}'.",
)
def feed(
    host: str,
    port: int,
    seed: int,
    games: int,
    period_s: float,
    first_start_s: float,
    spread_s: float,
    faults: str | None,
) -> None:
    """Serve the simulated sports feed (every provider's real JSON shape, accelerated)."""
    from task_types.feed import Faults, FeedConfig
    from task_types.feed import main as feed_main

    extra = parse_json_arg(faults, "--faults") or {}
    try:
        config = FeedConfig(
            seed=seed,
            games_per_provider=games,
            period_s=period_s,
            first_start_s=first_start_s,
            spread_s=spread_s,
            faults=Faults(**extra),
        )
    except TypeError as exc:
        raise BadInput(f"--faults: {exc}") from None
    feed_main(config, host, port)


@main.command("demo")
@click.option("--minutes", type=float, default=3.0, show_default=True, help="Stop after this long.")
@click.option("--keep-running", is_flag=True, help="Run until Ctrl-C.")
@click.option("--games", type=int, default=2, show_default=True, help="Simulated games per provider.")
@click.option("--provider-urls", default="", help="Real provider base URLs (default: the simulated feed).")
@click.option("--period-s", type=float, default=8.0, show_default=True, help="Simulated seconds per period.")
@click.option("--spread-s", type=float, default=45.0, show_default=True, help="The games start over this.")
@click.pass_context
def demo(
    ctx: click.Context,
    minutes: float,
    keep_running: bool,
    games: int,
    provider_urls: str,
    period_s: float,
    spread_s: float,
) -> None:
    """The live demo: feed, manager, two runners, a day of games, events in the terminal.
    Exit 0 when every game ended, 1 otherwise."""
    from taskmgr.demo import run_demo

    code = run_demo(
        settings_of(ctx),
        minutes=None if keep_running else minutes,
        games=games,
        provider_urls=provider_urls,
        period_s=period_s,
        spread_s=spread_s,
    )
    sys.exit(code)


@main.command("end2end")
@click.option("-n", "count", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--deadline", type=float, default=60.0, show_default=True, help="Seconds to wait.")
@output_option
@click.pass_context
def end2end(ctx: click.Context, count: int, deadline: float, output: str) -> None:
    """Create N tasks against the simulated feed and follow them until done (needs a
    manager, a runner and the feed running)."""
    from taskmgr.end2end import run_end2end

    result = run(run_end2end(settings_of(ctx), count=count, deadline_s=deadline, progress=output == "table"))
    emit(result, output, list(result))
    if result["finished"] < count:
        sys.exit(EXIT_FAILURE)


@main.group()
def bench() -> None:
    """Benchmarks (JSON on the last line of output)."""


def _lazy_bench(name: str, help_: str, params: Iterable[click.Parameter]) -> None:
    @bench.command(name, help=help_, params=list(params))
    @click.pass_context
    def cmd(ctx: click.Context, **kw: Any) -> None:
        import importlib

        mod = importlib.import_module(f"bench.{name}")
        result = run(mod.main(settings_of(ctx), **kw))
        click.echo(json.dumps(result))


_lazy_bench(
    "dispatch",
    "N tasks due at one instant: throughput and lateness to a runner process.",
    [
        click.Option(["--tasks"], type=int, default=10000, show_default=True),
        click.Option(["--vs"], default="", help="Peers to compare: taskiq,procrastinate,..."),
        click.Option(
            ["--profile"], default=None, help="Write a py-spy profile (collapsed stacks) of the manager here."
        ),
        click.Option(
            ["--variant"],
            default="",
            help="Experimental dispatch: timed,pipelined,nometrics (bench/manager_variant.py).",
        ),
    ],
)
_lazy_bench(
    "discovery",
    "A poll's time with N events in history against an empty history.",
    [
        click.Option(["--events"], type=int, default=10_000_000, show_default=True),
    ],
)
_lazy_bench(
    "runner",
    "One runner process polling a local box-score server.",
    [
        click.Option(["--pollers"], type=int, default=10000, show_default=True),
        click.Option(["--interval"], type=float, default=10.0, show_default=True),
        click.Option(["--seconds"], type=float, default=30.0, show_default=True),
        click.Option(
            ["--etag"],
            type=click.Choice(["both", "on", "off"]),
            default="both",
            show_default=True,
            help="Serve the box score with an ETag (304s), without, or both runs.",
        ),
    ],
)
_lazy_bench(
    "footprint",
    "Idle RSS of a manager and a runner, and of a runner holding N pollers.",
    [
        click.Option(["--pollers"], type=int, default=10000, show_default=True),
    ],
)


@bench.command("chaos")
@click.option("--minutes", type=float, default=5.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Replay a run (printed in its output).")
@click.option(
    "--kinds",
    default="all",
    show_default=True,
    help="Fault kinds to inject, comma-separated, or all: runner, manager, broker, postgres, api, freeze, "
    "poison, alarm, bomb, reversal.",
)
@click.pass_context
def bench_chaos(ctx: click.Context, minutes: float, seed: int | None, kinds: str) -> None:
    """A game day under faults; checks the invariants against the feed's ground truth.
    Exit 1 if one failed. Restarts PostgreSQL (needs root): not for a shared server."""
    from bench.chaos import main as chaos

    try:
        result = run(chaos(settings_of(ctx), minutes=minutes, seed=seed, kinds=kinds))
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    click.echo(json.dumps(result))
    if not result["ok"]:
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":  # pragma: no cover
    main()
