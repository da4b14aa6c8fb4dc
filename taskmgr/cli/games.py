"""`taskmgr games`: a game as the event history tells it (the sports part's view of the
emitted_events hypertable; see task_types/games.py)."""

from __future__ import annotations

from typing import Any

import click

from task_types.games import candidate_keys, game_document, resolve_game
from taskmgr.cli.common import BadInput, run, settings_of
from taskmgr.cli.output import emit, output_option
from taskmgr.db import make_engine
from taskmgr.errors import InvalidInput

# A game's events are few (hundreds); more than this is not one game's.


@click.group()
def games() -> None:
    """Games in the event history."""


@games.command("show")
@click.argument("game")
@output_option
@click.pass_context
def games_show(ctx: click.Context, game: str, output: str) -> None:
    """GAME's score by period, its events in order and its events per minute (a
    TimescaleDB time_bucket), from the history. GAME is <provider>:<game_id> (e.g.
    nba:0022400061), or the id alone when one provider has it."""
    try:
        candidate_keys(game)  # a malformed game is bad input before any connection
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None

    async def go() -> dict[str, Any]:
        engine = make_engine(settings_of(ctx).reads_url, pool_size=1, name="taskmgr-cli")
        try:
            async with engine.connect() as conn:
                return await game_document(conn, await resolve_game(conn, game))
        finally:
            await engine.dispose()

    doc = run(go())
    if output != "table":
        emit(doc, output)
        return
    score = doc["score"]
    click.echo(
        f"{doc['game']}  {doc['away']} {score['away']} at {doc['home']} {score['home']}  ({doc['status']}"
        + (", corrected" if doc["corrected"] else "")
        + ")"
    )
    emit(doc["periods"], output, ["period", "away", "home"], title="score by period")
    emit(doc["events"], output, ["time", "kind", "summary", "runner_id"], title="events")
    emit(doc["per_minute"], output, ["minute", "events", "score_changes"], title="events per minute")
