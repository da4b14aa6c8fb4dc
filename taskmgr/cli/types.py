"""`taskmgr types`: task types, added, changed, listed, deleted (soft) and restored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from taskmgr.cli.common import BadInput, load_file, parse_json_arg
from taskmgr.cli.db import call
from taskmgr.cli.output import emit, output_option

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


@click.group()
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
