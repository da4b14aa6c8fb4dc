"""`schedule`: read a league's schedule for a day and keep one game task per game."""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import timedelta
from typing import ClassVar

import httpx

from task_types.providers.model import Game, GameStatus
from task_types.sports import SportsHandler, payload_day, provider_of
from taskmgr.handlers import ChildSync, EmittedEvent, FollowOn, Outcome, PollContext, json_body

# Games that will not be played get no task: leaving them out of the sync cancels theirs.
_NOT_PLAYED = frozenset({GameStatus.POSTPONED, GameStatus.CANCELLED})


def _fingerprint(games: list[Game]) -> str:
    listing = sorted(f"{g.game_id}|{g.start_utc.isoformat()}|{g.status.value}" for g in games)
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]


class ScheduleHandler(SportsHandler):
    name: ClassVar[str] = "schedule"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        payload = ctx.payload
        provider = provider_of(payload)
        league = str(payload.get("league", provider.name))
        day = payload_day(payload)
        lead = timedelta(seconds=float(payload.get("lead_s", 0.0)))
        game_type = str(payload.get("game_type", "live_game"))
        games = provider.parse_schedule(json_body(response, provider.name), league, day=day)
        follow_ons = [
            FollowOn(
                type=game_type,
                payload={"provider": provider.name, "league": league, "game_id": game.game_id},
                dedup_key=game.game_id,
                due_at=game.start_utc - lead,
            )
            for game in games
            if game.status not in _NOT_PLAYED
        ]
        counts = Counter(g.status.value for g in games)
        data = {
            "provider": provider.name,
            "league": league,
            "date": day.isoformat(),
            "games": len(games),
            "tasks": len(follow_ons),
            "by_status": dict(sorted(counts.items())),
            "game_ids": sorted(f.dedup_key for f in follow_ons),
        }
        scope = f"{provider.name}:{league}:{day.isoformat()}"
        fingerprint = _fingerprint(games)
        if ctx.state.get("listing") != fingerprint:
            # A listing is synced only when a second fetch shows the same: an empty or
            # sharply shrunken response (a provider's glitch) would otherwise cancel every
            # game in scope. The next poll comes at the type's interval.
            return Outcome(state={"listing": fingerprint, "games": len(games)}, refetch=True)
        return Outcome(
            events=[EmittedEvent("schedule.synced", f"{day.isoformat()}:{fingerprint}", data)],
            done=True,
            sync=ChildSync(scope=scope, follow_ons=follow_ons),
        )
