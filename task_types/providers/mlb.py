"""MLB Stats API: a day's schedule and a game's live feed."""

from __future__ import annotations

from datetime import date
from typing import Any

from task_types.providers._json import J
from task_types.providers.model import Game, GameStatus, PeriodScore

NAME = "mlb"

_STATUS_BY_ABSTRACT = {
    "Preview": GameStatus.SCHEDULED,
    "Live": GameStatus.LIVE,
    "Final": GameStatus.FINAL,
}


class MlbProvider:
    name = NAME
    default_base_url = "https://statsapi.mlb.com"

    def schedule_path(self, day: date, league: str) -> str:
        return f"/api/v1/schedule?sportId=1&date={day:%Y-%m-%d}"

    def game_path(self, game_id: str, league: str) -> str:
        return f"/api/v1.1/game/{game_id}/feed/live"

    def parse_schedule(self, body: Any, league: str, *, day: date | None = None) -> list[Game]:
        games: list[Game] = []
        for day_node in J(NAME, body)["dates"].items():
            if day is not None and day_node["date"].as_str() != day.isoformat():
                continue
            games.extend(_schedule_game(game, league) for game in day_node["games"].items())
        return games

    def parse_game(self, body: Any, league: str) -> Game:
        root = J(NAME, body)
        data, live = root["gameData"], root["liveData"]
        status = _status(data["status"])
        teams = data["teams"]
        return _with_linescore(
            Game(
                provider=NAME,
                league=league,
                game_id=(root.get("gamePk") or data["game"]["pk"]).as_id(),
                start_utc=data["datetime"]["dateTime"].as_utc(),
                status=status,
                home_team=teams["home"]["abbreviation"].as_str(),
                away_team=teams["away"]["abbreviation"].as_str(),
                detail=data["status"]["detailedState"].as_str(),
            ),
            live["linescore"],
        )


def _status(status: J) -> GameStatus:
    # Postponed and cancelled games are abstract "Final": the coded state tells them apart.
    coded = status.get("codedGameState")
    code = coded.as_str() if coded is not None else ""
    if code == "D":
        return GameStatus.POSTPONED
    if code == "C":
        return GameStatus.CANCELLED
    abstract = status["abstractGameState"]
    name = abstract.as_str()
    if name not in _STATUS_BY_ABSTRACT:
        raise abstract.fail(f"expected Preview, Live or Final, got {name!r}")
    return _STATUS_BY_ABSTRACT[name]


def _runs(half: J | None) -> int | None:
    runs = half.get("runs") if half is not None else None
    return runs.as_int() if runs is not None else None


def _with_linescore(game: Game, linescore: J | None) -> Game:
    """The game with inning, scores and innings from a linescore (feed or hydrated schedule)."""
    if linescore is None:
        return game
    scored = game.status in (GameStatus.LIVE, GameStatus.FINAL)
    innings = linescore.get("innings")
    periods = tuple(
        # An unplayed half (the bottom of the 9th when the home side leads) has no runs.
        PeriodScore(inning["num"].as_int(), _runs(inning.get("home")), _runs(inning.get("away")))
        for inning in (innings.items() if innings is not None else ())
    )
    teams = linescore.get("teams")
    current = linescore.get("currentInning")
    state = linescore.get("inningState")
    ordinal = linescore.get("currentInningOrdinal")
    scheduled = linescore.get("scheduledInnings")
    detail = game.detail
    if game.status is GameStatus.LIVE and state is not None and ordinal is not None:
        detail = f"{state.as_str()} {ordinal.as_str()}"
    return Game(
        provider=game.provider,
        league=game.league,
        game_id=game.game_id,
        start_utc=game.start_utc,
        status=game.status,
        home_team=game.home_team,
        away_team=game.away_team,
        home_score=_runs(teams.get("home")) if scored and teams is not None else game.home_score,
        away_score=_runs(teams.get("away")) if scored and teams is not None else game.away_score,
        period=current.as_int() if scored and current is not None else 0,
        periods=periods if scored else (),
        detail=detail,
        intermission=(
            game.status is GameStatus.LIVE and state is not None and state.as_str() in ("Middle", "End")
        ),
        regulation_periods=scheduled.as_int() if scheduled is not None else None,
    )


def _schedule_game(node: J, league: str) -> Game:
    status = _status(node["status"])
    teams = node["teams"]
    scored = status in (GameStatus.LIVE, GameStatus.FINAL)

    def score(side: str) -> int | None:
        value = teams[side].get("score")
        return value.as_int() if scored and value is not None else None

    def team_name(side: str) -> str:
        team = teams[side]["team"]
        # Abbreviations only come with hydrate=team; the name is always there.
        return (team.get("abbreviation") or team["name"]).as_str()

    game = Game(
        provider=NAME,
        league=league,
        game_id=node["gamePk"].as_id(),
        start_utc=node["gameDate"].as_utc(),
        status=status,
        home_team=team_name("home"),
        away_team=team_name("away"),
        home_score=score("home"),
        away_score=score("away"),
        detail=node["status"]["detailedState"].as_str(),
    )
    return _with_linescore(game, node.get("linescore"))
