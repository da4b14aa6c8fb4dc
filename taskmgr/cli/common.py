"""What every command shares: options that read the environment, errors that become
exit codes, running a coroutine or a long-lived process, parsing arguments."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from taskmgr.errors import InvalidInput, TaskmgrError
from taskmgr.redact import redact_text
from taskmgr.settings import Settings

T = TypeVar("T")
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def opt(*names: str, env: str, **kw: Any) -> Callable[[Any], Any]:
    """An option that also reads `env` and names it in --help."""
    return click.option(*names, envvar=env, show_envvar=True, **kw)


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
    import yaml  # only the commands that read a file need it, not the long-lived processes

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


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_root().obj  # type: ignore[no-any-return]


def with_(settings: Settings, **changes: Any) -> Settings:
    """The settings with the options given on the command line (None: not given)."""
    return settings.model_copy(update={k: v for k, v in changes.items() if v is not None})


def start_metrics(port: int) -> None:
    """Serve Prometheus metrics on `port` (0: not at all)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr="0.0.0.0")
