"""`stat_correction`: some minutes after the final, check whether the final score changed."""

from __future__ import annotations

from typing import ClassVar

import httpx

from task_types.sports import SportsHandler, game_ref, parse_game
from taskmgr.handlers import EmittedEvent, HandlerError, Outcome, PollContext


class StatCorrectionHandler(SportsHandler):
    name: ClassVar[str] = "stat_correction"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        try:
            before = {k: int(ctx.payload[k]) for k in ("home_score", "away_score")}
        except (KeyError, TypeError, ValueError):
            raise HandlerError("payload needs integer home_score and away_score") from None
        game = parse_game(ctx.payload, response)
        after = {"home_score": game.home_score, "away_score": game.away_score}
        changed = after != before
        ref = game_ref(game)
        events = [
            EmittedEvent(
                "stats.checked",
                "checked",
                {**ref, "changed": changed, "before": before, "after": after, "status": game.status.value},
            )
        ]
        if changed:
            key = f"{after['away_score']}-{after['home_score']}"
            events.append(EmittedEvent("score.corrected", key, {**ref, "before": before, "after": after}))
        return Outcome(events=events, done=True)
