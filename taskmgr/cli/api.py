"""`taskmgr api` (the HTTP API and the web console) and `taskmgr tokens` (its API
tokens). The composition root of the API: the engine's routes (manager/api) and the
sports routes (task_types/api.py) in one app."""

from __future__ import annotations

import json
from typing import Any

import click

from taskmgr.cli.common import opt, run, serve, settings_of, with_
from taskmgr.cli.output import emit, output_option
from taskmgr.settings import Settings

TOKEN_COLUMNS = ["name", "scope", "created_at", "created_by", "last_used_at", "revoked_at"]


def build_app(settings: Settings, engine: Any) -> Any:
    """The API app with the sports routes, on `engine` (nothing connects until a request)."""
    from manager.api.app import Api, create_app
    from task_types.api import router as games_router
    from taskmgr.tokens import Scope

    def games(api: Api) -> Any:
        return games_router(engine=api.engine, service=api.service, read=api.auth.require(Scope.READ))

    return create_app(settings=settings, engine=engine, extra=[games])


def openapi_document(settings: Settings) -> dict[str, Any]:
    from taskmgr.db import make_engine

    return build_app(settings, make_engine(settings.database_url, pool_size=1)).openapi()  # type: ignore[no-any-return]


@click.command("api")
@opt("--host", env="TASKMGR_API_HOST", default=None, help="Address to listen on [default: 127.0.0.1].")
@opt("--port", env="TASKMGR_API_PORT", type=int, default=None, help="Port to listen on [default: 8080].")
@opt(
    "--workers",
    env="TASKMGR_API_WORKERS",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes serving the port (uvicorn's workers): one per free core.",
)
@click.option("--openapi", is_flag=True, help="Print the OpenAPI document (JSON) and exit.")
@click.pass_context
def api_cmd(ctx: click.Context, host: str | None, port: int | None, workers: int, openapi: bool) -> None:
    """The HTTP API and the web console (http://HOST:PORT/). Log in with an API token."""
    settings = with_(settings_of(ctx), api_host=host, api_port=port)
    if openapi:
        click.echo(json.dumps(openapi_document(settings), indent=2, sort_keys=True))
        return
    if workers > 1:
        serve_workers(settings, workers)
        return
    serve(main, settings)


def app_from_environment() -> Any:
    """The app of one worker process (`--workers`): its settings from the environment
    its parent set, its own engine."""
    from taskmgr.db import make_engine

    settings = Settings()  # type: ignore[call-arg]  # from the environment
    return build_app(settings, make_engine(settings.database_url, pool_size=10, name="taskmgr-api"))


def serve_workers(settings: Settings, workers: int) -> None:
    """uvicorn's process manager: `workers` processes accept on one socket; it handles
    SIGTERM and SIGINT itself (each worker's lifespan ends its stream reader)."""
    import os

    import uvicorn

    # The workers read their settings as any taskmgr process does; the command line's
    # options reach them through the environment.
    os.environ.update(
        {"TASKMGR_DATABASE_URL": settings.database_url, "TASKMGR_LOG_LEVEL": settings.log_level}
    )
    uvicorn.run(
        "taskmgr.cli.api:app_from_environment",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,
    )


async def main(settings: Settings, stop: Any) -> None:
    import asyncio

    import uvicorn

    from taskmgr.db import make_engine

    engine = make_engine(settings.database_url, pool_size=10, name="taskmgr-api")
    app = build_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    # uvicorn catches SIGTERM/SIGINT while it serves (and raises them again after, which
    # sets `stop`); a stop from elsewhere ends it too.
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        await task
        await engine.dispose()


@click.group()
def tokens() -> None:
    """API tokens: create (the secret is printed once), revoke, list."""


def _engine(ctx: click.Context) -> Any:
    from taskmgr.db import make_engine

    return make_engine(settings_of(ctx).database_url, pool_size=1, name="taskmgr-cli")


@tokens.command("create")
@click.option("--name", required=True, help="A name for the token (who or what uses it).")
@click.option(
    "--scope",
    type=click.Choice(["read", "write", "admin"]),
    default="read",
    show_default=True,
    help="read < write (create, cancel, retry tasks) < admin (task types).",
)
@output_option
@click.pass_context
def tokens_create(ctx: click.Context, name: str, scope: str, output: str) -> None:
    """Make a token; its secret is printed once (only its SHA-256 is stored)."""
    import getpass

    from taskmgr import tokens as store

    async def go() -> tuple[Any, str]:
        engine = _engine(ctx)
        try:
            async with engine.begin() as conn:
                return await store.create_token(conn, name, scope, created_by=getpass.getuser())
        finally:
            await engine.dispose()

    token, secret = run(go())
    if output == "table":
        click.echo(secret)
        click.echo(f"token {token.name!r} ({token.scope}): the secret above is shown only now", err=True)
    else:
        emit({"name": token.name, "scope": str(token.scope), "secret": secret}, output)


@tokens.command("revoke")
@click.argument("name")
@output_option
@click.pass_context
def tokens_revoke(ctx: click.Context, name: str, output: str) -> None:
    """Revoke a token: refused by the API within TASKMGR_API_TOKEN_CACHE_S seconds."""
    from taskmgr import tokens as store
    from taskmgr.service import utcnow

    async def go() -> Any:
        engine = _engine(ctx)
        try:
            async with engine.begin() as conn:
                return await store.revoke_token(conn, name, utcnow())
        finally:
            await engine.dispose()

    emit(_row(run(go())), output, TOKEN_COLUMNS)


@tokens.command("list")
@output_option
@click.pass_context
def tokens_list(ctx: click.Context, output: str) -> None:
    """Every token (never a secret: they are not stored)."""
    from taskmgr import tokens as store

    async def go() -> Any:
        engine = _engine(ctx)
        try:
            async with engine.connect() as conn:
                return await store.list_tokens(conn)
        finally:
            await engine.dispose()

    emit([_row(t) for t in run(go())], output, TOKEN_COLUMNS)


def _row(t: Any) -> dict[str, Any]:
    return {
        "name": t.name,
        "scope": str(t.scope),
        "created_at": t.created_at,
        "created_by": t.created_by,
        "last_used_at": t.last_used_at,
        "revoked_at": t.revoked_at,
    }
