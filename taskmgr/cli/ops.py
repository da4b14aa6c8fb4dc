"""Operations: health, status, the daily schedule by hand, the sports adapters, the
demo and the end-to-end check."""

from __future__ import annotations

import json
import sys
from datetime import date

import click

from task_types.daily import DailySchedule
from task_types.providers import PROVIDERS
from task_types.providers.cli import parse_file
from task_types.settings import SportsSettings
from taskmgr.cli.common import EXIT_FAILURE, BadInput, Fail, run, settings_of
from taskmgr.cli.db import call
from taskmgr.cli.demo import run_demo
from taskmgr.cli.end2end import run_end2end
from taskmgr.cli.output import emit, jsonable, output_option
from taskmgr.handlers import ParseError
from taskmgr.health import check_health, system_status
from taskmgr.service import TaskService


@click.command("check")
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
    results = run(check_health(settings_of(ctx), need_runners=need_runners))
    emit(
        [{"check": k, "ok": ok, "detail": d} for k, (ok, d) in results.items()],
        output,
        ["check", "ok", "detail"],
    )
    if not all(ok for ok, _ in results.values()):
        sys.exit(EXIT_FAILURE)


@click.command("status")
@output_option
@click.pass_context
def status(ctx: click.Context, output: str) -> None:
    """The state of the system: schema version, task types, tasks by state, runners, leader."""
    emit(run(system_status(settings_of(ctx))), output if output != "table" else "yaml")


@click.group()
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
    settings = SportsSettings()
    try:
        wanted = date.fromisoformat(day)
    except ValueError:
        raise BadInput(f"--date: {day!r} is not a date like 2026-11-24") from None
    known = sorted({p for p, _ in settings.league_list()})
    unknown = sorted(set(providers) - set(known))
    if unknown:
        configured = ", ".join(known)
        raise BadInput(f"--provider: {unknown[0]!r} is not configured (TASKMGR_LEAGUES has {configured})")

    async def go(service: TaskService) -> int:
        daily = DailySchedule(service=service, settings=settings)
        return await daily.run_once(wanted, providers=list(providers) or None, manual=True)

    created = call(ctx, go)
    emit({"date": wanted.isoformat(), "schedule_tasks_created": created}, output)


@click.group()
def providers() -> None:
    """Sports API adapters."""


@providers.command("parse")
@click.argument("provider", type=click.Choice(sorted(PROVIDERS)))
@click.argument("kind", type=click.Choice(["schedule", "game"]))
@click.argument("file", type=click.Path(dir_okay=False))
def providers_parse(provider: str, kind: str, file: str) -> None:
    """Print, as JSON, what the adapter makes of a saved API response."""
    try:
        result = parse_file(provider, kind, file)
    except ParseError as exc:
        raise Fail(str(exc)) from None
    except (OSError, ValueError, LookupError) as exc:
        raise BadInput(str(exc)) from None
    click.echo(json.dumps(jsonable(result), indent=2))


@click.command("demo")
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
    code = run_demo(
        settings_of(ctx),
        minutes=None if keep_running else minutes,
        games=games,
        provider_urls=provider_urls,
        period_s=period_s,
        spread_s=spread_s,
    )
    sys.exit(code)


@click.command("end2end")
@click.option("-n", "count", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--deadline", type=float, default=60.0, show_default=True, help="Seconds to wait.")
@output_option
@click.pass_context
def end2end(ctx: click.Context, count: int, deadline: float, output: str) -> None:
    """Create N tasks against the simulated feed and follow them until done (needs a
    manager, a runner and the feed running)."""
    result = run(run_end2end(settings_of(ctx), count=count, deadline_s=deadline))
    emit(result, output, list(result))
    if result["finished"] < count:
        sys.exit(EXIT_FAILURE)
