"""ESPN site API: a league's scoreboard and an event's summary."""

from __future__ import annotations

from datetime import date
from typing import Any

from task_types.providers._json import J, normalise_clock
from task_types.providers.model import Game, GameStatus, PeriodScore

NAME = "espn"

# Short league names people type, mapped to ESPN's "{sport}/{league}" path.
LEAGUE_PATHS: dict[str, str] = {
    "nba": "basketball/nba",
    "wnba": "basketball/wnba",
    "ncaam": "basketball/mens-college-basketball",
    "ncaaw": "basketball/womens-college-basketball",
    "nhl": "hockey/nhl",
    "mlb": "baseball/mlb",
    "nfl": "football/nfl",
}

# Keyed on type.name: a postponed game can carry state "pre" like a scheduled one.
_STATUS_BY_NAME: dict[str, GameStatus] = {
    "STATUS_SCHEDULED": GameStatus.SCHEDULED,
    "STATUS_IN_PROGRESS": GameStatus.LIVE,
    "STATUS_HALFTIME": GameStatus.LIVE,
    "STATUS_END_PERIOD": GameStatus.LIVE,
    "STATUS_FINAL": GameStatus.FINAL,
    "STATUS_FINAL_OT": GameStatus.FINAL,
    "STATUS_FULL_TIME": GameStatus.FINAL,
    "STATUS_POSTPONED": GameStatus.POSTPONED,
    "STATUS_CANCELED": GameStatus.CANCELLED,
    "STATUS_CANCELLED": GameStatus.CANCELLED,
}
_BREAKS = frozenset({"STATUS_HALFTIME", "STATUS_END_PERIOD"})
_STATUS_BY_STATE = {"pre": GameStatus.SCHEDULED, "in": GameStatus.LIVE, "post": GameStatus.FINAL}


def league_path(league: str) -> str:
    return league if "/" in league else LEAGUE_PATHS.get(league.lower(), league)


class EspnProvider:
    name = NAME
    default_base_url = "https://site.api.espn.com"

    def schedule_path(self, day: date, league: str) -> str:
        return f"/apis/site/v2/sports/{league_path(league)}/scoreboard?dates={day:%Y%m%d}"

    def game_path(self, game_id: str, league: str) -> str:
        return f"/apis/site/v2/sports/{league_path(league)}/summary?event={game_id}"

    def parse_schedule(self, body: Any, league: str, *, day: date | None = None) -> list[Game]:
        games = []
        for event in J(NAME, body)["events"].items():
            competition = event["competitions"][0]
            status = event.get("status") or competition["status"]
            games.append(_game(event["id"].as_id(), event["date"], competition, status, league))
        return games

    def parse_game(self, body: Any, league: str) -> Game:
        header = J(NAME, body)["header"]
        competition = header["competitions"][0]
        date_node = competition.get("date") or competition["startDate"]
        return _game(header["id"].as_id(), date_node, competition, competition["status"], league)


def _status(status: J) -> tuple[GameStatus, bool]:
    kind = status["type"]
    name = kind["name"].as_str()
    if name in _STATUS_BY_NAME:
        return _STATUS_BY_NAME[name], name in _BREAKS
    # An unlisted name (STATUS_DELAYED, STATUS_RAIN_DELAY...): fall back on the coarse state.
    state = kind["state"].as_str()
    if state not in _STATUS_BY_STATE:
        raise kind["name"].fail(f"unknown status {name!r} with state {state!r}")
    return _STATUS_BY_STATE[state], False


def _competitor(competition: J, side: str) -> J:
    for competitor in competition["competitors"].items():
        if competitor["homeAway"].as_str() == side:
            return competitor
    raise competition["competitors"].fail(f"no {side} competitor")


def _linescores(team: J) -> dict[int, int]:
    scores: dict[int, int] = {}
    lines = team.get("linescores")
    for index, line in enumerate(lines.items() if lines is not None else ()):
        number = line["period"].as_int() if line.has("period") else index + 1
        scores[number] = line["value"].as_int()
    return scores


def _game(game_id: str, date_node: J, competition: J, status_node: J, league: str) -> Game:
    status, in_break = _status(status_node)
    home, away = _competitor(competition, "home"), _competitor(competition, "away")
    scored = status in (GameStatus.LIVE, GameStatus.FINAL)

    def score(team: J) -> int | None:
        return team["score"].as_int_text() if scored else None

    period_node = status_node.get("period")
    period = period_node.as_int() if scored and period_node is not None else 0
    clock_node = status_node.get("displayClock")
    clock = normalise_clock(clock_node.as_str()) if clock_node is not None else None
    home_lines, away_lines = _linescores(home), _linescores(away)
    periods = tuple(
        PeriodScore(n, home_lines.get(n), away_lines.get(n)) for n in sorted({*home_lines, *away_lines})
    )
    detail_node = status_node["type"].get("detail")
    return Game(
        provider=NAME,
        league=league_path(league),
        game_id=game_id,
        start_utc=date_node.as_utc(),
        status=status,
        home_team=home["team"]["abbreviation"].as_str(),
        away_team=away["team"]["abbreviation"].as_str(),
        home_score=score(home),
        away_score=score(away),
        period=period,
        # The clock at final is not meaningful.
        clock=clock if status is GameStatus.LIVE else None,
        periods=periods if scored else (),
        detail=detail_node.as_str() if detail_node is not None else "",
        intermission=in_break,
        regulation_periods=_regulation(competition),
    )


def _regulation(competition: J) -> int | None:
    fmt = competition.get("format")
    regulation = fmt.get("regulation") if fmt is not None else None
    periods = regulation.get("periods") if regulation is not None else None
    return periods.as_int() if periods is not None else None
