"""Command output: human tables by default, JSON or YAML for scripts."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

OUTPUTS = click.Choice(["table", "json", "yaml"])


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
