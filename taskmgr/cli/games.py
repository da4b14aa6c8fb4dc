"""`taskmgr games`: a game as the event history tells it (the sports part's view of the
emitted_events hypertable; see task_types/games.py)."""

from __future__ import annotations

from typing import Any

import click

from task_types.games import candidate_keys, events_of_game, minutes_of_game, resolve_game, summarize
from taskmgr.cli.common import BadInput, run, settings_of
from taskmgr.cli.output import emit, output_option
from taskmgr.db import make_engine
from taskmgr.errors import InvalidInput

# A game's events are few (hundreds); more than this is not one game's.
MAX_EVENTS = 100_000


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
                key = await resolve_game(conn, game)
                events = await events_of_game(conn, key, limit=MAX_EVENTS)
                minutes = await minutes_of_game(conn, key)
        finally:
            await engine.dispose()
        s = summarize(key, events)
        return {
            "game": key,
            "home": s.teams.get("home"),
            "away": s.teams.get("away"),
            "status": s.status,
            "score": s.score,
            "corrected": s.corrected,
            "periods": [{"period": n, **line} for n, line in s.periods.items()],
            "events": [
                {
                    "time": e.time,
                    "kind": e.kind,
                    "task_type": e.task_type,
                    "summary": _summary(e.kind, e.data),
                    "event_id": e.event_id,
                    "runner_id": e.runner_id,
                }
                for e in events
            ],
            "per_minute": [
                {"minute": m.minute, "events": m.events, "score_changes": m.score_changes} for m in minutes
            ],
        }

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


def _summary(kind: str, d: dict[str, Any]) -> str:
    if kind == "score.changed":
        return f"P{d.get('period')}: {d.get('away_score')}-{d.get('home_score')} (away-home)"
    if kind in ("period.ended", "period.score"):
        return f"P{d.get('period')}: {d.get('away')}-{d.get('home')}"
    if kind == "game.final":
        return f"final {d.get('away_score')}-{d.get('home_score')}"
    if kind == "score.corrected":
        b, a = d.get("before", {}), d.get("after", {})
        return f"{b.get('away_score')}-{b.get('home_score')} -> {a.get('away_score')}-{a.get('home_score')}"
    if kind == "game.started":
        return f"{d.get('away_team')} at {d.get('home_team')}"
    return str(d.get("detail", ""))[:80]
