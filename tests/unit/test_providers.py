"""The provider adapters against recorded real responses, their documented variants, and
bodies of the wrong shape."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from task_types.providers import PROVIDERS, GameStatus, PeriodScore, UnknownProvider, get_provider
from task_types.providers.cli import ParseFileError, parse_file
from taskmgr.handlers import ParseError
from tests.helpers import FIXTURES

NBA_BOARD = "nba/dliu713_nba-scores-website__todaysScoreboard_00.json"
NBA_BOARD_2025 = "nba/seansusmilch_w-picks-astro__todaysScoreboard_00_trimmed.json"
NBA_BOX = "nba/dliu713_nba-scores-website__boxscore_0042200123.json"
NBA_BOX_2020 = "nba/dblackrun_pbpstats__live_boxscore_0022000001.json"
ESPN_BOARD = "espn/JoeyG1973_sports-mcp__nba_scoreboard.json"
MLB_SCHEDULE = "mlb/DarkSideOfTheMat_mlb-statsapi-pydantic__schedule.json"
MLB_FEED = "mlb/DarkSideOfTheMat_mlb-statsapi-pydantic__livefeed.json"
NHL_SCHEDULE = "nhl/austinegri_NhlGamesTodayLambda__scheduleResponseWithGames.json"
NHL_BOX = "nhl/StefanOOE_mcp-nhl__boxscore_2024020600_trimmed.json"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


_CACHE: dict[str, str] = {}


def fresh(name: str) -> Any:
    """A private copy of a fixture (the MLB feed is big: read the file once)."""
    if name not in _CACHE:
        _CACHE[name] = (FIXTURES / name).read_text(encoding="utf-8")
    return json.loads(_CACHE[name])


def espn_summary() -> dict[str, Any]:
    """A summary body built from the recorded scoreboard event: summary
    header.competitions[0] has the scoreboard competition's shape (README.md)."""
    event = load(ESPN_BOARD)["events"][0]
    return {"header": {"id": event["id"], "uid": event["uid"], "competitions": event["competitions"]}}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- registry ---------------------------------------------------------------------------


def test_known_providers() -> None:
    assert sorted(PROVIDERS) == ["espn", "mlb", "nba", "nhl"]
    assert get_provider("nba").default_base_url == "https://cdn.nba.com"
    with pytest.raises(LookupError, match=r"'nfl'.*espn, mlb, nba, nhl") as info:
        get_provider("nfl")
    assert isinstance(info.value, UnknownProvider)


def test_paths_mirror_the_real_urls() -> None:
    day = date(2024, 7, 1)
    assert get_provider("nba").game_path("0042200123", "nba") == (
        "/static/json/liveData/boxscore/boxscore_0042200123.json"
    )
    assert get_provider("nba").schedule_path(day, "nba").endswith("todaysScoreboard_00.json")
    espn = get_provider("espn")
    assert (
        espn.schedule_path(day, "basketball/nba")
        == "/apis/site/v2/sports/basketball/nba/scoreboard?dates=20240701"
    )
    assert espn.game_path("401869412", "nba") == "/apis/site/v2/sports/basketball/nba/summary?event=401869412"
    assert get_provider("mlb").schedule_path(day, "mlb") == "/api/v1/schedule?sportId=1&date=2024-07-01"
    assert get_provider("mlb").game_path("744914", "mlb") == "/api/v1.1/game/744914/feed/live"
    assert get_provider("nhl").schedule_path(day, "nhl") == "/v1/schedule/2024-07-01"
    assert get_provider("nhl").game_path("2024020600", "nhl") == "/v1/gamecenter/2024020600/boxscore"


# -- NBA --------------------------------------------------------------------------------


def test_nba_scoreboard() -> None:
    games = get_provider("nba").parse_schedule(load(NBA_BOARD), "nba")
    assert [g.game_id for g in games] == ["0042200163", "0042200173", "0042200123"]
    sac_gsw, _, phi_bkn = games
    assert sac_gsw.status is GameStatus.LIVE
    assert (sac_gsw.home_team, sac_gsw.away_team) == ("GSW", "SAC")
    assert (sac_gsw.home_score, sac_gsw.away_score, sac_gsw.period, sac_gsw.clock) == (39, 30, 2, "07:15")
    assert sac_gsw.start_utc == utc("2023-04-21T02:00:00")
    # Pre-filled zeros for periods not yet played are not scores.
    assert sac_gsw.periods == (
        PeriodScore(1, 29, 20),
        PeriodScore(2, 10, 10),
        PeriodScore(3, None, None),
        PeriodScore(4, None, None),
    )
    assert phi_bkn.status is GameStatus.FINAL
    # gameEt says 19:30Z (Eastern with a false Z); gameTimeUTC is the truth.
    assert phi_bkn.start_utc == utc("2023-04-20T23:30:00")
    assert (phi_bkn.home_score, phi_bkn.away_score, phi_bkn.clock) == (97, 102, None)


def test_nba_boxscores() -> None:
    nba = get_provider("nba")
    game = nba.parse_game(load(NBA_BOX), "nba")
    assert (game.game_id, game.status, game.home_team, game.away_team) == (
        "0042200123",
        GameStatus.FINAL,
        "BKN",
        "PHI",
    )
    assert (game.home_score, game.away_score, game.period) == (97, 102, 4)
    assert [(p.home, p.away) for p in game.periods] == [(28, 32), (19, 26), (35, 18), (15, 26)]
    older = nba.parse_game(load(NBA_BOX_2020), "nba")
    assert (older.home_team, older.away_team, older.home_score, older.away_score) == ("BKN", "GSW", 125, 99)
    assert older.start_utc == utc("2020-12-23T00:00:00")
    assert sum(p.home or 0 for p in older.periods) == 125


def test_nba_2025_clock_form() -> None:
    games = get_provider("nba").parse_schedule(load(NBA_BOARD_2025), "nba")
    first = games[0]
    assert (first.status, first.period, first.clock, first.detail) == (GameStatus.LIVE, 3, "03:37", "3rd Qtr")
    assert (first.home_score, first.away_score) == (69, 65)
    assert games[2].clock == "10:37"


@pytest.mark.parametrize(
    ("clock", "expected"),
    [
        ("PT07M15.00S", "07:15"),
        ("PT00M23.40S", "00:23.4"),
        ("3:37 ", "03:37"),
        ("", None),
        ("PT12M00.00S", "12:00"),
    ],
)
def test_nba_clock_forms(clock: str, expected: str | None) -> None:
    body = fresh(NBA_BOARD)
    body["scoreboard"]["games"][0]["gameClock"] = clock
    assert get_provider("nba").parse_schedule(body, "nba")[0].clock == expected


def test_nba_postponed_and_scheduled() -> None:
    body = fresh(NBA_BOARD)
    game = body["scoreboard"]["games"][0]
    game.update(gameStatus=1, gameStatusText="PPD", period=0, gameClock="")
    parsed = get_provider("nba").parse_schedule(body, "nba")[0]
    assert parsed.status is GameStatus.POSTPONED
    game["gameStatusText"] = "7:00 pm ET"
    parsed = get_provider("nba").parse_schedule(body, "nba")[0]
    assert (parsed.status, parsed.home_score, parsed.periods) == (GameStatus.SCHEDULED, None, ())


def test_nba_breaks() -> None:
    body = fresh(NBA_BOARD)
    game = body["scoreboard"]["games"][0]
    game.update(gameStatusText="Half", gameClock="PT00M00.00S")
    assert get_provider("nba").parse_schedule(body, "nba")[0].intermission
    game.update(gameStatusText="Q2 07:15", gameClock="PT07M15.00S")
    assert not get_provider("nba").parse_schedule(body, "nba")[0].intermission


# -- ESPN -------------------------------------------------------------------------------


def test_espn_scoreboard() -> None:
    (game,) = get_provider("espn").parse_schedule(load(ESPN_BOARD), "basketball/nba")
    assert (game.game_id, game.status, game.home_team, game.away_team) == (
        "401869412",
        GameStatus.LIVE,
        "BOS",
        "PHI",
    )
    assert (game.home_score, game.away_score, game.period, game.clock) == (87, 92, 4, "08:41")
    assert game.start_utc == utc("2026-05-02T23:30:00")
    assert game.periods[0] == PeriodScore(1, 19, 32)
    assert sum(p.home or 0 for p in game.periods) == 87
    assert game.league == "basketball/nba"


def test_espn_summary() -> None:
    game = get_provider("espn").parse_game(espn_summary(), "nba")
    assert (game.game_id, game.home_score, game.away_score, game.period) == ("401869412", 87, 92, 4)


@pytest.mark.parametrize(
    ("name", "state", "expected"),
    [
        ("STATUS_POSTPONED", "pre", GameStatus.POSTPONED),
        ("STATUS_CANCELED", "post", GameStatus.CANCELLED),
        ("STATUS_FINAL", "post", GameStatus.FINAL),
        ("STATUS_SCHEDULED", "pre", GameStatus.SCHEDULED),
        ("STATUS_HALFTIME", "in", GameStatus.LIVE),
        ("STATUS_RAIN_DELAY", "in", GameStatus.LIVE),  # unknown name: the state decides
    ],
)
def test_espn_status_names(name: str, state: str, expected: GameStatus) -> None:
    body = fresh(ESPN_BOARD)
    event = body["events"][0]
    for status in (event["status"], event["competitions"][0]["status"]):
        status["type"].update(name=name, state=state)
    (game,) = get_provider("espn").parse_schedule(body, "basketball/nba")
    assert game.status is expected
    assert game.intermission == (name == "STATUS_HALFTIME")
    if expected is GameStatus.FINAL:
        assert game.clock is None and game.home_score == 87


# -- MLB --------------------------------------------------------------------------------


def test_mlb_schedule() -> None:
    games = get_provider("mlb").parse_schedule(load(MLB_SCHEDULE), "mlb")
    assert [g.game_id for g in games] == ["744914", "744840", "746535"]
    first = games[0]
    assert (first.status, first.home_team, first.away_team) == (
        GameStatus.FINAL,
        "Toronto Blue Jays",
        "Houston Astros",
    )
    assert (first.home_score, first.away_score, first.start_utc) == (1, 3, utc("2024-07-01T19:07:00"))
    assert get_provider("mlb").parse_schedule(load(MLB_SCHEDULE), "mlb", day=date(2024, 7, 2)) == []


def test_mlb_live_feed() -> None:
    game = get_provider("mlb").parse_game(fresh(MLB_FEED), "mlb")
    assert (game.game_id, game.status, game.home_team, game.away_team) == (
        "744914",
        GameStatus.FINAL,
        "TOR",
        "HOU",
    )
    assert (game.home_score, game.away_score, game.period, game.regulation_periods) == (1, 3, 9, 9)
    assert game.periods[4] == PeriodScore(5, 0, 1)
    assert game.periods[8] == PeriodScore(9, 1, 2)


@pytest.mark.parametrize(
    ("coded", "detailed", "expected"),
    [
        ("D", "Postponed", GameStatus.POSTPONED),
        ("C", "Cancelled", GameStatus.CANCELLED),
        ("F", "Final", GameStatus.FINAL),
    ],
)
def test_mlb_coded_states(coded: str, detailed: str, expected: GameStatus) -> None:
    body = fresh(MLB_SCHEDULE)
    body["dates"][0]["games"][0]["status"].update(
        abstractGameState="Final", codedGameState=coded, detailedState=detailed
    )
    assert get_provider("mlb").parse_schedule(body, "mlb")[0].status is expected
    feed = fresh(MLB_FEED)
    feed["gameData"]["status"].update(abstractGameState="Final", codedGameState=coded, detailedState=detailed)
    assert get_provider("mlb").parse_game(feed, "mlb").status is expected


def test_mlb_unplayed_half_and_live_inning() -> None:
    feed = fresh(MLB_FEED)
    feed["gameData"]["status"].update(
        abstractGameState="Live", codedGameState="I", detailedState="In Progress"
    )
    line = feed["liveData"]["linescore"]
    del line["innings"][8]["home"]["runs"]
    line.update(inningState="Middle", currentInning=9, currentInningOrdinal="9th")
    game = get_provider("mlb").parse_game(feed, "mlb")
    assert game.periods[8] == PeriodScore(9, None, 2)
    assert (game.status, game.intermission, game.detail) == (GameStatus.LIVE, True, "Middle 9th")


# -- NHL --------------------------------------------------------------------------------


def test_nhl_schedule() -> None:
    body = load(NHL_SCHEDULE)
    week = get_provider("nhl").parse_schedule(body, "nhl")
    assert len(week) == 54
    day = get_provider("nhl").parse_schedule(body, "nhl", day=date(2023, 12, 17))
    assert len(day) == 5
    first = day[0]
    assert (first.game_id, first.status, first.home_team, first.away_team) == (
        "2023020474",
        GameStatus.SCHEDULED,
        "CHI",
        "VAN",
    )
    assert (first.start_utc, first.home_score) == (utc("2023-12-17T20:00:00"), None)


def test_nhl_boxscore() -> None:
    game = get_provider("nhl").parse_game(load(NHL_BOX), "nhl")
    assert (game.game_id, game.status, game.home_team, game.away_team) == (
        "2024020600",
        GameStatus.FINAL,
        "CGY",
        "VAN",
    )
    assert (game.home_score, game.away_score, game.period, game.start_utc) == (
        3,
        1,
        3,
        utc("2025-01-01T02:00:00"),
    )


@pytest.mark.parametrize(
    ("state", "schedule_state", "expected"),
    [
        ("FUT", "OK", GameStatus.SCHEDULED),
        ("PRE", "OK", GameStatus.SCHEDULED),
        ("LIVE", "OK", GameStatus.LIVE),
        ("CRIT", "OK", GameStatus.LIVE),
        ("OFF", "OK", GameStatus.FINAL),
        ("FINAL", "OK", GameStatus.FINAL),
        ("FUT", "PPD", GameStatus.POSTPONED),
        ("FUT", "CNCL", GameStatus.CANCELLED),
    ],
)
def test_nhl_states(state: str, schedule_state: str, expected: GameStatus) -> None:
    body = fresh(NHL_BOX)
    body.update(gameState=state, gameScheduleState=schedule_state)
    body["clock"].update(timeRemaining="04:12", inIntermission=state == "LIVE")
    game = get_provider("nhl").parse_game(body, "nhl")
    assert game.status is expected
    if expected is GameStatus.LIVE:
        assert (game.clock, game.home_score) == ("04:12", 3)
        assert game.intermission == (state == "LIVE")


# -- bad shapes -------------------------------------------------------------------------


def _set(body: Any, path: list[str | int], value: Any) -> Any:
    node = body
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("provider", "kind", "fixture", "edit", "value", "json_path", "problem"),
    [
        (
            "nba",
            "game",
            NBA_BOX,
            ["game", "homeTeam", "score"],
            "abc",
            "$.game.homeTeam.score",
            "expected an integer, got 'abc'",
        ),
        (
            "nba",
            "game",
            NBA_BOX,
            ["game", "homeTeam", "score"],
            True,
            "$.game.homeTeam.score",
            "expected an integer",
        ),
        ("nba", "game", NBA_BOX, ["game", "gameStatus"], 7, "$.game.gameStatus", "expected 1, 2 or 3"),
        ("nba", "game", NBA_BOX, ["game", "gameTimeUTC"], "yesterday", "$.game.gameTimeUTC", "ISO-8601"),
        ("nba", "game", NBA_BOX, ["game"], KeyError, "$.game", "missing"),
        ("nba", "schedule", NBA_BOARD, ["scoreboard", "games"], {}, "$.scoreboard.games", "expected a list"),
        (
            "nba",
            "schedule",
            NBA_BOARD,
            ["scoreboard", "games", 1, "awayTeam", "periods", 0, "score"],
            None,
            "$.scoreboard.games[1].awayTeam.periods[0].score",
            "missing",
        ),
        (
            "espn",
            "schedule",
            ESPN_BOARD,
            ["events", 0, "competitions", 0, "competitors", 0, "score"],
            "8x7",
            "$.events[0].competitions[0].competitors[0].score",
            "expected an integer string",
        ),
        (
            "espn",
            "schedule",
            ESPN_BOARD,
            ["events", 0, "status", "type"],
            {"name": "STATUS_X", "state": "?"},
            "$.events[0].status.type.name",
            "unknown status",
        ),
        (
            "espn",
            "schedule",
            ESPN_BOARD,
            ["events", 0, "competitions"],
            [],
            "$.events[0].competitions[0]",
            "missing",
        ),
        (
            "mlb",
            "schedule",
            MLB_SCHEDULE,
            ["dates", 0, "games", 0, "gamePk"],
            None,
            "$.dates[0].games[0].gamePk",
            "missing",
        ),
        (
            "mlb",
            "schedule",
            MLB_SCHEDULE,
            ["dates", 0, "games", 0, "status", "codedGameState"],
            "X",
            "$.dates[0].games[0].status.abstractGameState",
            None,
        ),
        (
            "mlb",
            "game",
            MLB_FEED,
            ["liveData", "linescore", "teams", "home", "runs"],
            "1",
            "$.liveData.linescore.teams.home.runs",
            "expected an integer, got '1'",
        ),
        ("nhl", "game", NHL_BOX, ["gameState"], "WAT", "$.gameState", "expected one of"),
        ("nhl", "game", NHL_BOX, ["homeTeam"], [], "$.homeTeam", "expected an object, got []"),
        (
            "nhl",
            "schedule",
            NHL_SCHEDULE,
            ["gameWeek", 0, "games", 0, "startTimeUTC"],
            12,
            "$.gameWeek[0].games[0].startTimeUTC",
            "expected a string",
        ),
    ],
)
def test_bad_shapes(
    provider: str,
    kind: str,
    fixture: str,
    edit: list[str | int],
    value: Any,
    json_path: str,
    problem: str | None,
) -> None:
    body = _set(fresh(fixture), edit, value)
    if edit[-2:] == ["status", "codedGameState"]:
        body["dates"][0]["games"][0]["status"]["abstractGameState"] = "Unknown"
    adapter = get_provider(provider)
    with pytest.raises(ParseError) as info:
        if kind == "game":
            adapter.parse_game(body, provider)
        else:
            adapter.parse_schedule(body, provider)
    assert info.value.provider == provider
    assert info.value.path == json_path
    if problem:
        assert problem in info.value.problem
    assert str(info.value).startswith(f"{provider}: {json_path}: ")


@pytest.mark.parametrize("body", [None, [], "text", 12])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_not_an_object(provider: str, body: Any) -> None:
    adapter = get_provider(provider)
    for parse in (adapter.parse_game, adapter.parse_schedule):
        with pytest.raises(ParseError) as info:
            parse(body, provider)
        assert info.value.provider == provider


# -- parse_file -------------------------------------------------------------------------


def test_parse_file(tmp_path: Path) -> None:
    result = parse_file("nba", "game", str(FIXTURES / NBA_BOX))
    assert result["game"]["home_score"] == 97
    assert result["game"]["start_utc"] == "2023-04-20T23:30:00+00:00"
    json.dumps(result)  # JSON-able
    schedule = parse_file("nhl", "schedule", str(FIXTURES / NHL_SCHEDULE))
    assert schedule["count"] == 54 and schedule["games"][0]["status"] == "scheduled"
    with pytest.raises(UnknownProvider):
        parse_file("xyz", "game", str(FIXTURES / NBA_BOX))
    with pytest.raises(ValueError, match="unknown kind"):
        parse_file("nba", "boxscore", str(FIXTURES / NBA_BOX))
    with pytest.raises(ParseFileError, match="cannot read"):
        parse_file("nba", "game", str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"game": ', encoding="utf-8")
    with pytest.raises(ParseFileError, match="not JSON"):
        parse_file("nba", "game", str(broken))
    with pytest.raises(ParseError, match=r"^nba: \$\.game: missing"):
        parse_file("nba", "game", str(FIXTURES / NBA_BOARD))
    assert copy.deepcopy(result) == result


def test_an_nba_board_that_has_not_rolled_over_is_not_seeded_as_today() -> None:
    """todaysScoreboard still shows yesterday's games for hours after midnight: the
    schedule poll fails (and is tried again) until its gameDate is the day asked for."""
    body = json.loads((FIXTURES / "nba" / "dliu713_nba-scores-website__todaysScoreboard_00.json").read_text())
    nba = get_provider("nba")
    assert nba.parse_schedule(body, "nba", day=date(2023, 4, 20))
    with pytest.raises(ParseError, match="not rolled over yet"):
        nba.parse_schedule(body, "nba", day=date(2023, 4, 21))
