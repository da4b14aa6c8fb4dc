"""NHL api-web: the schedule (a 7-day game week) and a game's box score."""

from __future__ import annotations

from datetime import date
from typing import Any

from task_types.providers._json import J, normalise_clock
from task_types.providers.model import Game, GameStatus

NAME = "nhl"

_STATUS_BY_STATE = {
    "FUT": GameStatus.SCHEDULED,
    "PRE": GameStatus.SCHEDULED,
    "LIVE": GameStatus.LIVE,
    "CRIT": GameStatus.LIVE,
    "OFF": GameStatus.FINAL,
    "FINAL": GameStatus.FINAL,
}


class NhlProvider:
    name = NAME
    default_base_url = "https://api-web.nhle.com"

    def schedule_path(self, day: date, league: str) -> str:
        return f"/v1/schedule/{day:%Y-%m-%d}"

    def game_path(self, game_id: str, league: str) -> str:
        return f"/v1/gamecenter/{game_id}/boxscore"

    def parse_schedule(self, body: Any, league: str, *, day: date | None = None) -> list[Game]:
        games: list[Game] = []
        for week_day in J(NAME, body)["gameWeek"].items():
            if day is not None and week_day["date"].as_str() != day.isoformat():
                continue
            games.extend(_game(game, league) for game in week_day["games"].items())
        return games

    def parse_game(self, body: Any, league: str) -> Game:
        return _game(J(NAME, body), league)


def _status(node: J) -> GameStatus:
    # The schedule state overrides the game state: a postponed game stays "FUT".
    schedule_state = node.get("gameScheduleState")
    if schedule_state is not None:
        match schedule_state.as_str():
            case "PPD":
                return GameStatus.POSTPONED
            case "CNCL":
                return GameStatus.CANCELLED
    state = node["gameState"]
    name = state.as_str()
    if name not in _STATUS_BY_STATE:
        raise state.fail(f"expected one of {', '.join(_STATUS_BY_STATE)}, got {name!r}")
    return _STATUS_BY_STATE[name]


def _game(node: J, league: str) -> Game:
    status = _status(node)
    scored = status in (GameStatus.LIVE, GameStatus.FINAL)
    home, away = node["homeTeam"], node["awayTeam"]
    descriptor = node.get("periodDescriptor")
    number = descriptor.get("number") if descriptor is not None else None
    clock_node = node.get("clock")
    clock = None
    intermission = False
    if clock_node is not None and status is GameStatus.LIVE:
        clock = normalise_clock(clock_node["timeRemaining"].as_str())
        flag = clock_node.get("inIntermission")
        intermission = flag.as_bool() if flag is not None else False
    regulation = node.get("regPeriods") or (
        descriptor.get("maxRegulationPeriods") if descriptor is not None else None
    )
    return Game(
        provider=NAME,
        league=league,
        game_id=node["id"].as_id(),
        start_utc=node["startTimeUTC"].as_utc(),
        status=status,
        home_team=home["abbrev"].as_str(),
        away_team=away["abbrev"].as_str(),
        # The schedule only carries scores once a game is under way.
        home_score=home["score"].as_int() if scored else None,
        away_score=away["score"].as_int() if scored else None,
        period=number.as_int() if scored and number is not None else 0,
        clock=clock,
        # Per-period goals are only in /landing (summary.scoring), not in the box score.
        periods=(),
        detail=node["gameState"].as_str(),
        intermission=intermission,
        regulation_periods=regulation.as_int() if regulation is not None else None,
    )
