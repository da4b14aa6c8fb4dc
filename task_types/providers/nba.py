"""cdn.nba.com liveData: today's scoreboard and a game's box score."""

from __future__ import annotations

from datetime import date
from typing import Any

from task_types.providers._json import J, normalise_clock
from task_types.providers.model import Game, GameStatus, PeriodScore

NAME = "nba"


class NbaProvider:
    name = NAME
    default_base_url = "https://cdn.nba.com"

    def schedule_path(self, day: date, league: str) -> str:
        # The CDN only has today's board: the day is decided by the server, not the URL.
        return "/static/json/liveData/scoreboard/todaysScoreboard_00.json"

    def game_path(self, game_id: str, league: str) -> str:
        return f"/static/json/liveData/boxscore/boxscore_{game_id}.json"

    def parse_schedule(self, body: Any, league: str, *, day: date | None = None) -> list[Game]:
        root = J(NAME, body)
        board = root["scoreboard"]
        if day is not None:
            # todaysScoreboard rolls over to the new day some hours after midnight: until
            # then it still lists yesterday's games, which must not be seeded as today's.
            shown = board["gameDate"]
            if str(shown.value) != day.isoformat():
                wanted = day.isoformat()
                raise shown.fail(f"the board shows {shown.value!r}, not {wanted}: not rolled over yet")
        return [parse_nba_game(node, league) for node in board["games"].items()]

    def parse_game(self, body: Any, league: str) -> Game:
        return parse_nba_game(J(NAME, body)["game"], league)


def _status(node: J, text: str) -> GameStatus:
    code = node["gameStatus"]
    upper = text.strip().upper()
    # A postponed game keeps gameStatus 1 and only says so in the text.
    if upper.startswith("PPD") or "POSTPONED" in upper:
        return GameStatus.POSTPONED
    if "CANCEL" in upper:
        return GameStatus.CANCELLED
    match code.as_int():
        case 1:
            return GameStatus.SCHEDULED
        case 2:
            return GameStatus.LIVE
        case 3:
            return GameStatus.FINAL
    raise code.fail(f"expected 1, 2 or 3, got {code.value!r}")


def _is_break(text: str, clock: str | None) -> bool:
    upper = text.strip().upper()
    if upper.startswith(("HALF", "END")):
        return True
    # "Q1" with no clock is the reported end-of-quarter text; a live game whose clock
    # reads zero is between periods too.
    if len(upper) == 2 and upper[0] == "Q" and upper[1].isdigit():
        return True
    return clock in ("00:00",)


def _periods(home: J, away: J, status: GameStatus, period: int) -> tuple[PeriodScore, ...]:
    by_period: dict[int, list[int | None]] = {}
    for side, team in ((0, home), (1, away)):
        entries = team.get("periods")
        for entry in entries.items() if entries is not None else ():
            number = entry["period"].as_int()
            by_period.setdefault(number, [None, None])[side] = entry["score"].as_int()
    result = []
    for number in sorted(by_period):
        home_score, away_score = by_period[number]
        # The scoreboard pre-fills unplayed periods with 0: those are not scores yet.
        if status is not GameStatus.FINAL and number > period:
            home_score = away_score = None
        result.append(PeriodScore(number, home_score, away_score))
    return tuple(result)


def parse_nba_game(node: J, league: str) -> Game:
    text_node = node.get("gameStatusText")
    text = text_node.as_str() if text_node is not None else ""
    status = _status(node, text)
    clock_node = node.get("gameClock")
    clock = normalise_clock(clock_node.as_str()) if clock_node is not None else None
    period_node = node.get("period")
    period = period_node.as_int() if period_node is not None else 0
    home, away = node["homeTeam"], node["awayTeam"]
    scored = status in (GameStatus.LIVE, GameStatus.FINAL)
    home_score = home["score"].as_int() if scored else None
    away_score = away["score"].as_int() if scored else None
    regulation = node.get("regulationPeriods")
    return Game(
        provider=NAME,
        league=league,
        game_id=node["gameId"].as_id(),
        # gameTimeUTC is true UTC; gameEt is Eastern time that sometimes carries a false "Z".
        start_utc=node["gameTimeUTC"].as_utc(),
        status=status,
        home_team=home["teamTricode"].as_str(),
        away_team=away["teamTricode"].as_str(),
        home_score=home_score,
        away_score=away_score,
        period=period,
        clock=None if status is GameStatus.FINAL else clock,
        periods=_periods(home, away, status, period) if scored else (),
        detail=text.strip(),
        intermission=status is GameStatus.LIVE and _is_break(text, clock),
        regulation_periods=regulation.as_int() if regulation is not None else None,
    )
