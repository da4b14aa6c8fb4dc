"""Each provider's bodies for the simulated games: every body is a trimmed recorded
response (task_types/feed_templates.json, rebuilt by tests/fixtures/build_feed_templates.py)
filled with simulated values, so the adapters that read the real APIs read the feed."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
from datetime import date, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from task_types.feed.simulation import (
    PERIODS,
    GameDay,
    SimGame,
    Snapshot,
)


@cache
def _templates() -> dict[str, Any]:
    text = resources.files("task_types").joinpath("feed_templates.json").read_text(encoding="utf-8")
    return json.loads(text)


def template(name: str) -> Any:
    """A fresh copy of a recorded-body template (callers fill it in place)."""
    return copy.deepcopy(_templates()[name])



BOMB_BYTES = 64 * 1024 * 1024
BOMB = object()  # what _game_body returns for a game answered with the bomb


@cache
def _bomb() -> bytes:
    return gzip.compress(b"0" * BOMB_BYTES, compresslevel=9)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"



class SimulatedDay(GameDay):
    """The simulated day with every provider's bodies at any moment."""

    def schedule_body(self, provider: str, at: datetime, day: date | None = None) -> Any:
        """The provider's schedule body; `day` is the date the request asked for (None:
        the simulated day)."""
        wanted = day or self.day
        games = self.of(provider) if wanted == self.day else []
        match provider:
            case "nba":
                body = template("nba_scoreboard")
                body["scoreboard"]["gameDate"] = self.day.isoformat()
                body["meta"]["time"] = at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-2]
                body["scoreboard"]["games"] = [self._nba_game(g, at, "nba_scoreboard_game") for g in games]
                return body
            case "espn":
                body = template("espn_scoreboard")
                body["day"] = {"date": wanted.isoformat()}
                body["events"] = [self._espn_event(g, at) for g in games]
                return body
            case "mlb":
                body = template("mlb_schedule")
                day_node = body["dates"][0]
                day_node["date"] = wanted.isoformat()
                day_node["games"] = [self._mlb_schedule_game(g, at) for g in games]
                for node in (body, day_node):
                    node["totalItems"] = node["totalGames"] = len(games)
                    node["totalGamesInProgress"] = sum(self.snapshot(g, at).status == "live" for g in games)
                if not games:
                    body["dates"] = []
                return body
            case _:
                return self._nhl_schedule(wanted, at)

    def game_body(self, provider: str, game: SimGame, at: datetime) -> Any:
        match provider:
            case "nba":
                body = template("nba_boxscore")
                body["game"] = self._nba_game(game, at, None, body["game"])
                body["meta"]["time"] = at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-2]
                body["meta"]["request"] = f"http://nba.cloud/games/{game.game_id}/boxscore?Format=json"
                return body
            case "espn":
                return self._espn_summary(game, at)
            case "mlb":
                return self._mlb_feed(game, at)
            case _:
                return self._nhl_boxscore(game, at)

    # NBA

    def _nba_game(self, game: SimGame, at: datetime, name: str | None, node: Any = None) -> Any:
        node = node if node is not None else template(name or "nba_scoreboard_game")
        snap = self.snapshot(game, at)
        eastern = snap.start - timedelta(hours=5)
        node["gameId"] = game.game_id
        node["gameCode"] = f"{self.day:%Y%m%d}/{game.away.code}{game.home.code}"
        node["gameTimeUTC"] = snap.start.strftime("%Y-%m-%dT%H:%M:%SZ")
        # Eastern time with the false "Z" the live CDN sometimes sends: adapters must not read it.
        node["gameEt"] = eastern.strftime("%Y-%m-%dT%H:%M:%SZ")
        for key in ("gameTimeLocal", "gameTimeHome", "gameTimeAway"):
            if key in node:
                node[key] = eastern.strftime("%Y-%m-%dT%H:%M:%S-05:00")
        minutes, seconds = divmod(snap.clock_s, 60)
        node["period"] = snap.period
        node["gameClock"] = f"PT{int(minutes):02d}M{seconds:05.2f}S" if snap.status == "live" else ""
        match snap.status:
            case "scheduled":
                node["gameStatus"], node["gameStatusText"] = 1, eastern.strftime("%-I:%M %p ET").lower()
            case "postponed":
                node["gameStatus"], node["gameStatusText"] = 1, "PPD"
            case "final":
                node["gameStatus"], node["gameStatusText"] = 3, "Final"
                node["gameClock"] = "PT00M00.00S"
            case _:
                node["gameStatus"] = 2
                if snap.intermission:
                    node["gameStatusText"] = "Half" if snap.period == 2 else f"End of Q{snap.period}"
                else:
                    node["gameStatusText"] = f"Q{snap.period} {int(minutes):02d}:{int(seconds):02d}"
        for side, team, total in (("homeTeam", game.home, snap.home), ("awayTeam", game.away, snap.away)):
            entry = node[side]
            entry.update(teamId=team.id, teamName=team.name, teamCity=team.city, teamTricode=team.code)
            entry["score"] = total
            index = 0 if side == "homeTeam" else 1
            entry["periods"] = [
                {
                    "period": n,
                    "periodType": "REGULAR",
                    "score": (snap.lines[n - 1][index] or 0) if n <= len(snap.lines) else 0,
                }
                for n in range(1, PERIODS[game.provider] + 1)
            ]
            if "statistics" in entry and isinstance(entry["statistics"], dict):
                entry["statistics"]["points"] = total
        return node

    # ESPN

    def _espn_status(self, game: SimGame, snap: Snapshot) -> dict[str, Any]:
        minutes, seconds = divmod(snap.clock_s, 60)
        display = f"{int(minutes)}:{int(seconds):02d}"
        kinds = {
            "scheduled": ("1", "STATUS_SCHEDULED", "pre", False, "Scheduled"),
            "postponed": ("6", "STATUS_POSTPONED", "post", False, "Postponed"),
            "final": ("3", "STATUS_FINAL", "post", True, "Final"),
        }
        if snap.status == "live":
            if snap.intermission and snap.period == 2:
                kind = ("23", "STATUS_HALFTIME", "in", False, "Halftime")
            elif snap.intermission:
                kind = ("22", "STATUS_END_PERIOD", "in", False, "End of Period")
            else:
                kind = ("2", "STATUS_IN_PROGRESS", "in", False, "In Progress")
        else:
            kind = kinds[snap.status]
        detail = kind[4] if snap.status != "live" else f"{display} - {_ordinal(snap.period)} Quarter"
        if snap.status == "scheduled":
            detail = snap.start.strftime("%a, %B %-d at %-I:%M %p UTC")
        return {
            "clock": round(snap.clock_s, 1),
            "displayClock": display if snap.status == "live" else "0:00",
            "period": snap.period,
            "type": {
                "id": kind[0],
                "name": kind[1],
                "state": kind[2],
                "completed": kind[3],
                "description": kind[4],
                "detail": detail,
                "shortDetail": detail,
            },
        }

    def _espn_event(self, game: SimGame, at: datetime) -> Any:
        event = template("espn_event")
        snap = self.snapshot(game, at)
        when = snap.start.strftime("%Y-%m-%dT%H:%MZ")
        event.update(
            id=game.game_id,
            uid=f"s:40~l:46~e:{game.game_id}",
            date=when,
            name=f"{game.away.full_name} at {game.home.full_name}",
            shortName=f"{game.away.code} @ {game.home.code}",
        )
        status = self._espn_status(game, snap)
        event["status"] = status
        competition = event["competitions"][0]
        competition.update(id=game.game_id, uid=f"s:40~l:46~e:{game.game_id}~c:{game.game_id}")
        competition.update(date=when, startDate=when, status=status)
        for competitor in competition["competitors"]:
            side = competitor["homeAway"]
            team = game.home if side == "home" else game.away
            index = 0 if side == "home" else 1
            competitor["id"] = team.espn_id
            competitor["team"].update(
                id=team.espn_id,
                location=team.city,
                name=team.name,
                abbreviation=team.code,
                displayName=team.full_name,
                shortDisplayName=team.name,
            )
            competitor["score"] = str(snap.home if side == "home" else snap.away)
            competitor["linescores"] = [
                {"value": float(line[index] or 0), "displayValue": str(line[index] or 0), "period": n + 1}
                for n, line in enumerate(snap.lines)
            ]
        return event

    def _espn_summary(self, game: SimGame, at: datetime) -> Any:
        event = self._espn_event(game, at)
        competition = event["competitions"][0]
        teams = [
            {"team": c["team"], "statistics": c.get("statistics", []), "homeAway": c["homeAway"]}
            for c in competition["competitors"]
        ]
        return {
            "boxscore": {"teams": teams, "players": []},
            "format": competition.get("format", {}),
            "gameInfo": {
                "venue": competition.get("venue", {}),
                "attendance": competition.get("attendance", 0),
            },
            "header": {
                "id": game.game_id,
                "uid": event["uid"],
                "season": event.get("season", {}),
                "timeValid": True,
                "competitions": [competition],
                "links": event.get("links", []),
                "league": {
                    "id": "46",
                    "uid": "s:40~l:46",
                    "name": "National Basketball Association",
                    "abbreviation": "NBA",
                    "slug": "nba",
                    "isTournament": False,
                },
            },
            "plays": [],
        }

    # MLB

    def _mlb_status(self, snap: Snapshot) -> dict[str, Any]:
        rows = {
            "scheduled": ("Preview", "S", "Scheduled", "S", "P"),
            "live": ("Live", "I", "In Progress", "I", "L"),
            "final": ("Final", "F", "Final", "F", "F"),
            # Postponed is abstract Final: only the coded state tells it from a final.
            "postponed": ("Final", "D", "Postponed", "DR", "F"),
        }
        abstract, coded, detailed, code, short = rows[snap.status]
        status = {
            "abstractGameState": abstract,
            "codedGameState": coded,
            "detailedState": detailed,
            "statusCode": code,
            "startTimeTBD": False,
            "abstractGameCode": short,
        }
        if snap.status == "postponed":
            status["reason"] = "Rain"
        return status

    def _mlb_schedule_game(self, game: SimGame, at: datetime) -> Any:
        node = template("mlb_schedule_game")
        snap = self.snapshot(game, at)
        node.update(
            gamePk=int(game.game_id),
            link=f"/api/v1.1/game/{game.game_id}/feed/live",
            gameDate=snap.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            officialDate=self.day.isoformat(),
            status=self._mlb_status(snap),
            calendarEventID=f"14-{game.game_id}-{self.day.isoformat()}",
        )
        node["gameGuid"] = hashlib.md5(game.game_id.encode(), usedforsecurity=False).hexdigest()
        for side, team, total in (("home", game.home, snap.home), ("away", game.away, snap.away)):
            entry = node["teams"][side]
            entry["team"] = {"id": team.id, "name": team.full_name, "link": f"/api/v1/teams/{team.id}"}
            # Scores appear once the game is under way; a preview has none.
            for key in ("score", "isWinner"):
                entry.pop(key, None)
            if snap.status in ("live", "final"):
                entry["score"] = total
            if snap.status == "final":
                other = snap.away if side == "home" else snap.home
                entry["isWinner"] = total > other
        return node

    def _mlb_feed(self, game: SimGame, at: datetime) -> Any:
        body = template("mlb_feed")
        snap = self.snapshot(game, at)
        pk = int(game.game_id)
        body.update(gamePk=pk, link=f"/api/v1.1/game/{pk}/feed/live")
        body["metaData"]["timeStamp"] = at.strftime("%Y%m%d_%H%M%S")
        data = body["gameData"]
        data["game"].update(pk=pk, calendarEventID=f"14-{pk}-{self.day.isoformat()}")
        data["datetime"].update(
            dateTime=snap.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            originalDate=self.day.isoformat(),
            officialDate=self.day.isoformat(),
        )
        data["status"] = self._mlb_status(snap)
        for side, team in (("home", game.home), ("away", game.away)):
            data["teams"][side].update(
                id=team.id,
                name=team.full_name,
                abbreviation=team.code,
                teamName=team.name,
                locationName=team.city,
                shortName=team.city,
                clubName=team.name,
                link=f"/api/v1/teams/{team.id}",
            )
            box = body["liveData"]["boxscore"]["teams"][side]
            box["team"] = {"id": team.id, "name": team.full_name, "link": f"/api/v1/teams/{team.id}"}
        line = body["liveData"]["linescore"]
        scheduled = PERIODS["mlb"]
        line["scheduledInnings"] = scheduled
        if snap.status in ("scheduled", "postponed"):
            for key in ("currentInning", "currentInningOrdinal", "inningState", "inningHalf", "isTopInning"):
                line.pop(key, None)
            line["innings"] = []
            line["teams"] = {"home": {}, "away": {}}
            return body
        line.update(
            currentInning=snap.period,
            currentInningOrdinal=_ordinal(snap.period),
            inningState=snap.half,
            inningHalf="Top" if snap.half == "Top" else "Bottom",
            isTopInning=snap.half == "Top",
        )
        innings = []
        for number, (home, away) in enumerate(snap.lines, start=1):
            inning: dict[str, Any] = {"num": number, "ordinalNum": _ordinal(number)}
            inning["away"] = {"runs": away, "hits": away or 0, "errors": 0, "leftOnBase": 0}
            # The home half has no runs until it is played.
            home_played = not (number == snap.period and snap.half == "Top") and home is not None
            inning["home"] = (
                {"runs": home, "hits": home, "errors": 0, "leftOnBase": 0}
                if home_played
                else {"hits": 0, "errors": 0, "leftOnBase": 0}
            )
            innings.append(inning)
        line["innings"] = innings
        for side, total in (("home", snap.home), ("away", snap.away)):
            line["teams"][side] = {"runs": total, "hits": total, "errors": 0, "leftOnBase": 0}
        return body

    # NHL

    def _nhl_state(self, snap: Snapshot) -> tuple[str, str]:
        if snap.status == "postponed":
            return "FUT", "PPD"
        if snap.status == "scheduled":
            return "FUT", "OK"
        if snap.status == "final":
            return "OFF", "OK"
        late = snap.period >= PERIODS["nhl"] and snap.clock_s <= 300
        return ("CRIT" if late else "LIVE"), "OK"

    def _nhl_fill(self, node: Any, game: SimGame, snap: Snapshot) -> None:
        state, schedule_state = self._nhl_state(snap)
        node["id"] = int(game.game_id)
        node["startTimeUTC"] = snap.start.strftime("%Y-%m-%dT%H:%M:%SZ")
        node["gameState"] = state
        node["gameScheduleState"] = schedule_state
        for side, team, total in (("homeTeam", game.home, snap.home), ("awayTeam", game.away, snap.away)):
            entry = node[side]
            entry.update(id=team.id, abbrev=team.code, placeName={"default": team.city})
            entry["logo"] = f"https://assets.nhle.com/logos/nhl/svg/{team.code}_light.svg"
            entry["darkLogo"] = f"https://assets.nhle.com/logos/nhl/svg/{team.code}_dark.svg"
            if "commonName" in entry:
                entry["commonName"] = {"default": team.name}
            entry.pop("score", None)
            if snap.status in ("live", "final"):
                entry["score"] = total
        if snap.status in ("live", "final"):
            node["periodDescriptor"] = {"number": snap.period, "periodType": "REG", "maxRegulationPeriods": 3}
        else:
            node["periodDescriptor"] = {}

    def _nhl_schedule(self, wanted: date, at: datetime) -> Any:
        body = template("nhl_schedule")
        week = body["gameWeek"]
        for offset, day_node in enumerate(week):
            this_day = wanted + timedelta(days=offset)
            day_node["date"] = this_day.isoformat()
            day_node["dayAbbrev"] = this_day.strftime("%a").upper()
            games = self.of("nhl") if this_day == self.day else []
            day_node["games"] = []
            for game in games:
                node = template("nhl_schedule_game")
                snap = self.snapshot(game, at)
                self._nhl_fill(node, game, snap)
                slug = f"{game.away.code.lower()}-vs-{game.home.code.lower()}"
                node["gameCenterLink"] = f"/gamecenter/{slug}/{game.game_id}"
                day_node["games"].append(node)
            day_node["numberOfGames"] = len(games)
        body["previousStartDate"] = (wanted - timedelta(days=7)).isoformat()
        body["nextStartDate"] = (wanted + timedelta(days=7)).isoformat()
        body["numberOfGames"] = sum(d["numberOfGames"] for d in week)
        return body

    def _nhl_boxscore(self, game: SimGame, at: datetime) -> Any:
        body = template("nhl_boxscore")
        snap = self.snapshot(game, at)
        self._nhl_fill(body, game, snap)
        body["gameDate"] = self.day.isoformat()
        if not body["periodDescriptor"]:
            body["periodDescriptor"] = {"number": 1, "periodType": "REG", "maxRegulationPeriods": 3}
        live = snap.status == "live"
        left = int(snap.clock_s) if live else 0 if snap.status == "final" else 20 * 60
        minutes, seconds = divmod(left, 60)
        body["clock"] = {
            "timeRemaining": f"{minutes:02d}:{seconds:02d}",
            "secondsRemaining": left,
            "running": live and not snap.intermission,
            "inIntermission": live and snap.intermission,
        }
        for side, total in (("homeTeam", snap.home), ("awayTeam", snap.away)):
            body[side]["sog"] = total * 8 + snap.period * 3
        return body


