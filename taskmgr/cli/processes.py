"""The long-lived processes and the schema: migrate, rebuild-state, manager, feed.

Each command imports what it runs inside its body, so that a process loads only its own
part: the manager does not load the simulated feed's web server (aiohttp), and the feed
loads neither the manager nor SQLAlchemy. tests/unit/test_imports.py checks it."""

from __future__ import annotations

import click

from taskmgr.cli.common import BadInput, opt, parse_json_arg, run, serve, settings_of, start_metrics, with_
from taskmgr.errors import TaskmgrError


@click.command()
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


@click.command("rebuild-state")
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


@click.command("manager")
@opt("--poll-interval", env="TASKMGR_POLL_INTERVAL", type=float, default=None, help="Seconds between polls.")
@opt("--metrics-port", env="TASKMGR_METRICS_PORT", type=int, default=None, help="Prometheus port (0: off).")
@click.pass_context
def manager_cmd(ctx: click.Context, poll_interval: float | None, metrics_port: int | None) -> None:
    """Run a Task Manager (several may run: one leads, the others stand by)."""
    from manager.app import run_manager
    from task_types.daily import daily_schedule_jobs
    from task_types.settings import SportsSettings

    settings = with_(settings_of(ctx), poll_interval=poll_interval, metrics_port=metrics_port)
    start_metrics(settings.metrics_port)
    # The sports part's leader job: the daily schedule (none when TASKMGR_SCHEDULE_CRON
    # is empty).
    jobs = daily_schedule_jobs(SportsSettings())
    serve(lambda s, stop: run_manager(s, stop, jobs=jobs), settings)




@click.command("feed")
@opt("--host", env="TASKMGR_FEED_HOST", default="127.0.0.1", show_default=True)
@opt("--port", env="TASKMGR_FEED_PORT", type=int, default=8765, show_default=True)
@opt("--seed", env="TASKMGR_FEED_SEED", type=int, default=1, show_default=True)
@opt("--games", env="TASKMGR_FEED_GAMES", type=int, default=2, show_default=True, help="Games per provider.")
@opt(
    "--period-s",
    env="TASKMGR_FEED_PERIOD_S",
    type=float,
    default=8.0,
    show_default=True,
    help="Real seconds per period.",
)
@opt("--first-start-s", env="TASKMGR_FEED_FIRST_START_S", type=float, default=10.0, show_default=True)
@opt("--spread-s", env="TASKMGR_FEED_SPREAD_S", type=float, default=50.0, show_default=True)
@opt(
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
