"""`taskmgr runner`: kept apart so that a runner process loads only what it uses (no
database client, no manager)."""

from __future__ import annotations

import click

from runners import run_runner
from taskmgr.cli.common import opt, serve, settings_of, with_


@click.command("runner")
@opt("--pool", env="TASKMGR_POOL", default=None, help="Runner pool (start queue) to serve.")
@opt("--concurrency", env="TASKMGR_CONCURRENCY", type=int, default=None, help="Most pollers at once.")
@opt("--metrics-port", env="TASKMGR_METRICS_PORT", type=int, default=None, help="Prometheus port (0: off).")
@click.pass_context
def runner_cmd(
    ctx: click.Context, pool: str | None, concurrency: int | None, metrics_port: int | None
) -> None:
    """Run an always-on TaskRunner for one pool."""
    # run_runner serves the metrics itself (TASKMGR_METRICS_PORT).
    serve(run_runner, with_(settings_of(ctx), pool=pool, concurrency=concurrency, metrics_port=metrics_port))
