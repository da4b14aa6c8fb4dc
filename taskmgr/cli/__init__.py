"""The `taskmgr` command line: the one place that builds and wires the components.

Every option also reads an environment variable (named in --help). Exit codes:
0 success, 1 failure (not found, unhealthy, operation failed), 2 bad input or usage.

Each subcommand lives in a module of this package, loaded only when it runs: a
runner process loads neither SQLAlchemy nor the manager, so it stays small.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from taskmgr import logs
from taskmgr.cli.common import BadInput, opt
from taskmgr.settings import Settings

# httpx's package import also imports its own command-line client (httpx/_main.py, with
# rich and pygments: about 4.5 MB) whenever those are installed, and rich is installed for
# our tables. No taskmgr process runs httpx's command line, so the composition root keeps it
# out: an entry of None in sys.modules makes `import httpx._main` raise ImportError (the
# import system's documented module-cache rule), and httpx then falls back to the stub `main`
# it uses when its [cli] extra is not installed. tests/unit/test_imports.py checks both.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

# Subcommand -> "module:attribute" in this package.
COMMANDS = {
    "migrate": "processes:migrate",
    "rebuild-state": "processes:rebuild_state",
    "manager": "processes:manager_cmd",
    "recorder": "recorder:recorder_cmd",
    "runner": "runner:runner_cmd",
    "feed": "processes:feed",
    "types": "types:types",
    "tasks": "tasks:tasks",
    "audit": "tasks:audit",
    "logs": "tasks:logs_cmd",
    "events": "events:events",
    "games": "games:games",
    "schedule": "ops:schedule",
    "check": "ops:check",
    "status": "ops:status",
    "providers": "ops:providers",
    "demo": "ops:demo",
    "end2end": "ops:end2end",
    "bench": "bench:bench",
    "api": "api:api_cmd",
    "tokens": "api:tokens",
}
# The long-lived processes log at TASKMGR_LOG_LEVEL's default (INFO); the other commands
# print their result and log only errors unless --log-level (or the variable) says more.
PROCESSES = frozenset({"manager", "runner", "feed", "demo", "api"})
COMMAND_LOG_LEVEL = "ERROR"


class LazyGroup(click.Group):
    """A group whose subcommands are imported when they are used (click's documented
    pattern for large command lines)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@opt("--database-url", env="TASKMGR_DATABASE_URL", default=None, help="PostgreSQL (SQLAlchemy asyncpg URL).")
@opt("--amqp-url", env="TASKMGR_AMQP_URL", default=None, help="RabbitMQ URL.")
@opt("--amqp-prefix", env="TASKMGR_AMQP_PREFIX", default=None, help="Prefix of exchange and queue names.")
@opt(
    "--log-level",
    env="TASKMGR_LOG_LEVEL",
    default=None,
    help="DEBUG, INFO, WARNING, ERROR [default: ERROR for commands, INFO for the processes].",
)
@opt(
    "--log-format",
    env="TASKMGR_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format.",
)
@click.pass_context
def main(ctx: click.Context, **overrides: Any) -> None:
    """taskmgr: a task manager for live sports data (TimescaleDB + RabbitMQ)."""
    if overrides["log_level"] is None and ctx.invoked_subcommand not in PROCESSES:
        overrides["log_level"] = COMMAND_LOG_LEVEL
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise BadInput(f"settings: {exc}") from None
    logs.configure(settings.log_level, settings.log_format)
    ctx.obj = settings
