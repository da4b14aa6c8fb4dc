"""The simulated feed: a day of games for every provider, in each provider's real JSON
shape at its real paths (under a provider prefix), on an accelerated clock.

Every body is a trimmed recorded response (task_types/feed_templates.json, rebuilt by
tests/fixtures/build_feed_templates.py) filled with simulated values, so the same
adapters that read the real APIs read the feed. What happens in a game is a function of
(seed, game index, elapsed time) only: `/_truth` can tell a test harness exactly what
the system should have seen.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

from task_types.providers.espn import league_path

PROVIDER_NAMES = ("nba", "espn", "mlb", "nhl")
LEAGUES = {"nba": "nba", "espn": "basketball/nba", "mlb": "mlb", "nhl": "nhl"}
PERIODS = {"nba": 4, "espn": 4, "mlb": 9, "nhl": 3}
# Game-clock minutes per period (MLB has no clock).
PERIOD_MINUTES = {"nba": 12, "espn": 12, "mlb": 0, "nhl": 20}

_NBA_TEAMS = [
    (1610612738, "Boston", "Celtics", "BOS", "2"),
    (1610612755, "Philadelphia", "76ers", "PHI", "20"),
    (1610612744, "Golden State", "Warriors", "GSW", "9"),
    (1610612758, "Sacramento", "Kings", "SAC", "23"),
    (1610612751, "Brooklyn", "Nets", "BKN", "17"),
    (1610612747, "Los Angeles", "Lakers", "LAL", "13"),
    (1610612743, "Denver", "Nuggets", "DEN", "7"),
    (1610612748, "Miami", "Heat", "MIA", "14"),
]
_MLB_TEAMS = [
    (117, "Houston Astros", "HOU", "Astros", "Houston"),
    (141, "Toronto Blue Jays", "TOR", "Blue Jays", "Toronto"),
    (121, "New York Mets", "NYM", "Mets", "New York"),
    (120, "Washington Nationals", "WSH", "Nationals", "Washington"),
    (158, "Milwaukee Brewers", "MIL", "Brewers", "Milwaukee"),
    (115, "Colorado Rockies", "COL", "Rockies", "Colorado"),
    (147, "New York Yankees", "NYY", "Yankees", "New York"),
    (111, "Boston Red Sox", "BOS", "Red Sox", "Boston"),
]
_NHL_TEAMS = [
    (23, "VAN", "Vancouver", "Canucks"),
    (20, "CGY", "Calgary", "Flames"),
    (16, "CHI", "Chicago", "Blackhawks"),
    (12, "CAR", "Carolina", "Hurricanes"),
    (15, "WSH", "Washington", "Capitals"),
    (1, "NJD", "New Jersey", "Devils"),
    (24, "ANA", "Anaheim", "Ducks"),
    (10, "TOR", "Toronto", "Maple Leafs"),
]


@dataclass
class Faults:
    """What goes wrong, and how often (rates 0..1), on game and schedule routes."""

    error_5xx: float = 0.0
    timeout: float = 0.0  # hang for timeout_s (longer than clients wait), then 504
    timeout_s: float = 30.0
    rate_limit_429: float = 0.0  # with Retry-After: 1
    malformed: float = 0.0  # a truncated JSON body
    slow: float = 0.0  # answer after slow_s
    slow_s: float = 2.0
    postponed: list[str] = field(default_factory=list)  # game ids served as postponed
    moved: dict[str, float] = field(default_factory=dict)  # game id -> seconds its start moves
    # Game ids whose first score is taken back later in its period (a disallowed goal, a
    # reviewed basket): the truth and every body follow the corrected score.
    reversals: list[str] = field(default_factory=list)
    # Game ids answered with a gzip bomb (BOMB_BYTES of zeros, a few KB on the wire).
    bombs: list[str] = field(default_factory=list)

    def updated(self, changes: dict[str, Any]) -> Faults:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        merged = {**asdict(self), **changes}
        faults = Faults(
            **{k: v for k, v in merged.items() if k not in ("postponed", "reversals", "bombs", "moved")},
            postponed=[str(g) for g in merged["postponed"]],
            reversals=[str(g) for g in merged["reversals"]],
            bombs=[str(g) for g in merged["bombs"]],
            moved={str(k): float(v) for k, v in dict(merged["moved"]).items()},
        )
        for name in ("error_5xx", "timeout", "rate_limit_429", "malformed", "slow"):
            rate = float(getattr(faults, name))
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
            setattr(faults, name, rate)
        return faults


@dataclass
class FeedConfig:
    seed: int = 0
    games_per_provider: int = 2
    first_start_s: float = 10.0  # after the epoch
    spread_s: float = 50.0  # the starts spread over this
    period_s: float = 8.0  # real seconds per period (inning for MLB)
    intermission_s: float = 2.0
    epoch: datetime | None = None  # None: when the feed starts
    day: date | None = None  # the date schedules report; None: the epoch's UTC date
    providers: tuple[str, ...] = PROVIDER_NAMES
    faults: Faults = field(default_factory=Faults)


@dataclass(frozen=True)
class Team:
    id: int
    code: str  # tricode / abbreviation, what the adapters report
    city: str
    name: str
    espn_id: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.city} {self.name}"


@dataclass(frozen=True)
class Score:
    offset_s: float  # after the start
    period: int
    side: str  # "home" or "away"
    points: int


@dataclass(frozen=True)
class SimGame:
    provider: str
    league: str
    game_id: str
    index: int
    home: Team
    away: Team
    start_offset_s: float  # after the epoch, before any move
    scores: tuple[Score, ...]
    duration_s: float
    skip_last_bottom: bool  # MLB: home leads after the top of the 9th


@dataclass(frozen=True)
class Snapshot:
    """A game as it stands at one moment."""

    status: str  # scheduled, live, final, postponed
    start: datetime
    period: int
    clock_s: float  # game-clock seconds left in the period
    intermission: bool
    half: str  # MLB: Top, Bottom, End
    home: int
    away: int
    lines: tuple[tuple[int | None, int | None], ...]  # (home, away) per period so far


def _pick_teams(rng: random.Random, provider: str) -> tuple[Team, Team]:
    teams: list[Team]
    if provider in ("nba", "espn"):
        teams = [Team(r[0], r[3], r[1], r[2], r[4]) for r in _NBA_TEAMS]
    elif provider == "mlb":
        teams = [Team(r[0], r[2], r[4], r[3]) for r in _MLB_TEAMS]
    else:
        teams = [Team(r[0], r[1], r[2], r[3]) for r in _NHL_TEAMS]
    home, away = rng.sample(teams, 2)
    return home, away


def _game_id(provider: str, seed: int, index: int) -> str:
    match provider:
        case "nba":
            return f"00224{seed % 100:02d}{index:03d}"
        case "espn":
            return str(401800000 + (seed % 1000) * 100 + index)
        case "mlb":
            return str(745000 + (seed % 1000) * 100 + index)
        case _:
            return str(2024020000 + (seed % 90) * 100 + index)


def _simulate(
    provider: str, rng: random.Random, period_s: float, gap_s: float
) -> tuple[list[Score], float, bool]:
    """Scoring plays as offsets after the start; the game's length; whether MLB skips the
    last bottom half. Counts are fixed per period, so a faster clock changes nothing but
    the timing."""
    periods = PERIODS[provider]
    step = period_s + gap_s
    scores: list[Score] = []
    if provider == "mlb":
        home_total = away_total = 0
        skip = False
        for inning in range(1, periods + 1):
            for half, side in ((0, "away"), (1, "home")):
                runs = rng.choices((0, 1, 2, 3), weights=(72, 15, 8, 5))[0]
                last = inning == periods
                if last and half == 1 and home_total > away_total:
                    skip = True
                    break
                if last and half == 1 and home_total + runs == away_total:
                    runs += 1  # no extra innings in the simulation: a walk-off instead
                if runs:
                    at = (inning - 1) * step + (half + rng.uniform(0.1, 0.9)) * period_s / 2
                    scores.append(Score(at, inning, side, runs))
                    home_total += runs if side == "home" else 0
                    away_total += runs if side == "away" else 0
        duration = (periods - 1) * step + (period_s / 2 if skip else period_s)
        return scores, duration, skip
    for period in range(1, periods + 1):
        if provider == "nhl":
            count = rng.choices((0, 1, 2, 3), weights=(30, 40, 20, 10))[0]
        else:
            count = rng.randint(4, 7)
        for fraction in sorted(rng.uniform(0.02, 0.97) for _ in range(count)):
            points = 1 if provider == "nhl" else rng.choices((2, 3), weights=(3, 1))[0]
            side = rng.choice(("home", "away"))
            scores.append(Score((period - 1) * step + fraction * period_s, period, side, points))
    home = sum(s.points for s in scores if s.side == "home")
    away = sum(s.points for s in scores if s.side == "away")
    if home == away:  # no overtime in the simulation: a late winner instead
        scores.append(Score((periods - 1) * step + 0.98 * period_s, periods, rng.choice(("home", "away")), 1))
    return scores, periods * period_s + (periods - 1) * gap_s, False


@cache
def _templates() -> dict[str, Any]:
    text = resources.files("task_types").joinpath("feed_templates.json").read_text(encoding="utf-8")
    return json.loads(text)


def template(name: str) -> Any:
    """A fresh copy of a recorded-body template (callers fill it in place)."""
    return copy.deepcopy(_templates()[name])


class SimulatedDay:
    """The games of one simulated day and their bodies at any moment. Pure: no clock of
    its own and no I/O, so tests can render any instant."""

    def __init__(self, config: FeedConfig, epoch: datetime) -> None:
        self.config = config
        # Whole seconds, as the providers list start times (ESPN even drops the seconds).
        self.epoch = epoch.replace(microsecond=0)
        self.day = config.day or epoch.astimezone(UTC).date()
        self.faults = config.faults
        games: list[SimGame] = []
        total = config.games_per_provider * len(config.providers)
        for index in range(config.games_per_provider):
            for p_index, provider in enumerate(config.providers):
                if provider not in PERIODS:
                    raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDER_NAMES)}")
                rng = random.Random(f"{config.seed}:{provider}:{index}")
                home, away = _pick_teams(rng, provider)
                scores, duration, skip = _simulate(provider, rng, config.period_s, config.intermission_s)
                order = index * len(config.providers) + p_index
                spread = config.spread_s * order / (total - 1) if total > 1 else 0.0
                games.append(
                    SimGame(
                        provider=provider,
                        league=LEAGUES[provider],
                        game_id=_game_id(provider, config.seed, index),
                        index=index,
                        home=home,
                        away=away,
                        start_offset_s=float(round(config.first_start_s + spread)),
                        scores=tuple(scores),
                        duration_s=duration,
                        skip_last_bottom=skip,
                    )
                )
        self.games = games
        self._by_id = {(g.provider, g.game_id): g for g in games}

    def game(self, provider: str, game_id: str) -> SimGame | None:
        return self._by_id.get((provider, game_id))

    def of(self, provider: str) -> list[SimGame]:
        return [g for g in self.games if g.provider == provider]

    def start(self, game: SimGame) -> datetime:
        moved = self.faults.moved.get(game.game_id, 0.0)
        return self.epoch + timedelta(seconds=game.start_offset_s + moved)

    def scores_of(self, game: SimGame) -> tuple[Score, ...]:
        """The game's scoring plays, with the reversal of its first one when the game is
        in faults.reversals: halfway between that play and the next one of the period
        (or the period's end), the same points are taken back."""
        if game.game_id not in self.faults.reversals or not game.scores:
            return game.scores
        first = min(game.scores, key=lambda s: s.offset_s)
        step = self.config.period_s + self.config.intermission_s
        period_end = (first.period - 1) * step + self.config.period_s
        later = [s.offset_s for s in game.scores if s.period == first.period and s.offset_s > first.offset_s]
        back = (first.offset_s + min([*later, period_end])) / 2
        return (*game.scores, Score(back, first.period, first.side, -first.points))

    def snapshot(self, game: SimGame, at: datetime) -> Snapshot:
        start = self.start(game)
        periods = PERIODS[game.provider]
        empty = Snapshot("scheduled", start, 0, 0.0, False, "", 0, 0, ())
        if game.game_id in self.faults.postponed:
            return Snapshot("postponed", start, 0, 0.0, False, "", 0, 0, ())
        elapsed = (at - start).total_seconds()
        if elapsed < 0:
            return empty
        cfg = self.config
        step = cfg.period_s + cfg.intermission_s
        final = elapsed >= game.duration_s
        if final:
            period, in_period = periods, cfg.period_s
        else:
            period = min(int(elapsed // step) + 1, periods)
            in_period = elapsed - (period - 1) * step
        intermission = not final and in_period >= cfg.period_s
        seen = [s for s in self.scores_of(game) if s.offset_s <= elapsed]
        lines: list[tuple[int | None, int | None]] = []
        for number in range(1, period + 1):
            home = sum(s.points for s in seen if s.period == number and s.side == "home")
            away = sum(s.points for s in seen if s.period == number and s.side == "away")
            lines.append((home, away))
        half = ""
        if game.provider == "mlb":
            if intermission or final:
                half = "End"
            else:
                half = "Top" if in_period < cfg.period_s / 2 else "Bottom"
            if game.skip_last_bottom and period == periods and (final or half == "Bottom"):
                lines[-1] = (None, lines[-1][1])
        left = max(0.0, 1.0 - min(in_period, cfg.period_s) / cfg.period_s)
        return Snapshot(
            status="final" if final else "live",
            start=start,
            period=period,
            clock_s=PERIOD_MINUTES[game.provider] * 60 * left,
            intermission=intermission,
            half=half,
            home=sum(s.points for s in seen if s.side == "home"),
            away=sum(s.points for s in seen if s.side == "away"),
            lines=tuple(lines),
        )

    # -- truth -------------------------------------------------------------------------

    def truth(self, at: datetime) -> dict[str, Any]:
        games = []
        for game in self.games:
            start = self.start(game)
            snap = self.snapshot(game, at)
            home = away = 0
            changes = []
            for score in sorted(self.scores_of(game), key=lambda s: s.offset_s):
                home += score.points if score.side == "home" else 0
                away += score.points if score.side == "away" else 0
                changes.append(
                    {
                        "at": (start + timedelta(seconds=score.offset_s)).isoformat(),
                        "period": score.period,
                        "home": home,
                        "away": away,
                    }
                )
            final_snap = self.snapshot(game, start + timedelta(seconds=game.duration_s + 1))
            games.append(
                {
                    "provider": game.provider,
                    "league": game.league,
                    "game_id": game.game_id,
                    "home_team": game.home.code,
                    "away_team": game.away.code,
                    "start_utc": start.isoformat(),
                    "end_utc": (start + timedelta(seconds=game.duration_s)).isoformat(),
                    "status": snap.status,
                    "period": snap.period,
                    "home_score": snap.home,
                    "away_score": snap.away,
                    "final": {"home": final_snap.home, "away": final_snap.away},
                    "periods": [
                        {"period": n + 1, "home": h, "away": a} for n, (h, a) in enumerate(final_snap.lines)
                    ],
                    "score_changes": changes,
                    "postponed": game.game_id in self.faults.postponed,
                }
            )
        return {
            "now": at.isoformat(),
            "epoch": self.epoch.isoformat(),
            "day": self.day.isoformat(),
            "config": {
                "seed": self.config.seed,
                "period_s": self.config.period_s,
                "intermission_s": self.config.intermission_s,
            },
            "games": games,
        }

    # -- bodies ------------------------------------------------------------------------

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


# A gzip bomb for the `bombs` fault: this many bytes once inflated.
BOMB_BYTES = 64 * 1024 * 1024
BOMB = object()  # what _game_body returns for a game answered with the bomb


@cache
def _bomb() -> bytes:
    return gzip.compress(b"0" * BOMB_BYTES, compresslevel=9)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# -- the HTTP server ---------------------------------------------------------------------


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


class _FeedServer:
    """One running feed: its simulated day, its fault settings and its fault RNG."""

    def __init__(self, config: FeedConfig, epoch: datetime) -> None:
        self.day = SimulatedDay(config, epoch)
        # Seeded so a run's faults can be replayed; separate from the games' generators
        # so that faults never change what happens in a game.
        self.fault_rng = random.Random(f"{config.seed}:faults")

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    def app(self) -> web.Application:
        app = web.Application()
        routes = [
            web.get("/nba/static/json/liveData/scoreboard/todaysScoreboard_00.json", self.nba_schedule),
            web.get("/nba/static/json/liveData/boxscore/boxscore_{game_id}.json", self.nba_game),
            web.get("/espn/apis/site/v2/sports/{sport}/{league}/scoreboard", self.espn_schedule),
            web.get("/espn/apis/site/v2/sports/{sport}/{league}/summary", self.espn_game),
            web.get("/mlb/api/v1/schedule", self.mlb_schedule),
            web.get("/mlb/api/v1.1/game/{game_id}/feed/live", self.mlb_game),
            web.get("/nhl/v1/schedule/{date}", self.nhl_schedule),
            web.get("/nhl/v1/gamecenter/{game_id}/boxscore", self.nhl_game),
            web.get("/_truth", self.truth),
            web.get("/_faults", self.get_faults),
            web.post("/_faults", self.set_faults),
            web.get("/", self.index),
        ]
        app.add_routes(routes)
        return app

    # -- plumbing --

    @staticmethod
    def _json(request: web.Request, body: Any, status: int = 200) -> web.Response:
        raw = json.dumps(body, separators=(",", ":")).encode()
        etag = _etag(raw)
        if status == 200 and _matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=raw, status=status, content_type="application/json", headers={"ETag": etag})

    async def _serve(self, request: web.Request, make_body: Any) -> web.StreamResponse:
        """Apply the faults, then answer with the body `make_body()` builds."""
        faults = self.day.faults
        roll = self.fault_rng.random
        if roll() < faults.timeout:
            # Longer than clients wait; the handler is cancelled when the client gives up.
            await asyncio.sleep(faults.timeout_s)
            return web.json_response({"error": "gateway timeout"}, status=504)
        if roll() < faults.error_5xx:
            return web.json_response({"error": "simulated server error"}, status=503)
        if roll() < faults.rate_limit_429:
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": "1"})
        malformed = roll() < faults.malformed
        if roll() < faults.slow:
            await asyncio.sleep(faults.slow_s)
        body = make_body()
        if body is None:
            return web.json_response({"error": "not found"}, status=404)
        if body is BOMB:
            return web.Response(
                body=_bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )
        if malformed:
            raw = json.dumps(body, separators=(",", ":")).encode()
            cut = raw[: max(1, len(raw) // 2)]
            return web.Response(body=cut, content_type="application/json", headers={"ETag": _etag(cut)})
        return self._json(request, body)

    def _game_body(self, provider: str, game_id: str) -> Any:
        if game_id in self.day.faults.bombs:
            return BOMB
        game = self.day.game(provider, game_id)
        return None if game is None else self.day.game_body(provider, game, self.now())

    @staticmethod
    def _date(raw: str | None, compact: bool = False) -> date | None:
        if not raw:
            return None
        try:
            if compact:
                return datetime.strptime(raw, "%Y%m%d").date()
            return date.fromisoformat(raw)
        except ValueError:
            raise web.HTTPBadRequest(text=f"bad date {raw!r}") from None

    # -- provider routes --

    async def nba_schedule(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, lambda: self.day.schedule_body("nba", self.now()))

    async def nba_game(self, request: web.Request) -> web.StreamResponse:
        game_id = request.match_info["game_id"]
        return await self._serve(request, lambda: self._game_body("nba", game_id))

    async def espn_schedule(self, request: web.Request) -> web.StreamResponse:
        league = f"{request.match_info['sport']}/{request.match_info['league']}"
        day = self._date(request.query.get("dates"), compact=True)

        def body() -> Any:
            if league_path(league) != LEAGUES["espn"]:
                return self.day.schedule_body("espn", self.now(), day=date.min)
            return self.day.schedule_body("espn", self.now(), day=day)

        return await self._serve(request, body)

    async def espn_game(self, request: web.Request) -> web.StreamResponse:
        event = request.query.get("event", "")
        return await self._serve(request, lambda: self._game_body("espn", event))

    async def mlb_schedule(self, request: web.Request) -> web.StreamResponse:
        day = self._date(request.query.get("date"))
        return await self._serve(request, lambda: self.day.schedule_body("mlb", self.now(), day=day))

    async def mlb_game(self, request: web.Request) -> web.StreamResponse:
        game_id = request.match_info["game_id"]
        return await self._serve(request, lambda: self._game_body("mlb", game_id))

    async def nhl_schedule(self, request: web.Request) -> web.StreamResponse:
        day = self._date(request.match_info["date"])
        return await self._serve(request, lambda: self.day.schedule_body("nhl", self.now(), day=day))

    async def nhl_game(self, request: web.Request) -> web.StreamResponse:
        game_id = request.match_info["game_id"]
        return await self._serve(request, lambda: self._game_body("nhl", game_id))

    # -- control routes (never faulty) --

    async def truth(self, request: web.Request) -> web.StreamResponse:
        return self._json(request, self.day.truth(self.now()))

    async def get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(asdict(self.day.faults))

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            self.day.faults = self.day.faults.updated(changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.day.faults))

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "providers": list(self.day.config.providers),
                "day": self.day.day.isoformat(),
                "games": [{"provider": g.provider, "game_id": g.game_id} for g in self.day.games],
            }
        )


@dataclass
class RunningFeed:
    """A feed serving on `url`; `base_urls()` gives each provider's base for the adapters."""

    url: str
    day: SimulatedDay
    _runner: web.AppRunner

    def base_urls(self) -> dict[str, str]:
        return {provider: f"{self.url}/{provider}" for provider in self.day.config.providers}

    def games(self) -> list[SimGame]:
        return list(self.day.games)

    def truth(self) -> dict[str, Any]:
        return self.day.truth(datetime.now(UTC))

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_feed(config: FeedConfig, host: str = "127.0.0.1", port: int = 0) -> RunningFeed:
    """Start the feed in the running event loop (port 0: any free port)."""
    server = _FeedServer(config, config.epoch or datetime.now(UTC))
    # handler_cancellation: a client that gives up on a "timeout" fault frees its
    # handler at once; a short shutdown_timeout keeps close() from waiting on hangs.
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # aiohttp has no public accessor for the bound port; port 0 needs the real one.
    server_obj: Any = site._server
    sockets = getattr(server_obj, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return RunningFeed(url=f"http://{host}:{bound}", day=server.day, _runner=runner)


async def feed_day(url: str, timeout_s: float = 20.0) -> date:
    """Wait until a feed (started elsewhere) answers at `url`; return the day it plays."""
    import httpx

    async with httpx.AsyncClient() as client, asyncio.timeout(timeout_s):
        while True:
            try:
                r = await client.get(f"{url}/")
                if r.status_code == 200:
                    return date.fromisoformat(r.json()["day"])
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


def main(config: FeedConfig, host: str = "127.0.0.1", port: int = 8099) -> None:
    """Serve until interrupted (for `taskmgr feed`)."""

    async def serve() -> None:
        feed = await start_feed(config, host, port)
        print(f"simulated feed on {feed.url} (day {feed.day.day}, {len(feed.day.games)} games)", flush=True)
        for provider, base in feed.base_urls().items():
            print(f"  {provider}: {base}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await feed.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
