"""The common model every provider adapter produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class GameStatus(StrEnum):
    SCHEDULED = "scheduled"
    LIVE = "live"
    FINAL = "final"
    POSTPONED = "postponed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class PeriodScore:
    period: int  # 1-based; innings for MLB
    home: int | None  # None: not played (yet)
    away: int | None


@dataclass(frozen=True)
class Game:
    """One game as a schedule or a box score shows it. Times are UTC-aware."""

    provider: str  # nba, espn, mlb, nhl
    league: str  # nba, mlb, nhl, or the ESPN league path (e.g. "basketball/nba")
    game_id: str
    start_utc: datetime
    status: GameStatus
    home_team: str
    away_team: str
    home_score: int | None = None  # None before the game has a score
    away_score: int | None = None
    period: int = 0  # 0 before the start
    clock: str | None = None  # as the provider shows it, normalised to "MM:SS" when possible
    periods: tuple[PeriodScore, ...] = field(default_factory=tuple)
    detail: str = ""  # the provider's own status text
    # Added for the live-game handler's polling rhythm: a break in play (NHL intermission,
    # NBA/ESPN end of quarter or halftime, MLB middle/end of inning), and how many periods
    # regulation has (None: the provider did not say) to spot the end of the last one.
    intermission: bool = False
    regulation_periods: int | None = None
