"""`period_score`: one poll of the box score after a period ended, for its line score."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from task_types.base import BaseHandler, EmittedEvent, HandlerError, Outcome, PollContext
from task_types.sports import fill_url, game_ref, parse_game, require


class PeriodScoreHandler(BaseHandler):
    name: ClassVar[str] = "period_score"

    def url(self, url_template: str, payload: Mapping[str, Any], base_urls: Mapping[str, str]) -> str:
        return fill_url(url_template, payload, base_urls)

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
