"""`stat_correction`: some minutes after the final, check whether the final score changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from task_types.base import BaseHandler, EmittedEvent, HandlerError, Outcome, PollContext
from task_types.sports import fill_url, game_ref, parse_game


class StatCorrectionHandler(BaseHandler):
    name: ClassVar[str] = "stat_correction"

    def url(self, url_template: str, payload: Mapping[str, Any], base_urls: Mapping[str, str]) -> str:
        return fill_url(url_template, payload, base_urls)

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
