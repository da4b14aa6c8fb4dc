"""What every provider adapter offers."""

from __future__ import annotations

from datetime import date
from typing import Any, Protocol, runtime_checkable

from task_types.providers.model import Game


@runtime_checkable
class Provider(Protocol):
    """An adapter for one provider's API.

    Paths are relative to a base URL and carry the query string, so `base + path` works
    for the real host (`default_base_url`) and for the simulated feed alike.
    """

    name: str
    default_base_url: str

    def schedule_path(self, day: date, league: str) -> str: ...

    def game_path(self, game_id: str, league: str) -> str: ...

    def parse_schedule(self, body: Any, league: str, *, day: date | None = None) -> list[Game]:
        """The games in a schedule body. `day` keeps only that day's games where the
        response covers several (the NHL answers with a 7-day week)."""
        ...

    def parse_game(self, body: Any, league: str) -> Game: ...
