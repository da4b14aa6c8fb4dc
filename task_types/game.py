"""`live_game`: poll one game's box score until it is final.

The carried state is what the previous polls saw, so each poll emits only what is new;
every event key names the observation (not the poll), so two runners that see the same
box score emit the same event ids and consumers drop the repeat.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import httpx

from task_types.providers._json import clock_seconds
from task_types.providers.model import Game, GameStatus
from task_types.sports import SportsHandler, game_ref, game_url_template, parse_game, require
from taskmgr.handlers import EmittedEvent, FollowOn, Outcome, PollContext

__all__ = ["LiveGameHandler", "game_url_template"]

DEFAULT_STAT_CORRECTION_DELAY_S = 600.0
# Polling slows down this much before the start and in breaks, but never beyond the cap.
SLOW_FACTOR = 3.0
SLOW_CAP_S = 300.0
# In the last this-many seconds of the last regulation period, poll twice as often.
CLOSE_FINISH_S = 120.0
_DEFAULT_REGULATION = {"nba": 4, "espn": 4, "nhl": 3, "mlb": 9}


class LiveGameHandler(SportsHandler):
    name: ClassVar[str] = "live_game"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        require(ctx.payload, "game_id")
        game = parse_game(ctx.payload, response)
        return observe(ctx, game)


def _scores(game: Game) -> dict[str, int | None]:
    return {"home_score": game.home_score, "away_score": game.away_score}


def _period_data(game: Game, number: int) -> dict[str, Any]:
    # Only what the observation key (the period) determines: an event id must never
    # stand for two contents, so no running totals or clocks that a later poll sees
    # differently.
    line = next((p for p in game.periods if p.period == number), None)
    return {
        **game_ref(game),
        "period": number,
        "home": line.home if line else None,
        "away": line.away if line else None,
    }


def _interval(ctx: PollContext, game: Game) -> float:
    base = ctx.interval_s
    slow = max(base, min(base * SLOW_FACTOR, SLOW_CAP_S))
    if game.status is GameStatus.SCHEDULED:
        until_start = (game.start_utc - ctx.now).total_seconds()
        # Past the listed start (a late tip-off) keep the normal rhythm to catch it.
        return base if until_start <= 0 else max(base, min(slow, until_start))
    if game.intermission:
        return slow
    regulation = game.regulation_periods or _DEFAULT_REGULATION.get(game.provider, 0)
    left = clock_seconds(game.clock)
    if regulation and game.period >= regulation and left is not None and left <= CLOSE_FINISH_S:
        return max(base / 2, 0.5)
    return base


def observe(ctx: PollContext, game: Game) -> Outcome:
    """Compare one observation of a game with the carried state."""
    state = dict(ctx.state)
    payload = ctx.payload
    ref = game_ref(game)
    events: list[EmittedEvent] = []
    follow_ons: list[FollowOn] = []
    ended: list[int] = list(state.get("ended", []))

    if game.status is GameStatus.POSTPONED:
        events.append(EmittedEvent("game.postponed", "postponed", {**ref, "detail": game.detail}))
        return Outcome(events=events, state={**state, "status": game.status.value}, done=True)
    if game.status is GameStatus.CANCELLED:
        events.append(EmittedEvent("game.cancelled", "cancelled", {**ref, "detail": game.detail}))
        return Outcome(events=events, state={**state, "status": game.status.value}, done=True)

    under_way = game.status in (GameStatus.LIVE, GameStatus.FINAL)
    if under_way and not state.get("started"):
        # Also on the first poll of a game already under way: downstream has not heard yet.
        started = {**ref, "start_utc": game.start_utc.isoformat()}
        events.append(EmittedEvent("game.started", "started", started))
        state["started"] = True

    score = [game.away_score, game.home_score]
    if under_way and None not in score and score != state.get("score"):
        # The key names the observation (the same score seen by two polls has one id),
        # with a generation that grows whenever a score goes back (a disallowed goal, a
        # reviewed basket): the corrected score is a new event, not a repeat consumers
        # would drop. Box scores carry no play sequence to count instead, so a new
        # attempt (its runner died; it cannot know what the old one saw) starts a
        # generation of its own and never reuses an old id for a score that has since
        # changed.
        previous: list[int] = list(state.get("score") or [0, 0])
        away, home = int(game.away_score or 0), int(game.home_score or 0)
        back = away < previous[0] or home < previous[1]
        reversals = int(state.get("reversals", 0)) + (1 if back else 0)
        generation = "" if (ctx.attempt, reversals) == (1, 0) else f":a{ctx.attempt}r{reversals}"
        events.append(
            EmittedEvent(
                "score.changed",
                f"p{game.period}:{game.away_score}-{game.home_score}{generation}",
                {**ref, **_scores(game), "period": game.period},
            )
        )
        state["score"] = score
        state["reversals"] = reversals

    # A period is over when a later one has begun, or when the game is final.
    last_over = game.period if game.status is GameStatus.FINAL else game.period - 1
    for number in range(1, last_over + 1):
        if number in ended:
            continue
        events.append(EmittedEvent("period.ended", f"p{number}", _period_data(game, number)))
        follow_ons.append(
            FollowOn(
                type="period_score",
                payload={
                    "provider": game.provider,
                    "league": payload.get("league", game.league),
                    "game_id": game.game_id,
                    "period": number,
                },
                dedup_key=f"period-{number}",
            )
        )
        ended.append(number)
    state["ended"] = ended
    state["period"] = game.period
    state["status"] = game.status.value

    if game.status is GameStatus.FINAL:
        final = {**ref, **_scores(game), "periods": [asdict(p) for p in game.periods]}
        events.append(EmittedEvent("game.final", "final", final))
        delay = float(payload.get("stat_correction_delay_s", DEFAULT_STAT_CORRECTION_DELAY_S))
        follow_ons.append(
            FollowOn(
                type="stat_correction",
                payload={
                    "provider": game.provider,
                    "league": payload.get("league", game.league),
                    "game_id": game.game_id,
                    **_scores(game),
                },
                dedup_key="stat-correction",
                delay_s=delay,
            )
        )
        return Outcome(events=events, follow_ons=follow_ons, state=state, done=True)

    return Outcome(events=events, follow_ons=follow_ons, state=state, next_interval_s=_interval(ctx, game))
