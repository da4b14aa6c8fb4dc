"""`period_score`: one poll of the box score after a period ended, for its line score."""

from __future__ import annotations

from typing import ClassVar

import httpx

from task_types.sports import SportsHandler, game_ref, parse_game, require
from taskmgr.handlers import EmittedEvent, HandlerError, Outcome, PollContext


class PeriodScoreHandler(SportsHandler):
    name: ClassVar[str] = "period_score"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        raw = require(ctx.payload, "period")
        try:
            period = int(raw)
        except (TypeError, ValueError):
            raise HandlerError(f"payload period {raw!r} is not a number") from None
        game = parse_game(ctx.payload, response)
        line = next((p for p in game.periods if p.period == period), None)
        data = {
            **game_ref(game),
            "period": period,
            "home": line.home if line else None,
            "away": line.away if line else None,
            # False where the provider's box score has no line score (the NHL's: per-period
            # goals are only in /landing).
            "available": line is not None,
        }
        return Outcome(events=[EmittedEvent("period.score", f"p{period}", data)], done=True)
