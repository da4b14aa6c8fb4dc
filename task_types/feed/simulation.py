"""The simulation behind the feed: a day of games for every provider, and what has
happened in each at any instant. What happens in a game is a function of (seed, game
index, elapsed time) only, so `truth` can tell a test harness exactly what the system
should have seen. Pure: no clock of its own and no I/O."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

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



class GameDay:
    """The games of one simulated day and their state at any moment."""

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

