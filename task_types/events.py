"""The data of every event the built-in task types emit, one model per kind and version.

A kind is its routing key, `<task_type>.<event>`. These models are the contract
downstream services read: docs/asyncapi.yaml carries each one's JSON Schema (with its
version), the consumer kit (taskmgr.consumer) hands events over as instances of them,
and a test checks that every event of a simulated day validates. They register through
the `taskmgr.event_kinds` entry point (pyproject.toml), as the handlers do.

Changing a kind's data incompatibly means a new model under a new version (the handler
emits it with EmittedEvent.version), so consumers can tell which they read.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Provider = Literal["nba", "espn", "mlb", "nhl"]
Status = Literal["scheduled", "live", "final", "postponed", "cancelled"]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GameRef(_Data):
    """What every game event carries (task_types.sports.game_ref)."""

    provider: Provider
    league: str
    game_id: str
    home_team: str
    away_team: str

    @property
    def game_key(self) -> str:
        """`<provider>:<game_id>`, as the history's game_key column."""
        return f"{self.provider}:{self.game_id}"


class GameStarted(GameRef):
    """The first poll that saw the game under way (live or already final)."""

    start_utc: datetime


class ScoreChanged(GameRef):
    """A score the box score showed that differs from the one before. A score taken
    back is a new event (its key has a higher generation), never a repeat."""

    home_score: int = Field(ge=0)
    away_score: int = Field(ge=0)
    period: int = Field(ge=0)


class PeriodEnded(GameRef):
    """A period is over (a later one began, or the game is final); its line score."""

    period: int = Field(ge=1)
    home: int | None
    away: int | None


class PeriodLine(_Data):
    """One period's line score (None: not played, or not in the box score)."""

    period: int = Field(ge=1)
    home: int | None
    away: int | None


class GameFinal(GameRef):
    """The box score says final: the final score and the line score of every period."""

    home_score: int | None
    away_score: int | None
    periods: list[PeriodLine]


class GamePostponed(GameRef):
    """The provider postponed the game: its task ends."""

    detail: str


class GameCancelled(GameRef):
    """The provider cancelled the game: its task ends."""

    detail: str


class PeriodScore(GameRef):
    """period_score: one period's line score, polled after it ended."""

    period: int = Field(ge=1)
    home: int | None
    away: int | None
    available: bool  # False where the provider's box score has no line score


class Score(_Data):
    """A final score (None: the box score had none)."""

    home_score: int | None
    away_score: int | None


class StatsChecked(GameRef):
    """stat_correction: the final checked again some minutes later."""

    changed: bool
    before: Score
    after: Score
    status: Status


class ScoreCorrected(GameRef):
    """stat_correction: the final score changed after the game."""

    before: Score
    after: Score


class ScheduleSynced(_Data):
    """schedule: a day's listing, confirmed and synced into game tasks."""

    provider: Provider
    league: str
    date: date
    games: int = Field(ge=0)
    tasks: int = Field(ge=0)
    by_status: dict[str, int]
    game_ids: list[str]


class Done(_Data):
    """noop: the one poll's HTTP status."""

    status: int


# Routing key -> version -> model: the `taskmgr.event_kinds` entry point's value.
EVENT_KINDS: dict[str, dict[int, type[BaseModel]]] = {
    "live_game.game.started": {1: GameStarted},
    "live_game.score.changed": {1: ScoreChanged},
    "live_game.period.ended": {1: PeriodEnded},
    "live_game.game.final": {1: GameFinal},
    "live_game.game.postponed": {1: GamePostponed},
    "live_game.game.cancelled": {1: GameCancelled},
    "period_score.period.score": {1: PeriodScore},
    "stat_correction.stats.checked": {1: StatsChecked},
    "stat_correction.score.corrected": {1: ScoreCorrected},
    "schedule.schedule.synced": {1: ScheduleSynced},
    "noop.done": {1: Done},
}
