"""`taskmgr recorder`: store every event of the events exchange once, in the history."""

from __future__ import annotations

import click

from manager.recorder import run_recorder
from taskmgr.cli.common import opt, serve, settings_of, start_metrics, with_


@click.command("recorder")
@opt(
    "--batch",
    env="TASKMGR_RECORDER_BATCH",
    type=click.IntRange(1, 50_000),
    default=None,
    help="Events stored per transaction (default 5000).",
)
@opt("--metrics-port", env="TASKMGR_METRICS_PORT", type=int, default=None, help="Prometheus port (0: off).")
@click.pass_context
def recorder_cmd(ctx: click.Context, batch: int | None, metrics_port: int | None) -> None:
    """Run an event recorder: consumes its own durable queue (P.events.recorder) and
    stores each event once in emitted_events. Several may run on the one queue. Runs as
    the manager's database role and RabbitMQ user."""
    settings = with_(settings_of(ctx), recorder_batch=batch, metrics_port=metrics_port)
    start_metrics(settings.metrics_port)
    serve(run_recorder, settings)
