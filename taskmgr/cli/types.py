"""`taskmgr types`: task types, added, changed, listed, deleted (soft) and restored."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from types import UnionType
from typing import Any, Union, get_args, get_origin

import click
from pydantic.fields import FieldInfo

from taskmgr.cli.common import BadInput, load_file, parse_json_arg
from taskmgr.cli.db import call
from taskmgr.cli.output import emit, output_option
from taskmgr.models import TYPE_LISTED, TaskTypeFields

# `types list` shows the fields the declaration marks as listed (taskmgr.models).
TYPE_COLUMNS = list(TYPE_LISTED)


def _flag(name: str, multiple: bool) -> str:
    """A field's flag: its name without the unit suffix, dashed; singular for a list
    (poll_interval_s: --poll-interval; required_services: --required-service)."""
    base = name.removesuffix("_s")
    return "--" + (base.removesuffix("s") if multiple else base).replace("_", "-")


class _NoLimit:
    """`none` given for a field that may be empty (max_runtime_s): set it to null."""


NO_LIMIT = _NoLimit()


class _OrNone(click.ParamType):
    """A number, or `none` for a field that may be empty."""

    def __init__(self, base: type) -> None:
        self.base = base
        self.name = f"{base.__name__}|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            return NO_LIMIT
        try:
            return self.base(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number or 'none'", param, ctx)


def _option(name: str, info: FieldInfo) -> Any:
    """The click option of one declared field, from its type, description and unit."""
    annotation: Any = info.annotation
    origin = get_origin(annotation)
    optional = origin in (Union, UnionType) and type(None) in get_args(annotation)
    if optional:
        [annotation] = [a for a in get_args(annotation) if a is not type(None)]
        origin = get_origin(annotation)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    help_ = info.description or ""
    if extra.get("unit"):
        help_ += f", in {extra['unit']}"
    kwargs: dict[str, Any] = {"default": None}
    if origin is tuple:
        kwargs["multiple"] = True
        help_ += "; repeat for each"
    elif origin is dict:
        help_ += ": JSON, inline or @file"
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        kwargs["type"] = click.Choice([m.value for m in annotation])
    elif annotation in (int, float):
        kwargs["type"] = _OrNone(annotation) if optional else annotation
        if optional:
            help_ += "; none: no limit"
    return click.option(_flag(name, origin is tuple), name, help=help_ + ".", **kwargs)


# The options of `types add` and `types update`: one per declared field but the name
# (an argument), and the flags of JSON fields, for their errors.
_FIELD_OPTIONS = {n: _option(n, f) for n, f in TaskTypeFields.model_fields.items() if n != "name"}
_JSON_FLAGS = {
    n: _flag(n, False) for n, f in TaskTypeFields.model_fields.items() if get_origin(f.annotation) is dict
}


def _type_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--file", "-f", "file", default=None, help="YAML or JSON file with the type's fields."),
        *_FIELD_OPTIONS.values(),
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
        if v is NO_LIMIT:
            values[k] = None
            continue
        values[k] = parse_json_arg(v, _JSON_FLAGS[k]) if k in _JSON_FLAGS else v
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
    types_ = call(ctx, lambda svc: svc.list_types(include_deleted=include_deleted), read=True)
    emit(types_, output, TYPE_COLUMNS)


@types.command("show")
@click.argument("name")
@output_option
@click.pass_context
def types_show(ctx: click.Context, name: str, output: str) -> None:
    t = call(ctx, lambda svc: svc.get_type(name, include_deleted=True), read=True)
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
